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

pub mod auth;
pub mod dps;
pub mod http;
pub mod hub;
pub mod mqtt;
pub mod pki;
pub mod state;
pub mod twin;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

pub use state::Sim;

/// What `hubsim serve` (or an embedding test / `hubagent demo`) asks for.
#[derive(Debug, Clone)]
pub struct Options {
    pub state_dir: PathBuf,
    /// Addresses to listen on (default 127.0.0.1).
    pub bind: Vec<std::net::IpAddr>,
    /// 0 = pick a free port (tests); 8883 for Azure's Python SDK.
    pub mqtt_port: u16,
    pub https_port: u16,
    /// Linked hub host names (default `["localhost"]`).
    pub hubs: Vec<String>,
    pub id_scope: String,
    /// Extra names for the server certificate.
    pub extra_sans: Vec<String>,
    pub retry_after_secs: u64,
}

impl Options {
    /// Defaults for an embedded instance: loopback, free ports, one hub named `localhost`.
    pub fn ephemeral(state_dir: impl Into<PathBuf>) -> Self {
        Options {
            state_dir: state_dir.into(),
            bind: vec![std::net::Ipv4Addr::LOCALHOST.into()],
            mqtt_port: 0,
            https_port: 0,
            hubs: vec!["localhost".into()],
            id_scope: "0ne00000001".into(),
            extra_sans: vec![],
            retry_after_secs: 1,
        }
    }
}

/// A running simulator. Dropping it (or [`Running::shutdown`]) stops every listener.
pub struct Running {
    pub sim: Arc<Sim>,
    /// First bound MQTT and HTTPS addresses (real ports when 0 was asked).
    pub mqtt_addr: SocketAddr,
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

/// Creates/loads the state dir and PKI, writes `connection-strings.txt`, binds the listeners and
/// spawns them on the current tokio runtime.
/// OWNER: hubsim-mqtt helper.
pub async fn start(_options: Options) -> anyhow::Result<Running> {
    todo!("hubsim-mqtt helper")
}
