//! Security promises of issue #7 checked on the real binary: no secret in any output the agent
//! produces or any file it writes, private state, no core dumps, and twin settings that cannot
//! make the agent start a program.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use hubagent_tests::*;
use serde_json::{Value, json};

/// Every form the device key could leak in: base64 as configured, URL-encoded, and raw bytes.
fn key_forms(key_b64: &str) -> Vec<Vec<u8>> {
    use base64::Engine;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(key_b64)
        .unwrap();
    vec![
        key_b64.as_bytes().to_vec(),
        hubagent::util::encoding::url_encode(key_b64).into_bytes(),
        raw,
    ]
}

fn assert_no_secret(what: &str, bytes: &[u8], key_b64: &str) {
    for form in key_forms(key_b64) {
        assert!(
            !bytes.windows(form.len()).any(|w| w == form.as_slice()),
            "{what} holds the device key"
        );
    }
    // A SAS token is as good as the key for its lifetime.
    for token_part in [&b"SharedAccessSignature"[..], b"sig="] {
        assert!(
            !bytes.windows(token_part.len()).any(|w| w == token_part),
            "{what} holds a SAS token:\n{}",
            String::from_utf8_lossy(bytes)
        );
    }
}

fn output_bytes(out: &std::process::Output) -> Vec<u8> {
    [out.stdout.as_slice(), out.stderr.as_slice()].concat()
}

