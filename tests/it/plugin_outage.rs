//! Durable plugin telemetry end to end, with the real `hubagent` binary against hubsim: a library
//! plugin (in its plugin process) and an exec plugin publish numbered messages through a hub
//! outage of a minute, a `kill -9` of the agent during the outage and another while the backlog
//! drains; every message the agent acknowledged to a plugin arrives in hubsim's records.
//! Duplicates (at-least-once delivery) are counted and reported in
//! `target/reliability/plugin-outage.json`; none may be lost.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hubagent_tests::*;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);
const OUTAGE: Duration = Duration::from_secs(70);
const DEVICE: &str = "gw-plugin-outage";

/// An exec plugin: numbers its messages under a run id (its pid and start time) and appends
/// `<run> <seq>` to the record file before it writes the message line. The agent reads the next
/// line only once the previous message is queued, so what it wrote may be more than what the
/// agent acknowledged when the agent is killed (lines still in the pipe), never less.
const EXEC_PLUGIN: &str = r#"import json, os, sys, threading, time
settings = json.loads(sys.stdin.readline())
# EOF on stdin means stop.
threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()
run = "%d-%d" % (os.getpid(), time.time_ns())
record = open(settings["record"], "a")
seq = 0
while True:
    seq += 1
    record.write("%s %d\n" % (run, seq))
    record.flush()
    sys.stdout.write(json.dumps({"body": {"seq": seq, "run": run}, "properties": {"run": run}}) + "\n")
    sys.stdout.flush()
    time.sleep(settings["interval"])
"#;

