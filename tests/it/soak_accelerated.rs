//! The soak in accelerated time (issue #21): what runs on a clock rather than per event. hubsim
//! in its own process and the agent (with the built-in sensor and the library plugin, whose
//! process the agent starts with a clean environment: on the real clock) both run
//! under libfaketime at one speed factor (`FAKETIME="+0 xFACTOR"`), sharing one time base, for
//! many hours of their clock: 1 h SAS tokens renewed on their own schedule, the twin's reports,
//! the queue's timers, whatever else waits on tokio's timers. It asserts what the soak asserts
//! (nothing grows after the first hour, nothing a producer was told was queued is lost) and that
//! the agent renewed its token about once per clock hour. Every clock hour after the first, the
//! events of the event soak that the clock does not change: the hub connection dropped, the
//! library plugin's process killed with SIGKILL and a reload; once per run, a hub outage longer than the
//! queue's `max_age`, after which what is missing must be exactly what the agent counted as
//! expired. A variant authenticates with a certificate DPS issues for one clock hour, and checks
//! that it was renewed on its schedule (at `renew_at`), never refused at the hub for its age.
//!
//! Ignored (minutes of real time); one command in docs/reliability.md:
//! `HUBAGENT_TIMESOAK_HOURS` (clock hours, default 24) at `HUBAGENT_TIMESOAK_FACTOR` (default 60).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hubagent_tests::resources::{self, Sampler};
use hubagent_tests::*;
use serde_json::{Value, json};

use super::{RESOURCES, date_utc, library_acknowledged};

/// The agent and its library plugin's process (the sensor is built in).
const PROCESSES: u64 = 2;

/// The queue's `max_age`, in clock hours (the configuration says "2h").
const MAX_AGE_HOURS: f64 = 2.0;

/// The hub outage, in clock hours: longer than `max_age` by half an hour, so the readings of
/// its first half hour expire before the hub is back.
const OUTAGE_HOURS: f64 = 2.5;

/// The outage begins at the start of this cycle (after a first quiet hour) and takes the cycles
/// its length covers; the run needs a few quiet hours after it.
const OUTAGE_CYCLE: u32 = 1;
const OUTAGE_MIN_HOURS: f64 = 6.0;

/// The issued certificate's lifetime (clock seconds) and the agent's default renewal fraction.
const ISSUED_VALIDITY_SECONDS: u64 = 3600;
const RENEW_AT: f64 = 0.8;

/// The hub session takes up to `[hub] inflight` (default 32) messages ahead, plus the one the
/// pump waits to hand over; those are still sent when they expire in the queue, and counted.
const INFLIGHT: u64 = 32 + 1;

/// What the run authenticates with, and so what it exercises beyond the common part.
#[derive(Clone, Copy, PartialEq)]
enum Credential {
    /// SAS tokens (1 h, renewed on their schedule), and the hub outage longer than `max_age`.
    Sas,
    /// A certificate DPS issues for an hour of clock (`[provisioning.issued_certificate]`),
    /// renewed at `renew_at` by the clock alone. No outage: one longer than the certificate's
    /// life would end with a refusal at the hub, which this variant counts as a missed renewal.
    IssuedCertificate,
}

fn env_number(name: &str, default: f64) -> f64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|e| panic!("{name}={v:?}: not a number: {e}")),
        Err(_) => default,
    }
}

/// `hubsim serve` under `faketime` (Debian's `faketime` package). The wrapper creates the
/// shared memory that holds libfaketime's start time and names it in `FAKETIME_SHARED`; the
/// agent gets the same name, so both read one clock. (Two processes that each start their own
/// accelerated clock disagree by the factor times the real time between their starts: minutes
/// at x60.)
struct HubsimProcess {
    wrapper: Child,
    pid: u32,
    shared: String,
    mqtt_port: u16,
    https: String,
    http: ureq::Agent,
    auth: String,
}

