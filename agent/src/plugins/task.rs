//! One task per plugin: starts it, applies settings, pings it, restarts it with backoff when it
//! crashes, hangs or reports failure, and quarantines one that keeps failing (trying it again
//! every `quarantine_retry`). Its messages go through the [`Outlet`] into the durable queue
//! before the plugin's publish returns.

use std::collections::{HashMap, VecDeque};
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use hubagent_plugin_sdk::abi;
use serde_json::{Map, Value};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;

use super::calls::{C2dMessage, MethodAnswer};
use super::library::CallError;
use super::outlet::{Outlet, TokenBucket};
use super::running::{self, Event, Events, RunningPlugin};
use super::sandbox::Confinement;
use super::{PluginStatus, State};
use crate::config::plugin::{Kind, Limits, PluginSpec};
use crate::telemetry::DurablePublisher;

/// What the supervisor tells a plugin's task.
pub enum Cmd {
    Settings {
        settings: Map<String, Value>,
        version: u64,
    },
    /// A direct method `<plugin>.<method>`; answered on `reply` (the supervisor times it out).
    Method {
        method: String,
        payload: Value,
        reply: oneshot::Sender<MethodAnswer>,
    },
    /// A C2D message matching the plugin's filter; `Ok` once the plugin took it.
    C2d {
        message: C2dMessage,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Shutdown(oneshot::Sender<()>),
}

/// One plugin's lifecycle; `run` drives it until shutdown.
pub struct Task {
    pub spec: PluginSpec,
    pub shared: Arc<Mutex<PluginStatus>>,
    pub changes: Arc<Notify>,
    pub publisher: DurablePublisher,
    pub allow_unsafe: bool,
    pub confinement: Arc<RwLock<Confinement>>,
    pub max_message_size: usize,
    pub desired: Map<String, Value>,
    pub desired_version: u64,
}

/// Answered once the task has stopped, when the supervisor waits for it.
type Done = Option<oneshot::Sender<()>>;

/// How a run of the plugin ended.
enum Outcome {
    Failed(String),
    /// Hung and cannot be killed (in-process): quarantined until the agent restarts.
    Stuck(String),
    /// The start settings were refused.
    Rejected(String),
    Shutdown(Done),
}

/// What the task keeps from one run of the plugin to the next.
struct Runs {
    accepted: Option<Map<String, Value>>,
    rejected: Option<Map<String, Value>>,
    logs: TokenBucket,
    failures: VecDeque<Instant>,
    outlet: Outlet,
}

/// What woke a task that waits between runs.
enum Idle {
    Timeout,
    /// New desired settings, recorded.
    Settings,
    Shutdown(Done),
}

/// A started plugin and what its task tracks about it.
struct Live {
    plugin: RunningPlugin,
    events: mpsc::UnboundedReceiver<Event>,
    /// Where the plugin's answers to apply go.
    answers: Events,
    /// The settings it runs with.
    current: Map<String, Value>,
    /// Apply in flight: (settings, version, deadline).
    applying: Option<(Map<String, Value>, u64, Instant)>,
    ping_id: u64,
    awaiting_pong: Option<(u64, Instant)>,
    ping_every: Duration,
    next_ping: Instant,
    /// Methods and C2D messages passed to the plugin and not answered yet, by call id.
    next_call: u64,
    methods: HashMap<u64, oneshot::Sender<MethodAnswer>>,
    c2d: HashMap<u64, oneshot::Sender<Result<(), String>>>,
}

/// What woke a task whose plugin runs.
enum Wake {
    Event(Option<Event>),
    ApplyTimeout,
    PongTimeout,
    RetryHeld,
    Ping,
    Cmd(Option<Cmd>),
}

/// An instant no timer here reaches: a deadline that is not set.
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86400 * 365)
}

