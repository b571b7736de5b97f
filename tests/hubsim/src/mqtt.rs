//! The MQTT 3.1.1-over-TLS listeners that carry DPS and IoT Hub traffic. As on Azure, DPS and
//! each hub are different hosts ([`Topology`]): DPS answers on its own addresses and each hub on
//! its own, all on one port (Azure's Python SDK cannot change it), and a connection is served only
//! by what lives at the address it reached, then told apart by the CONNECT username.
//!
//! Packets are framed with rumqttc's own MQTT codec (it decodes CONNECT/SUBSCRIBE/PUBLISH and
//! encodes CONNACK/SUBACK/PUBACK), so hubsim adds no MQTT dependency of its own. Each TCP
//! connection is one session; hubsim never keeps sessions (CONNACK session-present is 0), so
//! clients resubscribe after every connect, as MQTT requires them to when told so.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use rumqttc::QoS;
use rumqttc::mqttbytes::v4::{
    Codec, ConnAck, Connect, ConnectReturnCode, Packet, PubAck, Publish, SubAck,
    SubscribeReasonCode, UnsubAck,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_util::codec::Framed;

use crate::auth::unix_now;
use crate::dps::{self, DeviceCredential, DpsResponse};
use crate::hub::{self, Close, DeviceSession, Reply};
use crate::state::{C2dState, ConnCommand, ConnHandle, ConnectionEvent, Sim, Store, now_rfc3339};

/// Largest packet hubsim decodes. Above the hub's 256 KiB message limit so that an oversize
/// message is refused by the hub's own check (with its reason), not by the codec.
const MAX_PACKET_BYTES: usize = 512 * 1024;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Which service answers at which local address: DPS on its bind addresses, each linked hub on its
/// own (a hub named by an IP address lives there; another name is given an address or resolved).
/// Two hubs may share an address (a scale unit); a hub that resolves to DPS's address shares it
/// with DPS, which is the one topology Azure does not have (docs/hubsim.md).
#[derive(Debug, Clone)]
pub struct Topology {
    dps: Vec<IpAddr>,
    hubs: Vec<(String, IpAddr)>,
}

/// What a connection reached: DPS or not, and which hubs.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    pub dps: bool,
    pub hubs: Vec<String>,
}

impl Topology {
    pub fn new(
        dps: &[IpAddr],
        hubs: &[String],
        addresses: &[(String, IpAddr)],
    ) -> anyhow::Result<Topology> {
        let mut placed = Vec::new();
        for hub in hubs {
            let ip = addresses
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case(hub))
                .map(|(_, ip)| *ip)
                .or_else(|| hub.parse().ok())
                .or_else(|| resolve(hub))
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "hub '{hub}' has no address: name it by a loopback IP (127.0.0.2), give one (--hub {hub}=127.0.0.3), or make the name resolve"
                    )
                })?;
            placed.push((hub.clone(), canonical(ip)));
        }
        Ok(Topology {
            dps: dps.iter().map(|ip| canonical(*ip)).collect(),
            hubs: placed,
        })
    }

    pub fn hub_ip(&self, hub: &str) -> Option<IpAddr> {
        self.hubs
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(hub))
            .map(|(_, ip)| *ip)
    }

    pub fn hub_ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.hubs.iter().map(|(_, ip)| *ip)
    }

    /// Every address to listen on: DPS's, then each hub's not already covered (a wildcard bind
    /// covers every address of its family).
    pub fn listen_ips(&self) -> Vec<IpAddr> {
        let mut ips = self.dps.clone();
        for ip in self.hub_ips() {
            let covered = ips
                .iter()
                .any(|b| *b == ip || (b.is_unspecified() && b.is_ipv4() == ip.is_ipv4()));
            if !covered {
                ips.push(ip);
            }
        }
        ips
    }

    /// What answers at `local` (the address a connection reached).
    pub fn at(&self, local: IpAddr) -> Endpoint {
        let local = canonical(local);
        let hubs: Vec<String> = self
            .hubs
            .iter()
            .filter(|(_, ip)| *ip == local)
            .map(|(name, _)| name.clone())
            .collect();
        let dps = self.dps.contains(&local)
            || (hubs.is_empty()
                && self
                    .dps
                    .iter()
                    .any(|b| b.is_unspecified() && b.is_ipv4() == local.is_ipv4()));
        Endpoint { dps, hubs }
    }

    /// `{"hub": "address:port"}` for endpoints.json.
    pub fn describe_hubs(&self, port: u16) -> serde_json::Value {
        self.hubs
            .iter()
            .map(|(name, ip)| (name.clone(), SocketAddr::new(*ip, port).to_string().into()))
            .collect::<serde_json::Map<_, _>>()
            .into()
    }
}

