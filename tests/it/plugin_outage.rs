//! Durable plugin telemetry end to end, with the real `hubagent` binary against hubsim: a library
//! plugin (in its plugin process) and an exec plugin publish numbered messages through a hub
//! outage of two minutes, a `kill -9` of the agent during the outage and another while the backlog
//! drains; every message the agent acknowledged to a plugin arrives in hubsim's records.
//! Duplicates (at-least-once delivery) are counted and reported in
//! `target/reliability/plugin-outage.json`; none may be lost. The hub's other faults (drops
//! mid-burst, CONNACK refusals, kill -9) are walked in one shorter scenario, and a full queue and
//! `max_age` are tested under each policy.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hubagent_tests::*;
use serde_json::json;

const OUTAGE: Duration = Duration::from_secs(120);
const DEVICE: &str = "gw-plugin-outage";

/// Which messages of `source` arrived, as `(run, n)` (the number in the body field `key`).
fn arrived(sim: &hubsim::Sim, device: &str, source: &str, key: &str) -> BTreeSet<(String, u64)> {
    numbered(sim, device, Some(source), key)
        .iter()
        .map(Numbered::key)
        .collect()
}

/// The numbers that arrived per run, of the library plugin and of the exec plugin.
fn arrived_runs(sim: &hubsim::Sim, device: &str) -> Vec<BTreeMap<String, Vec<u64>>> {
    [("library", "n"), ("exec", "seq")]
        .iter()
        .map(|(source, key)| runs(&numbered(sim, device, Some(source), key)))
        .collect()
}

/// Every numbered message that arrived from the library plugin and from the exec plugin.
fn both_plugins_messages(sim: &hubsim::Sim, device: &str) -> Vec<Numbered> {
    [
        numbered(sim, device, Some("library"), "n"),
        numbered(sim, device, Some("exec"), "seq"),
    ]
    .concat()
}

/// The exec plugin's run id prefix (its pid) and the messages the agent acknowledged to it so
/// far, from `hubagent plugins list`. The exec plugin must not have been restarted, so the
/// counter is that one run's.
fn exec_acknowledged(agent: &AgentProcess) -> (u64, u64) {
    let list = agent.plugins_list();
    let exec = &list["exec"];
    assert_eq!(exec["restarts"], 0, "{exec}");
    assert_eq!(exec["status"], "running", "{exec}");
    (
        exec["pid"].as_u64().unwrap(),
        exec["published"].as_u64().unwrap(),
    )
}

fn run_of_pid(runs: &BTreeMap<String, u64>, pid: u64) -> String {
    let prefix = format!("{pid}-");
    let found: Vec<&String> = runs.keys().filter(|r| r.starts_with(&prefix)).collect();
    assert_eq!(found.len(), 1, "one exec run for pid {pid}: {runs:?}");
    found[0].clone()
}

/// A hubsim and an agent configuration with the recording library plugin ("library") and the
/// numbered exec plugin ("exec"), each publishing every `interval`, plus `extra` TOML tables.
struct Setup {
    dir: tempfile::TempDir,
    running: hubsim::Running,
    device: String,
    config: PathBuf,
    lib_record: PathBuf,
    exec_record: PathBuf,
}

impl Setup {
    /// Starts the agent and waits until the first `n` messages of each plugin arrived.
    async fn start_agent(&self, n: usize) -> AgentProcess {
        let agent = AgentProcess::start(&self.config);
        let device = self.device.as_str();
        assert!(
            self.running
                .sim
                .wait_until(LONG_WAIT, |x| numbered(x, device, Some("library"), "n")
                    .len()
                    >= n
                    && numbered(x, device, Some("exec"), "seq").len() >= n)
                .await,
            "{}",
            agent.log_text()
        );
        agent
    }
}

