//! Direct methods to plugins (#17) with the real `hubagent` binary against hubsim: the hub's
//! method `<plugin>.<method>` reaches a library plugin in either isolation and an exec plugin,
//! and their status and JSON come back (the C and Python examples' handlers included); a plugin
//! built against ABI 1.0 still runs (and has no methods); a method to a plugin (library or exec)
//! that crashes during the call, hangs, is quarantined or does not exist gets 500, 504, 503 or
//! 404 from the agent, and the built-in methods keep working. `hubagent demo` calls a plugin's
//! method and sends it a C2D message.

use std::time::Duration;

use hubagent_tests::*;
use serde_json::{Value, json};

/// Longer than any answer the agent gives (its 504 comes after the plugin's method_timeout).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

async fn call(sim: &hubsim::Sim, key: &str, method: &str, payload: Value) -> (u16, Value) {
    hubsim::twin::invoke_method(sim, key, method, &payload, CALL_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{method}: no answer through hubsim: {e:?}"))
}

fn error_text(answer: &(u16, Value)) -> String {
    answer.1["error"].as_str().unwrap_or_default().to_string()
}

async fn wait_running(
    sim: &hubsim::Sim,
    device: &str,
    agent: &AgentProcess,
    names: &[&str],
) -> Value {
    wait_plugins_declared(sim, device, agent, names, "methods").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_reach_library_plugins_in_both_isolations_and_exec_plugins() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let sim = running.sim.clone();
    let lib = install_plugin(dir.path(), &built_library("hubagent_test_misbehave"), 0o644);
    let script = install_plugin(
        dir.path(),
        &repo_root().join("plugins/examples/python-exec/sensor.py"),
        0o755,
    );
    // The C counter as it was at ABI 1.0, built against the 1.0 header.
    let build = tempfile::tempdir().unwrap();
    let abi_1_0 = repo_root().join("tests/plugins/abi-1.0");
    let old = install_plugin(
        dir.path(),
        &build_c_plugin(
            build.path(),
            &abi_1_0.join("counter.c"),
            "libcounter_1_0.so",
            &abi_1_0,
        ),
        0o644,
    );
    // The C example of today (ABI 1.2), with its method and C2D handlers.
    let counter = install_plugin(
        dir.path(),
        &build_c_plugin(
            build.path(),
            &repo_root().join("plugins/examples/c-counter/counter.c"),
            "libc_counter.so",
            &repo_root().join("plugins/sdk/include"),
        ),
        0o644,
    );
    let plugins = format!(
        r#"
[[plugin]]
name = "hosted"
kind = "library"
path = "{lib}"
[plugin.settings]
tag = "hosted"
interval = "1s"

[[plugin]]
name = "inproc"
kind = "library"
path = "{lib}"
isolation = "in-process"
[plugin.settings]
tag = "inproc"
interval = "1s"

[[plugin]]
name = "py"
kind = "exec"
command = ["{PYTHON}", "{script}"]
[plugin.settings]
interval = 0.2
room = "r1"

[[plugin]]
name = "old"
kind = "library"
path = "{old}"
[plugin.settings]
interval_ms = 200

[[plugin]]
name = "counter"
kind = "library"
path = "{counter}"
[plugin.settings]
interval_ms = 100000
"#,
        lib = lib.display(),
        script = script.display(),
        old = old.display(),
        counter = counter.display(),
    );
    let device = "gw-methods-1";
    let config = plugin_agent_config(dir.path(), &running, device, &plugins, true);
    let agent = AgentProcess::start(&config);
    let list = wait_running(
        &sim,
        device,
        &agent,
        &["hosted", "inproc", "py", "old", "counter"],
    )
    .await;
    assert_eq!(list["old"]["abi"], "1.0", "{list}");
    assert_eq!(list["old"]["methods"], json!([]), "{list}");
    assert_eq!(list["hosted"]["abi"], "1.3", "{list}");
    assert_eq!(list["py"]["methods"], json!(["read", "set_room"]), "{list}");
    // The 1.0 plugin publishes as before.
    assert!(
        sim.wait_until(LONG_WAIT, |s| bodies_from(s, device, "old").len() >= 2)
            .await,
        "{}",
        agent.log_text()
    );
    let key = device_key(&sim, device);

    for (plugin, tag) in [("hosted", "hosted"), ("inproc", "inproc")] {
        let (status, answer) =
            call(&sim, &key, &format!("{plugin}.echo"), json!({"x": [1, 2]})).await;
        assert_eq!(status, 200, "{plugin}: {answer}");
        assert_eq!(answer["echo"], json!({"x": [1, 2]}), "{plugin}: {answer}");
        assert_eq!(answer["tag"], tag, "{plugin}: {answer}");
    }
    // The plugin's own status and JSON pass through unchanged.
    let teapot = call(
        &sim,
        &key,
        "hosted.status",
        json!({"status": 418, "payload": {"teapot": true}}),
    )
    .await;
    assert_eq!(teapot, (418, json!({"teapot": true})));
    // An exec plugin: a method that changes its state, and one that reads it back.
    assert_eq!(
        call(&sim, &key, "py.set_room", json!("r9")).await,
        (200, json!({"room": "r9"}))
    );
    let (status, reading) = call(&sim, &key, "py.read", Value::Null).await;
    assert_eq!((status, &reading["room"]), (200, &json!("r9")), "{reading}");
    assert!(reading["temperature"].is_number(), "{reading}");

    // The C example: a method, then a C2D message it takes, seen through the next method.
    assert_eq!(
        call(&sim, &key, "counter.reset", json!(100)).await,
        (200, json!({"was": 0, "count": 100}))
    );
    hubsim::twin::send_c2d(
        &sim,
        &key,
        hubsim::state::C2dMessage {
            body: "23".into(),
            properties: vec![
                ("$.mid".into(), "add-23".into()),
                ("to".into(), "counter".into()),
            ],
        },
    )
    .unwrap();
    agent.wait_log("C2D add-23: added 23").await;
    assert_eq!(
        call(&sim, &key, "counter.get", Value::Null).await,
        (200, json!({"count": 123}))
    );

    // 404s name what is missing.
    let old = call(&sim, &key, "old.anything", json!({})).await;
    assert_eq!(old.0, 404, "{old:?}");
    assert!(error_text(&old).contains("declares: none"), "{old:?}");
    let undeclared = call(&sim, &key, "hosted.nope", json!({})).await;
    assert_eq!(undeclared.0, 404, "{undeclared:?}");
    assert!(
        error_text(&undeclared).contains("echo, status, slow, crash"),
        "{undeclared:?}"
    );
    let ghost = call(&sim, &key, "ghost.echo", json!({})).await;
    assert_eq!(ghost.0, 404, "{ghost:?}");
    assert!(
        error_text(&ghost).contains("no plugin 'ghost'"),
        "{ghost:?}"
    );
    // The built-in methods stay.
    let (status, pong) = call(&sim, &key, "ping", json!({"p": 1})).await;
    assert_eq!((status, &pong["echo"]), (200, &json!({"p": 1})), "{pong}");
    assert_eq!(agent.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_to_crashed_hung_and_quarantined_plugins_get_a_clear_status() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let sim = running.sim.clone();
    let lib = install_plugin(dir.path(), &built_library("hubagent_test_misbehave"), 0o644);
    let exe = install_plugin(
        dir.path(),
        &repo_root().join("tests/plugins/exec-misbehave/misbehave.py"),
        0o755,
    );
    let plugins = format!(
        r#"
[[plugin]]
name = "crasher"
kind = "library"
path = "{lib}"
restart_backoff = "100ms"
[plugin.settings]
interval = "1h"

[[plugin]]
name = "slow"
kind = "library"
path = "{lib}"
method_timeout = "500ms"
[plugin.settings]
interval = "1h"

[[plugin]]
name = "inslow"
kind = "library"
path = "{lib}"
isolation = "in-process"
method_timeout = "500ms"
[plugin.settings]
interval = "1h"

[[plugin]]
name = "broken"
kind = "library"
path = "{lib}"
quarantine_after = 1
quarantine_retry = "1h"
[plugin.settings]
mode = "panic"

[[plugin]]
name = "exe"
kind = "exec"
command = ["{PYTHON}", "{exe}"]
method_timeout = "500ms"
restart_backoff = "100ms"
"#,
        lib = lib.display(),
        exe = exe.display(),
    );
    let device = "gw-methods-2";
    let config = plugin_agent_config(dir.path(), &running, device, &plugins, true);
    let agent = AgentProcess::start(&config);
    wait_running(&sim, device, &agent, &["crasher", "slow", "inslow", "exe"]).await;
    agent
        .wait_plugins("broken quarantined", |l| {
            l["broken"]["status"] == "quarantined"
        })
        .await;
    let key = device_key(&sim, device);

    // A crash during the call: 500 with the reason, and the plugin is restarted.
    let crashed = call(&sim, &key, "crasher.crash", Value::Null).await;
    assert_eq!(crashed.0, 500, "{crashed:?}");
    assert!(
        error_text(&crashed).contains("failed during the call"),
        "{crashed:?}"
    );
    agent
        .wait_plugins("crasher restarted", |l| {
            l["crasher"]["status"] == "running" && l["crasher"]["restarts"] == 1
        })
        .await;
    assert_eq!(call(&sim, &key, "crasher.echo", json!(1)).await.0, 200);

    // No answer within method_timeout: 504, in both isolations, before the hub's own timeout;
    // the session is not held up (a built-in method answers at once).
    for plugin in ["slow", "inslow"] {
        let hung = call(&sim, &key, &format!("{plugin}.slow"), json!({"ms": 3000})).await;
        assert_eq!(hung.0, 504, "{plugin}: {hung:?}");
        assert!(
            error_text(&hung).contains("method_timeout of 500ms"),
            "{hung:?}"
        );
        assert_eq!(call(&sim, &key, "ping", Value::Null).await.0, 200);
        // Once the slow call returns, the plugin answers again (until then each call waits
        // behind it and gets its own 504).
        let deadline = std::time::Instant::now() + LONG_WAIT;
        loop {
            let answer = call(&sim, &key, &format!("{plugin}.echo"), json!(2)).await;
            if answer.0 == 200 {
                break;
            }
            assert_eq!(answer.0, 504, "{plugin}: {answer:?}");
            assert!(
                std::time::Instant::now() < deadline,
                "{plugin} never answered again"
            );
        }
    }

    // An exec plugin: no answer is 504 (and it still answers the next call), an exit during the
    // call is 500, and it is restarted.
    let hung = call(&sim, &key, "exe.hang", Value::Null).await;
    assert_eq!(hung.0, 504, "{hung:?}");
    assert_eq!(
        call(&sim, &key, "exe.echo", json!(5)).await,
        (200, json!(5))
    );
    let exited = call(&sim, &key, "exe.exit", Value::Null).await;
    assert_eq!(exited.0, 500, "{exited:?}");
    assert!(
        error_text(&exited).contains("failed during the call"),
        "{exited:?}"
    );
    agent
        .wait_plugins("exe restarted", |l| {
            l["exe"]["status"] == "running" && l["exe"]["restarts"] == 1
        })
        .await;
    assert_eq!(
        call(&sim, &key, "exe.echo", json!(6)).await,
        (200, json!(6))
    );

    // Quarantined: 503 naming the state; a method it does not declare is still 404.
    let broken = call(&sim, &key, "broken.echo", Value::Null).await;
    assert_eq!(broken.0, 503, "{broken:?}");
    assert!(error_text(&broken).contains("quarantined"), "{broken:?}");
    assert_eq!(call(&sim, &key, "broken.nope", Value::Null).await.0, 404);
    assert_eq!(agent.stop(), Some(0));
}

/// `hubagent demo` narrates a method of its sensor plugin and a C2D message the plugin takes:
/// the answer is the plugin's last reading, and the message is completed only once taken.
#[test]
fn the_demo_calls_a_plugin_method_and_sends_it_a_c2d_message() {
    let out = std::process::Command::new(hubagent_bin())
        .args(["demo", "--duration", "12s", "--interval", "300ms"])
        .output()
        .expect("hubagent demo runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read = text
        .lines()
        .find(|l| l.contains("operator calls 'simulated-sensor.read' ->"))
        .unwrap_or_else(|| panic!("no method call narrated:\n{text}"));
    let answer: Value = serde_json::from_str(read.split(" -> 200 ").nth(1).unwrap_or("null"))
        .unwrap_or(Value::Null);
    assert!(answer["temperature"].is_number(), "{read}");
    assert!(
        text.contains("message demo-c2d-1 completed by the agent once the plugin took it"),
        "{text}"
    );
    // The plugin's echo of the message reached the hub as telemetry.
    assert!(text.contains(r#""c2dReceived":"demo-c2d-1""#), "{text}");
}
