//! What `hubagent status` and `hubagent plugins list` print for a person (without `--json`): the
//! daemon's JSON answer, laid out in sections with the same labels every time, so an operator
//! can read it at a glance and grep it. The JSON stays the interface for scripts.

use serde_json::Value;
use std::fmt::Write;

/// `hubagent status`: the agent, provisioning, hub, queue and plugins.
pub fn status(answer: &Value) -> String {
    let field = |k: &str| text(&answer[k]);
    let mut out = format!(
        "hubagent {}, pid {}, running since {}\n",
        field("version"),
        field("pid"),
        field("started_at")
    );
    let mut put = |label: &str, value: String| {
        let _ = writeln!(out, "  {:<17}{value}", format!("{label}:"));
    };
    put("config", field("config"));
    // Provisioning.
    put("provisioning", field("provisioning"));
    put("registration id", field("registration_id"));
    put("device id", field("device_id"));
    put("provisioned at", field("provisioned_at"));
    let certificate = &answer["certificate"];
    if certificate.is_object() {
        put(
            "certificate",
            format!(
                "{} until {} ({} days)",
                text(&certificate["expiry"]),
                text(&certificate["not_after"]),
                text(&certificate["days_left"])
            ),
        );
    }
    if let Some(generation) = answer["issued_generation"].as_u64() {
        put(
            "issued cert",
            format!("generation {generation} (issued by DPS)"),
        );
    }
    if answer["key"].is_string() {
        put("key", field("key"));
    }
    // The hub and the way there.
    put("hub", field("hub"));
    // Before `connection`: a clock at 1970 is why there is none. (An older daemon sends no
    // `clock`: no line rather than a guess.)
    match answer.get("clock") {
        Some(Value::String(problem)) => put("clock", problem.clone()),
        Some(Value::Null) => put("clock", "ok".to_string()),
        _ => {}
    }
    put("connection", field("connection"));
    if answer["route"].is_string() {
        put("route", field("route"));
    }
    let memory = &answer["route_memory"];
    if memory.is_object() {
        let first = text(&memory["first"]);
        let learned = text(&memory["learned_at"]);
        put(
            "auto route",
            match memory["direct_again_at"].as_str() {
                Some(again) => format!(
                    "{first} first (worked at {learned}; MQTT over TLS first again from {again})"
                ),
                None => format!("{first} first (worked at {learned})"),
            },
        );
    }
    put("desired version", field("desired_version"));
    if answer["last_error"].is_string() {
        put("last error", field("last_error"));
    }
    // The queue.
    put("published", field("published"));
    let queue = &answer["queue"];
    if queue.is_object() {
        put(
            "queued",
            format!(
                "{} messages, {} on disk",
                text(&queue["depth"]),
                bytes(&queue["bytes_on_disk"])
            ),
        );
        let count = |k: &str| queue[k].as_u64().unwrap_or(0);
        let (full, expired, corrupt) = (
            count("dropped_full"),
            count("dropped_expired"),
            count("dropped_corrupt"),
        );
        put(
            "dropped",
            format!(
                "{} (queue full {full}, expired {expired}, damaged {corrupt})",
                full + expired + corrupt
            ),
        );
        put("held back", count("held_back").to_string());
    } else {
        put("queued", field("queue_depth"));
    }
    // The plugins, one line each.
    match answer["plugins"].as_object() {
        Some(plugins) if !plugins.is_empty() => {
            put("plugins", plugin_states(plugins));
            let width = plugins.keys().map(|n| n.len()).max().unwrap_or(0);
            for (name, p) in plugins {
                let _ = writeln!(
                    out,
                    "    {name:<width$}  {:<8} {:<18} {}",
                    text(&p["kind"]),
                    text(&p["status"]),
                    counters(p)
                );
                for line in attention(p) {
                    let _ = writeln!(out, "    {:<width$}  {line}", "");
                }
            }
        }
        _ => {
            let _ = writeln!(out, "  {:<17}none configured", "plugins:");
        }
    }
    out
}

