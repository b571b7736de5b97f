//! Cloud-to-device messages to plugins (#17) with the real `hubagent` binary against hubsim, at
//! least once: a message goes to exactly the plugin whose filter matches, and hubsim records it
//! completed only once that plugin has taken it; one that nothing takes stays with the hub; one
//! arriving while its plugin restarts is taken after the restart; and the agent killed with -9
//! between receiving a message and the plugin taking it loses nothing (the hub delivers it
//! again). What was sent is compared with what the plugin recorded taking.

use std::path::Path;

use hubagent_tests::*;
use hubsim::state::{C2dMessage, C2dState};
use serde_json::Value;

fn send(sim: &hubsim::Sim, key: &str, id: &str, to: &str, body: &str) {
    hubsim::twin::send_c2d(
        sim,
        key,
        C2dMessage {
            body: body.to_string().into(),
            properties: vec![("$.mid".into(), id.into()), ("to".into(), to.into())],
        },
    )
    .unwrap();
}

fn state(sim: &hubsim::Sim, key: &str, id: &str) -> Option<(C2dState, u32)> {
    sim.c2d_records(key)
        .into_iter()
        .find(|r| r.message_id == id)
        .map(|r| (r.state, r.delivery_count))
}

async fn wait_state(
    sim: &hubsim::Sim,
    key: &str,
    id: &str,
    want: (C2dState, u32),
    agent: Option<&AgentProcess>,
) {
    assert!(
        sim.wait_until(LONG_WAIT, |s| state(s, key, id) == Some(want))
            .await,
        "{id}: {:?}, not {want:?}\n{}",
        state(sim, key, id),
        agent.map(AgentProcess::log_text).unwrap_or_default()
    );
}