/// An IPv4 address written as IPv6 (`::ffff:a.b.c.d`) is that IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// A host name's address, IPv4 first.
fn resolve(name: &str) -> Option<IpAddr> {
    use std::net::ToSocketAddrs;
    let addrs: Vec<IpAddr> = (name, 0).to_socket_addrs().ok()?.map(|a| a.ip()).collect();
    addrs
        .iter()
        .find(|ip| ip.is_ipv4())
        .or(addrs.first())
        .copied()
}

/// Accepts connections until the task is aborted.
pub async fn serve(
    sim: Arc<Sim>,
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    topology: Arc<Topology>,
) -> anyhow::Result<()> {
    let acceptor = TlsAcceptor::from(tls);
    // Connection tasks live in this set: when the listener task is aborted (hubsim stops), the
    // set is dropped and every connection with it, as when the real service goes away.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            Some(_) = connections.join_next() => continue,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: keep serving the connections we have.
                tracing::warn!("mqtt accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let sim = sim.clone();
        let acceptor = acceptor.clone();
        let endpoint = match tcp.local_addr() {
            Ok(local) => topology.at(local.ip()),
            Err(_) => continue,
        };
        connections.spawn(async move {
            if let Err(reason) = handle_connection(sim, acceptor, tcp, peer, endpoint).await {
                tracing::debug!(%peer, "mqtt connection ended: {reason}");
            }
        });
    }
}

/// What MQTT runs over once TLS is up: the TLS stream itself (port 8883), or the bytes of a
/// WebSocket on the HTTPS port (`/$iothub/websocket`, see `http.rs`).
pub trait MqttStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> MqttStream for T {}

type Transport = Framed<Box<dyn MqttStream>, Codec>;

/// How the MQTT bytes travel: recorded with each connection and DPS registration, so a test can
/// see which route a client took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Over {
    /// TLS on the MQTT port (8883).
    Tls,
    /// WebSockets on the HTTPS port (443 on Azure).
    WebSocket,
}

impl Over {
    /// "mqtt" or "mqtt-ws", as the registration history and `/sim/connections` show it.
    pub fn name(self) -> &'static str {
        match self {
            Over::Tls => "mqtt",
            Over::WebSocket => "mqtt-ws",
        }
    }
}

/// Who a CONNECT claims to be, from its username.
#[derive(Debug, Clone, PartialEq)]
enum Identity {
    Dps {
        id_scope: String,
        registration_id: String,
        /// The `api-version=` the device asked for (a registration's `csr` needs the preview).
        api_version: String,
    },
    Hub {
        hub: String,
        device_id: String,
        /// `model-id=` (URL-decoded): the device's IoT Plug and Play model.
        model_id: Option<String>,
    },
}

/// DPS: `{idScope}/registrations/{registrationId}/api-version=…[&ClientVersion=…]`;
/// hub: `{hostName}/{deviceId}/?api-version=…[&…]` (modules are not simulated).
fn parse_username(username: &str) -> Result<Identity, String> {
    let parts: Vec<&str> = username.splitn(4, '/').collect();
    if parts.len() == 4 && parts[1] == "registrations" && parts[3].starts_with("api-version=") {
        let api_version = parts[3]["api-version=".len()..]
            .split('&')
            .next()
            .unwrap_or_default();
        return Ok(Identity::Dps {
            id_scope: parts[0].to_string(),
            registration_id: parts[2].to_string(),
            api_version: api_version.to_string(),
        });
    }
    if let Some((path, query)) = username.split_once("/?") {
        let segments: Vec<&str> = path.split('/').collect();
        match segments.as_slice() {
            [hub, device_id] if !hub.is_empty() && !device_id.is_empty() => {
                let model_id = hub::query_param(query, "model-id").map(|m| {
                    percent_encoding::percent_decode_str(&m)
                        .decode_utf8_lossy()
                        .into_owned()
                });
                return Ok(Identity::Hub {
                    hub: hub.to_string(),
                    device_id: device_id.to_string(),
                    model_id,
                });
            }
            [_, _, _] => return Err("module identities are not simulated".into()),
            _ => {}
        }
    }
    Err(format!(
        "username '{username}' is neither a DPS registration nor an IoT Hub device username"
    ))
}

