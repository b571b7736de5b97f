//! The agent's own lines in the systemd journal, for the `logs` direct method when the agent logs
//! there: unlike the in-memory ring (recent_logs.rs) they reach back past restarts and crashes.
//! Read with Debian's `journalctl` (the journal's own reader; a libsystemd binding would add a
//! C library for one query). The unit runs with `SupplementaryGroups=systemd-journal` so its user
//! may read the journal (docs/security.md says what that means for plugins); only the entries the
//! agent wrote itself, as its own user (and in its own unit where the cgroup names it), are asked
//! for.

use std::time::Duration;

use serde_json::Value;

use super::recent_logs::{Filter, LEVELS, LogLine, cut_line, pick};

/// How long `journalctl` may take: well below the hub's 30 s method timeout.
const JOURNAL_TIMEOUT: Duration = Duration::from_secs(10);

/// The systemd service this process runs in (`hubagent.service`), from its cgroup; `None` outside
/// a service (a terminal, a test) and in a private cgroup namespace (systemd >= 257 with
/// `ProtectControlGroups=private`, where the cgroup reads "/").
fn own_unit() -> Option<String> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    unit_of_cgroup(&cgroup)
}

fn unit_of_cgroup(cgroup: &str) -> Option<String> {
    // cgroup v2: one line "0::/system.slice/hubagent.service" (a sub-cgroup may follow).
    let path = cgroup.lines().find_map(|line| line.strip_prefix("0::"))?;
    path.split('/')
        .rev()
        .find(|part| part.ends_with(".service"))
        .map(str::to_string)
}

fn own_uid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

/// The newest of the agent's lines matching `filter`, oldest first, within `max_bytes` of JSON;
/// whether older matching lines were left out. An error says why the journal could not answer
/// (not installed, not readable by this user), so the caller can fall back to the ring.
pub async fn recent(filter: &Filter, max_bytes: usize) -> Result<(Vec<LogLine>, bool), String> {
    let mut command = tokio::process::Command::new("journalctl");
    command
        .args(["--no-pager", "--output=json", "--reverse"])
        .arg(format!("--lines={}", filter.limit.saturating_add(1)))
        .arg(format!("--priority=0..{}", priority(filter.max_rank)))
        .arg(format!("_UID={}", own_uid()))
        .arg(format!(
            "SYSLOG_IDENTIFIER={}",
            super::logging::SYSLOG_IDENTIFIER
        ))
        // Only what the agent logged natively (the lines its memory also keeps), not what a
        // process wrote to the unit's stdout or stderr.
        .arg("_TRANSPORT=journal")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    if let Some(unit) = own_unit() {
        command.arg(format!("_SYSTEMD_UNIT={unit}"));
    }
    if let Some(plugin) = &filter.plugin {
        command.arg(format!("PLUGIN={plugin}"));
    }
    if let Some(since) = filter.since {
        command.arg(format!("--since=@{}", since.unix_timestamp()));
    }
    let output = tokio::time::timeout(JOURNAL_TIMEOUT, command.output())
        .await
        .map_err(|_| format!("journalctl took more than {}s", JOURNAL_TIMEOUT.as_secs()))?
        .map_err(|e| format!("cannot run journalctl: {e}"))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Unprivileged, journalctl still exits 0, with what it may read (nothing of a system
    // service) and a hint on stderr ("not seeing messages from other users and the system",
    // "insufficient permissions"); without journal files it says "No journal files".
    let cannot_see = ["permission", "not seeing messages", "No journal files"]
        .iter()
        .any(|hint| stderr.contains(hint));
    if !output.status.success() || cannot_see {
        return Err(format!(
            "journalctl: {}",
            stderr.trim().lines().next().unwrap_or("failed")
        ));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let lines = stdout.lines().filter_map(|line| {
        serde_json::from_str::<Value>(line)
            .ok()
            .and_then(|entry| log_line(&entry))
    });
    Ok(pick(lines, filter, max_bytes))
}

/// The journal priority of a level rank, as tracing-journald writes it: error 3, warn 4, info 5,
/// debug 6, trace 7.
fn priority(rank: u8) -> u8 {
    3 + rank.min(LEVELS.len() as u8 - 1)
}

/// Fields every entry has that say nothing the message does not.
const PLUMBING: [&str; 10] = [
    "MESSAGE",
    "PRIORITY",
    "PLUGIN",
    "SYSLOG_IDENTIFIER",
    "SYSLOG_FACILITY",
    "SYSLOG_PID",
    "SYSLOG_TIMESTAMP",
    "TARGET",
    "INVOCATION_ID",
    "MESSAGE_ID",
];

/// One journal entry (`journalctl -o json`) as a log line: its message and the agent's own fields
/// (`device=…`), level, plugin and time.
fn log_line(entry: &Value) -> Option<LogLine> {
    let priority: usize = entry["PRIORITY"].as_str()?.parse().ok()?;
    let level = LEVELS[priority.clamp(3, 7) - 3];
    let micros: i128 = entry["__REALTIME_TIMESTAMP"].as_str()?.parse().ok()?;
    let time = time::OffsetDateTime::from_unix_timestamp_nanos(micros * 1000)
        .ok()?
        .format(&time::format_description::well_known::Rfc3339)
        .ok()?;
    let mut message = field_text(&entry["MESSAGE"])?;
    if let Some(fields) = entry.as_object() {
        for (key, value) in fields {
            let own = !key.starts_with('_')
                && !key.starts_with("CODE_")
                && !PLUMBING.contains(&key.as_str());
            if let (true, Some(value)) = (own, field_text(value)) {
                message.push_str(&format!(" {}={value}", key.to_lowercase()));
            }
        }
    }
    Some(LogLine {
        time,
        level,
        plugin: entry.get("PLUGIN").and_then(field_text),
        message: cut_line(message),
    })
}

/// A field's text: journalctl writes a string, or an array of bytes when it is not UTF-8.
fn field_text(value: &Value) -> Option<String> {
    match value {
        Value::String(text) => Some(text.clone()),
        Value::Array(bytes) => {
            let bytes: Vec<u8> = bytes
                .iter()
                .filter_map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
                .collect();
            Some(String::from_utf8_lossy(&bytes).into_owned())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unit_comes_from_the_cgroup() {
        assert_eq!(
            unit_of_cgroup("0::/system.slice/hubagent.service\n").as_deref(),
            Some("hubagent.service")
        );
        assert_eq!(
            unit_of_cgroup("0::/user.slice/user-0.slice/session-3.scope\n"),
            None
        );
    }

    #[test]
    fn an_entry_becomes_a_line_with_its_level_plugin_and_fields() {
        let entry = serde_json::json!({
            "MESSAGE": "plugin failed", "PRIORITY": "4", "PLUGIN": "modbus",
            "__REALTIME_TIMESTAMP": "1733472000000000", "_PID": "12", "CODE_FILE": "x.rs",
            "SYSLOG_IDENTIFIER": "hubagent", "DEVICE": "gw-1", "ERROR": [104, 105],
        });
        let line = log_line(&entry).unwrap();
        assert_eq!(line.level, "warn");
        assert_eq!(line.plugin.as_deref(), Some("modbus"));
        assert_eq!(line.time, "2024-12-06T08:00:00Z");
        assert_eq!(line.message, "plugin failed device=gw-1 error=hi");
        assert_eq!(priority(1), 4);
        assert_eq!(priority(u8::MAX), 7);
    }
}
