//! [`Supervisor`]: the daemon's view of the plugins. It starts one [`Task`] per `[[plugin]]`
//! table, passes each its settings overlaid with `desired.plugins.<name>`, starts, stops and
//! restarts them on a reload, and stops them all at shutdown.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::sync::{Notify, mpsc, oneshot};

use super::calls::{C2dMessage, MethodAnswer};
use super::secrets::{self, Secrets};
use super::task::{Cmd, Task};
use super::{PluginStatus, Registry, trust};
use crate::config::Config;
use crate::config::plugin::PluginSpec;
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
    max_message_size: usize,
    /// Plugin names in the order of the `[[plugin]]` tables: the first whose filter matches
    /// takes a C2D message.
    order: Vec<String>,
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
            order: config.plugins.iter().map(|p| p.name.clone()).collect(),
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
        self.order = config.plugins.iter().map(|p| p.name.clone()).collect();
        self.changes.notify_one();
        self.apply_desired(twin);
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
