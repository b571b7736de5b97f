//! Plugins with the real `hubagent` binary against hubsim: misbehaving plugins (segfault, panic,
//! hang, frozen process, flood, memory hog, failing worker) are restarted and quarantined without
//! disturbing the others or the hub session; desired properties reach running plugins and are
//! acknowledged (or their rejection reported with its reason); the C and Python examples and the
//! shipped Rust plugins publish to hubsim; untrusted paths and foreign ABIs are refused; the daemon
//! starts the plugin host executable of its own build, even after the file was replaced, and
//! names a missing one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hubagent_tests::*;
use serde_json::{Value, json};

fn misbehave(dir: &Path) -> PathBuf {
    install_plugin(dir, &built_library("hubagent_test_misbehave"), 0o644)
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

async fn wait_reported(
    sim: &hubsim::Sim,
    device: &str,
    name: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
    agent: &AgentProcess,
) -> Value {
    let ok = sim
        .wait_until(LONG_WAIT, |s| pred(&reported_plugin(s, device, name)))
        .await;
    let got = reported_plugin(sim, device, name);
    assert!(
        ok,
        "{name}: {what} not reported; reported: {got}\n--- agent log ---\n{}",
        agent.log_text()
    );
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_plugins_are_contained_restarted_and_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let sim = running.sim.clone();
    let lib = misbehave(dir.path());
    let lib = lib.display();
    // Fast backoff; quarantined after 3 failures within a minute, retried only after an hour.
    let fast = "restart_backoff = \"100ms\"\nquarantine_after = 3\nquarantine_window = \"1m\"\nquarantine_retry = \"1h\"\ncallback_timeout = \"1s\"";
    let plugins = format!(
        r#"
[[plugin]]
name = "good"
kind = "library"
path = "{lib}"
[plugin.settings]
tag = "good"
interval = "100ms"

[[plugin]]
name = "crasher"
kind = "library"
path = "{lib}"
{fast}
[plugin.settings]
mode = "segfault"

[[plugin]]
name = "panicker"
kind = "library"
path = "{lib}"
{fast}
[plugin.settings]
mode = "panic"

[[plugin]]
name = "hanger"
kind = "library"
path = "{lib}"
{fast}
[plugin.settings]
mode = "hang"

[[plugin]]
name = "freezer"
kind = "library"
path = "{lib}"
{fast}
[plugin.settings]
mode = "freeze"

[[plugin]]
name = "worker-panic"
kind = "library"
path = "{lib}"
{fast}
[plugin.settings]
mode = "worker-panic"

[[plugin]]
name = "hog"
kind = "library"
path = "{lib}"
memory_limit = "128MiB"
{fast}
[plugin.settings]
mode = "hog"

[[plugin]]
name = "flooder"
kind = "library"
path = "{lib}"
max_rate = 5
burst = 5
[plugin.settings]
mode = "flood"
"#
    );
    let device = "gw-plugins-1";
    let config = plugin_agent_config(dir.path(), &running, device, &plugins, true);
    let agent = AgentProcess::start(&config);
    let started = std::time::Instant::now();

    let crasher = wait_reported(
        &sim,
        device,
        "crasher",
        "quarantine",
        |v| v["status"] == "quarantined",
        &agent,
    )
    .await;
    assert!(crasher["restarts"].as_u64().unwrap() >= 2, "{crasher}");
    assert!(
        crasher["error"].as_str().unwrap().contains("SIGSEGV"),
        "{crasher}"
    );
    let panicker = wait_reported(
        &sim,
        device,
        "panicker",
        "quarantine",
        |v| v["status"] == "quarantined",
        &agent,
    )
    .await;
    assert!(
        panicker["error"].as_str().unwrap().contains("panicked"),
        "{panicker}"
    );
    let hanger = wait_reported(
        &sim,
        device,
        "hanger",
        "quarantine",
        |v| v["status"] == "quarantined",
        &agent,
    )
    .await;
    assert!(
        hanger["error"].as_str().unwrap().contains("hung: start"),
        "{hanger}"
    );
    let freezer = wait_reported(
        &sim,
        device,
        "freezer",
        "quarantine",
        |v| v["status"] == "quarantined",
        &agent,
    )
    .await;
    assert!(
        freezer["error"].as_str().unwrap().contains("liveness ping"),
        "{freezer}"
    );
    let worker = wait_reported(
        &sim,
        device,
        "worker-panic",
        "quarantine",
        |v| v["status"] == "quarantined",
        &agent,
    )
    .await;
    assert!(
        worker["error"]
            .as_str()
            .unwrap()
            .contains("worker 'misbehave' panicked"),
        "{worker}"
    );
    let hog = wait_reported(
        &sim,
        device,
        "hog",
        "quarantine",
        |v| v["status"] == "quarantined",
        &agent,
    )
    .await;
    // Its end names the limit it reached (Rust aborts on a failed allocation, after saying so).
    let hog_error = hog["error"].as_str().unwrap();
    assert!(hog_error.contains("SIGABRT"), "{hog}");
    assert!(
        hog_error.contains("it reached its memory_limit of 128 MiB"),
        "{hog}"
    );

    // Meanwhile the good plugin kept publishing, on the one hub session.
    let before = bodies_from(&sim, device, "good").len();
    assert!(
        sim.wait_until(LONG_WAIT, |s| bodies_from(s, device, "good").len()
            >= before + 5)
            .await,
        "{}",
        agent.log_text()
    );
    assert_eq!(
        hub_connects(&sim, device),
        1,
        "the hub session was never interrupted"
    );
    let good = reported_plugin(&sim, device, "good");
    assert_eq!(good["status"], "running", "{good}");
    assert_eq!(good["restarts"], 0, "{good}");

    // The flooder is capped at 5 messages a second (plus a burst of 5); the rest is dropped and
    // counted.
    let list = agent.cli(&["plugins", "list", "--json"]);
    assert!(list.status.success(), "{list:?}");
    let list: Value = serde_json::from_slice(&list.stdout).unwrap();
    let flooder = &list["flooder"];
    assert_eq!(flooder["status"], "running", "{flooder}");
    assert!(flooder["dropped"].as_u64().unwrap() > 100, "{flooder}");
    let elapsed = started.elapsed().as_secs_f64();
    let published = flooder["published"].as_u64().unwrap() as f64;
    assert!(
        published <= 5.0 + 5.0 * elapsed + 1.0,
        "published {published} in {elapsed}s"
    );
    assert!(published >= 5.0, "{flooder}");
    assert_eq!(list["crasher"]["status"], "quarantined");
    assert_eq!(list["crasher"]["abi"], "1.3");

    assert_eq!(agent.status()["connection"], "connected");
    assert_eq!(agent.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desired_settings_reach_a_running_plugin_and_rejections_keep_the_old_ones() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let sim = running.sim.clone();
    let lib = misbehave(dir.path());
    let plugins = format!(
        "[[plugin]]\nname = \"tuned\"\nkind = \"library\"\npath = \"{}\"\n[plugin.settings]\ntag = \"v1\"\ninterval = \"100ms\"\n",
        lib.display()
    );
    let device = "gw-plugins-2";
    let config = plugin_agent_config(dir.path(), &running, device, &plugins, true);
    let agent = AgentProcess::start(&config);
    let tagged = |s: &hubsim::Sim, tag: &str| {
        bodies_from(s, device, "tuned")
            .iter()
            .filter(|b| b["tag"] == tag)
            .count()
    };
    assert!(
        sim.wait_until(LONG_WAIT, |s| tagged(s, "v1") >= 2).await,
        "{}",
        agent.log_text()
    );
    let key = device_key(&sim, device);

    // A desired change reaches the running plugin (same process: no restart) and is acknowledged.
    let v2 = hubsim::twin::apply_desired_patch(
        &sim,
        &key,
        &json!({"plugins": {"tuned": {"tag": "v2"}}}),
    )
    .unwrap();
    let r = wait_reported(
        &sim,
        device,
        "tuned",
        "v2 applied",
        |v| v["desiredVersion"] == v2 && v["status"] == "running",
        &agent,
    )
    .await;
    assert_eq!(r["settings"]["tag"], "v2", "{r}");
    assert_eq!(r["restarts"], 0, "{r}");
    assert!(sim.wait_until(LONG_WAIT, |s| tagged(s, "v2") >= 2).await);

    // A setting the plugin refuses: the reason is reported and the old settings stay.
    let v3 = hubsim::twin::apply_desired_patch(
        &sim,
        &key,
        &json!({"plugins": {"tuned": {"tag": "v3", "reject": "tag v3 is reserved"}}}),
    )
    .unwrap();
    let r = wait_reported(
        &sim,
        device,
        "tuned",
        "the rejection",
        |v| v["desiredVersion"] == v3 && v["rejectedSettings"].is_string(),
        &agent,
    )
    .await;
    // It runs on its old settings: running, the refusal beside it.
    assert_eq!(r["status"], "running", "{r}");
    assert_eq!(r["rejectedSettings"], "tag v3 is reserved", "{r}");
    assert_eq!(r["settings"]["tag"], "v2", "{r}");
    let v2_count = tagged(&sim, "v2");
    assert!(
        sim.wait_until(LONG_WAIT, |s| tagged(s, "v2") >= v2_count + 3)
            .await
    );
    assert_eq!(tagged(&sim, "v3"), 0, "rejected settings never took effect");

    // Removing the offending key (null) makes the next settings acceptable again.
    let v4 = hubsim::twin::apply_desired_patch(
        &sim,
        &key,
        &json!({"plugins": {"tuned": {"tag": "v4", "reject": null}}}),
    )
    .unwrap();
    let r = wait_reported(
        &sim,
        device,
        "tuned",
        "v4 applied",
        |v| v["desiredVersion"] == v4 && v["status"] == "running",
        &agent,
    )
    .await;
    assert!(
        r.get("error").is_none() || r["error"].is_null(),
        "the error is cleared: {r}"
    );
    assert!(
        r.get("rejectedSettings").is_none(),
        "the refusal is cleared: {r}"
    );
    assert!(sim.wait_until(LONG_WAIT, |s| tagged(s, "v4") >= 1).await);

    // `hubagent plugins list` shows name, kind, path, ABI and state.
    let out = agent.cli(&["plugins", "list"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("tuned"), "{text}");
    assert!(text.contains("library"), "{text}");
    assert!(text.contains(&lib.display().to_string()), "{text}");
    assert!(text.contains("1.3"), "{text}");
    assert!(text.contains("running"), "{text}");
    assert_eq!(agent.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_python_and_shipped_plugins_publish_to_hubsim() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let sim = running.sim.clone();
    let build = tempfile::tempdir().unwrap();
    let counter = build_c_plugin(
        build.path(),
        &repo_root().join("plugins/examples/c-counter/counter.c"),
        "libc_counter.so",
        &repo_root().join("plugins/sdk/include"),
    );
    let counter = install_plugin(dir.path(), &counter, 0o644);
    let script = install_plugin(
        dir.path(),
        &repo_root().join("plugins/examples/python-exec/sensor.py"),
        0o755,
    );
    let sysmetrics = install_plugin(dir.path(), &built_library("hubagent_sysmetrics"), 0o644);
    let sensor = install_plugin(
        dir.path(),
        &built_library("hubagent_simulated_sensor"),
        0o644,
    );
    let plugins = format!(
        r#"
[[plugin]]
name = "counter"
kind = "library"
path = "{counter}"
[plugin.settings]
interval_ms = 100
step = 2

[[plugin]]
name = "py"
kind = "exec"
command = ["{PYTHON}", "{script}"]
[plugin.settings]
interval = 0.1
room = "r1"

[[plugin]]
name = "sysmetrics"
kind = "library"
path = "{sysmetrics}"
isolation = "in-process"
[plugin.settings]
interval = "1s"

[[plugin]]
name = "sensor"
kind = "library"
path = "{sensor}"
[plugin.settings]
interval = "100ms"
"#,
        counter = counter.display(),
        script = script.display(),
        sysmetrics = sysmetrics.display(),
        sensor = sensor.display(),
    );
    let device = "gw-plugins-3";
    let config = plugin_agent_config(dir.path(), &running, device, &plugins, true);
    let agent = AgentProcess::start(&config);
    assert!(
        sim.wait_until(LONG_WAIT, |s| {
            bodies_from(s, device, "counter").len() >= 3
                && bodies_from(s, device, "py").len() >= 3
                && bodies_from(s, device, "sysmetrics").len() >= 2
                && bodies_from(s, device, "sensor").len() >= 3
        })
        .await,
        "{}",
        agent.log_text()
    );
    // Messages may reach the hub out of order (several in flight); the counts are 2, 4, 6, ...
    let counts = |s: &hubsim::Sim| {
        let mut c: Vec<i64> = bodies_from(s, device, "counter")
            .iter()
            .map(|b| b["count"].as_i64().unwrap())
            .collect();
        c.sort();
        c
    };
    assert!(
        sim.wait_until(LONG_WAIT, |s| counts(s).starts_with(&[2, 4, 6]))
            .await,
        "{:?}",
        counts(&sim)
    );
    assert!(
        counts(&sim).iter().all(|c| c % 2 == 0),
        "the C plugin counts in steps of 2"
    );
    let py = bodies_from(&sim, device, "py");
    assert!(py.iter().all(|b| b["room"] == "r1"), "{py:?}");
    assert!(
        sim.wait_until(LONG_WAIT, |s| bodies_from(s, device, "py")
            .iter()
            .any(|b| b["seq"] == 1))
            .await
    );
    let metrics = &bodies_from(&sim, device, "sysmetrics")[0];
    assert!(
        metrics["memory"]["totalBytes"].as_u64().unwrap() > 0,
        "{metrics}"
    );
    assert!(metrics["uptimeSeconds"].as_u64().is_some(), "{metrics}");
    let sensor_body = &bodies_from(&sim, device, "sensor")[0];
    assert!(sensor_body["temperature"].is_number(), "{sensor_body}");
    let record = records(&sim, device)
        .into_iter()
        .find(|r| r.properties.get("source").map(String::as_str) == Some("counter"))
        .unwrap();
    assert_eq!(record.properties["example"], "c-counter");
    assert_eq!(
        record
            .system_properties
            .get("content-type")
            .map(String::as_str),
        Some("application/json"),
        "{record:?}"
    );

    // Exec plugins take new settings on stdin and may refuse them.
    let key = device_key(&sim, device);
    let v =
        hubsim::twin::apply_desired_patch(&sim, &key, &json!({"plugins": {"py": {"room": "r2"}}}))
            .unwrap();
    wait_reported(
        &sim,
        device,
        "py",
        "room r2",
        |r| r["desiredVersion"] == v && r["settings"]["room"] == "r2",
        &agent,
    )
    .await;
    assert!(
        sim.wait_until(LONG_WAIT, |s| bodies_from(s, device, "py")
            .iter()
            .any(|b| b["room"] == "r2"))
            .await
    );
    let v = hubsim::twin::apply_desired_patch(
        &sim,
        &key,
        &json!({"plugins": {"py": {"interval": -1}}}),
    )
    .unwrap();
    let r = wait_reported(
        &sim,
        device,
        "py",
        "the rejection",
        |r| r["rejectedSettings"].is_string(),
        &agent,
    )
    .await;
    assert_eq!(r["status"], "running", "{r}");
    assert!(
        r["rejectedSettings"]
            .as_str()
            .unwrap()
            .contains("interval must be"),
        "{r}"
    );
    assert_eq!(r["desiredVersion"], v);
    assert_eq!(r["settings"]["room"], "r2", "the old settings stay: {r}");
    // And the C plugin refuses a zero step with its reason.
    let v = hubsim::twin::apply_desired_patch(
        &sim,
        &key,
        &json!({"plugins": {"counter": {"step": 0}}}),
    )
    .unwrap();
    let r = wait_reported(
        &sim,
        device,
        "counter",
        "the rejection",
        |r| r["desiredVersion"] == v && r["rejectedSettings"].is_string(),
        &agent,
    )
    .await;
    assert_eq!(r["status"], "running", "{r}");
    assert_eq!(r["rejectedSettings"], "step must not be 0", "{r}");

    let list = agent.plugins_list();
    assert_eq!(list["sysmetrics"]["isolation"], "in-process");
    assert_eq!(list["sysmetrics"]["abi"], "1.3");
    assert_eq!(list["py"]["kind"], "exec");
    assert!(list["py"]["pid"].as_u64().is_some(), "{list}");
    assert_eq!(agent.stop(), Some(0));
    // A stopped agent leaves no plugin process behind.
    let pid = list["py"]["pid"].as_u64().unwrap();
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists() || {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            stat.contains(") Z ")
        }
    );
}

/// A plugin publishing when the agent stops is served until it has stopped: the publishes in
/// flight and those made while its `stop` joins its threads are queued and answered "ok", so
/// `stop` returns and the agent exits at once instead of killing it after `callback_timeout`
/// (found by the benchmark: every stop during a burst took the full timeout; and a publish
/// read before the stop once got "stopping" in a reliability test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_publishing_when_the_agent_stops_is_served_until_it_stopped() {
    publishing_plugin_stops_refusing_nothing("process", "gw-plugins-stop").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_process_plugin_publishing_when_the_agent_stops_is_served_until_it_stopped() {
    publishing_plugin_stops_refusing_nothing("in-process", "gw-plugins-stop-2").await;
}

async fn publishing_plugin_stops_refusing_nothing(isolation: &str, device: &str) {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let sim = running.sim.clone();
    let lib = misbehave(dir.path());
    let record = dir.path().join("flooder.record");
    std::fs::write(&record, "").unwrap();
    let allow = match isolation {
        "in-process" => String::new(),
        _ => format!("allow_write = [\"{}\"]", record.display()),
    };
    // Four threads publishing without pause, never rate-limited, so one is nearly always
    // waiting for its answer when the stop comes.
    let plugins = format!(
        r#"
[[plugin]]
name = "flooder"
kind = "library"
path = "{}"
isolation = "{isolation}"
max_rate = 1000000
burst = 1000000
callback_timeout = "120s"
{allow}
[plugin.settings]
mode = "flood"
record = "{}"
"#,
        lib.display(),
        record.display()
    );
    let config = plugin_agent_config(dir.path(), &running, device, &plugins, true);
    let mut agent = AgentProcess::start(&config);
    let flowing = sim
        .wait_until(LONG_WAIT, |s| telemetry_count(s, device) >= 200)
        .await;
    assert!(
        flowing,
        "the flood never reached the hub:\n{}",
        agent.log_text()
    );

    agent.signal("TERM");
    // Well under callback_timeout: a kill after the timeout would take 120 s.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let code = loop {
        if let Some(status) = agent.child.try_wait().unwrap() {
            break status.code();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the agent is still stopping 60 s after SIGTERM (waiting to kill the plugin?):\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(code, Some(0), "{}", agent.log_text());
    // Nothing was refused: the queue had room for every message sent before the plugin ended.
    // `<run> <n> <outcome>` per publish (the four threads number their messages alike).
    let text = std::fs::read_to_string(&record).unwrap();
    let answers: Vec<&str> = text.lines().collect();
    let refused: Vec<_> = answers.iter().filter(|l| !l.ends_with(" ok")).collect();
    assert!(answers.len() >= 200, "{} publishes recorded", answers.len());
    assert!(
        refused.is_empty(),
        "{} of {} publishes refused at the stop: {:?}",
        refused.len(),
        answers.len(),
        &refused[..refused.len().min(5)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_paths_and_foreign_abis_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let sim = running.sim.clone();
    // Group- and world-writable: refused whoever runs the agent (as a user it is also not
    // root-owned). No override in this configuration.
    let writable = install_plugin(dir.path(), &built_library("hubagent_test_misbehave"), 0o666);
    let c_source = dir.path().join("future.c");
    std::fs::write(
        &c_source,
        "#include \"hubagent_plugin.h\"\nstatic const hubagent_plugin_descriptor d = { .magic = HUBAGENT_PLUGIN_MAGIC, .abi_major = 2, .abi_minor = 0, .descriptor_size = sizeof d, .host_api_size = sizeof(hubagent_host_api), .message_size = sizeof(hubagent_message), .name = \"future\", .version = \"9\" };\nconst hubagent_plugin_descriptor *hubagent_plugin_entry_v1(void) { return &d; }\n",
    )
    .unwrap();
    let build = tempfile::tempdir().unwrap();
    let future = install_plugin(
        dir.path(),
        &build_c_plugin(
            build.path(),
            &c_source,
            "libfuture.so",
            &repo_root().join("plugins/sdk/include"),
        ),
        0o644,
    );
    let plugins = format!(
        "[[plugin]]\nname = \"writable\"\nkind = \"library\"\npath = \"{}\"\nquarantine_after = 1\n\n[[plugin]]\nname = \"future\"\nkind = \"library\"\npath = \"{}\"\nquarantine_after = 1\n\n[[plugin]]\nname = \"sensor\"\nkind = \"builtin\"\nbuiltin = \"simulated-sensor\"\ninterval = \"100ms\"\n",
        writable.display(),
        future.display()
    );
    let device = "gw-plugins-4";
    let config = plugin_agent_config(dir.path(), &running, device, &plugins, false);
    let agent = AgentProcess::start(&config);
    let r = wait_reported(
        &sim,
        device,
        "writable",
        "refusal",
        |v| v["status"] == "quarantined",
        &agent,
    )
    .await;
    let error = r["error"].as_str().unwrap();
    assert!(
        error.contains("writable by group or others") || (!is_root() && error.contains("not root")),
        "{r}"
    );
    if is_root() {
        // The ABI check needs a trusted path, which only root can make here.
        let r = wait_reported(
            &sim,
            device,
            "future",
            "refusal",
            |v| v["status"] == "quarantined",
            &agent,
        )
        .await;
        assert!(
            r["error"]
                .as_str()
                .unwrap()
                .contains("ABI 2.0 is not supported"),
            "{r}"
        );
    }
    // The built-in sensor is a plugin like the others and keeps working.
    assert!(
        sim.wait_until(LONG_WAIT, |s| bodies_from(s, device, "sensor").len() >= 3)
            .await,
        "{}",
        agent.log_text()
    );
    assert_eq!(agent.stop(), Some(0));
}

/// The C header and the Rust definitions describe the same layout.
#[test]
fn header_and_rust_abi_agree() {
    use hubagent_plugin_sdk::abi;
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("sizes.c");
    std::fs::write(
        &source,
        r#"#include <stdio.h>
#include <stddef.h>
#include "hubagent_plugin.h"
int main(void) {
    printf("%zu %zu %zu %zu %zu %zu %zu %zu %u %u %u %zu %zu %zu %zu %zu %zu %u\n",
        sizeof(hubagent_plugin_descriptor), sizeof(hubagent_host_api), sizeof(hubagent_message),
        offsetof(hubagent_plugin_descriptor, start), offsetof(hubagent_plugin_descriptor, stop),
        offsetof(hubagent_host_api, publish), offsetof(hubagent_message, properties),
        sizeof(hubagent_property), HUBAGENT_PLUGIN_MAGIC, HUBAGENT_PLUGIN_ABI_MAJOR,
        HUBAGENT_PLUGIN_ABI_MINOR, offsetof(hubagent_plugin_descriptor, methods),
        offsetof(hubagent_plugin_descriptor, receive_c2d), sizeof(hubagent_c2d_message),
        offsetof(hubagent_c2d_message, message_id), offsetof(hubagent_c2d_message, properties),
        offsetof(hubagent_host_api, publish_batch), HUBAGENT_MAX_BATCH);
    return 0;
}
"#,
    )
    .unwrap();
    let exe = dir.path().join("sizes");
    let status = std::process::Command::new("gcc")
        .arg("-I")
        .arg(repo_root().join("plugins/sdk/include"))
        .arg(&source)
        .arg("-o")
        .arg(&exe)
        .status()
        .unwrap();
    assert!(status.success());
    let out = std::process::Command::new(&exe).output().unwrap();
    let got: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    let want = vec![
        std::mem::size_of::<abi::PluginDescriptor>() as u64,
        std::mem::size_of::<abi::HostApi>() as u64,
        std::mem::size_of::<abi::Message>() as u64,
        std::mem::offset_of!(abi::PluginDescriptor, start) as u64,
        std::mem::offset_of!(abi::PluginDescriptor, stop) as u64,
        std::mem::offset_of!(abi::HostApi, publish) as u64,
        std::mem::offset_of!(abi::Message, properties) as u64,
        std::mem::size_of::<abi::Property>() as u64,
        abi::MAGIC as u64,
        abi::ABI_MAJOR as u64,
        abi::ABI_MINOR as u64,
        abi::DESCRIPTOR_SIZE_V1_0 as u64,
        std::mem::offset_of!(abi::PluginDescriptor, receive_c2d) as u64,
        std::mem::size_of::<abi::C2dMessage>() as u64,
        std::mem::offset_of!(abi::C2dMessage, message_id) as u64,
        std::mem::offset_of!(abi::C2dMessage, properties) as u64,
        abi::HOST_API_SIZE_V1_2 as u64,
        abi::MAX_BATCH as u64,
    ];
    assert_eq!(got, want);
}

/// A plugin's error can be any length; IoT Hub refuses a reported string over 4 KB (and the
/// whole patch with it). A plugin refusing its settings with a 10 KB reason still gets its
/// status reported, with the reason capped; the agent's other reported properties go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_error_of_10_kb_is_reported_capped() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let sim = running.sim.clone();
    let build = tempfile::tempdir().unwrap();
    let source = build.path().join("verbose-refusal.sh");
    std::fs::write(
        &source,
        "#!/bin/sh\n# Refuses every settings line with a reason of 10240 bytes.\nwhile read -r line; do\n  printf '{\"rejectSettings\": \"%s\"}\\n' \"$(head -c 10240 /dev/zero | tr '\\000' r)\"\ndone\n",
    )
    .unwrap();
    let script = install_plugin(dir.path(), &source, 0o755);
    let plugins = format!(
        "[[plugin]]\nname = \"verbose\"\nkind = \"exec\"\ncommand = [\"/bin/sh\", \"{}\"]\n[plugin.settings]\nlevel = 1\n",
        script.display()
    );
    let device = "gw-plugins-long-error";
    let config = plugin_agent_config(dir.path(), &running, device, &plugins, true);
    let agent = AgentProcess::start(&config);
    let r = wait_reported(
        &sim,
        device,
        "verbose",
        "the rejection",
        |v| v["status"] == "rejected-settings",
        &agent,
    )
    .await;
    let error = r["rejectedSettings"].as_str().unwrap();
    assert!(
        error.len() <= hubagent::plugins::MAX_REPORTED_ERROR,
        "{} bytes",
        error.len()
    );
    assert!(error.starts_with("rrrr"), "{error}");
    assert!(error.ends_with("[10240 bytes, truncated]"), "{error}");
    assert_eq!(reported(&sim, device, "agent")["deviceId"], device);
    // The whole reason stays available locally.
    let list = agent.plugins_list();
    assert_eq!(
        list["verbose"]["rejectedSettings"].as_str().unwrap().len(),
        10240
    );
    assert_eq!(agent.stop(), Some(0));
}

/// `target/<profile>/NAME` of this build, linked (or copied) into `bin`: an agent there finds
/// its plugin host beside it, as in `/usr/bin` and `/usr/libexec/hubagent`, not in the build.
fn install_binary(bin: &Path, name: &str) -> PathBuf {
    std::fs::create_dir_all(bin).unwrap();
    let source = hubagent_bin().with_file_name(name);
    let target = bin.join(name);
    if std::fs::hard_link(&source, &target).is_err() {
        std::fs::copy(&source, &target).unwrap();
    }
    target
}

/// The pid of a running plugin in `hubagent plugins list`.
fn running_pid(list: &Value, name: &str) -> Option<u64> {
    (list[name]["status"] == "running")
        .then(|| list[name]["pid"].as_u64())
        .flatten()
}

/// An upgrade replaces the plugin host executable under a running daemon: the daemon keeps
/// starting the host it opened when it started (its own build), never the file now on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_host_replaced_on_disk_is_not_what_the_running_daemon_starts() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let sim = running.sim.clone();
    let bin = dir.path().join("bin");
    let agent_bin = install_binary(&bin, "hubagent");
    install_binary(&bin, "hubagent-plugin-host");
    let sensor = install_plugin(
        dir.path(),
        &built_library("hubagent_simulated_sensor"),
        0o644,
    );
    let plugins = format!(
        "[[plugin]]\nname = \"sensor\"\nkind = \"library\"\npath = \"{}\"\nrestart_backoff = \"100ms\"\n[plugin.settings]\ninterval = \"100ms\"\n",
        sensor.display()
    );
    let device = "gw-plugins-host-upgrade";
    let config = plugin_agent_config(dir.path(), &running, device, &plugins, true);
    let mut command = std::process::Command::new(&agent_bin);
    command.args(["--config", config.to_str().unwrap(), "run"]);
    let agent = AgentProcess::spawn(command, &config, "hubagent from bin/");
    let list = agent
        .wait_plugins("the sensor running", |l| running_pid(l, "sensor").is_some())
        .await;
    let first = running_pid(&list, "sensor").unwrap();

    // What a package upgrade does: a new file renamed over the old one. This one only leaves a
    // mark if it is ever executed.
    let mark = dir.path().join("replacement-ran");
    let replacement = bin.join("hubagent-plugin-host.new");
    std::fs::write(
        &replacement,
        format!("#!/bin/sh\ntouch '{}'\nexit 3\n", mark.display()),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&replacement, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&replacement, bin.join("hubagent-plugin-host")).unwrap();

    let status = std::process::Command::new("kill")
        .args(["-9", &first.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -9 {first}: {status}");
    let list = agent
        .wait_plugins("the sensor restarted in a new host", |l| {
            running_pid(l, "sensor").is_some_and(|pid| pid != first)
        })
        .await;
    let second = running_pid(&list, "sensor").unwrap();
    assert!(
        !mark.exists(),
        "the daemon executed the replaced file:\n{}",
        agent.log_text()
    );
    // The restarted host is the file the daemon opened, no longer in the directory.
    let exe = std::fs::read_link(format!("/proc/{second}/exe")).unwrap();
    assert!(
        exe.to_string_lossy()
            .ends_with("hubagent-plugin-host (deleted)"),
        "{}",
        exe.display()
    );
    // Named as if executed by path (not "N" of /proc/self/fd/N), for ps and the journal.
    let comm = std::fs::read_to_string(format!("/proc/{second}/comm")).unwrap();
    assert_eq!(comm.trim(), "hubagent-plugin");
    let before = bodies_from(&sim, device, "sensor").len();
    assert!(
        sim.wait_until(LONG_WAIT, |s| bodies_from(s, device, "sensor").len()
            > before)
            .await,
        "no telemetry from the restarted host:\n{}",
        agent.log_text()
    );
    assert_eq!(agent.stop(), Some(0));
}

/// A host of another build than the daemon's refuses to run, with a fatal frame naming both.
#[test]
fn a_plugin_host_of_another_build_refuses_with_the_reason() {
    let host = hubagent_bin().with_file_name("hubagent-plugin-host");
    let out = std::process::Command::new(&host)
        .args([
            "--build",
            "0.0.0-other",
            "--name",
            "sensor",
            "--path",
            "/nonexistent/lib.so",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let (length, frame) = out.stdout.split_at(4);
    assert_eq!(
        u32::from_be_bytes(length.try_into().unwrap()) as usize,
        frame.len()
    );
    let frame: Value = serde_json::from_slice(frame).unwrap();
    assert_eq!(frame["type"], "fatal", "{frame}");
    let error = frame["error"].as_str().unwrap();
    assert!(
        error.contains(&format!("is build {}", env!("CARGO_PKG_VERSION")))
            && error.contains("is build 0.0.0-other"),
        "{error}"
    );
}

/// An agent without its plugin host executable: `config check` names the file and where it was
/// looked for, and the plugin reports the same reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_plugin_host_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let sim = running.sim.clone();
    let bin = dir.path().join("bin");
    let agent_bin = install_binary(&bin, "hubagent");
    let sensor = install_plugin(
        dir.path(),
        &built_library("hubagent_simulated_sensor"),
        0o644,
    );
    let plugins = format!(
        "[[plugin]]\nname = \"sensor\"\nkind = \"library\"\npath = \"{}\"\nquarantine_after = 1\n",
        sensor.display()
    );
    let device = "gw-plugins-no-host";
    let config = plugin_agent_config(dir.path(), &running, device, &plugins, true);
    let out = std::process::Command::new(&agent_bin)
        .args(["--config", config.to_str().unwrap(), "config", "check"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let missing = format!(
        "hubagent-plugin-host is missing (looked for {} and {})",
        bin.join("hubagent-plugin-host").display(),
        dir.path()
            .join("libexec/hubagent/hubagent-plugin-host")
            .display()
    );
    assert!(
        stdout.contains(&format!(
            "plugin sensor: CANNOT START: the plugin host executable {missing}"
        )),
        "{stdout}"
    );

    let mut command = std::process::Command::new(&agent_bin);
    command.args(["--config", config.to_str().unwrap(), "run"]);
    let agent = AgentProcess::spawn(command, &config, "hubagent from bin/");
    let r = wait_reported(
        &sim,
        device,
        "sensor",
        "the missing host",
        |v| v["status"] == "quarantined",
        &agent,
    )
    .await;
    assert!(r["error"].as_str().unwrap().contains(&missing), "{r}");
    assert_eq!(agent.stop(), Some(0));
}
