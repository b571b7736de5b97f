//! The task behind a [`super::SessionHandle`]: one MQTT connection at a time, reconnecting forever.
//!
//! Per connection: CONNECT with a fresh SAS token, SUBSCRIBE, and once the SUBACK is in, GET the
//! twin; then telemetry, reported patches and method answers go out while desired patches,
//! method calls and C2D come in. The connection ends on loss, on refusal, on shutdown, or on
//! purpose shortly before the token expires (renewal). Telemetry sent but not acknowledged
//! survives the end of a connection and is sent again, in order, on the next one.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, Outgoing, Packet, QoS, SubscribeReasonCode};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::util::time::{ClockWatch, clock_problem, sleep_until};

use super::probe;
use super::topics::{self, Incoming};
use super::twin::{DesiredStep, next_desired, split_twin};
use super::{HubParams, PublishError, SessionEvent, TwinError};
use crate::identity::credential::Credential;
use crate::identity::keys::sas_token;
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
    CompleteC2d(super::C2dToken),
    Shutdown,
}

/// A telemetry message and whom to tell when the hub acknowledged it.
/// A telemetry message as the session sends it: its topic (built once, by
/// `SessionHandle::enqueue`, which checks its size with it) and its body. The message itself
/// stays with the caller, which sends it again through the next session if this one ends first.
pub(super) struct Publish {
    pub topic: String,
    pub body: bytes::Bytes,
    pub done: oneshot::Sender<Result<(), PublishError>>,
}

/// What a publish handed to rumqttc stands for, so its packet id can be told apart when rumqttc
/// reports it going out (`Outgoing::Publish(pkid)`, in the order of the requests).
enum Sent {
    Telemetry,
    Other,
}

/// Whom to tell the outcome of a reported patch.
type ReportDone = oneshot::Sender<Result<u64, TwinError>>;

/// A twin request waiting for its `$iothub/twin/res/…` answer, by `$rid`.
enum Pending {
    /// A full twin GET: the answer becomes `SessionEvent::Twin`.
    Get,
    /// A reported patch; kept whole so that a throttled one (429) can be sent again.
    Report {
        patch: Value,
        done: ReportDone,
        attempts: u32,
    },
}

/// Why a connection ended.
enum End {
    Renew,
    Lost(String),
    /// The hub answered the CONNECT with CONNACK 3, "server unavailable".
    Unavailable(String),
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
    /// Reported patches the hub throttled (429), sent again at `report_retry_at`.
    report_retries: Vec<(Value, ReportDone, u32)>,
    report_retry_at: Option<Instant>,
    /// When to reconnect with a fresh SAS token; `None` for a certificate, which does not expire
    /// with the connection.
    renew_at: Option<Instant>,
    /// This connection's number (see `Session::connections`).
    connection: u64,
    /// One timer for the three above, set to the earliest (`timer_at`). Kept across the steps
    /// of the connection: a timer made afresh at each step (about three per message) was
    /// registered with tokio's timer wheel and removed again every time.
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
    timer_at: Option<Instant>,
}

impl Link {
    fn new(client: AsyncClient, renew_at: Option<Instant>, connection: u64) -> Link {
        Link {
            client,
            connection,
            order: VecDeque::new(),
            telemetry_pkids: VecDeque::new(),
            pending: HashMap::new(),
            twin_retry_at: None,
            twin_failures: 0,
            report_retries: Vec::new(),
            report_retry_at: None,
            renew_at,
            timer: Box::pin(tokio::time::sleep_until(Instant::now())),
            timer_at: None,
        }
    }

    /// Sets the timer to the earliest of the twin GET's retry, the throttled reports' retry and
    /// the token's renewal, when that changed since the last step.
    fn arm_timer(&mut self) {
        let next = [self.twin_retry_at, self.report_retry_at, self.renew_at]
            .into_iter()
            .flatten()
            .min();
        if next != self.timer_at {
            self.timer_at = next;
            if let Some(at) = next {
                self.timer.as_mut().reset(at);
            }
        }
    }