/// Every file under `dir`: private (no group/other bits), and free of the key.
fn check_state_files(dir: &Path, key_b64: &str) -> usize {
    let mode = std::fs::metadata(dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode & 0o077, 0, "{} is mode {mode:o}", dir.display());
    let mut files = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            files += check_state_files(&path, key_b64);
        } else if meta.is_file() {
            let mode = meta.permissions().mode() & 0o777;
            assert_eq!(mode & 0o077, 0, "{} is mode {mode:o}", path.display());
            assert_no_secret(
                &path.display().to_string(),
                &std::fs::read(&path).unwrap(),
                key_b64,
            );
            files += 1;
        }
    }
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_logs_outputs_reported_properties_or_state_and_no_core_dumps() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let sim = running.sim.clone();
    let device = "gw-secrets";
    let config = plugin_agent_config(
        dir.path(),
        &running,
        device,
        &builtin_sensor("100ms"),
        false,
    );
    let key = sim.read(|s| match &s.enrollments[device].common.attestation {
        hubsim::state::Attestation::SymmetricKey { symmetric_key } => {
            symmetric_key.primary_key.clone()
        }
        other => panic!("{other:?}"),
    });

    // Running with debug logs, provisioned, publishing, twin reported.
    let agent = AgentProcess::start(&config);
    let twin_key = device_key(&sim, device);
    assert!(
        sim.wait_until(WAIT, |s| telemetry_count(s, device) >= 3
            && !reported(s, device, "agent").is_null())
            .await,
        "{}",
        agent.log_text()
    );

    // Core dumps are off for the daemon (its memory holds the key and its SAS tokens).
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", agent.child.id())).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    let fields: Vec<&str> = core.split_whitespace().collect();
    assert_eq!(
        &fields[4..6],
        ["0", "0"],
        "soft and hard core limits: {core}"
    );

    // Everything an operator or the cloud can see.
    let mut seen: Vec<(String, Vec<u8>)> = Vec::new();
    for args in [
        &["status", "--json"][..],
        &["status"],
        &["check", "--json"],
        &["plugins", "list", "--json"],
        &["config", "check"],
    ] {
        let out = agent.cli(args);
        seen.push((format!("hubagent {}", args.join(" ")), output_bytes(&out)));
    }
    let twin = sim.read(|s| serde_json::to_vec(&s.devices[&twin_key].twin.reported).unwrap());
    seen.push(("reported properties".into(), twin));
    // Remote diagnostics: the recent log lines (debug ones included) and the check report.
    for method in ["logs", "check"] {
        let payload = match method {
            "logs" => serde_json::json!({"level": "trace", "limit": 2000}),
            _ => serde_json::Value::Null,
        };
        let (status, answer) =
            hubsim::twin::invoke_method(&sim, &twin_key, method, &payload, LONG_WAIT)
                .await
                .unwrap();
        assert_eq!(status, 200, "{method}: {answer}");
        seen.push((
            format!("the {method} direct method"),
            serde_json::to_vec(&answer).unwrap(),
        ));
    }
    let log = agent.log.clone();
    assert_eq!(agent.stop(), Some(0));
    seen.push(("the agent's log".into(), std::fs::read(&log).unwrap()));
    for (what, bytes) in &seen {
        assert!(!bytes.is_empty(), "{what} said nothing");
        assert_no_secret(what, bytes, &key);
    }
    let files = check_state_files(&dir.path().join("state"), &key);
    assert!(files >= 2, "the state dir holds the cache and the queue");

    // Errors: a wrong key (same length) is refused without echoing either key.
    let wrong = hubsim::state::random_key();
    let key_file = dir.path().join("device.key");
    std::fs::write(&key_file, format!("{wrong}\n")).unwrap();
    let out = std::process::Command::new(hubagent_bin())
        .args(["--config", config.to_str().unwrap(), "provision", "--force"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    let bytes = output_bytes(&out);
    assert!(!bytes.is_empty());
    assert_no_secret("a refused provisioning", &bytes, &key);
    assert_no_secret("a refused provisioning", &bytes, &wrong);
}

/// `desired.plugins.<name>` is data for the plugin, never a program to run: neither keys that
/// look like a plugin's definition nor a plugin name absent from the configuration start
/// anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twin_settings_cannot_start_a_program() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let sim = running.sim.clone();
    let device = "gw-twin-exec";
    // An exec plugin that publishes every settings line it receives.
    let plugins = r#"[[plugin]]
name = "echo"
kind = "exec"
command = ["/bin/sh", "-c", "while IFS= read -r line; do printf '{\"body\":%s}\n' \"$line\"; done"]
[plugin.settings]
round = 1
"#;
    let config = plugin_agent_config(dir.path(), &running, device, plugins, false);
    let agent = AgentProcess::start(&config);
    let rounds = |s: &hubsim::Sim| -> Vec<Value> {
        bodies_from(s, device, "echo")
            .into_iter()
            .filter(|b| b.get("round").is_some())
            .collect()
    };
    assert!(
        sim.wait_until(WAIT, |s| !rounds(s).is_empty()).await,
        "{}",
        agent.log_text()
    );

    let marker = dir.path().join("pwned");
    let marker_new = dir.path().join("pwned-new");
    let touch = |path: &Path| json!(["/usr/bin/touch", path.display().to_string()]);
    let version = hubsim::twin::apply_desired_patch(
        &sim,
        &device_key(&sim, device),
        &json!({"plugins": {
            "echo": {
                "round": 2,
                "kind": "exec",
                "command": touch(&marker),
                "path": "/tmp/evil.so",
                "env": {"LD_PRELOAD": "/tmp/evil.so"},
            },
            "intruder": {"kind": "exec", "command": touch(&marker_new)},
        }}),
    )
    .unwrap();
    // The configured plugin receives the keys as plain settings, in the same process...
    assert!(
        sim.wait_until(WAIT, |s| rounds(s).iter().any(|b| b["round"] == 2))
            .await,
        "{}",
        agent.log_text()
    );
    let echoed = rounds(&sim).into_iter().find(|b| b["round"] == 2).unwrap();
    assert_eq!(echoed["command"], touch(&marker), "{echoed}");
    let reported = sim
        .wait_until(WAIT, |s| {
            reported_plugin(s, device, "echo")["desiredVersion"] == version
        })
        .await;
    let echo = reported_plugin(&sim, device, "echo");
    assert!(reported, "{echo}");
    assert_eq!(echo["restarts"], 0, "{echo}");
    assert_eq!(echo["status"], "running", "{echo}");
    // ...and nothing else ran: no marker, no plugin the configuration does not name.
    let list = agent.cli(&["plugins", "list", "--json"]);
    assert!(list.status.success(), "{list:?}");
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(
        text.contains("echo") && !text.contains("intruder"),
        "{text}"
    );
    assert_eq!(reported_plugin(&sim, device, "intruder"), Value::Null);
    assert_eq!(agent.stop(), Some(0));
    assert!(!marker.exists(), "a twin setting ran a program");
    assert!(!marker_new.exists(), "a twin setting started a new plugin");
}

