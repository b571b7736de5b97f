//! The IoT Hub session over MQTT/TLS: one connection for the whole gateway.
//!
//! A task owns the connection. It reconnects with capped exponential backoff and jitter, renews
//! its SAS token before expiry by reconnecting, GETs the twin on every connect, applies desired
//! patches in `$version` order (a gap triggers a full GET), answers reported-property patches, and
//! publishes telemetry at QoS 1, completing each message only when the hub's PUBACK arrives. A
//! message that was sent but not acknowledged when the connection dropped is sent again after the
//! reconnect (at-least-once; the message id lets the cloud drop duplicates).
//!
//! Every connection uses a fresh rumqttc client and event loop: rumqttc's own retransmission is
//! never involved, so the packet ids of one connection map one-to-one onto our requests.

pub mod topics;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, Outgoing, Packet, QoS,
    TlsConfiguration, Transport,
};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};

use topics::Incoming;
pub use topics::TelemetryMessage;

use crate::keys::{Credential, sas_token};

/// Everything the session needs, in plain values (the daemon builds it from the config).
#[derive(Clone)]
pub struct HubParams {
    pub hub: String,
    pub device_id: String,
    pub port: u16,
    pub credential: Credential,
    pub tls: Arc<rustls::ClientConfig>,
    pub keep_alive: Duration,
    pub sas_ttl: Duration,
    pub renew_before: Duration,
    pub backoff_max: Duration,
    pub max_message_size: usize,
    pub inflight: u16,
    /// The desired `$version` the agent already has (from twin.json), so stale patches are ignored.
    pub desired_version: u64,
}

#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum PublishError {
    #[error("message of {size} bytes exceeds the hub's limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("the hub session has stopped")]
    Stopped,
}

#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum TwinError {
    #[error("the hub answered {status}: {message}")]
    Rejected { status: u16, message: String },
    #[error("the connection dropped before the hub answered")]
    Disconnected,
    #[error("the hub session has stopped")]
    Stopped,
}

/// What the session tells the daemon.
#[derive(Debug)]
pub enum SessionEvent {
    Connected,
    Disconnected {
        reason: String,
    },
    /// CONNACK "not authorized": the device is unknown to this hub, disabled or its key changed.
    /// The daemon reprovisions.
    Unauthorized,
    /// The full twin, after every (re)connect or to heal a version gap.
    Twin {
        desired: Map<String, Value>,
        desired_version: u64,
        reported: Map<String, Value>,
    },
    /// A desired patch in order (its version is exactly one above the previous one).
    DesiredPatch {
        version: u64,
        patch: Map<String, Value>,
    },
    Method {
        name: String,
        rid: String,
        payload: Value,
    },
    CloudToDevice {
        body: bytes::Bytes,
        properties: Vec<(String, String)>,
    },
}

enum Control {
    Report {
        patch: Value,
        done: oneshot::Sender<Result<u64, TwinError>>,
    },
    MethodResponse {
        rid: String,
        status: u16,
        payload: Value,
    },
    Shutdown,
}

struct Publish {
    message: TelemetryMessage,
    done: oneshot::Sender<Result<(), PublishError>>,
}

/// The daemon's handle on the session task.
#[derive(Clone)]
pub struct SessionHandle {
    telemetry: mpsc::Sender<Publish>,
    control: mpsc::UnboundedSender<Control>,
    max_message_size: usize,
    device_id: String,
}

impl SessionHandle {
    /// Sends a telemetry message; resolves when the hub acknowledged it (PUBACK). While the hub is
    /// unreachable this waits; the message is never dropped by the session.
    pub async fn publish(&self, message: TelemetryMessage) -> Result<(), PublishError> {
        let acknowledged = self.enqueue(message).await?;
        acknowledged.await.map_err(|_| PublishError::Stopped)?
    }

