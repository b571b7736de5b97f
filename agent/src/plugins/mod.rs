//! Telemetry-source plugins: the `[[plugin]]` tables, the supervisor that runs them, and the
//! plugin host. Kinds: `library` (a shared library with the ABI of `plugins/sdk/include/
//! hubagent_plugin.h`, in a supervised child process by default, or `isolation = "in-process"`),
//! `exec` (any program writing JSON lines) and `builtin` (the simulated sensor). The rules are in
//! docs/plugins.md.

pub mod builtin;
pub mod host;
pub mod library;
pub mod protocol;
pub mod runner;
pub mod supervisor;
pub mod trust;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hubagent_plugin_sdk::abi;
use serde::Serialize;
use serde_json::{Map, Value, json};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;

use crate::config::Config;
use crate::config::plugin::{Kind, PluginSpec};
use crate::state::TwinCache;
use crate::telemetry::DurablePublisher;
use crate::util::json::merge;
use library::PluginMessage;
use supervisor::{Cmd, Task};

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
    /// The plugin refused the desired settings (`error` says why); it runs on its last accepted
    /// ones, or waits for new ones when it never accepted any.
    RejectedSettings,
    Stopped,
}

/// A plugin's live status and counters.
#[derive(Debug, Clone, Default)]
pub struct PluginStatus {
    pub state: State,
    pub error: Option<String>,
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
}

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Option<Instant>,
}

impl TokenBucket {
    pub fn new(rate: f64, burst: f64) -> TokenBucket {
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: None,
        }
    }

    /// How long until a token is available (zero when one is).
    pub fn wait_time(&mut self, now: Instant) -> Duration {
        self.refill(now);
        if self.tokens >= 1.0 || self.rate <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((1.0 - self.tokens) / self.rate)
        }
    }

    fn refill(&mut self, now: Instant) {
        if let Some(last) = self.last {
            let elapsed = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        }
        self.last = Some(now);
    }

    pub fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// One line an exec plugin wrote.
#[derive(Debug, PartialEq)]
pub enum ExecLine {
    Message(PluginMessage),
    Log(i32, String),
    Health(i32, String),
    Reject(String),
}

/// Parses an exec plugin's line: `{"body": …, "contentType": …, "contentEncoding": …,
/// "properties": {…}}`, `{"log": "…", "level": "info"}`, `{"health": "ok|degraded|failed",
/// "detail": "…"}` or `{"rejectSettings": "why"}`. A body that is not a string is sent as JSON.
pub fn exec_line(text: &str) -> Result<ExecLine, String> {
    let value: Value = serde_json::from_str(text).map_err(|e| format!("not JSON ({e})"))?;
    let Value::Object(obj) = value else {
        return Err("not a JSON object".into());
    };
    if let Some(reason) = obj.get("rejectSettings") {
        return Ok(ExecLine::Reject(
            reason
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| reason.to_string()),
        ));
    }
    if let Some(text) = obj.get("log") {
        let level = match obj.get("level").and_then(|l| l.as_str()).unwrap_or("info") {
            "error" => abi::LOG_ERROR,
            "warn" | "warning" => abi::LOG_WARN,
            "debug" => abi::LOG_DEBUG,
            "trace" => abi::LOG_TRACE,
            _ => abi::LOG_INFO,
        };
        let text = text
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| text.to_string());
        return Ok(ExecLine::Log(level, text));
    }
    if let Some(h) = obj.get("health") {
        let state = match h.as_str() {
            Some("ok") => abi::HEALTH_OK,
            Some("degraded") => abi::HEALTH_DEGRADED,
            Some("failed") => abi::HEALTH_FAILED,
            _ => return Err("health must be \"ok\", \"degraded\" or \"failed\"".into()),
        };
        let detail = obj
            .get("detail")
            .and_then(|d| d.as_str())
            .unwrap_or("")
            .to_string();
        return Ok(ExecLine::Health(state, detail));
    }
    let body = obj.get("body").ok_or("no \"body\"")?;
    let text_field = |key: &str| -> Result<Option<String>, String> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(format!("\"{key}\" must be a string")),
        }
    };
    let (body, default_type) = match body {
        Value::String(s) => (s.clone().into_bytes(), None),
        other => (other.to_string().into_bytes(), Some("application/json")),
    };
    let content_type = text_field("contentType")?.or(default_type.map(str::to_string));
    let content_encoding = text_field("contentEncoding")?
        .or_else(|| content_type.as_ref().map(|_| "utf-8".to_string()));
    let mut properties = Vec::new();
    match obj.get("properties") {
        None | Some(Value::Null) => {}
        Some(Value::Object(p)) => {
            for (k, v) in p {
                let v = v
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string());
                properties.push((k.clone(), v));
            }
        }
        Some(_) => return Err("\"properties\" must be an object".into()),
    }
    Ok(ExecLine::Message(PluginMessage {
        body,
        content_type,
        content_encoding,
        properties,
    }))
}

