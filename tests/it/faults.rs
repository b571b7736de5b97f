//! Fault scenarios: the real `hubagent` binary publishing through hubsim while hubsim's fault
//! injection (and the test) breaks things. Each scenario asserts that nothing was lost, counted
//! from the producer's side: before every kill -9 and every stop it reads how many readings the
//! agent acknowledged to its built-in sensor (`published` in `hubagent plugins list`, per sensor
//! run), and every number from 1 to that count must arrive (duplicates are allowed and counted:
//! delivery is at least once and message ids make them removable). Each records its measured
//! figures in `target/reliability/<scenario>.json`, from which docs/reliability.md is refreshed.
//! `the_loss_check_sees_a_lost_tail` proves the check: an agent that drops the last readings of
//! its run (the test-only switch of feature `fault-injection`) fails it.

use std::time::{Duration, Instant};

use hubagent_tests::*;
use serde_json::json;

/// The built-in sensor's plugin name, and its messages' `source`.
const SENSOR: &str = "sensor";

/// A hubsim and the configuration of an enrolled agent whose built-in sensor publishes 20
/// messages a second (plus `extra` TOML tables), and what the agent acknowledged to the sensor.
struct Scenario {
    dir: tempfile::TempDir,
    running: hubsim::Running,
    config: std::path::PathBuf,
    id: String,
    /// The sensor's acknowledged count per run, read before each kill and stop.
    acked: Acknowledged,
    /// The environment of the agents [`Scenario::start`] starts (the test-only switch).
    env: Vec<(String, String)>,
    /// The network namespace the agents run in, if any.
    netns: Option<hubagent_tests::netns::Netns>,
}

impl Scenario {
    async fn new(id: &str, extra_toml: &str) -> Scenario {
        let dir = tempfile::tempdir().unwrap();
        let running = start_sim(dir.path()).await;
        Scenario::with(dir, running, id, extra_toml)
    }

    fn with(
        dir: tempfile::TempDir,
        running: hubsim::Running,
        id: &str,
        extra_toml: &str,
    ) -> Scenario {
        let agent = enrolled_agent(dir.path(), &running, id).0;
        Scenario::with_config(dir, running, id, agent.extra(extra_toml))
    }

    /// A scenario on an agent configuration the test has shaped (its `[hub]` port, say).
    fn with_config(
        dir: tempfile::TempDir,
        running: hubsim::Running,
        id: &str,
        agent: AgentConfig,
    ) -> Scenario {
        let config = agent.extra(&builtin_sensor("50ms")).write();
        Scenario {
            dir,
            running,
            config,
            id: id.to_string(),
            acked: Acknowledged::new(),
            env: Vec::new(),
            netns: None,
        }
    }

    fn sim(&self) -> &hubsim::Sim {
        &self.running.sim
    }

    /// Starts `hubagent run` on the scenario's configuration, with its environment.
    fn start(&self) -> AgentProcess {
        let mut command = match &self.netns {
            Some(netns) => netns.command(&hubagent_bin()),
            None => std::process::Command::new(hubagent_bin()),
        };
        command.args(["--config", self.config.to_str().unwrap(), "run"]);
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
        AgentProcess::spawn(command, &self.config, "hubagent")
    }

    fn drop_connection(&self) -> bool {
        drop_connection(self.sim(), &self.id)
    }

    /// Drops the hub connection, then waits for the agent's next connection and 5 messages
    /// over it. The new connection first: messages the dropped one carried may still be counted
    /// after the drop, and a next round needs a live connection to drop.
    async fn drop_and_recover(&self, agent: &AgentProcess, round: usize) {
        let connects = hub_connects(self.sim(), &self.id);
        assert!(self.drop_connection(), "round {round}: no live connection");
        assert!(
            self.sim()
                .wait_until(LONG_WAIT, |sim| hub_connects(sim, &self.id) > connects)
                .await,
            "round {round}: no reconnection: {}",
            agent.log_text()
        );
        let before = telemetry_count(self.sim(), &self.id);
        self.wait_telemetry(agent, before + 5).await;
    }

    /// Waits until hubsim has recorded `n` messages of the device.
    async fn wait_telemetry(&self, agent: &AgentProcess, n: usize) {
        assert!(
            self.sim()
                .wait_until(LONG_WAIT, |sim| telemetry_count(sim, &self.id) >= n)
                .await,
            "{}",
            agent.log_text()
        );
    }

    /// Every sensor reading hubsim recorded, redeliveries included.
    fn messages(&self) -> Vec<Numbered> {
        numbered(self.sim(), &self.id, Some(SENSOR), "seq")
    }

    /// Notes what the agent acknowledged to its sensor so far, then kills it with SIGKILL.
    async fn kill_9(&mut self, agent: AgentProcess) {
        self.acked.note_sensor(&agent, SENSOR).await;
        agent.kill_9();
    }

    /// The loss check: notes what the agent acknowledged to its sensor, waits until all of it
    /// (and everything acknowledged before each earlier kill) arrived, stops the agent and counts
    /// the delivery. The `Err` says what did not arrive, when the drain timed out or the agent's
    /// queue emptied without it.
    async fn check(&mut self, agent: AgentProcess) -> (Delivery, Result<(), String>) {
        self.acked.note_sensor(&agent, SENSOR).await;
        let drained = drain(&agent, &self.acked, || self.messages(), LONG_WAIT).await;
        let log = agent.log_text();
        assert_eq!(agent.stop(), Some(0), "{log}");
        (Delivery::of(&self.acked, &self.messages()), drained)
    }

