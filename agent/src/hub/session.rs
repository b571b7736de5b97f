//! The task behind a [`super::SessionHandle`]: one MQTT connection at a time, reconnecting forever.
//!
//! Per connection: CONNECT with a fresh SAS token, SUBSCRIBE, and once the SUBACK is in, GET the
//! twin; then telemetry, reported patches and method answers go out while desired patches,
//! method calls and C2D come in. The connection ends on loss, on refusal, on shutdown, or on
//! purpose shortly before the token expires (renewal). Telemetry sent but not acknowledged
//! survives the end of a connection and is sent again, in order, on the next one.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, Outgoing, Packet, QoS, SubscribeReasonCode};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::topics::{self, Incoming};
use super::{HubParams, PublishError, SessionEvent, TwinError};
use crate::identity::Credential;
use crate::identity::keys::sas_token;
use crate::message::TelemetryMessage;
use crate::mqtt::{self, ConnectOptions};
use crate::util::backoff::Backoff;

/// Requests from the handle other than telemetry.
pub(super) enum Control {
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

/// A telemetry message and whom to tell when the hub acknowledged it.
pub(super) struct Publish {
    pub message: TelemetryMessage,
    pub done: oneshot::Sender<Result<(), PublishError>>,
}

/// What a publish handed to rumqttc stands for, so its packet id can be told apart when rumqttc
/// reports it going out (`Outgoing::Publish(pkid)`, in the order of the requests).
enum Sent {
    Telemetry,
    Other,
}

/// A twin request waiting for its `$iothub/twin/res/…` answer, by `$rid`.
enum Pending {
    /// A full twin GET: the answer becomes `SessionEvent::Twin`.
    Get,
    Report(oneshot::Sender<Result<u64, TwinError>>),
}

/// Why a connection ended.
enum End {
    Renew,
    Lost(String),
    Unauthorized,
    Shutdown,
}

/// The hub's side of a connection, as seen from one connection's loop.
struct Link {
    client: AsyncClient,
    order: VecDeque<Sent>,
    /// Packet ids of telemetry on the wire, oldest first: index i is `Session::unacked[i]`.
    telemetry_pkids: VecDeque<u16>,
    pending: HashMap<String, Pending>,
    /// A failed twin GET is tried again at this time.
    twin_retry_at: Option<Instant>,
    twin_failures: u32,
}

impl Link {
    fn publish(
        &mut self,
        topic: String,
        qos: QoS,
        payload: impl Into<bytes::Bytes>,
        kind: Sent,
    ) -> Result<(), String> {
        self.client
            .try_publish(topic, qos, false, payload.into())
            .map_err(|e| format!("cannot queue a publish: {e}"))?;
        self.order.push_back(kind);
        Ok(())
    }

    fn get_twin(&mut self, rid: String) -> Result<(), String> {
        self.pending.insert(rid.clone(), Pending::Get);
        self.publish(
            format!("$iothub/twin/GET/?$rid={rid}"),
            QoS::AtMostOnce,
            "",
            Sent::Other,
        )
    }

