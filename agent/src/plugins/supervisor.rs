//! [`Supervisor`]: the daemon's view of the plugins. It starts one [`Task`] per `[[plugin]]`
//! table, passes each its settings overlaid with `desired.plugins.<name>`, starts, stops and
//! restarts them on a reload, and stops them all at shutdown.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::sync::{Notify, mpsc, oneshot};

use super::calls::{C2dMessage, MethodAnswer};
use super::sandbox::Confinement;
use super::secrets::{self, Secrets};
use super::task::{Cmd, Task};
use super::{PluginStatus, Registry, trust};
use crate::config::plugin::PluginSpec;
use crate::config::{Config, SandboxMode};
use crate::state::TwinCache;
use crate::telemetry::DurablePublisher;
use crate::util::json::merge;

/// The `settings` table, its secrets read ([`secrets::resolve`]), overlaid with
/// `desired.plugins.<name>` (which can change settings only, and whose `{"file": …}` objects are
/// plain data: the twin cannot make the agent read a file).
pub fn merged_settings(spec: &PluginSpec, twin: &TwinCache) -> (Map<String, Value>, Secrets) {
    let (mut settings, secrets) = secrets::resolve(&spec.name, &spec.settings);
    if let Some(Value::Object(desired)) =
        twin.desired.get("plugins").and_then(|p| p.get(&spec.name))
    {
        merge(&mut settings, desired);
    }
    (settings, secrets)
}

struct Entry {
    spec: PluginSpec,
    /// The content of the files it runs from when it was started ([`files_digest`]).
    files: String,
    shared: Arc<Mutex<PluginStatus>>,
    cmds: mpsc::UnboundedSender<Cmd>,
    task: tokio::task::JoinHandle<()>,
    sent: (Map<String, Value>, u64),
}

/// Runs every configured plugin; the daemon's view of them.
pub struct Supervisor {
    registry: Registry,
    entries: BTreeMap<String, Entry>,
    publisher: DurablePublisher,
    changes: Arc<Notify>,
    allow_unsafe: bool,
    /// Shared with the tasks, replaced on a reload: a plugin (re)started after it is kept from
    /// the secrets of the configuration in force.
    confinement: Arc<RwLock<Confinement>>,
    /// Where the configuration was read from (the sandbox keeps plugins from it).
    config_path: std::path::PathBuf,
    /// Unknown names under `desired.plugins` already logged.
    unknown_said: std::collections::BTreeSet<String>,
    max_message_size: usize,
    /// Plugin names in the order of the `[[plugin]]` tables: the first whose filter matches
    /// takes a C2D message.
    order: Vec<String>,
}

impl Supervisor {
    pub fn start(
        config: &Config,
        config_path: &Path,
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
        let confinement = Confinement::new(config, config_path);
        log_sandbox_support(&confinement, config);
        let confinement = Arc::new(RwLock::new(confinement));
        let mut s = Supervisor {
            registry,
            entries: BTreeMap::new(),
            publisher,
            changes: Arc::new(Notify::new()),
            allow_unsafe,
            confinement,
            config_path: config_path.to_path_buf(),
            unknown_said: Default::default(),
            max_message_size: config.hub.max_message_size as usize,
            order: config.plugins.iter().map(|p| p.name.clone()).collect(),
        };
        for spec in &config.plugins {
            s.add(spec.clone(), twin);
        }
        s
    }

    fn add(&mut self, spec: PluginSpec, twin: &TwinCache) {
        let files = files_digest(&spec);
        let (settings, secrets) = merged_settings(&spec, twin);
        let shared = Arc::new(Mutex::new(PluginStatus {
            secrets,
            ..PluginStatus::default()
        }));
        let (cmds, rx) = mpsc::unbounded_channel();
        let task = Task {
            spec: spec.clone(),
            shared: shared.clone(),
            changes: self.changes.clone(),
            publisher: self.publisher.clone(),
            allow_unsafe: self.allow_unsafe,
            confinement: self.confinement.clone(),
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
                files,
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
            let (settings, secrets) = merged_settings(&entry.spec, twin);
            let next = (settings, twin.desired_version);
            if next != entry.sent {
                // Before the settings go: what shows them must know what to hide.
                entry
                    .shared
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .secrets = secrets;
                let _ = entry.cmds.send(Cmd::Settings {
                    settings: next.0.clone(),
                    version: next.1,
                });
                entry.sent = next;
            }
        }
    }

