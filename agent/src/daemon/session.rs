//! `Phase::Session`: one hub session with the current assignment, and everything that reaches
//! the daemon while it runs (session events, plugin changes, commands), until one of them ends it.

use std::time::Duration;

use serde_json::{Value, json};

use super::c2d::{self, Inbox};
use super::lifecycle::{Event, Lifecycle, Phase};
use super::renewal::Renewal;
use super::status::{ConnectionState, RouteMemoryStatus};
use super::{Command, Daemon};
use crate::hub::{self, HubParams, SessionEvent, SessionHandle};
use crate::plugins::calls::C2dMessage;
use crate::provisioning::dps::DpsError;
use crate::provisioning::{Assignment, DeviceIdentity};
use crate::state::ProvisioningCache;
use crate::system::systemd;
use crate::util::time::{clock_problem, now_rfc3339};

/// How often counters (published, dropped) reach the twin at most.
const COUNTERS_EVERY: Duration = Duration::from_secs(60);
/// A burst of plugin changes (plugins starting, a crash loop) is coalesced into one update.
const PLUGIN_CHANGES_SETTLE: Duration = Duration::from_millis(200);
/// How long a stopping session may take to say goodbye.
const SESSION_STOP: Duration = Duration::from_secs(5);
/// How often a running session looks at the wall clock (a clock fallen back to 1970 is said at
/// once, not only at the next connection attempt): one cheap read.
const CLOCK_LOOK: Duration = Duration::from_secs(1);

impl Daemon {
    /// Runs a hub session until something ends it, and tells the lifecycle what did.
    pub(super) async fn session(&mut self, life: &mut Lifecycle) {
        if !self.clock_set(life) {
            return;
        }
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
        let certificate_check = tokio::time::sleep(self.check_certificate());
        tokio::pin!(certificate_check);
        let plugin_changes = self.plugins.changes();
        let mut c2d_retry = tokio::time::interval(c2d::RETRY_EVERY);
        let mut inbox = Inbox::new();
        let mut connected = false;
        let mut renewal = Renewal::new(&self.config, &identity);
        let mut clock_look = tokio::time::interval(CLOCK_LOOK);
        let end = loop {
            tokio::select! {
                _ = clock_look.tick() => self.look_at_clock(),
                () = renewal.due() => renewal.start(&self.config, &identity, self.auto_route.clone()),
                outcome = renewal.finished() => {
                    if let Some(end) = self.renewal_finished(outcome, &mut renewal) {
                        break end;
                    }
                }
                event = events.recv() => {
                    let Some(event) = event else { break Event::SessionEnded };
                    if let SessionEvent::CloudToDevice { body, properties, token } = event {
                        let message = C2dMessage::from_topic(body.to_vec(), &properties);
                        inbox.arrived(&self.plugins, &session, message, token);
                        continue;
                    }
                    if let Some(end) = self.session_event(event, &session, &mut connected, life).await {
                        break end;
                    }
                }
                held = inbox.not_taken() => inbox.hold(held),
                _ = c2d_retry.tick(), if !inbox.is_empty() => inbox.retry(&self.plugins, &session),
                _ = plugin_changes.notified() => {
                    inbox.retry(&self.plugins, &session);
                    // Only while connected: a reconnect reports everything with the twin.
                    if connected {
                        tokio::time::sleep(PLUGIN_CHANGES_SETTLE).await;
                        self.report_changes(&session).await;
                    }
                }
                _ = counters.tick(), if connected => self.report_changes(&session).await,
                _ = &mut certificate_check => {
                    let next = self.check_certificate();
                    certificate_check.as_mut().reset(tokio::time::Instant::now() + next);
                    if connected {
                        self.report_changes(&session).await;
                    }
                }
                command = self.commands.recv() => {
                    // With an issued certificate, reprovisioning is a renewal beside the session.
                    if matches!(command, Some(Command::Reprovision)) && renewal.applies() {
                        tracing::info!("reprovisioning on request: renewing the issued certificate");
                        renewal.now();
                        continue;
                    }
                    if let Some(end) = self.session_command(command) {
                        break end;
                    }
                }
            }
        };
        session.shutdown();
        let _ = tokio::time::timeout(SESSION_STOP, task).await;
        if end == Event::Unauthorized && identity.other_key.is_some() {
            self.hub_refused_secondary = Some(identity.on_secondary);
        }
        if end == Event::ClockUnset {
            // The boot path: said once (unless `look_at_clock` said it), shown in the status,
            // and a wait that ends when the clock is set. Set again meanwhile: a new session.
            self.clock_set(life);
            return;
        }
        if let (Event::Unauthorized, Phase::Wait { delay, .. }) = (end, life.on(end)) {
            tracing::warn!(hub = %assignment.hub, delay = %humantime::format_duration(*delay), "the hub refused the device credentials; reprovisioning");
        }
    }

