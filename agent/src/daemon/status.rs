//! What the daemon is doing right now, shared between its tasks and answered on the control socket
//! (`hubagent status`). Holds no secrets: key sources are described, never shown.

use std::sync::Mutex;

use serde::Serialize;

/// A state as `hubagent status --json` names it (`registering`), not as Rust's Debug would.
fn kebab_name<T: Serialize>(state: &T) -> String {
    serde_json::to_value(state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// Where provisioning stands.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ProvisioningState {
    #[default]
    Starting,
    /// Using `provisioning.json` from an earlier registration.
    Cached,
    Registering,
    Provisioned,
    /// DPS unreachable or refusing; the agent keeps retrying.
    Retrying,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ConnectionState {
    #[default]
    Disconnected,
    Connecting,
    Connected,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Snapshot {
    pub version: &'static str,
    pub pid: u32,
    pub started_at: String,
    pub config: String,
    pub provisioning: ProvisioningState,
    pub registration_id: Option<String>,
    pub hub: Option<String>,
    pub device_id: Option<String>,
    pub provisioned_at: Option<String>,
    pub connection: ConnectionState,
    /// Why the wall clock cannot be true (before this build was made, e.g. 1970 on a board
    /// without an RTC), or None. Read afresh for every snapshot: it is about the clock now.
    pub clock: Option<String>,
    pub last_error: Option<String>,
    pub desired_version: Option<u64>,
    pub queue_depth: u64,
    pub published: u64,
    pub reloads: u64,
    /// Hub sessions established since the start (1 + reconnections).
    pub hub_connections: u64,
    /// Fingerprint of the provisioning settings in force.
    pub fingerprint: Option<String>,
    /// Per plugin: kind, status, applied desired version, error. Filled as it is read
    /// ([`Status::snapshot_with`]): the plugins' registry holds them live, so no copy goes stale.
    pub plugins: serde_json::Value,
    pub queue: Option<crate::telemetry::queue::QueueStats>,
    /// How the hub session travels: `MQTT over TLS` or `MQTT over WebSockets` (with `transport =
    /// "auto"`, the route that worked).
    pub route: Option<&'static str>,
    /// `transport = "auto"`: the route remembered in the state directory, tried first.
    pub route_memory: Option<RouteMemoryStatus>,
    /// Which symmetric key is in use, `primary` or `secondary`, when a secondary is configured.
    pub key: Option<&'static str>,
    /// The identity certificate's validity (X.509 only).
    pub certificate: Option<CertificateStatus>,
    /// With `[provisioning.issued_certificate]`: the generation of the issued certificate that
    /// connected to the hub (its expiry is `certificate`).
    pub issued_generation: Option<u64>,
}

/// What `transport = "auto"` remembers (`route.json`): the route tried first, since when, and
/// for WebSockets when 8883 gets tried first again.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RouteMemoryStatus {
    pub first: &'static str,
    pub learned_at: String,
    pub direct_again_at: Option<String>,
}

impl RouteMemoryStatus {
    pub fn from_memory(memory: &crate::state::RouteMemory) -> Self {
        let at = crate::util::time::unix_rfc3339;
        RouteMemoryStatus {
            first: crate::mqtt::route_name(memory.websocket),
            learned_at: at(memory.learned_at),
            direct_again_at: memory
                .websocket
                .then(|| at(memory.learned_at + crate::mqtt::DIRECT_AGAIN_AFTER.as_secs())),
        }
    }
}

/// Where the identity certificate stands (`hubagent status`, `reported.agent.identity`).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CertificateStatus {
    pub not_before: String,
    pub not_after: String,
    /// Whole days until `not_after` (negative once expired).
    pub days_left: i64,
    /// `valid`, `expiring` (within the warning lead time), `expired` or `not-yet-valid`.
    pub expiry: &'static str,
}

/// The shared, lock-protected snapshot.
#[derive(Debug, Default)]
pub struct Status(Mutex<Snapshot>);

impl Status {
    pub fn new(config: &str) -> Self {
        Status(Mutex::new(Snapshot {
            version: env!("CARGO_PKG_VERSION"),
            pid: std::process::id(),
            started_at: crate::util::time::now_rfc3339(),
            config: config.to_string(),
            ..Snapshot::default()
        }))
    }

    pub fn update(&self, f: impl FnOnce(&mut Snapshot)) {
        f(&mut self.0.lock().unwrap());
    }

    /// The queue's counters as of now.
    pub fn record_queue(&self, stats: crate::telemetry::QueueStats) {
        self.update(|s| {
            s.queue_depth = stats.depth;
            s.published = stats.delivered;
            s.queue = Some(stats);
        });
    }

    /// Reads part of the snapshot without copying all of it.
    pub fn read<T>(&self, f: impl FnOnce(&Snapshot) -> T) -> T {
        f(&self.0.lock().unwrap())
    }

    pub fn snapshot(&self) -> Snapshot {
        let mut snapshot = self.0.lock().unwrap().clone();
        snapshot.clock = crate::util::time::clock_problem(std::time::SystemTime::now());
        snapshot
    }

    /// A snapshot with the plugins as of now (`hubagent status`, the metrics file).
    pub fn snapshot_with(&self, plugins: &crate::plugins::Registry) -> Snapshot {
        let mut snapshot = self.snapshot();
        snapshot.plugins = plugins.snapshot();
        snapshot
    }

    /// The one-line text systemd shows in `systemctl status`.
    pub fn line(&self) -> String {
        let s = self.snapshot();
        if s.clock.is_some() {
            return "waiting for the system clock to be set (it reads a time before this build)"
                .to_string();
        }
        match (&s.connection, &s.hub) {
            (ConnectionState::Connected, Some(hub)) => format!(
                "connected to {hub} as {}; {} published, {} queued",
                s.device_id.as_deref().unwrap_or("?"),
                s.published,
                s.queue_depth
            ),
            _ => format!(
                "provisioning {}; {}",
                kebab_name(&s.provisioning),
                kebab_name(&s.connection)
            ),
        }
    }
}
