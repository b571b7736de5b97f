//! `hubagent run`: the daemon. It opens the state dir, the durable queue, the control socket and
//! the plugins, then drives the lifecycle (`lifecycle`: a state machine without I/O) through its
//! phases: load the identity and choose the assignment (the cache, or DPS), run a hub session,
//! wait before a retry. `session` handles what arrives during a session, `twin` the desired and
//! reported properties, `c2d` cloud-to-device messages on their way to the plugins, `control` the
//! control socket, `status` what `hubagent status` shows.
//!
//! The provisioning rules (docs/design.md, "Provisioning rules"): a valid cached assignment with
//! an unchanged fingerprint means no DPS call; a changed fingerprint (reload or restart) or
//! `hubagent reprovision` means a fresh registration; a hub that refuses the credentials triggers
//! one reprovisioning, with backoff; DPS unreachable means retrying in-process forever with
//! capped backoff and jitter.

mod c2d;
mod certificate;
mod control;
pub mod lifecycle;
mod metrics;
mod renewal;
mod session;
pub mod status;
mod twin;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::config::{Config, ConfigError, Source};
use crate::hub::SessionHandle;
use crate::plugins::{Registry, Supervisor};
use crate::provisioning::{
    self, DeviceIdentity, IdentityError, Resolution, StaleCache, device_identity,
};
use crate::state::{ProvisioningCache, StateDir, StateError, TwinCache};
use crate::system::control as control_socket;
use crate::system::systemd;
use crate::telemetry::pump::pump;
use crate::telemetry::{Batching, DurablePublisher, Queue, QueueError, QueueSettings};
use crate::util::time::{ClockWatch, clock_problem, now_rfc3339};
use control::ControlHandler;
use lifecycle::{Event, Lifecycle, Phase};
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
    /// `hubagent plugins restart NAME`.
    RestartPlugin(String),
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
    commands: mpsc::UnboundedReceiver<Command>,
) -> Result<(), DaemonError> {
    let (mut daemon, background) = Daemon::open(config, config_path, commands_tx, commands).await?;
    systemd::ready("state loaded; provisioning");
    tracing::info!(config = %config_path.display(), state = %daemon.state.path().display(), "hubagent started");
    // Opened now and kept open: the plugin hosts started later are this build's, even after an
    // upgrade replaced the file (plugins/host_program.rs).
    match crate::plugins::host_program::opened() {
        Ok(host) => tracing::debug!(host = %host.path().display(), "plugin host executable opened"),
        Err(e) => tracing::warn!("{e}"),
    }
    // The TPM helper likewise, and only when the configuration uses the TPM: it runs from the
    // first TPM operation on (identity/tpm/client.rs). A missing helper fails that operation.
    #[cfg(feature = "tpm")]
    if daemon.config.provisioning.uses_tpm() {
        match crate::identity::tpm::client::open_program() {
            Ok(path) => tracing::debug!(helper = %path.display(), "TPM helper executable opened"),
            Err(e) => tracing::warn!("{e}"),
        }
    }
    let mut life = Lifecycle::default();
    loop {
        match life.phase().clone() {
            Phase::Start => daemon.start(&mut life),
            Phase::Register => daemon.register(&mut life).await,
            Phase::Session => daemon.session(&mut life).await,
            Phase::Wait { delay, .. } => daemon.wait(delay, &mut life).await,
            Phase::Stopped => break,
        }
    }
    systemd::stopping();
    // Plugins first: what they publish while stopping still reaches the queue.
    daemon.plugins.shutdown().await;
    background.stop(&daemon.queue);
    tracing::info!("hubagent stopped");
    Ok(())
}

