//! `hubagent check`: diagnostics an operator runs when something is off. Each check has a stable
//! id (for scripts and support tickets), a result (pass, warn, fail) and a detail that never
//! contains key material.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use hubagent::config::{Attestation, Config, Secret};
use hubagent::identity::x509::{Expiry, Validity};
use hubagent::mqtt::ProxyRoute;
use hubagent::state::{ProvisioningCache, StateDir};

#[derive(Debug, Serialize)]
pub struct Check {
    pub id: &'static str,
    pub result: &'static str,
    pub detail: String,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
}

fn pass(id: &'static str, detail: impl Into<String>) -> Check {
    Check {
        id,
        result: "pass",
        detail: detail.into(),
    }
}
fn warn(id: &'static str, detail: impl Into<String>) -> Check {
    Check {
        id,
        result: "warn",
        detail: detail.into(),
    }
}
fn fail(id: &'static str, detail: impl Into<String>) -> Check {
    Check {
        id,
        result: "fail",
        detail: detail.into(),
    }
}

/// TCP connect (through the agent's proxy when it takes one to `host`) and, when a TLS
/// configuration is at hand, a full handshake with certificate verification: "reachable" means
/// the agent could talk to it, not merely that a port is open.
async fn reachable(
    host: &str,
    port: u16,
    proxy: Option<&ProxyRoute>,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<&'static str, String> {
    let tcp = match tokio::time::timeout(Duration::from_secs(5), dial(host, port, proxy)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err("no answer within 5 s".into()),
    };
    let Some(tls) = tls else {
        return Ok("TCP");
    };
    let name = rustls_pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| format!("'{host}' is not a valid server name: {e}"))?;
    let connector = tokio_rustls::TlsConnector::from(tls.clone());
    match tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp)).await {
        Ok(Ok(_)) => Ok("TLS verified"),
        Ok(Err(e)) => Err(format!("TLS handshake failed: {e}")),
        Err(_) => Err("TLS handshake timed out".into()),
    }
}

/// A TCP connection to `host:port`: directly, or a tunnel of `proxy` (HTTP CONNECT, the same
/// handshake and the same error text as the agent's MQTT connections).
async fn dial(
    host: &str,
    port: u16,
    proxy: Option<&ProxyRoute>,
) -> Result<tokio::net::TcpStream, String> {
    let Some(proxy) = proxy else {
        return tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|e| e.to_string());
    };
    let mut tcp = tokio::net::TcpStream::connect((proxy.host.as_str(), proxy.port))
        .await
        .map_err(|e| format!("proxy {}: {e}", proxy.describe))?;
    let tunnel = match &proxy.credentials {
        Some((user, password)) => {
            async_http_proxy::http_connect_tokio_with_basic_auth(
                &mut tcp, host, port, user, password,
            )
            .await
        }
        None => async_http_proxy::http_connect_tokio(&mut tcp, host, port).await,
    };
    match tunnel {
        Ok(()) => Ok(tcp),
        Err(e) => {
            let status = match &e {
                async_http_proxy::HttpError::HttpCode200(code) => Some(*code),
                _ => None,
            };
            Err(hubagent::mqtt::proxy_refusal_text(
                &proxy.describe,
                status,
                &e,
            ))
        }
    }
}

pub async fn run(config_path: &Path) -> Report {
    let mut checks = Vec::new();
    let config = match Config::load(config_path, &|k| std::env::var(k).ok()) {
        Ok(c) => {
            checks.push(pass("config.valid", config_path.display().to_string()));
            c
        }
        Err(e) => {
            checks.push(fail("config.valid", e.to_string()));
            return Report { checks };
        }
    };
    checks.push(clock());
    let tls = credentials(&config, &mut checks);
    plugin_sandbox(&config, &mut checks);
    plugins_load(&config, &mut checks);
    let cache = state(&config, &mut checks);
    network(&config, cache.as_ref(), tls.as_ref(), &mut checks).await;
    checks.push(daemon(&config).await);
    Report { checks }
}

/// clock.sane: a clock before this build was made (a board without an RTC, at 1970) makes every
/// TLS certificate look not yet valid and every SAS token expired.
fn clock() -> Check {
    match hubagent::util::time::clock_problem(std::time::SystemTime::now()) {
        None => pass("clock.sane", hubagent::util::time::now_rfc3339()),
        Some(problem) => fail("clock.sane", problem),
    }
}