    fn publish(
        &mut self,
        topic: String,
        qos: QoS,
        payload: impl Into<bytes::Bytes>,
        kind: Sent,
    ) -> Result<(), String> {
        // `publish_bytes` takes the body as it is, shared with `Session::unacked`; `try_publish`
        // copied it (and the topic once more) for every message. Its channel has room for the
        // whole window and then some (`request_capacity`), so the send completes at its first
        // poll; a full channel is refused as `try_publish` refuses it.
        let send = self.client.publish_bytes(topic, qos, false, payload.into());
        let mut send = std::pin::pin!(send);
        let mut cx = Context::from_waker(Waker::noop());
        match send.as_mut().poll(&mut cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Err(format!("cannot queue a publish: {e}")),
            Poll::Pending => return Err("cannot queue a publish: rumqttc's queue is full".into()),
        }
        self.order.push_back(kind);
        Ok(())
    }

    fn publish_telemetry(&mut self, publish: &Publish) -> Result<(), String> {
        self.publish(
            publish.topic.clone(),
            QoS::AtLeastOnce,
            publish.body.clone(),
            Sent::Telemetry,
        )
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

    fn report(
        &mut self,
        rid: String,
        patch: Value,
        done: ReportDone,
        attempts: u32,
    ) -> Result<(), String> {
        let topic = format!("$iothub/twin/PATCH/properties/reported/?$rid={rid}");
        let payload = patch.to_string();
        self.pending.insert(
            rid,
            Pending::Report {
                patch,
                done,
                attempts,
            },
        );
        self.publish(topic, QoS::AtMostOnce, payload, Sent::Other)
    }

    fn twin_get_pending(&self) -> bool {
        self.pending.values().any(|p| matches!(p, Pending::Get))
    }

    /// The connection is gone: reported patches still waiting for their answer never get one.
    fn fail_pending_reports(self) {
        for (_, waiter) in self.pending {
            if let Pending::Report { done, .. } = waiter {
                let _ = done.send(Err(TwinError::Disconnected));
            }
        }
        for (_, done, _) in self.report_retries {
            let _ = done.send(Err(TwinError::Disconnected));
        }
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

/// A payload as JSON; `Null` when it is not JSON.
fn json_or_null(payload: &[u8]) -> Value {
    serde_json::from_slice(payload).unwrap_or(Value::Null)
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
    /// Connections made so far; the current one's number is in `connection` (0: none up).
    pub connections: u64,
    pub connection: Arc<AtomicU64>,
}

impl Session {
    pub async fn run(mut self) {
        let mut backoff = Backoff::new(Duration::from_secs(1), self.params.backoff_max);
        loop {
            self.connected_at = None;
            // A clock that fell back before this build was made (an RTC reset, a bad NTP answer)
            // dooms every attempt (certificates "not yet valid", tokens expired at birth): the
            // session ends and the daemon waits for the clock, as at boot. A live connection is
            // not ended for it: it is checked only before connecting again (after a drop, or
            // when the token is due for renewal).
            if clock_problem(std::time::SystemTime::now()).is_some() {
                tracing::info!(hub = %self.params.hub, "no connection attempt with the clock unset");
                self.emit(SessionEvent::ClockUnset).await;
                return;
            }
            let mut refused_by_hub = false;
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
                End::Lost(reason) => self.lost(reason).await,
                // A closed port is watched by the probe between long pauses (`super::probe`),
                // but a hub that refuses at the MQTT level can only be asked by an attempt: the
                // pauses after such a refusal stay short enough (`[hub]
                // unavailable_backoff_max`, 8 s by default) for the agent to be back within
                // seconds of the hub accepting again. Still one attempt per pause.
                End::Unavailable(reason) => {
                    refused_by_hub = true;
                    self.lost(reason).await;
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
            let delay = match refused_by_hub {
                true => backoff.next_delay_within(self.params.unavailable_backoff_max),
                false => backoff.next_delay(),
            };
            tracing::info!(
                hub = %self.params.hub,
                "next attempt to connect to the hub in {} s",
                delay.as_secs()
            );
            // The hub's port took the refused connection: no probe of it in this pause.
            if self.pause(delay, !refused_by_hub).await {
                return;
            }
        }
    }

    /// Waits `delay` while still answering control requests; true when asked to shut down. A
    /// long pause that begins with the hub's port unreachable ends early, once the port takes a
    /// TCP connection again (`super::probe`, unless `probe` is false: the port took the failed
    /// attempt); any pause ends when the wall clock steps (the
    /// failure may have been a certificate "not yet valid" by a clock NTP has just set).
    async fn pause(&mut self, delay: Duration, probe: bool) -> bool {
        let deadline = Instant::now() + delay;
        let clock = ClockWatch::start();
        let mut clock_look = tokio::time::interval(Duration::from_secs(1));
        clock_look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let target = probe::target(&self.params).filter(|_| probe && delay >= probe::MIN_PAUSE);
        // The first probe at once: it tells whether the route was down at all.
        let mut next_probe = target.as_ref().map(|_| Instant::now());
        let mut seen_unreachable = false;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return false,
                _ = clock_look.tick() => if let Some(step) = clock.stepped() {
                    tracing::info!(hub = %self.params.hub, step = %step, "the wall clock stepped; connecting now");
                    return false;
                },
                reachable = async {
                    sleep_until(next_probe).await;
                    let (host, port) = target.as_ref().expect("probed only with a target");
                    probe::reachable(host, *port).await
                } => match (reachable, seen_unreachable) {
                    (false, _) => {
                        seen_unreachable = true;
                        next_probe = Some(Instant::now() + probe::next_in());
                    }
                    (true, true) => {
                        tracing::info!(hub = %self.params.hub, "the hub's port is reachable again: connecting now");
                        return false;
                    }
                    // Reachable from the start: the hub itself failed the attempt, and the
                    // backoff is its due.
                    (true, false) => next_probe = None,
                },
                control = self.control.recv() => match control {
                    None | Some(Control::Shutdown) => return true,
                    Some(Control::Report { done, .. }) => {
                        let _ = done.send(Err(TwinError::Disconnected));
                    }
                    // The hub times the call out; nothing to answer on.
                    Some(Control::MethodResponse { .. }) => {}
                    // Its connection is gone: the hub delivers it again.
                    Some(Control::CompleteC2d(_)) => {}
                },
            }
        }
    }

    async fn lost(&self, reason: String) {
        // EMFILE and its kind name the open-file limit, so the operator knows what to raise.
        let limit = crate::util::fs::limit_hint_in(&reason);
        tracing::warn!(hub = %self.params.hub, %reason, "hub connection lost{limit}");
        self.emit(SessionEvent::Disconnected { reason }).await;
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
            websocket: p.websocket,
            proxy: p.proxy.clone(),
            auto: p.auto.clone(),
            username: username(&p.hub, &p.device_id, p.model_id.as_deref()),
            password,
            tls: p.tls.clone(),
            keep_alive: p.keep_alive,
            clean_session: false,
            // Incoming: C2D and twin documents; outgoing: a telemetry message plus its topic.
            max_packet_size: (512 * 1024, p.max_message_size + 64 * 1024),
            inflight: p.inflight.max(1),
            request_capacity: usize::from(p.inflight) * 2 + 64,
            // Our PUBACK completes a C2D message at the hub: the session decides when (never,
            // until a plugin can take it).
            manual_acks: true,
        })
    }