/// The `settings` table overlaid with `desired.plugins.<name>` (which can change settings only).
pub fn merged_settings(spec: &PluginSpec, twin: &TwinCache) -> Map<String, Value> {
    let mut settings = spec.settings.clone();
    if let Some(Value::Object(desired)) =
        twin.desired.get("plugins").and_then(|p| p.get(&spec.name))
    {
        merge(&mut settings, desired);
    }
    settings
}

struct Entry {
    spec: PluginSpec,
    shared: Arc<Mutex<PluginStatus>>,
    cmds: mpsc::UnboundedSender<Cmd>,
    task: tokio::task::JoinHandle<()>,
    sent: (Map<String, Value>, u64),
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
                "settings": s.settings,
                "published": s.published,
                "dropped": s.dropped,
                "restarts": s.restarts,
            });
            if let Some(e) = &s.error {
                v["error"] = json!(e);
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
                Kind::Library { path, isolation } => {
                    v["path"] = json!(path);
                    v["isolation"] = json!(match isolation {
                        crate::config::plugin::Isolation::Process => "process",
                        crate::config::plugin::Isolation::InProcess => "in-process",
                    });
                }
                Kind::Exec { command, .. } => v["command"] = json!(command),
            }
            v["pid"] = json!(s.pid);
            v["pluginVersion"] = json!(s.plugin_version);
            v["health"] = json!(s.health);
            v["healthDetail"] = json!(s.health_detail);
            v["lastFailure"] = json!(s.last_failure);
            v["logsDropped"] = json!(s.logs_dropped);
            v["maxRate"] = json!(spec.limits.max_rate);
        }
        out
    }
}

/// Runs every configured plugin; the daemon's view of them.
pub struct Supervisor {
    registry: Registry,
    entries: BTreeMap<String, Entry>,
    publisher: DurablePublisher,
    changes: Arc<Notify>,
    allow_unsafe: bool,
    max_message_size: usize,
}

impl Supervisor {
    pub fn start(
        config: &Config,
        twin: &TwinCache,
        publisher: DurablePublisher,
        registry: Registry,
    ) -> Supervisor {
        let allow_unsafe = config.agent.allow_unsafe_plugin_paths;
        if allow_unsafe {
            if trust::override_active(true) {
                tracing::warn!(
                    "allow_unsafe_plugin_paths = true: plugin files are loaded without the ownership and permission check (development only)"
                );
            } else {
                tracing::warn!(
                    "allow_unsafe_plugin_paths is ignored because the agent runs as root"
                );
            }
        }
        let mut s = Supervisor {
            registry,
            entries: BTreeMap::new(),
            publisher,
            changes: Arc::new(Notify::new()),
            allow_unsafe,
            max_message_size: config.hub.max_message_size as usize,
        };
        for spec in &config.plugins {
            s.add(spec.clone(), twin);
        }
        s
    }

    fn add(&mut self, spec: PluginSpec, twin: &TwinCache) {
        let settings = merged_settings(&spec, twin);
        let shared = Arc::new(Mutex::new(PluginStatus::default()));
        let (cmds, rx) = mpsc::unbounded_channel();
        let task = Task {
            spec: spec.clone(),
            shared: shared.clone(),
            changes: self.changes.clone(),
            publisher: self.publisher.clone(),
            allow_unsafe: self.allow_unsafe,
            max_message_size: self.max_message_size,
            desired: settings.clone(),
            desired_version: twin.desired_version,
        };
        let task = tokio::spawn(task.run(rx));
        tracing::info!(plugin = %spec.name, kind = spec.kind.name(), "plugin configured");
        self.registry
            .set(&spec.name, Some((spec.clone(), shared.clone())));
        self.entries.insert(
            spec.name.clone(),
            Entry {
                spec,
                shared,
                cmds,
                task,
                sent: (settings, twin.desired_version),
            },
        );
    }

    /// Notified whenever a plugin's state changes (worth a reported-properties update).
    pub fn changes(&self) -> Arc<Notify> {
        self.changes.clone()
    }

    /// Sends each plugin its settings merged with `desired.plugins.<name>` when they changed,
    /// and acknowledges the desired version.
    pub fn apply_desired(&mut self, twin: &TwinCache) {
        for entry in self.entries.values_mut() {
            let settings = merged_settings(&entry.spec, twin);
            let next = (settings, twin.desired_version);
            if next != entry.sent {
                let _ = entry.cmds.send(Cmd::Settings {
                    settings: next.0.clone(),
                    version: next.1,
                });
                entry.sent = next;
            }
        }
    }