    /// Hands a message to the session (in call order) and returns what resolves on its PUBACK:
    /// callers that enqueue one message after another keep their order on the wire.
    pub async fn enqueue(
        &self,
        message: TelemetryMessage,
    ) -> Result<oneshot::Receiver<Result<(), PublishError>>, PublishError> {
        let size = message.body.len() + topics::telemetry_topic(&self.device_id, &message).len();
        if size > self.max_message_size {
            return Err(PublishError::TooLarge {
                size,
                limit: self.max_message_size,
            });
        }
        let (done, result) = oneshot::channel();
        self.telemetry
            .send(Publish { message, done })
            .await
            .map_err(|_| PublishError::Stopped)?;
        Ok(result)
    }

    /// Patches reported properties; returns the new reported `$version`.
    pub async fn report(&self, patch: Value) -> Result<u64, TwinError> {
        let (done, result) = oneshot::channel();
        self.control
            .send(Control::Report { patch, done })
            .map_err(|_| TwinError::Stopped)?;
        result.await.map_err(|_| TwinError::Stopped)?
    }

    pub fn respond_to_method(&self, rid: &str, status: u16, payload: Value) {
        let _ = self.control.send(Control::MethodResponse {
            rid: rid.to_string(),
            status,
            payload,
        });
    }

    /// Disconnects cleanly and ends the task.
    pub fn shutdown(&self) {
        let _ = self.control.send(Control::Shutdown);
    }
}

/// Starts the session task.
pub fn spawn(
    params: HubParams,
) -> (
    SessionHandle,
    mpsc::Receiver<SessionEvent>,
    tokio::task::JoinHandle<()>,
) {
    let (telemetry_tx, telemetry_rx) = mpsc::channel(usize::from(params.inflight).max(1));
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    let (events_tx, events_rx) = mpsc::channel(256);
    let handle = SessionHandle {
        telemetry: telemetry_tx,
        control: control_tx,
        max_message_size: params.max_message_size,
        device_id: params.device_id.clone(),
    };
    let task = tokio::spawn(
        Session {
            params,
            events: events_tx,
            telemetry: telemetry_rx,
            control: control_rx,
            unacked: VecDeque::new(),
            next_rid: 0,
            connected_at: None,
        }
        .run(),
    );
    (handle, events_rx, task)
}

/// Capped exponential backoff with full jitter.
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            attempt: 0,
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        let exp = self
            .initial
            .saturating_mul(2u32.saturating_pow(self.attempt.min(16)))
            .min(self.max);
        self.attempt += 1;
        // Half fixed, half random: spreads a fleet reconnecting after an outage.
        let half = exp / 2;
        half + half.mul_f64(rand::random::<f64>())
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// What a packet id of the current connection stands for.
enum Sent {
    Telemetry,
    Other,
}

enum Pending {
    /// A twin GET: answer → `SessionEvent::Twin`.
    Get,
    Report(oneshot::Sender<Result<u64, TwinError>>),
}

struct Session {
    params: HubParams,
    events: mpsc::Sender<SessionEvent>,
    telemetry: mpsc::Receiver<Publish>,
    control: mpsc::UnboundedReceiver<Control>,
    /// Telemetry handed to the hub and not yet acknowledged, oldest first. Survives reconnects.
    unacked: VecDeque<Publish>,
    next_rid: u64,
    /// When the current connection got its CONNACK.
    connected_at: Option<tokio::time::Instant>,
}

/// Why a connection ended.
enum End {
    Renew,
    Lost(String),
    Unauthorized,
    Shutdown,
}

impl Session {
    async fn run(mut self) {
        let mut backoff = Backoff::new(Duration::from_secs(1), self.params.backoff_max);
        loop {
            self.connected_at = None;
            match self.connection().await {
                End::Shutdown => return,
                End::Renew => {
                    backoff.reset();
                    continue;
                }
                End::Unauthorized => {
                    self.emit(SessionEvent::Unauthorized).await;
                }
                End::Lost(reason) => {
                    tracing::warn!(hub = %self.params.hub, %reason, "hub connection lost");
                    self.emit(SessionEvent::Disconnected { reason }).await;
                }
            }
            // A connection the hub accepted and that held for a moment was a success: start the
            // backoff over. Connect-then-drop loops (under a second) keep backing off.
            if self
                .connected_at
                .is_some_and(|at| at.elapsed() >= Duration::from_secs(1))
            {
                backoff.reset();
            }
            let delay = backoff.next_delay();
            tracing::debug!(?delay, "reconnecting to the hub after a pause");
            if self.pause(delay).await {
                return;
            }
        }
    }

