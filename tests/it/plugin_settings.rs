//! Settings made easy and failures made visible (issue #22): the Rust SDK's typed settings send
//! their error back as the rejection reason, a new interval applies at once, a refused change
//! leaves the plugin `running` with the reason beside it (and no "applied" in the log), an exec
//! plugin that says nothing the agent understands gets a warning and its junk lines are counted,
//! a library plugin gets its `env`, and plugin stderr lines choose their log level.

use std::path::Path;

use hubagent_tests::*;
use serde_json::{Value, json};

/// An agent with `plugins`, connected.
async fn connected_agent(
    root: &Path,
    running: &hubsim::Running,
    device: &str,
    plugins: &str,
) -> AgentProcess {
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
    agent
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

/// The Rust SDK's typed settings: a bad value is refused with the key's path as the reason, the
/// plugin stays `running` on its old settings, and a new interval applies at once (the worker
/// waits on the SDK's `Control`, which a settings change wakes): from one hour to 100 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_settings_refusal_is_reported_beside_running_and_a_new_interval_applies_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let running = start_sim(&root).await;
    let sim = running.sim.clone();
    let device = "gw-settings-typed";
    let library = install_plugin(&root, &built_library("hubagent_simulated_sensor"), 0o644);
    let plugins = format!(
        "[[plugin]]\nname = \"meter\"\nkind = \"library\"\npath = \"{}\"\n[plugin.settings]\ninterval = \"1h\"\n",
        library.display()
    );
    let agent = connected_agent(&root, &running, device, &plugins).await;
    wait_reported(
        &sim,
        device,
        "meter",
        "running",
        |r| r["status"] == "running",
        &agent,
    )
    .await;
    let key = device_key(&sim, device);
    let v = hubsim::twin::apply_desired_patch(
        &sim,
        &key,
        &json!({"plugins": {"meter": {"interval": "soon"}}}),
    )
    .unwrap();
    let r = wait_reported(
        &sim,
        device,
        "meter",
        "the refusal",
        |r| r["desiredVersion"] == v && r["rejectedSettings"].is_string(),
        &agent,
    )
    .await;
    assert_eq!(r["status"], "running", "{r}");
    assert_eq!(
        r["rejectedSettings"],
        "settings.interval: 'soon' is not a duration (write e.g. \"500ms\", \"5s\", \"1m\")",
        "{r}"
    );
    assert_eq!(
        r["settings"]["interval"], "1h",
        "the old settings stay: {r}"
    );
    assert!(r.get("error").is_none(), "a refusal is no error: {r}");
    let list = agent.plugins_list();
    assert_eq!(list["meter"]["status"], "running", "{list}");
    let out = agent.cli(&["plugins", "list"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(
            "settings rejected (runs on its last accepted ones): settings.interval: 'soon'"
        ),
        "{out:?}"
    );

    // An hour's interval is being waited out; the new one applies now.
    assert!(bodies_from(&sim, device, "meter").is_empty());
    hubsim::twin::apply_desired_patch(
        &sim,
        &key,
        &json!({"plugins": {"meter": {"interval": "100ms"}}}),
    )
    .unwrap();
    assert!(
        sim.wait_until(WAIT, |s| bodies_from(s, device, "meter").len() >= 2)
            .await,
        "the new interval waits for the old one\n{}",
        agent.log_text()
    );
    let r = reported_plugin(&sim, device, "meter");
    assert!(r.get("rejectedSettings").is_none(), "cleared: {r}");
    assert_eq!(agent.stop(), Some(0));
}

/// The C example reads its settings with the agent's accessors (ABI 1.2): the duration format,
/// the old `interval_ms`, and a refusal whose reason names the key, from C with no JSON code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_c_example_reads_settings_with_the_accessors() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let running = start_sim(&root).await;
    let sim = running.sim.clone();
    let device = "gw-settings-c";
    let built = build_c_plugin(
        &root,
        &repo_root().join("plugins/examples/c-counter/counter.c"),
        "libc_counter.so",
        &repo_root().join("plugins/sdk/include"),
    );
    let library = install_plugin(&root, &built, 0o644);
    let plugins = format!(
        "[[plugin]]\nname = \"counter\"\nkind = \"library\"\npath = \"{}\"\n[plugin.settings]\ninterval_ms = 3600000\nstep = 2\n",
        library.display()
    );
    let agent = connected_agent(&root, &running, device, &plugins).await;
    let r = wait_reported(
        &sim,
        device,
        "counter",
        "running with its own property",
        |r| r["status"] == "running" && r["properties"]["unit"] == "counts",
        &agent,
    )
    .await;
    assert_eq!(r["abi"], "1.3", "{r}");
    let key = device_key(&sim, device);
    let v = hubsim::twin::apply_desired_patch(
        &sim,
        &key,
        &json!({"plugins": {"counter": {"interval": true}}}),
    )
    .unwrap();
    let r = wait_reported(
        &sim,
        device,
        "counter",
        "the refusal",
        |r| r["desiredVersion"] == v && r["rejectedSettings"].is_string(),
        &agent,
    )
    .await;
    assert_eq!(
        r["rejectedSettings"], "settings.interval: expected a duration such as \"5s\", got true",
        "{r}"
    );
    // It started on the old key (interval_ms: an hour, nothing published yet); the duration
    // format takes over and applies at once: the C example wakes its thread on a change.
    assert!(bodies_from(&sim, device, "counter").is_empty());
    hubsim::twin::apply_desired_patch(
        &sim,
        &key,
        &json!({"plugins": {"counter": {"interval": "100ms"}}}),
    )
    .unwrap();
    assert!(
        sim.wait_until(WAIT, |s| bodies_from(s, device, "counter").len() >= 2)
            .await,
        "{}",
        agent.log_text()
    );
    assert_eq!(bodies_from(&sim, device, "counter")[0]["step"], 2);
    assert_eq!(agent.stop(), Some(0));
}

