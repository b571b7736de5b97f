//! The daemon's answers on the control socket (`hubagent status`, `reload`, `reprovision`,
//! `plugins list`): read from shared status, or turned into a [`Command`] for the lifecycle.

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::Command;
use super::status::Status;
use crate::config::Config;
use crate::plugins::Registry;
use crate::system::control::{Handler, Request};
use crate::telemetry::Queue;

/// Answers the control socket.
pub(super) struct ControlHandler {
    pub plugins: Registry,
    pub status: Arc<Status>,
    pub queue: Arc<Queue>,
    pub commands: mpsc::UnboundedSender<Command>,
    pub config_path: PathBuf,
}

impl Handler for ControlHandler {
    fn handle(&self, request: Request) -> Result<Value, String> {
        match request {
            Request::Status => {
                self.status.record_queue(self.queue.stats());
                serde_json::to_value(self.status.snapshot_with(&self.plugins))
                    .map_err(|e| e.to_string())
            }
            Request::Reprovision => {
                self.commands
                    .send(Command::Reprovision)
                    .map_err(|_| "the daemon is shutting down".to_string())?;
                Ok(json!({"reprovisioning": true}))
            }
            Request::Reload => {
                let config =
                    Config::load(&self.config_path, &|k| std::env::var(k).ok()).map_err(|e| {
                        format!("configuration not reloaded, the running one stays: {e}")
                    })?;
                let changed = self.status.snapshot().fingerprint.as_deref()
                    != Some(config.provisioning_fingerprint().as_str());
                self.commands
                    .send(Command::Reload(Box::new(config)))
                    .map_err(|_| "the daemon is shutting down".to_string())?;
                Ok(json!({"reloaded": true, "provisioningChanged": changed}))
            }
            Request::PluginsList => Ok(self.plugins.snapshot()),
            Request::PluginRestart { name } => {
                let plugins = self.plugins.snapshot();
                if plugins.get(&name).is_none() {
                    let known: Vec<&String> = plugins
                        .as_object()
                        .map(|p| p.keys().collect())
                        .unwrap_or_default();
                    return Err(format!(
                        "no plugin named '{name}' (configured: {})",
                        known
                            .iter()
                            .map(|k| k.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
                self.commands
                    .send(Command::RestartPlugin(name.clone()))
                    .map_err(|_| "the daemon is shutting down".to_string())?;
                Ok(json!({"restarting": name}))
            }
        }
    }
}
