//! [`Supervisor`]: the daemon's view of the plugins. It starts one [`Task`] per `[[plugin]]`
//! table, passes each its settings overlaid with `desired.plugins.<name>`, starts, stops and
//! restarts them on a reload, and stops them all at shutdown.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::sync::{Notify, mpsc, oneshot};

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
    max_message_size: usize,
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
            max_message_size: config.hub.max_message_size as usize,
        };
        for spec in &config.plugins {
            s.add(spec.clone(), twin);
        }
        s
    }

    fn add(&mut self, spec: PluginSpec, twin: &TwinCache) {
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

    /// A reload: new plugins start, removed ones stop, changed ones (anything but `settings`)
    /// restart, and settings changes apply live.
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
            let keep = wanted.get(&name).is_some_and(|spec| {
                let old = &self.entries[&name].spec;
                spec.kind == old.kind && spec.limits == old.limits && spec.sandbox == old.sandbox
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
