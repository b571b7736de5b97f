//! `hubagent run`: wires configuration, keys, provisioning, the hub session, the twin cache and the
//! telemetry sources together, and talks to systemd.
//!
//! The provisioning rules (docs/design.md, "Provisioning rules"): a valid cached assignment with an unchanged fingerprint
//! means no DPS call; a changed fingerprint (reload or restart) or `hubagent reprovision` means a
//! fresh registration; a hub that refuses the credentials triggers one reprovisioning, with
//! backoff; DPS unreachable means retrying in-process forever with capped backoff and jitter.

pub mod status;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, watch};

use crate::config::{Config, ConfigError};
use crate::hub::{self, HubParams, SessionEvent, SessionHandle};
use crate::identity::Credential;
use crate::plugins::{Registry, Supervisor};
use crate::provisioning::{
    Assignment, client_tls, load_credential, manual_connection_string, registration_id,
};
use crate::state::{ProvisioningCache, StateDir, StateError, TwinCache};
use crate::system::control::{self, Request};
use crate::system::systemd;
use crate::telemetry::pump::pump;
use crate::telemetry::{DurablePublisher, Queue, QueueError, QueueSettings};
use crate::util::backoff::Backoff;
use crate::util::json::{diff, merge};
use crate::util::time::{ClockWatch, now_rfc3339};
use status::{ConnectionState, ProvisioningState, Status};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("telemetry queue: {0}")]
    Queue(QueueError),
    #[error("control socket {path}: {source}")]
    Control {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Requests to the running daemon (from signals, the control socket, or an embedding program).
#[derive(Debug)]
pub enum Command {
    Reprovision,
    Reload(Box<Config>),
    Shutdown,
}

/// Loads the configuration and runs until SIGTERM/SIGINT. SIGHUP reloads.
pub async fn run(config_path: &Path) -> Result<(), DaemonError> {
    let config = Config::load(config_path, &|k| std::env::var(k).ok())?;
    let (commands, receiver) = mpsc::unbounded_channel();
    spawn_signal_handlers(config_path.to_path_buf(), commands.clone());
    run_with(config, config_path, commands, receiver).await
}

fn spawn_signal_handlers(config_path: PathBuf, commands: mpsc::UnboundedSender<Command>) {
    use tokio::signal::unix::{SignalKind, signal};
    tokio::spawn(async move {
        let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        loop {
            tokio::select! {
                _ = term.recv() => { let _ = commands.send(Command::Shutdown); }
                _ = int.recv() => { let _ = commands.send(Command::Shutdown); }
                _ = hup.recv() => match Config::load(&config_path, &|k| std::env::var(k).ok()) {
                    Ok(config) => { let _ = commands.send(Command::Reload(Box::new(config))); }
                    Err(e) => {
                        tracing::error!("configuration not reloaded, keeping the running one: {e}");
                        systemd::status(&format!("reload failed: {e}"));
                    }
                },
            }
        }
    });
}

/// The daemon proper; `commands` drive it (signals, control socket, or the demo).
pub async fn run_with(
    config: Config,
    config_path: &Path,
    commands_tx: mpsc::UnboundedSender<Command>,
    mut commands: mpsc::UnboundedReceiver<Command>,
) -> Result<(), DaemonError> {
    let mut config = config;
    let (state, warning) = StateDir::open(&config.agent.state_dir)?;
    if let Some(w) = warning {
        tracing::warn!("{w}");
    }
    let status = Arc::new(Status::new(&config_path.display().to_string()));
    let mut twin = match state.load_twin() {
        Ok(t) => t.unwrap_or_default(),
        Err(e) => {
            tracing::warn!("{e}");
            TwinCache::default()
        }
    };
    status.update(|s| s.desired_version = Some(twin.desired_version));

    // Telemetry: sources → durable queue (on disk before a source's send completes) → pump →
    // whichever hub session is current → acknowledged by the hub → removed from the queue.
    let (queue, warnings) = Queue::open(
        &state.path().join("queue"),
        QueueSettings::from_config(&config.queue),
    )
    .map_err(DaemonError::Queue)?;
    for w in warnings {
        tracing::warn!("{w}");
    }
    let queue = Arc::new(queue);
    let backlog = queue.stats().depth;
    if backlog > 0 {
        tracing::info!(backlog, "telemetry queued before the restart will be sent");
    }
    let registry = Registry::default();
    let handler = Arc::new(ControlHandler {
        plugins: registry.clone(),
        status: status.clone(),
        queue: queue.clone(),
        commands: commands_tx.clone(),
        config_path: config_path.to_path_buf(),
    });
    let control_path = config.agent.control_socket.clone();
    let control_task = control::serve(&control_path, handler)
        .await
        .map_err(|source| DaemonError::Control {
            path: control_path.clone(),
            source,
        })?;

    let publisher = DurablePublisher::new(queue.clone());
    let (session_tx, session_rx) = watch::channel::<Option<SessionHandle>>(None);
    tokio::spawn(pump(
        queue.clone(),
        session_rx,
        usize::from(config.hub.inflight),
    ));
    let ticker = {
        let queue = queue.clone();
        let status = status.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                queue.tick();
                let stats = queue.stats();
                status.update(|s| {
                    s.queue_depth = stats.depth;
                    s.published = stats.delivered;
                    s.queue = Some(stats);
                });
            }
        })
    };
    let mut plugins = Supervisor::start(&config, &twin, publisher.clone(), registry.clone());
    let plugin_changes = plugins.changes();
    status.update(|s| s.plugins = plugins.snapshot());

    systemd::ready("state loaded; provisioning");
    tracing::info!(config = %config_path.display(), state = %state.path().display(), "hubagent started");
    let watchdog = systemd::watchdog_interval().map(|every| {
        tokio::spawn(async move {
            loop {
                systemd::watchdog_ping();
                tokio::time::sleep(every).await;
            }
        })
    });

    let mut force_dps = false;
    let mut unauthorized_backoff = Backoff::new(Duration::from_secs(5), Duration::from_secs(300));
    let result = 'outer: loop {
        status.update(|s| s.connection = ConnectionState::Disconnected);
        let _ = session_tx.send(None);

        // Credential.
        let registration_id = match registration_id(&config) {
            Ok(id) => id,
            Err(e) => {
                tracing::error!("{e}");
                status.update(|s| s.last_error = Some(e.clone()));
                match wait_for_command(&mut commands, Duration::from_secs(60)).await {
                    Some(Command::Shutdown) => break 'outer Ok(()),
                    Some(Command::Reload(c)) => config = *c,
                    _ => {}
                }
                continue;
            }
        };
        let credential = match load_credential(&config, &registration_id) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("cannot load the device credential: {e}");
                status.update(|s| s.last_error = Some(e.clone()));
                systemd::status(&format!("credential error: {e}"));
                match wait_for_command(&mut commands, Duration::from_secs(60)).await {
                    Some(Command::Shutdown) => break 'outer Ok(()),
                    Some(Command::Reload(c)) => config = *c,
                    _ => {}
                }
                continue;
            }
        };
        status.update(|s| s.registration_id = Some(registration_id.clone()));
        let tls = match client_tls(&config, &credential) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!("{e}");
                status.update(|s| s.last_error = Some(e.clone()));
                match wait_for_command(&mut commands, Duration::from_secs(60)).await {
                    Some(Command::Shutdown) => break 'outer Ok(()),
                    Some(Command::Reload(c)) => config = *c,
                    _ => {}
                }
                continue;
            }
        };

        // Assignment: the cache when it still fits, else DPS (retried forever).
        let fingerprint = config.provisioning_fingerprint();
        let cached = match state.load_provisioning() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("{e}");
                None
            }
        };
        // With DPS TPM attestation the hub key lives only in the TPM: without it the cache is
        // useless.
        let key_missing = match (&cached, force_dps) {
            (Some(c), false) if c.fingerprint == fingerprint => {
                crate::provisioning::attestation_key_missing(&config)
            }
            _ => None,
        };
        if let Some(reason) = &key_missing {
            tracing::warn!("{reason}; registering with DPS again for a new key");
        }
        let assignment = match cached {
            Some(c) if !force_dps && key_missing.is_none() && c.fingerprint == fingerprint => {
                tracing::info!(hub = %c.hub, device = %c.device_id, "using the cached assignment (no DPS call)");
                status.update(|s| {
                    s.provisioning = ProvisioningState::Cached;
                    s.provisioned_at = Some(c.provisioned_at.clone());
                });
                c
            }
            previous => {
                if previous.is_some() && !force_dps {
                    tracing::info!(
                        "provisioning settings changed since the last registration; reprovisioning"
                    );
                }
                match provision(
                    &config,
                    &registration_id,
                    &credential,
                    tls.clone(),
                    &status,
                    &mut commands,
                )
                .await
                {
                    Provisioned::Done(a) => {
                        let cache = ProvisioningCache {
                            hub: a.assigned_hub.clone(),
                            device_id: a.device_id.clone(),
                            provisioned_at: now_rfc3339(),
                            fingerprint: fingerprint.clone(),
                            registration: a.registration_state.clone(),
                        };
                        if let Err(e) = state.save_provisioning(&cache) {
                            tracing::error!("cannot cache the assignment: {e}");
                        }
                        status.update(|s| s.provisioned_at = Some(cache.provisioned_at.clone()));
                        cache
                    }
                    Provisioned::Shutdown => break 'outer Ok(()),
                    Provisioned::Reload(c) => {
                        config = *c;
                        continue;
                    }
                }
            }
        };
        force_dps = false;
        status.update(|s| {
            s.fingerprint = Some(fingerprint.clone());
            s.hub = Some(assignment.hub.clone());
            s.device_id = Some(assignment.device_id.clone());
            s.connection = ConnectionState::Connecting;
        });

        // Hub session.
        let (session, mut events, task) = hub::spawn(HubParams {
            hub: assignment.hub.clone(),
            device_id: assignment.device_id.clone(),
            port: config.hub.port,
            credential: credential.clone(),
            tls,
            keep_alive: config.hub.keep_alive,
            sas_ttl: config.hub.sas_ttl,
            renew_before: config.hub.renew_before,
            backoff_max: config.hub.reconnect_backoff_max,
            max_message_size: config.hub.max_message_size as usize,
            inflight: config.hub.inflight,
            desired_version: twin.desired_version,
        });
        let _ = session_tx.send(Some(session.clone()));

        let mut counters = tokio::time::interval_at(
            tokio::time::Instant::now() + Duration::from_secs(60),
            Duration::from_secs(60),
        );
        let mut connected = false;
        let next = loop {
            tokio::select! {
                event = events.recv() => {
                    let Some(event) = event else { break Next::Restart };
                    match event {
                        SessionEvent::Connected => {
                            connected = true;
                            unauthorized_backoff.reset();
                            status.update(|s| { s.connection = ConnectionState::Connected; s.last_error = None; });
                            systemd::status(&status.line());
                        }
                        SessionEvent::Disconnected { reason } => {
                            connected = false;
                            status.update(|s| { s.connection = ConnectionState::Connecting; s.last_error = Some(reason); });
                            systemd::status(&status.line());
                        }
                        SessionEvent::Unauthorized => {
                            let delay = unauthorized_backoff.next_delay();
                            tracing::warn!(hub = %assignment.hub, ?delay, "the hub refused the device credentials; reprovisioning");
                            status.update(|s| s.last_error = Some("hub refused the credentials (not authorized)".into()));
                            break Next::ReprovisionAfter(delay);
                        }
                        SessionEvent::Twin { desired, desired_version, reported } => {
                            twin.desired = desired;
                            twin.desired_version = desired_version;
                            // What the hub has is what counts as sent.
                            twin.reported_sent = reported;
                            plugins.apply_desired(&twin);
                            save_twin(&state, &twin);
                            status.update(|s| { s.desired_version = Some(desired_version); s.plugins = plugins.snapshot(); });
                            report_changes(&session, &mut twin, &state, &assignment, &plugins, &queue).await;
                        }
                        SessionEvent::DesiredPatch { version, patch } => {
                            merge(&mut twin.desired, &patch);
                            twin.desired_version = version;
                            plugins.apply_desired(&twin);
                            save_twin(&state, &twin);
                            status.update(|s| { s.desired_version = Some(version); s.plugins = plugins.snapshot(); });
                            report_changes(&session, &mut twin, &state, &assignment, &plugins, &queue).await;
                        }
                        SessionEvent::Method { name, rid, payload } => {
                            let (code, answer) = match name.as_str() {
                                "ping" => (200, json!({"pong": now_rfc3339(), "version": env!("CARGO_PKG_VERSION"), "echo": payload})),
                                "reprovision" => {
                                    let _ = commands_tx.send(Command::Reprovision);
                                    (202, json!({"status": "reprovisioning"}))
                                }
                                other => (404, json!({"error": format!("unknown method '{other}' (built-in: ping, reprovision)")})),
                            };
                            tracing::info!(method = %name, status = code, "direct method");
                            session.respond_to_method(&rid, code, answer);
                        }
                        SessionEvent::CloudToDevice { body, properties } => {
                            tracing::info!(bytes = body.len(), ?properties, "cloud-to-device message");
                        }
                    }
                }
                _ = plugin_changes.notified() => {
                    status.update(|s| s.plugins = plugins.snapshot());
                    // Only while connected (a reconnect reports everything with the twin), and
                    // a burst of changes (plugins starting, a crash loop) coalesced into one update.
                    if connected {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        report_changes(&session, &mut twin, &state, &assignment, &plugins, &queue).await;
                    }
                }
                _ = counters.tick(), if connected => {
                    // Counters (published, dropped) reach the twin at most this often.
                    report_changes(&session, &mut twin, &state, &assignment, &plugins, &queue).await;
                }
                command = commands.recv() => match command {
                    None | Some(Command::Shutdown) => break Next::Shutdown,
                    Some(Command::Reprovision) => {
                        tracing::info!("reprovisioning on request");
                        break Next::ReprovisionAfter(Duration::ZERO);
                    }
                    Some(Command::Reload(new)) => {
                        systemd::reloading();
                        status.update(|s| s.reloads += 1);
                        let changed = new.provisioning_fingerprint() != config.provisioning_fingerprint();
                        tracing::info!(provisioning_changed = changed, "configuration reloaded");
                        config = *new;
                        plugins.reconfigure(&config, &twin);
                        status.update(|s| s.plugins = plugins.snapshot());
                        systemd::ready(&status.line());
                        // A new fingerprint makes the cache stale: the next pass registers with DPS.
                        break Next::Restart;
                    }
                },
            }
        };
        session.shutdown();
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        match next {
            Next::Shutdown => break 'outer Ok(()),
            Next::Restart => {}
            Next::ReprovisionAfter(delay) => {
                force_dps = true;
                if !delay.is_zero() {
                    match wait_for_command(&mut commands, delay).await {
                        Some(Command::Shutdown) => break 'outer Ok(()),
                        Some(Command::Reload(c)) => config = *c,
                        _ => {}
                    }
                }
            }
        }
    };
    systemd::stopping();
    // Plugins first: what they publish while stopping still reaches the queue.
    plugins.shutdown().await;
    ticker.abort();
    queue.close();
    tracing::info!("hubagent stopped");
    control_task.abort();
    let _ = std::fs::remove_file(&control_path);
    if let Some(w) = watchdog {
        w.abort();
    }
    result
}