/// What the daemon works with between phases.
struct Daemon {
    config: Config,
    state: StateDir,
    status: Arc<Status>,
    queue: Arc<Queue>,
    plugins: Supervisor,
    twin: TwinCache,
    /// The current hub session, for the pump (None between sessions).
    sessions: watch::Sender<Option<SessionHandle>>,
    /// Which plugins' readings the pump packs into batches (`batch`), for the pump.
    batching: watch::Sender<Arc<Batching>>,
    commands: mpsc::UnboundedReceiver<Command>,
    /// For requests the daemon makes of itself (the `reprovision` direct method).
    commands_tx: mpsc::UnboundedSender<Command>,
    /// Loaded by `Start`.
    identity: Option<DeviceIdentity>,
    /// Chosen by `Start` (the cache) or `Register` (DPS).
    assignment: Option<ProvisioningCache>,
    /// What the log last said about the identity certificate's expiry.
    certificate_said: certificate::LastSaid,
    /// With `secondary_key` configured: the key the hub refused at the end of the last session
    /// (true: the secondary), so the next `Start` presents the other one.
    hub_refused_secondary: Option<bool>,
    /// `[hub] transport = "auto"`: the route that worked last, for DPS and the hub alike.
    auto_route: Option<Arc<crate::mqtt::AutoRoute>>,
    /// What the credential and trust files read at the last (re)load: a reload that changes
    /// them renews the hub session even when the configuration text is the same.
    connection_files: String,
    /// The log said the clock cannot be true (said once, until it is set).
    clock_said: bool,
    /// What only start-up used was given back (once per process, [`Daemon::start_up_over`]).
    start_up_memory_released: bool,
}

/// After the hub refused one symmetric key, the identity (freshly loaded, on the primary) presents
/// the other: DPS (which, accepting it, gives the hub the enrollment's keys again) or, for a
/// manual configuration, the hub itself gets it next.
fn present_the_other_key(identity: &mut DeviceIdentity, refused_secondary: bool) {
    if identity.other_key.is_none() {
        return;
    }
    if !refused_secondary {
        identity.switch_key();
    }
    let (refused, trying) = match refused_secondary {
        false => ("primary", "secondary"),
        true => ("secondary", "primary"),
    };
    tracing::warn!("the hub refused the {refused} key; trying the {trying} key (secondary_key)");
}

/// The tasks that run beside the lifecycle, stopped with it.
struct Background {
    control_task: JoinHandle<()>,
    control_path: PathBuf,
    ticker: JoinHandle<()>,
    watchdog: Option<JoinHandle<()>>,
    /// `[agent] metrics_file` (metrics.rs).
    metrics: Option<JoinHandle<()>>,
}

impl Background {
    fn stop(self, queue: &Queue) {
        self.ticker.abort();
        if let Some(metrics) = self.metrics {
            metrics.abort();
        }
        queue.close();
        self.control_task.abort();
        let _ = std::fs::remove_file(&self.control_path);
        if let Some(w) = self.watchdog {
            w.abort();
        }
    }
}

/// How often the queue's timers run and its counters reach the status.
const QUEUE_TICK: Duration = Duration::from_millis(200);

impl Daemon {
    /// Start-up is over once the first hub connection is up: the pages only start-up used
    /// (configuration, command line, identity, provisioning) and its freed heap go back to the
    /// kernel (system/start_up_memory.rs). Once per process: a reload or a reprovisioning maps
    /// back what it runs.
    fn start_up_over(&mut self) {
        if std::mem::replace(&mut self.start_up_memory_released, true) {
            return;
        }
        let released = crate::system::start_up_memory::release();
        tracing::debug!(
            unmapped_kib = released.unmapped / 1024,
            heap_trimmed = released.trimmed,
            "start-up memory given back"
        );
    }

