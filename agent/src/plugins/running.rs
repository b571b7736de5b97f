//! Every kind of plugin behind one small interface, [`RunningPlugin`]: a library in a plugin
//! process (`hosted.rs`), an exec plugin (`exec.rs`), a library loaded in-process
//! (`in_process.rs`) or a built-in (`builtin.rs`). Each reports through the same [`Event`]s; the
//! plugin's task does the rest (timeouts, restarts, limits).

use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;

use super::answer::Answer;
use super::builtin::BuiltinPlugin;
use super::calls::{C2dMessage, Declarations, MethodAnswer};
use super::exec::ExecPlugin;
use super::hosted::HostedPlugin;
use super::in_process::InProcessPlugin;
use super::library::{CallError, PluginMessage};
use super::sandbox::Policy;
use crate::config::plugin::{Isolation, Kind, PluginSpec};

/// What a running plugin tells its task.
#[derive(Debug)]
pub enum Event {
    /// Library plugins: the descriptor passed the checks.
    Loaded {
        abi: String,
        version: String,
    },
    /// The answer to start.
    Started(Result<(), CallError>),
    /// The answer to the last apply.
    Applied(Result<(), CallError>),
    /// Exec plugins: the last settings were refused after the fact.
    LateReject(String),
    Message(PluginMessage, Answer<i32>),
    /// ABI 1.3: messages published together, answered with each one's code, in order.
    Batch(Vec<PluginMessage>, Answer<Vec<i32>>),
    Log(i32, String),
    Health(i32, String),
    /// The plugin is gone (exit, crash, protocol violation).
    Ended(String),
    /// Plugin processes: the answer to a liveness ping.
    Pong(u64),
    /// The methods and C2D messages the plugin takes (libraries at load, exec plugins by a line).
    Declared(Declarations),
    /// The answer to method call `id`.
    MethodAnswer(u64, MethodAnswer),
    /// The answer to C2D delivery `id`: taken, or why not.
    C2dTaken(u64, Result<(), String>),
    /// ABI 1.2 / exec `{"reported": …}`: the plugin's own reported properties.
    Reported(serde_json::Map<String, serde_json::Value>),
    /// Exec plugins: a line that is not one of the protocol's (the warning to log, quoting it).
    Junk(String),
    /// Exec plugins: no line the agent understands for a while (the warning), or, `None`,
    /// one came after such a warning.
    Silent(Option<String>),
}

pub type Events = mpsc::UnboundedSender<Event>;

/// A started plugin of any kind.
pub enum RunningPlugin {
    Hosted(HostedPlugin),
    Exec(ExecPlugin),
    InProcess(InProcessPlugin),
    Builtin(BuiltinPlugin),
}

/// Starts a plugin; the answer to start arrives as [`Event::Started`].
pub async fn launch(
    spec: &PluginSpec,
    settings: &Value,
    allow_unsafe: bool,
    sandbox: Option<&Policy>,
    events: Events,
) -> Result<RunningPlugin, String> {
    match &spec.kind {
        Kind::Library {
            path,
            isolation: Isolation::Process,
            env,
        } => HostedPlugin::launch(spec, path, env, settings, allow_unsafe, sandbox, events)
            .map(RunningPlugin::Hosted),
        Kind::Exec { command, env } => {
            ExecPlugin::launch(spec, command, env, settings, allow_unsafe, sandbox, events)
                .map(RunningPlugin::Exec)
        }
        Kind::Library {
            path,
            isolation: Isolation::InProcess,
            ..
        } => InProcessPlugin::launch(path, settings, allow_unsafe, events)
            .await
            .map(RunningPlugin::InProcess),
        Kind::Builtin(_) => Ok(RunningPlugin::Builtin(BuiltinPlugin::launch(
            &spec.name, settings, events,
        ))),
    }
}

impl RunningPlugin {
    /// Sends new settings; the answer arrives as [`Event::Applied`] on `events`.
    pub fn apply(&mut self, settings: &Value, events: &Events) {
        match self {
            RunningPlugin::Hosted(h) => h.apply(settings),
            RunningPlugin::Exec(e) => e.apply(settings, events),
            RunningPlugin::InProcess(p) => p.apply(settings),
            RunningPlugin::Builtin(b) => b.apply(settings, events),
        }
    }

    /// Plugin processes: sends a liveness ping (answered by [`Event::Pong`]); false for the
    /// kinds that have none.
    pub fn ping(&self, id: u64) -> bool {
        match self {
            RunningPlugin::Hosted(h) => {
                h.ping(id);
                true
            }
            _ => false,
        }
    }

    /// Passes a declared method on; the answer arrives as [`Event::MethodAnswer`].
    pub fn invoke(&self, id: u64, method: &str, payload: &Value) {
        match self {
            RunningPlugin::Hosted(h) => h.invoke(id, method, payload),
            RunningPlugin::Exec(e) => e.invoke(id, method, payload),
            RunningPlugin::InProcess(p) => p.invoke(id, method, payload),
            RunningPlugin::Builtin(b) => b.invoke(id),
        }
    }

    /// Passes a C2D message on; the answer arrives as [`Event::C2dTaken`].
    pub fn deliver(&self, id: u64, message: &C2dMessage) {
        match self {
            RunningPlugin::Hosted(h) => h.deliver(id, message),
            RunningPlugin::Exec(e) => e.deliver(id, message),
            RunningPlugin::InProcess(p) => p.deliver(id, message),
            RunningPlugin::Builtin(b) => b.deliver(id, message),
        }
    }

    pub fn pid(&self) -> Option<u32> {
        match self {
            RunningPlugin::Hosted(h) => Some(h.pid()),
            RunningPlugin::Exec(e) => Some(e.pid()),
            _ => None,
        }
    }

    /// Whether a hung plugin can be ended (an in-process plugin cannot).
    pub fn killable(&self) -> bool {
        !matches!(self, RunningPlugin::InProcess(_))
    }

    /// Asks the plugin to stop and waits up to `timeout`, then kills it.
    pub async fn stop(self, timeout: Duration) {
        match self {
            RunningPlugin::Hosted(h) => h.stop(timeout).await,
            RunningPlugin::Exec(e) => e.stop(timeout).await,
            RunningPlugin::InProcess(p) => p.stop(timeout).await,
            RunningPlugin::Builtin(b) => b.stop(),
        }
    }

    /// Ends the plugin at once (a failure was already decided).
    pub async fn kill(self) {
        match self {
            RunningPlugin::Hosted(h) => h.kill().await,
            RunningPlugin::Exec(e) => e.kill().await,
            RunningPlugin::InProcess(p) => p.kill(),
            RunningPlugin::Builtin(b) => b.stop(),
        }
    }
}
