//! The rumqttc plumbing DPS and the hub share: building a client for one connection, waiting for
//! CONNACK (telling "refused" from "unreachable"), waiting for SUBACK, and saying goodbye.
//!
//! Both users make a fresh client and event loop per connection, so rumqttc never retransmits on
//! its own and the packet ids of a connection belong to that connection only.

use std::sync::Arc;
use std::time::Duration;

use crate::state::{RouteMemory, StateDir};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Packet,
    SubscribeReasonCode, TlsConfiguration, Transport,
};

/// One MQTT/TLS connection's settings, in plain values.
#[derive(Clone)]
pub struct ConnectOptions {
    pub client_id: String,
    pub host: String,
    pub port: u16,
    /// MQTT straight over TLS, or inside a WebSocket (`wss://host:port/$iothub/websocket`).
    pub websocket: bool,
    /// An HTTP proxy to tunnel through (CONNECT).
    pub proxy: Option<ProxyRoute>,
    /// `[hub] transport = "auto"`: `port` and `websocket` come from here, and [`connect`] tries
    /// the other route when this one is unreachable.
    pub auto: Option<Arc<AutoRoute>>,
    pub username: String,
    /// Empty for X.509 (the certificate in the TLS handshake is the credential).
    pub password: String,
    pub tls: Arc<rustls::ClientConfig>,
    pub keep_alive: Duration,
    /// DPS keeps no sessions (true); the hub keeps subscriptions and queued C2D (false).
    pub clean_session: bool,
    /// (incoming, outgoing) packet size limits. rumqttc's defaults are 10 KiB: always set them.
    pub max_packet_size: (usize, usize),
    /// Outgoing QoS 1 window (at least 1).
    pub inflight: u16,
    /// Capacity of the request channel between `AsyncClient` and the event loop.
    pub request_capacity: usize,
    /// Incoming QoS 1 publishes are acknowledged by the caller (`AsyncClient::try_ack`) once
    /// handled, so a message that arrives as the connection closes is redelivered, not lost.
    pub manual_acks: bool,
}

/// `transport = "auto"`: MQTT on 8883 first; when that cannot be reached, MQTT over WebSockets on
/// 443; whichever worked last is tried first from then on (DPS and the hub share one memory: it
/// is the network that decides). The memory is kept in the state directory (`route.json`), so a
/// restart starts with the route that worked, and WebSockets is kept for [`DIRECT_AGAIN_AFTER`]
/// only: then 8883 is tried first again, so a site whose firewall opened gets the direct route
/// back (at the next connection: with SAS, the renewal's at the latest).
#[derive(Debug)]
pub struct AutoRoute {
    pub tls_port: u16,
    pub websocket_port: u16,
    memory: Arc<std::sync::Mutex<Option<RouteMemory>>>,
    /// Where the memory is saved (None: in memory only, e.g. in unit tests).
    store: Option<StateDir>,
}

/// How long WebSockets stays the first route after it was learned. A day: a site whose firewall
/// opens 8883 gets the direct (lighter) route back within a day, and a site where it stays closed
/// pays one failed attempt on 8883 a day.
pub const DIRECT_AGAIN_AFTER: Duration = Duration::from_secs(24 * 3600);

impl AutoRoute {
    /// The route memory for these ports: what `store` remembers (when it was learned with the
    /// same ports), else nothing (8883 first).
    pub fn new(tls_port: u16, websocket_port: u16, store: Option<StateDir>) -> AutoRoute {
        let remembered = match store.as_ref().map(StateDir::load_route) {
            Some(Ok(Some(m))) if (m.tls_port, m.websocket_port) == (tls_port, websocket_port) => {
                tracing::info!(
                    "{} worked at {}: trying it first",
                    route_name(m.websocket),
                    crate::util::time::unix_rfc3339(m.learned_at)
                );
                Some(m)
            }
            Some(Ok(Some(_))) => {
                tracing::info!("the remembered route was for other ports: trying 8883 first");
                None
            }
            Some(Err(e)) => {
                tracing::warn!("{e}");
                None
            }
            Some(Ok(None)) | None => None,
        };
        AutoRoute {
            tls_port,
            websocket_port,
            memory: Arc::new(std::sync::Mutex::new(remembered)),
            store,
        }
    }

