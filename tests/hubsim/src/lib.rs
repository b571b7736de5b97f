//! hubsim: a faithful local Azure IoT Hub Device Provisioning Service + IoT Hub.
//!
//! One process (or one in-process instance, for tests and `hubagent demo`) that serves devices over
//! MQTT 3.1.1/TLS (DPS and hub on one port, told apart by the CONNECT username), DPS over HTTPS, and
//! a management API shaped like Azure's service REST APIs. See `docs/hubsim.md`.
//!
//! Modules, one concern each:
//! - [`state`]: the data model, persistence, live connections, records, fault switches.
//! - [`pki`]: the development CA, server certificate and `hubsim certs`.
//! - [`auth`]: SAS token parsing/verification, derived keys, client certificate checks.
//! - [`dps`]: provisioning logic (enrollment match, allocation, operations), transport-independent.
//! - [`twin`]: twins, direct methods and C2D from the service side.
//! - [`hub`]: IoT Hub device-side topic handling (telemetry, twin, methods, C2D).
//! - [`mqtt`]: the MQTT/TLS listener that carries DPS and hub traffic.
//! - [`http`]: the HTTPS listener: DPS device API, management API, sim-only endpoints.
//! - [`tpm`]: DPS TPM attestation's activation blobs (MakeCredential + duplication wrap).

pub mod auth;
pub mod batch;
pub mod dps;
pub mod http;
pub mod hub;
pub mod journal;
pub mod metering;
pub mod mqtt;
pub mod pki;
pub mod state;
pub mod tpm;
pub mod twin;
pub mod websocket;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

pub use state::Sim;

/// The DPS service endpoint's host name: the `HostName` of the provisioning service connection
/// string, and the host the management API expects in the `sr` of DPS-policy tokens.
pub const DPS_SERVICE_HOST: &str = "localhost";

/// The host name of the hub an ephemeral hubsim links (tests, `hubagent demo`): another loopback
/// address than DPS's `localhost`, so a device that dials DPS's endpoint for the hub, or names the
/// wrong host, is refused as Azure would refuse it. Linux routes all of 127/8 to loopback, so
/// binding it needs no privileges and no /etc/hosts entry.
pub const DEFAULT_HUB: &str = "127.0.0.2";

/// What `hubsim serve` (or an embedding test / `hubagent demo`) asks for.
#[derive(Debug, Clone)]
pub struct Options {
    pub state_dir: PathBuf,
    /// Addresses DPS and the HTTPS APIs listen on (default 127.0.0.1, what `localhost` reaches).
    pub bind: Vec<std::net::IpAddr>,
    /// 0 = pick a free port (tests); 8883 for Azure's Python SDK.
    pub mqtt_port: u16,
    pub https_port: u16,
    /// Linked hub host names (default `[DEFAULT_HUB]`). Each hub is its own host: it listens on
    /// its own address (see [`Options::hub_addresses`]) and answers only for itself there.
    pub hubs: Vec<String>,
    /// Where hubs named by host names listen, e.g. `("sim-hub.example.net", 127.0.0.3)`. A hub
    /// named by an IP address listens on that address; any other name must resolve.
    pub hub_addresses: Vec<(String, std::net::IpAddr)>,
    /// The server's certificate and TLS versions (default: as Azure serves them).
    pub tls: pki::TlsProfile,
    /// The DPS instance's ID scope (kept in the state dir after the first start).
    pub id_scope: String,
    /// More ID scopes answered with the same enrollments (not kept: given on each start).
    pub extra_id_scopes: Vec<String>,
    /// Extra names for the server certificate.
    pub extra_sans: Vec<String>,
    pub retry_after_secs: u64,
    /// Recorded telemetry kept per device (0 = all); see `Records::telemetry_keep`.
    pub telemetry_keep: usize,
}

impl Options {
    /// Defaults for an embedded instance: loopback, free ports, DPS on `localhost` and one hub
    /// named [`DEFAULT_HUB`], TLS as Azure serves it.
    pub fn ephemeral(state_dir: impl Into<PathBuf>) -> Self {
        Options {
            state_dir: state_dir.into(),
            bind: vec![std::net::Ipv4Addr::LOCALHOST.into()],
            mqtt_port: 0,
            https_port: 0,
            hubs: vec![DEFAULT_HUB.into()],
            hub_addresses: vec![],
            tls: pki::TlsProfile::default(),
            id_scope: "0ne00000001".into(),
            extra_id_scopes: vec![],
            extra_sans: vec![],
            retry_after_secs: 1,
            telemetry_keep: 0,
        }
    }
}

