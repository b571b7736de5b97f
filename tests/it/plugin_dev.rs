//! A plugin author's loop (issue #22): `hubagent reload` runs a rebuilt library and retries a
//! quarantined plugin without dropping the hub session; `hubagent plugins restart NAME`; a
//! desired entry for a plugin that does not exist is reported; a Python exec plugin's `print`
//! reaches the agent without a flush.

use std::path::Path;

use hubagent_tests::*;
use serde_json::{Value, json};

/// An agent with `plugins`, connected; returns it and its configuration.
async fn connected_agent(
    root: &Path,
    running: &hubsim::Running,
    device: &str,
    plugins: &str,
) -> (AgentProcess, std::path::PathBuf) {
    let config = plugin_agent_config(root, running, device, plugins, true);
    let agent = AgentProcess::start(&config);
    assert!(
        running
            .sim
            .wait_until(WAIT, |s| hub_connects(s, device) >= 1)
            .await,
        "{}",
        agent.log_text()
    );
    (agent, config)
}

/// Replaces `target` with a copy of `source` the way a build does: a new file renamed over the
/// old one (the running process keeps its mapping of the old file).
fn rebuild(source: &Path, target: &Path) {
    let staged = target.with_extension("new");
    std::fs::copy(source, &staged).unwrap();
    std::fs::rename(&staged, target).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_runs_a_rebuilt_library_and_keeps_the_hub_session() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let running = start_sim(&root).await;
    let sim = running.sim.clone();
    let device = "gw-dev-rebuild";
    let library = root.join("plugins/meter.so");
    std::fs::create_dir_all(library.parent().unwrap()).unwrap();
    rebuild(&built_library("hubagent_simulated_sensor"), &library);
    let plugins = format!(
        "[[plugin]]\nname = \"meter\"\nkind = \"library\"\npath = \"{}\"\n[plugin.settings]\ninterval = \"100ms\"\n",
        library.display()
    );
    let (agent, _config) = connected_agent(&root, &running, device, &plugins).await;
    assert!(
        sim.wait_until(WAIT, |s| bodies_from(s, device, "meter").len() >= 2)
            .await,
        "{}",
        agent.log_text()
    );
    // The author rebuilds the plugin (here: another library at the same path) and reloads.
    rebuild(&built_library("hubagent_test_misbehave"), &library);
    let connects = hub_connects(&sim, device);
    let out = agent.cli(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    let new_code = |s: &hubsim::Sim| {
        bodies_from(s, device, "meter")
            .iter()
            .any(|b| b["mode"] == "ok")
    };
    assert!(
        sim.wait_until(WAIT, new_code).await,
        "the rebuilt library does not run\n{}",
        agent.log_text()
    );
    assert!(
        agent
            .log_text()
            .contains("plugin files changed (rebuilt or edited); stopping it"),
        "{}",
        agent.log_text()
    );
    assert_eq!(
        hub_connects(&sim, device),
        connects,
        "the hub session was dropped"
    );
    assert_eq!(agent.status()["connection"], "connected");
    assert_eq!(agent.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_retries_a_quarantined_plugin_and_restart_starts_one_afresh() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let running = start_sim(&root).await;
    let sim = running.sim.clone();
    let device = "gw-dev-quarantine";
    // The plugin needs a file that is not there yet: it fails until the operator provides it.
    let inputs = root.join("inputs");
    std::fs::create_dir(&inputs).unwrap();
    let needed = inputs.join("calibration");
    let plugins = format!(
        r#"[[plugin]]
name = "gauge"
kind = "exec"
command = ["/bin/sh", "-c", "[ -f {needed} ] || {{ echo 'no calibration' >&2; exit 3; }}; while :; do echo '{{\"body\": {{\"level\": 1}}}}'; sleep 0.2; done"]
allow_read = ["{inputs}"]
restart_backoff = "100ms"
quarantine_after = 2
[plugin.settings]
"#,
        needed = needed.display(),
        inputs = inputs.display(),
    );
    let (agent, _config) = connected_agent(&root, &running, device, &plugins).await;
    agent
        .wait_plugins("the gauge quarantined", |p| {
            p["gauge"]["status"] == "quarantined"
        })
        .await;
    std::fs::write(&needed, "1.0").unwrap();
    let connects = hub_connects(&sim, device);
    let out = agent.cli(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    agent
        .wait_plugins("the gauge running again after the reload", |p| {
            p["gauge"]["status"] == "running"
        })
        .await;
    assert!(
        sim.wait_until(WAIT, |s| !bodies_from(s, device, "gauge").is_empty())
            .await,
        "{}",
        agent.log_text()
    );
    assert_eq!(
        hub_connects(&sim, device),
        connects,
        "the hub session was dropped"
    );

    // `plugins restart`: a new process, the session untouched.
    let pid = agent
        .wait_plugins("a pid", |p| p["gauge"]["pid"].is_u64())
        .await["gauge"]["pid"]
        .clone();
    let out = agent.cli(&["plugins", "restart", "gauge"]);
    assert!(out.status.success(), "{out:?}");
    agent
        .wait_plugins("the gauge running in a new process", |p| {
            p["gauge"]["status"] == "running"
                && p["gauge"]["pid"].is_u64()
                && p["gauge"]["pid"] != pid
        })
        .await;
    assert_eq!(
        hub_connects(&sim, device),
        connects,
        "the hub session was dropped"
    );
    // The same from the cloud: the built-in direct method restartPlugin.
    let pid = agent
        .wait_plugins("a pid", |p| p["gauge"]["pid"].is_u64())
        .await["gauge"]["pid"]
        .clone();
    let key = device_key(&sim, device);
    let (status, answer) =
        hubsim::twin::invoke_method(&sim, &key, "restartPlugin", &json!({"name": "gauge"}), WAIT)
            .await
            .unwrap();
    assert_eq!(status, 202, "{answer}");
    agent
        .wait_plugins("the gauge restarted by the direct method", |p| {
            p["gauge"]["status"] == "running"
                && p["gauge"]["pid"].is_u64()
                && p["gauge"]["pid"] != pid
        })
        .await;
    let (status, answer) =
        hubsim::twin::invoke_method(&sim, &key, "restartPlugin", &json!({"name": "gaueg"}), WAIT)
            .await
            .unwrap();
    assert_eq!(status, 404, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("configured: gauge"),
        "{answer}"
    );
    let out = agent.cli(&["plugins", "restart", "gaueg"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stderr.contains("no plugin named 'gaueg' (configured: gauge)"),
        "{stderr}"
    );
    assert_eq!(agent.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_desired_entry_for_an_unknown_plugin_is_reported_and_logged_once() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let running = start_sim(&root).await;
    let sim = running.sim.clone();
    let device = "gw-dev-unknown";
    let plugins = "[[plugin]]\nname = \"sensor\"\nkind = \"builtin\"\nbuiltin = \"simulated-sensor\"\ninterval = \"200ms\"\n";
    let (agent, _config) = connected_agent(&root, &running, device, plugins).await;
    // A typo in the cloud: "snesor" for "sensor"; then a second change, the typo still there.
    for interval in ["300ms", "400ms"] {
        hubsim::twin::apply_desired_patch(
            &sim,
            &device_key(&sim, device),
            &json!({"plugins": {"snesor": {"interval": interval}}}),
        )
        .unwrap();
    }
    assert!(
        sim.wait_until(WAIT, |s| reported(s, device, "agent")["unknownPlugins"]
            == json!(["snesor"]))
            .await,
        "{}",
        agent.log_text()
    );
    let said = agent
        .log_text()
        .matches("desired.plugins.snesor names no configured plugin (configured: sensor)")
        .count();
    assert_eq!(said, 1, "{}", agent.log_text());
    // Fixed in the cloud: the report clears.
    hubsim::twin::apply_desired_patch(
        &sim,
        &device_key(&sim, device),
        &json!({"plugins": {"snesor": null, "sensor": {"interval": "300ms"}}}),
    )
    .unwrap();
    assert!(
        sim.wait_until(WAIT, |s| reported(s, device, "agent")
            .get("unknownPlugins")
            .is_none_or(Value::is_null))
            .await,
        "{}",
        agent.log_text()
    );
    assert_eq!(agent.stop(), Some(0));
}

/// Python block-buffers stdout into a pipe: without PYTHONUNBUFFERED (which the agent sets for
/// exec plugins), this plugin's one `print` would sit in its buffer forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_print_reaches_the_agent_without_a_flush() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let running = start_sim(&root).await;
    let sim = running.sim.clone();
    let device = "gw-dev-print";
    let plugins = format!(
        r#"[[plugin]]
name = "printer"
kind = "exec"
command = ["{PYTHON}", "-c", "import json, time\nprint(json.dumps({{'body': {{'hello': 1}}}}))\nprint('not json')\ntime.sleep(3600)"]
"#
    );
    let (agent, _config) = connected_agent(&root, &running, device, &plugins).await;
    assert!(
        sim.wait_until(WAIT, |s| bodies_from(s, device, "printer").len() == 1)
            .await,
        "{}",
        agent.log_text()
    );
    // A line that is not a message is quoted in the log, so the author sees what was wrong.
    agent
        .wait_log_line("the junk line quoted", |l| {
            l.contains("ignored a line that is not a message")
                && l.ends_with("not json plugin=printer")
        })
        .await;
    assert_eq!(agent.stop(), Some(0));
}

/// `config check` tries every plugin as the daemon would start it, without the daemon, and names
/// what keeps each one from starting; `hubagent check` reports the same as `plugins.load`.
#[test]
fn config_check_names_each_plugin_that_cannot_start() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let good = install_plugin(&root, &built_library("hubagent_simulated_sensor"), 0o644);
    // A library that is no plugin: it exports nothing the agent looks for.
    let source = root.join("answer.c");
    std::fs::write(&source, "int answer = 42;\n").unwrap();
    let not_a_plugin = root.join("plugins/libanswer.so");
    let built = std::process::Command::new("gcc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&not_a_plugin)
        .arg(&source)
        .status()
        .unwrap();
    assert!(built.success());
    // Plugins that export the entry point but whose descriptor the agent must refuse: one built
    // for another ABI major, one that leaves out a callback.
    let descriptor_library = |name: &str, abi_major: &str, stop: &str| {
        let source = root.join(format!("{name}.c"));
        std::fs::write(
            &source,
            format!(
                "#include <hubagent_plugin.h>\n\
                 static int32_t start(const hubagent_host_api *h, hubagent_str s, void **i, hubagent_buf *e) \
                 {{ (void)h; (void)s; (void)e; *i = 0; return HUBAGENT_OK; }}\n\
                 static int32_t apply(void *i, hubagent_str s, hubagent_buf *r) {{ (void)i; (void)s; (void)r; return HUBAGENT_OK; }}\n\
                 static int32_t stop(void *i) {{ (void)i; return HUBAGENT_OK; }}\n\
                 static const hubagent_plugin_descriptor d = {{ HUBAGENT_PLUGIN_MAGIC, {abi_major}, 0, \
                 sizeof(hubagent_plugin_descriptor), sizeof(hubagent_host_api), sizeof(hubagent_message), 0, \
                 \"{name}\", \"1\", start, apply, {stop}, 0, 0, 0, 0 }};\n\
                 const hubagent_plugin_descriptor *hubagent_plugin_entry_v1(void) {{ (void)stop; return &d; }}\n"
            ),
        )
        .unwrap();
        let library = root.join(format!("plugins/lib{name}.so"));
        let built = std::process::Command::new("gcc")
            .args(["-shared", "-fPIC", "-Wall", "-Werror", "-I"])
            .arg(repo_root().join("plugins/sdk/include"))
            .arg("-o")
            .arg(&library)
            .arg(&source)
            .status()
            .unwrap();
        assert!(built.success(), "{name}.c does not build");
        library
    };
    let future_abi = descriptor_library("future", "2", "stop");
    let no_stop = descriptor_library("nostop", "HUBAGENT_PLUGIN_ABI_MAJOR", "0");
    // Someone else's file: loaded only from root-owned paths (the tests run as root, as CI does).
    let foreign = root.join("plugins/foreign.so");
    std::fs::copy(&good, &foreign).unwrap();
    std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).unwrap();
    let writable = root.join("plugins/writable.so");
    std::fs::copy(&good, &writable).unwrap();
    set_mode(&writable, 0o664);
    let script = root.join("plugins/not-executable.sh");
    std::fs::write(&script, "#!/bin/sh\necho '{\"body\": 1}'\n").unwrap();
    set_mode(&script, 0o644);
    let library = |name: &str, path: &Path| {
        format!(
            "[[plugin]]\nname = \"{name}\"\nkind = \"library\"\npath = \"{}\"\n",
            path.display()
        )
    };
    let exec = |name: &str, program: &str| {
        format!("[[plugin]]\nname = \"{name}\"\nkind = \"exec\"\ncommand = [\"{program}\"]\n")
    };
    // (the plugin's table, what config check must say about it)
    let cases = [
        (library("good", &good), "plugin good: OK (library ABI 1."),
        (
            library("missing", &root.join("plugins/nope.so")),
            "plugin missing: CANNOT START: ",
        ),
        (
            library("writable", &writable),
            "is writable by group or others (mode 664)",
        ),
        (
            library("stranger", &not_a_plugin),
            "exports no hubagent_plugin_entry_v1: not a hubagent plugin",
        ),
        (
            library("future", &future_abi),
            "plugin ABI 2.0 is not supported by this agent",
        ),
        (
            library("nostop", &no_stop),
            "descriptor lacks start, apply_settings or stop",
        ),
        (
            library("foreign", &foreign),
            "is owned by uid 65534, not root",
        ),
        (
            exec("typo", "sensro-reader"),
            "plugin typo: CANNOT START: program 'sensro-reader' not found in PATH",
        ),
        (
            exec("script", script.to_str().unwrap()),
            "not-executable.sh: not executable (chmod 755 it, or name its interpreter first",
        ),
    ];
    let config = root.join("config.toml");
    let base = format!(
        "[agent]\nstate_dir = \"{}\"\n[provisioning]\nsource = \"manual\"\niothub_hostname = \"hub.local\"\ndevice_id = \"d\"\n[provisioning.attestation]\nmethod = \"symmetric_key\"\nkey = {{ value = \"a2V5\" }}\n",
        root.join("state").display()
    );
    for (table, expected) in &cases {
        std::fs::write(&config, format!("{base}{table}")).unwrap();
        let out = std::process::Command::new(hubagent_bin())
            .args(["--config", config.to_str().unwrap(), "config", "check"])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains(expected), "{table}\n{stdout}");
        let broken = !expected.contains(": OK (");
        assert_eq!(
            out.status.code(),
            Some(if broken { 1 } else { 0 }),
            "{table}\n{out:?}"
        );
    }
    // `hubagent check` says the same, with all of them at once.
    let all: String = cases.iter().map(|(table, _)| table.as_str()).collect();
    std::fs::write(&config, format!("{base}{all}")).unwrap();
    let out = std::process::Command::new(hubagent_bin())
        .args(["--config", config.to_str().unwrap(), "check", "--json"])
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let loads: Vec<&Value> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["id"] == "plugins.load")
        .collect();
    assert_eq!(loads.len(), cases.len(), "{report}");
    let failed = loads.iter().filter(|c| c["result"] == "fail").count();
    assert_eq!(failed, cases.len() - 1, "{report}");
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}