enum Next {
    Shutdown,
    Restart,
    ReprovisionAfter(Duration),
}

enum Provisioned {
    Done(Assignment),
    Shutdown,
    Reload(Box<Config>),
}

/// Waits up to `timeout` for a command; reprovision requests just end the wait.
/// Waits for a command, at most `timeout` (these are retry waits). A step of the wall clock ends
/// the wait early: a refused SAS token may have been signed by a wrong clock that NTP has just
/// corrected, and the next try should not wait minutes for it.
async fn wait_for_command(
    commands: &mut mpsc::UnboundedReceiver<Command>,
    timeout: Duration,
) -> Option<Command> {
    let deadline = tokio::time::Instant::now() + timeout;
    let clock = ClockWatch::start();
    loop {
        let tick = deadline.min(tokio::time::Instant::now() + Duration::from_secs(1));
        match tokio::time::timeout_at(tick, commands.recv()).await {
            Ok(command) => return command,
            Err(_) if tokio::time::Instant::now() >= deadline => return None,
            Err(_) => {
                if let Some(step) = clock.stepped() {
                    tracing::info!(step = %step, "the wall clock stepped; retrying now");
                    return None;
                }
            }
        }
    }
}

/// Registers with DPS, retrying with capped backoff and jitter until it works or a command
/// interrupts. A manual configuration needs no registration.
async fn provision(
    config: &Config,
    registration_id: &str,
    credential: &Credential,
    tls: Arc<rustls::ClientConfig>,
    status: &Status,
    commands: &mut mpsc::UnboundedReceiver<Command>,
) -> Provisioned {
    let p = &config.provisioning;
    let Some(request) = crate::provisioning::dps_request(config, registration_id) else {
        let hub = p
            .iothub_hostname
            .clone()
            .or_else(|| manual_connection_string(config).ok().map(|(h, _, _)| h))
            .unwrap_or_default();
        status.update(|s| s.provisioning = ProvisioningState::Provisioned);
        return Provisioned::Done(Assignment {
            assigned_hub: hub,
            device_id: registration_id.to_string(),
            substatus: String::new(),
            registration_state: Value::Null,
        });
    };
    let mut backoff = Backoff::new(Duration::from_secs(2), Duration::from_secs(300));
    loop {
        status.update(|s| s.provisioning = ProvisioningState::Registering);
        systemd::status(&format!("registering '{registration_id}' with DPS"));
        match crate::provisioning::register(config, &request, credential, tls.clone()).await {
            Ok(a) => {
                tracing::info!(hub = %a.assigned_hub, device = %a.device_id, substatus = %a.substatus, "provisioned by DPS");
                status.update(|s| {
                    s.provisioning = ProvisioningState::Provisioned;
                    s.last_error = None;
                });
                return Provisioned::Done(a);
            }
            Err(e) => {
                // Configuration problems (wrong key, unknown enrollment) are retried too, but
                // slowly: an operator may fix the enrollment without touching the gateway.
                let delay = if e.is_transient() {
                    backoff.next_delay()
                } else {
                    backoff.next_delay().max(Duration::from_secs(60))
                };
                tracing::warn!(?delay, "DPS registration failed: {e}");
                status.update(|s| {
                    s.provisioning = ProvisioningState::Retrying;
                    s.last_error = Some(e.to_string());
                });
                systemd::status(&format!("DPS registration failed, retrying: {e}"));
                match wait_for_command(commands, delay).await {
                    Some(Command::Shutdown) => return Provisioned::Shutdown,
                    Some(Command::Reload(c)) => return Provisioned::Reload(c),
                    Some(Command::Reprovision) | None => {}
                }
            }
        }
    }
}

