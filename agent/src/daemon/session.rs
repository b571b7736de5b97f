//! `Phase::Session`: one hub session with the current assignment, and everything that reaches
//! the daemon while it runs (session events, plugin changes, commands), until one of them ends it.

use std::time::Duration;

use serde_json::{Value, json};

use super::certificate::CERTIFICATE_CHECK_EVERY;
use super::lifecycle::{Event, Lifecycle, Phase};
use super::status::{ConnectionState, RouteMemoryStatus};
use super::{Command, Daemon};
use crate::hub::{self, HubParams, SessionEvent, SessionHandle};
use crate::provisioning::DeviceIdentity;
use crate::state::ProvisioningCache;
use crate::system::systemd;
use crate::util::time::now_rfc3339;

/// How often counters (published, dropped) reach the twin at most.
const COUNTERS_EVERY: Duration = Duration::from_secs(60);
/// A burst of plugin changes (plugins starting, a crash loop) is coalesced into one update.
const PLUGIN_CHANGES_SETTLE: Duration = Duration::from_millis(200);
/// How long a stopping session may take to say goodbye.
const SESSION_STOP: Duration = Duration::from_secs(5);

impl Daemon {
    /// Runs a hub session until something ends it, and tells the lifecycle what did.
    pub(super) async fn session(&mut self, life: &mut Lifecycle) {
        let identity = self.identity.clone().expect("Start loads the identity");
        let assignment = self
            .assignment
            .clone()
            .expect("a session follows an assignment");
        let fingerprint = self.config.provisioning_fingerprint();
        self.status.update(|s| {
            s.fingerprint = Some(fingerprint);
            s.hub = Some(assignment.hub.clone());
            s.device_id = Some(assignment.device_id.clone());
            s.connection = ConnectionState::Connecting;
        });
        let (session, mut events, task) = hub::spawn(self.hub_params(&identity, &assignment));
        let _ = self.sessions.send(Some(session.clone()));

        let mut counters =
            tokio::time::interval_at(tokio::time::Instant::now() + COUNTERS_EVERY, COUNTERS_EVERY);
        let mut certificate_check = tokio::time::interval_at(
            tokio::time::Instant::now() + CERTIFICATE_CHECK_EVERY,
            CERTIFICATE_CHECK_EVERY,
        );
        let plugin_changes = self.plugins.changes();
        let mut connected = false;
        let end = loop {
            tokio::select! {
                event = events.recv() => {
                    let Some(event) = event else { break Event::SessionEnded };
                    if let Some(end) = self.session_event(event, &session, &mut connected, life).await {
                        break end;
                    }
                }
                _ = plugin_changes.notified() => {
                    self.status.update(|s| s.plugins = self.plugins.snapshot());
                    // Only while connected: a reconnect reports everything with the twin.
                    if connected {
                        tokio::time::sleep(PLUGIN_CHANGES_SETTLE).await;
                        self.report_changes(&session).await;
                    }
                }
                _ = counters.tick(), if connected => self.report_changes(&session).await,
                _ = certificate_check.tick() => {
                    self.check_certificate();
                    if connected {
                        self.report_changes(&session).await;
                    }
                }
                command = self.commands.recv() => {
                    if let Some(end) = self.session_command(command) {
                        break end;
                    }
                }
            }
        };
        session.shutdown();
        let _ = tokio::time::timeout(SESSION_STOP, task).await;
        if let (Event::Unauthorized, Phase::Wait { delay, .. }) = (end, life.on(end)) {
            tracing::warn!(hub = %assignment.hub, ?delay, "the hub refused the device credentials; reprovisioning");
        }
    }