    /// The same memory for a server with other ports (DPS's MQTT port may not be the hub's).
    pub fn for_ports(&self, tls_port: u16, websocket_port: u16) -> AutoRoute {
        AutoRoute {
            tls_port,
            websocket_port,
            memory: self.memory.clone(),
            store: self.store.clone(),
        }
    }

    /// What is remembered: the route that worked and since when (`None` before anything did).
    pub fn remembered(&self) -> Option<RouteMemory> {
        *self.memory.lock().unwrap()
    }

    /// Whether WebSockets is the route that worked last (how status names the session's route).
    pub fn websocket(&self) -> bool {
        self.remembered().is_some_and(|m| m.websocket)
    }

    /// Whether WebSockets is the route to try first: the one that worked last, and learned less
    /// than [`DIRECT_AGAIN_AFTER`] ago.
    fn first_websocket(&self) -> bool {
        match self.remembered() {
            Some(m) if m.websocket => {
                let fresh = crate::util::time::unix_now().saturating_sub(m.learned_at)
                    < DIRECT_AGAIN_AFTER.as_secs();
                if !fresh {
                    tracing::info!(
                        "{} was learned at {}, over a day ago: trying MQTT over TLS on port {} first again",
                        route_name(true),
                        crate::util::time::unix_rfc3339(m.learned_at),
                        self.tls_port
                    );
                }
                fresh
            }
            _ => false,
        }
    }

    /// `websocket` worked: remembered and saved, unless MQTT over TLS is already what is
    /// remembered (WebSockets is learned again each time, its day starting over).
    fn remember(&self, websocket: bool) {
        let mut memory = self.memory.lock().unwrap();
        if !websocket && memory.is_some_and(|m| !m.websocket) {
            return;
        }
        let learned = RouteMemory {
            websocket,
            learned_at: crate::util::time::unix_now(),
            tls_port: self.tls_port,
            websocket_port: self.websocket_port,
        };
        *memory = Some(learned);
        if let Some(Err(e)) = self.store.as_ref().map(|s| s.save_route(&learned)) {
            tracing::warn!("cannot keep the route that worked: {e}");
        }
    }

    fn port(&self, websocket: bool) -> u16 {
        if websocket {
            self.websocket_port
        } else {
            self.tls_port
        }
    }

    /// The port the next connection dials first (what the hub session's reachability probe
    /// tries, `hub::probe`).
    pub fn first_port(&self) -> u16 {
        self.port(self.first_websocket())
    }
}

/// How logs and status name a route.
pub fn route_name(websocket: bool) -> &'static str {
    if websocket {
        "MQTT over WebSockets"
    } else {
        "MQTT over TLS"
    }
}

/// CONNECT and CONNACK on the route `options` names; with `auto`, on the remembered route and,
/// when it is unreachable (not refused: a refusal is an answer), on the other one.
pub async fn connect(options: &ConnectOptions) -> Result<(AsyncClient, EventLoop), ConnectError> {
    let Some(auto) = &options.auto else {
        return connect_once(options).await;
    };
    let first = auto.first_websocket();
    let attempt = |websocket: bool| ConnectOptions {
        port: auto.port(websocket),
        websocket,
        ..options.clone()
    };
    match connect_once(&attempt(first)).await {
        Ok(connected) => {
            // WebSockets first means it is remembered and fresh: nothing new to keep.
            if !first {
                auto.remember(false);
            }
            Ok(connected)
        }
        Err(ConnectError::Network(reason)) => {
            tracing::warn!(
                host = %options.host,
                "{} on port {} failed ({reason}); trying {} on port {}",
                route_name(first),
                auto.port(first),
                route_name(!first),
                auto.port(!first)
            );
            let connected = connect_once(&attempt(!first)).await?;
            auto.remember(!first);
            tracing::info!(
                host = %options.host,
                "connected with {}; tried first from now on",
                route_name(!first)
            );
            Ok(connected)
        }
        other => other,
    }
}

async fn connect_once(options: &ConnectOptions) -> Result<(AsyncClient, EventLoop), ConnectError> {
    let (client, mut eventloop) = client(options);
    wait_connack(&mut eventloop, options.proxy.as_ref()).await?;
    Ok((client, eventloop))
}

/// An HTTP proxy for one connection, with the password already read (never logged).
#[derive(Clone)]
pub struct ProxyRoute {
    pub host: String,
    pub port: u16,
    pub credentials: Option<(String, zeroize::Zeroizing<String>)>,
    /// How errors name it (`http://user@host:port (from …)`).
    pub describe: String,
}