/// keys.load, keys.private, tls.trust: the device's credential, the files its secrets are read
/// from, and the TLS configuration built on it (returned for the network checks).
fn credentials(config: &Config, checks: &mut Vec<Check>) -> Option<Arc<rustls::ClientConfig>> {
    let credential = hubagent::provisioning::registration_id(config).and_then(|id| {
        hubagent::provisioning::load_credential(config, &id).map(|credential| (id, credential))
    });
    let (id, credential) = match credential {
        Ok(loaded) => loaded,
        Err(e) => {
            checks.push(fail("keys.load", e));
            return None;
        }
    };
    checks.push(pass(
        "keys.load",
        format!("{} for '{id}'", credential.describe()),
    ));
    if let (Some(validity), Some(lead)) = (
        credential.certificate_validity(),
        config.certificate_expiry_warning(),
    ) {
        checks.push(certificate_expiry(validity, lead));
    }
    if let Some(wanted) = &config.provisioning.issued_certificate {
        checks.push(issued_certificate(config, wanted.renew_at));
    }
    secret_files(config, checks);
    plugin_secret_files(config, checks);
    match hubagent::provisioning::client_tls(config, &credential) {
        Ok(tls) => {
            checks.push(pass(
                "tls.trust",
                match &config.hub.trust_bundle {
                    Some(b) => format!("system roots + {}", b.display()),
                    None => "system roots".into(),
                },
            ));
            Some(tls)
        }
        Err(e) => {
            checks.push(fail("tls.trust", e));
            None
        }
    }
}

/// A certificate that ends within this fails the check: too close to leave to the next visit.
const EXPIRY_FAIL: Duration = Duration::from_secs(7 * 24 * 3600);

/// identity.expiry: the identity certificate is valid now and not about to end (a warning within
/// the configured lead time, a failure within a week); "not yet valid" points at the clock.
fn certificate_expiry(validity: Validity, lead: Duration) -> Check {
    let now = i64::try_from(hubagent::util::time::unix_now()).unwrap_or(i64::MAX);
    let state = |expiry| format!("the certificate {}", validity.describe(expiry));
    let id = "identity.expiry";
    match (validity.at(now, lead), validity.at(now, EXPIRY_FAIL)) {
        (e @ Expiry::Expired, _) => fail(id, format!("{}; install a renewed one", state(e))),
        (e @ Expiry::NotYetValid, _) => fail(id, state(e)),
        (_, e @ Expiry::Expiring { .. }) => fail(id, format!("{}: renew it now", state(e))),
        (e @ Expiry::Expiring { .. }, _) => warn(id, format!("{}: plan its renewal", state(e))),
        (e @ Expiry::Valid { .. }, _) => pass(id, state(e)),
    }
}

/// identity.issued: with `[provisioning.issued_certificate]`, the newest generation DPS issued
/// (the one the hub gets): a warning before the first issuance or once its renewal is overdue, a
/// failure when it is unusable or has ended.
fn issued_certificate(config: &Config, renew_at: f64) -> Check {
    let id = "identity.issued";
    let store = hubagent::identity::issued::Store::new(&config.agent.state_dir);
    let newest =
        hubagent::identity::issued::KeyHome::of(config).and_then(|home| store.newest(&home));
    let generation = match newest {
        Ok(Some(generation)) => generation,
        Ok(None) => {
            return warn(
                id,
                "no issued certificate yet: the agent asks DPS for one at its next registration",
            );
        }
        Err(e) => return fail(id, e.to_string()),
    };
    let now = i64::try_from(hubagent::util::time::unix_now()).unwrap_or(i64::MAX);
    let validity = generation.validity;
    let state = |expiry| {
        format!(
            "generation {}: the certificate {}",
            generation.number,
            validity.describe(expiry)
        )
    };
    match validity.at(now, Duration::ZERO) {
        e @ (Expiry::Expired | Expiry::NotYetValid) => fail(
            id,
            format!(
                "{}; the agent registers with DPS for a new one when the hub refuses it",
                state(e)
            ),
        ),
        e if now >= generation.renew_time(renew_at) => warn(
            id,
            format!(
                "{}; its renewal (after {:.0} % of its lifetime) is overdue: see last_error in hubagent status",
                state(e),
                renew_at * 100.0
            ),
        ),
        e => pass(
            id,
            format!(
                "{}; renewed after {:.0} % of its lifetime",
                state(e),
                renew_at * 100.0
            ),
        ),
    }
}