    /// One connection, from CONNECT to its end.
    async fn connection(&mut self) -> End {
        let (mut link, mut eventloop) = match self.connect().await {
            Ok(connected) => connected,
            Err(end) => return end,
        };
        let end = loop {
            if let Err(end) = self.step(&mut link, &mut eventloop).await {
                break end;
            }
        };
        // C2D messages of this connection can no longer be completed: the hub has them.
        self.connection.store(0, Ordering::SeqCst);
        link.fail_pending_reports();
        end
    }

    /// CONNECT with a fresh token, SUBSCRIBE, and send again, in the original order, what the
    /// previous connection did not get acknowledged. The twin GET waits for the SUBACK
    /// (`on_event`).
    async fn connect(&mut self) -> Result<(Link, EventLoop), End> {
        let options = self.connect_options().map_err(End::Lost)?;
        // SAS tokens expire: reconnect with a fresh one before the hub cuts us off. A certificate
        // does not expire with the connection.
        let renew_at = matches!(self.params.credential, Credential::Sas(_))
            .then(|| Instant::now() + renew_after(self.params.sas_ttl, self.params.renew_before));

        let (client, eventloop) = match mqtt::connect(&options).await {
            Ok(connected) => connected,
            Err(e) if e.is_auth_refusal() => return Err(End::Unauthorized),
            Err(e) if e.is_server_unavailable() => return Err(End::Unavailable(e.to_string())),
            Err(e) => return Err(End::Lost(e.to_string())),
        };
        tracing::info!(hub = %self.params.hub, device = %self.params.device_id, "connected to the hub");
        self.connected_at = Some(Instant::now());
        self.emit(SessionEvent::Connected).await;

        self.connections += 1;
        self.connection.store(self.connections, Ordering::SeqCst);
        let mut link = Link::new(client, renew_at, self.connections);
        let filters = subscriptions(&self.params.device_id);
        link.client
            .try_subscribe_many(
                filters
                    .into_iter()
                    .map(|t| rumqttc::SubscribeFilter::new(t, QoS::AtLeastOnce)),
            )
            .map_err(|e| End::Lost(e.to_string()))?;
        for publish in &self.unacked {
            link.publish_telemetry(publish).map_err(End::Lost)?;
        }
        Ok((link, eventloop))
    }

