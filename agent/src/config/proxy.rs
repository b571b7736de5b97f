//! The HTTP proxy the agent tunnels through (HTTP CONNECT): `[hub] proxy` with its password in a
//! file (`proxy_password`), or, as operators expect of Linux tools, `https_proxy`/`HTTPS_PROXY`
//! and `no_proxy`/`NO_PROXY` from the environment (a systemd drop-in's `Environment=`).

use super::Secret;

/// A parsed proxy: where it is, and who the agent says it is.
#[derive(Clone, PartialEq)]
pub struct Proxy {
    pub host: String,
    pub port: u16,
    pub user: Option<String>,
    /// `proxy_password`, or the password of an environment URL (held as an inline secret).
    pub password: Option<Secret>,
    /// `[hub] proxy`, or the environment variable it came from: errors and `check` name it.
    pub source: String,
    /// Hosts reached directly (`no_proxy`): exact names, `.suffix`/`suffix` domains, or `*`.
    pub no_proxy: Vec<String>,
}

impl std::fmt::Debug for Proxy {
    // The password never shows, even in a Debug dump.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

impl std::fmt::Display for Proxy {
    /// `http://user@host:port` (from source): never the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.user {
            Some(user) => write!(f, "http://{user}@{}:{}", self.host, self.port)?,
            None => write!(f, "http://{}:{}", self.host, self.port)?,
        }
        write!(f, " (from {})", self.source)
    }
}

impl Proxy {
    /// Whether a connection to `host` goes through this proxy (not listed in `no_proxy`).
    pub fn applies_to(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        !self.no_proxy.iter().any(|entry| {
            let entry = entry.trim_start_matches('.');
            entry == "*" || host == entry || host.ends_with(&format!(".{entry}"))
        })
    }
}

/// The proxy in force: `[hub] proxy` (with `proxy_password`), else `https_proxy`/`HTTPS_PROXY`;
/// `no_proxy`/`NO_PROXY` applies to both. `None` without one.
pub(super) fn resolve(
    configured: Option<&str>,
    password: Option<&Secret>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Proxy>, String> {
    let no_proxy: Vec<String> = env("no_proxy")
        .or_else(|| env("NO_PROXY"))
        .map(|list| {
            list.split(',')
                .map(|h| h.trim().to_ascii_lowercase())
                .filter(|h| !h.is_empty())
                .collect()
        })
        .unwrap_or_default();
    let (url, source) = match configured {
        Some(url) => (url.to_string(), "[hub] proxy".to_string()),
        None => match ["https_proxy", "HTTPS_PROXY"]
            .iter()
            .find_map(|var| env(var).filter(|v| !v.is_empty()).map(|v| (v, var)))
        {
            Some((url, var)) => (url, format!("the environment variable {var}")),
            None => return Ok(None),
        },
    };
    let (host, port, user, url_password) = parse_url(&url).map_err(|e| format!("{source}: {e}"))?;
    if url_password.is_some() && configured.is_some() {
        return Err(
            "[hub] proxy: put the password in a file (proxy_password = { file = \"...\" }), not in the URL"
                .into(),
        );
    }
    let password = match (password, url_password) {
        (Some(secret), _) => Some(secret.clone()),
        (None, Some(value)) => Some(Secret::Value { value }),
        (None, None) => None,
    };
    if password.is_some() && user.is_none() {
        return Err(format!(
            "{source}: a proxy password needs a user name (http://USER@host:port)"
        ));
    }
    Ok(Some(Proxy {
        host,
        port,
        user,
        password,
        source,
        no_proxy,
    }))
}

/// `http://[user[:password]@]host:port` → parts. Only HTTP proxies (CONNECT over plain HTTP).
fn parse_url(url: &str) -> Result<(String, u16, Option<String>, Option<String>), String> {
    let shown = match url.split_once('@') {
        // The password must not reach the error text.
        Some((_, host)) => format!("http://…@{host}"),
        None => url.to_string(),
    };
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        format!("'{shown}' is not an HTTP proxy URL (write http://[user@]host:port)")
    })?;
    let rest = rest.trim_end_matches('/');
    let (credentials, address) = match rest.rsplit_once('@') {
        Some((credentials, address)) => (Some(credentials), address),
        None => (None, rest),
    };
    let (host, port) = address
        .rsplit_once(':')
        .filter(|(host, _)| !host.is_empty() && !host.contains('/'))
        .ok_or_else(|| format!("'{shown}' needs host:port (write http://[user@]host:port)"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("'{shown}': port '{port}' is not a number"))?;
    let (user, password) = match credentials {
        None => (None, None),
        Some(c) => match c.split_once(':') {
            Some((user, password)) => (Some(decode(user)), Some(decode(password))),
            None => (Some(decode(c)), None),
        },
    };
    Ok((host.to_string(), port, user, password))
}

/// Percent-decoding of the user and password of a URL (`%40` for `@`).
fn decode(text: &str) -> String {
    percent_encoding::percent_decode_str(text)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn the_configured_proxy_wins_and_the_environment_is_the_fallback() {
        let file = Secret::File {
            file: "/etc/hubagent/proxy.pass".into(),
        };
        let proxy = resolve(Some("http://agent@proxy.lan:3128"), Some(&file), &env(&[]))
            .unwrap()
            .unwrap();
        assert_eq!((proxy.host.as_str(), proxy.port), ("proxy.lan", 3128));
        assert_eq!(proxy.user.as_deref(), Some("agent"));
        assert_eq!(proxy.password, Some(file));
        assert_eq!(
            proxy.to_string(),
            "http://agent@proxy.lan:3128 (from [hub] proxy)"
        );

        let vars = &[
            ("HTTPS_PROXY", "http://u%40x:s3cret@10.0.0.1:8080"),
            ("no_proxy", "localhost, .corp.example"),
        ];
        let proxy = resolve(None, None, &env(vars)).unwrap().unwrap();
        assert_eq!(proxy.user.as_deref(), Some("u@x"));
        assert!(matches!(&proxy.password, Some(Secret::Value { value }) if value == "s3cret"));
        assert!(!format!("{proxy:?} {proxy}").contains("s3cret"));
        assert!(proxy.source.contains("HTTPS_PROXY"));
        assert!(!proxy.applies_to("localhost"));
        assert!(!proxy.applies_to("hub.corp.example"));
        assert!(proxy.applies_to("my-hub.azure-devices.net"));
        assert_eq!(resolve(None, None, &env(&[])).unwrap(), None);
    }

    #[test]
    fn bad_proxy_settings_say_what_to_write_without_the_password() {
        let err = |url: &str| resolve(Some(url), None, &env(&[])).unwrap_err();
        assert!(err("socks5://p:1080").contains("not an HTTP proxy URL"));
        assert!(err("http://proxy.lan").contains("needs host:port"));
        assert!(err("http://proxy.lan:x").contains("is not a number"));
        let inline = err("http://u:hunter2@proxy.lan:3128");
        assert!(
            inline.contains("in a file") && !inline.contains("hunter2"),
            "{inline}"
        );
        let bad_env =
            resolve(None, None, &env(&[("https_proxy", "ftp://u:hunter2@p:1")])).unwrap_err();
        assert!(
            bad_env.contains("https_proxy") && !bad_env.contains("hunter2"),
            "{bad_env}"
        );
        let no_user = resolve(
            Some("http://proxy.lan:3128"),
            Some(&Secret::File { file: "/p".into() }),
            &env(&[]),
        )
        .unwrap_err();
        assert!(no_user.contains("needs a user name"), "{no_user}");
    }
}