async fn handle_connection(
    sim: Arc<Sim>,
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    endpoint: Endpoint,
) -> Result<(), String> {
    let _ = tcp.set_nodelay(true);
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
        .await
        .map_err(|_| "TLS handshake timed out".to_string())?
        .map_err(|e| format!("TLS handshake failed: {e}"))?;
    let peer_chain: Vec<Vec<u8>> = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(|certs| certs.iter().map(|c| c.to_vec()).collect())
        .unwrap_or_default();
    serve_stream(sim, Box::new(tls), Over::Tls, peer_chain, peer, endpoint).await
}

/// One MQTT connection over `stream` (TLS already done; `peer_chain` is the client certificate
/// chain it presented, if any), as DPS or a hub according to `endpoint`.
pub async fn serve_stream(
    sim: Arc<Sim>,
    stream: Box<dyn MqttStream>,
    over: Over,
    peer_chain: Vec<Vec<u8>>,
    peer: SocketAddr,
    endpoint: Endpoint,
) -> Result<(), String> {
    let mut transport = Framed::new(
        stream,
        Codec {
            max_incoming_size: MAX_PACKET_BYTES,
            max_outgoing_size: MAX_PACKET_BYTES,
        },
    );
    let connect = match tokio::time::timeout(HANDSHAKE_TIMEOUT, transport.next()).await {
        Ok(Some(Ok(Packet::Connect(connect)))) => connect,
        Ok(Some(Ok(other))) => return Err(format!("first packet was {other:?}, not CONNECT")),
        Ok(Some(Err(e))) => return Err(format!("malformed CONNECT: {e}")),
        Ok(None) => return Err("closed before CONNECT".into()),
        Err(_) => return Err("no CONNECT within 10 s".into()),
    };
    tracing::debug!(%peer, client_id = %connect.client_id, "CONNECT");

    let username = connect
        .login
        .as_ref()
        .map(|l| l.username.clone())
        .unwrap_or_default();
    let credential = match connect.login.as_ref().map(|l| l.password.as_str()) {
        Some(password) if !password.is_empty() => DeviceCredential::Sas(password.to_string()),
        _ if !peer_chain.is_empty() => DeviceCredential::X509(peer_chain),
        _ => DeviceCredential::None,
    };

    let refuse_until = sim.faults.lock().unwrap().refuse_connections_until;
    if refuse_until.is_some_and(|t| t > std::time::Instant::now()) {
        let service = match parse_username(&username) {
            Ok(Identity::Dps { .. }) => "dps",
            _ => "hub",
        };
        record_event(
            &sim,
            &connect.client_id,
            service,
            "refused",
            Some("fault: refusing connections"),
        );
        refuse(&mut transport, ConnectReturnCode::ServiceUnavailable).await;
        return Err("refused by fault injection".into());
    }

    // Each host knows only its own names: DPS never sees a hub's username, and a hub never sees
    // DPS's or another host's (the device dialled the wrong host, or named the wrong one).
    let misdirected = match parse_username(&username) {
        Ok(Identity::Dps { .. }) if !endpoint.dps => Some((
            "dps",
            format!(
                "a DPS registration reached the IoT hub host of {}: DPS is another host",
                endpoint.hubs.join(", ")
            ),
        )),
        Ok(Identity::Hub { hub, .. })
            if !endpoint.hubs.iter().any(|h| h.eq_ignore_ascii_case(&hub)) =>
        {
            Some((
                "hub",
                if endpoint.hubs.is_empty() {
                    format!("a connection for IoT hub '{hub}' reached the DPS endpoint")
                } else {
                    format!(
                        "a connection for IoT hub '{hub}' reached the host of {}",
                        endpoint.hubs.join(", ")
                    )
                },
            ))
        }
        _ => None,
    };
    if let Some((service, reason)) = misdirected {
        record_event(&sim, &connect.client_id, service, "refused", Some(&reason));
        refuse(&mut transport, ConnectReturnCode::NotAuthorized).await;
        return Err(reason);
    }

    match parse_username(&username) {
        Ok(Identity::Dps {
            id_scope,
            registration_id,
            api_version,
        }) => {
            run_dps(
                &sim,
                transport,
                &connect,
                over,
                (&id_scope, &registration_id, &api_version),
                credential,
            )
            .await
        }
        Ok(Identity::Hub {
            hub,
            device_id,
            model_id,
        }) => {
            let device = HubDevice {
                hub: &hub,
                device_id: &device_id,
                model_id: model_id.as_deref(),
            };
            run_hub(&sim, transport, &connect, over, device, credential).await
        }
        Err(reason) => {
            record_event(&sim, &connect.client_id, "hub", "refused", Some(&reason));
            refuse(&mut transport, ConnectReturnCode::BadUserNamePassword).await;
            Err(reason)
        }
    }
}

