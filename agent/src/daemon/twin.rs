//! The twin as the daemon keeps it: desired properties from the hub (cached in the state dir and
//! handed to the plugins) and reported properties, sent as the difference against what the hub
//! already has.

use std::time::Duration;

use serde_json::{Map, Value, json};

use super::Daemon;
use super::certificate::identity_reported;
use crate::hub::{SessionHandle, TwinError, within_hub_limits};
use crate::state::ProvisioningCache;
use crate::telemetry::QueueStats;
use crate::util::json::{diff, merge};

/// How long a reported-properties update may wait for the hub: a hub that does not answer must
/// not hold up the daemon (and its SIGTERM handling).
const REPORT_TIMEOUT: Duration = Duration::from_secs(15);

/// The reported properties the agent wants the hub to have: its own, and the plugins'.
pub(super) fn wanted_reported(
    assignment: &ProvisioningCache,
    queue: &QueueStats,
    identity: Option<Value>,
    plugins: Value,
    unknown_plugins: Vec<String>,
) -> Map<String, Value> {
    let mut wanted = Map::new();
    let mut agent = json!({
            "version": env!("CARGO_PKG_VERSION"),
            "provisionedAt": assignment.provisioned_at,
            "hub": assignment.hub,
            "deviceId": assignment.device_id,
            // What the cloud side cannot see otherwise: telemetry the agent gave up on.
            "queue": {
                "depth": queue.depth,
                "droppedFull": queue.dropped_full,
                "droppedExpired": queue.dropped_expired,
                "droppedCorrupt": queue.dropped_corrupt,
            },
    });
    if let Some(identity) = identity {
        agent["identity"] = identity;
    }
    // Names under desired.plugins that no [[plugin]] table has: a typo the cloud can see.
    if !unknown_plugins.is_empty() {
        agent["unknownPlugins"] = json!(unknown_plugins);
    }
    wanted.insert("agent".into(), agent);
    wanted.insert("plugins".into(), plugins);
    // Plugin names, settings and messages come from outside: a property the hub refuses would
    // make it refuse every report from now on.
    within_hub_limits(wanted)
}

/// The top-level keys of `wanted` that differ from `sent`, and the patch that sends them: a key
/// that disappeared from a nested object, at any depth, is deleted on the hub side (null).
pub(super) fn reported_patch(
    sent: &Map<String, Value>,
    wanted: Map<String, Value>,
) -> (Map<String, Value>, Map<String, Value>) {
    let changed: Map<String, Value> = wanted
        .into_iter()
        .filter(|(k, v)| sent.get(k) != Some(v))
        .collect();
    let wire = changed
        .iter()
        .map(|(k, v)| {
            let value = match sent.get(k) {
                Some(old) => diff(old, v),
                None => v.clone(),
            };
            (k.clone(), value)
        })
        .collect();
    (changed, wire)
}

impl Daemon {
    /// The whole twin, as the hub sent it on (re)connection.
    pub(super) async fn twin_received(
        &mut self,
        session: &SessionHandle,
        desired: Map<String, Value>,
        desired_version: u64,
        reported: Map<String, Value>,
    ) {
        self.twin.desired = desired;
        self.twin.desired_version = desired_version;
        // What the hub has is what counts as sent.
        self.twin.reported_sent = reported;
        self.desired_changed(session).await;
    }

    /// A desired-properties patch.
    pub(super) async fn desired_patch(
        &mut self,
        session: &SessionHandle,
        version: u64,
        patch: Map<String, Value>,
    ) {
        merge(&mut self.twin.desired, &patch);
        self.twin.desired_version = version;
        self.desired_changed(session).await;
    }

    async fn desired_changed(&mut self, session: &SessionHandle) {
        self.plugins.apply_desired(&self.twin);
        self.save_twin();
        let version = self.twin.desired_version;
        self.status.update(|s| s.desired_version = Some(version));
        self.report_changes(session).await;
    }

    /// Reports the agent's own properties and the plugins' states, sending only what changed.
    pub(super) async fn report_changes(&mut self, session: &SessionHandle) {
        let Some(assignment) = &self.assignment else {
            return;
        };
        let identity = self
            .status
            .read(|s| identity_reported(s.certificate.as_ref(), s.key, s.issued_generation));
        let wanted = wanted_reported(
            assignment,
            &self.queue.stats(),
            identity,
            self.plugins.reported(),
            self.plugins.unknown_desired(&self.twin),
        );
        let (changed, wire) = reported_patch(&self.twin.reported_sent, wanted);
        if changed.is_empty() {
            return;
        }
        let answer = tokio::time::timeout(REPORT_TIMEOUT, session.report(Value::Object(wire)))
            .await
            .unwrap_or(Err(TwinError::Disconnected));
        match answer {
            Ok(version) => {
                tracing::debug!(version, "reported properties updated");
                self.twin.reported_sent.extend(changed);
                self.save_twin();
            }
            Err(e) => tracing::warn!("reported properties not updated: {e}"),
        }
    }

    pub(super) fn save_twin(&self) {
        if let Err(e) = self.state.save_twin(&self.twin) {
            tracing::error!("cannot save the twin cache: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_changed_keys_are_sent_and_removed_nested_keys_become_null() {
        let sent = json!({
            "agent": {"version": "0.1.0", "queue": {"depth": 3}},
            "plugins": {"a": {"status": "running"}, "b": {"status": "running"}},
        });
        let wanted = json!({
            "agent": {"version": "0.1.0", "queue": {"depth": 3}},
            "plugins": {"a": {"status": "quarantined"}},
        });
        let (changed, wire) = reported_patch(
            sent.as_object().unwrap(),
            wanted.as_object().unwrap().clone(),
        );
        assert_eq!(changed.keys().collect::<Vec<_>>(), vec!["plugins"]);
        assert_eq!(
            Value::Object(wire),
            json!({"plugins": {"a": {"status": "quarantined"}, "b": null}})
        );
        let (changed, _) = reported_patch(
            wanted.as_object().unwrap(),
            wanted.as_object().unwrap().clone(),
        );
        assert!(changed.is_empty(), "nothing new, nothing sent");
    }

    #[test]
    fn the_agent_reports_its_assignment_and_what_it_gave_up_on() {
        let assignment = ProvisioningCache {
            hub: "hub.example".into(),
            device_id: "gw".into(),
            provisioned_at: "2026-12-05T00:00:00Z".into(),
            fingerprint: "f".into(),
            registration: Value::Null,
            secondary_key: false,
        };
        let queue = QueueStats {
            depth: 4,
            dropped_full: 2,
            ..Default::default()
        };
        let wanted = wanted_reported(&assignment, &queue, None, json!({}), Vec::new());
        assert_eq!(wanted["agent"]["hub"], "hub.example");
        assert_eq!(wanted["agent"]["deviceId"], "gw");
        assert_eq!(wanted["agent"]["queue"]["depth"], 4);
        assert_eq!(wanted["agent"]["queue"]["droppedFull"], 2);
        assert_eq!(wanted["plugins"], json!({}));
    }
}