impl std::fmt::Debug for ProxyRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe)
    }
}

/// Makes the client and event loop for one connection; nothing is sent before the first poll.
pub fn client(options: &ConnectOptions) -> (AsyncClient, EventLoop) {
    // Over WebSockets rumqttc takes host and port from the URL; DPS and IoT Hub serve MQTT at
    // this path with the subprotocol `mqtt` (which rumqttc asks for).
    let broker = match options.websocket {
        false => options.host.clone(),
        true => format!("wss://{}:{}/$iothub/websocket", options.host, options.port),
    };
    let mut mqtt = MqttOptions::new(&options.client_id, broker, options.port);
    mqtt.set_keep_alive(options.keep_alive);
    mqtt.set_clean_session(options.clean_session);
    mqtt.set_inflight(options.inflight.max(1));
    mqtt.set_max_packet_size(options.max_packet_size.0, options.max_packet_size.1);
    let tls = TlsConfiguration::Rustls(options.tls.clone());
    mqtt.set_transport(match options.websocket {
        false => Transport::tls_with_config(tls),
        true => Transport::wss_with_config(tls),
    });
    // The fuzz build (cargo-fuzz compiles with `--cfg fuzzing`) runs the hub session against an
    // in-process server on plain TCP (fuzz/fuzz_targets/hub_session.rs): a TLS handshake per
    // input would cost far more than the input. No build of the agent has this cfg.
    #[cfg(fuzzing)]
    mqtt.set_transport(Transport::Tcp);
    mqtt.set_credentials(&options.username, &options.password);
    mqtt.set_manual_acks(options.manual_acks);
    if let Some(proxy) = &options.proxy {
        mqtt.set_proxy(rumqttc::Proxy {
            ty: rumqttc::ProxyType::Http,
            auth: match &proxy.credentials {
                Some((username, password)) => rumqttc::ProxyAuth::Basic {
                    username: username.clone(),
                    password: password.to_string(),
                },
                None => rumqttc::ProxyAuth::None,
            },
            addr: proxy.host.clone(),
            port: proxy.port,
        });
    }
    let (client, mut eventloop) = AsyncClient::new(mqtt, options.request_capacity.max(1));
    // A server that takes the TCP connection and then stalls (the TLS handshake, the CONNACK)
    // must not hold the connection attempt forever: rumqttc bounds TCP + TLS + CONNACK by this
    // timeout. 5 s is rumqttc's default, set here so that it is a decision, not an accident
    // (the hostile hub tests in tests/it/faults.rs fail without it).
    let mut network = eventloop.network_options();
    network.set_connection_timeout(CONNECT_TIMEOUT_SECS);
    eventloop.set_network_options(network);
    (client, eventloop)
}

/// Seconds a connection attempt may take from TCP connect to CONNACK.
const CONNECT_TIMEOUT_SECS: u64 = 5;

/// Why a connection attempt failed.
#[derive(Debug)]
pub enum ConnectError {
    /// The server answered CONNACK with this refusal.
    Refused(ConnectReturnCode),
    /// TCP, TLS or protocol failure before a CONNACK (the message never holds a secret).
    Network(String),
}

impl ConnectError {
    /// CONNACK 4/5: the credentials (or the identity) were refused, as opposed to a busy server.
    pub fn is_auth_refusal(&self) -> bool {
        matches!(
            self,
            ConnectError::Refused(
                ConnectReturnCode::NotAuthorized | ConnectReturnCode::BadUserNamePassword
            )
        )
    }

    /// CONNACK 3, "server unavailable": the hub took the connection (TCP, TLS, CONNECT) and
    /// said it cannot serve it now (an outage of the service, or throttling).
    pub fn is_server_unavailable(&self) -> bool {
        matches!(
            self,
            ConnectError::Refused(ConnectReturnCode::ServiceUnavailable)
        )
    }
}