/// The lines of the misbehave plugin's C2D record (`<id> offered`, `<id> taken <body>`).
fn record(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn taken(path: &Path) -> Vec<String> {
    record(path)
        .into_iter()
        .filter(|l| l.contains(" taken "))
        .collect()
}

async fn wait_record(path: &Path, line: &str, agent: &AgentProcess) {
    let path = path.to_path_buf();
    let line = line.to_string();
    agent
        .wait_log_line(&format!("{line:?} never recorded by the plugin"), |_| {
            record(&path).contains(&line)
        })
        .await;
}

fn valve(lib: &Path, record: &Path, extra_settings: &str) -> String {
    valve_in(lib, record, "process", extra_settings)
}

fn valve_in(lib: &Path, record: &Path, isolation: &str, extra_settings: &str) -> String {
    // The plugin's sandbox lets it write its record, which must exist to be granted. (An
    // in-process plugin is not sandboxed: it takes no sandbox key.)
    if !record.exists() {
        std::fs::write(record, "").unwrap();
    }
    let allow = match isolation {
        "in-process" => String::new(),
        _ => format!("allow_write = [\"{}\"]", record.display()),
    };
    format!(
        r#"
[[plugin]]
name = "valve"
kind = "library"
path = "{}"
isolation = "{isolation}"
restart_backoff = "2s"
{allow}
[plugin.settings]
interval = "1h"
c2d_record = "{}"
{extra_settings}
"#,
        lib.display(),
        record.display()
    )
}

async fn wait_running(sim: &hubsim::Sim, device: &str, agent: &AgentProcess, names: &[&str]) {
    wait_plugins_declared(sim, device, agent, names, "c2dFilter").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c2d_goes_to_exactly_the_matching_plugin_and_is_completed_only_once_taken() {
    exactly_the_matching_plugin("process", "gw-c2d-1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c2d_goes_to_exactly_the_matching_in_process_plugin_too() {
    exactly_the_matching_plugin("in-process", "gw-c2d-4").await;
}

/// A message for the library plugin (in `isolation`), one for the Python exec plugin and one for
/// nobody.
async fn exactly_the_matching_plugin(isolation: &str, device: &str) {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let sim = running.sim.clone();
    let lib = install_plugin(dir.path(), &built_library("hubagent_test_misbehave"), 0o644);
    let script = install_plugin(
        dir.path(),
        &repo_root().join("plugins/examples/python-exec/sensor.py"),
        0o755,
    );
    let record_file = dir.path().join("c2d-record");
    let gate = dir.path().join("gate");
    let plugins = format!(
        r#"{}
[[plugin]]
name = "py"
kind = "exec"
command = ["{PYTHON}", "{}"]
[plugin.settings]
interval = 0.5
"#,
        valve_in(
            &lib,
            &record_file,
            isolation,
            &format!("c2d_gate = \"{}\"", gate.display())
        ),
        script.display()
    );
    let config = plugin_agent_config(dir.path(), &running, device, &plugins, true);
    let agent = AgentProcess::start(&config);
    wait_running(&sim, device, &agent, &["valve", "py"]).await;
    let key = device_key(&sim, device);

    send(&sim, &key, "m-valve", "misbehave", "open");
    send(&sim, &key, "m-sensor", "sensor", "hello sensor");
    send(&sim, &key, "m-nobody", "nobody", "lost?");
    // The exec plugin's message is taken and completed...
    wait_state(
        &sim,
        &key,
        "m-sensor",
        (C2dState::Completed, 1),
        Some(&agent),
    )
    .await;
    agent.wait_log("C2D m-sensor: hello sensor").await;
    // ...while the valve holds its message (waiting on the gate): offered, not completed.
    wait_record(&record_file, "m-valve offered", &agent).await;
    assert_eq!(state(&sim, &key, "m-valve"), Some((C2dState::Invisible, 1)));
    // Nothing takes the third: not completed, and it reached no plugin.
    agent.wait_log("no plugin takes it").await;
    assert_eq!(
        state(&sim, &key, "m-nobody"),
        Some((C2dState::Invisible, 1))
    );
    std::fs::write(&gate, "").unwrap();
    wait_state(
        &sim,
        &key,
        "m-valve",
        (C2dState::Completed, 1),
        Some(&agent),
    )
    .await;
    // Exactly the matching plugin got each message.
    assert_eq!(
        record(&record_file),
        vec!["m-valve offered", "m-valve taken open"]
    );
    let log = agent.log_text();
    assert!(!log.contains("C2D m-valve"), "{log}");
    assert!(!log.contains("m-nobody:"), "{log}");
    assert_eq!(
        state(&sim, &key, "m-nobody"),
        Some((C2dState::Invisible, 1))
    );
    // The sender's data is not logged by the agent (the exec plugin's own log line aside).
    assert!(!log.contains("lost?"), "{log}");
    assert_eq!(agent.stop(), Some(0));
    // Stopped without a PUBACK for it: the hub keeps the unmatched message.
    wait_state(&sim, &key, "m-nobody", (C2dState::Enqueued, 1), None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_c2d_message_arriving_while_its_plugin_restarts_is_not_lost() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let sim = running.sim.clone();
    let lib = install_plugin(dir.path(), &built_library("hubagent_test_misbehave"), 0o644);
    let record_file = dir.path().join("c2d-record");
    let device = "gw-c2d-2";
    let config = plugin_agent_config(
        dir.path(),
        &running,
        device,
        &valve(&lib, &record_file, ""),
        true,
    );
    let agent = AgentProcess::start(&config);
    wait_running(&sim, device, &agent, &["valve"]).await;
    let key = device_key(&sim, device);

    // Crash it (a method that crashes mid-call) and send while it waits out its backoff.
    let crashed = hubsim::twin::invoke_method(
        &sim,
        &key,
        "valve.crash",
        &Value::Null,
        std::time::Duration::from_secs(30),
    )
    .await
    .unwrap();
    assert_eq!(crashed.0, 500, "{crashed:?}");
    agent
        .wait_plugins("valve restarting", |l| l["valve"]["status"] == "restarting")
        .await;
    send(&sim, &key, "m-restart", "misbehave", "during the restart");
    agent.wait_log("m-restart").await;
    assert!(taken(&record_file).is_empty(), "{:?}", record(&record_file));
    // Taken once the plugin runs again, on the same connection: delivered once, completed.
    wait_state(
        &sim,
        &key,
        "m-restart",
        (C2dState::Completed, 1),
        Some(&agent),
    )
    .await;
    assert_eq!(
        taken(&record_file),
        vec!["m-restart taken during the restart"]
    );
    assert_eq!(agent.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_before_the_plugin_took_a_c2d_message_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let sim = running.sim.clone();
    let lib = install_plugin(dir.path(), &built_library("hubagent_test_misbehave"), 0o644);
    let record_file = dir.path().join("c2d-record");
    let gate = dir.path().join("gate");
    let device = "gw-c2d-3";
    let config = plugin_agent_config(
        dir.path(),
        &running,
        device,
        &valve(
            &lib,
            &record_file,
            &format!("c2d_gate = \"{}\"", gate.display()),
        ),
        true,
    );
    let agent = AgentProcess::start(&config);
    wait_running(&sim, device, &agent, &["valve"]).await;
    let key = device_key(&sim, device);
    let sent = ["m-kill-1", "m-kill-2"];
    for id in sent {
        send(&sim, &key, id, "misbehave", id);
    }
    // The plugin has the first (waiting on the gate), the agent has both: kill it now.
    wait_record(&record_file, "m-kill-1 offered", &agent).await;
    agent.kill_9();
    for id in sent {
        wait_state(&sim, &key, id, (C2dState::Enqueued, 1), None).await;
    }
    assert!(taken(&record_file).is_empty(), "{:?}", record(&record_file));

    // The next run gets both again and completes them once the plugin has taken them.
    std::fs::write(&gate, "").unwrap();
    let agent = AgentProcess::start(&config);
    for id in sent {
        wait_state(&sim, &key, id, (C2dState::Completed, 2), Some(&agent)).await;
    }
    let mut got = taken(&record_file);
    got.sort();
    let want: Vec<String> = sent.iter().map(|id| format!("{id} taken {id}")).collect();
    assert_eq!(got, want, "sent {sent:?}; the plugin took {got:?}");
    assert_eq!(agent.stop(), Some(0));
}