    /// Opens the state dir, the twin cache and the queue, serves the control socket, and starts
    /// the pump and the plugins.
    async fn open(
        config: Config,
        config_path: &Path,
        commands_tx: mpsc::UnboundedSender<Command>,
        commands: mpsc::UnboundedReceiver<Command>,
    ) -> Result<(Daemon, Background), DaemonError> {
        let (state, warning) = StateDir::open(&config.agent.state_dir)?;
        if let Some(w) = warning {
            tracing::warn!("{w}");
        }
        // Read-only (a file system remounted read-only after errors, a mount made so): the
        // agent still runs on what the directory holds (the cached assignment, the queued
        // telemetry, which it sends), but holds its sources back until a message can be
        // queued; nothing learned is kept meanwhile.
        if let Err(e) = state.check_writable() {
            tracing::error!(
                "the state directory cannot be written: {e}; telemetry is held back (nothing is acknowledged that is not on disk) and what the agent learns is not kept until it can be written"
            );
            systemd::status(&format!("state directory not writable: {e}"));
        }
        let status = Arc::new(Status::new(&config_path.display().to_string()));
        let twin = match state.load_twin() {
            Ok(t) => t.unwrap_or_default(),
            Err(e) => {
                tracing::warn!("{e}");
                TwinCache::default()
            }
        };
        status.update(|s| s.desired_version = Some(twin.desired_version));
        let queue = open_queue(&state, &config)?;
        let registry = Registry::default();
        let control_path = config.agent.control_socket.clone();
        let handler = Arc::new(ControlHandler {
            plugins: registry.clone(),
            status: status.clone(),
            queue: queue.clone(),
            commands: commands_tx.clone(),
            config_path: config_path.to_path_buf(),
        });
        let control_task = control_socket::serve(&control_path, handler)
            .await
            .map_err(|source| DaemonError::Control {
                path: control_path.clone(),
                source,
            })?;

        // Telemetry: sources → durable queue (on disk before a source's send completes) → pump →
        // whichever hub session is current → acknowledged by the hub → removed from the queue.
        let (sessions, session_rx) = watch::channel::<Option<SessionHandle>>(None);
        let (batching, batching_rx) =
            watch::channel(Arc::new(Batching::from_plugins(&config.plugins)));
        tokio::spawn(pump(
            queue.clone(),
            session_rx,
            usize::from(config.hub.inflight),
            batching_rx,
        ));
        let ticker = spawn_queue_ticker(queue.clone(), status.clone());
        let publisher = DurablePublisher::new(queue.clone());
        let plugins = Supervisor::start(&config, config_path, &twin, publisher, registry.clone());
        let background = Background {
            control_task,
            control_path,
            ticker,
            watchdog: spawn_watchdog(),
            metrics: config.agent.metrics_file.clone().map(|file| {
                metrics::spawn(
                    file,
                    config.agent.metrics_interval,
                    status.clone(),
                    queue.clone(),
                    registry.clone(),
                )
            }),
        };
        let auto_route = provisioning::auto_route(&config, &state);
        let connection_files = config.connection_files_digest();
        let daemon = Daemon {
            start_up_memory_released: false,
            connection_files,
            config,
            state,
            status,
            queue,
            plugins,
            twin,
            sessions,
            batching,
            commands,
            commands_tx,
            identity: None,
            assignment: None,
            certificate_said: Default::default(),
            hub_refused_secondary: None,
            auto_route,
            clock_said: false,
        };
        Ok((daemon, background))
    }

    /// `Phase::Start`: loads the identity and chooses the assignment (the cache, or DPS).
    fn start(&mut self, life: &mut Lifecycle) {
        self.status
            .update(|s| s.connection = ConnectionState::Disconnected);
        let _ = self.sessions.send(None);
        let mut identity = match device_identity(&self.config) {
            Ok(identity) => identity,
            Err(e) => {
                if let IdentityError::Credential(message) = &e {
                    tracing::error!("cannot load the device credential: {message}");
                    systemd::status(&format!("credential error: {message}"));
                } else {
                    tracing::error!("{e}");
                }
                self.status.update(|s| s.last_error = Some(e.to_string()));
                life.on(Event::IdentityFailed);
                return;
            }
        };
        if let Some(refused_secondary) = self.hub_refused_secondary.take() {
            present_the_other_key(&mut identity, refused_secondary);
        }
        self.status
            .update(|s| s.registration_id = Some(identity.registration_id.clone()));
        self.identity = Some(identity);
        self.check_certificate();
        match provisioning::resolve(&self.config, &self.state, life.registration_forced()) {
            Resolution::Cached(cache) => {
                self.use_cached_key(&cache);
                tracing::info!(hub = %cache.hub, device = %cache.device_id, "using the cached assignment (no DPS call)");
                self.status.update(|s| {
                    s.provisioning = ProvisioningState::Cached;
                    s.provisioned_at = Some(cache.provisioned_at.clone());
                });
                self.assignment = Some(cache);
                life.on(Event::CacheFits);
            }
            Resolution::Register { reason } => {
                match reason {
                    Some(StaleCache::SettingsChanged) => tracing::info!(
                        "provisioning settings changed since the last registration; reprovisioning"
                    ),
                    Some(StaleCache::KeyMissing(missing)) => {
                        tracing::warn!("{missing}; registering with DPS again for a new key")
                    }
                    Some(StaleCache::Issuance(why)) => {
                        tracing::info!("{why}; registering with DPS for a new certificate")
                    }
                    None => {}
                }
                life.on(Event::RegistrationNeeded);
            }
        }
    }