    /// A reload: new plugins start, removed ones stop, changed ones (anything but `settings`)
    /// restart, and settings changes apply live.
    pub fn reconfigure(&mut self, config: &Config, twin: &TwinCache) {
        let mut wanted = BTreeMap::new();
        for spec in &config.plugins {
            wanted.insert(spec.name.clone(), spec.clone());
        }
        let names: Vec<String> = self.entries.keys().cloned().collect();
        for name in names {
            let keep = wanted.get(&name).is_some_and(|spec| {
                let old = &self.entries[&name].spec;
                spec.kind == old.kind && spec.limits == old.limits
            });
            if !keep && let Some(entry) = self.entries.remove(&name) {
                self.registry.set(&name, None);
                tracing::info!(plugin = %name, "plugin removed or changed; stopping it");
                tokio::spawn(stop_entry(entry));
            }
        }
        for (name, spec) in wanted {
            match self.entries.get_mut(&name) {
                Some(entry) => {
                    entry.spec.settings = spec.settings;
                    self.registry
                        .set(&name, Some((entry.spec.clone(), entry.shared.clone())));
                }
                None => self.add(spec, twin),
            }
        }
        self.changes.notify_one();
        self.apply_desired(twin);
    }

    pub fn reported(&self) -> Value {
        self.registry.reported()
    }

    pub fn snapshot(&self) -> Value {
        self.registry.snapshot()
    }

    /// Stops every plugin (each within its `callback_timeout`, then killed).
    pub async fn shutdown(&mut self) {
        let entries = std::mem::take(&mut self.entries);
        let stops: Vec<_> = entries
            .into_values()
            .map(|e| tokio::spawn(stop_entry(e)))
            .collect();
        for s in stops {
            let _ = s.await;
        }
    }
}

async fn stop_entry(entry: Entry) {
    let (tx, rx) = oneshot::channel();
    if entry.cmds.send(Cmd::Shutdown(tx)).is_ok() {
        let limit = entry.spec.limits.callback_timeout + Duration::from_secs(2);
        if tokio::time::timeout(limit, rx).await.is_err() {
            entry.task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_bucket_allows_burst_then_rate() {
        let mut b = TokenBucket::new(10.0, 5.0);
        let t0 = Instant::now();
        assert_eq!((0..8).filter(|_| b.take(t0)).count(), 5);
        // 0.35 s later: 3.5 tokens, so 3 more.
        let t1 = t0 + Duration::from_millis(350);
        assert_eq!((0..8).filter(|_| b.take(t1)).count(), 3);
        // Long quiet: capped at the burst.
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!((0..100).filter(|_| b.take(t2)).count(), 5);
        // Empty: the next token is 0.1 s away, half of it after 50 ms.
        assert_eq!(b.wait_time(t2), Duration::from_millis(100));
        let t3 = t2 + Duration::from_millis(50);
        assert_eq!(b.wait_time(t3).as_millis(), 50);
        assert!(!b.take(t3));
        assert!(b.wait_time(t3 + Duration::from_millis(50)).is_zero());
    }

    #[test]
    fn exec_lines_parse() {
        let m = exec_line(r#"{"body": {"t": 21.5}, "properties": {"unit": "C", "n": 3}}"#).unwrap();
        assert_eq!(
            m,
            ExecLine::Message(PluginMessage {
                body: br#"{"t":21.5}"#.to_vec(),
                content_type: Some("application/json".into()),
                content_encoding: Some("utf-8".into()),
                properties: vec![("n".into(), "3".into()), ("unit".into(), "C".into())],
            })
        );
        let m = exec_line(r#"{"body": "raw text"}"#).unwrap();
        assert!(matches!(
            m,
            ExecLine::Message(PluginMessage {
                content_type: None,
                ..
            })
        ));
        assert_eq!(
            exec_line(r#"{"rejectSettings": "interval too short"}"#).unwrap(),
            ExecLine::Reject("interval too short".into())
        );
        assert_eq!(
            exec_line(r#"{"log": "hi", "level": "warn"}"#).unwrap(),
            ExecLine::Log(abi::LOG_WARN, "hi".into())
        );
        assert!(exec_line("not json").is_err());
        assert!(exec_line(r#"{"nobody": 1}"#).is_err());
        assert!(exec_line(r#"{"body": 1, "properties": [1]}"#).is_err());
    }

    #[test]
    fn desired_overrides_settings_only() {
        let spec = PluginSpec::from_table(
            &"name = \"p\"\nkind = \"exec\"\ncommand = [\"/bin/true\"]\n[settings]\ninterval = \"5s\"\nunit = \"C\"\n"
                .parse::<toml::Table>()
                .unwrap(),
        )
        .unwrap();
        let twin = TwinCache {
            desired:
                json!({"plugins": {"p": {"interval": "1s", "unit": null, "command": "rm -rf /"}}})
                    .as_object()
                    .unwrap()
                    .clone(),
            ..TwinCache::default()
        };
        let merged = merged_settings(&spec, &twin);
        assert_eq!(merged["interval"], "1s");
        assert!(!merged.contains_key("unit"));
        // "command" lands in the settings the plugin sees, never in what is run.
        assert_eq!(merged["command"], "rm -rf /");
        assert!(
            matches!(spec.kind, Kind::Exec { ref command, .. } if command == &vec!["/bin/true".to_string()])
        );
    }
}
