//! ABI 1.3 `publish_batch` end to end, with the real `hubagent` binary against hubsim: a library
//! plugin (in its plugin process) publishes batches of numbered messages; every message the
//! agent said was stored arrives after a `kill -9` of the agent, and a batch's messages get their
//! own outcomes (one over `max_rate`, invalid or too large is refused alone).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use hubagent_tests::*;

/// A hubsim and an agent configuration with the misbehave plugin as "library", its `settings`
/// (TOML lines) and `limits` (TOML lines of the plugin table); the path of its record.
struct Setup {
    _dir: tempfile::TempDir,
    running: hubsim::Running,
    config: PathBuf,
    record: PathBuf,
}

async fn setup(device: &str, limits: &str, settings: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let library = install_plugin(dir.path(), &built_library("hubagent_test_misbehave"), 0o644);
    // The plugin writes its record here: the one place its sandbox lets it write.
    let records = dir.path().join("records");
    std::fs::create_dir(&records).unwrap();
    let record = records.join("library.record");
    let plugins = format!(
        r#"
[[plugin]]
name = "library"
kind = "library"
path = "{library}"
allow_write = ["{records}"]
{limits}
[plugin.settings]
record = "{record}"
{settings}
"#,
        library = library.display(),
        records = records.display(),
        record = record.display(),
    );
    let config = plugin_agent_config(dir.path(), &running, device, &plugins, true);
    add_settings(&config, "[hub]", "reconnect_backoff_max = \"2s\"\n");
    Setup {
        _dir: dir,
        running,
        config,
        record,
    }
}