    /// Before an attempt at DPS or the hub: true when the wall clock can be true. A clock before
    /// this build was made (1970 on a board without an RTC) makes every certificate "not yet
    /// valid" and every token expired, so attempts would only fail (and fill the log): the
    /// lifecycle waits instead, said once, and the wait ends when the clock is set. Plugins go
    /// on publishing into the queue meanwhile.
    fn clock_set(&mut self, life: &mut Lifecycle) -> bool {
        let Some(problem) = clock_problem(std::time::SystemTime::now()) else {
            if std::mem::take(&mut self.clock_said) {
                tracing::info!(
                    "the system clock is set now ({}); connecting",
                    now_rfc3339()
                );
            }
            return true;
        };
        if !std::mem::replace(&mut self.clock_said, true) {
            tracing::warn!("{problem}");
            systemd::status("waiting for the system clock to be set");
        }
        // `clock` in the status says why (read afresh at each snapshot, not copied here).
        self.status
            .update(|s| s.connection = ConnectionState::Disconnected);
        life.on(Event::ClockUnset);
        false
    }

    /// `Phase::Register`: one registration attempt (a manual configuration needs none).
    async fn register(&mut self, life: &mut Lifecycle) {
        if !self.clock_set(life) {
            return;
        }
        let mut identity = self.identity.clone().expect("Start loads the identity");
        let manual = self.config.provisioning.source == Source::Manual;
        if !manual {
            self.status
                .update(|s| s.provisioning = ProvisioningState::Registering);
            systemd::status(&format!(
                "registering '{}' with DPS",
                identity.registration_id
            ));
        }
        let registered =
            provisioning::register_once(&self.config, &mut identity, self.auto_route.as_deref())
                .await;
        self.status.update(|s| s.key = identity.key_in_use());
        let assignment = match registered {
            Ok(assignment) => assignment,
            Err(e) => {
                self.identity = Some(identity);
                self.registration_failed(e, life);
                return;
            }
        };
        if !manual {
            tracing::info!(hub = %assignment.assigned_hub, device = %assignment.device_id, substatus = %assignment.substatus, "provisioned by DPS");
        }
        let (cache, saved) = provisioning::record(&self.state, &self.config, assignment, &identity);
        if let Err(e) = saved {
            tracing::error!("cannot cache the assignment: {e}");
        }
        self.status.update(|s| {
            s.provisioning = ProvisioningState::Provisioned;
            s.last_error = None;
            s.provisioned_at = Some(cache.provisioned_at.clone());
        });
        self.identity = Some(identity);
        self.assignment = Some(cache);
        life.on(Event::Registered);
    }

    /// The key DPS last accepted is the one the hub gets (the secondary after a rotation).
    fn use_cached_key(&mut self, cache: &ProvisioningCache) {
        let Some(identity) = self.identity.as_mut() else {
            return;
        };
        if cache.secondary_key && !identity.on_secondary && identity.switch_key() {
            tracing::info!("using the secondary key, accepted at the last registration");
        }
        self.status.update(|s| s.key = identity.key_in_use());
    }

    /// A failed registration: the lifecycle decides how long to wait; the status says why.
    fn registration_failed(&mut self, e: provisioning::dps::DpsError, life: &mut Lifecycle) {
        let transient = e.is_transient();
        let delay = match life.on(Event::RegistrationFailed { transient }) {
            Phase::Wait { delay, .. } => *delay,
            _ => Duration::ZERO,
        };
        tracing::warn!(delay = %humantime::format_duration(delay), "DPS registration failed: {e}");
        self.status.update(|s| {
            s.provisioning = ProvisioningState::Retrying;
            s.last_error = Some(e.to_string());
        });
        systemd::status(&format!("DPS registration failed, retrying: {e}"));
    }

