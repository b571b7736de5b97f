//! Fault scenarios: the real `hubagent` binary publishing through hubsim while hubsim's fault
//! injection (and the test) breaks things. Each scenario asserts that nothing was lost (every
//! sequence number the sensor produced arrives; duplicates are allowed and counted: delivery is at
//! least once and message ids make them removable) and records its measured figures in
//! `target/reliability/<scenario>.json`, from which docs/reliability.md is refreshed.

use std::time::{Duration, Instant};

use hubagent_tests::*;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

struct Scenario {
    dir: tempfile::TempDir,
    running: hubsim::Running,
    config: std::path::PathBuf,
    id: String,
}

impl Scenario {
    async fn new(id: &str, extra_toml: &str) -> Scenario {
        let dir = tempfile::tempdir().unwrap();
        let running = start_sim(dir.path()).await;
        let key = enroll(&running.sim, id);
        let key_file = write_key(dir.path(), "device.key", &key);
        let config = agent_config(
            dir.path(),
            &running,
            id,
            &format!("key = {{ file = \"{}\" }}", key_file.display()),
        );
        let mut text = std::fs::read_to_string(&config).unwrap();
        text.push_str(extra_toml);
        text.push_str("\n[[plugin]]\nname = \"sensor\"\nkind = \"builtin\"\nbuiltin = \"simulated-sensor\"\ninterval = \"50ms\"\n");
        std::fs::write(&config, text).unwrap();
        Scenario {
            dir,
            running,
            config,
            id: id.to_string(),
        }
    }

    fn sim(&self) -> &hubsim::Sim {
        &self.running.sim
    }

    fn drop_connection(&self) -> bool {
        let conn = self
            .sim()
            .live
            .lock()
            .unwrap()
            .connections
            .get(&format!("localhost/{}", self.id))
            .cloned();
        conn.is_some_and(|c| {
            c.tx.send(hubsim::state::ConnCommand::Close {
                reason: "fault scenario".into(),
            })
            .is_ok()
        })
    }

    /// Checks every sensor run's sequence numbers for gaps; returns (messages produced, total
    /// records, distinct message ids).
    fn delivery(&self) -> (u64, usize, usize) {
        let records = self
            .sim()
            .records
            .lock()
            .unwrap()
            .telemetry
            .get(&self.id)
            .cloned()
            .unwrap_or_default();
        let mut ids: Vec<&str> = records
            .iter()
            .filter_map(|r| r.system_properties.get("message-id").map(String::as_str))
            .collect();
        let total = ids.len();
        ids.sort();
        ids.dedup();
        let mut runs: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
        for r in &records {
            let seq = r
                .body
                .as_deref()
                .and_then(|b| serde_json::from_str::<serde_json::Value>(b).ok())
                .and_then(|v| v["seq"].as_u64());
            if let (Some(run), Some(seq)) = (r.properties.get("run"), seq) {
                runs.entry(run.clone()).or_default().push(seq);
            }
        }
        assert!(!runs.is_empty(), "nothing arrived");
        let mut produced = 0;
        for (run, mut seqs) in runs {
            seqs.sort();
            seqs.dedup();
            assert_contiguous(&seqs, &format!("{} run {run}", self.id));
            produced += seqs.len() as u64;
        }
        (produced, total, ids.len())
    }

    fn record(&self, name: &str, figures: serde_json::Value) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/reliability");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join(format!("{name}.json")),
            serde_json::to_vec_pretty(&figures).unwrap(),
        )
        .unwrap();
        let _ = &self.dir;
    }
}

/// CPU seconds (user + system) a process has used, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, a)| a).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the ')'.
    (ticks(11) + ticks(12)) / 100.0
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn assert_contiguous(seqs: &[u64], what: &str) {
    assert!(!seqs.is_empty(), "{what}: nothing arrived");
    let expected: Vec<u64> = (1..=*seqs.last().unwrap()).collect();
    let missing: Vec<u64> = expected
        .iter()
        .filter(|s| seqs.binary_search(s).is_err())
        .copied()
        .collect();
    assert!(
        missing.is_empty(),
        "{what}: lost sequence numbers {missing:?}"
    );
}

