//! One task per plugin: starts it, applies settings, enforces the message rate, restarts it with
//! backoff when it crashes, hangs or reports failure, and quarantines one that keeps failing
//! (trying it again every `quarantine_retry`). Every message goes through the durable queue
//! before the plugin's publish returns.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hubagent_plugin_sdk::abi;
use serde_json::{Map, Value};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;

use super::library::PluginMessage;
use super::runner::{self, Event};
use super::{PluginStatus, State, TokenBucket};
use crate::config::plugin::PluginSpec;
use crate::message::TelemetryMessage;
use crate::telemetry::DurablePublisher;
use crate::telemetry::QueueError;

pub enum Cmd {
    Settings {
        settings: Map<String, Value>,
        version: u64,
    },
    Shutdown(oneshot::Sender<()>),
}

pub struct Task {
    pub spec: PluginSpec,
    pub shared: Arc<Mutex<PluginStatus>>,
    pub changes: Arc<Notify>,
    pub publisher: DurablePublisher,
    pub allow_unsafe: bool,
    pub max_message_size: usize,
    pub desired: Map<String, Value>,
    pub desired_version: u64,
}

/// How a run of the plugin ended.
enum Outcome {
    Failed(String),
    /// Hung and cannot be killed (in-process): quarantined until the agent restarts.
    Stuck(String),
    /// The start settings were refused.
    Rejected(String),
    Shutdown(Option<oneshot::Sender<()>>),
}

struct Run {
    accepted: Option<Map<String, Value>>,
    rejected: Option<Map<String, Value>>,
    bucket: TokenBucket,
    logs: TokenBucket,
    failures: VecDeque<Instant>,
    /// Messages not queued yet, in order, with the answer their publish waits for: the queue is
    /// full (`reject-new`) or the disk is, or (exec plugins) the message waits for its rate.
    held: VecDeque<(TelemetryMessage, oneshot::Sender<i32>)>,
    /// Why `held` is waiting for the queue, once logged.
    held_back: Option<String>,
    /// The front of `held` was counted in the queue's `held_back` (each message once).
    front_counted: bool,
    retry_at: Instant,
}

/// Answers every held publish with "stopping": the plugin is stopping and these were not queued.
fn release_held(run: &mut Run) {
    for (_, reply) in run.held.drain(..) {
        let _ = reply.send(abi::ERR_STOPPING);
    }
}

/// How often a message held back by a full queue is tried again.
const HELD_RETRY: Duration = Duration::from_millis(250);

impl Task {
    fn update(&self, notify: bool, f: impl FnOnce(&mut PluginStatus)) {
        f(&mut self.shared.lock().unwrap_or_else(|e| e.into_inner()));
        if notify {
            self.changes.notify_one();
        }
    }

    fn set_state(&self, state: State, error: Option<String>) {
        self.update(true, |s| {
            s.state = state;
            s.error = error;
        });
    }

