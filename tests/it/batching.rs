//! Batching to the hub (docs/configuration.md, "Batching to the hub"), end to end with the real
//! `hubagent` binary against hubsim over MQTT/TLS: an exec plugin with `batch` (and `compress =
//! "gzip"`) numbers its readings; hubsim splits the batches back into readings and meters billed
//! 4 KB blocks. Every reading the agent acknowledged arrives, once while nothing fails and at
//! least once across a `kill -9` of the agent in the middle of batching, under its own message
//! id; and the hub bills far fewer blocks than the one per reading it would without batching.

use std::path::Path;
use std::time::Duration;

use hubagent_tests::*;
use serde_json::Value;

/// Notes how many readings the agent acknowledged to the plugin's current run (`published` in
/// `hubagent plugins list`, under the run its pid names in the record).
fn note(agent: &AgentProcess, acked: &mut Acknowledged, record: &Path) -> u64 {
    let list = agent.plugins_list();
    let plugin = &list["sensor"];
    assert_eq!(plugin["restarts"], 0, "{plugin}");
    let pid = plugin["pid"].as_u64().unwrap();
    let count = plugin["published"].as_u64().unwrap();
    let prefix = format!("{pid}-");
    let runs = numbered_exec_record(record);
    let run: Vec<_> = runs.keys().filter(|r| r.starts_with(&prefix)).collect();
    assert_eq!(run.len(), 1, "one run for pid {pid}: {runs:?}");
    acked.note(run[0], count);
    count
}

fn sim_status(sim: &hubsim::Sim, device: &str) -> (u64, u64, u64) {
    let r = sim.records.lock().unwrap();
    let get = |m: &std::collections::HashMap<String, u64>| m.get(device).copied().unwrap_or(0);
    (
        get(&r.telemetry_received),
        get(&r.readings_received),
        get(&r.billed_blocks),
    )
}

async fn batches_survive_kill_9(device: &str, compress: &str) {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let sim = running.sim.clone();
    let script_source = dir.path().join("numbered.py");
    std::fs::write(&script_source, NUMBERED_EXEC_PLUGIN).unwrap();
    let script = install_plugin(dir.path(), &script_source, 0o644);
    let records = dir.path().join("records");
    std::fs::create_dir(&records).unwrap();
    let record = records.join("sensor.record");
    let plugins = format!(
        r#"
[[plugin]]
name = "sensor"
kind = "exec"
command = ["{PYTHON}", "{script}"]
max_rate = 400
batch = {{ max_bytes = 4096, max_delay = "300ms" }}
{compress}
allow_write = ["{records}"]
[plugin.settings]
interval = 0.004
record = "{record}"
"#,
        script = script.display(),
        records = records.display(),
        record = record.display(),
    );
    let config = plugin_agent_config(dir.path(), &running, device, &plugins, true);
    let messages = || numbered(&sim, device, Some("sensor"), "seq");

    // Batching while nothing fails: each reading arrives exactly once.
    let agent = AgentProcess::start(&config);
    assert!(
        sim.wait_until(LONG_WAIT, |_| messages().len() >= 300).await,
        "{}",
        agent.log_text()
    );
    let mut acked = Acknowledged::new();
    note(&agent, &mut acked, &record);
    drain(&agent, &acked, messages, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("before the kill: {e}\n{}", agent.log_text()));
    let before_kill = Delivery::of(&acked, &messages());
    assert_eq!(
        before_kill.duplicates,
        0,
        "no reading twice while nothing failed: {:?}",
        before_kill.figures()
    );
    let (hub_messages, readings, blocks) = sim_status(&sim, device);
    assert!(
        hub_messages * 5 <= readings && blocks * 5 <= readings,
        "{readings} readings in {hub_messages} hub messages billed {blocks} blocks: \
         batching packs at least 5 readings a block (without it, one block each)"
    );

    // kill -9 while the plugin goes on publishing and batches are being packed and sent.
    note(&agent, &mut acked, &record);
    agent.kill_9();
    let agent = AgentProcess::start(&config);
    let target = messages().len() + 200;
    assert!(
        sim.wait_until(LONG_WAIT, |_| messages().len() >= target)
            .await,
        "{}",
        agent.log_text()
    );
    note(&agent, &mut acked, &record);
    let drained = drain(&agent, &acked, messages, Duration::from_secs(30)).await;
    let log = agent.log_text();
    assert_eq!(agent.stop(), Some(0));

    let delivery = Delivery::of(&acked, &messages());
    println!("{compress}: {}", delivery.figures());
    drained.unwrap_or_else(|e| panic!("after the kill: {e}\n{log}"));
    delivery.assert_nothing_lost("batched readings across kill -9");
    // Every reading of hubsim's records came out of a batch.
    let records = sim.records.lock().unwrap().telemetry[device].clone();
    let unbatched = records
        .iter()
        .filter(|r| {
            let v = serde_json::to_value(r).unwrap();
            v.get("batchMessageId").and_then(Value::as_str).is_none()
                || v.get("batchError").is_some()
        })
        .count();
    assert_eq!(unbatched, 0, "every reading arrived in a batch that split");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_readings_arrive_once_bill_fewer_blocks_and_survive_kill_9() {
    batches_survive_kill_9("gw-batch-plain", "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzipped_batches_arrive_once_bill_fewer_blocks_and_survive_kill_9() {
    batches_survive_kill_9("gw-batch-gzip", "compress = \"gzip\"").await;
}
