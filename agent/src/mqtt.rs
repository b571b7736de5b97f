//! The rumqttc plumbing DPS and the hub share: building a client for one connection, waiting for
//! CONNACK (telling "refused" from "unreachable"), waiting for SUBACK, and saying goodbye.
//!
//! Both users make a fresh client and event loop per connection, so rumqttc never retransmits on
//! its own and the packet ids of a connection belong to that connection only.

use std::sync::Arc;
use std::time::Duration;

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
/// is the network that decides).
#[derive(Debug)]
pub struct AutoRoute {
    pub tls_port: u16,
    pub websocket_port: u16,
    websocket: Arc<std::sync::atomic::AtomicBool>,
}

impl AutoRoute {
    pub fn new(tls_port: u16, websocket_port: u16) -> AutoRoute {
        AutoRoute {
            tls_port,
            websocket_port,
            websocket: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        }
    }

    /// The same memory for a server with other ports (DPS's MQTT port may not be the hub's).
    pub fn for_ports(&self, tls_port: u16, websocket_port: u16) -> AutoRoute {
        AutoRoute {
            tls_port,
            websocket_port,
            websocket: self.websocket.clone(),
        }
    }

    /// Whether WebSockets is the route to try first (the one that worked last).
    pub fn websocket(&self) -> bool {
        self.websocket.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn remember(&self, websocket: bool) {
        self.websocket
            .store(websocket, std::sync::atomic::Ordering::Relaxed);
    }

    fn port(&self, websocket: bool) -> u16 {
        if websocket {
            self.websocket_port
        } else {
            self.tls_port
        }
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
    let first = auto.websocket();
    let attempt = |websocket: bool| ConnectOptions {
        port: auto.port(websocket),
        websocket,
        ..options.clone()
    };
    match connect_once(&attempt(first)).await {
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
    AsyncClient::new(mqtt, options.request_capacity.max(1))
}

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
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Refused(code) => write!(f, "connection refused (CONNACK {code:?})"),
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
    }
}