    /// Waits `delay` while still answering control requests; true when asked to shut down.
    async fn pause(&mut self, delay: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + delay;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return false,
                control = self.control.recv() => match control {
                    None | Some(Control::Shutdown) => return true,
                    Some(Control::Report { done, .. }) => {
                        let _ = done.send(Err(TwinError::Disconnected));
                    }
                    Some(Control::MethodResponse { .. }) => {}
                },
            }
        }
    }

    async fn emit(&self, event: SessionEvent) {
        let _ = self.events.send(event).await;
    }

    fn rid(&mut self) -> String {
        self.next_rid += 1;
        self.next_rid.to_string()
    }

    /// One connection, from CONNECT to its end.
    async fn connection(&mut self) -> End {
        let p = &self.params;
        let ttl = p.sas_ttl;
        let mut options = MqttOptions::new(&p.device_id, &p.hub, p.port);
        options.set_keep_alive(p.keep_alive);
        options.set_clean_session(false);
        options.set_inflight(p.inflight.max(1));
        options.set_max_packet_size(512 * 1024, p.max_message_size + 64 * 1024);
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            p.tls.clone(),
        )));
        let username = format!(
            "{}/{}/?api-version=2021-04-12&DeviceClientType=hubagent%2F{}",
            p.hub,
            p.device_id,
            env!("CARGO_PKG_VERSION")
        );
        let password = match &p.credential {
            Credential::Sas(signer) => {
                let expiry = crate::provisioning::dps::unix_now() + ttl.as_secs();
                let resource = format!("{}/devices/{}", p.hub, p.device_id);
                match sas_token(signer.as_ref(), &resource, expiry, None) {
                    Ok(t) => t,
                    Err(e) => return End::Lost(format!("cannot sign the hub token: {e}")),
                }
            }
            Credential::X509 { .. } => String::new(),
        };
        options.set_credentials(username, password);
        let capacity = usize::from(p.inflight) * 2 + 64;
        let (client, mut eventloop) = AsyncClient::new(options, capacity);
        // Token renewal: reconnect with a fresh token before the hub would cut us off.
        let renew_at = tokio::time::Instant::now() + ttl.saturating_sub(p.renew_before);
        let device_id = p.device_id.clone();
        let inflight_limit = usize::from(p.inflight).max(1);

        // Connect: wait for CONNACK before anything else.
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => break,
                Ok(_) => continue,
                Err(ConnectionError::ConnectionRefused(
                    ConnectReturnCode::NotAuthorized | ConnectReturnCode::BadUserNamePassword,
                )) => return End::Unauthorized,
                Err(e) => return End::Lost(e.to_string()),
            }
        }
        tracing::info!(hub = %p.hub, device = %p.device_id, "connected to the hub");
        self.connected_at = Some(tokio::time::Instant::now());
        self.emit(SessionEvent::Connected).await;

        let mut order: VecDeque<Sent> = VecDeque::new();
        // Packet id → position-independent marker: the oldest unacked telemetry is completed
        // first, because the hub acknowledges QoS 1 publishes in order.
        let mut telemetry_pkids: VecDeque<u16> = VecDeque::new();
        let mut pending: HashMap<String, Pending> = HashMap::new();
        let mut desired_version = self.params.desired_version;

        let subscriptions = [
            "$iothub/twin/res/#".to_string(),
            "$iothub/twin/PATCH/properties/desired/#".to_string(),
            "$iothub/methods/POST/#".to_string(),
            format!("devices/{device_id}/messages/devicebound/#"),
        ];
        if let Err(e) = client.try_subscribe_many(
            subscriptions
                .into_iter()
                .map(|t| rumqttc::SubscribeFilter::new(t, QoS::AtLeastOnce)),
        ) {
            return End::Lost(e.to_string());
        }
        let rid = self.rid();
        pending.insert(rid.clone(), Pending::Get);
        if let Err(e) = client.try_publish(
            format!("$iothub/twin/GET/?$rid={rid}"),
            QoS::AtMostOnce,
            false,
            "",
        ) {
            return End::Lost(e.to_string());
        }
        order.push_back(Sent::Other);
        // Resend what the previous connection did not get acknowledged, in the original order.
        for publish in &self.unacked {
            let topic = topics::telemetry_topic(&device_id, &publish.message);
            if let Err(e) =
                client.try_publish(topic, QoS::AtLeastOnce, false, publish.message.body.clone())
            {
                return End::Lost(e.to_string());
            }
            order.push_back(Sent::Telemetry);
        }

        let end = loop {
            let can_take = self.unacked.len() < inflight_limit;
            tokio::select! {
                event = eventloop.poll() => {
                    let event = match event {
                        Ok(event) => event,
                        Err(ConnectionError::ConnectionRefused(_)) => break End::Unauthorized,
                        Err(e) => break End::Lost(e.to_string()),
                    };
                    match event {
                        Event::Outgoing(Outgoing::Publish(pkid)) => {
                            if let Some(Sent::Telemetry) = order.pop_front() {
                                telemetry_pkids.push_back(pkid);
                            }
                        }
                        Event::Incoming(Packet::PubAck(ack)) => {
                            if let Some(pos) = telemetry_pkids.iter().position(|p| *p == ack.pkid) {
                                telemetry_pkids.remove(pos);
                                // PUBACKs arrive in order; the matching message is the oldest.
                                if pos < self.unacked.len() {
                                    let publish = self.unacked.remove(pos).expect("position checked");
                                    let _ = publish.done.send(Ok(()));
                                }
                            }
                        }
                        Event::Incoming(Packet::Publish(publish)) => {
                            if let Some(new_version) = self
                                .incoming(&client, &mut order, &mut pending, desired_version, publish)
                                .await
                            {
                                desired_version = new_version;
                            }
                        }
                        _ => {}
                    }
                }
                publish = self.telemetry.recv(), if can_take => {
                    let Some(publish) = publish else { break End::Shutdown };
                    let topic = topics::telemetry_topic(&device_id, &publish.message);
                    let body = publish.message.body.clone();
                    self.unacked.push_back(publish);
                    if let Err(e) = client.try_publish(topic, QoS::AtLeastOnce, false, body) {
                        break End::Lost(e.to_string());
                    }
                    order.push_back(Sent::Telemetry);
                }
                control = self.control.recv() => match control {
                    None | Some(Control::Shutdown) => {
                        let _ = client.try_disconnect();
                        // Let the DISCONNECT go out; unacked messages stay with the caller.
                        let _ = tokio::time::timeout(Duration::from_secs(2), async {
                            while eventloop.poll().await.is_ok() {}
                        }).await;
                        break End::Shutdown;
                    }
                    Some(Control::Report { patch, done }) => {
                        let rid = self.rid();
                        pending.insert(rid.clone(), Pending::Report(done));
                        let topic = format!("$iothub/twin/PATCH/properties/reported/?$rid={rid}");
                        if let Err(e) = client.try_publish(topic, QoS::AtMostOnce, false, patch.to_string()) {
                            break End::Lost(e.to_string());
                        }
                        order.push_back(Sent::Other);
                    }
                    Some(Control::MethodResponse { rid, status, payload }) => {
                        let topic = format!("$iothub/methods/res/{status}/?$rid={rid}");
                        if let Err(e) = client.try_publish(topic, QoS::AtMostOnce, false, payload.to_string()) {
                            break End::Lost(e.to_string());
                        }
                        order.push_back(Sent::Other);
                    }
                },
                _ = tokio::time::sleep_until(renew_at) => {
                    tracing::info!("renewing the hub SAS token");
                    let _ = client.try_disconnect();
                    let _ = tokio::time::timeout(Duration::from_secs(2), async {
                        while eventloop.poll().await.is_ok() {}
                    }).await;
                    break End::Renew;
                }
            }
        };
        self.params.desired_version = desired_version;
        for (_, waiter) in pending {
            if let Pending::Report(done) = waiter {
                let _ = done.send(Err(TwinError::Disconnected));
            }
        }
        end
    }

    /// Handles a publish from the hub; returns the new desired version when it moved.
    async fn incoming(
        &mut self,
        client: &AsyncClient,
        order: &mut VecDeque<Sent>,
        pending: &mut HashMap<String, Pending>,
        desired_version: u64,
        publish: rumqttc::Publish,
    ) -> Option<u64> {
        let json = || serde_json::from_slice::<Value>(&publish.payload).unwrap_or(Value::Null);
        match topics::classify(&self.params.device_id, &publish.topic) {
            Incoming::TwinResponse {
                status,
                rid,
                version,
            } => match pending.remove(&rid) {
                Some(Pending::Get) if status == 200 => {
                    let doc = json();
                    let mut desired = doc["desired"].as_object().cloned().unwrap_or_default();
                    let version = desired
                        .remove("$version")
                        .and_then(|v| v.as_u64())
                        .unwrap_or(0);
                    let mut reported = doc["reported"].as_object().cloned().unwrap_or_default();
                    reported.remove("$version");
                    self.emit(SessionEvent::Twin {
                        desired,
                        desired_version: version,
                        reported,
                    })
                    .await;
                    Some(version)
                }
                Some(Pending::Get) => {
                    tracing::warn!(status, "the hub refused the twin GET");
                    None
                }
                Some(Pending::Report(done)) => {
                    let result = if (200..300).contains(&status) {
                        Ok(version.unwrap_or(0))
                    } else {
                        Err(TwinError::Rejected {
                            status,
                            message: String::from_utf8_lossy(&publish.payload).into_owned(),
                        })
                    };
                    let _ = done.send(result);
                    None
                }
                None => None,
            },
            Incoming::DesiredPatch { version } => {
                let Some(version) = version else {
                    tracing::warn!(topic = %publish.topic, "desired patch without $version; ignored");
                    return None;
                };
                if version <= desired_version {
                    tracing::debug!(version, desired_version, "stale desired patch ignored");
                    return None;
                }
                if version > desired_version + 1 {
                    // A patch went missing: the full twin heals the gap.
                    tracing::info!(
                        version,
                        desired_version,
                        "desired version gap; fetching the full twin"
                    );
                    let rid = self.rid();
                    pending.insert(rid.clone(), Pending::Get);
                    if client
                        .try_publish(
                            format!("$iothub/twin/GET/?$rid={rid}"),
                            QoS::AtMostOnce,
                            false,
                            "",
                        )
                        .is_ok()
                    {
                        order.push_back(Sent::Other);
                    }
                    return None;
                }
                let Value::Object(mut patch) = json() else {
                    tracing::warn!(version, "desired patch is not a JSON object; ignored");
                    return None;
                };
                patch.remove("$version");
                self.emit(SessionEvent::DesiredPatch { version, patch })
                    .await;
                Some(version)
            }
            Incoming::Method { name, rid } => {
                let payload = if publish.payload.iter().all(u8::is_ascii_whitespace) {
                    Value::Null
                } else {
                    json()
                };
                self.emit(SessionEvent::Method { name, rid, payload }).await;
                None
            }
            Incoming::C2d { properties } => {
                self.emit(SessionEvent::CloudToDevice {
                    body: publish.payload.clone(),
                    properties,
                })
                .await;
                None
            }
            Incoming::Unknown => {
                tracing::debug!(topic = %publish.topic, "ignoring a publish on an unknown topic");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
        let delays: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(500) && delays[0] <= Duration::from_secs(1));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(10)));
        assert!(
            delays[7] >= Duration::from_secs(5),
            "capped at 10 s, at least half of it"
        );
        b.reset();
        assert!(b.next_delay() <= Duration::from_secs(1));
    }
}