/// A CONNACK return code as MQTT 3.1.1 (§3.2.2.3) names it.
fn connack_text(code: ConnectReturnCode) -> &'static str {
    match code {
        ConnectReturnCode::Success => "accepted",
        ConnectReturnCode::RefusedProtocolVersion => "unacceptable protocol version",
        ConnectReturnCode::BadClientId => "identifier rejected",
        ConnectReturnCode::ServiceUnavailable => "server unavailable",
        ConnectReturnCode::BadUserNamePassword => "bad user name or password",
        ConnectReturnCode::NotAuthorized => "not authorized",
    }
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Refused(code) => {
                write!(f, "connection refused (CONNACK: {})", connack_text(*code))
            }
            ConnectError::Network(message) => f.write_str(message),
        }
    }
}

impl From<ConnectionError> for ConnectError {
    fn from(e: ConnectionError) -> Self {
        match e {
            ConnectionError::ConnectionRefused(code) => ConnectError::Refused(code),
            other => ConnectError::Network(other.to_string()),
        }
    }
}

/// Polls until CONNACK. Nothing else can arrive before it. A proxy that refuses the tunnel is
/// named in the error, with what its HTTP status means (`describe` is the proxy's description).
pub async fn wait_connack(
    eventloop: &mut EventLoop,
    proxy: Option<&ProxyRoute>,
) -> Result<(), ConnectError> {
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
            Ok(_) => continue,
            Err(ConnectionError::Proxy(e)) => {
                let describe = proxy.map_or("the proxy", |p| p.describe.as_str());
                return Err(ConnectError::Network(proxy_refusal(describe, &e)));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The text of a failed proxy tunnel of rumqttc's (async-http-proxy's error).
fn proxy_refusal(describe: &str, error: &(dyn std::error::Error + 'static)) -> String {
    let status = error
        .source()
        .and_then(|s| s.downcast_ref::<async_http_proxy::HttpError>())
        .and_then(|e| match e {
            async_http_proxy::HttpError::HttpCode200(code) => Some(*code),
            _ => None,
        });
    proxy_refusal_text(describe, status, error)
}

/// The text of a failed proxy tunnel, whichever client dialled it (MQTT here, DPS over HTTPS):
/// the proxy, and for an HTTP refusal (`status`) what it means and what to check.
pub fn proxy_refusal_text(
    describe: &str,
    status: Option<u16>,
    error: &dyn std::fmt::Display,
) -> String {
    match status {
        // 407 is the standard answer; some proxies (tinyproxy) send 401.
        Some(code @ (401 | 407)) => format!(
            "proxy {describe} refused the tunnel: HTTP {code} (proxy authentication required: check the proxy user and proxy_password)"
        ),
        Some(403) => format!(
            "proxy {describe} refused the tunnel: HTTP 403 (forbidden: the proxy does not allow this destination or port)"
        ),
        Some(code @ 502..=504) => {
            format!("proxy {describe} could not reach the destination: HTTP {code}")
        }
        Some(code) => format!("proxy {describe} refused the tunnel: HTTP {code}"),
        None => format!("proxy {describe}: {error}"),
    }
}

/// Polls until the next SUBACK and returns its codes. Only for connections on which nothing else
/// can arrive yet (DPS before its first request): other events are dropped.
pub async fn wait_suback(
    eventloop: &mut EventLoop,
) -> Result<Vec<SubscribeReasonCode>, ConnectionError> {
    loop {
        if let Event::Incoming(Packet::SubAck(ack)) = eventloop.poll().await? {
            return Ok(ack.return_codes);
        }
    }
}

/// Sends DISCONNECT and lets it go out (servers log an abrupt close as an error). Bounded: a dead
/// connection does not hold the caller up.
pub async fn disconnect(client: &AsyncClient, eventloop: &mut EventLoop) {
    if client.try_disconnect().is_err() {
        return;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while eventloop.poll().await.is_ok() {}
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_refusals_are_told_from_other_failures() {
        assert!(ConnectError::Refused(ConnectReturnCode::NotAuthorized).is_auth_refusal());
        assert!(ConnectError::Refused(ConnectReturnCode::BadUserNamePassword).is_auth_refusal());
        assert!(!ConnectError::Refused(ConnectReturnCode::ServiceUnavailable).is_auth_refusal());
        assert!(!ConnectError::Network("connection reset".into()).is_auth_refusal());
        assert!(
            ConnectError::Refused(ConnectReturnCode::ServiceUnavailable).is_server_unavailable()
        );
        assert!(!ConnectError::Refused(ConnectReturnCode::NotAuthorized).is_server_unavailable());
        assert!(!ConnectError::Network("connection refused".into()).is_server_unavailable());
    }
}
