//! Faults the tests cause in hubsim (a dropped connection, an outage), and the figures the fault
//! scenarios record for docs/reliability.md.

use std::path::Path;
use std::time::{Duration, Instant};

use hubsim::Sim;
use hubsim::state::{ConnCommand, ConnHandle};

/// The live hub connection of `device_id` (in the first linked hub), if it has one.
pub fn live_connection(sim: &Sim, device_id: &str) -> Option<ConnHandle> {
    sim.live
        .lock()
        .unwrap()
        .connections
        .get(&crate::device_key(sim, device_id))
        .cloned()
}

/// Closes the live hub connection of `device_id`, as the hub does on an outage; false when it
/// had none (or it was closing already).
pub fn drop_connection(sim: &Sim, device_id: &str) -> bool {
    live_connection(sim, device_id).is_some_and(|c| {
        c.tx.send(ConnCommand::Close {
            reason: "dropped by the test".into(),
        })
        .is_ok()
    })
}

/// hubsim refuses every connection (DPS and hub: CONNACK 3) for `duration`; returns when that
/// ends.
pub fn refuse_connections(sim: &Sim, duration: Duration) -> Instant {
    let until = Instant::now() + duration;
    sim.faults.lock().unwrap().refuse_connections_until = Some(until);
    until
}

/// An outage until [`end_outage`]: hubsim refuses connections and drops `device_id`'s.
pub fn begin_outage(sim: &Sim, device_id: &str) {
    refuse_connections(sim, Duration::from_secs(3600));
    drop_connection(sim, device_id);
}

/// hubsim accepts connections again.
pub fn end_outage(sim: &Sim) {
    sim.faults.lock().unwrap().refuse_connections_until = None;
}

/// Writes a fault scenario's figures to `target/reliability/<name>.json` (docs/reliability.md is
/// refreshed from them).
pub fn record_reliability(name: &str, figures: &serde_json::Value) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/reliability");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join(format!("{name}.json")),
        serde_json::to_vec_pretty(figures).unwrap(),
    )
    .unwrap();
}