/// `(run, n)` of every record of `source`, with its message id.
fn received(sim: &hubsim::Sim, source: &str, key: &str) -> Vec<((String, u64), String)> {
    sim.records
        .lock()
        .unwrap()
        .telemetry
        .get(DEVICE)
        .map(|records| {
            records
                .iter()
                .filter(|r| r.properties.get("source").map(String::as_str) == Some(source))
                .map(|r| {
                    let body: Value = serde_json::from_str(r.body.as_deref().unwrap()).unwrap();
                    let run = body["run"].as_str().unwrap().to_string();
                    let mid = r.system_properties["message-id"].clone();
                    ((run, body[key].as_u64().unwrap()), mid)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The library plugin's record: what each `publish` returned, by `(run, n)`.
fn library_record(path: &Path) -> BTreeMap<(String, u64), String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut parts = l.split(' ');
            let run = parts.next()?.to_string();
            let n = parts.next()?.parse().ok()?;
            Some(((run, n), parts.next()?.to_string()))
        })
        .collect()
}

/// The exec plugin's record: the highest sequence number each run wrote.
fn exec_record(path: &Path) -> BTreeMap<String, u64> {
    let mut runs = BTreeMap::new();
    for line in std::fs::read_to_string(path).unwrap_or_default().lines() {
        if let Some((run, seq)) = line.split_once(' ')
            && let Ok(seq) = seq.parse::<u64>()
        {
            let e = runs.entry(run.to_string()).or_insert(0);
            *e = seq.max(*e);
        }
    }
    runs
}

fn status(agent: &AgentProcess) -> Value {
    serde_json::from_slice(&agent.cli(&["status", "--json"]).stdout).unwrap_or_default()
}

/// Polls `agent`'s status until `cond` holds.
fn wait_status(agent: &AgentProcess, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let s = status(agent);
        if cond(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not reached; status: {s}\n--- agent log ---\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The exec plugin's run id prefix (its pid) and the messages the agent acknowledged to it so
/// far, from `hubagent plugins list`. The exec plugin must not have been restarted, so the
/// counter is that one run's.
fn exec_acknowledged(agent: &AgentProcess) -> (u64, u64) {
    let list: Value =
        serde_json::from_slice(&agent.cli(&["plugins", "list", "--json"]).stdout).unwrap();
    let exec = &list["exec"];
    assert_eq!(exec["restarts"], 0, "{exec}");
    assert_eq!(exec["status"], "running", "{exec}");
    (
        exec["pid"].as_u64().unwrap(),
        exec["published"].as_u64().unwrap(),
    )
}

/// SIGKILL: the agent gets no chance to flush anything.
fn kill_9(mut agent: AgentProcess) {
    agent.child.kill().unwrap();
    agent.child.wait().unwrap();
}

fn drop_connection(sim: &hubsim::Sim) {
    let conn = sim
        .live
        .lock()
        .unwrap()
        .connections
        .get(&format!("localhost/{DEVICE}"))
        .cloned();
    if let Some(c) = conn {
        let _ = c.tx.send(hubsim::state::ConnCommand::Close {
            reason: "outage".into(),
        });
    }
}

fn run_of_pid(runs: &BTreeMap<String, u64>, pid: u64) -> String {
    let prefix = format!("{pid}-");
    let found: Vec<&String> = runs.keys().filter(|r| r.starts_with(&prefix)).collect();
    assert_eq!(found.len(), 1, "one exec run for pid {pid}: {runs:?}");
    found[0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_and_kill_9_lose_no_plugin_message() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let sim = running.sim.clone();
    let library = install_plugin(dir.path(), &built_library("hubagent_test_misbehave"), 0o644);
    let script_source = dir.path().join("numbered.py");
    std::fs::write(&script_source, EXEC_PLUGIN).unwrap();
    let script = install_plugin(dir.path(), &script_source, 0o644);
    let lib_record: PathBuf = dir.path().join("library.record");
    let exec_record_path: PathBuf = dir.path().join("exec.record");
    let plugins = format!(
        r#"
[[plugin]]
name = "library"
kind = "library"
path = "{library}"
max_rate = 100
[plugin.settings]
interval = "40ms"
record = "{lib_record}"

[[plugin]]
name = "exec"
kind = "exec"
command = ["python3", "{script}"]
max_rate = 100
[plugin.settings]
interval = 0.04
record = "{exec_record}"
"#,
        library = library.display(),
        script = script.display(),
        lib_record = lib_record.display(),
        exec_record = exec_record_path.display(),
    );
    let config = plugin_agent_config(dir.path(), &running, DEVICE, &plugins, true);
    // Reconnect soon after the outage ends (the default backoff grows to a minute).
    let text = std::fs::read_to_string(&config).unwrap().replacen(
        "[hub]\n",
        "[hub]\nreconnect_backoff_max = \"2s\"\n",
        1,
    );
    std::fs::write(&config, text).unwrap();

    let agent = AgentProcess::start(&config);
    assert!(
        sim.wait_until(WAIT, |s| received(s, "library", "n").len() >= 5
            && received(s, "exec", "seq").len() >= 5)
            .await,
        "{}",
        agent.log_text()
    );

    // The hub goes away for OUTAGE: the plugins keep publishing into the queue on disk.
    let outage_started = Instant::now();
    sim.faults.lock().unwrap().refuse_connections_until = Some(outage_started + OUTAGE);
    drop_connection(&sim);
    let before_outage = telemetry_count(&sim, DEVICE);
    wait_status(&agent, "a backlog during the outage", |s| {
        s["queue_depth"].as_u64().unwrap_or(0) >= 400
    });
    // kill -9 in the middle of the outage, with a backlog on disk and both plugins publishing.
    let (exec_pid_1, exec_acked_1) = exec_acknowledged(&agent);
    kill_9(agent);
    let agent = AgentProcess::start(&config);
    wait_status(&agent, "the restarted agent queues again", |s| {
        s["queue"]["pushed"].as_u64().unwrap_or(0) >= 50
    });
    assert_eq!(
        telemetry_count(&sim, DEVICE),
        before_outage,
        "nothing reaches the hub during the outage"
    );
    // The outage lasts its planned time; the agent keeps trying meanwhile.
    tokio::time::sleep_until((outage_started + OUTAGE).into()).await;
    let refused = sim
        .records
        .lock()
        .unwrap()
        .connections
        .iter()
        .filter(|e| e.client_id == DEVICE && e.event == "refused")
        .count();
    assert!(refused >= 2, "the agent kept trying during the outage");
    let backlog = status(&agent)["queue_depth"].as_u64().unwrap_or(0);

    // Recovery; a second kill -9 as soon as the backlog starts draining.
    sim.faults.lock().unwrap().refuse_connections_until = None;
    assert!(
        sim.wait_until(WAIT, |s| telemetry_count(s, DEVICE) > before_outage)
            .await,
        "{}",
        agent.log_text()
    );
    let (exec_pid_2, exec_acked_2) = exec_acknowledged(&agent);
    let depth_at_second_kill = status(&agent)["queue_depth"].as_u64().unwrap_or(0);
    kill_9(agent);
    let agent = AgentProcess::start(&config);

    // Everything the library plugin was told was published, and at least what the agent had
    // counted for each killed exec run, arrives.
    let complete = |s: &hubsim::Sim| {
        let got: BTreeSet<(String, u64)> = received(s, "library", "n")
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        let lib_ok = library_record(&lib_record)
            .iter()
            .filter(|(_, r)| *r == "ok")
            .all(|(k, _)| got.contains(k));
        let runs = exec_record(&exec_record_path);
        let exec_got: BTreeSet<(String, u64)> = received(s, "exec", "seq")
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        let has = |pid: u64, acked: u64| {
            let run = run_of_pid(&runs, pid);
            (1..=acked).all(|n| exec_got.contains(&(run.clone(), n)))
        };
        lib_ok && has(exec_pid_1, exec_acked_1) && has(exec_pid_2, exec_acked_2)
    };
    assert!(
        sim.wait_until(Duration::from_secs(90), complete).await,
        "messages lost\n--- agent log ---\n{}",
        agent.log_text()
    );
    // A last batch through the recovered session, then a clean stop.
    let (exec_pid_3, exec_acked_3) = exec_acknowledged(&agent);
    let target = library_record(&lib_record).len() + 20;
    assert!(
        sim.wait_until(WAIT, |_| library_record(&lib_record).len() >= target)
            .await
    );
    let status_after = status(&agent);
    assert_eq!(agent.stop(), Some(0));

    // The library plugin: every acknowledged message arrived, nothing arrived that it did not
    // publish, and the agent had no reason to refuse any.
    let record = library_record(&lib_record);
    let refused: Vec<_> = record.iter().filter(|(_, r)| *r != "ok").collect();
    assert!(
        refused.is_empty(),
        "publish failed for {} messages: {:?}",
        refused.len(),
        &refused[..refused.len().min(5)]
    );
    let lib_received = received(&sim, "library", "n");
    let lib_got: BTreeSet<&(String, u64)> = lib_received.iter().map(|(k, _)| k).collect();
    let lost: Vec<&(String, u64)> = record.keys().filter(|k| !lib_got.contains(k)).collect();
    assert!(
        lost.is_empty(),
        "{} library messages lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    // Each run publishes 1, 2, 3, ... one at a time: a gap would be a lost message whose record
    // line the kill prevented.
    let mut lib_runs: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for (run, n) in &lib_got {
        lib_runs.entry(run.as_str()).or_default().push(*n);
    }
    for (run, ns) in &lib_runs {
        let expected: Vec<u64> = (1..=*ns.last().unwrap()).collect();
        assert_eq!(ns, &expected, "library run {run} has a gap");
    }
    assert!(
        lib_runs.len() >= 3,
        "one library plugin process per agent process: {:?}",
        lib_runs.keys()
    );

    // The exec plugin: each run's messages arrive as 1..=M with no gap, M at most what it wrote
    // and at least what the agent had acknowledged when it was killed or stopped.
    let runs = exec_record(&exec_record_path);
    let exec_received = received(&sim, "exec", "seq");
    let mut exec_runs: BTreeMap<&str, BTreeSet<u64>> = BTreeMap::new();
    for ((run, seq), _) in &exec_received {
        exec_runs.entry(run.as_str()).or_default().insert(*seq);
    }
    let mut unacknowledged_tail = 0;
    for (pid, acked) in [
        (exec_pid_1, exec_acked_1),
        (exec_pid_2, exec_acked_2),
        (exec_pid_3, exec_acked_3),
    ] {
        let run = run_of_pid(&runs, pid);
        let got: Vec<u64> = exec_runs
            .get(run.as_str())
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        let expected: Vec<u64> = (1..=got.len() as u64).collect();
        assert_eq!(got, expected, "exec run {run} has a gap");
        assert!(
            got.len() as u64 >= acked,
            "exec run {run}: {acked} acknowledged, {} arrived",
            got.len()
        );
        assert!(
            got.len() as u64 <= runs[&run],
            "exec run {run}: more arrived than it wrote"
        );
        unacknowledged_tail += runs[&run] - got.len() as u64;
    }
    assert_eq!(
        exec_runs.len(),
        3,
        "one exec run per agent process: {:?}",
        exec_runs.keys()
    );

    // Duplicates are redeliveries of one message (same message id), never a second message.
    let mut ids_per_message: HashMap<&(String, u64), BTreeSet<&str>> = HashMap::new();
    for (k, mid) in lib_received.iter().chain(exec_received.iter()) {
        ids_per_message.entry(k).or_default().insert(mid.as_str());
    }
    let reissued: Vec<_> = ids_per_message
        .iter()
        .filter(|(_, m)| m.len() > 1)
        .collect();
    assert!(
        reissued.is_empty(),
        "messages sent under several ids: {reissued:?}"
    );
    let total = lib_received.len() + exec_received.len();
    let distinct = ids_per_message.len();
    let figures = json!({
        "scenario": "library + exec plugin, hub outage of 70 s with kill -9 during it, kill -9 while the backlog drains",
        "library_published": record.len(),
        "exec_runs_written": runs.values().sum::<u64>(),
        "records": total,
        "distinct_messages": distinct,
        "duplicates": total - distinct,
        "lost": 0,
        "exec_unacknowledged_tail_lines": unacknowledged_tail,
        "backlog_at_recovery": backlog,
        "queue_depth_at_second_kill": depth_at_second_kill,
        "queue_after": status_after["queue"],
    });
    println!("{}", serde_json::to_string_pretty(&figures).unwrap());
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/reliability");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("plugin-outage.json"),
        serde_json::to_vec_pretty(&figures).unwrap(),
    )
    .unwrap();
}
