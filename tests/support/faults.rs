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

/// A firewall opening `port`: from now on a connection to any loopback address on `port` is
/// carried to the same address on `to` (where hubsim listens), byte for byte. Runs until the
/// test's runtime ends.
pub async fn open_port(port: u16, to: u16) {
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", port))
        .await
        .unwrap_or_else(|e| panic!("cannot open port {port}: {e}"));
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let Ok(address) = inbound.local_addr() else {
                continue;
            };
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect((address.ip(), to)).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
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

/// libfaketime from Debian's `libfaketime` package (tests/setup.sh installs it).
pub fn libfaketime() -> std::path::PathBuf {
    std::fs::read_dir("/usr/lib")
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("faketime/libfaketime.so.1"))
        .chain([std::path::PathBuf::from(
            "/usr/lib/faketime/libfaketime.so.1",
        )])
        .find(|p| p.exists())
        .expect("libfaketime.so.1 not found: install Debian's libfaketime (tests/setup.sh)")
}