/// An exec plugin can only refuse settings after it has read them: the agent logs that it sent
/// them, never that they were applied, and the refusal is shown beside `running`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_plugins_refusal_is_not_logged_as_applied_first() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let running = start_sim(&root).await;
    let sim = running.sim.clone();
    let device = "gw-settings-exec-refusal";
    let plugins = format!(
        r#"[[plugin]]
name = "picky"
kind = "exec"
command = ["{PYTHON}", "-c", "import json, sys\nfor line in sys.stdin:\n    s = json.loads(line)\n    if 'room' in s:\n        print(json.dumps({{'rejectSettings': 'no rooms here'}}))\n    else:\n        print(json.dumps({{'body': {{'tag': s.get('tag')}}}}))\n"]
[plugin.settings]
tag = "a"
"#
    );
    let agent = connected_agent(&root, &running, device, &plugins).await;
    assert!(
        sim.wait_until(WAIT, |s| !bodies_from(s, device, "picky").is_empty())
            .await,
        "{}",
        agent.log_text()
    );
    let v = hubsim::twin::apply_desired_patch(
        &sim,
        &device_key(&sim, device),
        &json!({"plugins": {"picky": {"room": "hall"}}}),
    )
    .unwrap();
    let r = wait_reported(
        &sim,
        device,
        "picky",
        "the refusal",
        |r| r["desiredVersion"] == v && r["rejectedSettings"] == "no rooms here",
        &agent,
    )
    .await;
    assert_eq!(r["status"], "running", "{r}");
    assert_eq!(r["settings"], json!({"tag": "a"}), "the old settings: {r}");
    let log = agent.log_text();
    assert!(log.contains("settings sent to the plugin"), "{log}");
    assert!(!log.contains("settings applied"), "{log}");
    assert_eq!(agent.stop(), Some(0));
}