/// keys.private: every secret the attestation reads from a file is readable by its owner only.
fn secret_files(config: &Config, checks: &mut Vec<Check>) {
    let secrets = match &config.provisioning.attestation {
        Some(Attestation::SymmetricKey {
            key,
            group_key,
            secondary_key,
        }) => vec![key, group_key, secondary_key],
        Some(Attestation::Tpm {
            owner_auth,
            endorsement_auth,
            ..
        }) => vec![owner_auth, endorsement_auth],
        _ => vec![],
    };
    // The proxy password is a secret like the keys.
    let secrets: Vec<&Option<Secret>> = secrets
        .into_iter()
        .chain([&config.hub.proxy_password])
        .collect();
    for secret in secrets.into_iter().flatten() {
        if let Secret::File { file } = secret {
            match hubagent::identity::keys::check_private(file) {
                Some(w) => checks.push(warn("keys.private", w)),
                None => checks.push(pass("keys.private", file.display().to_string())),
            }
        }
    }
}

/// plugins.secrets: every plugin secret file (`{ file = … }` in `[plugin.settings]`) can be read
/// and is readable by its owner only. Names the plugin, key and file; never the content.
fn plugin_secret_files(config: &Config, checks: &mut Vec<Check>) {
    for spec in &config.plugins {
        for (key, file) in hubagent::config::plugin::secret_references(&spec.settings) {
            let at = format!("plugin {} {key}: {file}", spec.name);
            let check = match std::fs::File::open(&file) {
                Err(e) => fail("plugins.secrets", format!("{at} cannot be read: {e}")),
                Ok(_) => match hubagent::identity::keys::check_private(Path::new(&file)) {
                    Some(w) => warn(
                        "plugins.secrets",
                        format!("plugin {} {key}: {w}", spec.name),
                    ),
                    None => pass("plugins.secrets", at),
                },
            };
            checks.push(check);
        }
    }
}

/// plugins.load: every plugin could start as configured (its files pass the rules, a library
/// loads in a throwaway process and exports a supported ABI, an exec program is executable).
fn plugins_load(config: &Config, checks: &mut Vec<Check>) {
    use hubagent::plugins::preflight::Found;
    let agent = std::env::current_exe().unwrap_or_else(|_| "hubagent".into());
    for spec in &config.plugins {
        let allow_unsafe = config.agent.allow_unsafe_plugin_paths;
        checks.push(
            match hubagent::plugins::preflight::check(spec, allow_unsafe, &agent) {
                Ok(Found::Verified(what)) => {
                    pass("plugins.load", format!("plugin {}: {what}", spec.name))
                }
                Ok(Found::Untried(why)) => warn(
                    "plugins.load",
                    format!("plugin {}: not tried: {why}", spec.name),
                ),
                Err(problem) => fail("plugins.load", format!("plugin {}: {problem}", spec.name)),
            },
        );
    }
}

/// plugins.sandbox: whether this kernel can confine the plugins that run in processes of their
/// own (a failure when `plugin_sandbox = "required"` would keep them from starting), and which
/// plugins run inside the agent where no sandbox reaches.
fn plugin_sandbox(config: &Config, checks: &mut Vec<Check>) {
    use hubagent::config::SandboxMode;
    let id = "plugins.sandbox";
    let confined = config.plugins.iter().filter(|p| p.confinable()).count();
    let support = hubagent::plugins::sandbox::Support::of_this_kernel();
    let missing = support.missing();
    let check = match (config.agent.plugin_sandbox, confined) {
        (_, 0) => pass(id, "no plugin runs in a process of its own"),
        (SandboxMode::Off, n) => warn(
            id,
            format!(
                "plugin_sandbox = \"off\": {n} plugin(s) run with the agent's access to its keys and state"
            ),
        ),
        (mode, n) if !missing.is_empty() => {
            let detail = format!(
                "this kernel ({}) lacks {}",
                support.describe(),
                missing.join("; ")
            );
            match (mode, support.usable()) {
                (SandboxMode::Required, false) => fail(
                    id,
                    format!(
                        "{detail}: with plugin_sandbox = \"required\" the {n} plugin(s) will not start"
                    ),
                ),
                _ => warn(
                    id,
                    format!("{detail}: {n} plugin(s) confined as far as it allows"),
                ),
            }
        }
        (_, n) => pass(
            id,
            format!("{}: {n} plugin(s) confined", support.describe()),
        ),
    };
    checks.push(check);
    for spec in &config.plugins {
        if matches!(spec.kind, hubagent::config::plugin::Kind::Library { .. }) && !spec.confinable()
        {
            checks.push(warn(
                id,
                format!(
                    "plugin {} has isolation = \"in-process\": it runs inside the agent, with its access, and no sandbox applies",
                    spec.name
                ),
            ));
        }
    }
}