/// `hubagent plugins list`: one row per plugin (name, kind, state, ABI, counters, where it
/// comes from), then its sandbox and error.
pub fn plugins(answer: &Value) -> String {
    let Some(plugins) = answer.as_object().filter(|p| !p.is_empty()) else {
        return "no plugins configured\n".to_string();
    };
    let mut out = format!(
        "{:<20} {:<8} {:<18} {:<5} {:>9} {:>8} {:>8}  SOURCE\n",
        "NAME", "KIND", "STATE", "ABI", "PUBLISHED", "DROPPED", "RESTARTS"
    );
    for (name, p) in plugins {
        let source = match p["kind"].as_str() {
            Some("library") => format!(
                "{} ({})",
                p["path"].as_str().unwrap_or("?"),
                p["isolation"].as_str().unwrap_or("?")
            ),
            Some("exec") => p["command"]
                .as_array()
                .map(|c| {
                    c.iter()
                        .filter_map(|a| a.as_str())
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default(),
            _ => format!("builtin {}", p["builtin"].as_str().unwrap_or("?")),
        };
        let _ = writeln!(
            out,
            "{:<20} {:<8} {:<18} {:<5} {:>9} {:>8} {:>8}  {source}",
            name,
            p["kind"].as_str().unwrap_or("?"),
            p["status"].as_str().unwrap_or("?"),
            p["abi"].as_str().unwrap_or("-"),
            p["published"].as_u64().unwrap_or(0),
            p["dropped"].as_u64().unwrap_or(0),
            p["restarts"].as_u64().unwrap_or(0),
        );
        let _ = writeln!(
            out,
            "{:<20} sandbox: {}",
            "",
            describe_sandbox(&p["sandbox"])
        );
        for line in attention(p) {
            let _ = writeln!(out, "{:<20} {line}", "");
        }
    }
    let _ = writeln!(out, "{} plugins: {}", plugins.len(), plugin_states(plugins));
    out
}

/// What needs a look about one plugin, a line each: its error, the settings it refused (it runs
/// on its last accepted ones), a warning (e.g. an exec plugin that has said nothing), and lines it
/// wrote that were not messages.
fn attention(p: &Value) -> Vec<String> {
    let mut lines = Vec::new();
    if let Some(e) = p["error"].as_str() {
        lines.push(format!("error: {e}"));
    }
    if let Some(r) = p["rejectedSettings"].as_str() {
        lines.push(format!(
            "settings rejected (runs on its last accepted ones): {r}"
        ));
    }
    if let Some(w) = p["warning"].as_str() {
        lines.push(format!("warning: {w}"));
    }
    if let Some(n) = p["junkLines"].as_u64().filter(|n| *n > 0) {
        lines.push(format!(
            "{n} lines that were not messages (logged as warnings)"
        ));
    }
    lines
}

/// "2 running, 1 quarantined": how many plugins are in each state, in a fixed order.
fn plugin_states(plugins: &serde_json::Map<String, Value>) -> String {
    let mut states: Vec<(String, usize)> = Vec::new();
    for p in plugins.values() {
        let state = text(&p["status"]);
        match states.iter_mut().find(|(s, _)| *s == state) {
            Some((_, n)) => *n += 1,
            None => states.push((state, 1)),
        }
    }
    states.sort();
    states
        .iter()
        .map(|(state, n)| format!("{n} {state}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn counters(p: &Value) -> String {
    let count = |k: &str| p[k].as_u64().unwrap_or(0);
    format!(
        "{} published, {} dropped, {} restarts",
        count("published"),
        count("dropped"),
        count("restarts")
    )
}

/// One line for `plugins list`: how a plugin is confined and what it was allowed beyond the
/// default (the JSON of `plugins::sandbox::Confinement::describe`).
fn describe_sandbox(sandbox: &Value) -> String {
    if sandbox["confined"] != true {
        return sandbox["why"]
            .as_str()
            .unwrap_or("not started yet")
            .to_string();
    }
    let paths = |key: &str| -> String {
        let list: Vec<&str> = sandbox[key]
            .as_array()
            .map(|a| a.iter().filter_map(|p| p.as_str()).collect())
            .unwrap_or_default();
        if list.is_empty() {
            "-".into()
        } else {
            list.join(",")
        }
    };
    let mut line = format!(
        "{}; read {}; write {}; devices {}; network {}; unix sockets {}",
        sandbox["kernel"].as_str().unwrap_or("?"),
        paths("read"),
        paths("write"),
        paths("devices"),
        if sandbox["network"] == true {
            "yes"
        } else {
            "no"
        },
        if sandbox["unixSockets"] == true {
            "yes"
        } else {
            "no"
        },
    );
    if let Some(dir) = sandbox["privateDir"].as_str() {
        line.push_str(&format!("; private dir {dir}"));
    }
    if let Some(missing) = sandbox["notEnforced"].as_array().filter(|m| !m.is_empty()) {
        let missing: Vec<String> = missing.iter().map(text).collect();
        line.push_str(&format!("; NOT ENFORCED here: {}", missing.join(", ")));
    }
    line
}

/// A JSON value as an operator reads it: strings without quotes, nothing as "-".
fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn bytes(value: &Value) -> String {
    match value.as_u64() {
        Some(n) => bytesize::ByteSize(n).to_string(),
        None => "-".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn plugins_json() -> Value {
        json!({
            "modbus": {"kind": "exec", "status": "quarantined", "published": 3, "dropped": 1,
                       "restarts": 5, "error": "exited with status 2", "command": ["/usr/bin/modbus", "-v"],
                       "sandbox": {"confined": true, "kernel": "landlock 4", "read": [], "write": ["/srv/x"],
                                   "devices": [], "network": false, "unixSockets": false,
                                   "notEnforced": ["ioctl on devices"]}},
            "sensor": {"kind": "builtin", "builtin": "simulated-sensor", "status": "running",
                       "published": 120, "dropped": 0, "restarts": 0,
                       "sandbox": {"confined": false, "why": "in-process: not confined"}}
        })
    }

    #[test]
    fn status_has_every_section_and_each_plugin_with_its_counts() {
        let answer = json!({
            "version": "0.1.0", "pid": 42, "started_at": "2026-12-06T04:00:00Z",
            "config": "/etc/hubagent/config.toml", "provisioning": "provisioned",
            "registration_id": "gw-1", "device_id": "gw-1", "provisioned_at": "2026-12-06T04:00:01Z",
            "hub": "hub.example", "connection": "connected", "published": 123, "queue_depth": 2,
            "desired_version": 7, "key": "primary", "clock": null,
            "queue": {"depth": 2, "bytes_on_disk": 2048, "pushed": 125, "delivered": 123,
                      "dropped_full": 4, "dropped_expired": 1, "dropped_corrupt": 0, "held_back": 9},
            "plugins": plugins_json()
        });
        let text = status(&answer);
        for line in [
            "hubagent 0.1.0, pid 42, running since 2026-12-06T04:00:00Z",
            "  provisioning:    provisioned",
            "  registration id: gw-1",
            "  key:             primary",
            "  hub:             hub.example",
            "  clock:           ok",
            "  connection:      connected",
            "  published:       123",
            "  queued:          2 messages, 2.0 KiB on disk",
            "  dropped:         5 (queue full 4, expired 1, damaged 0)",
            "  held back:       9",
            "  plugins:         1 quarantined, 1 running",
            "    modbus  exec     quarantined        3 published, 1 dropped, 5 restarts",
            "            error: exited with status 2",
            "    sensor  builtin  running            120 published, 0 dropped, 0 restarts",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing from:\n{text}"
            );
        }
        // Absent values read "-", never "null".
        let empty = status(&json!({"provisioning": "unprovisioned", "connection": "disconnected"}));
        assert!(empty.contains("  hub:             -\n"), "{empty}");
        assert!(
            empty.contains("  plugins:         none configured\n"),
            "{empty}"
        );
        assert!(!empty.contains("null"), "{empty}");
        assert!(!empty.contains("clock:"), "an older daemon: {empty}");
        let unset = status(&json!({"clock": "the system clock reads 1970-01-01T00:00:05Z, ..."}));
        assert!(
            unset.contains("  clock:           the system clock reads 1970-01-01T00:00:05Z, ...\n"),
            "{unset}"
        );
    }

    #[test]
    fn plugins_list_shows_source_sandbox_error_and_a_total() {
        let text = plugins(&plugins_json());
        assert!(text.starts_with("NAME "), "{text}");
        assert!(text.contains("/usr/bin/modbus -v"), "{text}");
        assert!(text.contains("builtin simulated-sensor"), "{text}");
        assert!(
            text.contains("landlock 4; read -; write /srv/x; devices -; network no; unix sockets no; NOT ENFORCED here: ioctl on devices"),
            "{text}"
        );
        assert!(text.contains("sandbox: in-process: not confined"), "{text}");
        assert!(text.contains(" error: exited with status 2"), "{text}");
        assert!(
            text.ends_with("2 plugins: 1 quarantined, 1 running\n"),
            "{text}"
        );
        assert_eq!(plugins(&json!({})), "no plugins configured\n");
    }
}
