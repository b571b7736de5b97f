//! The state directory (`/var/lib/hubagent`): the cached DPS assignment, the twin's desired
//! state and the route `transport = "auto"` learned, so the agent boots and works offline with
//! what it last knew. Every write is atomic (temp file, fsync, rename, fsync of the directory) and
//! private (0600 files in a 0700 dir).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::util::fs::write_atomic;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}{}", crate::util::fs::limit_hint(.source))]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a valid state file ({message}); it will be ignored and rewritten")]
    Corrupt { path: PathBuf, message: String },
}

/// The hub assignment from the last successful DPS registration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProvisioningCache {
    pub hub: String,
    pub device_id: String,
    /// RFC 3339 UTC.
    pub provisioned_at: String,
    /// `Config::provisioning_fingerprint` of the settings that produced it.
    pub fingerprint: String,
    /// The full `registrationState` DPS returned.
    #[serde(default)]
    pub registration: Value,
    /// DPS accepted the secondary key (the primary was refused): the hub gets it too.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub secondary_key: bool,
}

/// The twin as last seen: desired properties with their version, and the reported properties the
/// agent already sent (so it reports only changes).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TwinCache {
    pub desired: Map<String, Value>,
    pub desired_version: u64,
    #[serde(default)]
    pub reported_sent: Map<String, Value>,
}

/// `[hub] transport = "auto"`: the route that worked, so a restart starts with it. Holds no
/// secret: ports, a flag and a time.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct RouteMemory {
    /// MQTT over WebSockets (on `websocket_port`) rather than MQTT over TLS (on `tls_port`).
    pub websocket: bool,
    /// When the route was learned, Unix seconds.
    pub learned_at: u64,
    /// The ports it was learned with: with other ports configured it says nothing.
    pub tls_port: u16,
    pub websocket_port: u16,
}

#[derive(Debug, Clone)]
pub struct StateDir {
    path: PathBuf,
}

const PROVISIONING: &str = "provisioning.json";
const TWIN: &str = "twin.json";
const ROUTE: &str = "route.json";

impl StateDir {
    /// Creates the directory (0700) if needed. Returns a warning when an existing directory is
    /// open to group or others.
    pub fn open(path: &Path) -> Result<(StateDir, Option<String>), StateError> {
        let io = |source| StateError::Io {
            path: path.to_path_buf(),
            source,
        };
        if !path.exists() {
            std::fs::create_dir_all(path).map_err(io)?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
        }
        let mode = std::fs::metadata(path).map_err(io)?.permissions().mode();
        let warning = (mode & 0o077 != 0).then(|| {
            format!(
                "state directory {} is open to group or others (mode {:o}); it should be 0700",
                path.display(),
                mode & 0o777
            )
        });
        Ok((
            StateDir {
                path: path.to_path_buf(),
            },
            warning,
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether files can be written here: a read-only file system (or a mount made read-only)
    /// would otherwise show only at the first write. The error names the path.
    pub fn check_writable(&self) -> Result<(), StateError> {
        let probe = self.path.join(".hubagent-write-check");
        write_atomic(&probe, b"").map_err(|e| StateError::Io {
            path: self.path.clone(),
            source: e.source,
        })?;
        let _ = std::fs::remove_file(&probe);
        Ok(())
    }

    pub fn load_provisioning(&self) -> Result<Option<ProvisioningCache>, StateError> {
        self.load(PROVISIONING)
    }

    pub fn save_provisioning(&self, cache: &ProvisioningCache) -> Result<(), StateError> {
        self.save(PROVISIONING, cache)
    }

    pub fn clear_provisioning(&self) -> Result<(), StateError> {
        let path = self.path.join(PROVISIONING);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StateError::Io { path, source }),
        }
    }

    pub fn load_twin(&self) -> Result<Option<TwinCache>, StateError> {
        self.load(TWIN)
    }

    pub fn save_twin(&self, twin: &TwinCache) -> Result<(), StateError> {
        self.save(TWIN, twin)
    }

    pub fn load_route(&self) -> Result<Option<RouteMemory>, StateError> {
        self.load(ROUTE)
    }

    pub fn save_route(&self, route: &RouteMemory) -> Result<(), StateError> {
        self.save(ROUTE, route)
    }

    fn load<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, StateError> {
        let path = self.path.join(name);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::Io { path, source }),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StateError::Corrupt {
                path,
                message: e.to_string(),
            })
    }

    fn save<T: Serialize>(&self, name: &str, value: &T) -> Result<(), StateError> {
        let bytes = serde_json::to_vec_pretty(value).expect("state serializes");
        write_atomic(&self.path.join(name), &bytes).map_err(|e| StateError::Io {
            path: e.path,
            source: e.source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_twin_cache_round_trips_and_writes_leave_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let (state, _) = StateDir::open(dir.path()).unwrap();
        assert!(state.load_twin().unwrap().is_none());
        let mut twin = TwinCache {
            desired_version: 7,
            ..Default::default()
        };
        twin.desired.insert(
            "plugins".into(),
            serde_json::json!({"sensor": {"interval": "5s"}}),
        );
        twin.reported_sent
            .insert("agent".into(), serde_json::json!({"version": "0.1.0"}));
        state.save_twin(&twin).unwrap();
        twin.desired_version = 8;
        state.save_twin(&twin).unwrap();
        assert_eq!(state.load_twin().unwrap(), Some(twin));
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["twin.json".to_string()]);
        std::fs::write(dir.path().join("twin.json"), "[1, 2]").unwrap();
        let err = state.load_twin().unwrap_err().to_string();
        assert!(err.contains("twin.json: not a valid state file"), "{err}");
    }

    #[test]
    fn caches_round_trip_privately_and_corruption_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("state");
        let (state, warning) = StateDir::open(&root).unwrap();
        assert!(warning.is_none());
        assert_eq!(
            std::fs::metadata(&root).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert!(state.load_provisioning().unwrap().is_none());
        let cache = ProvisioningCache {
            hub: "hub".into(),
            device_id: "dev".into(),
            provisioned_at: "2026-11-23T00:00:00Z".into(),
            fingerprint: "f".into(),
            registration: serde_json::json!({"assignedHub": "hub"}),
            secondary_key: false,
        };
        state.save_provisioning(&cache).unwrap();
        assert_eq!(state.load_provisioning().unwrap(), Some(cache));
        let file = root.join("provisioning.json");
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let route = RouteMemory {
            websocket: true,
            learned_at: 1_700_000_000,
            tls_port: 8883,
            websocket_port: 443,
        };
        state.save_route(&route).unwrap();
        assert_eq!(state.load_route().unwrap(), Some(route));
        std::fs::write(root.join("route.json"), "{\"websocket\": 1}").unwrap();
        let err = state.load_route().unwrap_err().to_string();
        assert!(err.contains("route.json: not a valid state file"), "{err}");
        std::fs::write(&file, "{ half a file").unwrap();
        let err = state.load_provisioning().unwrap_err().to_string();
        assert!(err.contains("provisioning.json"), "{err}");
        state.clear_provisioning().unwrap();
        assert!(state.load_provisioning().unwrap().is_none());

        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        let (_, warning) = StateDir::open(&root).unwrap();
        assert!(warning.unwrap().contains("0700"));
    }
}