/// A running simulator. Dropping it (or [`Running::shutdown`]) stops every listener.
pub struct Running {
    pub sim: Arc<Sim>,
    /// First bound MQTT (DPS) and HTTPS addresses (real ports when 0 was asked).
    pub mqtt_addr: SocketAddr,
    /// Each linked hub's name and the MQTT address it listens on (same port as DPS).
    pub hub_addrs: Vec<(String, SocketAddr)>,
    pub https_addr: SocketAddr,
    pub ca_pem: String,
    pub ca_pem_path: PathBuf,
    /// `HostName=…;SharedAccessKeyName=iothubowner;SharedAccessKey=…`
    pub hub_connection_string: String,
    /// `HostName=…;SharedAccessKeyName=provisioningserviceowner;SharedAccessKey=…`
    pub dps_connection_string: String,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    pub fn shutdown(mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Creates/loads the state dir and PKI, writes `connection-strings.txt` and `endpoints.json`,
/// binds the listeners and spawns them on the current tokio runtime.
pub async fn start(options: Options) -> anyhow::Result<Running> {
    use anyhow::Context;
    std::fs::create_dir_all(&options.state_dir)
        .with_context(|| format!("creating state dir {}", options.state_dir.display()))?;
    let bind = if options.bind.is_empty() {
        vec![std::net::Ipv4Addr::LOCALHOST.into()]
    } else {
        options.bind.clone()
    };
    let topology = Arc::new(mqtt::Topology::new(
        &bind,
        &options.hubs,
        &options.hub_addresses,
    )?);
    let mut names = options.hubs.clone();
    names.extend(topology.hub_ips().map(|ip| ip.to_string()));
    names.extend(options.extra_sans.iter().cloned());
    let pki = pki::load_or_create_for(&options.state_dir, &names, options.tls)?;
    let tls = pki::server_tls_config_for(&pki, options.tls)?;

    let mqtt = bind_everywhere(&topology, options.mqtt_port, "MQTT").await?;
    // The management API answers on DPS's addresses and on every hub's, as each Azure service
    // serves its REST API on its own host (a service SDK's `HostName` is the hub's name).
    let https = bind_everywhere(&topology, options.https_port, "HTTPS").await?;
    let mqtt_addr = mqtt[0].local_addr()?;
    let hub_addrs = options
        .hubs
        .iter()
        .filter_map(|h| {
            Some((
                h.clone(),
                SocketAddr::new(topology.hub_ip(h)?, mqtt_addr.port()),
            ))
        })
        .collect();
    let https_addr = https[0].local_addr()?;

    let config = state::SimConfig {
        state_dir: options.state_dir.clone(),
        hubs: options.hubs.clone(),
        retry_after_secs: options.retry_after_secs,
        mqtt_port: mqtt_addr.port(),
        https_port: https_addr.port(),
        extra_id_scopes: options.extra_id_scopes.clone(),
    };
    let sim = Arc::new(Sim::open(config, &options.id_scope)?);
    sim.records.lock().unwrap().telemetry_keep = options.telemetry_keep;
    let (hub_key, dps_key, id_scope) = sim.read(|s| {
        (
            s.hub_owner_key.clone(),
            s.dps_owner_key.clone(),
            s.id_scope.clone(),
        )
    });
    let hub_connection_string = format!(
        "HostName={};SharedAccessKeyName=iothubowner;SharedAccessKey={hub_key}",
        options
            .hubs
            .first()
            .map(String::as_str)
            .unwrap_or(DEFAULT_HUB)
    );
    let dps_connection_string = format!(
        "HostName={DPS_SERVICE_HOST};SharedAccessKeyName=provisioningserviceowner;SharedAccessKey={dps_key}"
    );
    state::write_atomic(
        &options.state_dir.join("connection-strings.txt"),
        format!("{hub_connection_string}\n{dps_connection_string}\n").as_bytes(),
    )?;
    let endpoints = serde_json::json!({
        "mqtt": mqtt_addr.to_string(),
        "https": https_addr.to_string(),
        "idScope": id_scope,
        "extraIdScopes": options.extra_id_scopes,
        "hubs": options.hubs,
        "hubAddresses": topology.describe_hubs(mqtt_addr.port()),
        "tls": format!("{:?}", options.tls).to_lowercase(),
        "ca": pki.ca_pem_path,
    });
    state::write_atomic(
        &options.state_dir.join("endpoints.json"),
        serde_json::to_vec_pretty(&endpoints)?.as_slice(),
    )?;

    let mut tasks = Vec::new();
    for listener in mqtt {
        let (sim, tls, topology) = (sim.clone(), tls.clone(), topology.clone());
        tasks.push(tokio::spawn(async move {
            if let Err(e) = mqtt::serve(sim, listener, tls, topology).await {
                tracing::error!("MQTT listener stopped: {e:#}");
            }
        }));
    }
    for listener in https {
        let (sim, tls, topology) = (sim.clone(), tls.clone(), topology.clone());
        tasks.push(tokio::spawn(async move {
            if let Err(e) = http::serve(sim, listener, tls, topology).await {
                tracing::error!("HTTPS listener stopped: {e:#}");
            }
        }));
    }
    Ok(Running {
        sim,
        mqtt_addr,
        hub_addrs,
        https_addr,
        ca_pem: pki.ca_pem.clone(),
        ca_pem_path: pki.ca_pem_path.clone(),
        hub_connection_string,
        dps_connection_string,
        tasks,
    })
}

/// Binds `port` on DPS's addresses and every hub's: one port number for all of them, as on Azure
/// (8883 and 443 everywhere). With port 0, a number free on the first address may be taken on
/// another: then it tries another number.
async fn bind_everywhere(
    topology: &mqtt::Topology,
    port: u16,
    what: &str,
) -> anyhow::Result<Vec<tokio::net::TcpListener>> {
    let addrs = topology.listen_ips();
    let mut attempts = 0;
    loop {
        match bind_all(&addrs, port, what).await {
            Err(e) if port == 0 && attempts < 20 => {
                attempts += 1;
                tracing::debug!("retrying the {what} bind with another port: {e:#}");
            }
            other => return other,
        }
    }
}

/// Binds `port` on every address; with port 0 the first address picks a free port and the
/// others reuse it, so one port number serves all of them.
async fn bind_all(
    addrs: &[std::net::IpAddr],
    port: u16,
    what: &str,
) -> anyhow::Result<Vec<tokio::net::TcpListener>> {
    let mut listeners = Vec::new();
    let mut port = port;
    for addr in addrs {
        let socket = SocketAddr::new(*addr, port);
        let listener = tokio::net::TcpListener::bind(socket)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen for {what} on {socket}: {e}"))?;
        port = listener.local_addr()?.port();
        listeners.push(listener);
    }
    Ok(listeners)
}