async fn setup(device: &str, interval_ms: u64, extra: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let library = install_plugin(dir.path(), &built_library("hubagent_test_misbehave"), 0o644);
    let script_source = dir.path().join("numbered.py");
    std::fs::write(&script_source, NUMBERED_EXEC_PLUGIN).unwrap();
    let script = install_plugin(dir.path(), &script_source, 0o644);
    // The plugins write their records here: the one place their sandbox lets them write.
    let records = dir.path().join("records");
    std::fs::create_dir(&records).unwrap();
    let lib_record: PathBuf = records.join("library.record");
    let exec_record: PathBuf = records.join("exec.record");
    let plugins = format!(
        r#"{extra}
[[plugin]]
name = "library"
kind = "library"
path = "{library}"
max_rate = 100
callback_timeout = "1s"
allow_write = ["{records}"]
[plugin.settings]
interval = "{interval_ms}ms"
record = "{lib_record}"

[[plugin]]
name = "exec"
kind = "exec"
command = ["{PYTHON}", "{script}"]
max_rate = 100
allow_write = ["{records}"]
[plugin.settings]
interval = {interval_s}
record = "{exec_record}"
"#,
        library = library.display(),
        script = script.display(),
        lib_record = lib_record.display(),
        exec_record = exec_record.display(),
        records = records.display(),
        interval_s = interval_ms as f64 / 1000.0,
    );
    let config = plugin_agent_config(dir.path(), &running, device, &plugins, true);
    // Reconnect soon after an outage ends (the default backoff grows to a minute).
    add_settings(&config, "[hub]", "reconnect_backoff_max = \"2s\"\n");
    Setup {
        dir,
        running,
        device: device.to_string(),
        config,
        lib_record,
        exec_record,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_and_kill_9_lose_no_plugin_message() {
    let s = setup(DEVICE, 40, "").await;
    let agent = s.start_agent(5).await;
    let Setup {
        dir: _dir,
        running,
        config,
        lib_record,
        exec_record: exec_record_path,
        ..
    } = s;
    let sim = running.sim.clone();

    // The hub goes away for OUTAGE: the plugins keep publishing into the queue on disk.
    let outage_end = refuse_connections(&sim, OUTAGE);
    drop_connection(&sim, DEVICE);
    agent
        .wait_status("a backlog during the outage", |s| {
            s["queue_depth"].as_u64().unwrap_or(0) >= 400
        })
        .await;
    // (Counted only now: what was in flight when the connection dropped may still be recorded.)
    let before_outage = telemetry_count(&sim, DEVICE);
    // kill -9 in the middle of the outage, with a backlog on disk and both plugins publishing.
    let mut acked = Acknowledged::new();
    let note = |agent: &AgentProcess, acked: &mut Acknowledged| {
        note_acknowledged(agent, acked, &lib_record, &exec_record_path)
    };
    let (exec_pid_1, _) = note(&agent, &mut acked);
    agent.kill_9();
    let agent = AgentProcess::start(&config);
    agent
        .wait_status("the restarted agent queues again", |s| {
            s["queue"]["pushed"].as_u64().unwrap_or(0) >= 50
        })
        .await;
    assert_eq!(
        telemetry_count(&sim, DEVICE),
        before_outage,
        "nothing reaches the hub during the outage"
    );
    // The outage lasts its planned time; the agent keeps trying meanwhile.
    tokio::time::sleep_until(outage_end.into()).await;
    let refused = refused_connections(&sim, DEVICE);
    assert!(refused >= 2, "the agent kept trying during the outage");
    let backlog = agent.status()["queue_depth"].as_u64().unwrap_or(0);

    // Recovery; a second kill -9 as soon as the backlog starts draining.
    end_outage(&sim);
    assert!(
        sim.wait_until(LONG_WAIT, |s| telemetry_count(s, DEVICE) > before_outage)
            .await,
        "{}",
        agent.log_text()
    );
    let (exec_pid_2, _) = note(&agent, &mut acked);
    let depth_at_second_kill = agent.status()["queue_depth"].as_u64().unwrap_or(0);
    agent.kill_9();
    let agent = AgentProcess::start(&config);

    // Everything the agent acknowledged to either plugin before the kills arrives. The backlog
    // drains in seconds; the bound keeps a failure report within nextest's timeout.
    let messages = || both_plugins_messages(&sim, DEVICE);
    if let Err(e) = drain(&agent, &acked, messages, Duration::from_secs(30)).await {
        panic!(
            "after the second kill: {e}\n--- agent log ---\n{}",
            agent.log_text()
        );
    }
    // A last batch through the recovered session; what was acknowledged until the stop arrives
    // before it.
    let target = publish_answers(&lib_record).len() + 20;
    assert!(
        sim.wait_until(LONG_WAIT, |_| publish_answers(&lib_record).len() >= target)
            .await
    );
    let (exec_pid_3, _) = note(&agent, &mut acked);
    let drained = drain(&agent, &acked, messages, Duration::from_secs(30)).await;
    let status_after = agent.status();
    assert_eq!(agent.stop(), Some(0));

    // The figures first (a failed check's too), counted from the producers' side.
    let record = publish_answers(&lib_record);
    let written = numbered_exec_record(&exec_record_path);
    let delivery = Delivery::of(&acked, &messages());
    let lib_received = numbered(&sim, DEVICE, Some("library"), "n");
    let exec_received = numbered(&sim, DEVICE, Some("exec"), "seq");
    let exec_runs = runs(&exec_received);
    let exec_written: u64 = written.values().sum();
    let exec_arrived: u64 = exec_runs.values().map(|ns| ns.len() as u64).sum();
    let mut figures = json!({
        "scenario": "library + exec plugin, hub outage of 120 s with kill -9 during it, kill -9 while the backlog drains",
        "library_published": record.values().filter(|r| *r == "ok").count(),
        "exec_runs_written": exec_written,
        // Lines an exec run wrote that the agent had not read when it was killed or stopped.
        "exec_unacknowledged_tail_lines": exec_written - exec_arrived,
        "backlog_at_recovery": backlog,
        "queue_depth_at_second_kill": depth_at_second_kill,
        "queue_after": status_after["queue"],
        "records": delivery.records,
    });
    let f = figures.as_object_mut().unwrap();
    f.extend(delivery.figures().as_object().unwrap().clone());
    println!("{}", serde_json::to_string_pretty(&figures).unwrap());
    record_reliability("plugin-outage", &figures);

    // Every acknowledged message arrived, under one message id, from runs the test saw.
    drained.unwrap_or_else(|e| panic!("before the stop: {e}"));
    delivery.assert_nothing_lost("plugins through an outage and two kills");
    // The agent had no reason to refuse any library publish.
    let refused: Vec<_> = record.iter().filter(|(_, r)| *r != "ok").collect();
    assert!(
        refused.is_empty(),
        "publish failed for {} messages: {:?}",
        refused.len(),
        &refused[..refused.len().min(5)]
    );
    // Nothing arrived that was not produced: a library run at most one past its record (a kill
    // between the publish's answer and the record line), an exec run at most what it wrote.
    for (run, ns) in runs(&lib_received) {
        let recorded = record
            .keys()
            .filter(|(r, _)| *r == run)
            .map(|(_, n)| *n)
            .max();
        let highest = *ns.last().unwrap();
        assert!(
            highest <= recorded.unwrap_or(0) + 1,
            "library run {run}: {highest} arrived, {recorded:?} recorded"
        );
    }
    for (run, ns) in &exec_runs {
        let wrote = written.get(run).copied().unwrap_or(0);
        assert!(
            ns.len() as u64 <= wrote,
            "exec run {run}: {} arrived, {wrote} written",
            ns.len()
        );
    }
    // One plugin process per agent process.
    assert!(
        runs(&lib_received).len() >= 3,
        "one library plugin process per agent process"
    );
    let expected: BTreeSet<String> = [exec_pid_1, exec_pid_2, exec_pid_3]
        .iter()
        .map(|pid| run_of_pid(&written, *pid))
        .collect();
    let exec_run_ids: BTreeSet<String> = exec_runs.keys().cloned().collect();
    assert_eq!(exec_run_ids, expected, "one exec run per agent process");
}

/// Notes what the agent has acknowledged to both plugins so far: to the library plugin, what its
/// record says each publish returned (the highest `ok` of each run); to the exec plugin, its
/// `published` count in `hubagent plugins list`, under the run its pid names in its record.
/// Returns the exec plugin's pid and count.
fn note_acknowledged(
    agent: &AgentProcess,
    acked: &mut Acknowledged,
    lib_record: &Path,
    exec_record_path: &Path,
) -> (u64, u64) {
    let (pid, count) = exec_acknowledged(agent);
    acked.note(
        &run_of_pid(&numbered_exec_record(exec_record_path), pid),
        count,
    );
    for ((run, n), result) in publish_answers(lib_record) {
        if result == "ok" {
            acked.note(&run, n);
        }
    }
    (pid, count)
}

/// Waits until the agent logs that it holds `plugin` back (a full queue).
async fn wait_held(agent: &AgentProcess, plugin: &str) {
    agent
        .wait_log_line(&format!("{plugin} was never held back"), |l| {
            l.contains("telemetry held back: the queue is full") && l.contains(plugin)
        })
        .await;
}

const SMALL_QUEUE: u64 = 64 * 1024;

/// The hub session takes up to `inflight` messages ahead (plus the one the pump waits to hand
/// over); those still go out when their segment is dropped, and are counted as dropped.
const INFLIGHT: u64 = 32 + 1;

/// Of the library and the exec plugin (one run each), how many messages are missing; fails
/// unless those are the oldest: one stretch, give or take what the session had taken ahead, and
/// everything newer arrived. `what` names why they are missing (dropped, expired).
fn oldest_missing(arrived: &[BTreeMap<String, Vec<u64>>], what: &str) -> u64 {
    let mut missing = 0;
    for (source, runs) in ["library", "exec"].iter().zip(arrived) {
        assert_eq!(runs.len(), 1, "{source}: one run");
        let (run, ns) = runs.iter().next().unwrap();
        let gap = gaps(ns);
        if let (Some(a), Some(b)) = (gap.first(), gap.last()) {
            let stragglers = b - a + 1 - gap.len() as u64;
            assert!(
                stragglers <= INFLIGHT,
                "{source} run {run}: {what} messages are one stretch of the oldest: {gap:?}"
            );
        }
        missing += gap.len() as u64;
    }
    missing
}

/// `full_policy = "reject-new"`: when the queue is full the plugins are held back (a library
/// plugin's publish does not return, an exec plugin's next line is not read) without being taken
/// for hung, nothing is dropped, and after the outage every message arrives and publishing goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_with_reject_new_holds_plugins_back_and_loses_nothing() {
    let device = "gw-queue-reject";
    let s = setup(
        device,
        20,
        "[queue]\nmax_bytes = \"64KiB\"\nfull_policy = \"reject-new\"\n",
    )
    .await;
    let sim = s.running.sim.clone();
    let agent = s.start_agent(3).await;
    begin_outage(&sim, device);

    // The queue fills up, and the agent says why the sources wait.
    agent
        .wait_log("telemetry held back: the queue is full")
        .await;
    let full = agent
        .wait_status("a full queue", |st| {
            st["queue"]["bytes_on_disk"].as_u64().unwrap_or(0) > SMALL_QUEUE - 1024
        })
        .await;
    // Held back for a while (many liveness-ping periods of the 1 s callback timeout): the
    // library plugin's publish does not return, so its record stops growing.
    // Once the agent says the library plugin is held back, its publish has not returned (and
    // the record line of the one before is written: same thread).
    wait_held(&agent, "library").await;
    let held = publish_answers(&s.lib_record).len();
    let exec_written = numbered_exec_record(&s.exec_record).values().sum::<u64>();
    let hold_until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < hold_until {
        std::thread::sleep(Duration::from_millis(500));
        let st = agent.status();
        assert!(
            st["queue"]["bytes_on_disk"].as_u64().unwrap() <= SMALL_QUEUE,
            "the queue stays within its bound: {st}"
        );
    }
    assert_eq!(
        publish_answers(&s.lib_record).len(),
        held,
        "the library plugin's publish stays held back"
    );
    // The exec plugin's writes block once the pipe is full (it may fill a pipe's worth first).
    let exec_now = numbered_exec_record(&s.exec_record).values().sum::<u64>();
    let list = agent.plugins_list();
    for name in ["library", "exec"] {
        assert_eq!(list[name]["status"], "running", "{name}: {}", list[name]);
        assert_eq!(
            list[name]["restarts"], 0,
            "{name} was not taken for hung: {}",
            list[name]
        );
        assert_eq!(list[name]["dropped"], 0, "{}", list[name]);
    }
    let st = agent.status();
    assert_eq!(st["queue"]["dropped_full"], 0, "{st}");

    // The hub comes back: everything queued arrives, the held-back publish returns, and the
    // plugins go on.
    end_outage(&sim);
    let target = held + 50;
    let lib_record = s.lib_record.clone();
    assert!(
        sim.wait_until(Duration::from_secs(90), |x| {
            let got = arrived(x, device, "library", "n");
            let record = publish_answers(&lib_record);
            record.len() >= target && record.keys().all(|k| got.contains(k))
        })
        .await,
        "{}",
        agent.log_text()
    );
    assert!(numbered_exec_record(&s.exec_record).values().sum::<u64>() > exec_now);
    // Everything the agent acknowledged to either plugin before the stop arrives.
    let mut acked = Acknowledged::new();
    note_acknowledged(&agent, &mut acked, &s.lib_record, &s.exec_record);
    let messages = || both_plugins_messages(&sim, device);
    let drained = drain(&agent, &acked, messages, LONG_WAIT).await;
    let list = agent.plugins_list();
    let st = agent.status();
    // Read before the stop: a publish racing the stop may be refused, which is no failure.
    let record = publish_answers(&s.lib_record);
    assert_eq!(agent.stop(), Some(0));
    drained.unwrap_or_else(|e| panic!("reject-new: {e}"));
    let refused: Vec<_> = record.iter().filter(|(_, r)| *r != "ok").collect();
    assert!(
        refused.is_empty(),
        "every publish before the stop succeeded: {refused:?}"
    );
    let delivery = Delivery::of(&acked, &messages());
    let mut figures = json!({
        "scenario": "library + exec plugin (50 msg/s each), 64 KiB queue full during an outage, full_policy = reject-new (held back 8 s)",
        "dropped_full": st["queue"]["dropped_full"],
        "queue_depth_when_full": full["queue_depth"],
        "records": delivery.records,
    });
    let f = figures.as_object_mut().unwrap();
    f.extend(delivery.figures().as_object().unwrap().clone());
    record_reliability("plugin-reject-new", &figures);
    delivery.assert_nothing_lost("reject-new");
    for (source, key) in [("library", "n"), ("exec", "seq")] {
        let runs = runs(&numbered(&sim, device, Some(source), key));
        assert_eq!(runs.len(), 1, "{source}: one run, never restarted");
    }
    for name in ["library", "exec"] {
        assert_eq!(list[name]["restarts"], 0, "{}", list[name]);
        assert_eq!(list[name]["dropped"], 0, "{}", list[name]);
    }
    assert_eq!(st["queue"]["dropped_full"], 0, "{st}");
    println!(
        "reject-new: full at {} bytes ({} messages); library held at {held}; exec wrote {exec_written} then {exec_now} while held",
        full["queue"]["bytes_on_disk"], full["queue_depth"]
    );
}

/// `full_policy = "drop-oldest"`: publishing never waits; the oldest queued messages are dropped
/// (counted in `dropped_full`, logged), the newest are kept and delivered after the outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_with_drop_oldest_keeps_the_newest_messages() {
    let device = "gw-queue-drop";
    let s = setup(
        device,
        20,
        "[queue]\nmax_bytes = \"64KiB\"\nfull_policy = \"drop-oldest\"\n",
    )
    .await;
    let sim = s.running.sim.clone();
    let agent = s.start_agent(3).await;
    begin_outage(&sim, device);

    // Keep publishing well past the bound: several rounds of dropping.
    agent.wait_log("queue full: oldest messages dropped").await;
    let first = agent
        .wait_status("drops", |st| {
            st["queue"]["dropped_full"].as_u64().unwrap_or(0) > 0
        })
        .await;
    let dropped_first = first["queue"]["dropped_full"].as_u64().unwrap();
    let peak = agent
        .wait_status("more drops", |st| {
            st["queue"]["dropped_full"].as_u64().unwrap_or(0) >= dropped_first + 150
        })
        .await;
    assert!(
        peak["queue"]["bytes_on_disk"].as_u64().unwrap() <= SMALL_QUEUE,
        "{peak}"
    );
    // Publishing never waited: the plugin's record kept growing at its pace.
    let before = publish_answers(&s.lib_record).len();
    let lib_record = s.lib_record.clone();
    let deadline = Instant::now() + LONG_WAIT;
    while publish_answers(&lib_record).len() < before + 20 {
        assert!(
            Instant::now() < deadline,
            "the library plugin was held back"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Recovery: what was kept arrives.
    let at_recovery = agent.status();
    let kept = at_recovery["queue_depth"].as_u64().unwrap();
    end_outage(&sim);
    assert!(
        sim.wait_until(Duration::from_secs(90), |x| {
            let got = arrived(x, device, "library", "n");
            let record = publish_answers(&lib_record);
            record.len() > before + 40 && record.keys().rev().take(20).all(|k| got.contains(k))
        })
        .await,
        "{}",
        agent.log_text()
    );
    // The drops are reported in the twin too.
    let dropped_at_recovery = at_recovery["queue"]["dropped_full"].as_u64().unwrap();
    let reported_queue = |x: &hubsim::Sim| reported(x, device, "agent")["queue"].clone();
    assert!(
        sim.wait_until(LONG_WAIT, |x| reported_queue(x)["droppedFull"]
            .as_u64()
            .is_some_and(|d| d >= dropped_at_recovery))
            .await,
        "reported.agent.queue: {}",
        reported_queue(&sim)
    );
    // One connection delivers in queue order: everything older than the newest arrivals that
    // was kept has arrived now.
    let arrived = arrived_runs(&sim, device);
    let st = agent.status();
    let list = agent.plugins_list();
    // Read before the stop: a publish racing the stop may be refused, which is no failure.
    let record = publish_answers(&s.lib_record);
    assert_eq!(agent.stop(), Some(0));

    let refused: Vec<_> = record.iter().filter(|(_, r)| *r != "ok").collect();
    assert!(refused.is_empty(), "publish never failed: {refused:?}");
    let dropped = st["queue"]["dropped_full"].as_u64().unwrap();
    let missing = oldest_missing(&arrived, "dropped");
    // Every missing message is counted.
    assert!(
        missing <= dropped && dropped <= missing + 2 * INFLIGHT,
        "{missing} missing, {dropped} counted as dropped"
    );
    assert!(missing > 0);
    // Drop-oldest frees one segment at a time: most of the bound stays in use.
    let depth_bytes = peak["queue"]["bytes_on_disk"].as_u64().unwrap();
    assert!(
        depth_bytes >= SMALL_QUEUE / 2,
        "after drops the queue still holds most of its bound: {peak}"
    );
    for name in ["library", "exec"] {
        assert_eq!(list[name]["restarts"], 0, "{}", list[name]);
        assert_eq!(list[name]["dropped"], 0, "{}", list[name]);
    }
    println!(
        "drop-oldest: {dropped} dropped, {missing} missing; {kept} messages kept at recovery; {depth_bytes} bytes at the peak"
    );
}

/// Stopping the agent while a full `reject-new` queue holds the plugins back: the agent stops at
/// once, and the library plugin's held publish returns "stopping" (it was not queued).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_while_held_back_answers_the_held_publish() {
    let device = "gw-queue-stop";
    let s = setup(
        device,
        20,
        "[queue]\nmax_bytes = \"64KiB\"\nfull_policy = \"reject-new\"\n",
    )
    .await;
    let sim = s.running.sim.clone();
    refuse_connections(&sim, Duration::from_secs(3600));
    let agent = AgentProcess::start(&s.config);
    wait_held(&agent, "library").await;
    let started = Instant::now();
    assert_eq!(agent.stop(), Some(0));
    let text = std::fs::read_to_string(&s.lib_record).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let (last, before) = lines.split_last().unwrap();
    assert!(
        last.ends_with(" Stopping"),
        "the held publish was answered: {last}"
    );
    assert!(before.iter().all(|l| l.ends_with(" ok")), "{text}");
    println!("stopped in {:?} while held back", started.elapsed());
}

/// `max_age`: during an outage messages older than the bound are dropped unsent (counted in
/// `dropped_expired`, logged, reported); the newer ones arrive after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_older_than_max_age_are_dropped_and_counted() {
    let device = "gw-queue-age";
    let s = setup(device, 50, "[queue]\nmax_age = \"3s\"\n").await;
    let sim = s.running.sim.clone();
    let agent = s.start_agent(3).await;
    begin_outage(&sim, device);
    agent
        .wait_log("queued messages older than max_age dropped")
        .await;
    let at_recovery = agent
        .wait_status("expiry", |st| {
            st["queue"]["dropped_expired"].as_u64().unwrap_or(0) >= 100
        })
        .await;
    // Roughly max_age's worth is kept (40 messages a second for 3 s), not the whole outage.
    assert!(
        at_recovery["queue_depth"].as_u64().unwrap() <= 200,
        "{at_recovery}"
    );
    end_outage(&sim);
    let lib_record = s.lib_record.clone();
    let before = publish_answers(&lib_record).len();
    assert!(
        sim.wait_until(LONG_WAIT, |x| {
            let got = arrived(x, device, "library", "n");
            let record = publish_answers(&lib_record);
            record.len() > before + 10 && record.keys().rev().take(5).all(|k| got.contains(k))
        })
        .await,
        "{}",
        agent.log_text()
    );
    let expired_at_recovery = at_recovery["queue"]["dropped_expired"].as_u64().unwrap();
    let reported_expired = |x: &hubsim::Sim| {
        reported(x, device, "agent")["queue"]["droppedExpired"]
            .as_u64()
            .unwrap_or(0)
    };
    assert!(
        sim.wait_until(LONG_WAIT, |x| reported_expired(x) >= expired_at_recovery)
            .await,
        "reported.agent.queue.droppedExpired {} < {expired_at_recovery}",
        reported_expired(&sim)
    );
    let arrived = arrived_runs(&sim, device);
    let st = agent.status();
    assert_eq!(agent.stop(), Some(0));
    let missing = oldest_missing(&arrived, "expired");
    let expired = st["queue"]["dropped_expired"].as_u64().unwrap();
    assert!(
        missing > 0 && missing <= expired && expired <= missing + 2 * INFLIGHT,
        "{missing} missing, {expired} counted as expired"
    );
    assert_eq!(st["queue"]["dropped_full"], 0, "{st}");
    println!("max_age: {expired} expired, {missing} missing");
}

