//! `[agent] metrics_file`: the agent's counters in Prometheus' text format, rewritten atomically
//! every `metrics_interval` for node-exporter's textfile collector (Debian's
//! prometheus-node-exporter reads `/var/lib/prometheus/node-exporter/*.prom`). Read from what
//! `hubagent status` and `plugins list` answer from, so they always agree.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::task::JoinHandle;

use super::status::{ConnectionState, Snapshot, Status};
use crate::plugins::Registry;
use crate::telemetry::Queue;

/// Writes the metrics file every `every` until aborted; a write that fails is logged once per
/// distinct error (the agent runs on regardless).
pub(super) fn spawn(
    path: PathBuf,
    every: Duration,
    status: Arc<Status>,
    queue: Arc<Queue>,
    plugins: Registry,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut last_error = None;
        loop {
            status.record_queue(queue.stats());
            let snapshot = status.snapshot_with(&plugins);
            let text = render(&snapshot);
            let result = write_atomically(&path, &text).map_err(|e| e.to_string());
            match (&result, &last_error) {
                (Err(e), last) if last.as_ref() != Some(e) => {
                    tracing::warn!(file = %path.display(), "cannot write the metrics file: {e}");
                }
                (Ok(()), Some(_)) => {
                    tracing::info!(file = %path.display(), "metrics file written again")
                }
                _ => {}
            }
            last_error = result.err();
            tokio::time::sleep(every).await;
        }
    })
}

/// A file in the same directory, then renamed over the old one: the collector never reads half
/// a file. World-readable, as node-exporter runs as its own user; it holds no secret.
fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let staged = path.with_extension("prom.tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&staged)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&staged, path)
}

/// One metric family: its HELP and TYPE lines, then its samples.
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{labels} {value}");
    }
}

/// `{plugin="name"}` with the value escaped as the text format requires.
fn plugin_label(name: &str) -> String {
    let escaped = name
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n");
    format!("{{plugin=\"{escaped}\"}}")
}

/// The text format of `snapshot`.
pub fn render(snapshot: &Snapshot) -> String {
    let mut out = String::new();
    let queue = snapshot.queue.clone().unwrap_or_default();
    let one = |v: u64| vec![(String::new(), v as f64)];
    let connected = snapshot.connection == ConnectionState::Connected;
    family(
        &mut out,
        "hubagent_connected",
        "gauge",
        "1 while the hub session is up.",
        &one(connected as u64),
    );
    family(
        &mut out,
        "hubagent_hub_connections_total",
        "counter",
        "Hub sessions established since the agent started (reconnections + 1).",
        &one(snapshot.hub_connections),
    );
    family(
        &mut out,
        "hubagent_reloads_total",
        "counter",
        "Configuration reloads.",
        &one(snapshot.reloads),
    );
    family(
        &mut out,
        "hubagent_queue_depth",
        "gauge",
        "Messages in the durable queue, not yet acknowledged by the hub.",
        &one(queue.depth),
    );
    family(
        &mut out,
        "hubagent_queue_bytes",
        "gauge",
        "Bytes the durable queue holds on disk.",
        &one(queue.bytes_on_disk),
    );
    family(
        &mut out,
        "hubagent_messages_queued_total",
        "counter",
        "Messages put into the durable queue.",
        &one(queue.pushed),
    );
    family(
        &mut out,
        "hubagent_messages_published_total",
        "counter",
        "Messages the hub acknowledged.",
        &one(queue.delivered),
    );
    family(
        &mut out,
        "hubagent_messages_dropped_total",
        "counter",
        "Messages the agent gave up on, by reason.",
        &[
            ("{reason=\"queue-full\"}".into(), queue.dropped_full as f64),
            ("{reason=\"expired\"}".into(), queue.dropped_expired as f64),
            ("{reason=\"corrupt\"}".into(), queue.dropped_corrupt as f64),
        ],
    );
    family(
        &mut out,
        "hubagent_messages_held_back_total",
        "counter",
        "Messages whose source had to wait for room in the queue (none lost).",
        &one(queue.held_back),
    );
    if let Some(certificate) = &snapshot.certificate {
        family(
            &mut out,
            "hubagent_certificate_days_left",
            "gauge",
            "Whole days until the identity certificate expires.",
            &[(String::new(), certificate.days_left as f64)],
        );
    }
    let plugins: Vec<(&String, &Value)> = snapshot
        .plugins
        .as_object()
        .map(|p| p.iter().collect())
        .unwrap_or_default();
    let per_plugin = |field: &str| -> Vec<(String, f64)> {
        plugins
            .iter()
            .map(|(name, p)| (plugin_label(name), p[field].as_f64().unwrap_or(0.0)))
            .collect()
    };
    let running: Vec<(String, f64)> = plugins
        .iter()
        .map(|(name, p)| (plugin_label(name), (p["status"] == "running") as u64 as f64))
        .collect();
    family(
        &mut out,
        "hubagent_plugin_running",
        "gauge",
        "1 while the plugin runs (0: starting, restarting, quarantined, stopped).",
        &running,
    );
    family(
        &mut out,
        "hubagent_plugin_published_total",
        "counter",
        "Messages the plugin published into the queue.",
        &per_plugin("published"),
    );
    family(
        &mut out,
        "hubagent_plugin_dropped_total",
        "counter",
        "Messages of the plugin dropped by its rate limit or size checks.",
        &per_plugin("dropped"),
    );
    family(
        &mut out,
        "hubagent_plugin_restarts_total",
        "counter",
        "Times the plugin was restarted after a failure.",
        &per_plugin("restarts"),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_have_help_and_type_and_labels_are_escaped() {
        let snapshot = Snapshot {
            connection: ConnectionState::Connected,
            hub_connections: 3,
            plugins: serde_json::json!({
                "temp\"1": {"status": "running", "published": 7, "dropped": 1, "restarts": 2},
                "q": {"status": "quarantined", "published": 0, "dropped": 0, "restarts": 5},
            }),
            ..Snapshot::default()
        };
        let text = render(&snapshot);
        assert!(
            text.contains("# TYPE hubagent_connected gauge\nhubagent_connected 1\n"),
            "{text}"
        );
        assert!(
            text.contains("hubagent_hub_connections_total 3\n"),
            "{text}"
        );
        assert!(
            text.contains("hubagent_plugin_published_total{plugin=\"temp\\\"1\"} 7\n"),
            "{text}"
        );
        assert!(
            text.contains("hubagent_plugin_running{plugin=\"q\"} 0\n"),
            "{text}"
        );
        // Every sample line belongs to a family announced just before it.
        let mut announced = String::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                announced = rest.split(' ').next().unwrap().to_string();
            } else if !line.starts_with('#') {
                assert!(line.starts_with(&announced), "{line} after {announced}");
            }
        }
    }
}
