//! Telemetry-source plugins: the supervisor that runs the `[[plugin]]` tables, and one file per
//! kind. Kinds: `library` (a shared library with the ABI of `plugins/sdk/include/
//! hubagent_plugin.h`, in a supervised child process by default, or `isolation = "in-process"`),
//! `exec` (any program writing JSON lines) and `builtin` (the simulated sensor). The rules are in
//! docs/plugins.md.
//!
//! | file | what it owns |
//! |---|---|
//! | `supervisor.rs` | [`Supervisor`]: the set of plugins, desired settings, reloads, shutdown |
//! | `task.rs` | one plugin's lifecycle: start, settings, liveness, restart with backoff, quarantine |
//! | `outlet.rs` | a plugin's messages on their way into the durable queue: rate, size, order |
//! | `calls.rs` | what the cloud asks of a plugin: declared methods, C2D filters, answers |
//! | `running.rs` | `RunningPlugin`: any kind behind one interface, and the `Event`s it reports |
//! | `answer.rs` | where a publish's answer goes: a waiting task, or the frame writer to a plugin process |
//! | `process.rs` | a plugin's child process: environment, limits, exit, stderr, signals |
//! | `hosted.rs` | a library plugin in a child process, seen from the daemon (frames of `protocol.rs`) |
//! | `host.rs` | `hubagent-plugin-host`: the child process side of a hosted library plugin |
//! | `host_program.rs` | where `hubagent-plugin-host` is found, kept open from the daemon's start |
//! | `in_process.rs` | a library plugin on a thread of the daemon (`isolation = "in-process"`) |
//! | `library.rs` | loading a plugin library and calling it through the ABI |
//! | `exec.rs` | exec plugins: a program and its JSON lines |
//! | `builtin.rs` | the simulated sensor |
//! | `protocol.rs` | the frames between the daemon and `hubagent-plugin-host` |
//! | `trust.rs` | which files may run as plugins |
//! | `preflight.rs` | trying a plugin before the daemon runs it (`config check`, `check`) |
//! | `trial.rs` | `hubagent plugins try`: one plugin alone, its output printed, input from stdin |
//! | `template.rs` | `hubagent plugins new`: a new plugin (Rust, C, Python) from `plugins/templates/` |
//! | `settings_access.rs` | ABI 1.2's settings accessors for C plugins: one value by key |
//! | `own_reported.rs` | a plugin's own reported properties, checked against IoT Hub's twin limits |

mod answer;
pub mod builtin;
pub mod calls;
mod exec;
pub mod host;
pub mod host_program;
mod hosted;
mod in_process;
pub mod library;
mod outlet;
pub mod own_reported;
pub mod preflight;
mod process;
pub mod protocol;
mod running;
pub mod sandbox;
mod secrets;
pub mod settings_access;
mod supervisor;
mod task;
pub mod template;
pub mod trial;
pub mod trust;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::config::plugin::{Isolation, Kind, PluginSpec};
use crate::util::encoding::cap_text;

pub use supervisor::Supervisor;

/// The longest `error` reported for a plugin, in UTF-8 bytes: the hub takes strings of up to
/// 4 KB and 32 KB of reported properties in all, shared by every plugin; the whole reason is in
/// the log and `hubagent plugins list`.
pub const MAX_REPORTED_ERROR: usize = 1024;

/// Where a plugin stands (reported as `status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    #[default]
    Starting,
    Running,
    /// Failed; waiting for the backoff before the next start.
    Restarting,
    /// Failed too often; tried again every `quarantine_retry`.
    Quarantined,
    /// The plugin refused the desired settings (`rejectedSettings` says why) and has no
    /// accepted ones to run on: it waits for new ones. One that refused a change and runs on
    /// its old settings is `Running`, the refusal beside it.
    RejectedSettings,
    Stopped,
}

impl State {
    /// As reported and logged: `running`, `rejected-settings` …
    pub fn name(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Running => "running",
            State::Restarting => "restarting",
            State::Quarantined => "quarantined",
            State::RejectedSettings => "rejected-settings",
            State::Stopped => "stopped",
        }
    }
}