/// Waits until hubsim has recorded `more` messages of `device` beyond `before` (both plugins).
async fn wait_more(
    sim: &hubsim::Sim,
    device: &str,
    agent: &AgentProcess,
    before: usize,
    more: usize,
) {
    assert!(
        sim.wait_until(LONG_WAIT, |x| telemetry_count(x, device) >= before + more)
            .await,
        "{} more messages did not arrive:\n{}",
        more,
        agent.log_text()
    );
}

/// Waits until hubsim has recorded a hub connection of `device` beyond the first `connects`.
async fn wait_reconnected(sim: &hubsim::Sim, device: &str, agent: &AgentProcess, connects: usize) {
    assert!(
        sim.wait_until(LONG_WAIT, |x| hub_connects(x, device) > connects)
            .await,
        "no reconnection:\n{}",
        agent.log_text()
    );
}

/// The hub's other faults with external plugins publishing, one after the other in one agent's
/// life (to keep CI short): the library and the exec plugin publish 50 messages a second each
/// while the hub drops the connection mid-burst three times, then refuses connections (CONNACK
/// 3, "server unavailable") for 5 s, then the agent is killed with `kill -9` and started again.
/// Every message the agent acknowledged to either plugin arrives, counted from the plugins'
/// side (the library plugin's record of what each publish returned, the exec plugin's
/// `published`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_through_drops_refusals_and_a_kill_lose_nothing() {
    let device = "gw-plugin-faults";
    let s = setup(device, 20, "").await;
    let sim = s.running.sim.clone();
    let agent = s.start_agent(5).await;
    let mut acked = Acknowledged::new();

    // 1. The connection dropped mid-burst: up to 32 messages are in flight at any time.
    for round in 1..=3 {
        let connects = hub_connects(&sim, device);
        assert!(
            drop_connection(&sim, device),
            "round {round}: no live connection"
        );
        wait_reconnected(&sim, device, &agent, connects).await;
        wait_more(&sim, device, &agent, telemetry_count(&sim, device), 20).await;
    }

    // 2. Refused (CONNACK 3) for 5 s: the plugins go on publishing into the queue.
    let refused_before = refused_connections(&sim, device);
    let connects = hub_connects(&sim, device);
    refuse_connections(&sim, Duration::from_secs(5));
    assert!(drop_connection(&sim, device), "no live connection to drop");
    assert!(
        sim.wait_until(LONG_WAIT, |x| refused_connections(x, device)
            > refused_before)
            .await,
        "no connection refused:\n{}",
        agent.log_text()
    );
    wait_reconnected(&sim, device, &agent, connects).await;
    let refused = refused_connections(&sim, device) - refused_before;
    wait_more(&sim, device, &agent, telemetry_count(&sim, device), 20).await;

    // 3. kill -9 with both plugins publishing, and a new agent process.
    note_acknowledged(&agent, &mut acked, &s.lib_record, &s.exec_record);
    agent.kill_9();
    let agent = AgentProcess::start(&s.config);
    // The new plugin processes publish (their runs are in the records), and it reaches the hub.
    agent
        .wait_plugins("both plugins publishing again", |list| {
            ["library", "exec"]
                .iter()
                .all(|p| list[p]["published"].as_u64() >= Some(20))
        })
        .await;
    wait_more(&sim, device, &agent, telemetry_count(&sim, device), 40).await;

    // Everything acknowledged to either plugin, by either agent process, arrives.
    note_acknowledged(&agent, &mut acked, &s.lib_record, &s.exec_record);
    let messages = || both_plugins_messages(&sim, device);
    let drained = drain(&agent, &acked, messages, LONG_WAIT).await;
    // Read before the stop: a publish racing the stop may be refused, which is no failure.
    let record = publish_answers(&s.lib_record);
    let log = agent.log_text();
    assert_eq!(agent.stop(), Some(0), "{log}");
    let delivery = Delivery::of(&acked, &messages());
    let mut figures = json!({
        "scenario": "library + exec plugin (50 msg/s each): hub connection dropped 3 times mid-burst, CONNACK 3 for 5 s, kill -9 and restart",
        "refused connections": refused,
        "records": delivery.records,
    });
    let f = figures.as_object_mut().unwrap();
    f.extend(delivery.figures().as_object().unwrap().clone());
    record_reliability("plugin-faults", &figures);
    drained.unwrap_or_else(|e| panic!("{e}\n{log}"));
    delivery.assert_nothing_lost("plugins through drops, refusals and a kill");
    // No fault made the agent refuse a publish: it queues while the hub is away.
    let failed: Vec<_> = record.iter().filter(|(_, r)| *r != "ok").collect();
    assert!(failed.is_empty(), "publishes failed: {failed:?}");
}