    /// A reload: new plugins start, removed ones stop, changed ones restart, and settings
    /// changes apply live. Changed means its table (anything but `settings`), the content of
    /// the files it runs from (a rebuilt library, an edited script), or a plugin in quarantine,
    /// whose cause the operator may have fixed.
    pub fn reconfigure(&mut self, config: &Config, twin: &TwinCache) {
        // Plugins started from now on are kept from the secrets of the new configuration.
        *self.confinement.write().unwrap_or_else(|e| e.into_inner()) =
            Confinement::new(config, &self.config_path);
        let mut wanted = BTreeMap::new();
        for spec in &config.plugins {
            wanted.insert(spec.name.clone(), spec.clone());
        }
        let names: Vec<String> = self.entries.keys().cloned().collect();
        for name in names {
            let why = match wanted.get(&name) {
                None => Some("removed"),
                Some(spec) => restart_reason(&self.entries[&name], spec),
            };
            if let Some(why) = why
                && let Some(entry) = self.entries.remove(&name)
            {
                self.registry.set(&name, None);
                tracing::info!(plugin = %name, "plugin {why}; stopping it");
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
        self.order = config.plugins.iter().map(|p| p.name.clone()).collect();
        self.changes.notify_one();
        self.apply_desired(twin);
    }

    /// `hubagent plugins restart NAME`: stops the plugin and starts it afresh (its failure
    /// history and quarantine forgotten), with the configuration in force.
    pub fn restart(&mut self, name: &str, twin: &TwinCache) -> Result<(), String> {
        let entry = self.entries.remove(name).ok_or_else(|| {
            let known: Vec<&str> = self.entries.keys().map(String::as_str).collect();
            format!(
                "no plugin named '{name}' (configured: {})",
                known.join(", ")
            )
        })?;
        let spec = entry.spec.clone();
        tracing::info!(plugin = %name, "plugin restart requested");
        tokio::spawn(stop_entry(entry));
        self.add(spec, twin);
        self.changes.notify_one();
        Ok(())
    }

    /// The names under `desired.plugins` that no `[[plugin]]` table has (a typo in the cloud),
    /// each logged once.
    pub fn unknown_desired(&mut self, twin: &TwinCache) -> Vec<String> {
        let unknown: Vec<String> = twin
            .desired
            .get("plugins")
            .and_then(Value::as_object)
            .map(|p| {
                p.keys()
                    .filter(|name| !self.entries.contains_key(*name))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        for name in &unknown {
            if self.unknown_said.insert(name.clone()) {
                let configured: Vec<&str> = self.entries.keys().map(String::as_str).collect();
                tracing::warn!(
                    "desired.plugins.{name} names no configured plugin (configured: {}); it is ignored",
                    configured.join(", ")
                );
            }
        }
        unknown
    }

    /// A direct method `method` for the plugin `plugin`: resolves to the plugin's answer, or to
    /// the agent's 404 (no such plugin or method), 503 (not running), 504 (no answer within
    /// the plugin's `method_timeout`) or 500 (it failed during the call). Never waits longer.
    pub fn invoke(
        &self,
        plugin: &str,
        method: &str,
        payload: Value,
    ) -> impl Future<Output = MethodAnswer> + Send + 'static {
        let target = self
            .entries
            .get(plugin)
            .map(|e| (e.cmds.clone(), e.spec.limits.method_timeout));
        let unknown = (target.is_none()).then(|| {
            MethodAnswer::error(
                404,
                format!(
                    "no plugin '{plugin}' (plugins: {})",
                    if self.order.is_empty() {
                        "none".to_string()
                    } else {
                        self.order.join(", ")
                    }
                ),
            )
        });
        let (plugin, method) = (plugin.to_string(), method.to_string());
        // Sent now, not when the future is first polled: calls reach the plugin in the order
        // the hub sent them.
        let sent = target.map(|(cmds, timeout)| {
            let (reply, answer) = oneshot::channel();
            let sent = cmds.send(Cmd::Method {
                method: method.clone(),
                payload,
                reply,
            });
            (sent.is_ok(), answer, timeout)
        });
        async move {
            let Some((sent, answer, timeout)) = sent else {
                return unknown.expect("set when there is no target");
            };
            if !sent {
                return MethodAnswer::error(503, format!("plugin '{plugin}' is stopped"));
            }
            match tokio::time::timeout(timeout, answer).await {
                Ok(Ok(answer)) => answer,
                Ok(Err(_)) => MethodAnswer::error(
                    500,
                    format!("plugin '{plugin}' ended during the call of '{method}'"),
                ),
                Err(_) => MethodAnswer::error(
                    504,
                    format!(
                        "plugin '{plugin}' did not answer '{method}' within its method_timeout of {}",
                        humantime::format_duration(timeout)
                    ),
                ),
            }
        }
    }

    /// The plugin that takes a C2D message: the first, in the order of the `[[plugin]]` tables,
    /// whose declared filter matches its properties (a plugin restarting is still chosen by
    /// the filter it declared: the message then waits at the hub, not elsewhere). `None`: no
    /// plugin takes it. The future resolves to `Ok` once the plugin took the message; it gives
    /// up after the plugin's `callback_timeout`.
    pub fn deliver_c2d(
        &self,
        message: C2dMessage,
    ) -> Option<(
        String,
        impl Future<Output = Result<(), String>> + Send + 'static,
    )> {
        let name = self.order.iter().find(|name| {
            self.entries.get(*name).is_some_and(|e| {
                e.shared
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .declarations
                    .as_ref()
                    .is_some_and(|d| d.takes(&message.properties))
            })
        })?;
        let entry = &self.entries[name];
        let (cmds, timeout) = (entry.cmds.clone(), entry.spec.limits.callback_timeout);
        let plugin = name.clone();
        // Sent now, not when the future is first polled: messages reach the plugin in the
        // order the hub sent them.
        let (reply, taken) = oneshot::channel();
        let sent = cmds.send(Cmd::C2d { message, reply }).is_ok();
        Some((name.clone(), async move {
            if !sent {
                return Err(format!("plugin '{plugin}' is stopped"));
            }
            match tokio::time::timeout(timeout, taken).await {
                Ok(Ok(taken)) => taken,
                Ok(Err(_)) => Err(format!("plugin '{plugin}' ended before taking it")),
                Err(_) => Err(format!(
                    "plugin '{plugin}' did not take it within its callback_timeout of {}",
                    humantime::format_duration(timeout)
                )),
            }
        }))
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

/// Why a reload restarts a running plugin, if it does.
fn restart_reason(entry: &Entry, spec: &PluginSpec) -> Option<&'static str> {
    let old = &entry.spec;
    if spec.kind != old.kind || spec.limits != old.limits || spec.sandbox != old.sandbox {
        return Some("changed in the configuration");
    }
    if files_digest(spec) != entry.files {
        return Some("files changed (rebuilt or edited)");
    }
    let state = entry.shared.lock().unwrap_or_else(|e| e.into_inner()).state;
    (state == super::State::Quarantined).then_some("quarantined; trying it again")
}

/// A digest of the content of the files a plugin runs from (its library; an exec plugin's
/// program and the files its command names), so a reload sees a rebuilt or edited plugin.
fn files_digest(spec: &PluginSpec) -> String {
    let (executables, files) = super::sandbox::own_files(spec);
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    for path in executables.iter().chain(&files) {
        context.update(path.as_os_str().as_encoded_bytes());
        match std::fs::read(path) {
            Ok(content) => context.update(&content),
            Err(e) => context.update(e.to_string().as_bytes()),
        }
    }
    context
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Says once, at start, what the kernel cannot enforce of the plugin sandbox.
fn log_sandbox_support(confinement: &Confinement, config: &Config) {
    let confined = config.plugins.iter().filter(|p| p.confinable()).count();
    let missing = confinement.support().missing();
    match confinement.mode() {
        SandboxMode::Off if confined > 0 => tracing::warn!(
            "plugin_sandbox = \"off\": {confined} plugin(s) run unconfined, with the agent's access to its keys and state"
        ),
        SandboxMode::BestEffort if !missing.is_empty() && confined > 0 => tracing::warn!(
            "the plugin sandbox cannot be fully enforced on this kernel; missing: {}",
            missing.join("; ")
        ),
        _ => {}
    }
    for spec in config.plugins.iter().filter(|p| !p.confinable()) {
        if matches!(spec.kind, crate::config::plugin::Kind::Library { .. }) {
            tracing::info!(plugin = %spec.name, "isolation = \"in-process\": the plugin runs inside the agent and is not sandboxed");
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
    use serde_json::json;

    use super::*;
    use crate::config::plugin::Kind;

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
        let (merged, _) = merged_settings(&spec, &twin);
        assert_eq!(merged["interval"], "1s");
        assert!(!merged.contains_key("unit"));
        // "command" lands in the settings the plugin sees, never in what is run.
        assert_eq!(merged["command"], "rm -rf /");
        assert!(
            matches!(spec.kind, Kind::Exec { ref command, .. } if command == &vec!["/bin/true".to_string()])
        );
    }
}