impl HubsimProcess {
    fn start(state: &Path, factor: f64) -> HubsimProcess {
        let launched = state.join("launched");
        let endpoints = state.join("endpoints.json");
        let _ = std::fs::remove_file(&endpoints);
        // The shell notes its pid (hubsim's, after exec) and the shared memory's name.
        let script = format!(
            "echo \"$$ $FAKETIME_SHARED\" > '{}.tmp' && mv '{0}.tmp' '{0}' && exec \"$0\" \"$@\"",
            launched.display()
        );
        let wrapper = Command::new("faketime")
            .args(["-f", &format!("+0 x{factor}"), "sh", "-c", &script])
            .arg(hubsim_bin())
            .args(["serve", "--state-dir"])
            .arg(state)
            .args(["--mqtt-port", "0", "--https-port", "0"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(state.with_extension("log")).unwrap())
            .spawn()
            .expect("faketime runs (install Debian's faketime package: tests/setup.sh)");
        let deadline = Instant::now() + LONG_WAIT;
        let (endpoints, launched) = loop {
            if let (Ok(e), Ok(l)) = (
                std::fs::read_to_string(&endpoints),
                std::fs::read_to_string(&launched),
            ) {
                break (serde_json::from_str::<Value>(&e).unwrap(), l);
            }
            assert!(
                Instant::now() < deadline,
                "hubsim under faketime wrote no endpoints.json"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let (pid, shared) = launched.trim().split_once(' ').unwrap();
        assert!(
            shared.starts_with("/faketime_sem_"),
            "faketime set no FAKETIME_SHARED: {launched:?}"
        );
        let strings = std::fs::read_to_string(state.join("connection-strings.txt")).unwrap();
        let hub = strings.lines().find(|l| l.contains("iothubowner")).unwrap();
        let field = |name: &str| {
            hub.split(';')
                .find_map(|p| p.strip_prefix(name))
                .unwrap()
                .to_string()
        };
        // Valid for years of the accelerated clock.
        let auth = sas_token(
            &field("SharedAccessKey="),
            &field("HostName="),
            hubsim::auth::unix_now() + 20 * 365 * 86400,
            Some(&field("SharedAccessKeyName=")),
        );
        let mqtt = endpoints["mqtt"].as_str().unwrap();
        HubsimProcess {
            wrapper,
            pid: pid.parse().unwrap(),
            shared: shared.to_string(),
            mqtt_port: mqtt.rsplit_once(':').unwrap().1.parse().unwrap(),
            https: format!("https://{}", endpoints["https"].as_str().unwrap()),
            http: https_agent(&std::fs::read_to_string(state.join("ca.pem")).unwrap()),
            auth,
        }
    }

    fn get(&self, path: &str) -> Value {
        let mut answer = self
            .http
            .get(format!("{}{path}", self.https))
            .header("Authorization", &self.auth)
            .call()
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert_eq!(answer.status(), 200, "GET {path}");
        answer.body_mut().read_json().unwrap()
    }

    /// A management POST (hubsim's fault injection); answers with the status.
    fn post(&self, path: &str, body: Value) -> u16 {
        let answer = self
            .http
            .post(format!("{}{path}", self.https))
            .header("Authorization", &self.auth)
            .send_json(body)
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        answer.status().as_u16()
    }

    /// Drops `device`'s live connections; how many there were.
    fn drop_connection(&self, device: &str) -> u64 {
        let mut answer = self
            .http
            .post(format!("{}/sim/faults/drop/{device}", self.https))
            .header("Authorization", &self.auth)
            .send_empty()
            .unwrap_or_else(|e| panic!("POST /sim/faults/drop/{device}: {e}"));
        assert_eq!(answer.status(), 200, "POST /sim/faults/drop/{device}");
        let body: Value = answer.body_mut().read_json().unwrap();
        body["dropped"]
            .as_u64()
            .unwrap_or_else(|| panic!("drop answered {body}"))
    }

    /// Clears every fault (ends an outage).
    fn clear_faults(&self) {
        let answer = self
            .http
            .delete(format!("{}/sim/faults", self.https))
            .header("Authorization", &self.auth)
            .call()
            .unwrap_or_else(|e| panic!("DELETE /sim/faults: {e}"));
        assert_eq!(answer.status(), 204, "DELETE /sim/faults");
    }

    /// How many times `device` connected to the hub.
    fn hub_connects(&self, device: &str) -> usize {
        self.connection_events(device, "connected")
    }

    fn connection_events(&self, device: &str, event: &str) -> usize {
        self.get("/sim/connections")
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["service"] == "hub" && c["event"] == event && c["clientId"] == device)
            .count()
    }

    /// Every numbered message of `device` from `source`, read from `/sim/telemetry`.
    fn numbered(&self, device: &str, source: &str, key: &str) -> Vec<Numbered> {
        let records = self.get(&format!("/sim/telemetry/{device}"));
        records
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["properties"]["source"] == source)
            .map(|r| {
                let body: Value =
                    serde_json::from_str(r["body"].as_str().unwrap_or("")).unwrap_or_default();
                match (r["properties"]["run"].as_str(), body[key].as_u64()) {
                    (Some(run), Some(n)) => Numbered {
                        run: run.to_string(),
                        n,
                        message_id: r["systemProperties"]["message-id"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                    },
                    _ => panic!("a message without a run and a number {key:?}: {r}"),
                }
            })
            .collect()
    }

    /// SIGTERM to hubsim; the wrapper then exits (removing its shared memory).
    fn stop(mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -TERM hubsim");
        let status = self.wrapper.wait().unwrap();
        assert!(status.success(), "hubsim under faketime: {status}");
    }
}

/// A test that failed half-way does not leave hubsim running (best effort: it already failed).
impl Drop for HubsimProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.wrapper.try_wait() {
            let _ = Command::new("kill")
                .args(["-KILL", &self.pid.to_string()])
                .status();
            let _ = self.wrapper.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes to hours: run it alone (docs/reliability.md)"]
async fn soak_in_accelerated_time() {
    soak_accelerated("soak-accelerated", Credential::Sas).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes to hours: run it alone (docs/reliability.md)"]
async fn soak_in_accelerated_time_with_an_issued_certificate() {
    soak_accelerated("soak-accelerated-issued", Credential::IssuedCertificate).await;
}

/// The agent's configuration on a fresh enrollment, written by an in-process hubsim on the state
/// directory, which the hubsim process then serves: no management call has to outlive the
/// accelerated clock. With an issued certificate, the enrollment's registrations get one from a
/// hubsim CA, valid for [`ISSUED_VALIDITY_SECONDS`] of clock.
async fn enrolled(dir: &Path, device: &str, credential: Credential) -> AgentConfig {
    let running = start_sim(dir).await;
    let config = match credential {
        Credential::Sas => enrolled_agent(dir, &running, device).0,
        Credential::IssuedCertificate => issuing_agent(
            dir,
            &running,
            device,
            ISSUED_VALIDITY_SECONDS,
            &format!("renew_at = {RENEW_AT}\n"),
        ),
    };
    running.shutdown();
    config
}

/// What the hourly events did, for the figures.
#[derive(Default)]
struct Events {
    drops: u64,
    library_kills: u64,
    reloads: u64,
    outages: u64,
}

/// The event soak's events that the clock does not change: the hub connection dropped (then the
/// agent's next connection awaited), the library plugin's process killed with SIGKILL (then
/// its successor awaited) and a reload (SIGHUP).
async fn drop_and_kill(
    sim: &HubsimProcess,
    agent: &AgentProcess,
    device: &str,
    events: &mut Events,
) {
    let connects = sim.hub_connects(device);
    // None when the connection was between a token's end and the next one: nothing to await.
    if sim.drop_connection(device) > 0 {
        events.drops += 1;
        let deadline = Instant::now() + LONG_WAIT;
        while sim.hub_connects(device) <= connects {
            assert!(
                Instant::now() < deadline,
                "no reconnection after a drop\n{}",
                agent.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let library_pid = agent.plugins_list()["library"]["pid"].as_u64().unwrap();
    let status = Command::new("kill")
        .args(["-KILL", &library_pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -9 of the library plugin's process");
    events.library_kills += 1;
    // A reload with the same configuration (SIGHUP): the session and the plugins stay.
    let reloads = agent.status()["reloads"].as_u64().unwrap_or(0);
    agent.signal("HUP");
    agent
        .wait_status("reloaded", |st| st["reloads"].as_u64() == Some(reloads + 1))
        .await;
    events.reloads += 1;
    agent
        .wait_plugins("the library plugin back after kill -9", |l| {
            l["library"]["pid"].as_u64() != Some(library_pid) && l["library"]["status"] == "running"
        })
        .await;
}

async fn soak_accelerated(name: &str, credential: Credential) {
    let hours = env_number("HUBAGENT_TIMESOAK_HOURS", 24.0);
    let factor = env_number("HUBAGENT_TIMESOAK_FACTOR", 60.0);
    let device = format!("gw-{name}");
    let device = device.as_str();
    let clock_hour = Duration::from_secs_f64(3600.0 / factor);
    let outage = credential == Credential::Sas;
    assert!(
        !outage || hours >= OUTAGE_MIN_HOURS,
        "HUBAGENT_TIMESOAK_HOURS={hours}: the run with the outage needs at least {OUTAGE_MIN_HOURS}"
    );

    let dir = tempfile::tempdir().unwrap();
    let config = enrolled(dir.path(), device, credential).await;
    let sim = HubsimProcess::start(&dir.path().join("hubsim"), factor);

    let library = install_plugin(dir.path(), &built_library("hubagent_test_misbehave"), 0o644);
    let records = dir.path().join("records");
    std::fs::create_dir(&records).unwrap();
    let lib_record = records.join("library.record");
    // Default renewal (of 1 h SAS tokens or issued certificates); messages expire after 2 clock
    // hours in the queue, whose segments are a 16th of it (16 KiB): they roll every hour or so,
    // so that the segment being written (kept until it rolls) does not grow through the run.
    let plugins = format!(
        r#"
[queue]
max_age = "{MAX_AGE_HOURS}h"
max_bytes = "256KiB"

[[plugin]]
name = "library"
kind = "library"
path = "{library}"
allow_write = ["{records}"]
[plugin.settings]
interval = "10s"
record = "{lib_record}"
"#,
        library = library.display(),
        records = records.display(),
        lib_record = lib_record.display(),
    );
    let config = config
        .mqtt_port(sim.mqtt_port)
        .allow_unsafe_plugin_paths(true)
        .extra(&builtin_sensor("10s"))
        .extra(&plugins)
        .write();

    let mut command = Command::new(hubagent_bin());
    command
        .args(["--config", config.to_str().unwrap(), "run"])
        .env("LD_PRELOAD", libfaketime())
        .env("FAKETIME", format!("+0 x{factor}"))
        .env("FAKETIME_SHARED", &sim.shared);
    let agent = AgentProcess::spawn(command, &config, "hubagent under libfaketime");
    agent
        .wait_status("connected", |s| s["connection"] == "connected")
        .await;

    let messages = || {
        [
            sim.numbered(device, "sensor", "seq"),
            sim.numbered(device, "library", "n"),
        ]
        .concat()
    };
    let state_dir = dir.path().join("state");
    let sampler = Sampler::start(agent.child.id(), &state_dir, clock_hour / 20);
    let started = Instant::now();
    let mut events = Events::default();
    let mut expired_in_outage = 0;
    let mut hour = 0;
    let mut cycle = 0;
    // One cycle per clock hour, ending with a quiet sample: connected, the queue drained. The
    // outage is one cycle of the hours it covers (the growth check compares cycles, and the
    // outage's have no quiet sample), in the first third, with the warm-up.
    while (hour as f64) < hours {
        sampler.set_cycle(cycle);
        cycle += 1;
        if hour > 0 {
            drop_and_kill(&sim, &agent, device, &mut events).await;
        }
        let mut cycles = 1;
        if outage && hour == OUTAGE_CYCLE {
            // Refused until cleared (the refusal's own end is twice as far: never reached).
            let refuse = (OUTAGE_HOURS * 2.0 * 3600.0) as u64;
            assert_eq!(
                sim.post("/sim/faults", json!({"refuseConnectionsSeconds": refuse})),
                204,
                "POST /sim/faults"
            );
            events.outages += 1;
            // The outage's length in real time, not a wait for a condition.
            let end = started + clock_hour.mul_f64(hour as f64 + OUTAGE_HOURS);
            tokio::time::sleep(end.saturating_duration_since(Instant::now())).await;
            let status = agent.status();
            expired_in_outage = status["queue"]["dropped_expired"].as_u64().unwrap_or(0);
            assert!(
                expired_in_outage > 0,
                "no message expired in an outage of {OUTAGE_HOURS} clock hours with max_age \
                 {MAX_AGE_HOURS} h: {status}"
            );
            sim.clear_faults();
            cycles = OUTAGE_HOURS.ceil() as u32;
        }
        // The run's length in real time, not a wait for a condition.
        let end = started + clock_hour * (hour + cycles);
        tokio::time::sleep(end.saturating_duration_since(Instant::now())).await;
        agent
            .wait_status("connected, at most 10 messages queued", |s| {
                s["connection"] == "connected" && s["queue_depth"].as_u64() <= Some(10)
            })
            .await;
        sampler.quiet();
        hour += cycles;
    }
    let samples = sampler.finish();
    let real = started.elapsed();

    let mut acked = Acknowledged::new();
    acked.note_sensor(&agent, "sensor").await;
    for (run, n) in library_acknowledged(&lib_record) {
        acked.note(&run, n);
    }
    // Every message acknowledged above is now delivered or expired: hubsim records a message
    // before its PUBACK, so once the queue was empty, the records read after hold every message
    // not dropped. (drain() would call the expired ones lost.)
    let drained = if expired_in_outage == 0 {
        drain(&agent, &acked, messages, LONG_WAIT).await
    } else {
        agent
            .wait_status("the queue empty", |s| s["queue_depth"].as_u64() == Some(0))
            .await;
        Ok(())
    };
    let status = agent.status();
    let list = agent.plugins_list();
    let log = agent.log_text();
    assert_eq!(agent.stop(), Some(0), "the agent stops cleanly");
    let delivery = Delivery::of(&acked, &messages());
    let twin = sim.get(&format!("/twins/{device}"));
    let connections = sim.get("/sim/connections");
    sim.stop();

    let sas_renewals = log.matches("renewing the hub SAS token").count();
    let certificate_renewals = log
        .matches("renewing the issued certificate through DPS")
        .count();
    let hub_events = |event: &str| -> Vec<&Value> {
        connections
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["service"] == "hub" && c["event"] == event)
            .collect()
    };
    let hub_connections = hub_events("connected").len();
    // Refusals the outage did not cause: an expired token or certificate, for one.
    let refused: Vec<&Value> = hub_events("refused")
        .into_iter()
        .filter(|c| c["reason"] != "fault: refusing connections")
        .collect();
    let generation = status["issued_generation"].as_u64();
    let reported_version = twin["properties"]["reported"]["$version"].as_u64();
    let expired = status["queue"]["dropped_expired"].as_u64().unwrap_or(0);
    let verdicts = resources::growth(&samples, 1, PROCESSES, &RESOURCES);
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/soak");
    std::fs::create_dir_all(&out).unwrap();
    let csv_path = out.join(format!("{name}-samples.csv"));
    std::fs::write(&csv_path, resources::csv(&samples)).unwrap();
    let mut figures = json!({
        "scenario": format!("soak in accelerated time: x{factor}, {hours} clock hours"),
        "date": date_utc(),
        "factor": factor,
        "clock_hours": hour,
        "cycles": cycle,
        "real_seconds": real.as_secs_f64().round(),
        "samples": samples.len(),
        "drops": events.drops,
        "library_kills": events.library_kills,
        "reloads": events.reloads,
        "outages": events.outages,
        "sas_renewals": sas_renewals,
        "certificate_renewals": certificate_renewals,
        "issued_generation": generation,
        "hub_connections": hub_connections,
        "hub_refusals_not_by_the_outage": refused.len(),
        "reported_version": reported_version,
        "queue": status["queue"].clone(),
        "delivery": delivery.figures(),
    });
    if let Ok(verdicts) = &verdicts {
        figures["resources"] = verdicts
            .iter()
            .map(|v| (v.name.to_string(), v.figures()))
            .collect::<serde_json::Map<String, Value>>()
            .into();
    }
    std::fs::write(
        out.join(format!("{name}.json")),
        serde_json::to_vec_pretty(&figures).unwrap(),
    )
    .unwrap();
    println!("{}", serde_json::to_string_pretty(&figures).unwrap());

    drained.unwrap_or_else(|e| panic!("{name}: {e}"));
    // Every acknowledged message arrived but for those the queue dropped: exactly as many as
    // it says it never delivered.
    assert!(
        delivery.unaccounted.is_empty() && delivery.reissued.is_empty(),
        "{name}: {}",
        delivery.problems().unwrap_or_default()
    );
    let counter = |key: &str| status["queue"][key].as_u64().unwrap_or(0);
    let undelivered = counter("pushed") - counter("delivered") - counter("depth");
    assert_eq!(
        delivery.lost.len() as u64,
        undelivered,
        "{name}: missing vs the queue's pushed - delivered - depth: {status}; {}",
        delivery.problems().unwrap_or_default()
    );
    // And all of those expired: `dropped_expired` counts them, plus the ones the hub session had
    // already taken (up to `[hub] inflight`, docs/queue.md), which still go out.
    let lost = delivery.lost.len() as u64;
    assert!(
        lost <= expired && expired <= lost + INFLIGHT,
        "{name}: {lost} messages missing, {expired} counted in dropped_expired; {}",
        delivery.problems().unwrap_or_default()
    );
    if outage {
        assert!(expired > 0, "{name}: the outage expired nothing: {status}");
    }
    assert_eq!(list["library"]["dropped"], 0, "{}", list["library"]);
    assert_eq!(status["queue"]["dropped_full"], 0, "{status}");
    assert!(
        refused.is_empty(),
        "{name}: the hub refused the agent's credential: {refused:?}"
    );
    match credential {
        // A 1 h token renewed before it expires: at least one renewal per clock hour after the
        // first, but for the cycles of the outage (no session) and the one after it (a fresh
        // token at the reconnection, then the next drop before it is due).
        Credential::Sas => {
            let expected = hours - 1.0 - OUTAGE_HOURS.ceil();
            assert!(
                sas_renewals as f64 >= expected,
                "{sas_renewals} SAS renewals in {hours} clock hours (at least {expected} expected)"
            )
        }
        // A certificate valid for an hour, renewed at 0.8 of it: a renewal every 48 minutes of
        // clock (less the minute its validity starts early); one fewer for the last one's margin.
        Credential::IssuedCertificate => {
            let expected = (hours / RENEW_AT).floor() - 1.0;
            let renewed = generation.unwrap_or(0).saturating_sub(1);
            assert!(
                renewed as f64 >= expected && certificate_renewals as f64 >= expected,
                "{name}: issued generation {generation:?} and {certificate_renewals} renewals \
                 logged in {hours} clock hours (at least {expected} renewals expected)"
            );
        }
    }
    // The twin report's counters go out at least once a clock minute (docs/plugins.md); half
    // of that leaves room for the minutes around reconnections.
    let reported = reported_version.unwrap_or(0);
    assert!(
        reported as f64 >= hours * 60.0 / 2.0,
        "reported properties at $version {reported} after {hours} clock hours"
    );
    resources::assert_none_grew(name, verdicts, "after the first hour", &csv_path);
}
