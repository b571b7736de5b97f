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
//!
//! This file is the public face (parameters, events, the handle); `session` is the task, `topics`
//! the pure topic and property-bag code and `twin` the twin document's sections and versions.

mod probe;
mod session;
pub mod topics;
pub mod twin;

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};

pub use twin::{split_twin, within_hub_limits};

use crate::identity::credential::Credential;
use crate::message::TelemetryMessage;
use session::{Control, Publish, Session};

/// Everything the session needs, in plain values (the daemon builds it from the config).
#[derive(Clone)]
pub struct HubParams {
    pub hub: String,
    pub device_id: String,
    pub port: u16,
    /// MQTT inside a WebSocket (`[hub] transport = "websockets"`).
    pub websocket: bool,
    /// The HTTP proxy to tunnel through.
    pub proxy: Option<crate::mqtt::ProxyRoute>,
    /// `[hub] transport = "auto"` (then `port` and `websocket` are its memory's).
    pub auto: Option<Arc<crate::mqtt::AutoRoute>>,
    pub credential: Credential,
    pub tls: Arc<rustls::ClientConfig>,
    pub keep_alive: Duration,
    pub sas_ttl: Duration,
    pub renew_before: Duration,
    pub backoff_max: Duration,
    /// The backoff's cap after a CONNACK 3 refusal (`[hub] unavailable_backoff_max`).
    pub unavailable_backoff_max: Duration,
    pub max_message_size: usize,
    pub inflight: u16,
    /// The desired `$version` the agent already has (from twin.json), so stale patches are ignored.
    /// The session keeps it current across its reconnects.
    pub desired_version: u64,
    /// The IoT Plug and Play model id announced in CONNECT (`model-id=`), already checked.
    pub model_id: Option<String>,
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
    /// The wall clock reads a time before this build was made (`util::time::clock_problem`)
    /// when a connection was due: the session made no attempt and has ended. The daemon waits
    /// for the clock to be set, then starts a new session.
    ClockUnset,
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
    /// A C2D message. The session completes it (PUBACK) only when told to
    /// ([`SessionHandle::complete_c2d`]) on the connection it came on; otherwise the hub keeps
    /// it and delivers it again on the next connection.
    CloudToDevice {
        body: bytes::Bytes,
        properties: Vec<(String, String)>,
        token: C2dToken,
    },
}

/// Which C2D message to complete: its packet id on the connection it arrived on (a packet id
/// means nothing on another connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct C2dToken {
    connection: u64,
    pkid: u16,
}

/// The daemon's handle on the session task.
#[derive(Clone)]
pub struct SessionHandle {
    telemetry: mpsc::Sender<Publish>,
    control: mpsc::UnboundedSender<Control>,
    max_message_size: usize,
    device_id: String,
    /// The number of the connection that is up (0: none).
    connection: Arc<AtomicU64>,
}

impl SessionHandle {
    /// Completes a C2D message at the hub (its PUBACK). A message of a connection that has
    /// ended is not completed: the hub delivers it again.
    pub fn complete_c2d(&self, token: C2dToken) {
        let _ = self.control.send(Control::CompleteC2d(token));
    }

    /// Whether the connection a C2D message came on is still up (so it can still be completed).
    pub fn is_current(&self, token: &C2dToken) -> bool {
        self.connection.load(Ordering::SeqCst) == token.connection
    }

    /// Sends a telemetry message; resolves when the hub acknowledged it (PUBACK). While the hub is
    /// unreachable this waits; the message is never dropped by the session.
    pub async fn publish(&self, message: TelemetryMessage) -> Result<(), PublishError> {
        let acknowledged = self.enqueue(&message).await?;
        acknowledged.await.map_err(|_| PublishError::Stopped)?
    }

    /// Hands a message to the session (in call order) and returns what resolves on its PUBACK:
    /// callers that enqueue one message after another keep their order on the wire.
    pub async fn enqueue(
        &self,
        message: &TelemetryMessage,
    ) -> Result<oneshot::Receiver<Result<(), PublishError>>, PublishError> {
        let topic = topics::telemetry_topic(&self.device_id, message);
        let size = message.body.len() + topic.len();
        if size > self.max_message_size {
            return Err(PublishError::TooLarge {
                size,
                limit: self.max_message_size,
            });
        }
        let (done, result) = oneshot::channel();
        self.telemetry
            .send(Publish {
                topic,
                body: message.body.clone(),
                done,
            })
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
    let connection = Arc::new(AtomicU64::new(0));
    let handle = SessionHandle {
        telemetry: telemetry_tx,
        control: control_tx,
        max_message_size: params.max_message_size,
        device_id: params.device_id.clone(),
        connection: connection.clone(),
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
            connections: 0,
            connection,
        }
        .run(),
    );
    (handle, events_rx, task)
}