    /// `Phase::Wait`: waits for the delay, a command, or a step of the wall clock.
    async fn wait(&mut self, delay: Duration, life: &mut Lifecycle) {
        let until = tokio::time::Instant::now() + delay;
        let event = loop {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            match wait_for_command(&mut self.commands, left).await {
                Some(Command::Shutdown) => break Event::Shutdown,
                // A reload of plugins alone leaves the wait as it was.
                Some(Command::Reload(config)) => match self.reload(*config) {
                    Some(event) => break event,
                    None => continue,
                },
                Some(Command::RestartPlugin(name)) => {
                    self.restart_plugin(&name);
                    continue;
                }
                Some(Command::Reprovision) | None => break Event::WaitOver,
            }
        };
        life.on(event);
    }

    /// Takes a new configuration: the plugins follow it at once. The lifecycle starts over
    /// (the hub session ends) unless only `[[plugin]]` tables changed and the credential files
    /// read the same (a rotated key in the same file counts as a change): then None.
    fn reload(&mut self, config: Config) -> Option<Event> {
        systemd::reloading();
        self.status.update(|s| s.reloads += 1);
        let changed = config.provisioning_fingerprint() != self.config.provisioning_fingerprint();
        let credentials = config.connection_files_digest();
        let plugins_only =
            config.same_but_plugins(&self.config) && credentials == self.connection_files;
        tracing::info!(
            provisioning_changed = changed,
            plugins_only,
            "configuration reloaded"
        );
        if config.hub != self.config.hub {
            self.auto_route = provisioning::auto_route(&config, &self.state);
        }
        self.config = config;
        self.connection_files = credentials;
        self.plugins.reconfigure(&self.config, &self.twin);
        self.batching
            .send_replace(Arc::new(Batching::from_plugins(&self.config.plugins)));
        systemd::ready(&self.status.line());
        (!plugins_only).then_some(Event::Reload)
    }

    fn restart_plugin(&mut self, name: &str) {
        if let Err(e) = self.plugins.restart(name, &self.twin) {
            tracing::warn!("{e}");
        }
    }
}

fn open_queue(state: &StateDir, config: &Config) -> Result<Arc<Queue>, DaemonError> {
    let (queue, warnings) = Queue::open(
        &state.path().join("queue"),
        QueueSettings::from_config(&config.queue),
    )
    .map_err(DaemonError::Queue)?;
    for w in warnings {
        tracing::warn!("{w}");
    }
    let backlog = queue.stats().depth;
    if backlog > 0 {
        tracing::info!(backlog, "telemetry queued before the restart will be sent");
    }
    Ok(Arc::new(queue))
}

/// Runs the queue's timers and copies its counters into the status.
fn spawn_queue_ticker(queue: Arc<Queue>, status: Arc<Status>) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(QUEUE_TICK).await;
            queue.tick();
            status.record_queue(queue.stats());
        }
    })
}

/// Pings systemd's watchdog when the unit asks for it.
fn spawn_watchdog() -> Option<JoinHandle<()>> {
    systemd::watchdog_interval().map(|every| {
        tokio::spawn(async move {
            loop {
                systemd::watchdog_ping();
                tokio::time::sleep(every).await;
            }
        })
    })
}

/// Waits for a command, at most `timeout` (these are retry waits). A step of the wall clock ends
/// the wait early: a refused SAS token may have been signed by a wrong clock that NTP has just
/// corrected, and the next try should not wait minutes for it. So does a clock that could not be
/// true at the start of the wait and can now (set, by a step or not). One look a second: no CPU
/// to speak of, and connected within seconds of the clock being set.
async fn wait_for_command(
    commands: &mut mpsc::UnboundedReceiver<Command>,
    timeout: Duration,
) -> Option<Command> {
    let deadline = tokio::time::Instant::now() + timeout;
    let clock = ClockWatch::start();
    let clock_unset = clock_problem(std::time::SystemTime::now()).is_some();
    loop {
        let tick = deadline.min(tokio::time::Instant::now() + Duration::from_secs(1));
        match tokio::time::timeout_at(tick, commands.recv()).await {
            Ok(command) => return command,
            Err(_) if tokio::time::Instant::now() >= deadline => return None,
            Err(_) => {
                // Said by `Daemon::clock_set` at the next attempt.
                if clock_unset && clock_problem(std::time::SystemTime::now()).is_none() {
                    return None;
                }
                if let Some(step) = clock.stepped() {
                    tracing::info!(step = %step, "the wall clock stepped; retrying now");
                    return None;
                }
            }
        }
    }
}