/// A plugin whose stdout is block-buffered (here Python, with the agent's PYTHONUNBUFFERED
/// undone by `env`) publishes nothing: after `warn_if_silent` the log and status say why.
/// Junk lines are counted in the twin and the status; an exec plugin reports its own properties
/// and sets a message's creation time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_exec_plugin_gets_a_warning_and_junk_lines_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let running = start_sim(&root).await;
    let sim = running.sim.clone();
    let device = "gw-settings-silent";
    let plugins = format!(
        r#"[[plugin]]
name = "buffered"
kind = "exec"
command = ["{PYTHON}", "-c", "import json, time\nprint(json.dumps({{'body': {{'n': 1}}}}))\ntime.sleep(3600)"]
env = {{ PYTHONUNBUFFERED = "" }}
warn_if_silent = "1s"

[[plugin]]
name = "noisy"
kind = "exec"
command = ["/bin/sh", "-c", "echo 'starting up'; echo 'still starting'; echo '{{\"reported\": {{\"a.b\": 1}}}}'; echo '{{\"reported\": {{\"mode\": \"noisy\"}}}}'; echo '{{\"body\": {{\"n\": 1}}, \"creationTime\": \"2026-01-02T04:04:05.5+01:00\"}}'; exec sleep 3600"]
"#
    );
    let agent = connected_agent(&root, &running, device, &plugins).await;
    let list = agent
        .wait_plugins("the silence warning", |p| {
            p["buffered"]["warning"].is_string()
        })
        .await;
    let warning = list["buffered"]["warning"].as_str().unwrap();
    assert!(
        warning.contains("without writing a line the agent understands")
            && warning.contains("flush its stdout"),
        "{warning}"
    );
    assert_eq!(list["buffered"]["status"], "running");
    let out = agent.cli(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    // The human status lists the plugin, then its warning on the line below.
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let row = lines
        .iter()
        .position(|l| l.starts_with("buffered ") && l.contains(" running "))
        .unwrap_or_else(|| panic!("no row for plugin buffered:\n{text}"));
    assert!(
        lines
            .get(row + 1)
            .is_some_and(|l| l.starts_with("warning: running for 1s without writing")),
        "{text}"
    );
    agent
        .wait_log_line("the warning logged", |l| {
            l.contains("WARN")
                && l.contains("may not flush its stdout")
                && l.contains("plugin=buffered")
        })
        .await;
    let r = wait_reported(
        &sim,
        device,
        "buffered",
        "the warning",
        |r| r["warning"].is_string(),
        &agent,
    )
    .await;
    assert_eq!(r["status"], "running", "{r}");
    // The other plugin wrote two lines that are no messages, then one.
    let r = wait_reported(
        &sim,
        device,
        "noisy",
        "the junk count",
        |r| r["junkLines"] == 2,
        &agent,
    )
    .await;
    assert_eq!(r["status"], "running", "{r}");
    assert!(r.get("warning").is_none(), "{r}");
    assert_eq!(agent.plugins_list()["noisy"]["junkLines"], 2);
    // Its own reported property, and the one IoT Hub would refuse, refused with the reason.
    let r = wait_reported(
        &sim,
        device,
        "noisy",
        "its own properties",
        |r| r["properties"].is_object(),
        &agent,
    )
    .await;
    assert_eq!(r["properties"], json!({"mode": "noisy"}), "{r}");
    agent
        .wait_log_line("the refused properties", |l| {
            l.contains("reported properties refused: a.b: property names cannot contain '.'")
                && l.contains("plugin=noisy")
        })
        .await;
    // Its creation time, in UTC, as the hub's system property.
    assert!(
        sim.wait_until(WAIT, |s| !bodies_from(s, device, "noisy").is_empty())
            .await
    );
    let record = records(&sim, device)
        .into_iter()
        .find(|r| r.properties.get("source").map(String::as_str) == Some("noisy"))
        .unwrap();
    assert_eq!(
        record.system_properties["creation-time"], "2026-01-02T03:04:05.500Z",
        "{:?}",
        record.system_properties
    );
    assert_eq!(agent.stop(), Some(0));
}

/// `env` for a library plugin (here RUST_BACKTRACE) reaches its plugin-host process; through
/// ABI 1.2 the plugin reports its own properties (what IoT Hub would refuse is refused with the
/// reason) and sets its message's creation time, which reaches the hub as the system property;
/// stderr lines choose their level (`<3>`, `WARN:`), the rest get `stderr_level`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_library_plugin_gets_env_reports_properties_sets_creation_time_and_stderr_levels() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let running = start_sim(&root).await;
    let sim = running.sim.clone();
    let device = "gw-settings-env";
    let source = root.join("envplugin.c");
    std::fs::write(&source, ENV_PLUGIN).unwrap();
    let built = build_c_plugin(
        &root,
        &source,
        "libenvplugin.so",
        &repo_root().join("plugins/sdk/include"),
    );
    let library = install_plugin(&root, &built, 0o644);
    let plugins = format!(
        r#"[[plugin]]
name = "envy"
kind = "library"
path = "{}"
env = {{ RUST_BACKTRACE = "1" }}

[[plugin]]
name = "talker"
kind = "exec"
command = ["/bin/sh", "-c", "echo '<3>disk gone' >&2; echo 'WARN: slow disk' >&2; echo 'plain words' >&2; echo '{{\"body\": 1}}'; exec sleep 3600"]
stderr_level = "error"
"#,
        library.display()
    );
    let agent = connected_agent(&root, &running, device, &plugins).await;
    assert!(
        sim.wait_until(WAIT, |s| !bodies_from(s, device, "envy").is_empty())
            .await,
        "{}",
        agent.log_text()
    );
    let body = &bodies_from(&sim, device, "envy")[0];
    assert_eq!(body["RUST_BACKTRACE"], "1", "{body}");
    assert!(
        body["dotted"]
            .as_str()
            .unwrap()
            .starts_with("fw.version: property names cannot contain '.'"),
        "{body}"
    );
    assert!(
        body["oversize"]
            .as_str()
            .unwrap()
            .contains("at most 4096 per plugin"),
        "{body}"
    );
    let record = records(&sim, device)
        .into_iter()
        .find(|r| r.properties.get("source").map(String::as_str) == Some("envy"))
        .unwrap();
    assert_eq!(
        record.system_properties["creation-time"], "2026-01-02T03:04:05.678Z",
        "{:?}",
        record.system_properties
    );
    let r = wait_reported(
        &sim,
        device,
        "envy",
        "its own properties",
        |r| r["properties"].is_object(),
        &agent,
    )
    .await;
    assert_eq!(
        r["properties"],
        json!({"firmware": "1.2", "calibration": {"offset": 0.5}}),
        "{r}"
    );
    for (level, text) in [
        ("ERROR", "disk gone"),
        ("WARN", "slow disk"),
        ("ERROR", "plain words"),
    ] {
        agent
            .wait_log_line(&format!("{text} at {level}"), |l| {
                l.contains(&format!(" {level} ")) && l.contains(&format!(" {text} plugin=talker"))
            })
            .await;
    }
    assert!(!agent.log_text().contains("<3>"), "the prefix is cut off");
    assert_eq!(agent.stop(), Some(0));
}

