//! Batching to the hub (docs/configuration.md, "Batching to the hub"), end to end with the real
//! `hubagent` binary against hubsim over MQTT/TLS: an exec plugin with `batch` (and `compress =
//! "gzip"`) numbers its readings; hubsim splits the batches back into readings and meters billed
//! 4 KB blocks. Every reading the agent acknowledged arrives, once while nothing fails and at
//! least once across a `kill -9` of the agent in the middle of batching, under its own message
//! id; and the hub bills far fewer blocks than the one per reading it would without batching.
//! The ids and times the batches derive (format 2) are checked reading by reading: the ids are
//! the outlet's run `<base>-<n>`, a reading sent again after the kill in a batch cut differently
//! keeps its id, and each creation time is the agent's, to the millisecond.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use hubagent::message::TelemetryMessage;
use hubagent::telemetry::batch;
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

    // kill -9 while the plugin goes on publishing and batches are being packed and sent, with
    // a batch the hub received and had not acknowledged yet: hubsim holds each publish for 5 s
    // before it records and acknowledges it, so the batch sent first after this is recorded
    // after the kill, and sent again after the restart.
    sim.faults.lock().unwrap().delay = Some(Duration::from_secs(5));
    let published = note(&agent, &mut acked, &record);
    // More than a batch's worth later (a batch goes when full or 300 ms after its first reading).
    agent
        .wait_plugins("the plugin published 150 more readings", |list| {
            list["sensor"]["published"].as_u64() >= Some(published + 150)
        })
        .await;
    note(&agent, &mut acked, &record);
    let recorded = sim_status(&sim, device).1;
    agent.kill_9();
    assert!(
        sim.wait_until(LONG_WAIT, |_| sim_status(&sim, device).1 > recorded)
            .await,
        "the batch in hubsim's hands when the agent was killed was recorded"
    );
    sim.faults.lock().unwrap().delay = None;
    // After the restart the readings left in the queue go in smaller, uncompressed batches: a
    // reading is sent again in a batch cut differently from the first time.
    let text = std::fs::read_to_string(&config).unwrap();
    let repacked = text
        .replace(
            "batch = { max_bytes = 4096, max_delay = \"300ms\" }",
            "batch = { max_bytes = 1024, max_delay = \"300ms\" }",
        )
        .replace("compress = \"gzip\"", "");
    assert_ne!(repacked, text);
    std::fs::write(&config, repacked).unwrap();
    let agent = AgentProcess::start(&config);
    let target = messages().len() + 200;
    assert!(
        sim.wait_until(LONG_WAIT, |_| messages().len() >= target)
            .await,
        "{}",
        agent.log_text()
    );
    // The readings the queue held at the kill may make up those 200: the new run must have
    // published too before its count is read.
    agent
        .wait_plugins("the restarted plugin published", |list| {
            list["sensor"]["published"].as_u64() >= Some(1)
        })
        .await;
    note(&agent, &mut acked, &record);
    let drained = drain(&agent, &acked, messages, Duration::from_secs(30)).await;
    let log = agent.log_text();
    assert_eq!(agent.stop(), Some(0));

    let delivery = Delivery::of(&acked, &messages());
    println!("{compress}: {}", delivery.figures());
    drained.unwrap_or_else(|e| panic!("after the kill: {e}\n{log}"));
    delivery.assert_nothing_lost("batched readings across kill -9");
    assert!(
        delivery.duplicates > 0,
        "the batch recorded after the kill was sent again: {:?}",
        delivery.figures()
    );
    ids_and_times_are_the_outlets(&sim, device);
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

/// Checks every reading's id and creation time as hubsim split them out of the batches: the ids
/// of a plugin run are one outlet base numbered on in step with the plugin's own numbers (the
/// batch derived each from its first and its index), a reading that arrived twice did so under
/// one id and time, at least one of those in a batch that began with another reading than the
/// first time (cut differently), and the times are whole milliseconds that never go back.
fn ids_and_times_are_the_outlets(sim: &hubsim::Sim, device: &str) {
    let records = sim.records.lock().unwrap().telemetry[device].clone();
    // (run, seq) -> (id, time), and each batch's first (run, seq).
    let mut readings: BTreeMap<(String, u64), BTreeSet<(String, String)>> = BTreeMap::new();
    let mut batch_of: BTreeMap<(String, u64), BTreeSet<(String, u64)>> = BTreeMap::new();
    let mut first_of_batch: BTreeMap<String, (String, u64)> = BTreeMap::new();
    for r in &records {
        let body: Value = serde_json::from_str(r.body.as_deref().unwrap()).unwrap();
        let key = (r.properties["run"].clone(), body["seq"].as_u64().unwrap());
        let id = r.system_properties["message-id"].clone();
        let time = r.system_properties["creation-time"].clone();
        readings.entry(key.clone()).or_default().insert((id, time));
        let batch = r.batch_message_id.clone().unwrap();
        let first = first_of_batch.entry(batch).or_insert(key.clone()).clone();
        batch_of.entry(key).or_default().insert(first);
    }
    let mut runs: BTreeMap<&str, Vec<(u64, &str, &str)>> = BTreeMap::new();
    for ((run, seq), arrivals) in &readings {
        assert_eq!(
            arrivals.len(),
            1,
            "run {run} reading {seq} arrived under several ids or times: {arrivals:?}"
        );
        let (id, time) = arrivals.first().unwrap();
        runs.entry(run).or_default().push((*seq, id, time));
    }
    for (run, readings) in runs {
        let (_, first_id, _) = readings[0];
        let (base, _) = first_id.rsplit_once('-').unwrap();
        assert!(uuid::Uuid::try_parse(base).is_ok(), "{first_id}");
        let offset = |seq: u64, id: &str| {
            let (b, n) = id.rsplit_once('-').unwrap();
            assert_eq!(b, base, "run {run} reading {seq}: {id} has another base");
            n.parse::<i64>().unwrap() - seq as i64
        };
        let step = offset(readings[0].0, first_id);
        let mut last_time = (String::new(), 0);
        for (seq, id, text) in readings {
            assert_eq!(
                offset(seq, id),
                step,
                "run {run} reading {seq}: {id} is not numbered in step with the others"
            );
            let t = utc_millis(text)
                .unwrap_or_else(|| panic!("run {run} reading {seq}: {text:?} is not UTC in ms"));
            assert!(t >= last_time, "run {run} reading {seq}: {text} goes back");
            last_time = t;
        }
    }
    let repacked = batch_of.values().filter(|firsts| firsts.len() > 1).count();
    assert!(
        repacked > 0,
        "some reading sent again arrived in a batch that began elsewhere"
    );
}