/// A `[plugin.settings]` value `{ file = "…" }` reaches the plugin as the file's text, and that
/// text appears nowhere the agent writes or shows: not in the reported settings (the reference
/// stands in for it), `hubagent status`, `plugins list`, the log (not even when the plugin prints
/// it) or the state files. The same object from the twin is plain data: the cloud cannot make the
/// agent read a file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_setting_from_a_file_reaches_the_plugin_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let sim = running.sim.clone();
    let device = "gw-plugin-secret";
    let secret = "db-pass-7c41e9d2";
    let secret_file = write_key(dir.path(), "db.secret", secret);
    let received = dir.path().join("received.jsonl");
    // The plugin's sandbox lets it write this file only (it must exist to be granted).
    std::fs::write(&received, "").unwrap();
    // Keeps every settings line it receives, and prints it to stderr, which the agent logs.
    let plugins = format!(
        r#"[[plugin]]
name = "meter"
kind = "exec"
command = ["/bin/sh", "-c", "while IFS= read -r line; do printf '%s\n' \"$line\" >> {received}; printf 'got %s\n' \"$line\" >&2; done"]
allow_write = ["{received}"]
[plugin.settings]
user = "meter"
db = {{ password = {{ file = "{file}" }}, host = "db.local" }}
"#,
        received = received.display(),
        file = secret_file.display(),
    );
    let config = plugin_agent_config(dir.path(), &running, device, &plugins, false);
    let agent = AgentProcess::start(&config);
    let lines = || -> Vec<Value> {
        std::fs::read_to_string(&received)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    agent
        .wait_log_line("the plugin never printed its settings", |l| {
            l.contains("got ")
        })
        .await;
    assert!(
        sim.wait_until(WAIT, |s| !reported_plugin(s, device, "meter").is_null())
            .await,
        "{}",
        agent.log_text()
    );
    // The twin tries to have a file read for it, and changes a plain setting.
    let stolen = dir.path().join("device.key");
    let version = hubsim::twin::apply_desired_patch(
        &sim,
        &device_key(&sim, device),
        &json!({"plugins": {"meter": {"user": "meter-2", "steal": {"file": stolen}}}}),
    )
    .unwrap();
    assert!(
        sim.wait_until(
            WAIT,
            |s| reported_plugin(s, device, "meter")["desiredVersion"] == version
        )
        .await,
        "{}",
        agent.log_text()
    );
    agent
        .wait_log_line("no settings line with the twin's change", |l| {
            l.contains("meter-2")
        })
        .await;
    let last = lines()
        .last()
        .cloned()
        .expect("the plugin got its settings");
    assert_eq!(last["db"]["password"], secret, "{last}");
    assert_eq!(last["db"]["host"], "db.local");
    assert_eq!(last["user"], "meter-2");
    assert_eq!(
        last["steal"],
        json!({"file": stolen}),
        "the twin's object stays data"
    );

    // What is shown in its place: the reference from the configuration.
    let reported = reported_plugin(&sim, device, "meter");
    assert_eq!(
        reported["settings"]["db"]["password"],
        json!({"file": secret_file}),
        "{reported}"
    );
    let mut seen: Vec<(String, Vec<u8>)> = Vec::new();
    for args in [
        &["status", "--json"][..],
        &["status"],
        &["plugins", "list", "--json"],
        &["plugins", "list"],
        &["config", "check"],
        &["check", "--json"],
    ] {
        let out = agent.cli(args);
        if args[0] == "check" {
            // The secret file is checked (readable, private), by name.
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                text.contains("plugins.secrets")
                    && text.contains("plugin meter settings.db.password"),
                "{text}"
            );
        } else {
            assert!(out.status.success(), "{args:?}: {out:?}");
        }
        seen.push((format!("hubagent {}", args.join(" ")), output_bytes(&out)));
    }
    let twin_key = device_key(&sim, device);
    let twin = sim.read(|s| serde_json::to_vec(&s.devices[&twin_key].twin.reported).unwrap());
    seen.push(("reported properties".into(), twin));
    // Remote diagnostics: the recent log lines (debug ones included) and the check report.
    for method in ["logs", "check"] {
        let payload = match method {
            "logs" => serde_json::json!({"level": "trace", "limit": 2000}),
            _ => serde_json::Value::Null,
        };
        let (status, answer) =
            hubsim::twin::invoke_method(&sim, &twin_key, method, &payload, LONG_WAIT)
                .await
                .unwrap();
        assert_eq!(status, 200, "{method}: {answer}");
        seen.push((
            format!("the {method} direct method"),
            serde_json::to_vec(&answer).unwrap(),
        ));
    }
    let log = agent.log.clone();
    assert_eq!(agent.stop(), Some(0));
    let log = std::fs::read(&log).unwrap();
    assert!(
        String::from_utf8_lossy(&log).contains(&format!("<secret from {}>", secret_file.display())),
        "the plugin's print of its settings is logged, the secret cut out"
    );
    seen.push(("the agent's log".into(), log));
    let mut state_files = Vec::new();
    collect_files(&dir.path().join("state"), &mut state_files);
    assert!(!state_files.is_empty());
    for path in state_files {
        seen.push((path.display().to_string(), std::fs::read(&path).unwrap()));
    }
    for (what, bytes) in &seen {
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "{what} holds the secret:\n{}",
            String::from_utf8_lossy(bytes)
        );
    }
}

fn collect_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect_files(&path, out);
        } else if path.is_file() {
            out.push(path);
        }
    }
}