    /// [`Scenario::check`], then records `figures` with the delivery figures in
    /// `target/reliability/<name>.json` (a failed check's too) and fails on any loss.
    async fn finish(&mut self, agent: AgentProcess, name: &str, mut figures: serde_json::Value) {
        let (delivery, drained) = self.check(agent).await;
        let f = figures.as_object_mut().unwrap();
        f.extend(delivery.figures().as_object().unwrap().clone());
        record_reliability(name, &figures);
        if let Err(e) = drained {
            panic!("{}: {e}", self.id);
        }
        delivery.assert_nothing_lost(&self.id);
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

/// The scenario of `hub_connection_dropped_every_two_seconds`, up to its check: the running
/// agent and the scenario's figures.
async fn drop_connection_every_two_seconds(s: &Scenario) -> (AgentProcess, serde_json::Value) {
    let agent = s.start();
    s.wait_telemetry(&agent, 10).await;
    let mut drops = 0;
    for _ in 0..10 {
        if s.drop_connection() {
            drops += 1;
        }
        let connects = hub_connects(s.sim(), &s.id);
        assert!(
            s.sim()
                .wait_until(LONG_WAIT, |sim| hub_connects(sim, &s.id) > connects)
                .await,
            "{}",
            agent.log_text()
        );
        s.sim().wait_until(Duration::from_secs(2), |_| false).await;
    }
    let rss = rss_kib(agent.child.id());
    let figures = json!({
        "scenario": "hub connection dropped every 2 s, 10 times, 20 msg/s",
        "drops": drops,
        "rss_kib": rss,
    });
    (agent, figures)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_connection_dropped_every_two_seconds() {
    let mut s = Scenario::new("fault-drops", "").await;
    let (agent, figures) = drop_connection_every_two_seconds(&s).await;
    s.finish(agent, "hub-connection-dropped", figures).await;
}

/// The loss check itself: with the test-only switch on, the agent acknowledges every reading
/// of its sensor after the `KEPT`-th but does not queue it, so the run's last readings never
/// arrive while everything that does arrive is gap-free (what a check against the highest
/// number that arrived accepts). The same scenario's check must report exactly those as lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loss_check_sees_a_lost_tail() {
    const KEPT: u64 = 300;
    let mut s = Scenario::new("fault-drops-lossy", "").await;
    s.env.push((
        "HUBAGENT_TEST_DROP_AFTER".into(),
        format!("{SENSOR}:{KEPT}"),
    ));
    let (agent, _) = drop_connection_every_two_seconds(&s).await;
    // The switch is there (a binary built without feature `fault-injection` ignores it).
    assert!(
        agent
            .log_text()
            .contains("fault injection (HUBAGENT_TEST_DROP_AFTER)"),
        "the switch is off: build the workspace (hubagent-tests enables hubagent's feature \
         fault-injection)\n{}",
        agent.log_text()
    );
    // Past the switch: some acknowledged readings were not queued.
    agent
        .wait_plugins("readings past the switch", |p| {
            p[SENSOR]["published"].as_u64().unwrap_or(0) > KEPT
        })
        .await;
    let started = Instant::now();
    let (delivery, drained) = s.check(agent).await;
    let reported = drained.expect_err("the loss check passed an agent that lost readings");
    let (run, acked) = s
        .acked
        .runs()
        .iter()
        .next()
        .map(|(r, c)| (r.clone(), *c))
        .unwrap();
    let expected: Vec<(String, u64)> = (KEPT + 1..=acked).map(|n| (run.clone(), n)).collect();
    assert_eq!(delivery.lost, expected, "{reported}");
    assert!(
        reported.contains(&describe(&expected)),
        "the failure names what is missing: {reported}"
    );
    assert_eq!(delivery.produced, acked);
    assert_eq!(delivery.arrived, KEPT);
    assert_eq!(delivery.figures()["lost"], acked - KEPT);
    // What the check replaced: no gap below the highest number that arrived.
    let arrived = &runs(&s.messages())[&run];
    assert_eq!(gaps(arrived), Vec::<u64>::new());
    assert_eq!(arrived.last(), Some(&KEPT));
    println!(
        "the check failed as it should, {:.1} s after the reading: {reported}",
        started.elapsed().as_secs_f64()
    );
}

/// What a hub refusing connections (CONNACK 3) cost the agent, measured by
/// [`hub_refuses_connections`].
struct Refusals {
    /// From hubsim accepting again to the first message it received after that.
    recovery: Duration,
    /// The reconnect pauses the agent announced during the outage, the first after the drop.
    pauses: Vec<u64>,
    /// The hub connections hubsim refused during the outage.
    refused: usize,
    /// The agent's CPU over the outage, from its second second, as a share of a core.
    cpu_share: f64,
}

/// The hub connections of `client_id` hubsim refused (CONNACK 3), DPS's left out.
fn hub_refusals(sim: &hubsim::Sim, client_id: &str) -> usize {
    connection_events(sim, client_id)
        .iter()
        .filter(|e| e.service == "hub" && e.event == "refused")
        .count()
}

/// hubsim refuses the agent's hub connections (CONNACK 3, "server unavailable") for `outage`,
/// its live connection dropped at the start, then accepts again; `during` runs every 2 s of the
/// outage. Requires one connection attempt per backoff step, counted on hubsim's side (each
/// pause the agent announced after the first ends in exactly one attempt, so hubsim refuses one
/// connection fewer than there were pauses), and every pause after a refusal within
/// `UNAVAILABLE_BACKOFF_MAX` (8 s, from the agent's log: the cap that brings it back within
/// seconds).
async fn hub_refuses_connections(
    s: &Scenario,
    agent: &AgentProcess,
    outage: Duration,
    mut during: impl FnMut(),
) -> Refusals {
    let id = s.id.as_str();
    let pauses_before = reconnect_pauses(&agent.log_text()).len();
    let refused_before = hub_refusals(s.sim(), id);
    let pid = agent.child.id();
    begin_outage(s.sim(), id);
    s.sim().wait_until(Duration::from_secs(1), |_| false).await;
    let cpu_before = cpu_seconds(pid);
    let offline = Instant::now();
    // The outage itself: nothing to await but time.
    while offline.elapsed() + Duration::from_secs(1) < outage {
        let left = outage - Duration::from_secs(1) - offline.elapsed();
        s.sim()
            .wait_until(left.min(Duration::from_secs(2)), |_| false)
            .await;
        during();
    }
    let cpu_share = (cpu_seconds(pid) - cpu_before) / offline.elapsed().as_secs_f64();
    let before = telemetry_count(s.sim(), id);
    end_outage(s.sim());
    let back = Instant::now();
    s.wait_telemetry(agent, before + 1).await;
    let recovery = back.elapsed();
    let log = agent.log_text();
    let pauses = reconnect_pauses(&log)[pauses_before..].to_vec();
    let refused = hub_refusals(s.sim(), id) - refused_before;
    assert!(
        !pauses.is_empty(),
        "no reconnect pause after the drop:\n{log}"
    );
    assert_eq!(
        refused,
        pauses.len() - 1,
        "hubsim refused {refused} connections in {} pauses: not one attempt per pause:\n{log}",
        pauses.len()
    );
    assert!(
        pauses[1..].iter().all(|&p| p <= 8),
        "a pause after a CONNACK 3 beyond 8 s: {pauses:?}\n{log}"
    );
    Refusals {
        recovery,
        pauses,
        refused,
        cpu_share,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_refuses_connections_for_a_while() {
    let mut s = Scenario::new("fault-outage", "").await;
    let agent = s.start();
    s.wait_telemetry(&agent, 10).await;
    let outage = hub_refuses_connections(&s, &agent, Duration::from_secs(10), || {}).await;
    // A spinning reconnect burns a whole core.
    assert!(
        outage.cpu_share < 0.5,
        "busy loop while offline: {:.0}% CPU",
        outage.cpu_share * 100.0
    );
    s.finish(
        agent,
        "hub-outage",
        json!({
            "scenario": "hub refuses connections (CONNACK 3) for 10 s, 20 msg/s",
            "recovery_seconds": outage.recovery.as_secs_f64(), "cpu_offline_percent": outage.cpu_share * 100.0,
            "attempts during the outage": outage.refused, "longest pause seconds": outage.pauses.iter().max(),
        }),
    )
    .await;
}

/// 8883 blocked, 443 open: with `transport = "auto"` the agent finds the WebSocket route, and
/// the hub dropping the connection again and again costs nothing (each reconnection goes straight
/// to WebSockets, the route it remembers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_8883_blocked_443_open() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let blocked = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let agent_config = enrolled_agent(dir.path(), &running, "fault-8883")
        .0
        .mqtt_port(blocked)
        .extra(&format!(
            "transport = \"auto\"\nwebsocket_port = {}\n",
            running.https_addr.port()
        ));
    let mut s = Scenario::with_config(dir, running, "fault-8883", agent_config);
    let agent = s.start();
    s.wait_telemetry(&agent, 10).await;
    for round in 1..=3 {
        s.drop_and_recover(&agent, round).await;
    }
    let log = agent.log_text();
    assert_eq!(
        log.matches("trying MQTT over WebSockets").count(),
        1,
        "{log}"
    );
    s.finish(
        agent,
        "8883-blocked",
        json!({"scenario": "MQTT port closed, WebSockets open (transport = auto), hub connection dropped 3 times, 20 msg/s"}),
    )
    .await;
}

/// The agent in a network namespace whose only way out is an HTTP proxy that allows CONNECT to
/// the HTTPS port only, as corporate proxies do (8883 gets 403): hubsim cannot be reached
/// directly, the proxy comes from `https_proxy` (as a systemd drop-in sets it), and with
/// `transport = "auto"` the agent falls back to WebSockets inside the proxy's tunnels, provisions,
/// publishes, and loses nothing when the hub drops the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_proxy_to_443_gets_out() {
    let Some(netns) = hubagent_tests::netns::Netns::create_or_skip("only_a_proxy_to_443_gets_out")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let https = running.https_addr.port();
    let mqtt = running.mqtt_addr.port();
    let proxy = Tinyproxy::start_with(
        &dir.path().join("proxy"),
        free_port(),
        &ProxySettings {
            listen: netns.host_addr,
            allow: netns.inside_addr.to_string(),
            connect_ports: vec![https],
            ..ProxySettings::default()
        },
    );
    assert!(netns.wait_reachable(&netns.host_addr.to_string(), proxy.port));
    // The proxy is reached from inside; the direct route is truly closed: inside, hubsim's
    // addresses are the namespace's own.
    assert!(!netns.can_connect("127.0.0.1", mqtt) && !netns.can_connect("127.0.0.1", https));
    let agent_config = enrolled_agent(dir.path(), &running, "fault-only-proxy")
        .0
        .extra(&format!("transport = \"auto\"\nwebsocket_port = {https}\n"));
    let mut s = Scenario::with_config(dir, running, "fault-only-proxy", agent_config);
    s.env = vec![(
        "https_proxy".into(),
        format!("http://{}:{}", netns.host_addr, proxy.port),
    )];
    s.netns = Some(netns);
    let agent = s.start();
    s.wait_telemetry(&agent, 10).await;
    // The twin and direct methods take the same way out (the same interval: the scenario's
    // figures stay comparable).
    assert!(
        plugin_settings_followed(s.sim(), &s.id, "sensor", json!({"interval": "50ms"}))
            .await
            .is_some(),
        "{}",
        agent.log_text()
    );
    let key = device_key(s.sim(), &s.id);
    let (status, answer) =
        hubsim::twin::invoke_method(s.sim(), &key, "ping", &json!({"via": "proxy"}), WAIT)
            .await
            .unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["echo"], json!({"via": "proxy"}), "{answer}");
    for round in 1..=2 {
        s.drop_and_recover(&agent, round).await;
    }
    let log = agent.log_text();
    assert!(
        log.contains("refused the tunnel: HTTP 403") && log.contains("trying MQTT over WebSockets"),
        "{log}"
    );
    let tunnels = proxy.tunnels();
    for wanted in [format!("localhost:{https}"), format!("127.0.0.2:{https}")] {
        assert!(
            tunnels.contains(&wanted),
            "{wanted} not tunnelled: {tunnels:?}"
        );
    }
    let connected = connection_events(s.sim(), &s.id);
    let connected: Vec<_> = connected
        .iter()
        .filter(|e| e.event == "connected")
        .collect();
    assert!(
        connected.len() >= 3
            && connected
                .iter()
                .all(|e| e.transport.as_deref() == Some("mqtt-ws")),
        "{connected:?}"
    );
    s.finish(
        agent,
        "only-proxy",
        json!({"scenario": "only an HTTP proxy gets out (network namespace; CONNECT to 443 only), transport = auto, hub connection dropped 2 times, 20 msg/s"}),
    )
    .await;
}

/// The only way out is an HTTP proxy, named by `https_proxy` in the agent's environment (as a
/// systemd drop-in sets it), and the proxy dies mid-session: the agent queues while it is gone
/// and sends everything once it is back on its port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_restarts() {
    let mut s = Scenario::new("fault-proxy", "").await;
    let proxy_dir = s.dir.path().join("proxy");
    let mut proxy = Tinyproxy::start(&proxy_dir, None);
    s.env = vec![(
        "https_proxy".into(),
        format!("http://127.0.0.1:{}", proxy.port),
    )];
    let agent = s.start();
    s.wait_telemetry(&agent, 10).await;
    let dps = format!("localhost:{}", s.running.mqtt_addr.port());
    assert!(
        proxy.tunnels().contains(&dps),
        "DPS was not reached through the proxy: {:?}",
        proxy.tunnels()
    );
    assert_eq!(
        proxy.tunnels().iter().filter(|t| **t != dps).count(),
        1,
        "one hub session, through the proxy: {:?}",
        proxy.tunnels()
    );