/// An RFC 3339 UTC time with at most millisecond digits, as the outlet stamps them
/// (`2026-12-07T01:00:00.25Z`), as its whole seconds' text and its milliseconds: they compare
/// in time order.
fn utc_millis(text: &str) -> Option<(String, u32)> {
    let text = text.strip_suffix('Z')?;
    let (seconds, fraction) = text.split_once('.').unwrap_or((text, ""));
    let digits_ok = fraction.len() <= 3 && fraction.bytes().all(|b| b.is_ascii_digit());
    (seconds.len() == 19 && digits_ok).then(|| {
        (
            seconds.to_owned(),
            format!("{fraction:0<3}").parse().unwrap(),
        )
    })
}

/// Readings as the plugin outlet queues them (ids of one base numbered on, times to the
/// millisecond), and some that break the rules: a plugin's own time, a property of its own, a
/// body that is not JSON, a gap in the ids.
fn outlet_readings() -> Vec<TelemetryMessage> {
    let mut ids = batch::ReadingIds::default();
    let mut readings: Vec<_> = (0..12)
        .map(|i| TelemetryMessage {
            message_id: ids.next_id(),
            body: format!("{{\"seq\":{i},\"temp\":21.5}}").into_bytes().into(),
            content_type: Some("application/json".into()),
            content_encoding: Some("utf-8".into()),
            // Odd milliseconds: no trailing zero for the outlet's format to drop.
            creation_time: Some(format!("2026-12-07T01:00:00.{}Z", 101 + i * 2)),
            properties: vec![("source".into(), "sensor".into())],
        })
        .collect();
    readings[3].creation_time = Some("2026-12-07T01:00:00.123456Z".into());
    readings[5].properties.push(("alarm".into(), "high".into()));
    readings[7].body = b"\x00raw".to_vec().into();
    readings[7].content_type = None;
    readings[9].message_id = ids.next_id();
    readings
}

#[test]
fn a_reading_batched_differently_splits_into_the_same_id_time_properties_and_body() {
    let readings = outlet_readings();
    // Once in one batch, then, as after a crash, from the fifth on in batches of three (gzipped).
    let packings: [(Vec<&[TelemetryMessage]>, bool); 2] = [
        (vec![&readings[..]], false),
        (readings[4..].chunks(3).collect(), true),
    ];
    for (batches, gzip) in packings {
        let mut split = Vec::new();
        for part in batches {
            let message = batch::encode(part, gzip);
            let properties: BTreeMap<String, String> = message.properties.iter().cloned().collect();
            assert_eq!(properties[batch::FORMAT_PROPERTY], batch::FORMAT);
            split.extend(
                hubsim::batch::split(
                    &message.body,
                    message.content_encoding.as_deref(),
                    &properties,
                )
                .unwrap(),
            );
        }
        let sent = &readings[readings.len() - split.len()..];
        for (reading, got) in sent.iter().zip(&split) {
            let what = format!("{} (gzip {gzip})", reading.message_id);
            assert_eq!(got.message_id, reading.message_id, "{what}");
            assert_eq!(got.creation_time, reading.creation_time, "{what}");
            assert_eq!(
                got.properties,
                reading
                    .properties
                    .iter()
                    .cloned()
                    .collect::<BTreeMap<_, _>>(),
                "{what}"
            );
            assert_eq!(got.content_type, reading.content_type, "{what}");
            match serde_json::from_slice::<Value>(&reading.body) {
                Ok(json) => {
                    assert_eq!(
                        serde_json::from_slice::<Value>(&got.body).unwrap(),
                        json,
                        "{what}"
                    );
                    assert_eq!(got.content_encoding, reading.content_encoding, "{what}");
                }
                Err(_) => assert_eq!(got.body, reading.body.to_vec(), "{what}"),
            }
        }
    }
}