/// Notes, per run, the highest message the plugin was told is stored (each batch's messages are
/// all stored here, so those of a run are 1..=that).
fn note_stored(acked: &mut Acknowledged, record_path: &Path) {
    for ((run, n), outcome) in publish_answers(record_path) {
        if outcome == "ok" {
            acked.note(&run, n);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_messages_the_agent_stored_survive_kill_9() {
    stored_batches_survive_kill_9("gw-batch-kill", None).await;
}

/// The same with `fsync = "always"`: each push waits for its sync, handing its worker thread
/// over meanwhile (telemetry/publisher.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_messages_stored_with_fsync_always_survive_kill_9() {
    stored_batches_survive_kill_9("gw-batch-kill-always", Some("fsync = \"always\"\n")).await;
}

/// Batches pile up in the queue during an outage, the agent is killed with `kill -9` and
/// started again: every message the plugin was told is stored arrives. `queue`: lines of a
/// `[queue]` table.
async fn stored_batches_survive_kill_9(device: &str, queue: Option<&str>) {
    let s = setup(
        device,
        "max_rate = 100000\nburst = 100000",
        "mode = \"batch\"\nbatch = 16\ninterval = \"20ms\"",
    )
    .await;
    if let Some(lines) = queue {
        // After the plugin's tables: a table of its own.
        let text = std::fs::read_to_string(&s.config).unwrap();
        std::fs::write(&s.config, format!("{text}\n[queue]\n{lines}")).unwrap();
    }
    let sim = s.running.sim.clone();
    let agent = AgentProcess::start(&s.config);
    agent.wait_log("publish_batch offered: true").await;
    assert!(
        sim.wait_until(LONG_WAIT, |x| numbered(x, device, Some("library"), "n")
            .len()
            >= 64)
            .await,
        "{}",
        agent.log_text()
    );
    assert_eq!(agent.plugins_list()["library"]["abi"], "1.3");

    // The hub goes away: batches pile up in the queue on disk; kill -9 with a backlog.
    begin_outage(&sim, device);
    let status = agent
        .wait_status("a backlog during the outage", |st| {
            st["queue_depth"].as_u64().unwrap_or(0) >= 300
        })
        .await;
    if queue.is_some() {
        // The policy is in force: a sync for about every batch of 16 (shared when pushes meet),
        // not one a second.
        let (pushed, syncs) = (&status["queue"]["pushed"], &status["queue"]["syncs"]);
        assert!(
            syncs.as_u64().unwrap() * 32 >= pushed.as_u64().unwrap(),
            "{pushed} pushed with {syncs} syncs"
        );
    }
    agent.kill_9();
    // Read after the kill: every "ok" the plugin recorded was answered before the agent died.
    let mut acked = Acknowledged::new();
    note_stored(&mut acked, &s.record);
    let stored_before_kill = acked.produced();

    let agent = AgentProcess::start(&s.config);
    end_outage(&sim);
    let messages = || numbered(&sim, device, Some("library"), "n");
    // The new run publishes too; what it was told is stored until now arrives as well.
    assert!(
        sim.wait_until(LONG_WAIT, |_| publish_answers(&s.record).len() as u64
            >= stored_before_kill + 64)
            .await,
        "{}",
        agent.log_text()
    );
    note_stored(&mut acked, &s.record);
    let drained = drain(&agent, &acked, messages, Duration::from_secs(30)).await;
    let records = publish_answers(&s.record);
    let list = agent.plugins_list();
    assert_eq!(agent.stop(), Some(0));

    let delivery = Delivery::of(&acked, &messages());
    println!(
        "publish_batch through kill -9: {stored_before_kill} stored before the kill, {}",
        delivery.figures()
    );
    drained.unwrap_or_else(|e| panic!("publish_batch through kill -9: {e}"));
    delivery.assert_nothing_lost("publish_batch through kill -9");
    assert!(
        acked.runs().len() >= 2,
        "two plugin runs: {:?}",
        acked.runs()
    );
    let refused: Vec<_> = records.iter().filter(|(_, r)| *r != "ok").collect();
    assert!(
        refused.iter().all(|(_, r)| *r == "Stopping"),
        "only the stop refuses a message: {refused:?}"
    );
    assert_eq!(list["library"]["dropped"], 0, "{}", list["library"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_gets_one_outcome_per_message() {
    let device = "gw-batch-outcomes";
    // 10 tokens and one more a second: a batch of 25 published at once has 10 messages within
    // the rate (the invalid one never reaches the rate check; the too large one does).
    let s = setup(
        device,
        "max_rate = 1\nburst = 10",
        "mode = \"odd-batch\"\ninterval = \"20ms\"",
    )
    .await;
    let sim = s.running.sim.clone();
    let agent = AgentProcess::start(&s.config);
    agent.wait_log("publish_batch offered: true").await;
    let record_path = s.record.clone();
    assert!(
        sim.wait_until(LONG_WAIT, |_| publish_answers(&record_path).len() >= 25)
            .await,
        "{}",
        agent.log_text()
    );
    let outcomes: BTreeMap<u64, String> = publish_answers(&s.record)
        .into_iter()
        .map(|((_, n), outcome)| (n, outcome))
        .collect();
    let expected: BTreeMap<u64, String> = (1..=25)
        .map(|n| {
            let outcome = match n {
                3 => "Invalid",
                5 => "TooLarge",
                12.. => "RateLimited",
                _ => "ok",
            };
            (n, outcome.to_string())
        })
        .collect();
    assert_eq!(outcomes, expected);

    // Exactly the stored ones arrive, in order; the refused ones are counted as dropped (the
    // invalid one is the plugin's error, refused before it is counted).
    let stored: Vec<u64> = vec![1, 2, 4, 6, 7, 8, 9, 10, 11];
    assert!(
        sim.wait_until(LONG_WAIT, |x| numbered(x, device, Some("library"), "n")
            .len()
            >= stored.len())
            .await,
        "{}",
        agent.log_text()
    );
    let plugins = agent.plugins_list();
    assert_eq!(agent.stop(), Some(0));
    let arrived: Vec<u64> = numbered(&sim, device, Some("library"), "n")
        .iter()
        .map(|m| m.n)
        .collect();
    assert_eq!(arrived, stored);
    let distinct: BTreeSet<u64> = arrived.iter().copied().collect();
    assert_eq!(distinct.len(), arrived.len(), "no duplicates: {arrived:?}");
    assert_eq!(plugins["library"]["published"], 9, "{}", plugins["library"]);
    assert_eq!(plugins["library"]["dropped"], 15, "{}", plugins["library"]);
}
