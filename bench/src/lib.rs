//! Shared pieces of the benchmark binaries: TLS trusting hubsim's CA, SAS tokens, MQTT options.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hubagent::identity::keys::{self, MemoryKey};
use rumqttc::{AsyncClient, EventLoop, MqttOptions, TlsConfiguration, Transport};

/// The rustls client configuration the agent itself uses (same protocol versions and provider),
/// trusting `ca_pem` (hubsim's `ca.pem`).
pub fn tls(ca_pem: &Path) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    Ok(hubagent::identity::tls::client_config(Some(ca_pem), None)?)
}

/// A device key derived from an enrollment group's key, as DPS derives it.
pub fn derive_device_key(group_key_b64: &str, registration_id: &str) -> anyhow::Result<String> {
    let group = MemoryKey::from_base64(group_key_b64, "the group key")?;
    Ok(keys::derive_device_key(&group, registration_id)?.to_string())
}

/// A SAS token for `resource`, valid for an hour, signed as the agent signs.
pub fn sas(key_b64: &str, resource: &str, key_name: Option<&str>) -> anyhow::Result<String> {
    let expiry = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() + 3600;
    let key = MemoryKey::from_base64(key_b64, "the device key")?;
    Ok(keys::sas_token(&key, resource, expiry, key_name)?)
}

/// One MQTT-over-TLS client (clean session, 256 KiB packets like the hub's limit) to `host`:
/// hubsim's DPS (`localhost`) or a hub, which is another host (docs/hubsim.md, "Topology").
pub fn client(
    tls: &Arc<rustls::ClientConfig>,
    host: &str,
    client_id: &str,
    port: u16,
    username: &str,
    password: &str,
    inflight: u16,
) -> (AsyncClient, EventLoop) {
    let route = Route::default();
    client_by(
        tls, host, client_id, port, username, password, inflight, &route,
    )
}

/// How a client reaches the server: MQTT straight over TLS, or inside a WebSocket (the path IoT
/// Hub serves it at), optionally through an HTTP proxy (CONNECT), as the agent can.
#[derive(Default)]
pub struct Route {
    pub websocket: bool,
    /// `host:port` of an HTTP proxy without authentication.
    pub proxy: Option<(String, u16)>,
}

/// [`client`] by `route`.
#[allow(clippy::too_many_arguments)]
pub fn client_by(
    tls: &Arc<rustls::ClientConfig>,
    host: &str,
    client_id: &str,
    port: u16,
    username: &str,
    password: &str,
    inflight: u16,
    route: &Route,
) -> (AsyncClient, EventLoop) {
    let broker = match route.websocket {
        false => host.to_string(),
        true => format!("wss://{host}:{port}/$iothub/websocket"),
    };
    let mut mqtt = MqttOptions::new(client_id, broker, port);
    mqtt.set_keep_alive(Duration::from_secs(60));
    mqtt.set_clean_session(true);
    mqtt.set_inflight(inflight.max(1));
    mqtt.set_max_packet_size(300 * 1024, 300 * 1024);
    let tls = TlsConfiguration::Rustls(tls.clone());
    mqtt.set_transport(match route.websocket {
        false => Transport::tls_with_config(tls),
        true => Transport::wss_with_config(tls),
    });
    if let Some((host, port)) = &route.proxy {
        mqtt.set_proxy(rumqttc::Proxy {
            ty: rumqttc::ProxyType::Http,
            auth: rumqttc::ProxyAuth::None,
            addr: host.clone(),
            port: *port,
        });
    }
    mqtt.set_credentials(username, password);
    AsyncClient::new(mqtt, usize::from(inflight.max(1)) * 2)
}

/// The body every publisher of the benchmark sends, as the `bench` plugin builds it.
pub use hubagent_bench_plugin::body;

/// Seconds since the Unix epoch as a float, for timestamps the orchestrator compares.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}