    /// Waits for what comes first (a packet, telemetry to send, a request from the handle, the
    /// twin GET's retry, the token's renewal) and handles it. `Err` ends the connection.
    async fn step(&mut self, link: &mut Link, eventloop: &mut EventLoop) -> Result<(), End> {
        let can_take = self.unacked.len() < usize::from(self.params.inflight).max(1);
        link.arm_timer();
        tokio::select! {
            event = eventloop.poll() => {
                let event = event.map_err(|e| End::Lost(e.to_string()))?;
                self.on_event(link, event).await
            }
            publish = self.telemetry.recv(), if can_take => match publish {
                Some(publish) => self.send_telemetry(link, publish),
                None => Err(End::Shutdown),
            },
            control = self.control.recv() => self.on_control(link, eventloop, control).await,
            _ = &mut link.timer, if link.timer_at.is_some() => self.on_timer(link, eventloop).await,
        }
    }

    /// The link's timer fired: does what is due.
    async fn on_timer(&mut self, link: &mut Link, eventloop: &mut EventLoop) -> Result<(), End> {
        // Set again at the next step even if nothing below was due yet: a fired timer stays
        // ready until it is reset.
        link.timer_at = None;
        let now = Instant::now();
        let due = |at: Option<Instant>| at.is_some_and(|at| at <= now);
        if due(link.twin_retry_at) {
            link.twin_retry_at = None;
            let rid = self.rid();
            link.get_twin(rid).map_err(End::Lost)?;
        }
        if due(link.report_retry_at) {
            link.report_retry_at = None;
            for (patch, done, attempts) in std::mem::take(&mut link.report_retries) {
                let rid = self.rid();
                link.report(rid, patch, done, attempts).map_err(End::Lost)?;
            }
        }
        if due(link.renew_at) {
            tracing::info!("renewing the hub SAS token");
            self.close(link, eventloop).await;
            return Err(End::Renew);
        }
        Ok(())
    }