    fn twin_get_pending(&self) -> bool {
        self.pending.values().any(|p| matches!(p, Pending::Get))
    }
}

/// When to reconnect with a fresh token: `renew_before` ahead of expiry. A pair where
/// `renew_before` is not shorter than the lifetime renews at half the lifetime instead of in a
/// loop; never more often than once a second.
pub(super) fn renew_after(ttl: Duration, renew_before: Duration) -> Duration {
    let after = if renew_before < ttl {
        ttl - renew_before
    } else {
        ttl / 2
    };
    after.max(Duration::from_secs(1))
}

/// The pause before the next twin GET after `failures` failed ones: 2 s, 4 s, … up to a minute.
fn twin_retry_delay(failures: u32) -> Duration {
    Duration::from_secs(2u64.saturating_pow(failures.min(6))).min(Duration::from_secs(60))
}

pub(super) struct Session {
    pub params: HubParams,
    pub events: mpsc::Sender<SessionEvent>,
    pub telemetry: mpsc::Receiver<Publish>,
    pub control: mpsc::UnboundedReceiver<Control>,
    /// Telemetry handed to the hub and not yet acknowledged, oldest first. Survives reconnects.
    pub unacked: VecDeque<Publish>,
    pub next_rid: u64,
    /// When the current connection got its CONNACK.
    pub connected_at: Option<Instant>,
}

impl Session {
    pub async fn run(mut self) {
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
                    tracing::warn!(hub = %self.params.hub, device = %self.params.device_id, "the hub refused the device's credentials");
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
        let deadline = Instant::now() + delay;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return false,
                control = self.control.recv() => match control {
                    None | Some(Control::Shutdown) => return true,
                    Some(Control::Report { done, .. }) => {
                        let _ = done.send(Err(TwinError::Disconnected));
                    }
                    // The hub times the call out; nothing to answer on.
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

    fn connect_options(&self) -> Result<ConnectOptions, String> {
        let p = &self.params;
        let password = match &p.credential {
            Credential::Sas(signer) => {
                let expiry = crate::util::time::unix_now() + p.sas_ttl.as_secs();
                let resource = format!("{}/devices/{}", p.hub, p.device_id);
                sas_token(signer.as_ref(), &resource, expiry, None)
                    .map_err(|e| format!("cannot sign the hub token: {e}"))?
            }
            Credential::X509 { .. } => String::new(),
        };
        Ok(ConnectOptions {
            client_id: p.device_id.clone(),
            host: p.hub.clone(),
            port: p.port,
            username: format!(
                "{}/{}/?api-version=2021-04-12&DeviceClientType=hubagent%2F{}",
                p.hub,
                p.device_id,
                env!("CARGO_PKG_VERSION")
            ),
            password,
            tls: p.tls.clone(),
            keep_alive: p.keep_alive,
            clean_session: false,
            // Incoming: C2D and twin documents; outgoing: a telemetry message plus its topic.
            max_packet_size: (512 * 1024, p.max_message_size + 64 * 1024),
            inflight: p.inflight.max(1),
            request_capacity: usize::from(p.inflight) * 2 + 64,
            // C2D is completed by our PUBACK: only after the daemon has the message.
            manual_acks: true,
        })
    }

    /// One connection, from CONNECT to its end.
    async fn connection(&mut self) -> End {
        let options = match self.connect_options() {
            Ok(o) => o,
            Err(e) => return End::Lost(e),
        };
        let (client, mut eventloop) = mqtt::client(&options);
        // SAS tokens expire: reconnect with a fresh one before the hub cuts us off. A certificate
        // does not expire with the connection.
        let renew_at = matches!(self.params.credential, Credential::Sas(_))
            .then(|| Instant::now() + renew_after(self.params.sas_ttl, self.params.renew_before));

        match mqtt::wait_connack(&mut eventloop).await {
            Ok(()) => {}
            Err(e) if e.is_auth_refusal() => return End::Unauthorized,
            Err(e) => return End::Lost(e.to_string()),
        }
        tracing::info!(hub = %self.params.hub, device = %self.params.device_id, "connected to the hub");
        self.connected_at = Some(Instant::now());
        self.emit(SessionEvent::Connected).await;

        let device_id = self.params.device_id.clone();
        let inflight_limit = usize::from(self.params.inflight).max(1);
        let mut desired_version = self.params.desired_version;
        let mut link = Link {
            client: client.clone(),
            order: VecDeque::new(),
            telemetry_pkids: VecDeque::new(),
            pending: HashMap::new(),
            twin_retry_at: None,
            twin_failures: 0,
        };

        let filters = subscriptions(&device_id);
        if let Err(e) = client.try_subscribe_many(
            filters
                .iter()
                .map(|t| rumqttc::SubscribeFilter::new(t.clone(), QoS::AtLeastOnce)),
        ) {
            return End::Lost(e.to_string());
        }
        // Resend what the previous connection did not get acknowledged, in the original order.
        for publish in &self.unacked {
            let topic = topics::telemetry_topic(&device_id, &publish.message);
            let body = publish.message.body.clone();
            if let Err(e) = link.publish(topic, QoS::AtLeastOnce, body, Sent::Telemetry) {
                return End::Lost(e);
            }
        }

        let end = loop {
            let can_take = self.unacked.len() < inflight_limit;
            let twin_retry = async {
                match link.twin_retry_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let renew = async {
                match renew_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                event = eventloop.poll() => {
                    let event = match event {
                        Ok(event) => event,
                        Err(e) => break End::Lost(e.to_string()),
                    };
                    if self.track(&mut link, &event) {
                        continue;
                    }
                    match event {
                        Event::Incoming(Packet::SubAck(ack)) => {
                            for (filter, code) in filters.iter().zip(&ack.return_codes) {
                                if matches!(code, SubscribeReasonCode::Failure) {
                                    tracing::warn!(%filter, "the hub refused a subscription");
                                }
                            }
                            // Twin answers go only to subscribers: the GET waits for the SUBACK.
                            let rid = self.rid();
                            if let Err(e) = link.get_twin(rid) {
                                break End::Lost(e);
                            }
                        }
                        Event::Incoming(Packet::Publish(publish)) => {
                            if let Err(e) = self.incoming(&mut link, &mut desired_version, &publish).await {
                                break End::Lost(e);
                            }
                            // Handled (the event is with the daemon): now the hub may forget it.
                            let _ = link.client.try_ack(&publish);
                        }
                        _ => {}
                    }
                }
                publish = self.telemetry.recv(), if can_take => {
                    let Some(publish) = publish else { break End::Shutdown };
                    let topic = topics::telemetry_topic(&device_id, &publish.message);
                    let body = publish.message.body.clone();
                    // Kept before sending: if the publish cannot go out now, the next connection sends it.
                    self.unacked.push_back(publish);
                    if let Err(e) = link.publish(topic, QoS::AtLeastOnce, body, Sent::Telemetry) {
                        break End::Lost(e);
                    }
                }
                control = self.control.recv() => match control {
                    None | Some(Control::Shutdown) => {
                        // Unacked messages stay with their callers (they see `Stopped`).
                        self.close(&mut link, &mut eventloop).await;
                        break End::Shutdown;
                    }
                    Some(Control::Report { patch, done }) => {
                        let rid = self.rid();
                        link.pending.insert(rid.clone(), Pending::Report(done));
                        let topic = format!("$iothub/twin/PATCH/properties/reported/?$rid={rid}");
                        if let Err(e) = link.publish(topic, QoS::AtMostOnce, patch.to_string(), Sent::Other) {
                            break End::Lost(e);
                        }
                    }
                    Some(Control::MethodResponse { rid, status, payload }) => {
                        let topic = format!("$iothub/methods/res/{status}/?$rid={rid}");
                        if let Err(e) = link.publish(topic, QoS::AtMostOnce, payload.to_string(), Sent::Other) {
                            break End::Lost(e);
                        }
                    }
                },
                _ = twin_retry => {
                    link.twin_retry_at = None;
                    let rid = self.rid();
                    if let Err(e) = link.get_twin(rid) {
                        break End::Lost(e);
                    }
                }
                _ = renew => {
                    tracing::info!("renewing the hub SAS token");
                    self.close(&mut link, &mut eventloop).await;
                    break End::Renew;
                }
            }
        };
        self.params.desired_version = desired_version;
        for (_, waiter) in link.pending {
            if let Pending::Report(done) = waiter {
                let _ = done.send(Err(TwinError::Disconnected));
            }
        }
        end
    }

    /// Pairs outgoing telemetry with its packet id and completes it on PUBACK. True when the
    /// event was one of those.
    fn track(&mut self, link: &mut Link, event: &Event) -> bool {
        match event {
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                if let Some(Sent::Telemetry) = link.order.pop_front() {
                    link.telemetry_pkids.push_back(*pkid);
                }
                true
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                if let Some(pos) = link.telemetry_pkids.iter().position(|p| *p == ack.pkid) {
                    link.telemetry_pkids.remove(pos);
                    if let Some(publish) = self.unacked.remove(pos) {
                        let _ = publish.done.send(Ok(()));
                    }
                }
                true
            }
            _ => false,
        }
    }

    /// Ends the connection on purpose: DISCONNECT goes out after what is already queued, and
    /// PUBACKs arriving meanwhile still complete their messages (fewer duplicates after the
    /// reconnect). Publishes from the hub arriving now are not acknowledged, so the hub sends
    /// them again on the next connection. Bounded: a dead connection does not hold us up.
    async fn close(&mut self, link: &mut Link, eventloop: &mut rumqttc::EventLoop) {
        if link.client.try_disconnect().is_err() {
            return;
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Ok(event) = eventloop.poll().await {
                self.track(link, &event);
            }
        })
        .await;
    }

    /// Handles a publish from the hub. Errors end the connection.
    async fn incoming(
        &mut self,
        link: &mut Link,
        desired_version: &mut u64,
        publish: &rumqttc::Publish,
    ) -> Result<(), String> {
        let json = || serde_json::from_slice::<Value>(&publish.payload).unwrap_or(Value::Null);
        match topics::classify(&self.params.device_id, &publish.topic) {
            Incoming::TwinResponse {
                status,
                rid,
                version,
            } => match link.pending.remove(&rid) {
                Some(Pending::Get) if status == 200 => {
                    link.twin_failures = 0;
                    let (desired, version, reported) = split_twin(json());
                    *desired_version = version;
                    self.emit(SessionEvent::Twin {
                        desired,
                        desired_version: version,
                        reported,
                    })
                    .await;
                }
                Some(Pending::Get) => {
                    link.twin_failures += 1;
                    let delay = twin_retry_delay(link.twin_failures);
                    tracing::warn!(
                        status,
                        ?delay,
                        "the hub refused the twin GET; trying again later"
                    );
                    link.twin_retry_at = Some(Instant::now() + delay);
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
                }
                None => {}
            },
            Incoming::DesiredPatch { version } => {
                let Some(version) = version else {
                    tracing::warn!(topic = %publish.topic, "desired patch without $version; ignored");
                    return Ok(());
                };
                match next_desired(*desired_version, version) {
                    DesiredStep::Stale => {
                        tracing::debug!(
                            version,
                            current = *desired_version,
                            "stale desired patch ignored"
                        );
                    }
                    DesiredStep::Gap => {
                        // A patch went missing: the full twin heals the gap (one GET at a time).
                        if !link.twin_get_pending() && link.twin_retry_at.is_none() {
                            tracing::info!(
                                version,
                                current = *desired_version,
                                "desired version gap; fetching the full twin"
                            );
                            let rid = self.rid();
                            link.get_twin(rid)?;
                        }
                    }
                    DesiredStep::Apply => {
                        let Value::Object(mut patch) = json() else {
                            tracing::warn!(version, "desired patch is not a JSON object; ignored");
                            return Ok(());
                        };
                        patch.remove("$version");
                        *desired_version = version;
                        self.emit(SessionEvent::DesiredPatch { version, patch })
                            .await;
                    }
                }
            }
            Incoming::Method { name, rid } => {
                let payload = if publish.payload.iter().all(u8::is_ascii_whitespace) {
                    Value::Null
                } else {
                    json()
                };
                self.emit(SessionEvent::Method { name, rid, payload }).await;
            }
            Incoming::C2d { properties } => {
                self.emit(SessionEvent::CloudToDevice {
                    body: publish.payload.clone(),
                    properties,
                })
                .await;
            }
            Incoming::Unknown => {
                tracing::debug!(topic = %publish.topic, "ignoring a publish on an unknown topic");
            }
        }
        Ok(())
    }
}

/// The four subscriptions of a device session (docs/protocol.md §5).
fn subscriptions(device_id: &str) -> [String; 4] {
    [
        "$iothub/twin/res/#".to_string(),
        "$iothub/twin/PATCH/properties/desired/#".to_string(),
        "$iothub/methods/POST/#".to_string(),
        format!("devices/{device_id}/messages/devicebound/#"),
    ]
}

/// What to do with a desired patch of `version` when the agent has `current`.
#[derive(Debug, PartialEq)]
enum DesiredStep {
    /// Already applied (a duplicate or a patch older than the last full twin).
    Stale,
    /// The next one: apply it.
    Apply,
    /// One or more patches in between were missed.
    Gap,
}

fn next_desired(current: u64, version: u64) -> DesiredStep {
    if version <= current {
        DesiredStep::Stale
    } else if version == current + 1 {
        DesiredStep::Apply
    } else {
        DesiredStep::Gap
    }
}

/// A twin GET answer `{"desired": {…, "$version": n}, "reported": {…}}` → (desired, n, reported),
/// without the `$version` keys. Anything else in the document is ignored.
pub fn split_twin(doc: Value) -> (Map<String, Value>, u64, Map<String, Value>) {
    let mut desired = doc["desired"].as_object().cloned().unwrap_or_default();
    let version = desired
        .remove("$version")
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    let mut reported = doc["reported"].as_object().cloned().unwrap_or_default();
    reported.remove("$version");
    (desired, version, reported)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn desired_patches_apply_in_version_order() {
        assert_eq!(next_desired(4, 5), DesiredStep::Apply);
        assert_eq!(next_desired(4, 4), DesiredStep::Stale);
        assert_eq!(next_desired(4, 2), DesiredStep::Stale);
        assert_eq!(next_desired(4, 7), DesiredStep::Gap);
        assert_eq!(next_desired(0, 1), DesiredStep::Apply);
    }

    #[test]
    fn twin_documents_split_into_sections_without_versions() {
        let (desired, version, reported) = split_twin(json!({
            "desired": {"interval": "5s", "$version": 9},
            "reported": {"agent": {"v": 1}, "$version": 3}
        }));
        assert_eq!(version, 9);
        assert_eq!(Value::Object(desired), json!({"interval": "5s"}));
        assert_eq!(Value::Object(reported), json!({"agent": {"v": 1}}));
        let (desired, version, reported) = split_twin(json!({}));
        assert!(desired.is_empty() && reported.is_empty());
        assert_eq!(version, 0);
    }

    #[test]
    fn renewal_happens_ahead_of_expiry_and_never_in_a_loop() {
        let hour = Duration::from_secs(3600);
        assert_eq!(
            renew_after(hour, Duration::from_secs(600)),
            Duration::from_secs(3000)
        );
        // renew_before ≥ ttl would mean "renew right away, forever": half the lifetime instead.
        assert_eq!(renew_after(hour, hour), Duration::from_secs(1800));
        assert_eq!(
            renew_after(Duration::ZERO, Duration::ZERO),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn twin_get_retries_slow_down_to_a_minute() {
        assert_eq!(twin_retry_delay(1), Duration::from_secs(2));
        assert_eq!(twin_retry_delay(2), Duration::from_secs(4));
        assert_eq!(twin_retry_delay(30), Duration::from_secs(60));
    }

    #[test]
    fn subscriptions_cover_twin_methods_and_this_device_c2d() {
        let filters = subscriptions("gw-1");
        assert!(filters.contains(&"devices/gw-1/messages/devicebound/#".to_string()));
        assert!(filters.contains(&"$iothub/twin/res/#".to_string()));
    }
}
