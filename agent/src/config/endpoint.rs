//! The DPS endpoint: `provisioning.global_endpoint` parsed once at load into host and port.

/// Where DPS listens. `Config::dps_endpoint` holds it for `source = "dps"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DpsEndpoint {
    pub host: String,
    pub port: u16,
}

impl DpsEndpoint {
    /// Over HTTPS (DPS TPM attestation) or MQTT, whose default port is `mqtt_port` (`hub.port`).
    pub(super) fn parse(
        endpoint: &str,
        over_https: bool,
        mqtt_port: u16,
    ) -> Result<DpsEndpoint, String> {
        let (host, port) = if over_https {
            parse_https_endpoint(endpoint)?
        } else {
            parse_endpoint(endpoint, mqtt_port)?
        };
        Ok(DpsEndpoint { host, port })
    }
}

impl std::fmt::Display for DpsEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// `host`, `host:port` or `mqtts://host[:port]` → (host, port).
pub(super) fn parse_endpoint(endpoint: &str, default_port: u16) -> Result<(String, u16), String> {
    let rest = endpoint
        .strip_prefix("mqtts://")
        .unwrap_or(endpoint)
        .trim_end_matches('/');
    if rest.is_empty() || rest.contains("://") || rest.contains('/') {
        return Err(format!(
            "'{endpoint}' is not a host name, host:port or mqtts://host:port"
        ));
    }
    match rest.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => with_port(host, port, endpoint),
        _ => Ok((rest.to_string(), default_port)),
    }
}

/// The DPS endpoint for HTTPS: `https://host[:port]` (port 443 unless given). A plain `host`,
/// `host:port` or `mqtts://host:port` keeps its host and uses 443: an MQTT port says nothing
/// about where DPS serves HTTPS.
pub(super) fn parse_https_endpoint(endpoint: &str) -> Result<(String, u16), String> {
    match endpoint.strip_prefix("https://") {
        Some(rest) => {
            let rest = rest.trim_end_matches('/');
            if rest.is_empty() || rest.contains('/') {
                return Err(format!("'{endpoint}' is not https://host[:port]"));
            }
            match rest.rsplit_once(':') {
                Some((host, port)) => with_port(host, port, endpoint),
                None => Ok((rest.to_string(), 443)),
            }
        }
        None => parse_endpoint(endpoint, 443).map(|(host, _)| (host, 443)),
    }
}

fn with_port(host: &str, port: &str, endpoint: &str) -> Result<(String, u16), String> {
    port.parse()
        .map(|p| (host.to_string(), p))
        .map_err(|_| format!("port '{port}' in '{endpoint}' is not a number"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mqtt_endpoints_take_the_hub_port_unless_they_name_one() {
        let parse = |e: &str| DpsEndpoint::parse(e, false, 8883).map(|d| d.to_string());
        assert_eq!(parse("dps.example").unwrap(), "dps.example:8883");
        assert_eq!(
            parse("mqtts://dps.example:8884/").unwrap(),
            "dps.example:8884"
        );
        assert_eq!(
            parse("https://dps.example").unwrap_err(),
            "'https://dps.example' is not a host name, host:port or mqtts://host:port"
        );
        assert_eq!(
            parse("dps:x").unwrap_err(),
            "port 'x' in 'dps:x' is not a number"
        );
    }

    #[test]
    fn https_endpoints_use_443_unless_an_https_url_names_a_port() {
        let parse = |e: &str| DpsEndpoint::parse(e, true, 8883).map(|d| d.to_string());
        assert_eq!(parse("dps.example:8883").unwrap(), "dps.example:443");
        assert_eq!(
            parse("https://dps.example:8443/").unwrap(),
            "dps.example:8443"
        );
        assert_eq!(
            parse("https://").unwrap_err(),
            "'https://' is not https://host[:port]"
        );
    }
}