    /// Handles one event of the connection's event loop.
    async fn on_event(&mut self, link: &mut Link, event: Event) -> Result<(), End> {
        if self.track(link, &event) {
            return Ok(());
        }
        match event {
            Event::Incoming(Packet::SubAck(ack)) => {
                let filters = subscriptions(&self.params.device_id);
                for (filter, code) in filters.iter().zip(&ack.return_codes) {
                    if matches!(code, SubscribeReasonCode::Failure) {
                        tracing::warn!(%filter, "the hub refused a subscription");
                    }
                }
                // Twin answers go only to subscribers: the GET waits for the SUBACK.
                let rid = self.rid();
                link.get_twin(rid).map_err(End::Lost)
            }
            Event::Incoming(Packet::Publish(publish)) => {
                let complete = self.incoming(link, &publish).await.map_err(End::Lost)?;
                // Handled (the event is with the daemon): now the hub may forget it. Not a C2D
                // message: its PUBACK completes it at the hub (the sender is told "delivered"),
                // so it waits for the daemon's `complete_c2d` once a plugin took it; until then
                // it stays with the hub (docs/protocol.md §5.3).
                if complete {
                    let _ = link.client.try_ack(&publish);
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Sends a message from the handle; it counts as unacknowledged until its PUBACK.
    fn send_telemetry(&mut self, link: &mut Link, publish: Publish) -> Result<(), End> {
        // Kept before sending: if the publish cannot go out now, the next connection sends it.
        self.unacked.push_back(publish);
        link.publish_telemetry(self.unacked.back().expect("pushed above"))
            .map_err(End::Lost)
    }

    /// Handles a request from the handle (`None`: the handle is gone).
    async fn on_control(
        &mut self,
        link: &mut Link,
        eventloop: &mut EventLoop,
        control: Option<Control>,
    ) -> Result<(), End> {
        match control {
            None | Some(Control::Shutdown) => {
                // Unacked messages stay with their callers (they see `Stopped`).
                self.close(link, eventloop).await;
                Err(End::Shutdown)
            }
            Some(Control::Report { patch, done }) => {
                let rid = self.rid();
                link.report(rid, patch, done, 0).map_err(End::Lost)
            }
            Some(Control::MethodResponse {
                rid,
                status,
                payload,
            }) => {
                let topic = format!("$iothub/methods/res/{status}/?$rid={rid}");
                link.publish(topic, QoS::AtMostOnce, payload.to_string(), Sent::Other)
                    .map_err(End::Lost)
            }
            Some(Control::CompleteC2d(token)) => {
                if token.connection != link.connection {
                    tracing::debug!(
                        "a C2D message of an earlier connection is not completed; the hub delivers it again"
                    );
                    return Ok(());
                }
                // Only the packet id and QoS matter to the PUBACK.
                let mut publish = rumqttc::Publish::new("", QoS::AtLeastOnce, Vec::<u8>::new());
                publish.pkid = token.pkid;
                link.client
                    .try_ack(&publish)
                    .map_err(|e| End::Lost(format!("cannot queue a PUBACK: {e}")))
            }
        }
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
    async fn close(&mut self, link: &mut Link, eventloop: &mut EventLoop) {
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

    /// Handles a publish from the hub; true when it may be acknowledged (a C2D message is not).
    /// Errors end the connection.
    async fn incoming(
        &mut self,
        link: &mut Link,
        publish: &rumqttc::Publish,
    ) -> Result<bool, String> {
        match topics::classify(&self.params.device_id, &publish.topic) {
            Incoming::TwinResponse {
                status,
                rid,
                version,
            } => {
                self.twin_response(link, status, &rid, version, &publish.payload)
                    .await;
            }
            Incoming::DesiredPatch {
                version: Some(version),
            } => self.desired_patch(link, version, &publish.payload).await?,
            Incoming::DesiredPatch { version: None } => {
                tracing::warn!(topic = %publish.topic, "desired patch without $version; ignored");
            }
            Incoming::Method { name, rid } => {
                let payload = if publish.payload.iter().all(u8::is_ascii_whitespace) {
                    Value::Null
                } else {
                    json_or_null(&publish.payload)
                };
                self.emit(SessionEvent::Method { name, rid, payload }).await;
            }
            Incoming::C2d { properties } => {
                self.emit(SessionEvent::CloudToDevice {
                    body: publish.payload.clone(),
                    properties,
                    token: super::C2dToken {
                        connection: link.connection,
                        pkid: publish.pkid,
                    },
                })
                .await;
                return Ok(false);
            }
            Incoming::Unknown => {
                tracing::debug!(topic = %publish.topic, "ignoring a publish on an unknown topic");
            }
        }
        Ok(true)
    }

    /// The hub's answer to the twin request `rid` (a GET or a reported patch).
    async fn twin_response(
        &mut self,
        link: &mut Link,
        status: u16,
        rid: &str,
        version: Option<u64>,
        payload: &[u8],
    ) {
        match link.pending.remove(rid) {
            Some(Pending::Get) if status == 200 => {
                link.twin_failures = 0;
                let (desired, version, reported) = split_twin(json_or_null(payload));
                self.params.desired_version = version;
                self.emit(SessionEvent::Twin {
                    desired,
                    desired_version: version,
                    reported,
                })
                .await;
            }
            // Any other answer, a throttled GET (429) included, is tried again later.
            Some(Pending::Get) => {
                link.twin_failures += 1;
                let delay = twin_retry_delay(link.twin_failures);
                tracing::warn!(
                    status,
                    delay = %humantime::format_duration(delay),
                    "the hub refused the twin GET; trying again later"
                );
                link.twin_retry_at = Some(Instant::now() + delay);
            }
            // The hub throttles twin operations with 429: the patch was not applied, so it is sent
            // again after a pause (2 s, 4 s, …; the daemon's REPORT_TIMEOUT bounds the wait).
            Some(Pending::Report {
                patch,
                done,
                attempts,
            }) if status == 429 => {
                let delay = twin_retry_delay(attempts + 1);
                tracing::warn!(
                    delay = %humantime::format_duration(delay),
                    "the hub throttled a reported patch; sending it again"
                );
                link.report_retries.push((patch, done, attempts + 1));
                link.report_retry_at
                    .get_or_insert_with(|| Instant::now() + delay);
            }
            Some(Pending::Report { done, .. }) => {
                let result = if (200..300).contains(&status) {
                    Ok(version.unwrap_or(0))
                } else {
                    Err(TwinError::Rejected {
                        status,
                        message: String::from_utf8_lossy(payload).into_owned(),
                    })
                };
                let _ = done.send(result);
            }
            None => {}
        }
    }

    /// A desired patch of `version`: the next one is applied, a stale one ignored, and a gap is
    /// healed with the full twin. Errors end the connection.
    async fn desired_patch(
        &mut self,
        link: &mut Link,
        version: u64,
        payload: &[u8],
    ) -> Result<(), String> {
        let current = self.params.desired_version;
        match next_desired(current, version) {
            DesiredStep::Stale => {
                tracing::debug!(version, current, "stale desired patch ignored");
            }
            DesiredStep::Gap => {
                // A patch went missing: the full twin heals the gap (one GET at a time).
                if !link.twin_get_pending() && link.twin_retry_at.is_none() {
                    tracing::info!(
                        version,
                        current,
                        "desired version gap; fetching the full twin"
                    );
                    let rid = self.rid();
                    link.get_twin(rid)?;
                }
            }
            DesiredStep::Apply => {
                let Value::Object(mut patch) = json_or_null(payload) else {
                    tracing::warn!(version, "desired patch is not a JSON object; ignored");
                    return Ok(());
                };
                patch.remove("$version");
                self.params.desired_version = version;
                self.emit(SessionEvent::DesiredPatch { version, patch })
                    .await;
            }
        }
        Ok(())
    }
}

/// The CONNECT username: `{hub}/{deviceId}/?api-version=…&DeviceClientType=…[&model-id=…]`, the
/// model id URL-encoded as Azure's SDKs send it (docs/protocol.md §5.1; `model-id` needs
/// api-version 2020-09-30 or later).
fn username(hub: &str, device_id: &str, model_id: Option<&str>) -> String {
    let mut username = format!(
        "{hub}/{device_id}/?api-version=2021-04-12&DeviceClientType=hubagent%2F{}",
        env!("CARGO_PKG_VERSION")
    );
    if let Some(model_id) = model_id {
        username.push_str("&model-id=");
        username.extend(percent_encoding::utf8_percent_encode(model_id, QUERY_VALUE));
    }
    username
}

/// What a query value keeps unencoded: RFC 3986's unreserved characters (EMB-C's username
/// encodes `:` and `;` of a DTMI and keeps `_`).
const QUERY_VALUE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The four subscriptions of a device session (docs/protocol.md §5).
fn subscriptions(device_id: &str) -> [String; 4] {
    [
        "$iothub/twin/res/#".to_string(),
        "$iothub/twin/PATCH/properties/desired/#".to_string(),
        "$iothub/methods/POST/#".to_string(),
        format!("devices/{device_id}/messages/devicebound/#"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn the_model_id_is_url_encoded_in_the_username_as_azure_sdks_send_it() {
        let plain = username("myiothub.azure-devices.net", "my_device", None);
        assert!(
            plain.starts_with("myiothub.azure-devices.net/my_device/?api-version=2021-04-12&"),
            "{plain}"
        );
        assert!(!plain.contains("model-id"), "{plain}");
        let with_model = username(
            "myiothub.azure-devices.net",
            "my_device",
            Some("dtmi:YOUR_COMPANY_NAME_HERE:sample_device;1"),
        );
        // EMB-C's test username ends the same way (docs/protocol.md §5.1).
        assert!(
            with_model.ends_with("&model-id=dtmi%3AYOUR_COMPANY_NAME_HERE%3Asample_device%3B1"),
            "{with_model}"
        );
    }

    #[test]
    fn subscriptions_cover_twin_methods_and_this_device_c2d() {
        let filters = subscriptions("gw-1");
        assert!(filters.contains(&"devices/gw-1/messages/devicebound/#".to_string()));
        assert!(filters.contains(&"$iothub/twin/res/#".to_string()));
    }
}