    pub async fn run(mut self, mut cmds: mpsc::UnboundedReceiver<Cmd>) {
        let limits = self.spec.limits.clone();
        let mut run = Run {
            accepted: None,
            rejected: None,
            bucket: TokenBucket::new(limits.max_rate, limits.burst),
            logs: TokenBucket::new(20.0, 100.0),
            failures: VecDeque::new(),
            held: VecDeque::new(),
            held_back: None,
            front_counted: false,
            retry_at: Instant::now(),
        };
        self.update(true, |s| s.desired_version = self.desired_version);
        loop {
            // Settings the plugin refused are not tried again; the last accepted ones are.
            let settings = if run.rejected.as_ref() == Some(&self.desired) {
                match run.accepted.clone() {
                    Some(a) => a,
                    None => match self.wait_for_new_settings(&mut cmds).await {
                        Some(done) => return self.finish(done),
                        None => continue,
                    },
                }
            } else {
                self.desired.clone()
            };
            let outcome = self.run_once(&mut run, &mut cmds, settings.clone()).await;
            let reason = match outcome {
                Outcome::Shutdown(done) => return self.finish(done),
                Outcome::Rejected(reason) => {
                    tracing::warn!(plugin = %self.spec.name, "settings rejected: {reason}");
                    run.rejected = Some(settings);
                    self.set_state(State::RejectedSettings, Some(reason));
                    continue;
                }
                Outcome::Stuck(reason) => {
                    tracing::error!(plugin = %self.spec.name, "{reason}; quarantined until the agent restarts");
                    self.set_state(
                        State::Quarantined,
                        Some(format!("{reason} (in-process: restart the agent)")),
                    );
                    loop {
                        match cmds.recv().await {
                            Some(Cmd::Settings { version, settings }) => {
                                self.desired = settings;
                                self.desired_version = version;
                                self.update(true, |s| s.desired_version = version);
                            }
                            Some(Cmd::Shutdown(done)) => return self.finish(Some(done)),
                            None => return self.finish(None),
                        }
                    }
                }
                Outcome::Failed(reason) => reason,
            };
            // Failure: back off, or quarantine when it keeps failing.
            let now = Instant::now();
            run.failures.push_back(now);
            while run
                .failures
                .front()
                .is_some_and(|t| now.duration_since(*t) > limits.quarantine_window)
            {
                run.failures.pop_front();
            }
            let n = run.failures.len() as u32;
            let (state, delay) = if n >= limits.quarantine_after {
                (State::Quarantined, limits.quarantine_retry)
            } else {
                let factor = 2u32.saturating_pow(n.saturating_sub(1)).min(1 << 16);
                (
                    State::Restarting,
                    (limits.restart_backoff * factor).min(limits.restart_backoff_max),
                )
            };
            tracing::warn!(plugin = %self.spec.name, failures = n, ?delay, state = ?state, "plugin failed: {reason}");
            self.update(true, |s| {
                s.state = state;
                s.error = Some(reason.clone());
                s.last_failure = Some(reason.clone());
                s.pid = None;
            });
            let deadline = Instant::now() + delay;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => break,
                    cmd = cmds.recv() => match cmd {
                        Some(Cmd::Settings { settings, version }) => {
                            self.desired = settings;
                            self.desired_version = version;
                            self.update(true, |s| s.desired_version = version);
                        }
                        Some(Cmd::Shutdown(done)) => return self.finish(Some(done)),
                        None => return self.finish(None),
                    }
                }
            }
            self.update(true, |s| s.restarts += 1);
        }
    }

    fn finish(&self, done: Option<oneshot::Sender<()>>) {
        self.update(true, |s| {
            s.state = State::Stopped;
            s.pid = None;
        });
        if let Some(d) = done {
            let _ = d.send(());
        }
    }

    /// Waits for settings other than the refused ones; `Some` on shutdown.
    async fn wait_for_new_settings(
        &mut self,
        cmds: &mut mpsc::UnboundedReceiver<Cmd>,
    ) -> Option<Option<oneshot::Sender<()>>> {
        match cmds.recv().await {
            Some(Cmd::Settings { settings, version }) => {
                self.desired = settings;
                self.desired_version = version;
                self.update(true, |s| s.desired_version = version);
                None
            }
            Some(Cmd::Shutdown(done)) => Some(Some(done)),
            None => Some(None),
        }
    }

    /// Checks a message against the plugin's limits; the message to queue, or the code its
    /// publish returns at once. Exec plugins are paced instead (see `flush_held`).
    fn admit(&self, run: &mut Run, message: PluginMessage) -> Result<TelemetryMessage, i32> {
        if !self.paced() && !run.bucket.take(Instant::now()) {
            self.update(false, |s| s.dropped += 1);
            return Err(abi::ERR_RATE_LIMITED);
        }
        let size = message.body.len()
            + message
                .properties
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>();
        if size > self.max_message_size {
            self.update(false, |s| s.dropped += 1);
            return Err(abi::ERR_TOO_LARGE);
        }
        let mut properties = message.properties;
        if !properties.iter().any(|(k, _)| k == "source") {
            properties.push(("source".into(), self.spec.name.clone()));
        }
        Ok(TelemetryMessage {
            message_id: uuid::Uuid::new_v4().to_string(),
            body: message.body.into(),
            content_type: message.content_type,
            content_encoding: message.content_encoding,
            creation_time: Some(crate::util::time::now_rfc3339()),
            properties,
        })
    }

    /// An exec plugin writes into a pipe the agent reads one message at a time, so over its
    /// rate it is held back rather than dropped: lines it wrote while the queue was full are
    /// not lost when they come in a burst.
    fn paced(&self) -> bool {
        matches!(self.spec.kind, crate::config::plugin::Kind::Exec { .. })
    }

    /// Queues held messages in order, answering each plugin publish once its message is on
    /// disk; stops at the first that has to wait and sets `run.retry_at`.
    fn flush_held(&self, run: &mut Run) {
        while let Some((message, _)) = run.held.front() {
            let now = Instant::now();
            if self.paced() {
                let wait = run.bucket.wait_time(now);
                if !wait.is_zero() {
                    run.retry_at = now + wait;
                    return;
                }
            }
            let code = match self.publisher.try_publish(message) {
                Ok(()) => abi::OK,
                Err(QueueError::TooLarge(size)) => {
                    tracing::error!(plugin = %self.spec.name, message_id = %message.message_id, size, "message too large to queue; dropped");
                    abi::ERR_TOO_LARGE
                }
                Err(e) => {
                    if !run.front_counted {
                        self.publisher.note_held_back();
                        run.front_counted = true;
                    }
                    let why = e.to_string();
                    if run.held_back.as_ref() != Some(&why) {
                        tracing::warn!(plugin = %self.spec.name, "telemetry held back: {why}");
                        run.held_back = Some(why);
                    }
                    run.retry_at = now + HELD_RETRY;
                    return;
                }
            };
            if self.paced() {
                run.bucket.take(now);
            }
            let (_, reply) = run.held.pop_front().expect("front exists");
            run.front_counted = false;
            let _ = reply.send(code);
            if code == abi::OK {
                self.update(false, |s| s.published += 1);
            } else {
                self.update(false, |s| s.dropped += 1);
            }
            if run.held_back.take().is_some() {
                tracing::info!(plugin = %self.spec.name, "the queue has room again; telemetry flows");
            }
        }
    }

    fn log(&self, run: &mut Run, level: i32, text: &str) {
        if !run.logs.take(Instant::now()) {
            self.update(false, |s| s.logs_dropped += 1);
            return;
        }
        let name = &self.spec.name;
        match level {
            abi::LOG_ERROR => tracing::error!(plugin = %name, "{text}"),
            abi::LOG_WARN => tracing::warn!(plugin = %name, "{text}"),
            abi::LOG_DEBUG => tracing::debug!(plugin = %name, "{text}"),
            abi::LOG_TRACE => tracing::trace!(plugin = %name, "{text}"),
            _ => tracing::info!(plugin = %name, "{text}"),
        }
    }

    /// Starts the plugin with `settings` and runs it until it fails or is shut down.
    async fn run_once(
        &mut self,
        run: &mut Run,
        cmds: &mut mpsc::UnboundedReceiver<Cmd>,
        settings: Map<String, Value>,
    ) -> Outcome {
        let limits = self.spec.limits.clone();
        // Whatever the last run left unqueued was never acknowledged to it.
        run.held.clear();
        run.held_back = None;
        run.front_counted = false;
        self.update(true, |s| {
            s.state = State::Starting;
            s.pid = None;
        });
        let (tx, mut events) = mpsc::unbounded_channel();
        let mut instance = match runner::launch(
            &self.spec,
            &Value::Object(settings.clone()),
            self.allow_unsafe,
            tx.clone(),
        )
        .await
        {
            Ok(i) => i,
            Err(e) => return Outcome::Failed(e),
        };
        let pid = instance.pid();
        self.update(false, |s| s.pid = pid);

        // Wait for the answer to start, serving the plugin meanwhile.
        let deadline = Instant::now() + limits.callback_timeout;
        let started = loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(Event::Started(r)) => break r.map_err(|e| (e.code == abi::ERR_REJECTED, e.reason)),
                    Some(Event::Ended(why)) | Some(Event::Health(abi::HEALTH_FAILED, why)) => break Err((false, why)),
                    Some(other) => self.other_event(run, other).await,
                    None => break Err((false, "the plugin went away".into())),
                },
                _ = tokio::time::sleep_until(deadline) => {
                    let why = format!("hung: start did not return within {}", humantime::format_duration(limits.callback_timeout));
                    if !instance.killable() {
                        return Outcome::Stuck(why);
                    }
                    instance.kill().await;
                    return Outcome::Failed(why);
                }
                cmd = cmds.recv() => match cmd {
                    Some(Cmd::Settings { settings, version }) => {
                        self.desired = settings;
                        self.desired_version = version;
                    }
                    Some(Cmd::Shutdown(done)) => {
                        release_held(run);
                        instance.stop(limits.callback_timeout).await;
                        return Outcome::Shutdown(Some(done));
                    }
                    None => {
                        release_held(run);
                        instance.stop(limits.callback_timeout).await;
                        return Outcome::Shutdown(None);
                    }
                }
            }
        };
        match started {
            Ok(()) => {}
            Err((true, reason)) => {
                instance.kill().await;
                return Outcome::Rejected(reason);
            }
            Err((false, reason)) => {
                instance.kill().await;
                return Outcome::Failed(format!("start failed: {reason}"));
            }
        }
        run.accepted = Some(settings.clone());
        let mut current = settings;
        if run.rejected.as_ref() == Some(&self.desired) {
            // Running on the last accepted settings; the refusal stays visible.
            self.update(true, |s| {
                s.state = State::RejectedSettings;
                s.settings = Value::Object(current.clone());
                s.desired_version = self.desired_version;
            });
        } else {
            self.update(true, |s| {
                s.state = State::Running;
                s.error = None;
                s.settings = Value::Object(current.clone());
                s.desired_version = self.desired_version;
            });
        }
        tracing::info!(plugin = %self.spec.name, pid = ?pid, "plugin running");

        // Apply in flight: (settings, version, deadline).
        let mut applying: Option<(Map<String, Value>, u64, Instant)> = None;
        let mut ping_id = 0u64;
        let mut awaiting_pong: Option<(u64, Instant)> = None;
        let ping_every = (limits.callback_timeout / 2).max(Duration::from_millis(200));
        let mut next_ping = Instant::now() + ping_every;
        let far = || Instant::now() + Duration::from_secs(86400 * 365);
        loop {
            // Settings to send: the desired ones when they differ from what runs and were not
            // already refused.
            if applying.is_none()
                && self.desired != current
                && run.rejected.as_ref() != Some(&self.desired)
            {
                instance.apply(&Value::Object(self.desired.clone()), &tx);
                applying = Some((
                    self.desired.clone(),
                    self.desired_version,
                    Instant::now() + limits.callback_timeout,
                ));
            } else if applying.is_none() {
                let version = self.desired_version;
                let changed = self
                    .shared
                    .lock()
                    .map(|s| s.desired_version != version)
                    .unwrap_or(false);
                if changed {
                    self.update(true, |s| s.desired_version = version);
                }
            }
            let apply_deadline = applying.as_ref().map(|a| a.2).unwrap_or_else(far);
            let pong_deadline = awaiting_pong.map(|p| p.1).unwrap_or_else(far);
            let why = tokio::select! {
                event = events.recv() => match event {
                    Some(Event::Applied(result)) => {
                        let Some((wanted, version, _)) = applying.take() else { continue };
                        match result {
                            Ok(()) => {
                                tracing::info!(plugin = %self.spec.name, version, "settings applied");
                                run.rejected = None;
                                run.accepted = Some(wanted.clone());
                                current = wanted;
                                self.update(true, |s| {
                                    s.state = State::Running;
                                    s.error = None;
                                    s.settings = Value::Object(current.clone());
                                    s.desired_version = version;
                                });
                                continue;
                            }
                            Err(e) if e.code == abi::ERR_REJECTED => {
                                tracing::warn!(plugin = %self.spec.name, version, "settings rejected, keeping the old ones: {}", e.reason);
                                run.rejected = Some(wanted);
                                self.update(true, |s| {
                                    s.state = State::RejectedSettings;
                                    s.error = Some(e.reason.clone());
                                    s.desired_version = version;
                                });
                                continue;
                            }
                            Err(e) => format!("apply_settings failed: {e}"),
                        }
                    }
                    Some(Event::LateReject(reason)) => {
                        // Exec plugins refuse after the fact; they keep their previous settings.
                        tracing::warn!(plugin = %self.spec.name, "settings rejected, keeping the old ones: {reason}");
                        run.rejected = Some(current.clone());
                        let previous = self.shared.lock().map(|s| s.previous.clone()).unwrap_or_default();
                        if let Some(p) = previous {
                            current = p.clone();
                            run.accepted = Some(p);
                        }
                        self.update(true, |s| {
                            s.state = State::RejectedSettings;
                            s.error = Some(reason);
                            s.settings = Value::Object(current.clone());
                        });
                        continue;
                    }
                    Some(Event::Pong(id)) => {
                        if awaiting_pong.is_some_and(|p| p.0 == id) {
                            awaiting_pong = None;
                        }
                        continue;
                    }
                    Some(Event::Ended(why)) => why,
                    Some(Event::Health(abi::HEALTH_FAILED, detail)) => format!("reported failed health: {detail}"),
                    Some(other) => { self.other_event(run, other).await; continue; }
                    None => "the plugin went away".into(),
                },
                _ = tokio::time::sleep_until(apply_deadline) => {
                    let why = format!("hung: apply_settings did not return within {}", humantime::format_duration(limits.callback_timeout));
                    if !instance.killable() {
                        return Outcome::Stuck(why);
                    }
                    why
                }
                _ = tokio::time::sleep_until(pong_deadline) => {
                    format!("hung: no answer to a liveness ping within {}", humantime::format_duration(limits.callback_timeout))
                }
                _ = tokio::time::sleep_until(run.retry_at), if !run.held.is_empty() => {
                    self.flush_held(run);
                    continue;
                }
                _ = tokio::time::sleep_until(next_ping), if awaiting_pong.is_none() => {
                    ping_id += 1;
                    if instance.ping(ping_id) {
                        awaiting_pong = Some((ping_id, Instant::now() + limits.callback_timeout));
                    }
                    next_ping = Instant::now() + ping_every;
                    continue;
                }
                cmd = cmds.recv() => match cmd {
                    Some(Cmd::Settings { settings, version }) => {
                        if matches!(self.spec.kind, crate::config::plugin::Kind::Exec { .. }) {
                            let cur = current.clone();
                            self.update(false, |s| s.previous = Some(cur));
                        }
                        self.desired = settings;
                        self.desired_version = version;
                        if self.desired == current && applying.is_none() {
                            run.rejected = None;
                            self.update(true, |s| {
                                s.state = State::Running;
                                s.error = None;
                                s.desired_version = version;
                            });
                        }
                        continue;
                    }
                    Some(Cmd::Shutdown(done)) => {
                        release_held(run);
                        instance.stop(limits.callback_timeout).await;
                        return Outcome::Shutdown(Some(done));
                    }
                    None => {
                        release_held(run);
                        instance.stop(limits.callback_timeout).await;
                        return Outcome::Shutdown(None);
                    }
                },
            };
            instance.kill().await;
            return Outcome::Failed(why);
        }
    }

    /// Messages, logs and health that need no decision.
    async fn other_event(&self, run: &mut Run, event: Event) {
        match event {
            Event::Message(message, reply) => match self.admit(run, message) {
                Ok(message) => {
                    run.held.push_back((message, reply));
                    if run.held.len() == 1 {
                        self.flush_held(run);
                    }
                }
                Err(code) => {
                    let _ = reply.send(code);
                }
            },
            Event::Log(level, text) => self.log(run, level, &text),
            Event::Health(state, detail) => {
                let health = match state {
                    abi::HEALTH_OK => "ok",
                    abi::HEALTH_DEGRADED => "degraded",
                    _ => "failed",
                };
                if state != abi::HEALTH_OK {
                    tracing::warn!(plugin = %self.spec.name, health, "{detail}");
                }
                self.update(true, |s| {
                    s.health = Some(health.to_string());
                    s.health_detail = (!detail.is_empty()).then_some(detail);
                });
            }
            Event::Loaded { abi, version } => self.update(true, |s| {
                s.abi = Some(abi);
                s.plugin_version = Some(version);
            }),
            Event::Started(_) | Event::Applied(_) | Event::LateReject(_) | Event::Pong(_) => {}
            Event::Ended(_) => {}
        }
    }
}