/// Records a failure at `now`; how many fell within `quarantine_window`, and what comes next:
/// a restart after a doubling backoff, or quarantine.
fn next_after_failure(
    failures: &mut VecDeque<Instant>,
    now: Instant,
    limits: &Limits,
) -> (u32, State, Duration) {
    failures.push_back(now);
    while failures
        .front()
        .is_some_and(|t| now.duration_since(*t) > limits.quarantine_window)
    {
        failures.pop_front();
    }
    let n = failures.len() as u32;
    if n >= limits.quarantine_after {
        (n, State::Quarantined, limits.quarantine_retry)
    } else {
        let factor = 2u32.saturating_pow(n.saturating_sub(1)).min(1 << 16);
        let delay = (limits.restart_backoff * factor).min(limits.restart_backoff_max);
        (n, State::Restarting, delay)
    }
}

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
        let mut runs = Runs {
            accepted: None,
            rejected: None,
            logs: TokenBucket::new(20.0, 100.0),
            failures: VecDeque::new(),
            outlet: Outlet::new(
                &self.spec,
                self.publisher.clone(),
                self.shared.clone(),
                self.max_message_size,
            ),
        };
        self.update(true, |s| s.desired_version = self.desired_version);
        loop {
            // Settings the plugin refused are not tried again; the last accepted ones are.
            let settings = if runs.rejected.as_ref() == Some(&self.desired) {
                match runs.accepted.clone() {
                    Some(a) => a,
                    None => match self.idle(&mut cmds, None).await {
                        Idle::Shutdown(done) => return self.finish(done),
                        Idle::Settings | Idle::Timeout => continue,
                    },
                }
            } else {
                self.desired.clone()
            };
            let reason = match self.run_once(&mut runs, &mut cmds, settings.clone()).await {
                Outcome::Shutdown(done) => return self.finish(done),
                Outcome::Rejected(reason) => {
                    tracing::warn!(plugin = %self.spec.name, "settings rejected: {}", self.redact(&reason));
                    runs.rejected = Some(settings);
                    self.update(true, |s| {
                        s.state = State::RejectedSettings;
                        s.error = None;
                        s.rejected = Some(reason);
                    });
                    continue;
                }
                Outcome::Stuck(reason) => {
                    let done = self.quarantine_stuck(&mut cmds, reason).await;
                    return self.finish(done);
                }
                Outcome::Failed(reason) => reason,
            };
            if let ControlFlow::Break(done) = self.back_off(&mut runs, &mut cmds, reason).await {
                return self.finish(done);
            }
            self.update(true, |s| s.restarts += 1);
        }
    }

    fn finish(&self, done: Done) {
        self.update(true, |s| {
            s.state = State::Stopped;
            s.pid = None;
        });
        if let Some(d) = done {
            let _ = d.send(());
        }
    }

    /// Between runs: waits for a command, or for `deadline` when there is one. New settings
    /// are recorded and reported.
    async fn idle(
        &mut self,
        cmds: &mut mpsc::UnboundedReceiver<Cmd>,
        deadline: Option<Instant>,
    ) -> Idle {
        let until = deadline.unwrap_or_else(far_future);
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until), if deadline.is_some() => return Idle::Timeout,
                cmd = cmds.recv() => match cmd {
                    Some(Cmd::Settings { settings, version }) => {
                        self.desired = settings;
                        self.desired_version = version;
                        self.update(true, |s| s.desired_version = version);
                        return Idle::Settings;
                    }
                    Some(Cmd::Shutdown(done)) => return Idle::Shutdown(Some(done)),
                    Some(call) => self.refuse_call(call),
                    None => return Idle::Shutdown(None),
                }
            }
        }
    }

    /// A method or C2D message for a plugin that is not running: 503 naming its state (404 for
    /// a method it is known not to answer); the C2D message stays with the hub.
    fn refuse_call(&self, call: Cmd) {
        let (state, declarations) = self
            .shared
            .lock()
            .map(|s| (s.state, s.declarations.clone()))
            .unwrap_or_default();
        let state = serde_json::to_value(state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let why = format!("plugin '{}' is {state}", self.spec.name);
        match call {
            Cmd::Method { method, reply, .. } => {
                let answer = match declarations {
                    Some(d) if !d.answers(&method) => self.unknown_method(&method),
                    _ => MethodAnswer::error(503, why),
                };
                let _ = reply.send(answer);
            }
            Cmd::C2d { reply, .. } => {
                let _ = reply.send(Err(why));
            }
            Cmd::Settings { .. } | Cmd::Shutdown(_) => {}
        }
    }

    fn unknown_method(&self, method: &str) -> MethodAnswer {
        let declared = self
            .shared
            .lock()
            .map(|s| s.declarations.clone().unwrap_or_default().methods)
            .unwrap_or_default();
        MethodAnswer::error(
            404,
            format!(
                "plugin '{}' has no method '{method}' (it declares: {})",
                self.spec.name,
                if declared.is_empty() {
                    "none".to_string()
                } else {
                    declared.join(", ")
                }
            ),
        )
    }

    /// Passes a call on to the running plugin (a method it declared, a C2D message), or
    /// answers it at once.
    fn pass_call(&self, live: &mut Live, call: Cmd) {
        let declarations = self
            .shared
            .lock()
            .map(|s| s.declarations.clone())
            .unwrap_or_default()
            .unwrap_or_default();
        live.next_call += 1;
        let id = live.next_call;
        match call {
            Cmd::Method {
                method,
                payload,
                reply,
            } => {
                if declarations.answers(&method) {
                    live.plugin.invoke(id, &method, &payload);
                    live.methods.retain(|_, r| !r.is_closed());
                    live.methods.insert(id, reply);
                } else {
                    let _ = reply.send(self.unknown_method(&method));
                }
            }
            Cmd::C2d { message, reply } => {
                if declarations.c2d_filter.is_some() {
                    live.plugin.deliver(id, &message);
                    live.c2d.retain(|_, r| !r.is_closed());
                    live.c2d.insert(id, reply);
                } else {
                    let _ = reply.send(Err(format!(
                        "plugin '{}' takes no C2D messages",
                        self.spec.name
                    )));
                }
            }
            Cmd::Settings { .. } | Cmd::Shutdown(_) => {}
        }
    }

    /// A plugin that hung and cannot be killed stays quarantined until the agent restarts;
    /// returns at shutdown.
    async fn quarantine_stuck(
        &mut self,
        cmds: &mut mpsc::UnboundedReceiver<Cmd>,
        reason: String,
    ) -> Done {
        tracing::error!(plugin = %self.spec.name, "{}; quarantined until the agent restarts", self.redact(&reason));
        self.set_state(
            State::Quarantined,
            Some(format!("{reason} (in-process: restart the agent)")),
        );
        loop {
            if let Idle::Shutdown(done) = self.idle(cmds, None).await {
                return done;
            }
        }
    }

    /// After a failure: waits out the backoff, or `quarantine_retry` when it keeps failing.
    /// `Break` at shutdown.
    async fn back_off(
        &mut self,
        runs: &mut Runs,
        cmds: &mut mpsc::UnboundedReceiver<Cmd>,
        reason: String,
    ) -> ControlFlow<Done> {
        let (n, state, delay) =
            next_after_failure(&mut runs.failures, Instant::now(), &self.spec.limits);
        tracing::warn!(plugin = %self.spec.name, failures = n, delay = %humantime::format_duration(delay), state = state.name(), "plugin failed: {}", self.redact(&reason));
        self.update(true, |s| {
            s.state = state;
            s.error = Some(reason.clone());
            s.last_failure = Some(reason.clone());
            s.pid = None;
        });
        let deadline = Instant::now() + delay;
        loop {
            match self.idle(cmds, Some(deadline)).await {
                Idle::Timeout => return ControlFlow::Continue(()),
                Idle::Settings => {}
                Idle::Shutdown(done) => return ControlFlow::Break(done),
            }
        }
    }

    /// Starts the plugin with `settings` and runs it until it fails or is shut down.
    async fn run_once(
        &mut self,
        runs: &mut Runs,
        cmds: &mut mpsc::UnboundedReceiver<Cmd>,
        settings: Map<String, Value>,
    ) -> Outcome {
        runs.outlet.reset();
        self.update(true, |s| {
            s.state = State::Starting;
            s.pid = None;
        });
        let (policy, sandbox) = {
            let confinement = self.confinement.read().unwrap_or_else(|e| e.into_inner());
            match confinement.policy_for(&self.spec) {
                Ok(policy) => {
                    let described = confinement.describe(&self.spec, policy.as_ref());
                    (policy, described)
                }
                Err(e) => return Outcome::Failed(e),
            }
        };
        self.update(false, |s| s.sandbox = Some(sandbox));
        let (answers, mut events) = mpsc::unbounded_channel();
        let launched = running::launch(
            &self.spec,
            &Value::Object(settings.clone()),
            self.allow_unsafe,
            policy.as_ref(),
            answers.clone(),
        )
        .await;
        let plugin = match launched {
            Ok(plugin) => plugin,
            Err(e) => return Outcome::Failed(e),
        };
        let pid = plugin.pid();
        self.update(false, |s| s.pid = pid);
        let plugin = match self.await_start(runs, cmds, &mut events, plugin).await {
            Ok(plugin) => plugin,
            Err(outcome) => return outcome,
        };
        runs.accepted = Some(settings.clone());
        self.report_started(runs, &settings);
        match pid {
            Some(pid) => tracing::info!(plugin = %self.spec.name, pid, "plugin running"),
            None => tracing::info!(plugin = %self.spec.name, "plugin running"),
        }
        let ping_every = (self.spec.limits.callback_timeout / 2).max(Duration::from_millis(200));
        let live = Live {
            plugin,
            events,
            answers,
            current: settings,
            applying: None,
            ping_id: 0,
            awaiting_pong: None,
            ping_every,
            next_ping: Instant::now() + ping_every,
            next_call: 0,
            methods: HashMap::new(),
            c2d: HashMap::new(),
        };
        self.drive(runs, cmds, live).await
    }

    /// Waits for the plugin's answer to start, serving it meanwhile (it may publish and log
    /// from inside its start). The started plugin, or how the run ended.
    async fn await_start(
        &mut self,
        runs: &mut Runs,
        cmds: &mut mpsc::UnboundedReceiver<Cmd>,
        events: &mut mpsc::UnboundedReceiver<Event>,
        plugin: RunningPlugin,
    ) -> Result<RunningPlugin, Outcome> {
        let timeout = self.spec.limits.callback_timeout;
        let deadline = Instant::now() + timeout;
        let started = loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(Event::Started(r)) => break r,
                    Some(Event::Ended(why)) | Some(Event::Health(abi::HEALTH_FAILED, why)) => {
                        break Err(CallError { code: abi::ERR_FAILED, reason: why });
                    }
                    Some(other) => self.other_event(runs, other),
                    None => break Err(CallError { code: abi::ERR_FAILED, reason: "the plugin went away".into() }),
                },
                _ = tokio::time::sleep_until(deadline) => {
                    let why = format!("hung: start did not return within {}", humantime::format_duration(timeout));
                    if !plugin.killable() {
                        return Err(Outcome::Stuck(why));
                    }
                    plugin.kill().await;
                    return Err(Outcome::Failed(why));
                }
                cmd = cmds.recv() => match cmd {
                    Some(Cmd::Settings { settings, version }) => {
                        self.desired = settings;
                        self.desired_version = version;
                    }
                    Some(Cmd::Shutdown(done)) => return Err(self.stop(runs, plugin, events, Some(done)).await),
                    Some(call) => self.refuse_call(call),
                    None => return Err(self.stop(runs, plugin, events, None).await),
                }
            }
        };
        let Err(e) = started else {
            return Ok(plugin);
        };
        plugin.kill().await;
        Err(if e.code == abi::ERR_REJECTED {
            Outcome::Rejected(e.reason)
        } else {
            Outcome::Failed(format!("start failed: {}", e.reason))
        })
    }

    /// The plugin started on `settings`: running, or on its last accepted settings while the
    /// refusal of the desired ones stays visible.
    fn report_started(&self, runs: &Runs, settings: &Map<String, Value>) {
        let refused = runs.rejected.as_ref() == Some(&self.desired);
        self.update(true, |s| {
            s.state = State::Running;
            s.error = None;
            s.warning = None;
            if !refused {
                s.rejected = None;
            }
            s.settings = Value::Object(settings.clone());
            s.desired_version = self.desired_version;
        });
    }

    /// Asks the plugin to stop (shutdown) and serves it until it has: what it publishes until
    /// then is queued as at any other time, so a publish in flight when the stop came gets its
    /// true answer and the plugin's `stop` can join its publishing threads. Only what the queue
    /// cannot take at once (full, or the disk) is answered "stopping"; an exec plugin's line
    /// waiting for its rate stays held (a line read is queued) until the plugin has ended.
    async fn stop(
        &self,
        runs: &mut Runs,
        plugin: RunningPlugin,
        events: &mut mpsc::UnboundedReceiver<Event>,
        done: Done,
    ) -> Outcome {
        runs.outlet.release_held_back();
        let stopped = plugin.stop(self.spec.limits.callback_timeout);
        tokio::pin!(stopped);
        loop {
            let retry = runs.outlet.retry_at();
            tokio::select! {
                () = &mut stopped => break,
                Some(event) = events.recv() => self.serve_while_stopping(runs, event),
                _ = tokio::time::sleep_until(retry.unwrap_or_else(far_future)), if retry.is_some() => {
                    runs.outlet.flush();
                    runs.outlet.release_held_back();
                }
            }
        }
        // What it sent just before it ended (a plugin process's last frames come before its end).
        while let Ok(event) = events.try_recv() {
            self.serve_while_stopping(runs, event);
        }
        runs.outlet.flush_unpaced();
        runs.outlet.release();
        Outcome::Shutdown(done)
    }

    /// An event of a stopping plugin: publishes are queued if the queue takes them at once,
    /// logs and health recorded; answers to calls and its end need nothing more.
    fn serve_while_stopping(&self, runs: &mut Runs, event: Event) {
        self.other_event(runs, event);
        runs.outlet.release_held_back();
    }

    /// Serves a started plugin until it fails or is shut down.
    async fn drive(
        &mut self,
        runs: &mut Runs,
        cmds: &mut mpsc::UnboundedReceiver<Cmd>,
        mut live: Live,
    ) -> Outcome {
        let timeout = self.spec.limits.callback_timeout;
        loop {
            self.offer_desired(runs, &mut live);
            let why = match live.wait(cmds, runs.outlet.retry_at()).await {
                Wake::Event(event) => match self.on_event(runs, &mut live, event) {
                    Some(why) => why,
                    None => continue,
                },
                Wake::ApplyTimeout => {
                    let why = format!(
                        "hung: apply_settings did not return within {}",
                        humantime::format_duration(timeout)
                    );
                    if !live.plugin.killable() {
                        live.fail_calls(503, &why);
                        return Outcome::Stuck(why);
                    }
                    why
                }
                Wake::PongTimeout => format!(
                    "hung: no answer to a liveness ping within {}",
                    humantime::format_duration(timeout)
                ),
                Wake::RetryHeld => {
                    runs.outlet.flush();
                    continue;
                }
                Wake::Ping => {
                    live.ping(timeout);
                    continue;
                }
                Wake::Cmd(Some(Cmd::Settings { settings, version })) => {
                    self.on_desired(runs, &live, settings, version);
                    continue;
                }
                Wake::Cmd(Some(Cmd::Shutdown(done))) => {
                    live.fail_calls(503, &format!("plugin '{}' is stopping", self.spec.name));
                    return self
                        .stop(runs, live.plugin, &mut live.events, Some(done))
                        .await;
                }
                Wake::Cmd(Some(call)) => {
                    self.pass_call(&mut live, call);
                    continue;
                }
                Wake::Cmd(None) => {
                    return self.stop(runs, live.plugin, &mut live.events, None).await;
                }
            };
            live.fail_calls(
                500,
                &format!(
                    "plugin '{}' failed during the call: {}",
                    self.spec.name,
                    self.redact(&why)
                ),
            );
            live.plugin.kill().await;
            return Outcome::Failed(why);
        }
    }

    /// Sends the desired settings when they differ from what runs and were not already refused
    /// (one apply at a time); otherwise reports the desired version as seen.
    fn offer_desired(&self, runs: &Runs, live: &mut Live) {
        if live.applying.is_some() {
            return;
        }
        if self.desired != live.current && runs.rejected.as_ref() != Some(&self.desired) {
            let timeout = self.spec.limits.callback_timeout;
            live.plugin
                .apply(&Value::Object(self.desired.clone()), &live.answers);
            live.applying = Some((
                self.desired.clone(),
                self.desired_version,
                Instant::now() + timeout,
            ));
            return;
        }
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

    /// New desired settings while the plugin runs (sent by `offer_desired`).
    fn on_desired(
        &mut self,
        runs: &mut Runs,
        live: &Live,
        settings: Map<String, Value>,
        version: u64,
    ) {
        if matches!(self.spec.kind, Kind::Exec { .. }) {
            // An exec plugin may refuse them after the fact: these are restored then.
            let cur = live.current.clone();
            self.update(false, |s| s.previous = Some(cur));
        }
        self.desired = settings;
        self.desired_version = version;
        if self.desired == live.current && live.applying.is_none() {
            runs.rejected = None;
            self.update(true, |s| {
                s.state = State::Running;
                s.error = None;
                s.rejected = None;
                s.desired_version = version;
            });
        }
    }

    /// An event from the running plugin; `Some` with the reason when it has failed.
    fn on_event(&self, runs: &mut Runs, live: &mut Live, event: Option<Event>) -> Option<String> {
        match event {
            Some(Event::Applied(result)) => {
                let (wanted, version, _) = live.applying.take()?;
                self.on_applied(runs, live, wanted, version, result)
            }
            Some(Event::LateReject(reason)) => {
                self.on_late_reject(runs, live, reason);
                None
            }
            Some(Event::Pong(id)) => {
                if live.awaiting_pong.is_some_and(|p| p.0 == id) {
                    live.awaiting_pong = None;
                }
                None
            }
            Some(Event::MethodAnswer(id, answer)) => {
                if let Some(reply) = live.methods.remove(&id) {
                    let _ = reply.send(answer);
                }
                None
            }
            Some(Event::C2dTaken(id, taken)) => {
                if let Some(reply) = live.c2d.remove(&id) {
                    let _ = reply.send(taken.map_err(|e| self.redact(&e)));
                }
                None
            }
            Some(Event::Ended(why)) => Some(why),
            Some(Event::Health(abi::HEALTH_FAILED, detail)) => {
                Some(format!("reported failed health: {detail}"))
            }
            Some(other) => {
                self.other_event(runs, other);
                None
            }
            None => Some("the plugin went away".into()),
        }
    }

    /// The answer to an apply: the settings run now, or the plugin keeps the old ones.
    fn on_applied(
        &self,
        runs: &mut Runs,
        live: &mut Live,
        wanted: Map<String, Value>,
        version: u64,
        result: Result<(), CallError>,
    ) -> Option<String> {
        match result {
            Ok(()) => {
                if matches!(self.spec.kind, Kind::Exec { .. }) {
                    // It may still refuse them with a line ({"rejectSettings": …}).
                    tracing::info!(plugin = %self.spec.name, version, "settings sent to the plugin");
                } else {
                    tracing::info!(plugin = %self.spec.name, version, "settings applied");
                }
                runs.rejected = None;
                runs.accepted = Some(wanted.clone());
                live.current = wanted;
                self.update(true, |s| {
                    s.state = State::Running;
                    s.error = None;
                    s.rejected = None;
                    s.settings = Value::Object(live.current.clone());
                    s.desired_version = version;
                });
                None
            }
            Err(e) if e.code == abi::ERR_REJECTED => {
                tracing::warn!(plugin = %self.spec.name, version, "settings rejected, keeping the old ones: {}", self.redact(&e.reason));
                runs.rejected = Some(wanted);
                // It runs on, on its old settings: running, the refusal beside it.
                self.update(true, |s| {
                    s.state = State::Running;
                    s.rejected = Some(e.reason.clone());
                    s.desired_version = version;
                });
                None
            }
            Err(e) => Some(format!("apply_settings failed: {e}")),
        }
    }

    /// Exec plugins refuse after the fact; they keep their previous settings.
    fn on_late_reject(&self, runs: &mut Runs, live: &mut Live, reason: String) {
        tracing::warn!(plugin = %self.spec.name, "settings rejected, keeping the old ones: {}", self.redact(&reason));
        runs.rejected = Some(live.current.clone());
        let previous = self
            .shared
            .lock()
            .map(|s| s.previous.clone())
            .unwrap_or_default();
        // Refused its first settings: it has none to run on (`rejected-settings`, waiting);
        // refused a change: it runs on, on its old ones (`running`, the refusal beside it).
        let state = if previous.is_some() {
            State::Running
        } else {
            State::RejectedSettings
        };
        if let Some(p) = previous {
            live.current = p.clone();
            runs.accepted = Some(p);
        }
        self.update(true, |s| {
            s.state = state;
            s.rejected = Some(reason);
            s.settings = Value::Object(live.current.clone());
        });
    }

    /// A plugin's text with the secrets of its settings cut out, for the log.
    fn redact(&self, text: &str) -> String {
        self.shared
            .lock()
            .map(|s| s.secrets.redact_text(text))
            .unwrap_or_else(|e| e.into_inner().secrets.redact_text(text))
    }

    fn log(&self, runs: &mut Runs, level: i32, text: &str) {
        if !runs.logs.take(Instant::now()) {
            self.update(false, |s| s.logs_dropped += 1);
            return;
        }
        let name = &self.spec.name;
        let text = self.redact(text);
        match level {
            abi::LOG_ERROR => tracing::error!(plugin = %name, "{text}"),
            abi::LOG_WARN => tracing::warn!(plugin = %name, "{text}"),
            abi::LOG_DEBUG => tracing::debug!(plugin = %name, "{text}"),
            abi::LOG_TRACE => tracing::trace!(plugin = %name, "{text}"),
            _ => tracing::info!(plugin = %name, "{text}"),
        }
    }

    /// Messages, logs and health that need no decision.
    fn other_event(&self, runs: &mut Runs, event: Event) {
        match event {
            Event::Message(message, reply) => runs.outlet.publish(message, reply),
            Event::Batch(messages, reply) => runs.outlet.publish_batch(messages, reply),
            Event::Log(level, text) => self.log(runs, level, &text),
            Event::Health(state, detail) => {
                let health = match state {
                    abi::HEALTH_OK => "ok",
                    abi::HEALTH_DEGRADED => "degraded",
                    _ => "failed",
                };
                if state != abi::HEALTH_OK {
                    tracing::warn!(plugin = %self.spec.name, health, "{}", self.redact(&detail));
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
            Event::Declared(declarations) => {
                tracing::info!(plugin = %self.spec.name, methods = %declarations.methods.join(", "), c2d = declarations.c2d_filter.is_some(), "plugin declarations");
                self.update(true, |s| s.declarations = Some(declarations));
            }
            Event::Reported(properties) => {
                // Checked again here: the plugin-host process runs the plugin's code.
                match super::own_reported::check(&Value::Object(properties)) {
                    Ok(checked) => self.update(true, |s| s.own_reported = Some(checked)),
                    Err(why) => self.log(
                        runs,
                        abi::LOG_WARN,
                        &format!("reported properties refused: {why}"),
                    ),
                }
            }
            Event::Junk(warning) => {
                self.update(false, |s| s.junk_lines += 1);
                self.log(runs, abi::LOG_WARN, &warning);
            }
            Event::Silent(Some(warning)) => {
                tracing::warn!(plugin = %self.spec.name, "{warning}");
                self.update(true, |s| s.warning = Some(warning));
            }
            Event::Silent(None) => {
                tracing::info!(plugin = %self.spec.name, "the plugin writes lines again");
                self.update(true, |s| s.warning = None);
            }
            Event::Started(_) | Event::Applied(_) | Event::LateReject(_) | Event::Pong(_) => {}
            // Answers to calls made while it ran; none are made before it started.
            Event::MethodAnswer(..) | Event::C2dTaken(..) => {}
            Event::Ended(_) => {}
        }
    }
}

impl Live {
    /// Waits for whatever comes first: an event, a deadline (apply, pong), the time to retry
    /// held messages or to ping, or a command.
    async fn wait(
        &mut self,
        cmds: &mut mpsc::UnboundedReceiver<Cmd>,
        held: Option<Instant>,
    ) -> Wake {
        let apply_deadline = self
            .applying
            .as_ref()
            .map(|a| a.2)
            .unwrap_or_else(far_future);
        let pong_deadline = self.awaiting_pong.map(|p| p.1).unwrap_or_else(far_future);
        let retry_held = held.unwrap_or_else(far_future);
        tokio::select! {
            event = self.events.recv() => Wake::Event(event),
            _ = tokio::time::sleep_until(apply_deadline) => Wake::ApplyTimeout,
            _ = tokio::time::sleep_until(pong_deadline) => Wake::PongTimeout,
            _ = tokio::time::sleep_until(retry_held), if held.is_some() => Wake::RetryHeld,
            _ = tokio::time::sleep_until(self.next_ping), if self.awaiting_pong.is_none() => Wake::Ping,
            cmd = cmds.recv() => Wake::Cmd(cmd),
        }
    }

    /// Answers every call in flight (the plugin failed or stops): methods with `status`, C2D
    /// messages not taken (the hub delivers them again).
    fn fail_calls(&mut self, status: u16, why: &str) {
        for (_, reply) in self.methods.drain() {
            let _ = reply.send(MethodAnswer::error(status, why));
        }
        for (_, reply) in self.c2d.drain() {
            let _ = reply.send(Err(why.to_string()));
        }
    }

    /// Sends a liveness ping (plugin processes only), answered within `timeout`.
    fn ping(&mut self, timeout: Duration) {
        self.ping_id += 1;
        if self.plugin.ping(self.ping_id) {
            self.awaiting_pong = Some((self.ping_id, Instant::now() + timeout));
        }
        self.next_ping = Instant::now() + self.ping_every;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_back_off_doubling_then_quarantine() {
        let limits = Limits {
            restart_backoff: Duration::from_secs(1),
            restart_backoff_max: Duration::from_secs(5),
            quarantine_after: 5,
            quarantine_window: Duration::from_secs(600),
            quarantine_retry: Duration::from_secs(1800),
            ..Limits::default()
        };
        let mut failures = VecDeque::new();
        let t0 = Instant::now();
        let mut next = |at| next_after_failure(&mut failures, at, &limits);
        assert_eq!(next(t0), (1, State::Restarting, Duration::from_secs(1)));
        assert_eq!(next(t0), (2, State::Restarting, Duration::from_secs(2)));
        assert_eq!(next(t0), (3, State::Restarting, Duration::from_secs(4)));
        // Capped at restart_backoff_max.
        assert_eq!(next(t0), (4, State::Restarting, Duration::from_secs(5)));
        assert_eq!(next(t0), (5, State::Quarantined, Duration::from_secs(1800)));
        // Failures older than the window no longer count.
        let later = t0 + Duration::from_secs(601);
        assert_eq!(next(later), (1, State::Restarting, Duration::from_secs(1)));
    }
}