fn record_event(sim: &Sim, client_id: &str, service: &str, event: &str, reason: Option<&str>) {
    record_connection_event(sim, client_id, service, event, reason, None);
}

/// A connection accepted, with the route it took.
fn record_connected(sim: &Sim, client_id: &str, service: &str, over: Over) {
    record_connection_event(sim, client_id, service, "connected", None, Some(over));
}

fn record_connection_event(
    sim: &Sim,
    client_id: &str,
    service: &str,
    event: &str,
    reason: Option<&str>,
    over: Option<Over>,
) {
    let event = ConnectionEvent {
        time: now_rfc3339(),
        client_id: client_id.to_string(),
        service: service.to_string(),
        event: event.to_string(),
        reason: reason.map(str::to_string),
        transport: over.map(|over| over.name().to_string()),
    };
    sim.record(|r| r.connections.push(event));
}

async fn refuse(transport: &mut Transport, code: ConnectReturnCode) {
    let _ = transport
        .send(Packet::ConnAck(ConnAck::new(code, false)))
        .await;
    let _ = transport.close().await;
}

/// When the connection must end because its SAS token runs out (or the fault cap does).
fn token_deadline(sim: &Sim, expiry: Option<u64>) -> Option<tokio::time::Instant> {
    let now = unix_now();
    let by_token = expiry.map(|e| Duration::from_secs(e.saturating_sub(now)));
    let cap = sim.faults.lock().unwrap().token_lifetime_cap;
    let lifetime = match (by_token, cap) {
        (Some(t), Some(c)) => Some(t.min(c)),
        (t, c) => t.or(c),
    };
    lifetime.map(|d| tokio::time::Instant::now() + d)
}

/// Hands out packet ids for server-initiated QoS 1 publishes.
struct PacketIds(u16);

impl PacketIds {
    fn next(&mut self) -> u16 {
        self.0 = if self.0 == u16::MAX { 1 } else { self.0 + 1 };
        self.0
    }
}

async fn send_publish(
    transport: &mut Transport,
    ids: &mut PacketIds,
    topic: String,
    payload: Bytes,
    qos: QoS,
) -> Result<(), String> {
    let mut publish = Publish::from_bytes(topic, qos, payload);
    if qos != QoS::AtMostOnce {
        publish.pkid = ids.next();
    }
    transport
        .send(Packet::Publish(publish))
        .await
        .map_err(|e| format!("send failed: {e}"))
}

/// What ends a session loop, besides packets.
enum Next {
    Packet(Packet),
    Command(ConnCommand),
    Closed(String),
}