/// state.dir, provisioning.cache: the state directory and the cached assignment (returned for
/// the hub's network check).
fn state(config: &Config, checks: &mut Vec<Check>) -> Option<ProvisioningCache> {
    let state = match StateDir::open(&config.agent.state_dir) {
        Ok((state, warning)) => {
            match warning {
                Some(w) => checks.push(warn("state.dir", w)),
                None => checks.push(pass("state.dir", state.path().display().to_string())),
            }
            state
        }
        Err(e) => {
            checks.push(fail("state.dir", e.to_string()));
            return None;
        }
    };
    let (check, cache) = match state.load_provisioning() {
        Ok(Some(c)) if c.fingerprint == config.provisioning_fingerprint() => (
            pass(
                "provisioning.cache",
                format!("{} as {} since {}", c.hub, c.device_id, c.provisioned_at),
            ),
            Some(c),
        ),
        Ok(Some(c)) => (
            warn(
                "provisioning.cache",
                "settings changed since the last registration: the agent will reprovision",
            ),
            Some(c),
        ),
        Ok(None) => (
            warn(
                "provisioning.cache",
                "no cached assignment yet: the agent will register with DPS",
            ),
            None,
        ),
        Err(e) => (warn("provisioning.cache", e.to_string()), None),
    };
    checks.push(check);
    cache
}

/// network.dps, network.hub: DPS (when the agent registers there) and the cached hub answer.
async fn network(
    config: &Config,
    cache: Option<&ProvisioningCache>,
    tls: Option<&Arc<rustls::ClientConfig>>,
    checks: &mut Vec<Check>,
) {
    // The routes the agent takes, in its order.
    let routes = |mqtt_port: u16| {
        config
            .hub
            .routes(mqtt_port)
            .into_iter()
            .map(|(port, websocket)| (port, hubagent::mqtt::route_name(websocket)))
            .collect()
    };
    if let Some(dps) = config.dps_endpoint() {
        let dps_routes = match config.provisioning.dps_over_https() {
            true => vec![(dps.port, "HTTPS")],
            false => routes(dps.port),
        };
        checks.push(route_check("network.dps", config, &dps.host, dps_routes, tls).await);
    }
    if let Some(c) = cache {
        let hub_routes = routes(config.hub.port);
        checks.push(route_check("network.hub", config, &c.hub, hub_routes, tls).await);
    }
}

/// The first of `routes` that reaches `host` (through the proxy the agent would take) passes,
/// saying which and what failed before it; none reaching it fails with every route's reason.
async fn route_check(
    id: &'static str,
    config: &Config,
    host: &str,
    routes: Vec<(u16, &'static str)>,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Check {
    let proxy = hubagent::provisioning::proxy_route(config, host);
    let through = proxy
        .as_ref()
        .map(|p| format!(" through proxy {}", p.describe))
        .unwrap_or_default();
    let mut failed = Vec::new();
    for (port, route) in routes {
        match reachable(host, port, proxy.as_ref(), tls).await {
            Ok(how) => {
                let mut detail = format!("{host}:{port}, {route}{through} ({how})");
                if !failed.is_empty() {
                    detail.push_str(&format!("; before it: {}", failed.join("; ")));
                }
                return pass(id, detail);
            }
            Err(e) => failed.push(format!("{host}:{port}, {route}: {e}")),
        }
    }
    fail(id, failed.join("; "))
}

/// daemon.running: a running agent answers on its control socket.
async fn daemon(config: &Config) -> Check {
    let socket = config.agent.control_socket.clone();
    let answer = tokio::task::spawn_blocking(move || {
        hubagent::system::control::request(&socket, &hubagent::system::control::Request::Status)
    })
    .await;
    match answer {
        Ok(Ok(status)) => pass(
            "daemon.running",
            format!(
                "pid {}, {}",
                status["pid"],
                status["connection"].as_str().unwrap_or("?")
            ),
        ),
        Ok(Err(e)) => warn("daemon.running", e.to_string()),
        Err(e) => warn("daemon.running", e.to_string()),
    }
}