/// Reports its own properties (first two that IoT Hub would refuse), then publishes once, with
/// a creation time of its own: `{"RUST_BACKTRACE": …, "dotted": why, "oversize": why}`.
const ENV_PLUGIN: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "hubagent_plugin.h"

static int32_t env_start(const hubagent_host_api *host, hubagent_str settings, void **instance,
                         hubagent_buf *error) {
    (void)settings;
    (void)error;
    char dotted[512] = {0}, oversize[512] = {0};
    hubagent_buf why1 = {(uint8_t *)dotted, sizeof dotted - 1, 0};
    hubagent_buf why2 = {(uint8_t *)oversize, sizeof oversize - 1, 0};
    if (hubagent_report_properties(host, "{\"fw.version\": \"1.2\"}", &why1) == HUBAGENT_OK) return HUBAGENT_ERR_FAILED;
    static char big[6000];
    memset(big, 0, sizeof big);
    /* Two strings of 3000 characters: each within the hub's 4 KB, together over 4 KB. */
    strcpy(big, "{\"a\": \"");
    memset(big + strlen(big), 'x', 3000);
    strcat(big, "\", \"b\": \"");
    memset(big + strlen(big), 'y', 3000);
    strcat(big, "\"}");
    if (hubagent_report_properties(host, big, &why2) == HUBAGENT_OK) return HUBAGENT_ERR_FAILED;
    if (hubagent_report_properties(host, "{\"firmware\": \"1.2\", \"calibration\": {\"offset\": 0.5}}", error) != HUBAGENT_OK) {
        return HUBAGENT_ERR_FAILED;
    }
    const char *value = getenv("RUST_BACKTRACE");
    char body[1400];
    int n = snprintf(body, sizeof body,
                     "{\"RUST_BACKTRACE\": \"%s\", \"dotted\": \"%s\", \"oversize\": \"%s\"}",
                     value ? value : "unset", dotted, oversize);
    hubagent_message m;
    memset(&m, 0, sizeof m);
    m.struct_size = sizeof m;
    m.body.ptr = (const uint8_t *)body;
    m.body.len = (size_t)n;
    m.content_type = hubagent_str_from("application/json");
    m.content_encoding = hubagent_str_from("utf-8");
    m.creation_time_ms = 1767323045678; /* 2026-01-02T03:04:05.678Z */
    host->publish(host->ctx, &m);
    *instance = (void *)host;
    return HUBAGENT_OK;
}

static int32_t env_apply(void *instance, hubagent_str settings, hubagent_buf *reason) {
    (void)instance;
    (void)settings;
    (void)reason;
    return HUBAGENT_OK;
}

static int32_t env_stop(void *instance) {
    (void)instance;
    return HUBAGENT_OK;
}

static const hubagent_plugin_descriptor descriptor = {
    .magic = HUBAGENT_PLUGIN_MAGIC,
    .abi_major = HUBAGENT_PLUGIN_ABI_MAJOR,
    .abi_minor = HUBAGENT_PLUGIN_ABI_MINOR,
    .descriptor_size = sizeof(hubagent_plugin_descriptor),
    .host_api_size = sizeof(hubagent_host_api),
    .message_size = sizeof(hubagent_message),
    .name = "envy",
    .version = "1.0.0",
    .start = env_start,
    .apply_settings = env_apply,
    .stop = env_stop,
};

const hubagent_plugin_descriptor *hubagent_plugin_entry_v1(void) { return &descriptor; }
"#;