    /// Says once that the wall clock fell back before this build was made while the session
    /// runs, and once that it is set again. The session itself makes no attempt with such a
    /// clock (`SessionEvent::ClockUnset`); a live connection goes on until it drops or its token
    /// is due. `clock` in the status is read afresh at each snapshot.
    fn look_at_clock(&mut self) {
        match clock_problem(std::time::SystemTime::now()) {
            Some(problem) if !self.clock_said => {
                self.clock_said = true;
                tracing::warn!("{problem}");
                systemd::status("the system clock fell back; waiting for it to be set");
            }
            None if self.clock_said => {
                self.clock_said = false;
                tracing::info!("the system clock is set again ({})", now_rfc3339());
                systemd::status(&self.status.line());
            }
            _ => {}
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
            credential: identity.hub_credential().0.clone(),
            tls: identity.hub_credential().1.clone(),
            keep_alive: hub.keep_alive,
            sas_ttl: hub.sas_ttl,
            renew_before: hub.renew_before,
            backoff_max: hub.reconnect_backoff_max,
            unavailable_backoff_max: hub.unavailable_backoff_max,
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
                self.start_up_over();
                self.issued_generation_connected();
                let websocket = match &self.auto_route {
                    Some(auto) => auto.websocket(),
                    None => self.config.hub.websocket(),
                };
                let memory = self.auto_route.as_ref().and_then(|auto| auto.remembered());
                self.status.update(|s| {
                    s.connection = ConnectionState::Connected;
                    s.hub_connections += 1;
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
            SessionEvent::ClockUnset => {
                *connected = false;
                return Some(Event::ClockUnset);
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
                // `<plugin>.<method>`: plugin names have no dot, built-in methods neither.
                if let Some((plugin, method)) = name.split_once('.') {
                    let answer = self.plugins.invoke(plugin, method, payload);
                    answer_later(session, name, rid, async move {
                        let answer = answer.await;
                        (answer.status, answer.payload)
                    });
                } else if name == "check" {
                    // `hubagent check --json`, run as the operator would: seconds of network checks.
                    let config = self.status.read(|s| s.config.clone());
                    answer_later(session, name, rid, remote_check(config));
                } else if name == "logs" {
                    // Under systemd, a journalctl query.
                    answer_later(session, name, rid, recent_logs(payload));
                } else {
                    let (code, answer) = self.direct_method(&name, payload);
                    tracing::info!(method = %name, status = code, "direct method");
                    session.respond_to_method(&rid, code, answer);
                }
            }
            // Taken to the inbox by the session loop.
            SessionEvent::CloudToDevice { .. } => {}
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
            "restartPlugin" => {
                let Some(name) = payload.get("name").and_then(Value::as_str) else {
                    return (400, json!({"error": "write {\"name\": \"<plugin>\"}"}));
                };
                let plugins = self.plugins.snapshot();
                if plugins.get(name).is_none() {
                    let known: Vec<&str> = plugins
                        .as_object()
                        .map(|p| p.keys().map(String::as_str).collect())
                        .unwrap_or_default();
                    return (
                        404,
                        json!({"error": format!("no plugin named '{name}' (configured: {})", known.join(", "))}),
                    );
                }
                let _ = self
                    .commands_tx
                    .send(Command::RestartPlugin(name.to_string()));
                (202, json!({"restarting": name}))
            }
            other => (
                404,
                json!({"error": format!("unknown method '{other}' (built-in: ping, reprovision, logs, check, restartPlugin; a plugin's: <plugin>.<method>)")}),
            ),
        }
    }

    /// A renewal attempt ended: with a new generation stored, the session ends and the next
    /// start presents it; after a failure the current certificate stays and a retry is scheduled.
    fn renewal_finished(
        &mut self,
        outcome: Result<(Assignment, DeviceIdentity), DpsError>,
        renewal: &mut Renewal,
    ) -> Option<Event> {
        match outcome {
            Ok((assignment, identity)) => {
                let (cache, saved) =
                    crate::provisioning::record(&self.state, &self.config, assignment, &identity);
                if let Err(e) = saved {
                    tracing::error!("cannot cache the assignment: {e}");
                }
                self.status.update(|s| {
                    s.provisioned_at = Some(cache.provisioned_at.clone());
                    s.last_error = None;
                });
                self.assignment = Some(cache);
                self.identity = Some(identity);
                Some(Event::SessionEnded)
            }
            Err(e) => {
                let delay = renewal.failed();
                tracing::warn!(
                    delay = %humantime::format_duration(delay),
                    "renewing the issued certificate failed: {e}; the current one stays in use"
                );
                self.status
                    .update(|s| s.last_error = Some(format!("certificate renewal failed: {e}")));
                None
            }
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
            // A new fingerprint makes the cache stale: the next Start registers with DPS. A
            // reload of plugins alone keeps the session.
            Some(Command::Reload(config)) => self.reload(*config),
            Some(Command::RestartPlugin(name)) => {
                self.restart_plugin(&name);
                None
            }
        }
    }
}

/// Room a method answer may take: the hub's limit is 128 KiB.
const METHOD_ANSWER_BYTES: usize = 100 * 1024;

/// Answers a direct method from its own task once `answer` is ready: a slow plugin or a
/// seconds-long check holds up nothing else in the session.
fn answer_later(
    session: &SessionHandle,
    name: String,
    rid: String,
    answer: impl Future<Output = (u16, Value)> + Send + 'static,
) {
    let session = session.clone();
    tokio::spawn(async move {
        let (code, payload) = answer.await;
        tracing::info!(method = %name, status = code, "direct method");
        session.respond_to_method(&rid, code, payload);
    });
}

/// The `logs` method: the agent's recent log lines, filtered by `plugin`, `level`, `since` and
/// `limit` (README, "Remote diagnostics"): from the journal when the agent logs there and may read
/// it (past restarts), else from the lines kept in memory since it started. `source` says which.
async fn recent_logs(payload: Value) -> (u16, Value) {
    use crate::system::{journal, logging, recent_logs};
    let query: recent_logs::Query = match payload {
        Value::Null => Default::default(),
        other => match serde_json::from_value(other) {
            Ok(query) => query,
            Err(e) => {
                return (
                    400,
                    json!({"error": format!("{e}; write {{\"plugin\", \"level\", \"since\", \"limit\"}}, each optional")}),
                );
            }
        },
    };
    let filter = match recent_logs::Filter::new(&query) {
        Ok(filter) => filter,
        Err(e) => return (400, json!({"error": e})),
    };
    let journal_error = match logging::logs_to_journal() {
        false => None,
        true => match journal::recent(&filter, METHOD_ANSWER_BYTES).await {
            Ok((lines, left_out)) => {
                return (
                    200,
                    json!({"lines": lines, "leftOut": left_out, "source": "journal"}),
                );
            }
            Err(e) => {
                tracing::warn!(
                    "the logs method cannot read the journal ({e}); answering from memory"
                );
                Some(e)
            }
        },
    };
    let (lines, left_out) = recent_logs::recent(&filter, METHOD_ANSWER_BYTES);
    let mut answer = json!({"lines": lines, "leftOut": left_out, "source": "memory"});
    if let Some(e) = journal_error {
        answer["journalError"] = json!(e);
    }
    (200, answer)
}

/// How long the `check` method may take: below the hub's default method timeout of 30 s.
const REMOTE_CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(25);

/// The `check` method: what `hubagent check --json` reports, run by this agent's own binary.
async fn remote_check(config: String) -> (u16, Value) {
    let Ok(agent) = std::env::current_exe() else {
        return (500, json!({"error": "cannot find the agent's own binary"}));
    };
    let run = tokio::process::Command::new(agent)
        .args(["--config", &config, "check", "--json"])
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(REMOTE_CHECK_TIMEOUT, run).await {
        Err(_) => (
            504,
            json!({"error": format!("hubagent check did not finish within {}s", REMOTE_CHECK_TIMEOUT.as_secs())}),
        ),
        Ok(Err(e)) => (
            500,
            json!({"error": format!("cannot run hubagent check: {e}")}),
        ),
        Ok(Ok(output)) => match serde_json::from_slice::<Value>(&output.stdout) {
            Ok(report) => (200, report),
            Err(e) => (
                500,
                json!({"error": format!("hubagent check printed no report ({e})")}),
            ),
        },
    }
}