async fn next_event(
    transport: &mut Transport,
    commands: &mut mpsc::UnboundedReceiver<ConnCommand>,
    keep_alive: Option<Duration>,
    deadline: Option<tokio::time::Instant>,
) -> Next {
    // `None` when the keep-alive interval passed without a packet.
    let read = async {
        match keep_alive {
            Some(limit) => tokio::time::timeout(limit, transport.next()).await.ok(),
            None => Some(transport.next().await),
        }
    };
    let expire = async {
        match deadline {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        packet = read => match packet {
            Some(Some(Ok(packet))) => Next::Packet(packet),
            Some(Some(Err(rumqttc::mqttbytes::Error::Io(e)))) => {
                Next::Closed(format!("connection lost: {e}"))
            }
            Some(Some(Err(e))) => Next::Closed(format!("malformed packet: {e}")),
            Some(None) => Next::Closed("client closed the connection".into()),
            None => Next::Closed("keep-alive timeout: no packet within 1.5 × keep-alive".into()),
        },
        Some(command) = commands.recv() => Next::Command(command),
        _ = expire => Next::Closed("SAS token expired".into()),
    }
}

/// The longest a connection may stay silent: 1.5 × the CONNECT's keep-alive (MQTT 3.1.1 §3.1.2.10),
/// capped as IoT Hub and DPS cap it at the Azure load balancer's idle timeout of 29.45 minutes —
/// also for a keep-alive of 0, which the load balancer does not know about (docs/hubsim.md).
pub const MAX_IDLE: Duration = Duration::from_secs(1767);

fn keep_alive_limit(keep_alive_secs: u16) -> Duration {
    match keep_alive_secs {
        0 => MAX_IDLE,
        n => Duration::from_millis(u64::from(n) * 1500).min(MAX_IDLE),
    }
}

async fn maybe_delay(sim: &Sim) {
    let delay = sim.faults.lock().unwrap().delay;
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
}

fn credential_expiry(credential: &DeviceCredential) -> Option<u64> {
    match credential {
        DeviceCredential::Sas(token) => crate::auth::parse_sas(token).ok().map(|t| t.expiry),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// DPS
// ---------------------------------------------------------------------------------------------

async fn run_dps(
    sim: &Arc<Sim>,
    mut transport: Transport,
    connect: &Connect,
    over: Over,
    (id_scope, registration_id, api_version): (&str, &str, &str),
    credential: DeviceCredential,
) -> Result<(), String> {
    let client_id = &connect.client_id;
    let checked = if !sim.serves_scope(id_scope) {
        Err(format!("unknown ID scope '{id_scope}'"))
    } else if !client_id.eq_ignore_ascii_case(registration_id) {
        Err(format!(
            "client id '{client_id}' differs from the registration id '{registration_id}'"
        ))
    } else {
        dps::authenticate(sim, id_scope, registration_id, &credential)
    };
    if let Err(reason) = checked {
        record_event(sim, client_id, "dps", "refused", Some(&reason));
        refuse(&mut transport, ConnectReturnCode::NotAuthorized).await;
        return Err(reason);
    }
    let deadline = token_deadline(sim, credential_expiry(&credential));
    transport
        .send(Packet::ConnAck(ConnAck::new(
            ConnectReturnCode::Success,
            false,
        )))
        .await
        .map_err(|e| e.to_string())?;
    record_connected(sim, client_id, "dps", over);

    let (_unused_tx, mut commands) = mpsc::unbounded_channel();
    let mut ids = PacketIds(0);
    let keep_alive = Some(keep_alive_limit(connect.keep_alive));
    let reason = loop {
        let packet = match next_event(&mut transport, &mut commands, keep_alive, deadline).await {
            Next::Packet(p) => p,
            Next::Command(_) => continue,
            Next::Closed(reason) => break reason,
        };
        match packet {
            Packet::PingReq => {
                let _ = transport.send(Packet::PingResp).await;
            }
            Packet::Disconnect => break "client disconnected".to_string(),
            Packet::PubAck(_) => {}
            Packet::Subscribe(subscribe) => {
                let codes = subscribe
                    .filters
                    .iter()
                    .map(|f| {
                        if f.path == "$dps/registrations/res/#" {
                            SubscribeReasonCode::Success(min_qos1(f.qos))
                        } else {
                            SubscribeReasonCode::Failure
                        }
                    })
                    .collect();
                let _ = transport
                    .send(Packet::SubAck(SubAck::new(subscribe.pkid, codes)))
                    .await;
            }
            Packet::Publish(publish) => {
                if publish.qos == QoS::ExactlyOnce {
                    break "QoS 2 is not supported".to_string();
                }
                if publish.qos == QoS::AtLeastOnce {
                    let _ = transport
                        .send(Packet::PubAck(PubAck::new(publish.pkid)))
                        .await;
                }
                maybe_delay(sim).await;
                let Some((rid, response)) = dps_request(
                    sim,
                    (id_scope, registration_id, api_version),
                    &credential,
                    &publish,
                    over,
                ) else {
                    break format!("unknown DPS topic '{}'", publish.topic);
                };
                let response = dps::once_synced(sim, response).await;
                let mut topic = format!("$dps/registrations/res/{}/?$rid={rid}", response.status);
                if let Some(seconds) = response.retry_after {
                    topic.push_str(&format!("&retry-after={seconds}"));
                }
                let body = Bytes::from(response.body.to_string());
                send_publish(&mut transport, &mut ids, topic, body, QoS::AtLeastOnce).await?;
            }
            Packet::Unsubscribe(unsubscribe) => {
                let _ = transport
                    .send(Packet::UnsubAck(UnsubAck::new(unsubscribe.pkid)))
                    .await;
            }
            other => break format!("unexpected packet {other:?}"),
        }
    };
    record_event(sim, client_id, "dps", "disconnected", Some(&reason));
    Ok(())
}

fn min_qos1(qos: QoS) -> QoS {
    if qos == QoS::AtMostOnce {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    }
}

/// Routes a DPS request topic; `None` for a topic DPS does not know.
fn dps_request(
    sim: &Sim,
    (id_scope, registration_id, api_version): (&str, &str, &str),
    credential: &DeviceCredential,
    publish: &Publish,
    over: Over,
) -> Option<(String, DpsResponse)> {
    if let Some(query) = publish
        .topic
        .strip_prefix("$dps/registrations/PUT/iotdps-register/?")
    {
        let rid = hub::query_param(query, "$rid").unwrap_or_default();
        let response = dps::register_at_version(
            sim,
            id_scope,
            registration_id,
            credential,
            &publish.payload,
            (over.name(), Some(api_version)),
        );
        return Some((rid, response));
    }
    if let Some(query) = publish
        .topic
        .strip_prefix("$dps/registrations/GET/iotdps-get-operationstatus/?")
    {
        let rid = hub::query_param(query, "$rid").unwrap_or_default();
        let response = match hub::query_param(query, "operationId") {
            Some(op) => {
                let op = percent_encoding::percent_decode_str(&op)
                    .decode_utf8_lossy()
                    .into_owned();
                dps::operation_status(sim, id_scope, registration_id, &op)
            }
            None => DpsResponse {
                status: 400,
                retry_after: None,
                body: dps::error_body(400001, "operationId is missing from the topic"),
            },
        };
        return Some((rid, response));
    }
    None
}

// ---------------------------------------------------------------------------------------------
// IoT Hub
// ---------------------------------------------------------------------------------------------

/// Who a hub CONNECT is for, from its username.
struct HubDevice<'a> {
    hub: &'a str,
    device_id: &'a str,
    model_id: Option<&'a str>,
}

async fn run_hub(
    sim: &Arc<Sim>,
    mut transport: Transport,
    connect: &Connect,
    over: Over,
    device: HubDevice<'_>,
    credential: DeviceCredential,
) -> Result<(), String> {
    let HubDevice {
        hub,
        device_id,
        model_id,
    } = device;
    let client_id = &connect.client_id;
    let known_hub = sim.config.hubs.iter().find(|h| h.eq_ignore_ascii_case(hub));
    let checked = match known_hub {
        None => Err(format!("'{hub}' is not a hub linked to this simulator")),
        Some(_) if client_id != device_id => Err(format!(
            "client id '{client_id}' differs from the device id '{device_id}' in the username"
        )),
        Some(hub) => {
            crate::auth::authenticate_hub_device(sim, hub, device_id, &credential, unix_now())
                .map(|expiry| (hub.clone(), expiry))
        }
    };
    let (hub, expiry) = match checked {
        Ok(ok) => ok,
        Err(reason) => {
            record_event(sim, client_id, "hub", "refused", Some(&reason));
            refuse(&mut transport, ConnectReturnCode::NotAuthorized).await;
            return Err(reason);
        }
    };
    let device_key = Store::device_key(&hub, device_id);
    // The hub records the model id a device announces (IoT Plug and Play): `modelId` in the
    // device and its twin. A CONNECT without one leaves the last one in place.
    if let Some(model_id) = model_id {
        let _ = sim.mutate(|s| {
            if let Some(device) = s.devices.get_mut(&device_key) {
                device.model_id = Some(model_id.to_string());
            }
        });
    }
    let session = DeviceSession {
        hub: hub.clone(),
        device_id: device_id.to_string(),
        device_key: device_key.clone(),
        auth_type: match credential {
            DeviceCredential::X509(_) => "x509",
            _ => "sas",
        },
        subscriptions: Arc::default(),
    };
    let deadline = token_deadline(sim, expiry);

    // One connection per device: the newest wins, as on the real hub.
    let (tx, mut commands) = mpsc::unbounded_channel();
    let conn_id = sim.next_conn_id();
    let previous = sim.live.lock().unwrap().connections.insert(
        device_key.clone(),
        ConnHandle {
            conn_id,
            tx,
            subscriptions: session.subscriptions.clone(),
        },
    );
    if let Some(previous) = previous {
        let _ = previous.tx.send(ConnCommand::Close {
            reason: "ConnectionForcefullyClosedOnNewConnection (400027)".into(),
        });
    }
    let result = transport
        .send(Packet::ConnAck(ConnAck::new(
            ConnectReturnCode::Success,
            false,
        )))
        .await;
    record_connected(sim, client_id, "hub", over);

    let mut c2d_unacked = Vec::new();
    let reason = match result {
        Err(e) => format!("send failed: {e}"),
        Ok(()) => {
            hub_loop(
                sim,
                &mut transport,
                &session,
                connect,
                &mut commands,
                deadline,
                &mut c2d_unacked,
            )
            .await
        }
    };

    {
        let mut live = sim.live.lock().unwrap();
        if live
            .connections
            .get(&device_key)
            .is_some_and(|h| h.conn_id == conn_id)
        {
            live.connections.remove(&device_key);
        }
    }
    // C2D messages this connection carried without the device's PUBACK, and any the device
    // was sent meanwhile: the hub delivers them again on the device's next connection.
    commands.close();
    while let Ok(command) = commands.try_recv() {
        if let ConnCommand::DeliverC2d(message) = command {
            c2d_unacked.push((0, message));
        }
    }
    crate::twin::requeue_c2d(
        sim,
        &device_key,
        c2d_unacked.into_iter().map(|(_, m)| m).collect(),
    );
    record_event(sim, client_id, "hub", "disconnected", Some(&reason));
    let _ = transport.close().await;
    Ok(())
}

async fn hub_loop(
    sim: &Arc<Sim>,
    transport: &mut Transport,
    session: &DeviceSession,
    connect: &Connect,
    commands: &mut mpsc::UnboundedReceiver<ConnCommand>,
    deadline: Option<tokio::time::Instant>,
    c2d_unacked: &mut Vec<(u16, crate::state::C2dMessage)>,
) -> String {
    let mut ids = PacketIds(0);
    let keep_alive = Some(keep_alive_limit(connect.keep_alive));
    loop {
        let packet = match next_event(transport, commands, keep_alive, deadline).await {
            Next::Packet(p) => p,
            Next::Command(ConnCommand::Close { reason }) => return reason,
            Next::Command(ConnCommand::Publish {
                topic,
                payload,
                qos,
            }) => {
                if let Err(e) = send_publish(transport, &mut ids, topic, payload, qos).await {
                    return e;
                }
                continue;
            }
            Next::Command(ConnCommand::DeliverC2d(message)) => {
                let topic = crate::twin::c2d_topic(&session.device_id, &message);
                let pkid = ids.next();
                let mut publish =
                    Publish::from_bytes(topic, QoS::AtLeastOnce, message.body.clone());
                publish.pkid = pkid;
                sim.record_c2d(&session.device_key, &message, C2dState::Invisible);
                c2d_unacked.push((pkid, message));
                if let Err(e) = transport.send(Packet::Publish(publish)).await {
                    return format!("send failed: {e}");
                }
                continue;
            }
            Next::Closed(reason) => return reason,
        };
        match packet {
            Packet::PingReq => {
                let _ = transport.send(Packet::PingResp).await;
            }
            Packet::Disconnect => return "client disconnected".into(),
            // PUBACK of a C2D message completes it: the hub forgets it. Until then it is the
            // connection's, and goes back to the queue if the connection ends.
            Packet::PubAck(ack) => {
                if let Some(pos) = c2d_unacked.iter().position(|(pkid, _)| *pkid == ack.pkid) {
                    let (_, message) = c2d_unacked.remove(pos);
                    sim.record_c2d(&session.device_key, &message, C2dState::Completed);
                }
            }
            Packet::Subscribe(subscribe) => {
                let filters: Vec<(String, QoS)> = subscribe
                    .filters
                    .iter()
                    .map(|f| (f.path.clone(), f.qos))
                    .collect();
                let (granted, flush_c2d) = hub::on_subscribe(session, &filters);
                let codes = granted
                    .into_iter()
                    .map(|g| g.map_or(SubscribeReasonCode::Failure, SubscribeReasonCode::Success))
                    .collect();
                if transport
                    .send(Packet::SubAck(SubAck::new(subscribe.pkid, codes)))
                    .await
                    .is_err()
                {
                    return "send failed".into();
                }
                if flush_c2d {
                    crate::twin::flush_c2d(sim, &session.device_key);
                }
            }
            Packet::Unsubscribe(unsubscribe) => {
                hub::on_unsubscribe(session, &unsubscribe.topics);
                let _ = transport
                    .send(Packet::UnsubAck(UnsubAck::new(unsubscribe.pkid)))
                    .await;
            }
            Packet::Publish(publish) => {
                if publish.qos == QoS::ExactlyOnce {
                    return "QoS 2 is not supported by IoT Hub".into();
                }
                maybe_delay(sim).await;
                let replies = match hub::on_publish(
                    sim,
                    session,
                    &publish.topic,
                    &publish.payload,
                    publish.retain,
                ) {
                    Ok(replies) => replies,
                    Err(Close(reason)) => return reason,
                };
                // PUBACK only once the message is recorded: an acknowledged message is never lost.
                if publish.qos == QoS::AtLeastOnce
                    && transport
                        .send(Packet::PubAck(PubAck::new(publish.pkid)))
                        .await
                        .is_err()
                {
                    return "send failed".into();
                }
                for Reply::Publish {
                    topic,
                    payload,
                    qos,
                } in replies
                {
                    if let Err(e) = send_publish(transport, &mut ids, topic, payload, qos).await {
                        return e;
                    }
                }
            }
            other => return format!("unexpected packet {other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_is_allowed_for_one_and_a_half_keep_alives_capped_at_1767_s() {
        assert_eq!(keep_alive_limit(60), Duration::from_secs(90));
        // 1177 s is the largest keep-alive whose 1.5× fits under the cap ...
        assert_eq!(keep_alive_limit(1177), Duration::from_millis(1_765_500));
        assert!(keep_alive_limit(1177) < MAX_IDLE);
        // ... from 1178 s on, the hub's cap applies.
        assert_eq!(keep_alive_limit(1178), MAX_IDLE);
        assert_eq!(keep_alive_limit(u16::MAX), MAX_IDLE);
        assert_eq!(
            keep_alive_limit(0),
            MAX_IDLE,
            "no keep-alive: the idle cap still holds"
        );
    }

    #[test]
    fn usernames_of_real_clients_are_told_apart() {
        assert_eq!(
            parse_username(
                "0ne00000001/registrations/dev-01/api-version=2019-03-31&ClientVersion=azure-iot-device-provisioning-py%2F2.14.0"
            ),
            Ok(Identity::Dps {
                id_scope: "0ne00000001".into(),
                registration_id: "dev-01".into(),
                api_version: "2019-03-31".into(),
            })
        );
        assert_eq!(
            parse_username(
                "sim-hub.example.net/dev-01/?api-version=2019-10-01&DeviceClientType=azure-iot-device-iothub-py%2F2.14.0"
            ),
            Ok(Identity::Hub {
                hub: "sim-hub.example.net".into(),
                device_id: "dev-01".into(),
                model_id: None,
            })
        );
        // EMB-C's test username (docs/protocol.md §5.1): the model id is URL-encoded.
        assert_eq!(
            parse_username(
                "myiothub.azure-devices.net/my_device/?api-version=2020-09-30&DeviceClientType=azsdk-c%2F1.0.0&model-id=dtmi%3AYOUR_COMPANY_NAME_HERE%3Asample_device%3B1"
            ),
            Ok(Identity::Hub {
                hub: "myiothub.azure-devices.net".into(),
                device_id: "my_device".into(),
                model_id: Some("dtmi:YOUR_COMPANY_NAME_HERE:sample_device;1".into()),
            })
        );
        assert!(parse_username("hub/dev/module/?api-version=1").is_err());
        assert!(parse_username("just-a-name").is_err());
    }
}