    proxy.kill();
    // The session was inside the tunnel: the agent is offline and queues.
    agent
        .wait_status("a backlog while the proxy is gone", |st| {
            st["connection"] != "connected" && st["queue_depth"].as_u64().unwrap_or(0) >= 20
        })
        .await;
    let before = telemetry_count(s.sim(), "fault-proxy");
    let port = proxy.port;
    drop(proxy);
    // Same port, its own log: what it shows is the new session's.
    let proxy = Tinyproxy::start_on(&s.dir.path().join("proxy-again"), port, None);
    assert!(
        s.sim()
            .wait_until(LONG_WAIT, |sim| telemetry_count(sim, "fault-proxy")
                > before)
            .await,
        "{}",
        agent.log_text()
    );
    assert!(
        proxy.tunnels().iter().any(|t| *t != dps),
        "the new session went through the proxy: {:?}",
        proxy.tunnels()
    );
    s.finish(
        agent,
        "proxy-restart",
        json!({"scenario": "the HTTP proxy (tinyproxy) killed and started again, 20 msg/s"}),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dps_throttles_with_429() {
    let mut s = Scenario::new("fault-throttle", "").await;
    s.sim().faults.lock().unwrap().dps_throttle = Some((3, 1));
    let started = Instant::now();
    let agent = s.start();
    s.wait_telemetry(&agent, 5).await;
    let provisioned_after = started.elapsed();
    assert_eq!(
        registration_outcomes(s.sim()),
        ["throttled", "throttled", "throttled", "assigned"]
    );
    s.finish(
        agent,
        "dps-throttling",
        json!({
            "scenario": "DPS answers 429 (retry-after 1 s) three times",
            "throttled_answers": 3, "provisioned_seconds": provisioned_after.as_secs_f64(),
        }),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_of_a_few_seconds() {
    // The agent signs 4 s tokens and renews 2 s before expiry; hubsim also caps tokens at 3 s.
    let mut s = Scenario::new("fault-tokens", "").await;
    add_settings(
        &s.config,
        "[hub]",
        "sas_ttl = \"4s\"\nrenew_before = \"2s\"\n",
    );
    s.sim().faults.lock().unwrap().token_lifetime_cap = Some(Duration::from_secs(3));
    let agent = s.start();
    assert!(
        s.sim()
            .wait_until(LONG_WAIT, |sim| hub_connects(sim, "fault-tokens") >= 6)
            .await,
        "{}",
        agent.log_text()
    );
    let connects = hub_connects(s.sim(), "fault-tokens");
    s.finish(
        agent,
        "short-tokens",
        json!({
            "scenario": "4 s SAS tokens (renewed 2 s early), hub caps tokens at 3 s",
            "connections": connects,
        }),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_points() {
    let mut s = Scenario::new("fault-kill", "").await;
    let mut kills = 0;
    // Distinct readings of `run` that arrived.
    let arrived = |sim: &hubsim::Sim, run: &str| {
        runs(&numbered(sim, "fault-kill", Some(SENSOR), "seq"))
            .get(run)
            .map_or(0, Vec::len)
    };
    for _ in 0..3 {
        let agent = s.start();
        let (run, _) = sensor_acknowledged(&agent, SENSOR).await;
        let target = 10 + (rand_ms() % 40) as usize;
        assert!(
            s.sim()
                .wait_until(LONG_WAIT, |sim| arrived(sim, &run) >= target)
                .await,
            "{}",
            agent.log_text()
        );
        // Somewhere in the next 300 ms, mid-publish; what the agent acknowledged until then is
        // read just before the kill.
        s.sim()
            .wait_until(Duration::from_millis(rand_ms() % 300), |_| false)
            .await;
        s.kill_9(agent).await;
        kills += 1;
    }
    // A last run sends what the killed ones left queued; the check waits for all of it. Each
    // process numbers its readings from 1 under its own run id.
    let agent = s.start();
    let (run, _) = sensor_acknowledged(&agent, SENSOR).await;
    assert!(
        s.sim()
            .wait_until(LONG_WAIT, |sim| arrived(sim, &run) >= 5)
            .await,
        "{}",
        agent.log_text()
    );
    s.finish(
        agent,
        "kill-9",
        json!({
            "scenario": "kill -9 at random points while publishing, 3 times, then restart",
            "kills": kills,
        }),
    )
    .await;
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
    let mut options = sim_options(dir.path());
    let running = hubsim::start(options.clone()).await.unwrap();
    options.mqtt_port = running.mqtt_addr.port();
    options.https_port = running.https_addr.port();
    // The scenario's hubsim is replaced halfway: its parts are used one by one.
    let Scenario {
        dir: _dir,
        running,
        config,
        ..
    } = Scenario::with(dir, running, "fault-restart", "");
    let agent = AgentProcess::start(&config);
    assert!(
        running
            .sim
            .wait_until(LONG_WAIT, |sim| telemetry_count(sim, "fault-restart") >= 10)
            .await,
        "{}",
        agent.log_text()
    );
    let readings = |sim: &hubsim::Sim| numbered(sim, "fault-restart", Some(SENSOR), "seq");
    // Take the device off first so that nothing is acknowledged by the old instance after we
    // read its records (they live in its memory and go with it).
    begin_outage(&running.sim, "fault-restart");
    assert!(
        running
            .sim
            .wait_until(LONG_WAIT, |sim| live_connection(sim, "fault-restart")
                .is_none())
            .await
    );
    let before_restart = readings(&running.sim);
    // Stop hubsim entirely (its records go with it), wait 2 s, start it again on the same ports.
    running.shutdown();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let running = hubsim::start(options).await.unwrap();
    let restarted = Instant::now();
    assert!(
        running
            .sim
            .wait_until(LONG_WAIT, |sim| telemetry_count(sim, "fault-restart") >= 10)
            .await,
        "{}",
        agent.log_text()
    );
    let recovery = restarted.elapsed();
    // What both instances recorded, against what the agent acknowledged to its sensor.
    let all = || [before_restart.clone(), readings(&running.sim)].concat();
    let mut acked = Acknowledged::new();
    acked.note_sensor(&agent, SENSOR).await;
    let drained = drain(&agent, &acked, all, LONG_WAIT).await;
    assert_eq!(agent.stop(), Some(0));
    let delivery = Delivery::of(&acked, &all());
    let mut figures = json!({
        "scenario": "hubsim stopped for 2 s and restarted (state from disk)",
        "recovery_seconds": recovery.as_secs_f64(),
    });
    let f = figures.as_object_mut().unwrap();
    f.extend(delivery.figures().as_object().unwrap().clone());
    record_reliability("hubsim-restart", &figures);
    drained.unwrap_or_else(|e| panic!("hubsim restart: {e}"));
    delivery.assert_nothing_lost("hubsim restart");
    assert_eq!(
        registrations(&running.sim, "fault-restart"),
        0,
        "the cached assignment still holds after a hub restart"
    );
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
    AgentProcess::spawn(
        command,
        &s.config,
        "unshare (util-linux) runs the agent in its own mount namespace",
    )
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

/// Highest sensor sequence number hubsim has received from `device`.
fn max_seq(sim: &hubsim::Sim, device: &str) -> u64 {
    numbered(sim, device, Some(SENSOR), "seq")
        .iter()
        .map(|m| m.n)
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_on_the_state_dir() {
    let mut s = Scenario::new("fault-diskfull", "").await;
    let mut agent = start_with_small_state_fs(&s, "1m");
    s.wait_telemetry(&agent, 10).await;
    let pid = agent.child.id();
    let filler = std::path::PathBuf::from(format!("/proc/{pid}/root"))
        .join(s.dir.path().strip_prefix("/").unwrap())
        .join("state/filler");
    let filling = Filler::start(filler.clone());
    // The source is held back and says why.
    agent.wait_log("the disk is full").await;
    // Stay full for a few seconds: the agent keeps running and sends everything it had queued.
    let full_since = Instant::now();
    agent
        .wait_status("the queue did not drain while the disk was full", |st| {
            st["queue"]["depth"].as_u64() == Some(0)
                && full_since.elapsed() > Duration::from_secs(4)
        })
        .await;
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "the agent exited on a full disk:\n{}",
        agent.log_text()
    );
    let full = agent.status();
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
            .wait_until(LONG_WAIT, |sim| max_seq(sim, "fault-diskfull")
                > seq_while_full + 5)
            .await,
        "nothing new after the disk was freed:\n{}",
        agent.log_text()
    );
    let recovery = freed.elapsed();
    s.finish(
        agent,
        "disk-full",
        json!({
            "scenario": "state dir on a 1 MiB tmpfs filled for 4 s, 20 msg/s",
            "filler_kib": filled / 1024, "held_back": full["queue"]["held_back"],
            "recovery_seconds": recovery.as_secs_f64(),
        }),
    )
    .await;
}

/// Sets the agent's wall-clock offset ("+3h", "-2h", "+0"), or a start time it runs on from
/// ("@1970-01-01 00:00:05"); libfaketime rereads it on every clock call. Written atomically so
/// the agent never reads half a file.
fn set_clock_offset(file: &std::path::Path, offset: &str) {
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, format!("{offset}\n")).unwrap();
    std::fs::rename(&tmp, file).unwrap();
}

/// NTP sets the clock (offset "+0"): the agent must connect (more than `connects` hub
/// connections) within seconds, clear the status's clock problem and say so; how long it took.
async fn set_the_clock(
    s: &Scenario,
    agent: &AgentProcess,
    clock: &std::path::Path,
    connects: usize,
) -> Duration {
    let id = s.id.as_str();
    set_clock_offset(clock, "+0");
    let set = Instant::now();
    assert!(
        s.sim()
            .wait_until(Duration::from_secs(15), |sim| hub_connects(sim, id)
                > connects)
            .await,
        "not connected within 15 s of the clock being set:\n{}",
        agent.log_text()
    );
    let recovery = set.elapsed();
    agent
        .wait_status("the clock fine again", |st| {
            st["clock"].is_null() && st["connection"] == "connected"
        })
        .await;
    assert!(
        agent.log_text().contains("the system clock is set now"),
        "{}",
        agent.log_text()
    );
    recovery
}

/// Waits until the agent queued `n` more messages than now (so it has read the clock since).
async fn wait_pushed(agent: &AgentProcess, n: u64) {
    let pushed = |st: &serde_json::Value| st["queue"]["pushed"].as_u64().unwrap_or(0);
    let start = pushed(&agent.status());
    agent
        .wait_status(&format!("{n} more messages queued"), |st| {
            pushed(st) >= start + n
        })
        .await;
}

/// Starts the agent under libfaketime with its wall-clock offset in the file `clock`.
/// `hubagent SUBCOMMAND` with the configuration of `s`, its wall clock read from `clock` by
/// libfaketime at every call.
fn hubagent_under_faketime(
    s: &Scenario,
    clock: &std::path::Path,
    subcommand: &[&str],
) -> std::process::Command {
    let mut command = std::process::Command::new(hubagent_bin());
    command
        .args(["--config", s.config.to_str().unwrap()])
        .args(subcommand)
        .env("LD_PRELOAD", libfaketime())
        .env("FAKETIME_TIMESTAMP_FILE", clock)
        .env("FAKETIME_NO_CACHE", "1")
        // A clock step moves the wall clock only; CLOCK_MONOTONIC goes on as before.
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
    command
}

fn start_with_faketime(s: &Scenario, clock: &std::path::Path) -> AgentProcess {
    let command = hubagent_under_faketime(s, clock, &["run"]);
    AgentProcess::spawn(command, &s.config, "hubagent under libfaketime")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wall_clock_jumps_forward_and_back() {
    // 6 s tokens renewed every 3 s, and a max_age shorter than the jump: a queue that aged its
    // messages by the wall clock would drop everything queued before the jump.
    let mut s = Scenario::new("fault-clock", "\n[queue]\nmax_age = \"1h\"\n").await;
    add_settings(
        &s.config,
        "[hub]",
        "sas_ttl = \"6s\"\nrenew_before = \"3s\"\n",
    );
    let clock = s.dir.path().join("faketime");
    set_clock_offset(&clock, "+0");
    let agent = start_with_faketime(&s, &clock);
    let id = "fault-clock";
    s.wait_telemetry(&agent, 10).await;
    // Offline at the real time: 20+ messages wait in the queue.
    begin_outage(s.sim(), &s.id);
    wait_pushed(&agent, 20).await;
    // The clock steps 3 h forward while they wait; the agent reads it at its next message.
    set_clock_offset(&clock, "+3h");
    wait_pushed(&agent, 5).await;
    end_outage(s.sim());
    let back_online = Instant::now();
    let connects = hub_connects(s.sim(), id);
    assert!(
        s.sim()
            .wait_until(LONG_WAIT, |sim| hub_connects(sim, id) > connects)
            .await,
        "{}",
        agent.log_text()
    );
    let recovery = back_online.elapsed();
    // Renewals with the clock 3 h ahead (tokens expire 3 h late: the hub accepts them).
    let ahead = hub_connects(s.sim(), id);
    assert!(
        s.sim()
            .wait_until(LONG_WAIT, |sim| hub_connects(sim, id) >= ahead + 3)
            .await,
        "no token renewal with the clock 3 h ahead:\n{}",
        agent.log_text()
    );
    // And 3 h back again, to the true time: renewal goes on at the same pace.
    set_clock_offset(&clock, "+0");
    let back = hub_connects(s.sim(), id);
    assert!(
        s.sim()
            .wait_until(LONG_WAIT, |sim| hub_connects(sim, id) >= back + 3)
            .await,
        "no token renewal after the clock stepped back 3 h:\n{}",
        agent.log_text()
    );
    let st = agent.status();
    assert_eq!(st["queue"]["dropped_expired"], 0, "{st}");
    let connections = hub_connects(s.sim(), id);
    s.finish(
        agent,
        "clock-jump",
        json!({
            "scenario": "wall clock 3 h ahead during a hub outage, then 3 h back; 6 s SAS tokens, max_age 1 h",
            "connections": connections, "recovery_seconds": recovery.as_secs_f64(),
        }),
    )
    .await;
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
    let mut s = Scenario::new(id, "").await;
    let agent = s.start();
    s.wait_telemetry(&agent, 10).await;
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
                .wait_until(LONG_WAIT, |sim| hub_connects(sim, id) > connects)
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
    s.finish(
        agent,
        "hub-connection-dropped-long",
        json!({
            "scenario": "hub connection dropped every 3 s for 2 min, 20 msg/s",
            "drops": drops, "rss_warm_kib": rss.warm, "rss_peak_kib": rss.peak_after_warm,
        }),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_refuses_connections_for_a_minute() {
    hub_refuses_connections_long(
        "fault-outage-long",
        Duration::from_secs(60),
        "hub refuses connections (CONNACK 3) for 60 s, 20 msg/s",
    )
    .await;
}

/// Ten minutes: not in CI; run alone with
/// `cargo nextest run -p hubagent-tests --features hubagent-tests/tpm --test faults --run-ignored only -E 'test(hub_refuses_connections_for_ten_minutes)'`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "ten minutes long: run with --run-ignored only (docs/reliability.md)"]
async fn hub_refuses_connections_for_ten_minutes() {
    hub_refuses_connections_long("fault-outage-600s", Duration::from_secs(600), "hub refuses connections (CONNACK 3) for 10 min, 20 msg/s (run alone, `--run-ignored only`)").await;
}

/// A long refusal (a minute and more): besides [`hub_refuses_connections`]'s checks, the CPU
/// stays low, the RSS flat, the readings of the outage queue up, and the backlog arrives.
async fn hub_refuses_connections_long(id: &str, outage: Duration, scenario: &str) {
    let mut s = Scenario::new(id, "").await;
    let agent = s.start();
    s.wait_telemetry(&agent, 10).await;
    let pid = agent.child.id();
    let mut rss = RssWatch::new(pid);
    rss.sample();
    let queued_before = agent.status()["queue"]["depth"].as_u64().unwrap_or(0);
    let before = max_seq(s.sim(), id);
    let mut queued = 0;
    let refusals = hub_refuses_connections(&s, &agent, outage, || {
        rss.sample();
        queued = queued.max(agent.status()["queue"]["depth"].as_u64().unwrap_or(0));
    })
    .await;
    // A spinning reconnect or a hot retry loop burns a whole core; backoff keeps it near zero.
    assert!(
        refusals.cpu_share < 0.2,
        "busy loop while offline: {:.1}% CPU",
        refusals.cpu_share * 100.0
    );
    let minimum = outage.as_secs() * 10;
    assert!(
        queued >= queued_before + minimum,
        "the outage's readings are queued: {queued}, {minimum} expected at least"
    );
    let back = Instant::now();
    assert!(
        s.sim()
            .wait_until(LONG_WAIT * 2, |sim| max_seq(sim, id) > before + queued)
            .await,
        "the backlog did not arrive:\n{}",
        agent.log_text()
    );
    let drained = back.elapsed();
    rss.sample();
    rss.assert_flat("a refusal outage");
    s.finish(
        agent,
        id,
        json!({
            "scenario": scenario,
            "cpu_offline_percent": refusals.cpu_share * 100.0, "queued_offline": queued,
            "recovery_seconds": refusals.recovery.as_secs_f64(), "backlog_sent_seconds": drained.as_secs_f64(),
            "rss_warm_kib": rss.warm, "rss_peak_kib": rss.peak_after_warm,
            "attempts during the outage": refusals.refused, "longest pause seconds": refusals.pauses.iter().max(),
        }),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_behind_at_boot_then_corrected() {
    let id = "fault-clock-behind";
    let mut s = Scenario::new(id, "").await;
    let clock = s.dir.path().join("faketime");
    // Two hours behind with one-hour tokens (the default): every token the agent signs has
    // expired before it is sent, so DPS refuses it.
    set_clock_offset(&clock, "-2h");
    let agent = start_with_faketime(&s, &clock);
    // The refusal points at the clock.
    agent.wait_log("device clock is right").await;
    // Readings pile up in the queue meanwhile; then NTP corrects the clock.
    wait_pushed(&agent, 20).await;
    set_clock_offset(&clock, "+0");
    let corrected = Instant::now();
    s.wait_telemetry(&agent, 20).await;
    let recovery = corrected.elapsed();
    // The retry wait (60 s after a refused registration) ends when the clock steps.
    assert!(
        agent
            .log_text()
            .contains("the wall clock stepped; retrying now"),
        "{}",
        agent.log_text()
    );
    s.finish(
        agent,
        "clock-behind",
        json!({
            "scenario": "clock 2 h behind at boot (1 h tokens refused by DPS), then corrected",
            "recovery_seconds": recovery.as_secs_f64(),
        }),
    )
    .await;
}

/// `hubagent check --json` under the fake clock in `clock`: the `clock.sane` entry.
fn clock_check_under_faketime(s: &Scenario, clock: &std::path::Path) -> serde_json::Value {
    let out = hubagent_under_faketime(s, clock, &["check", "--json"])
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "check --json printed no report ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    check_entry(&report, "clock.sane")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_at_1970_at_boot_then_set() {
    let id = "fault-clock-1970";
    let mut s = Scenario::new(id, "").await;
    let clock = s.dir.path().join("faketime");
    // A board without an RTC: the clock starts at the epoch and runs on from there.
    set_clock_offset(&clock, "@1970-01-01 00:00:05");
    let agent = start_with_faketime(&s, &clock);
    let unset = "before this build of hubagent was made";
    // The status says what is wrong: the JSON field and the line a person reads.
    let st = agent
        .wait_status("the clock problem in the status", |st| {
            st["clock"].as_str().is_some_and(|c| c.contains(unset))
        })
        .await;
    let problem = st["clock"].as_str().unwrap();
    for words in [
        "the system clock reads 1970-01-01T00:00:",
        "TLS certificates look not yet valid and SAS tokens expired",
        "waiting for the clock to be set (NTP, systemd-timesyncd)",
    ] {
        assert!(problem.contains(words), "{words:?} missing: {st}");
    }
    let human = String::from_utf8_lossy(&agent.cli(&["status"]).stdout).into_owned();
    assert!(
        human
            .lines()
            .any(|l| l.starts_with("  clock:") && l.contains("reads 1970-01-01T")),
        "{human}"
    );
    // `hubagent check` on the same clock fails `clock.sane` with the same words.
    let check = clock_check_under_faketime(&s, &clock);
    assert_eq!(check["result"], "fail", "{check}");
    assert!(check["detail"].as_str().unwrap().contains(unset), "{check}");

    // Ten seconds and more of waiting: the sensor's readings go to the queue, no attempt is
    // made at DPS or the hub, and the agent idles. CPU is a correctness bound (a retry loop
    // without a pause burns a core), not a benchmark: under 10% of the wait, the sensor's 20
    // queued readings a second included.
    let pid = agent.child.id();
    let cpu_before = cpu_seconds(pid);
    let waiting = Instant::now();
    wait_pushed(&agent, 200).await;
    let waited = waiting.elapsed();
    let cpu = cpu_seconds(pid) - cpu_before;
    assert!(
        waited >= Duration::from_secs(9) && cpu < 0.1 * waited.as_secs_f64(),
        "{cpu:.2} s CPU in {:.1} s of waiting for the clock:\n{}",
        waited.as_secs_f64(),
        agent.log_text()
    );
    let queued = agent.status()["queue"]["depth"].as_u64().unwrap_or(0);
    assert!(queued >= 200, "the readings wait in the queue: {queued}");
    assert_eq!(hub_connects(s.sim(), id), 0, "{}", agent.log_text());
    let log = agent.log_text();
    assert_eq!(
        log.matches(unset).count(),
        1,
        "the clock problem is logged once:\n{log}"
    );
    assert!(
        !log.contains("DPS registration failed"),
        "no attempt with the clock at 1970:\n{log}"
    );

    // NTP sets the clock: connected within seconds, not after a retry wait.
    let recovery = set_the_clock(&s, &agent, &clock, 0).await;

    // A reboot at 1970 again, now with the assignment cached: the hub session waits for the
    // clock the same way (the `Session` phase's look at the clock, not only `Register`'s). A
    // clean stop, which writes the queue's position: a kill -9 right after the backlog went out
    // would send it all again (duplicates are another scenario's subject).
    s.acked.note_sensor(&agent, SENSOR).await;
    let log = agent.log_text();
    assert_eq!(agent.stop(), Some(0), "{log}");
    set_clock_offset(&clock, "@1970-01-01 00:00:05");
    let connects = hub_connects(s.sim(), id);
    let agent = start_with_faketime(&s, &clock);
    agent
        .wait_status("the clock problem after the reboot", |st| {
            st["clock"].as_str().is_some_and(|c| c.contains(unset))
                && st["provisioning"] == "cached"
        })
        .await;
    wait_pushed(&agent, 40).await;
    assert_eq!(hub_connects(s.sim(), id), connects, "{}", agent.log_text());
    // Stopped while still at 1970: its queue holds readings stamped 1970. Started again with
    // the clock set, the queue must not take them for 56 years old (max_age 7 d) and drop them.
    s.acked.note_sensor(&agent, SENSOR).await;
    let log = agent.log_text();
    assert_eq!(agent.stop(), Some(0), "{log}");
    set_clock_offset(&clock, "+0");
    let agent = start_with_faketime(&s, &clock);
    s.wait_telemetry(&agent, telemetry_count(s.sim(), id) + 40)
        .await;
    let st = agent.status();
    assert_eq!(st["queue"]["dropped_expired"], 0, "{st}");
    // Everything the sensor was told was queued, in all three runs, arrives (the loss check).
    s.finish(
        agent,
        "clock-1970",
        json!({
            "scenario": "clock at 1970 at boot (no RTC) for 10 s, then set; again after a reboot with the assignment cached, stopped at 1970 and restarted with the clock set; 20 msg/s",
            "queued_waiting": queued,
            "cpu_waiting_percent": cpu / waited.as_secs_f64() * 100.0,
            "recovery_seconds": recovery.as_secs_f64(),
        }),
    )
    .await;
}

/// A clock that falls back to 1970 while the agent is connected (an RTC battery dead and the
/// clock reset, a bad NTP answer): the agent says so once, within seconds, and shows it in its
/// status; the live connection goes on carrying readings (its token holds until its renewal);
/// once it drops, no doomed attempt is made (no TLS handshake against a hub whose certificate
/// looks "not yet valid", no backoff spent) while the readings queue up; and with the clock set
/// again it connects within seconds and everything the sensor was told was queued arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_falls_back_to_1970_while_connected() {
    let id = "fault-clock-fallback";
    let mut s = Scenario::new(id, "").await;
    let clock = s.dir.path().join("faketime");
    set_clock_offset(&clock, "+0");
    let agent = start_with_faketime(&s, &clock);
    s.wait_telemetry(&agent, 10).await;
    let unset = "before this build of hubagent was made";
    let connects = hub_connects(s.sim(), id);

    set_clock_offset(&clock, "@1970-01-01 00:00:05");
    let st = agent
        .wait_status("the clock problem in the status", |st| {
            st["clock"].as_str().is_some_and(|c| c.contains(unset))
        })
        .await;
    assert_eq!(
        st["connection"], "connected",
        "the live session is kept: {st}"
    );
    agent
        .wait_log_line("the clock problem in the log", |l| l.contains(unset))
        .await;
    // The live connection still carries readings, stamped 1970.
    s.wait_telemetry(&agent, telemetry_count(s.sim(), id) + 20)
        .await;

    // The connection drops: the agent waits for the clock instead of reconnecting.
    let lost_before = agent.log_text().matches("hub connection lost").count();
    let pauses_before = reconnect_pauses(&agent.log_text()).len();
    assert!(s.drop_connection(), "no live connection");
    agent
        .wait_status("no connection, the clock problem shown", |st| {
            st["connection"] != "connected"
                && st["clock"].as_str().is_some_and(|c| c.contains(unset))
        })
        .await;
    let pid = agent.child.id();
    let cpu_before = cpu_seconds(pid);
    let waiting = Instant::now();
    wait_pushed(&agent, 100).await;
    let cpu = cpu_seconds(pid) - cpu_before;
    let waited = waiting.elapsed();
    assert!(
        cpu < 0.1 * waited.as_secs_f64(),
        "{cpu:.2} s CPU in {:.1} s of waiting for the clock:\n{}",
        waited.as_secs_f64(),
        agent.log_text()
    );
    let queued = agent.status()["queue"]["depth"].as_u64().unwrap_or(0);
    assert!(queued >= 100, "the readings wait in the queue: {queued}");
    let log = agent.log_text();
    assert_eq!(hub_connects(s.sim(), id), connects, "{log}");
    // One loss, the drop itself, and the one pause after it: an attempt at 1970 would fail
    // (its TLS handshake, or its token refused) and announce another pause.
    assert_eq!(
        log.matches("hub connection lost").count(),
        lost_before + 1,
        "an attempt with the clock at 1970:\n{log}"
    );
    assert_eq!(
        reconnect_pauses(&log).len(),
        pauses_before + 1,
        "an attempt with the clock at 1970:\n{log}"
    );
    assert!(
        !log.contains("the hub refused the device's credentials"),
        "an attempt with the clock at 1970:\n{log}"
    );
    assert_eq!(
        log.matches(unset).count(),
        1,
        "the clock problem is logged once:\n{log}"
    );

    // NTP sets the clock: connected within seconds, not after a retry wait.
    let recovery = set_the_clock(&s, &agent, &clock, connects).await;
    s.finish(
        agent,
        "clock-fallback",
        json!({
            "scenario": "clock falls back to 1970 while connected, the connection dropped, then the clock set; 20 msg/s",
            "queued_waiting": queued,
            "cpu_waiting_percent": cpu / waited.as_secs_f64() * 100.0,
            "recovery_seconds": recovery.as_secs_f64(),
        }),
    )
    .await;
}

/// The hostile hub scenario: the agent publishes through a [`HostileHub`] that behaves, then meets
/// `behaviour` on three connections in a row, then the hub behaves again. Throughout, the agent
/// stays alive and its control socket answers; afterwards it reconnects and the loss check
/// passes: nothing the hostile hub did (a PUBACK for a packet never sent, a PUBACK twice, …)
/// made the agent take a message off its queue that hubsim did not acknowledge.
async fn hostile_hub(id: &str, behaviour: hostile::Hostile, scenario: &str) {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let hub = hostile::HostileHub::start(&running, &dir.path().join("hubsim")).await;
    // A short keep-alive and backoff: a silent hub is noticed within seconds, and three hostile
    // connections fit in the test's waits.
    let agent_config = enrolled_agent(dir.path(), &running, id)
        .0
        .mqtt_port(hub.port)
        .extra("keep_alive = \"2s\"\nreconnect_backoff_max = \"2s\"\n");
    let mut s = Scenario::with_config(dir, running, id, agent_config);
    let mut agent = s.start();
    s.wait_telemetry(&agent, 10).await;

    hub.behave(Some(behaviour));
    assert!(s.drop_connection(), "no live connection");
    assert!(
        hub.wait_hostile_connections(3).await,
        "the agent did not come back to the hostile hub three times: {}",
        agent.log_text()
    );
    assert_eq!(
        agent.child.try_wait().unwrap(),
        None,
        "the agent exited: {}",
        agent.log_text()
    );
    let status = agent.status();
    assert_eq!(
        status["pid"],
        json!(agent.child.id()),
        "the control socket does not answer: {}",
        agent.log_text()
    );
    let hostile_connections = hub.hostile_connections();

    hub.behave(None);
    let connects = hub_connects(s.sim(), &s.id);
    assert!(
        s.sim()
            .wait_until(LONG_WAIT, |sim| hub_connects(sim, &s.id) > connects)
            .await,
        "no reconnection once the hub behaved: {}",
        agent.log_text()
    );
    let before = telemetry_count(s.sim(), &s.id);
    s.wait_telemetry(&agent, before + 5).await;
    s.finish(
        agent,
        id,
        json!({"scenario": scenario, "hostile connections": hostile_connections}),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_hub_accepts_and_never_reads() {
    hostile_hub(
        "hostile-never-reads",
        hostile::Hostile::NeverReads,
        "hostile hub: accepts TCP and never reads, 3 connections",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_hub_stalls_the_tls_handshake() {
    hostile_hub(
        "hostile-tls-stall",
        hostile::Hostile::TlsStall,
        "hostile hub: reads the TLS ClientHello and never answers, 3 connections",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_hub_never_sends_a_connack() {
    hostile_hub(
        "hostile-no-connack",
        hostile::Hostile::NoConnack,
        "hostile hub: TLS up, CONNECT read, no CONNACK, 3 connections",
    )
    .await;
}

/// [`hostile_hub`] with `bytes` written to the agent right after the hub's CONNACK, then `after`.
async fn hostile_inject(name: &str, bytes: &[u8], after: hostile::After, what: &str) {
    hostile_hub(
        &format!("hostile-{name}"),
        hostile::Hostile::Inject {
            bytes: bytes.to_vec(),
            after,
        },
        &format!("hostile hub: {what} after the CONNACK, 3 connections"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_hub_sends_reserved_type() {
    hostile_inject(
        "reserved",
        hostile::packets::RESERVED_TYPE,
        hostile::After::Forward,
        "a packet of reserved type 15",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_hub_sends_truncated_packet_then_close() {
    hostile_inject(
        "truncated-close",
        hostile::packets::TRUNCATED_PUBLISH,
        hostile::After::Close,
        "a truncated PUBLISH, then the connection closed",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_hub_sends_truncated_packet_then_silence() {
    hostile_inject(
        "truncated-stall",
        hostile::packets::TRUNCATED_PUBLISH,
        hostile::After::Stall,
        "a truncated PUBLISH, then silence (stalled mid-packet)",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_hub_sends_huge_remaining_length() {
    hostile_inject(
        "huge-length",
        hostile::packets::HUGE_LENGTH,
        hostile::After::Stall,
        "a PUBLISH announcing 256 MiB, then silence",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_hub_sends_malformed_remaining_length() {
    hostile_inject(
        "bad-length",
        hostile::packets::MALFORMED_LENGTH,
        hostile::After::Forward,
        "a remaining length of 5 bytes",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_hub_sends_second_malformed_connack() {
    hostile_inject(
        "bad-connack",
        hostile::packets::BAD_CONNACK,
        hostile::After::Forward,
        "a second CONNACK of the wrong length",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_hub_sends_puback_id_zero() {
    hostile_inject(
        "puback-zero",
        hostile::packets::PUBACK_ID_ZERO,
        hostile::After::Forward,
        "a PUBACK for packet id 0",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_hub_sends_puback_never_sent() {
    hostile_inject(
        "puback-never-sent",
        hostile::packets::PUBACK_NEVER_SENT,
        hostile::After::Forward,
        "a PUBACK for packet id 60000 (never sent)",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_hub_sends_every_puback_twice() {
    hostile_hub(
        "hostile-duplicate-puback",
        hostile::Hostile::DuplicatePuback,
        "hostile hub: every PUBACK sent twice, 3 connections",
    )
    .await;
}

/// The agent's log lines announcing a reconnect pause, one per failed connection attempt.
fn reconnect_pauses(log: &str) -> Vec<u64> {
    log.lines()
        .filter_map(|l| {
            let after = l.split_once("next attempt to connect to the hub in ")?.1;
            after.split_whitespace().next()?.parse().ok()
        })
        .collect()
}

/// A scenario behind a [`hostile::HostileHub`] that behaves: the port the agent dials can be
/// closed (TCP refused) and opened again. The default backoff cap (5 min).
async fn closable_hub(id: &str) -> (Scenario, hostile::HostileHub) {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let hub = hostile::HostileHub::start(&running, &dir.path().join("hubsim")).await;
    let agent_config = enrolled_agent(dir.path(), &running, id)
        .0
        .mqtt_port(hub.port);
    (Scenario::with_config(dir, running, id, agent_config), hub)
}

/// The hub's port is closed (a route down: TCP refused) for `outage`, then opened again; records
/// the recovery time, from the port opening to the first message hubsim receives, and the
/// connection attempts made during the outage (one per backoff step).
async fn hub_unreachable(id: &str, outage: Duration, scenario: &str) {
    let (mut s, hub) = closable_hub(id).await;
    let agent = s.start();
    s.wait_telemetry(&agent, 10).await;
    hub.close();
    assert!(s.drop_connection(), "no live connection");
    // The outage itself: nothing to await but time.
    tokio::time::sleep(outage).await;
    let attempts = reconnect_pauses(&agent.log_text()).len();
    let before = telemetry_count(s.sim(), &s.id);
    hub.open().await;
    let opened = Instant::now();
    s.wait_telemetry(&agent, before + 1).await;
    let recovery = opened.elapsed();
    let log = agent.log_text();
    let early = log.matches("the hub's port is reachable again").count();
    s.finish(
        agent,
        id,
        json!({
            "scenario": scenario,
            "recovery seconds": (recovery.as_secs_f64() * 100.0).round() / 100.0,
            "attempts during the outage": attempts,
            "pauses ended by the probe": early,
        }),
    )
    .await;
}

/// With the hub's port closed long enough for the backoff to reach a pause of 16 s or more, the
/// agent connects once the port opens again, well before that pause would end: its probe sees
/// the port take connections, and that pause ends in exactly one connection attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_notices_the_hub_port_open_again_before_its_backoff_ends() {
    let (mut s, hub) = closable_hub("probe-returns").await;
    let agent = s.start();
    s.wait_telemetry(&agent, 10).await;
    hub.close();
    assert!(s.drop_connection(), "no live connection");
    agent
        .wait_log_line("a reconnect pause of 16 s or more", |l| {
            reconnect_pauses(l).first().is_some_and(|&p| p >= 16)
        })
        .await;
    let pauses = reconnect_pauses(&agent.log_text());
    let long = *pauses.last().unwrap();
    let connects = hub_connects(s.sim(), &s.id);
    hub.open().await;
    assert!(
        s.sim()
            .wait_until(Duration::from_secs(long / 2), |sim| hub_connects(
                sim, &s.id
            ) > connects)
            .await,
        "no connection within half of the {long} s pause: {}",
        agent.log_text()
    );
    let log = agent.log_text();
    assert!(
        log.contains("the hub's port is reachable again: connecting now"),
        "{log}"
    );
    assert_eq!(
        reconnect_pauses(&log).len(),
        pauses.len(),
        "more than one attempt in that pause: {log}"
    );
    s.finish(agent, "unreachable-probe", json!({"scenario": "hub port closed until a reconnect pause of 16 s or more, then opened", "pause seconds": long}))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_unreachable_for_ten_seconds() {
    hub_unreachable(
        "unreachable-10s",
        Duration::from_secs(10),
        "hub port closed (TCP refused) for 10 s, 20 msg/s",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_unreachable_for_a_minute() {
    hub_unreachable(
        "unreachable-60s",
        Duration::from_secs(60),
        "hub port closed (TCP refused) for 60 s, 20 msg/s",
    )
    .await;
}

/// Ten minutes: not in CI; run alone with
/// `cargo nextest run -p hubagent-tests --features hubagent-tests/tpm --test faults --run-ignored only hub_unreachable_for_ten_minutes`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "ten minutes long: run with --run-ignored only (docs/reliability.md)"]
async fn hub_unreachable_for_ten_minutes() {
    hub_unreachable(
        "unreachable-600s",
        Duration::from_secs(600),
        "hub port closed (TCP refused) for 10 min, 20 msg/s",
    )
    .await;
}

/// The queue's segment files under `state`, oldest first, with their sizes.
fn queue_segments(state: &std::path::Path) -> Vec<(std::path::PathBuf, u64)> {
    let mut segments: Vec<_> = std::fs::read_dir(state.join("queue"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .map(|p| {
            let len = std::fs::metadata(&p).map_or(0, |m| m.len());
            (p, len)
        })
        .collect();
    segments.sort();
    segments
}

/// Waits until the queue under `state` has at least `n` segment files.
async fn wait_segments(agent: &AgentProcess, state: &std::path::Path, n: usize) {
    let deadline = Instant::now() + LONG_WAIT;
    while queue_segments(state).len() < n {
        assert!(
            Instant::now() < deadline,
            "the queue never had {n} segments:\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Cuts `path` to `len` bytes, as a power cut can leave a file whose size was not yet on disk.
fn cut_file(path: &std::path::Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(len))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// Cuts `path` in the middle (of a record, most likely).
fn cut_in_half(path: &std::path::Path) {
    let len = std::fs::metadata(path).unwrap().len();
    cut_file(path, len / 2 + 3);
}

/// Cuts the last `n` bytes off `path` (the `acked` file is a few bytes: half of it may be all).
fn cut_end(path: &std::path::Path, n: u64) {
    let len = std::fs::metadata(path).unwrap().len();
    cut_file(path, len.saturating_sub(n));
}

/// The file name of `path`, to find it in the log.
fn file_name(path: &std::path::Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_files_cut_short_by_a_power_cut() {
    let id = "fault-cut";
    // A 64 KiB queue has 4 KiB segments: a few seconds of readings fill several. One message in
    // flight: the hub session keeps what it was handed in memory across reconnects, and a cut
    // must meet messages that are only on disk.
    let mut s = Scenario::new(id, "inflight = 1\n[queue]\nmax_bytes = \"64KiB\"\n").await;
    let state = s.dir.path().join("state");
    let agent = s.start();
    s.wait_telemetry(&agent, 10).await;
    // The twin cache is written once the twin is read: the files to cut must be there.
    let deadline = Instant::now() + LONG_WAIT;
    while !(state.join("twin.json").exists() && state.join("queue/acked").exists()) {
        assert!(
            Instant::now() < deadline,
            "no twin cache or acked file:\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 1. Under the running agent: the hub away, readings queue up in several segments; then a
    // segment in the middle is cut mid-record, the one being written is emptied, and the other
    // state files are cut. The first segments are left whole: they hold the oldest
    // unacknowledged messages, which the pump and the session may hold in memory.
    begin_outage(s.sim(), id);
    wait_segments(&agent, &state, 6).await;
    let segments = queue_segments(&state);
    cut_in_half(&segments[3].0);
    cut_file(&segments.last().unwrap().0, 0);
    cut_end(&state.join("queue/acked"), 2);
    cut_file(&state.join("provisioning.json"), 0);
    cut_in_half(&state.join("twin.json"));
    // The next reading goes into a new segment, said so.
    agent.wait_log("cut short under the agent").await;
    end_outage(s.sim());
    let sent = agent
        .wait_status("the backlog was not sent after the outage", |st| {
            st["queue"]["depth"].as_u64() == Some(0)
                && st["queue"]["dropped_corrupt"].as_u64() > Some(0)
        })
        .await;
    let dropped_running = sent["queue"]["dropped_corrupt"].as_u64().unwrap();
    assert_eq!(sent["queue"]["dropped_full"], 0, "{sent}");
    let log = agent.log_text();
    for damaged in [&segments[3].0, &segments.last().unwrap().0] {
        let name = file_name(damaged);
        assert!(
            log.lines()
                .any(|l| l.contains(&name) && l.contains("counted in dropped_corrupt")),
            "the log does not name {name}:\n{log}"
        );
    }

    // 2. A power cut: readings queued again during an outage, the agent killed, and the files
    // cut before it starts again: two segments in the middle (one mid-record, one emptied), the
    // acknowledgement file, the cached assignment and the twin.
    begin_outage(s.sim(), id);
    wait_segments(&agent, &state, 5).await;
    s.kill_9(agent).await;
    let segments = queue_segments(&state);
    cut_in_half(&segments[2].0);
    cut_file(&segments[3].0, 0);
    cut_end(&state.join("queue/acked"), 2);
    cut_file(&state.join("provisioning.json"), 0);
    cut_in_half(&state.join("twin.json"));
    let registered = registrations(s.sim(), id);
    let agent = s.start();
    // It says which file and what it did, for each.
    agent
        .wait_log("provisioning.json: not a valid state file")
        .await;
    let log = agent.log_text();
    for (file, what) in [
        ("twin.json", "not a valid state file"),
        ("acked", "damaged"),
        (&file_name(&segments[2].0), "counted in dropped_corrupt"),
        (&file_name(&segments[3].0), "counted in dropped_corrupt"),
    ] {
        assert!(
            log.lines().any(|l| l.contains(file) && l.contains(what)),
            "the log does not say {what:?} of {file}:\n{log}"
        );
    }
    let loaded = agent.status();
    let dropped_at_start = loaded["queue"]["dropped_corrupt"].as_u64().unwrap();
    assert!(dropped_at_start > 0, "{loaded}");
    // The cached assignment is unreadable: DPS is asked again once it answers.
    end_outage(s.sim());
    assert!(
        s.sim()
            .wait_until(LONG_WAIT, |sim| registrations(sim, id) > registered)
            .await,
        "no DPS registration with the cache unreadable:\n{}",
        agent.log_text()
    );
    // Everything this run acknowledged arrives; of the killed run's, exactly what the damage
    // took is missing, and that is what the agent counted.
    let mut this_run = Acknowledged::new();
    let (run, _) = this_run.note_sensor(&agent, SENSOR).await;
    s.acked.note(&run, this_run.runs()[&run]);
    let drained = drain(&agent, &this_run, || s.messages(), LONG_WAIT).await;
    let status = agent.status();
    let log = agent.log_text();
    assert_eq!(agent.stop(), Some(0), "{log}");
    drained.unwrap_or_else(|e| panic!("{e}\n{log}"));
    assert_eq!(status["queue"]["dropped_full"], 0, "{status}");
    assert_eq!(
        status["queue"]["dropped_corrupt"].as_u64(),
        Some(dropped_at_start),
        "{status}"
    );
    let delivery = Delivery::of(&s.acked, &s.messages());
    assert!(
        delivery.lost.iter().all(|(r, _)| *r != run),
        "the restarted run lost messages: {}",
        describe(&delivery.lost)
    );
    record_reliability(
        "state-files-cut",
        &json!({
            "scenario": "state files and queue segments cut short by a power cut: under the running agent during an outage, and again before a restart; 20 msg/s",
            "produced": delivery.produced,
            "arrived_distinct": delivery.arrived,
            "duplicates": delivery.duplicates,
            "lost": delivery.lost.len(),
            "arrived_after_reading": delivery.after_reading,
            "dropped_corrupt_running": dropped_running,
            "dropped_corrupt_at_start": dropped_at_start,
        }),
    );
    assert_eq!(
        delivery.lost.len() as u64,
        dropped_running + dropped_at_start,
        "what is missing is what the agent counted as dropped_corrupt: {}",
        describe(&delivery.lost)
    );
}

/// A scenario whose enrollment has DPS issue the agent its hub certificate
/// (`[provisioning.issued_certificate]`, hubsim's CA signing the agent's CSRs, valid an hour),
/// as tests/it/renewal.rs sets it up (support::issuing_agent).
async fn issuing_scenario(id: &str) -> Scenario {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let agent = issuing_agent(dir.path(), &running, id, 3600, "");
    Scenario::with_config(dir, running, id, agent)
}

/// The complete issued generations under `state` (`gen-<n>`), sorted.
fn issued_generations(state: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(state.join("issued"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("gen-"))
        .collect();
    names.sort();
    names
}

/// Waits until the agent is connected with issued generation `n`.
async fn wait_issued_generation(agent: &AgentProcess, n: u64) -> serde_json::Value {
    agent
        .wait_status(&format!("connected with issued generation {n}"), |st| {
            st["connection"] == "connected" && st["issued_generation"] == n
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issued_certificate_cut_short_by_a_power_cut() {
    let id = "fault-issued-cut";
    let mut s = issuing_scenario(id).await;
    let state = s.dir.path().join("state");
    let agent = s.start();
    wait_issued_generation(&agent, 1).await;
    s.wait_telemetry(&agent, 10).await;
    assert_eq!(issued_generations(&state), ["gen-1"]);

    // 1. Under the running agent, the generation it connected with is cut: its chain in the
    // middle of the leaf. The agent holds its identity in memory (it reads the generations at
    // start only) and goes on publishing; a renewal (here asked for) writes generation 2 beside
    // it, connects with it and removes the damaged one.
    cut_in_half(&state.join("issued/gen-1/chain.pem"));
    let before = telemetry_count(s.sim(), id);
    s.wait_telemetry(&agent, before + 10).await;
    let registered = registrations(s.sim(), id);
    let out = agent.cli(&["reprovision"]);
    assert!(out.status.success(), "{out:?}");
    wait_issued_generation(&agent, 2).await;
    assert_eq!(registrations(s.sim(), id), registered + 1);
    assert_eq!(issued_generations(&state), ["gen-2"]);

    // 2. A power cut: the agent killed, and the key of its generation emptied before the next
    // start. The new process says so, gets generation 3 from DPS and connects with it.
    let before = telemetry_count(s.sim(), id);
    s.wait_telemetry(&agent, before + 10).await;
    s.kill_9(agent).await;
    cut_file(&state.join("issued/gen-2/key.pem"), 0);
    let registered = registrations(s.sim(), id);
    let agent = s.start();
    wait_issued_generation(&agent, 3).await;
    let log = agent.log_text();
    assert!(
        log.lines().any(|l| l.contains("gen-2")
            && l.contains("key.pem")
            && l.contains("asking DPS for a new one")),
        "the log does not name the damaged key:\n{log}"
    );
    assert_eq!(registrations(s.sim(), id), registered + 1);
    assert_eq!(issued_generations(&state), ["gen-3"]);
    // It went to DPS first: the hub was never offered a credential it would refuse.
    assert_eq!(hub_refusals(s.sim(), id), 0, "{log}");
    // Nothing the agent acknowledged is lost, across the reload and the kill.
    s.finish(
        agent,
        "issued-cut",
        json!({"scenario": "issued certificate generation cut short: its chain under the running agent (then a renewal), its key before a restart after kill -9; 20 msg/s"}),
    )
    .await;
}

/// The route memory of `transport = "auto"` (`route.json`), parsed; `None` when it is not valid
/// JSON (cut short).
fn route_memory(state: &std::path::Path) -> Option<serde_json::Value> {
    serde_json::from_slice(&std::fs::read(state.join("route.json")).ok()?).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_memory_cut_short_by_a_power_cut() {
    // 8883 closed, WebSockets open: the route memory says WebSockets, and each connection on
    // it writes the memory again (its day starts over).
    let id = "fault-route-cut";
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let agent_config = enrolled_agent(dir.path(), &running, id)
        .0
        .mqtt_port(closed)
        .extra(&format!(
            "transport = \"auto\"\nwebsocket_port = {}\n",
            running.https_addr.port()
        ));
    let mut s = Scenario::with_config(dir, running, id, agent_config);
    let state = s.dir.path().join("state");
    let agent = s.start();
    s.wait_telemetry(&agent, 10).await;
    assert_eq!(
        route_memory(&state).map(|m| m["websocket"].clone()),
        Some(json!(true))
    );
    let fallbacks = |agent: &AgentProcess| {
        agent
            .log_text()
            .matches("trying MQTT over WebSockets")
            .count()
    };
    assert_eq!(fallbacks(&agent), 1);

    // 1. Cut under the running agent: it holds the route in memory (it reads the file at start
    // only), so the hub dropping the connection costs no attempt on 8883. The file stays cut
    // (a connection on the remembered route has nothing new to write).
    cut_in_half(&state.join("route.json"));
    assert_eq!(route_memory(&state), None, "the cut left valid JSON");
    s.drop_and_recover(&agent, 1).await;
    assert_eq!(fallbacks(&agent), 1, "{}", agent.log_text());

    // 2. Then a power cut: the agent killed with the file cut, and cut shorter before the next
    // start. The new process says which file, tries 8883 first as with no memory, falls back to
    // WebSockets and remembers it again, whole.
    s.kill_9(agent).await;
    cut_in_half(&state.join("route.json"));
    let agent = s.start();
    let before = telemetry_count(s.sim(), id);
    s.wait_telemetry(&agent, before + 10).await;
    let log = agent.log_text();
    assert!(
        log.contains("route.json: not a valid state file"),
        "the log does not name route.json:\n{log}"
    );
    assert_eq!(fallbacks(&agent), 1, "{log}");
    assert_eq!(
        route_memory(&state).map(|m| m["websocket"].clone()),
        Some(json!(true))
    );
    s.finish(
        agent,
        "route-cut",
        json!({"scenario": "route memory (transport = auto, 8883 closed) cut short: under the running agent (then a dropped connection), and before a restart after kill -9; 20 msg/s"}),
    )
    .await;
}

/// Runs `hubagent run` in a mount namespace of its own (`unshare -rm`, as
/// [`start_with_small_state_fs`]), its state directory first bound read-only onto itself when
/// `read_only`.
fn start_in_mount_namespace(s: &Scenario, read_only: bool) -> AgentProcess {
    let mut command = std::process::Command::new("unshare");
    command
        .args(["-rm", "sh", "-c"])
        .arg(r#"if [ "$1" = ro ]; then mount --bind -o ro "$2" "$2" || exit 1; fi; exec "$3" --config "$4" run"#)
        .arg("sh")
        .arg(if read_only { "ro" } else { "rw" })
        .arg(s.dir.path().join("state"))
        .arg(hubagent_bin())
        .arg(&s.config);
    AgentProcess::spawn(
        command,
        &s.config,
        "unshare (util-linux) runs the agent in its own mount namespace",
    )
}

/// Runs `command` (mount, umount) in the agent's mount namespace, entered through its user
/// namespace, which the test owns (nsenter, util-linux).
fn in_agent_mounts(agent: &AgentProcess, command: &[&std::ffi::OsStr]) {
    let status = std::process::Command::new("nsenter")
        .args(["-t", &agent.child.id().to_string(), "-U", "-m", "--"])
        .args(command)
        .status()
        .unwrap_or_else(|e| panic!("nsenter: {e}"));
    assert!(
        status.success(),
        "{command:?} in the agent's namespace: {status}"
    );
}

/// The state directory becomes read-only under the running agent: a read-only bind mount over
/// it. Files the agent has open stay writable (as they would not on a file system remounted
/// read-only after errors), so what shows is the next file it creates: the next segment.
fn state_read_only(agent: &AgentProcess, state: &std::path::Path) {
    let state = state.as_os_str();
    in_agent_mounts(
        agent,
        &[
            "mount".as_ref(),
            "--bind".as_ref(),
            "-o".as_ref(),
            "ro".as_ref(),
            state,
            state,
        ],
    );
}

/// Undoes [`state_read_only`] (lazily: the agent may have a segment open through that mount).
fn state_writable(agent: &AgentProcess, state: &std::path::Path) {
    in_agent_mounts(
        agent,
        &["umount".as_ref(), "-l".as_ref(), state.as_os_str()],
    );
}

/// How many lines of the agent's log contain `text`.
fn log_lines(agent: &AgentProcess, text: &str) -> usize {
    agent
        .log_text()
        .lines()
        .filter(|l| l.contains(text))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_dir_read_only() {
    let id = "fault-readonly";
    // 4 KiB segments: the one being written rolls within a second, and the next cannot be made.
    let mut s = Scenario::new(id, "[queue]\nmax_bytes = \"64KiB\"\n").await;
    let state = s.dir.path().join("state");
    // A first run leaves a cached assignment and, during an outage, a backlog.
    let agent = s.start();
    s.wait_telemetry(&agent, 10).await;
    begin_outage(s.sim(), id);
    agent
        .wait_status("no backlog during the outage", |st| {
            st["queue"]["depth"].as_u64() >= Some(20)
        })
        .await;
    s.acked.note_sensor(&agent, SENSOR).await;
    let log = agent.log_text();
    assert_eq!(agent.stop(), Some(0), "{log}");

    // Read-only at start: said, with the path; the backlog is sent, the sensor held back and
    // told nothing was queued.
    let agent = start_in_mount_namespace(&s, true);
    let path = state.display().to_string();
    agent
        .wait_log_line("no error naming the read-only state directory", |l| {
            l.contains("the state directory cannot be written")
                && l.contains(&path)
                && l.contains("Read-only file system")
        })
        .await;
    agent
        .wait_log_line("the sensor is not held back", |l| {
            l.contains("telemetry held back") && l.contains("Read-only file system")
        })
        .await;
    end_outage(s.sim());
    let sent = agent
        .wait_status(
            "the backlog was not sent from the read-only state dir",
            |st| st["queue"]["delivered"].as_u64() >= Some(20) && st["queue"]["depth"] == 0,
        )
        .await;
    assert_eq!(
        sent["queue"]["pushed"], 0,
        "queued on a read-only disk? {sent}"
    );
    assert!(sent["queue"]["held_back"].as_u64() >= Some(1), "{sent}");
    let (run, acknowledged) = sensor_acknowledged(&agent, SENSOR).await;
    assert_eq!(
        acknowledged, 0,
        "readings acknowledged that were not queued"
    );
    // Writable again: the held reading goes first, the rest follow.
    state_writable(&agent, &state);
    let arrived = |sim: &hubsim::Sim, run: &str| {
        runs(&numbered(sim, id, Some(SENSOR), "seq"))
            .get(run)
            .map_or(0, Vec::len)
    };
    assert!(
        s.sim()
            .wait_until(LONG_WAIT, |sim| arrived(sim, &run) >= 10)
            .await,
        "nothing after the state dir became writable:\n{}",
        agent.log_text()
    );

    // Read-only under the running agent, for a few seconds, then writable again.
    let held = log_lines(&agent, "telemetry held back: ");
    state_read_only(&agent, &state);
    let deadline = Instant::now() + LONG_WAIT;
    while log_lines(&agent, "telemetry held back: ") <= held {
        assert!(
            Instant::now() < deadline,
            "the sensor is not held back again:\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = agent.log_text();
    let last_held = log.lines().rfind(|l| l.contains("telemetry held back: "));
    assert!(
        last_held.is_some_and(|l| l.contains("Read-only file system")),
        "{log}"
    );
    let (_, while_held) = sensor_acknowledged(&agent, SENSOR).await;
    let held_since = Instant::now();
    s.sim().wait_until(Duration::from_secs(2), |_| false).await;
    let (_, still_held) = sensor_acknowledged(&agent, SENSOR).await;
    assert_eq!(
        while_held, still_held,
        "readings were acknowledged while the state dir was read-only"
    );
    state_writable(&agent, &state);
    let before = arrived(s.sim(), &run);
    assert!(
        s.sim()
            .wait_until(LONG_WAIT, |sim| arrived(sim, &run) >= before + 10)
            .await,
        "nothing after the state dir became writable again:\n{}",
        agent.log_text()
    );
    let held_seconds = held_since.elapsed().as_secs_f64();
    s.finish(
        agent,
        "state-dir-read-only",
        json!({
            "scenario": "state dir read-only at start (backlog queued), then writable, then read-only for 2 s under the running agent; 20 msg/s",
            "held_seconds": held_seconds,
        }),
    )
    .await;
}

/// Sets the soft open-file limit (RLIMIT_NOFILE) of process `pid` (prlimit, util-linux).
fn set_open_file_limit(pid: u32, soft: usize) {
    let status = std::process::Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--nofile={soft}:")])
        .status()
        .unwrap_or_else(|e| panic!("prlimit: {e}"));
    assert!(status.success(), "prlimit: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_open_file_limit_reached() {
    let id = "fault-fds";
    // An exec plugin beside the sensor, restarted quickly and never quarantined here: the one
    // killed while the agent is at its limit cannot be started again until the limit is raised.
    let ticker = r#"i=0; while :; do i=$((i+1)); echo "{\"body\":{\"n\":$i},\"properties\":{\"run\":\"$$\"}}"; sleep 0.05; done"#;
    let extra = format!(
        "[queue]\nmax_bytes = \"64KiB\"\n\n[[plugin]]\nname = \"ticker\"\nkind = \"exec\"\ncommand = [\"/bin/sh\", \"-c\", {ticker:?}]\nrestart_backoff = \"200ms\"\nrestart_backoff_max = \"1s\"\nquarantine_after = 1000\n\n"
    );
    // 4 KiB segments: the queue needs a new file within a second.
    let mut s = Scenario::new(id, &extra).await;
    let mut agent = s.start();
    s.wait_telemetry(&agent, 10).await;
    let ticks = |sim: &hubsim::Sim| numbered(sim, id, Some("ticker"), "n");
    assert!(
        s.sim()
            .wait_until(LONG_WAIT, |sim| !ticks(sim).is_empty())
            .await,
        "the ticker plugin published nothing:\n{}",
        agent.log_text()
    );
    let ticker_pid = agent.plugins_list()["ticker"]["pid"].as_i64().unwrap() as i32;
    let pid = agent.child.id();
    // No new descriptor at all (0, 1 and 2 are taken): what it has open goes on working.
    set_open_file_limit(pid, 3);
    let connects = hub_connects(s.sim(), id);
    s.drop_connection();
    // The queue cannot open its next segment: the sensor is held back, the log names the limit;
    // the hub cannot be reached again, said with the limit too.
    agent
        .wait_log_line("no held-back reading naming the open-file limit", |l| {
            l.contains("telemetry held back") && l.contains("RLIMIT_NOFILE = 3")
        })
        .await;
    agent
        .wait_log_line("no failed reconnection naming the open-file limit", |l| {
            l.contains("hub connection lost") && l.contains("RLIMIT_NOFILE = 3")
        })
        .await;
    // A control connection the agent cannot accept must not make it spin.
    let _waiting =
        std::os::unix::net::UnixStream::connect(s.dir.path().join("control.sock")).unwrap();
    agent
        .wait_log("the control socket cannot take a connection")
        .await;
    // A plugin process that ends at the limit cannot be started again: its failure names it.
    let runs_before: std::collections::BTreeSet<String> =
        ticks(s.sim()).into_iter().map(|t| t.run).collect();
    // SAFETY: kill(2) with a pid the agent reported for its plugin, still running.
    assert_eq!(unsafe { libc::kill(ticker_pid, libc::SIGKILL) }, 0);
    agent
        .wait_log_line("no plugin start failure naming the open-file limit", |l| {
            l.contains("cannot start the plugin process") && l.contains("RLIMIT_NOFILE = 3")
        })
        .await;
    let cpu = cpu_seconds(pid);
    let since = Instant::now();
    s.sim().wait_until(Duration::from_secs(3), |_| false).await;
    let cpu_percent = 100.0 * (cpu_seconds(pid) - cpu) / since.elapsed().as_secs_f64();
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "the agent exited at its open-file limit:\n{}",
        agent.log_text()
    );
    // A correctness bound against a retry loop, not a speed figure.
    assert!(
        cpu_percent < 25.0,
        "{cpu_percent:.1} % of a core at the open-file limit:\n{}",
        agent.log_text()
    );
    // The limit raised again: it connects, the sensor goes on, the control socket answers.
    set_open_file_limit(pid, 1024);
    assert!(
        s.sim()
            .wait_until(LONG_WAIT, |sim| hub_connects(sim, id) > connects)
            .await,
        "no hub connection after the limit was raised:\n{}",
        agent.log_text()
    );
    let before = max_seq(s.sim(), id);
    assert!(
        s.sim()
            .wait_until(LONG_WAIT, |sim| max_seq(sim, id) > before + 5)
            .await,
        "no readings after the limit was raised:\n{}",
        agent.log_text()
    );
    // The plugin is started again and publishes from its new run.
    assert!(
        s.sim()
            .wait_until(LONG_WAIT, |sim| ticks(sim)
                .iter()
                .any(|t| !runs_before.contains(&t.run)))
            .await,
        "the ticker plugin did not come back after the limit was raised:\n{}",
        agent.log_text()
    );
    s.finish(
        agent,
        "open-file-limit",
        json!({
            "scenario": "open-file limit lowered under what the agent had open (no new descriptor), hub connection dropped, a control connection waiting, a plugin process killed; then raised; 20 msg/s",
            "cpu_at_limit_percent": cpu_percent,
        }),
    )
    .await;
}