/// Stops the agent and waits until everything it had acknowledged-as-queued is in hubsim.
async fn stop_and_settle(s: &Scenario, agent: AgentProcess) -> u64 {
    let status: serde_json::Value =
        serde_json::from_slice(&agent.cli(&["status", "--json"]).stdout).unwrap_or_default();
    let pushed = status["queue"]["pushed"].as_u64().unwrap_or(0);
    // Let the queue drain before stopping, so the count below covers every pushed message.
    let deadline = Instant::now() + WAIT;
    loop {
        let st: serde_json::Value =
            serde_json::from_slice(&agent.cli(&["status", "--json"]).stdout).unwrap_or_default();
        if st["queue_depth"].as_u64() == Some(0) || Instant::now() > deadline {
            break;
        }
        s.sim()
            .wait_until(Duration::from_millis(200), |_| false)
            .await;
    }
    assert_eq!(agent.stop(), Some(0));
    pushed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_connection_dropped_every_two_seconds() {
    let s = Scenario::new("fault-drops", "").await;
    let agent = AgentProcess::start(&s.config);
    assert!(
        s.sim()
            .wait_until(WAIT, |sim| telemetry_count(sim, "fault-drops") >= 10)
            .await,
        "{}",
        agent.log_text()
    );
    let mut drops = 0;
    for _ in 0..10 {
        if s.drop_connection() {
            drops += 1;
        }
        let connects = hub_connects(s.sim(), "fault-drops");
        assert!(
            s.sim()
                .wait_until(WAIT, |sim| hub_connects(sim, "fault-drops") > connects)
                .await,
            "{}",
            agent.log_text()
        );
        s.sim().wait_until(Duration::from_secs(2), |_| false).await;
    }
    let rss = rss_kib(agent.child.id());
    stop_and_settle(&s, agent).await;
    let (produced, total, distinct) = s.delivery();
    s.record("hub-connection-dropped", json!({
        "scenario": "hub connection dropped every 2 s, 10 times, 20 msg/s",
        "drops": drops, "produced": produced, "arrived_distinct": distinct, "duplicates": total - distinct,
        "lost": 0, "rss_kib": rss,
    }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_refuses_connections_for_a_while() {
    let s = Scenario::new("fault-outage", "").await;
    let agent = AgentProcess::start(&s.config);
    assert!(
        s.sim()
            .wait_until(WAIT, |sim| telemetry_count(sim, "fault-outage") >= 10)
            .await,
        "{}",
        agent.log_text()
    );
    let pid = agent.child.id();
    s.sim().faults.lock().unwrap().refuse_connections_until =
        Some(std::time::Instant::now() + Duration::from_secs(3600));
    s.drop_connection();
    // Offline for 8 s: measure CPU to catch busy loops (a spinning reconnect burns a whole core).
    s.sim().wait_until(Duration::from_secs(1), |_| false).await;
    let cpu_before = cpu_seconds(pid);
    let t = Instant::now();
    s.sim().wait_until(Duration::from_secs(8), |_| false).await;
    let cpu_share = (cpu_seconds(pid) - cpu_before) / t.elapsed().as_secs_f64();
    assert!(
        cpu_share < 0.5,
        "busy loop while offline: {:.0}% CPU",
        cpu_share * 100.0
    );
    let before = telemetry_count(s.sim(), "fault-outage");
    s.sim().faults.lock().unwrap().refuse_connections_until = None;
    let recovered_at = Instant::now();
    assert!(
        s.sim()
            .wait_until(WAIT, |sim| telemetry_count(sim, "fault-outage") > before)
            .await,
        "{}",
        agent.log_text()
    );
    let recovery = recovered_at.elapsed();
    stop_and_settle(&s, agent).await;
    let (produced, total, distinct) = s.delivery();
    s.record("hub-outage", json!({
        "scenario": "hub refuses connections for 9 s, 20 msg/s",
        "produced": produced, "arrived_distinct": distinct, "duplicates": total - distinct, "lost": 0,
        "recovery_seconds": recovery.as_secs_f64(), "cpu_offline_percent": cpu_share * 100.0,
    }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dps_throttles_with_429() {
    let s = Scenario::new("fault-throttle", "").await;
    s.sim().faults.lock().unwrap().dps_throttle = Some((3, 1));
    let started = Instant::now();
    let agent = AgentProcess::start(&s.config);
    assert!(
        s.sim()
            .wait_until(WAIT, |sim| telemetry_count(sim, "fault-throttle") >= 5)
            .await,
        "{}",
        agent.log_text()
    );
    let provisioned_after = started.elapsed();
    let outcomes: Vec<String> = s
        .sim()
        .records
        .lock()
        .unwrap()
        .registrations
        .iter()
        .map(|r| r.outcome.clone())
        .collect();
    assert_eq!(
        outcomes,
        ["throttled", "throttled", "throttled", "assigned"]
    );
    stop_and_settle(&s, agent).await;
    let (produced, total, distinct) = s.delivery();
    s.record("dps-throttling", json!({
        "scenario": "DPS answers 429 (retry-after 1 s) three times",
        "throttled_answers": 3, "provisioned_seconds": provisioned_after.as_secs_f64(),
        "produced": produced, "arrived_distinct": distinct, "duplicates": total - distinct, "lost": 0,
    }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_of_a_few_seconds() {
    // The agent signs 4 s tokens and renews 2 s before expiry; hubsim also caps tokens at 3 s.
    let s = Scenario::new("fault-tokens", "").await;
    let text = std::fs::read_to_string(&s.config).unwrap().replace(
        "[hub]\n",
        "[hub]\nsas_ttl = \"4s\"\nrenew_before = \"2s\"\n",
    );
    std::fs::write(&s.config, text).unwrap();
    s.sim().faults.lock().unwrap().token_lifetime_cap = Some(Duration::from_secs(3));
    let agent = AgentProcess::start(&s.config);
    assert!(
        s.sim()
            .wait_until(WAIT, |sim| hub_connects(sim, "fault-tokens") >= 6)
            .await,
        "{}",
        agent.log_text()
    );
    let connects = hub_connects(s.sim(), "fault-tokens");
    stop_and_settle(&s, agent).await;
    let (produced, total, distinct) = s.delivery();
    s.record(
        "short-tokens",
        json!({
            "scenario": "4 s SAS tokens (renewed 2 s early), hub caps tokens at 3 s",
            "connections": connects, "produced": produced, "arrived_distinct": distinct,
            "duplicates": total - distinct, "lost": 0,
        }),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_points() {
    let s = Scenario::new("fault-kill", "").await;
    let mut kills = 0;
    for _ in 0..3 {
        let agent = AgentProcess::start(&s.config);
        let target = telemetry_count(s.sim(), "fault-kill") + 10 + (rand_ms() % 40) as usize;
        assert!(
            s.sim()
                .wait_until(WAIT, |sim| telemetry_count(sim, "fault-kill") >= target)
                .await,
            "{}",
            agent.log_text()
        );
        // Somewhere in the next 300 ms, mid-publish.
        s.sim()
            .wait_until(Duration::from_millis(rand_ms() % 300), |_| false)
            .await;
        let mut agent = agent;
        agent.child.kill().unwrap();
        agent.child.wait().unwrap();
        kills += 1;
    }
    // A last run drains what the killed ones left queued.
    let agent = AgentProcess::start(&s.config);
    let before = telemetry_count(s.sim(), "fault-kill");
    assert!(
        s.sim()
            .wait_until(WAIT, |sim| telemetry_count(sim, "fault-kill") > before + 5)
            .await
    );
    stop_and_settle(&s, agent).await;
    // Each process numbers its readings from 1 under its own run id: a gap in any run is a loss.
    let (produced, total, distinct) = s.delivery();
    s.record("kill-9", json!({
        "scenario": "kill -9 at random points while publishing, 3 times, then restart",
        "kills": kills, "produced": produced, "arrived_distinct": distinct, "duplicates": total - distinct, "lost": 0,
    }));
}

fn rand_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64
        / 1000
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hubsim_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = hubsim::Options::ephemeral(dir.path().join("hubsim"));
    let running = hubsim::start(options.clone()).await.unwrap();
    options.mqtt_port = running.mqtt_addr.port();
    options.https_port = running.https_addr.port();
    let key = enroll(&running.sim, "fault-restart");
    let key_file = write_key(dir.path(), "device.key", &key);
    let config = agent_config(
        dir.path(),
        &running,
        "fault-restart",
        &format!("key = {{ file = \"{}\" }}", key_file.display()),
    );
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("\n[[plugin]]\nname = \"sensor\"\nkind = \"builtin\"\nbuiltin = \"simulated-sensor\"\ninterval = \"50ms\"\n");
    std::fs::write(&config, text).unwrap();
    let agent = AgentProcess::start(&config);
    assert!(
        running
            .sim
            .wait_until(WAIT, |sim| telemetry_count(sim, "fault-restart") >= 10)
            .await,
        "{}",
        agent.log_text()
    );
    let mut seen: Vec<u64> = Vec::new();
    let collect = |sim: &hubsim::Sim, seen: &mut Vec<u64>| {
        if let Some(records) = sim.records.lock().unwrap().telemetry.get("fault-restart") {
            seen.extend(records.iter().filter_map(|r| {
                serde_json::from_str::<serde_json::Value>(r.body.as_deref()?).ok()?["seq"].as_u64()
            }));
        }
    };
    // Take the device off first so that nothing is acknowledged by the old instance after we
    // read its records (they live in its memory and go with it).
    running.sim.faults.lock().unwrap().refuse_connections_until =
        Some(std::time::Instant::now() + Duration::from_secs(3600));
    let conn = running
        .sim
        .live
        .lock()
        .unwrap()
        .connections
        .get("localhost/fault-restart")
        .cloned();
    if let Some(conn) = conn {
        let _ = conn.tx.send(hubsim::state::ConnCommand::Close {
            reason: "going down".into(),
        });
    }
    assert!(
        running
            .sim
            .wait_until(WAIT, |sim| !sim
                .live
                .lock()
                .unwrap()
                .connections
                .contains_key("localhost/fault-restart"))
            .await
    );
    collect(&running.sim, &mut seen);
    // Stop hubsim entirely (its records go with it), wait 2 s, start it again on the same ports.
    running.shutdown();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let running = hubsim::start(options).await.unwrap();
    let restarted = Instant::now();
    assert!(
        running
            .sim
            .wait_until(WAIT, |sim| telemetry_count(sim, "fault-restart") >= 10)
            .await,
        "{}",
        agent.log_text()
    );
    let recovery = restarted.elapsed();
    let deadline = Instant::now() + WAIT;
    loop {
        let st: serde_json::Value =
            serde_json::from_slice(&agent.cli(&["status", "--json"]).stdout).unwrap_or_default();
        if st["queue_depth"].as_u64() == Some(0) || Instant::now() > deadline {
            break;
        }
        running
            .sim
            .wait_until(Duration::from_millis(200), |_| false)
            .await;
    }
    assert_eq!(agent.stop(), Some(0));
    collect(&running.sim, &mut seen);
    seen.sort();
    seen.dedup();
    assert_contiguous(&seen, "hubsim restart");
    assert_eq!(
        registrations(&running.sim, "fault-restart"),
        0,
        "the cached assignment still holds after a hub restart"
    );
    let dir2 = dir;
    let _ = dir2;
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/reliability");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("hubsim-restart.json"),
        serde_json::to_vec_pretty(&json!({
            "scenario": "hubsim stopped for 2 s and restarted (state from disk)",
            "produced": seen.last(), "lost": 0, "recovery_seconds": recovery.as_secs_f64(),
        }))
        .unwrap(),
    )
    .unwrap();
}

/// Starts the agent with its state directory on a tmpfs of `size` in a private mount namespace
/// (`unshare -rm`: a user namespace maps the caller to root there, so no real root is needed).
/// The test reaches that filesystem through `/proc/<agent pid>/root`: it owns the agent's user
/// namespace, so this works without root although the agent makes itself non-dumpable.
fn start_with_small_state_fs(s: &Scenario, size: &str) -> AgentProcess {
    let state = s.dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let mut command = std::process::Command::new("unshare");
    command
        .args(["-rm", "sh", "-c"])
        .arg(r#"mount -t tmpfs -o "size=$1,mode=0700" hubagent-state "$2" && exec "$3" --config "$4" run"#)
        .arg("sh")
        .arg(size)
        .arg(&state)
        .arg(hubagent_bin())
        .arg(&s.config);
    spawn_agent(
        s,
        command,
        "unshare (util-linux) runs the agent in its own mount namespace",
    )
}

/// Spawns `command` (which runs `hubagent run` in the end) like `AgentProcess::start` does.
fn spawn_agent(s: &Scenario, mut command: std::process::Command, what: &str) -> AgentProcess {
    let log = s.dir.path().join(format!("agent.log.{}", rand_ms()));
    let file = std::fs::File::create(&log).unwrap();
    let child = command
        .env("RUST_LOG", "hubagent=debug,info")
        .env_remove("NOTIFY_SOCKET")
        .stdout(std::process::Stdio::null())
        .stderr(file)
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    AgentProcess {
        child,
        log,
        config: s.config.clone(),
    }
}

/// Another process filling the disk: a thread that keeps writing to `path`, taking every block
/// that becomes free (the agent's own small state rewrites free and take blocks all the time), until
/// stopped. `stop` returns the bytes written.
struct Filler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl Filler {
    fn start(path: std::path::PathBuf) -> Filler {
        use std::io::Write;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut file =
                std::fs::File::create(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let chunk = vec![0x5a_u8; 4096];
            let mut written = 0;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                match file.write(&chunk) {
                    Ok(n) => written += n as u64,
                    Err(e) if e.raw_os_error() == Some(28) => {
                        // Full: look again shortly for blocks the agent freed.
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => panic!("{}: {e}", path.display()),
                }
            }
            written
        });
        Filler { stop, thread }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

fn status_json(agent: &AgentProcess) -> serde_json::Value {
    serde_json::from_slice(&agent.cli(&["status", "--json"]).stdout).unwrap_or_default()
}

/// Highest sensor sequence number hubsim has received from `device`.
fn max_seq(sim: &hubsim::Sim, device: &str) -> u64 {
    sim.records
        .lock()
        .unwrap()
        .telemetry
        .get(device)
        .map(|records| {
            records
                .iter()
                .filter_map(|r| {
                    serde_json::from_str::<serde_json::Value>(r.body.as_deref()?).ok()?["seq"]
                        .as_u64()
                })
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_on_the_state_dir() {
    let s = Scenario::new("fault-diskfull", "").await;
    let mut agent = start_with_small_state_fs(&s, "1m");
    assert!(
        s.sim()
            .wait_until(WAIT, |sim| telemetry_count(sim, "fault-diskfull") >= 10)
            .await,
        "{}",
        agent.log_text()
    );
    let pid = agent.child.id();
    let filler = std::path::PathBuf::from(format!("/proc/{pid}/root"))
        .join(s.dir.path().strip_prefix("/").unwrap())
        .join("state/filler");
    let filling = Filler::start(filler.clone());
    // The source is held back and says why.
    let deadline = Instant::now() + WAIT;
    while !agent.log_text().contains("the disk is full") {
        assert!(
            Instant::now() < deadline,
            "no disk-full message in the log:\n{}",
            agent.log_text()
        );
        s.sim()
            .wait_until(Duration::from_millis(100), |_| false)
            .await;
    }
    // Stay full for a few seconds: the agent keeps running and sends everything it had queued.
    let full_since = Instant::now();
    loop {
        let st = status_json(&agent);
        if st["queue"]["depth"].as_u64() == Some(0) && full_since.elapsed() > Duration::from_secs(4)
        {
            break;
        }
        assert!(
            full_since.elapsed() < WAIT,
            "the queue did not drain while the disk was full: {st}\n{}",
            agent.log_text()
        );
        s.sim()
            .wait_until(Duration::from_millis(200), |_| false)
            .await;
    }
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "the agent exited on a full disk:\n{}",
        agent.log_text()
    );
    let full = status_json(&agent);
    assert_eq!(full["queue"]["dropped_full"], 0, "{full}");
    assert!(
        full["queue"]["held_back"].as_u64().unwrap_or(0) > 0,
        "held-back messages are counted: {full}"
    );
    let seq_while_full = max_seq(s.sim(), "fault-diskfull");
    let filled = filling.stop();
    std::fs::remove_file(&filler).unwrap();
    let freed = Instant::now();
    assert!(
        s.sim()
            .wait_until(WAIT, |sim| max_seq(sim, "fault-diskfull")
                > seq_while_full + 5)
            .await,
        "nothing new after the disk was freed:\n{}",
        agent.log_text()
    );
    let recovery = freed.elapsed();
    stop_and_settle(&s, agent).await;
    let (produced, total, distinct) = s.delivery();
    s.record("disk-full", json!({
        "scenario": "state dir on a 1 MiB tmpfs filled for 4 s, 20 msg/s",
        "filler_kib": filled / 1024, "held_back": full["queue"]["held_back"],
        "recovery_seconds": recovery.as_secs_f64(),
        "produced": produced, "arrived_distinct": distinct, "duplicates": total - distinct, "lost": 0,
    }));
}

/// libfaketime from Debian's `libfaketime` package (tests/setup.sh installs it).
fn libfaketime() -> std::path::PathBuf {
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

/// Sets the agent's wall-clock offset ("+3h", "-2h", "+0"); libfaketime rereads it on every
/// clock call. Written atomically so the agent never reads half a file.
fn set_clock_offset(file: &std::path::Path, offset: &str) {
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, format!("{offset}\n")).unwrap();
    std::fs::rename(&tmp, file).unwrap();
}

/// Waits until the agent queued `n` more messages than now (so it has read the clock since).
async fn wait_pushed(s: &Scenario, agent: &AgentProcess, n: u64) {
    let pushed = |st: &serde_json::Value| st["queue"]["pushed"].as_u64().unwrap_or(0);
    let start = pushed(&status_json(agent));
    let deadline = Instant::now() + WAIT;
    while pushed(&status_json(agent)) < start + n {
        assert!(Instant::now() < deadline, "{}", agent.log_text());
        s.sim()
            .wait_until(Duration::from_millis(100), |_| false)
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wall_clock_jumps_forward_and_back() {
    // 6 s tokens renewed every 3 s, and a max_age shorter than the jump: a queue that aged its
    // messages by the wall clock would drop everything queued before the jump.
    let s = Scenario::new("fault-clock", "\n[queue]\nmax_age = \"1h\"\n").await;
    let text = std::fs::read_to_string(&s.config).unwrap().replace(
        "[hub]\n",
        "[hub]\nsas_ttl = \"6s\"\nrenew_before = \"3s\"\n",
    );
    std::fs::write(&s.config, text).unwrap();
    let clock = s.dir.path().join("faketime");
    set_clock_offset(&clock, "+0");
    let mut command = std::process::Command::new(hubagent_bin());
    command
        .args(["--config", s.config.to_str().unwrap(), "run"])
        .env("LD_PRELOAD", libfaketime())
        .env("FAKETIME_TIMESTAMP_FILE", &clock)
        .env("FAKETIME_NO_CACHE", "1")
        // A clock step moves the wall clock only; CLOCK_MONOTONIC goes on as before.
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
    let agent = spawn_agent(&s, command, "hubagent under libfaketime");
    let id = "fault-clock";
    assert!(
        s.sim()
            .wait_until(WAIT, |sim| telemetry_count(sim, id) >= 10)
            .await,
        "{}",
        agent.log_text()
    );
    // Offline at the real time: 20+ messages wait in the queue.
    s.sim().faults.lock().unwrap().refuse_connections_until =
        Some(std::time::Instant::now() + Duration::from_secs(3600));
    s.drop_connection();
    wait_pushed(&s, &agent, 20).await;
    // The clock steps 3 h forward while they wait; the agent reads it at its next message.
    set_clock_offset(&clock, "+3h");
    wait_pushed(&s, &agent, 5).await;
    s.sim().faults.lock().unwrap().refuse_connections_until = None;
    let back_online = Instant::now();
    let connects = hub_connects(s.sim(), id);
    assert!(
        s.sim()
            .wait_until(WAIT, |sim| hub_connects(sim, id) > connects)
            .await,
        "{}",
        agent.log_text()
    );
    let recovery = back_online.elapsed();
    // Renewals with the clock 3 h ahead (tokens expire 3 h late: the hub accepts them).
    let ahead = hub_connects(s.sim(), id);
    assert!(
        s.sim()
            .wait_until(WAIT, |sim| hub_connects(sim, id) >= ahead + 3)
            .await,
        "no token renewal with the clock 3 h ahead:\n{}",
        agent.log_text()
    );
    // And 3 h back again, to the true time: renewal goes on at the same pace.
    set_clock_offset(&clock, "+0");
    let back = hub_connects(s.sim(), id);
    assert!(
        s.sim()
            .wait_until(WAIT, |sim| hub_connects(sim, id) >= back + 3)
            .await,
        "no token renewal after the clock stepped back 3 h:\n{}",
        agent.log_text()
    );
    let st = status_json(&agent);
    assert_eq!(st["queue"]["dropped_expired"], 0, "{st}");
    let connections = hub_connects(s.sim(), id);
    stop_and_settle(&s, agent).await;
    let (produced, total, distinct) = s.delivery();
    s.record("clock-jump", json!({
        "scenario": "wall clock 3 h ahead during a hub outage, then 3 h back; 6 s SAS tokens, max_age 1 h",
        "connections": connections, "recovery_seconds": recovery.as_secs_f64(),
        "produced": produced, "arrived_distinct": distinct, "duplicates": total - distinct, "lost": 0,
    }));
}

/// RSS samples of a process: the value once warmed up and the highest after that.
struct RssWatch {
    pid: u32,
    warm: Option<u64>,
    peak_after_warm: u64,
    samples: usize,
}

impl RssWatch {
    fn new(pid: u32) -> Self {
        RssWatch {
            pid,
            warm: None,
            peak_after_warm: 0,
            samples: 0,
        }
    }

    /// The first call fixes the warmed-up value; later ones track the peak.
    fn sample(&mut self) {
        let rss = rss_kib(self.pid);
        self.samples += 1;
        match self.warm {
            None => self.warm = Some(rss),
            Some(_) => self.peak_after_warm = self.peak_after_warm.max(rss),
        }
    }

    /// A leak check, not a speed or size target: after warm-up the agent may grow by at most
    /// 16 MiB (buffers, the queue index of a minute offline) over a run of minutes.
    fn assert_flat(&self, what: &str) {
        let warm = self.warm.expect("sampled");
        assert!(
            self.peak_after_warm <= warm + 16 * 1024,
            "{what}: RSS grew from {warm} KiB to {} KiB",
            self.peak_after_warm
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_connection_dropped_every_few_seconds_for_two_minutes() {
    let id = "fault-drops-long";
    let s = Scenario::new(id, "").await;
    let agent = AgentProcess::start(&s.config);
    assert!(
        s.sim()
            .wait_until(WAIT, |sim| telemetry_count(sim, id) >= 10)
            .await,
        "{}",
        agent.log_text()
    );
    let mut rss = RssWatch::new(agent.child.id());
    // Warm-up: a few drops before the RSS baseline is taken.
    let started = Instant::now();
    let mut drops = 0;
    while started.elapsed() < Duration::from_secs(120) {
        if s.drop_connection() {
            drops += 1;
        }
        let connects = hub_connects(s.sim(), id);
        assert!(
            s.sim()
                .wait_until(WAIT, |sim| hub_connects(sim, id) > connects)
                .await,
            "{}",
            agent.log_text()
        );
        s.sim().wait_until(Duration::from_secs(3), |_| false).await;
        if drops >= 3 {
            rss.sample();
        }
    }
    rss.assert_flat("drops every 3 s for 2 min");
    stop_and_settle(&s, agent).await;
    let (produced, total, distinct) = s.delivery();
    s.record("hub-connection-dropped-long", json!({
        "scenario": "hub connection dropped every 3 s for 2 min, 20 msg/s",
        "drops": drops, "rss_warm_kib": rss.warm, "rss_peak_kib": rss.peak_after_warm,
        "produced": produced, "arrived_distinct": distinct, "duplicates": total - distinct, "lost": 0,
    }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_refuses_connections_for_a_minute() {
    let id = "fault-outage-long";
    let s = Scenario::new(id, "").await;
    let agent = AgentProcess::start(&s.config);
    assert!(
        s.sim()
            .wait_until(WAIT, |sim| telemetry_count(sim, id) >= 10)
            .await,
        "{}",
        agent.log_text()
    );
    let pid = agent.child.id();
    let mut rss = RssWatch::new(pid);
    rss.sample();
    s.sim().faults.lock().unwrap().refuse_connections_until =
        Some(std::time::Instant::now() + Duration::from_secs(3600));
    s.drop_connection();
    s.sim().wait_until(Duration::from_secs(1), |_| false).await;
    let cpu_before = cpu_seconds(pid);
    let offline = Instant::now();
    while offline.elapsed() < Duration::from_secs(60) {
        s.sim().wait_until(Duration::from_secs(2), |_| false).await;
        rss.sample();
    }
    // A spinning reconnect or a hot retry loop burns a whole core; backoff keeps it near zero.
    let cpu_share = (cpu_seconds(pid) - cpu_before) / offline.elapsed().as_secs_f64();
    assert!(
        cpu_share < 0.2,
        "busy loop while offline: {:.1}% CPU",
        cpu_share * 100.0
    );
    let queued = status_json(&agent)["queue"]["depth"].as_u64().unwrap_or(0);
    assert!(queued >= 600, "a minute of readings is queued: {queued}");
    let before = max_seq(s.sim(), id);
    let connects = hub_connects(s.sim(), id);
    s.sim().faults.lock().unwrap().refuse_connections_until = None;
    let back = Instant::now();
    // The reconnect waits out the current backoff step (capped exponential with jitter).
    assert!(
        s.sim()
            .wait_until(WAIT, |sim| hub_connects(sim, id) > connects)
            .await,
        "no reconnect after the outage:\n{}",
        agent.log_text()
    );
    let recovery = back.elapsed();
    assert!(
        s.sim()
            .wait_until(WAIT * 2, |sim| max_seq(sim, id) > before + queued)
            .await,
        "the backlog did not arrive:\n{}",
        agent.log_text()
    );
    let drained = back.elapsed() - recovery;
    rss.sample();
    rss.assert_flat("a minute offline");
    stop_and_settle(&s, agent).await;
    let (produced, total, distinct) = s.delivery();
    s.record("hub-outage-long", json!({
        "scenario": "hub refuses connections for 60 s, 20 msg/s",
        "cpu_offline_percent": cpu_share * 100.0, "queued_offline": queued,
        "recovery_seconds": recovery.as_secs_f64(), "backlog_sent_seconds": drained.as_secs_f64(),
        "rss_warm_kib": rss.warm, "rss_peak_kib": rss.peak_after_warm,
        "produced": produced, "arrived_distinct": distinct, "duplicates": total - distinct, "lost": 0,
    }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_behind_at_boot_then_corrected() {
    let id = "fault-clock-behind";
    let s = Scenario::new(id, "").await;
    let clock = s.dir.path().join("faketime");
    // Two hours behind with one-hour tokens (the default): every token the agent signs has
    // expired before it is sent, so DPS refuses it.
    set_clock_offset(&clock, "-2h");
    let mut command = std::process::Command::new(hubagent_bin());
    command
        .args(["--config", s.config.to_str().unwrap(), "run"])
        .env("LD_PRELOAD", libfaketime())
        .env("FAKETIME_TIMESTAMP_FILE", &clock)
        .env("FAKETIME_NO_CACHE", "1")
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
    let agent = spawn_agent(&s, command, "hubagent under libfaketime");
    let deadline = Instant::now() + WAIT;
    while !agent.log_text().contains("device clock is right") {
        assert!(
            Instant::now() < deadline,
            "the refusal does not point at the clock:\n{}",
            agent.log_text()
        );
        s.sim()
            .wait_until(Duration::from_millis(200), |_| false)
            .await;
    }
    // Readings pile up in the queue meanwhile; then NTP corrects the clock.
    wait_pushed(&s, &agent, 20).await;
    set_clock_offset(&clock, "+0");
    let corrected = Instant::now();
    assert!(
        s.sim()
            .wait_until(WAIT, |sim| telemetry_count(sim, id) >= 20)
            .await,
        "{}",
        agent.log_text()
    );
    let recovery = corrected.elapsed();
    // The retry wait (60 s after a refused registration) ends when the clock steps.
    assert!(
        agent
            .log_text()
            .contains("the wall clock stepped; retrying now"),
        "{}",
        agent.log_text()
    );
    stop_and_settle(&s, agent).await;
    let (produced, total, distinct) = s.delivery();
    s.record("clock-behind", json!({
        "scenario": "clock 2 h behind at boot (1 h tokens refused by DPS), then corrected",
        "recovery_seconds": recovery.as_secs_f64(),
        "produced": produced, "arrived_distinct": distinct, "duplicates": total - distinct, "lost": 0,
    }));
}