fn save_twin(state: &StateDir, twin: &TwinCache) {
    if let Err(e) = state.save_twin(twin) {
        tracing::error!("cannot save the twin cache: {e}");
    }
}

/// Reports the agent's own properties and the plugins' states, sending only what changed.
async fn report_changes(
    session: &SessionHandle,
    twin: &mut TwinCache,
    state: &StateDir,
    assignment: &ProvisioningCache,
    plugins: &Supervisor,
    queue: &Queue,
) {
    let q = queue.stats();
    let mut wanted = Map::new();
    wanted.insert(
        "agent".into(),
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "provisionedAt": assignment.provisioned_at,
            "hub": assignment.hub,
            "deviceId": assignment.device_id,
            // What the cloud side cannot see otherwise: telemetry the agent gave up on.
            "queue": {
                "depth": q.depth,
                "droppedFull": q.dropped_full,
                "droppedExpired": q.dropped_expired,
                "droppedCorrupt": q.dropped_corrupt,
            },
        }),
    );
    wanted.insert("plugins".into(), plugins.reported());
    let patch: Map<String, Value> = wanted
        .into_iter()
        .filter(|(k, v)| twin.reported_sent.get(k) != Some(v))
        .collect();
    if patch.is_empty() {
        return;
    }
    // A key that disappeared from a nested object, at any depth, is deleted on the hub side (null).
    let mut wire = Map::new();
    for (k, v) in &patch {
        let value = match twin.reported_sent.get(k) {
            Some(old) => diff(old, v),
            None => v.clone(),
        };
        wire.insert(k.clone(), value);
    }
    // Bounded: a hub that does not answer must not hold up the daemon (and its SIGTERM handling).
    let answer = tokio::time::timeout(Duration::from_secs(15), session.report(Value::Object(wire)))
        .await
        .unwrap_or(Err(crate::hub::TwinError::Disconnected));
    match answer {
        Ok(version) => {
            tracing::debug!(version, "reported properties updated");
            twin.reported_sent.extend(patch);
            save_twin(state, twin);
        }
        Err(e) => tracing::warn!("reported properties not updated: {e}"),
    }
}

/// Answers the control socket.
struct ControlHandler {
    plugins: Registry,
    status: Arc<Status>,
    queue: Arc<Queue>,
    commands: mpsc::UnboundedSender<Command>,
    config_path: PathBuf,
}

impl control::Handler for ControlHandler {
    fn handle(&self, request: Request) -> Result<Value, String> {
        match request {
            Request::Status => {
                let stats = self.queue.stats();
                self.status.update(|s| {
                    s.queue_depth = stats.depth;
                    s.published = stats.delivered;
                    s.queue = Some(stats);
                });
                serde_json::to_value(self.status.snapshot()).map_err(|e| e.to_string())
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
        }
    }
}