    fn hub_params(&self, identity: &DeviceIdentity, assignment: &ProvisioningCache) -> HubParams {
        let hub = &self.config.hub;
        HubParams {
            hub: assignment.hub.clone(),
            device_id: assignment.device_id.clone(),
            port: hub.dial_port(),
            websocket: hub.websocket(),
            proxy: crate::provisioning::proxy_route(&self.config, &assignment.hub),
            auto: self.auto_route.clone(),
            credential: identity.credential.clone(),
            tls: identity.tls.clone(),
            keep_alive: hub.keep_alive,
            sas_ttl: hub.sas_ttl,
            renew_before: hub.renew_before,
            backoff_max: hub.reconnect_backoff_max,
            max_message_size: hub.max_message_size as usize,
            inflight: hub.inflight,
            desired_version: self.twin.desired_version,
            model_id: self.config.provisioning.model_id.clone(),
        }
    }

    /// Handles one event of the session; returns the event that ends the session, if it does.
    async fn session_event(
        &mut self,
        event: SessionEvent,
        session: &SessionHandle,
        connected: &mut bool,
        life: &mut Lifecycle,
    ) -> Option<Event> {
        match event {
            SessionEvent::Connected => {
                *connected = true;
                life.on(Event::Connected);
                let websocket = match &self.auto_route {
                    Some(auto) => auto.websocket(),
                    None => self.config.hub.websocket(),
                };
                let memory = self.auto_route.as_ref().and_then(|auto| auto.remembered());
                self.status.update(|s| {
                    s.connection = ConnectionState::Connected;
                    s.last_error = None;
                    s.route = Some(crate::mqtt::route_name(websocket));
                    s.route_memory = memory.as_ref().map(RouteMemoryStatus::from_memory);
                });
                systemd::status(&self.status.line());
            }
            SessionEvent::Disconnected { reason } => {
                *connected = false;
                self.status.update(|s| {
                    s.connection = ConnectionState::Connecting;
                    s.last_error = Some(reason);
                });
                systemd::status(&self.status.line());
            }
            SessionEvent::Unauthorized => {
                self.status.update(|s| {
                    s.last_error = Some("hub refused the credentials (not authorized)".into())
                });
                return Some(Event::Unauthorized);
            }
            SessionEvent::Twin {
                desired,
                desired_version,
                reported,
            } => {
                self.twin_received(session, desired, desired_version, reported)
                    .await
            }
            SessionEvent::DesiredPatch { version, patch } => {
                self.desired_patch(session, version, patch).await
            }
            SessionEvent::Method { name, rid, payload } => {
                let (code, answer) = self.direct_method(&name, payload);
                tracing::info!(method = %name, status = code, "direct method");
                session.respond_to_method(&rid, code, answer);
            }
            SessionEvent::CloudToDevice { body, properties } => {
                // Neither the body nor the properties are logged: they are the sender's data.
                let message_id = properties
                    .iter()
                    .find(|(k, _)| k == "$.mid")
                    .map_or("", |(_, v)| v.as_str());
                tracing::warn!(
                    message_id,
                    bytes = body.len(),
                    "cloud-to-device message not completed: no plugin takes C2D messages yet; \
                     the hub keeps it and delivers it again on the next connection"
                );
            }
        }
        None
    }

    /// The built-in direct methods: status code and answer.
    fn direct_method(&self, name: &str, payload: Value) -> (u16, Value) {
        match name {
            "ping" => (
                200,
                json!({"pong": now_rfc3339(), "version": env!("CARGO_PKG_VERSION"), "echo": payload}),
            ),
            "reprovision" => {
                let _ = self.commands_tx.send(Command::Reprovision);
                (202, json!({"status": "reprovisioning"}))
            }
            other => (
                404,
                json!({"error": format!("unknown method '{other}' (built-in: ping, reprovision)")}),
            ),
        }
    }

    /// A command that arrived during the session; returns the event that ends the session.
    fn session_command(&mut self, command: Option<Command>) -> Option<Event> {
        match command {
            None | Some(Command::Shutdown) => Some(Event::Shutdown),
            Some(Command::Reprovision) => {
                tracing::info!("reprovisioning on request");
                Some(Event::Reprovision)
            }
            // A new fingerprint makes the cache stale: the next Start registers with DPS.
            Some(Command::Reload(config)) => Some(self.reload(*config)),
        }
    }
}