/// A plugin's live status and counters.
#[derive(Debug, Clone, Default)]
pub struct PluginStatus {
    pub state: State,
    pub error: Option<String>,
    /// Why the plugin refused the desired settings, while it does (it runs on its last
    /// accepted ones, or waits in `RejectedSettings`).
    pub rejected: Option<String>,
    /// Exec plugins: lines that were none of the protocol's (logged, quoted).
    pub junk_lines: u64,
    /// What the plugin reports of itself (ABI 1.2, exec `{"reported": …}`), checked.
    pub own_reported: Option<Map<String, Value>>,
    /// Something the operator should look at while the plugin runs (an exec plugin silent
    /// for `warn_if_silent`).
    pub warning: Option<String>,
    pub last_failure: Option<String>,
    /// The desired `$version` the status refers to.
    pub desired_version: u64,
    /// The settings the plugin runs with.
    pub settings: Value,
    /// Exec plugins: the settings before the last change (restored on a late rejection).
    pub previous: Option<Map<String, Value>>,
    pub published: u64,
    pub dropped: u64,
    pub logs_dropped: u64,
    pub restarts: u64,
    pub abi: Option<String>,
    pub plugin_version: Option<String>,
    pub pid: Option<u32>,
    pub health: Option<String>,
    pub health_detail: Option<String>,
    /// The secrets of the settings (`{ file = … }`), so that nothing shows them.
    pub secrets: secrets::Secrets,
    /// How the plugin's process is confined ([`sandbox::Confinement::describe`]).
    pub sandbox: Option<Value>,
    /// The methods and C2D messages it takes, once it said (kept across restarts).
    pub declarations: Option<calls::Declarations>,
}

/// A shareable, read-only view of the plugins (the control socket answers from it).
#[derive(Clone, Default)]
pub struct Registry(Arc<Mutex<BTreeMap<String, View>>>);

type View = (PluginSpec, Arc<Mutex<PluginStatus>>);

impl Registry {
    fn set(&self, name: &str, view: Option<View>) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match view {
            Some(v) => {
                map.insert(name.to_string(), v);
            }
            None => {
                map.remove(name);
            }
        }
    }

    /// `reported.plugins`: per plugin, status, the desired version it refers to, the error,
    /// the settings in force and the counters.
    pub fn reported(&self) -> Value {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Map::new();
        for (name, (spec, shared)) in map.iter() {
            let s = shared.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let mut v = json!({
                "kind": spec.kind.name(),
                "status": s.state,
                "desiredVersion": s.desired_version,
                "settings": s.secrets.redact(&s.settings),
                "published": s.published,
                "dropped": s.dropped,
                "restarts": s.restarts,
            });
            if let Some(e) = &s.error {
                v["error"] = json!(cap_text(&s.secrets.redact_text(e), MAX_REPORTED_ERROR));
            }
            if let Some(r) = &s.rejected {
                v["rejectedSettings"] =
                    json!(cap_text(&s.secrets.redact_text(r), MAX_REPORTED_ERROR));
            }
            if let Some(w) = &s.warning {
                v["warning"] = json!(cap_text(&s.secrets.redact_text(w), MAX_REPORTED_ERROR));
            }
            if matches!(spec.kind, Kind::Exec { .. }) {
                v["junkLines"] = json!(s.junk_lines);
            }
            if let Some(own) = &s.own_reported {
                v["properties"] = Value::Object(own.clone());
            }
            if let Some(abi) = &s.abi {
                v["abi"] = json!(abi);
            }
            out.insert(name.clone(), v);
        }
        Value::Object(out)
    }

    /// `hubagent plugins list` / status: the reported view plus where each plugin comes from.
    pub fn snapshot(&self) -> Value {
        let mut out = self.reported();
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for (name, (spec, shared)) in map.iter() {
            let s = shared.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let v = &mut out[name];
            match &spec.kind {
                Kind::Builtin(b) => v["builtin"] = json!(b),
                Kind::Library {
                    path, isolation, ..
                } => {
                    v["path"] = json!(path);
                    v["isolation"] = json!(match isolation {
                        Isolation::Process => "process",
                        Isolation::InProcess => "in-process",
                    });
                }
                Kind::Exec { command, .. } => v["command"] = json!(command),
            }
            v["pid"] = json!(s.pid);
            v["pluginVersion"] = json!(s.plugin_version);
            v["health"] = json!(s.health);
            v["healthDetail"] = json!(s.health_detail.as_deref().map(|d| s.secrets.redact_text(d)));
            v["lastFailure"] = json!(s.last_failure.as_deref().map(|f| s.secrets.redact_text(f)));
            // The whole reason, not the twin's capped one.
            if let Some(e) = &s.error {
                v["error"] = json!(s.secrets.redact_text(e));
            }
            if let Some(r) = &s.rejected {
                v["rejectedSettings"] = json!(s.secrets.redact_text(r));
            }
            v["logsDropped"] = json!(s.logs_dropped);
            if let Some(d) = &s.declarations {
                v["methods"] = json!(d.methods);
                v["c2dFilter"] = json!(d.c2d_filter);
            }
            v["maxRate"] = json!(spec.limits.max_rate);
            v["sandbox"] = json!(s.sandbox);
        }
        out
    }
}
