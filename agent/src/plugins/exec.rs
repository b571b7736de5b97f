//! Exec plugins: any program that reads its settings as JSON lines on stdin and writes JSON
//! lines on stdout (messages, logs, health, a refusal of its settings). Since #17 also: it
//! declares methods and a C2D filter, the agent writes calls (`{"$call": …}`) to its stdin and
//! it answers them. See docs/plugins.md.

use std::collections::BTreeMap;
use std::time::Duration;

use hubagent_plugin_sdk::abi;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::process::ChildStdout;
use tokio::sync::mpsc;

use super::answer::Answer;
use super::calls::{C2dMessage, Declarations, MethodAnswer};
use super::library::PluginMessage;
use super::process::{self, ChildProcess};
use super::protocol;
use super::running::{Event, Events};
use super::sandbox::Policy;
use crate::config::plugin::PluginSpec;

/// A running exec plugin.
pub struct ExecPlugin {
    process: ChildProcess,
    /// Settings to write, a JSON line each; dropped to close the plugin's stdin.
    lines: Option<mpsc::UnboundedSender<String>>,
}

impl ExecPlugin {
    /// Starts `command` after the trust check of the program (and of the files named in its
    /// arguments) and writes it its settings; an exec plugin counts as started at once.
    pub fn launch(
        spec: &PluginSpec,
        command: &[String],
        env: &BTreeMap<String, String>,
        settings: &Value,
        allow_unsafe: bool,
        sandbox: Option<&Policy>,
        events: Events,
    ) -> Result<ExecPlugin, String> {
        let program = super::trust::resolve_program(&command[0])?;
        super::trust::check(&program, allow_unsafe)?;
        for arg in &command[1..] {
            let p = std::path::Path::new(arg);
            if p.is_absolute() && p.is_file() {
                super::trust::check(p, allow_unsafe)?;
            }
        }
        let mut cmd = match sandbox {
            // `hubagent sandbox-exec` confines itself, then executes the program in its place.
            Some(policy) => {
                let mut cmd = tokio::process::Command::new("/proc/self/exe");
                cmd.arg("sandbox-exec")
                    .arg("--sandbox")
                    .arg(policy.to_argument())
                    .arg("--")
                    .arg(&program);
                cmd
            }
            None => tokio::process::Command::new(&program),
        };
        cmd.args(&command[1..]);
        process::base_env(&mut cmd, &spec.name);
        process::private_dir_env(&mut cmd, sandbox);
        // Python buffers stdout in blocks when it is a pipe: without this, a plugin's `print`
        // reaches the agent only every few KiB, and it looks as if it published nothing. `env`
        // may still set it to something else.
        cmd.env("PYTHONUNBUFFERED", "1");
        cmd.envs(env);
        process::limit_child(&mut cmd, spec.limits.memory_limit);
        let (mut process, mut stdin, stdout) = ChildProcess::spawn(
            cmd,
            &events,
            spec.limits.stderr_level,
            spec.limits.memory_limit,
        )?;
        let (lines, mut to_write) = mpsc::unbounded_channel::<String>();
        process.write_stdin(async move {
            while let Some(mut line) = to_write.recv().await {
                line.push('\n');
                if stdin.write_all(line.as_bytes()).await.is_err() {
                    break;
                }
                let _ = stdin.flush().await;
            }
            // Dropping stdin here gives the plugin EOF.
        });
        process.read_stdout(read_lines(
            stdout,
            events.clone(),
            spec.limits.warn_if_silent,
        ));
        let plugin = ExecPlugin {
            process,
            lines: Some(lines),
        };
        plugin.write_settings(settings);
        let _ = events.send(Event::Started(Ok(())));
        Ok(plugin)
    }

    fn write_settings(&self, settings: &Value) {
        if let Some(l) = &self.lines {
            let _ = l.send(settings.to_string());
        }
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    fn write_line(&self, line: Value) {
        if let Some(l) = &self.lines {
            let _ = l.send(line.to_string());
        }
    }

    /// A direct method: `{"$call": "method", "id": N, "method": "…", "payload": …}`. (`$`: a
    /// settings object never has that key; twin keys cannot contain `$`, and the agent refuses
    /// it in `[plugin.settings]`.)
    pub fn invoke(&self, id: u64, method: &str, payload: &Value) {
        self.write_line(json!({"$call": "method", "id": id, "method": method, "payload": payload}));
    }

    /// A C2D message: `{"$call": "c2d", "id": N, "message": {"messageId", "body" (base64),
    /// "contentType", "contentEncoding", "properties"}}`.
    pub fn deliver(&self, id: u64, message: &C2dMessage) {
        let properties: serde_json::Map<String, Value> = message
            .properties
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        let body = serde_json::to_value(message)
            .map(|m| m["body"].clone())
            .unwrap_or_default();
        self.write_line(json!({"$call": "c2d", "id": id, "message": {
            "messageId": message.message_id,
            "body": body,
            "contentType": message.content_type,
            "contentEncoding": message.content_encoding,
            "properties": properties,
        }}));
    }

    /// Writes new settings; an exec plugin can only refuse them later ([`Event::LateReject`]),
    /// so they count as applied at once.
    pub fn apply(&self, settings: &Value, events: &Events) {
        self.write_settings(settings);
        let _ = events.send(Event::Applied(Ok(())));
    }

    /// Closes the plugin's stdin, sends SIGTERM and waits up to `timeout`, then kills it.
    pub async fn stop(mut self, timeout: Duration) {
        self.lines.take(); // EOF on the plugin's stdin
        self.process.signal(libc::SIGTERM);
        self.process.wait_or_kill(timeout).await;
    }

    pub async fn kill(mut self) {
        self.process.kill().await;
    }
}

/// Reads the plugin's lines until EOF, one message at a time. When `warn_if_silent` passes
/// without a line the agent understands, says so once (until one comes).
async fn read_lines(stdout: ChildStdout, events: Events, warn_if_silent: Option<Duration>) {
    let mut reader = tokio::io::BufReader::new(stdout);
    let mut line = Vec::new();
    let mut heard = tokio::time::Instant::now();
    let mut warned = false;
    loop {
        line.clear();
        let read = loop {
            // Bounded: a line longer than a message can be is a broken plugin.
            let left = (protocol::MAX_FRAME - line.len().min(protocol::MAX_FRAME)) as u64;
            let mut limited = (&mut reader).take(left);
            let Some(after) = warn_if_silent.filter(|_| !warned) else {
                break limited.read_until(b'\n', &mut line).await;
            };
            // read_until keeps what it read so far in `line` when the timeout ends it, and
            // the next call goes on from there.
            match tokio::time::timeout_at(heard + after, limited.read_until(b'\n', &mut line)).await
            {
                Ok(read) => break read,
                Err(_) => {
                    warned = true;
                    let _ = events.send(Event::Silent(Some(format!(
                        "running for {} without writing a line the agent understands: if it writes messages, it may not flush its stdout (see \"Flush each line\" in docs/plugins.md); warn_if_silent sets this delay",
                        humantime::format_duration(after)
                    ))));
                }
            }
        };
        match read {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.last() != Some(&b'\n') && line.len() >= protocol::MAX_FRAME {
            let _ = events.send(Event::Ended("wrote a line over 1 MiB".into()));
            return;
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        match forward_line(text, &events).await {
            None => return,
            Some(false) => {}
            Some(true) => {
                heard = tokio::time::Instant::now();
                if warned {
                    warned = false;
                    let _ = events.send(Event::Silent(None));
                }
            }
        }
    }
}

/// Passes one line on as an event: whether it was one of the protocol's, `None` once the
/// supervisor is gone.
async fn forward_line(text: &str, events: &Events) -> Option<bool> {
    match exec_line(text) {
        Ok(ExecLine::Message(m)) => {
            let (answer, rx) = Answer::channel();
            if events.send(Event::Message(m, answer)).is_err() {
                return None;
            }
            // One message at a time: the pipe holds the plugin back.
            let _ = rx.await;
        }
        Ok(ExecLine::Log(level, text)) => {
            let _ = events.send(Event::Log(level, text));
        }
        Ok(ExecLine::Health(state, detail)) => {
            let _ = events.send(Event::Health(state, detail));
        }
        Ok(ExecLine::Reported(properties)) => {
            let _ = events.send(Event::Reported(properties));
        }
        Ok(ExecLine::Reject(reason)) => {
            let _ = events.send(Event::LateReject(reason));
        }
        Ok(ExecLine::Declare(declarations)) => {
            let _ = events.send(Event::Declared(declarations));
        }
        Ok(ExecLine::MethodResponse(id, answer)) => {
            let _ = events.send(Event::MethodAnswer(id, answer));
        }
        Ok(ExecLine::C2dAck(id, taken)) => {
            let _ = events.send(Event::C2dTaken(id, taken));
        }
        Err(e) => {
            // The line itself (its start) is what the author needs to see to fix it.
            let quoted: String = text.chars().take(200).collect();
            let more = if quoted.len() < text.len() { "…" } else { "" };
            let _ = events.send(Event::Junk(format!(
                "ignored a line that is not a message ({e}): {quoted}{more}"
            )));
            return Some(false);
        }
    }
    Some(true)
}

/// One line an exec plugin wrote.
#[derive(Debug, PartialEq)]
pub enum ExecLine {
    Message(PluginMessage),
    /// `{"reported": {…}}`: the plugin's own reported properties (checked by the task).
    Reported(serde_json::Map<String, Value>),
    Log(i32, String),
    Health(i32, String),
    Reject(String),
    Declare(Declarations),
    MethodResponse(u64, MethodAnswer),
    C2dAck(u64, Result<(), String>),
}

/// `{"declare": {"methods": [...], "c2dFilter": {...}}}`, `{"methodResponse": N, "status": S,
/// "payload": …}`, `{"c2dAck": N}` or `{"c2dNack": N, "reason": "…"}`; `None` for other lines.
fn call_line(obj: &serde_json::Map<String, Value>) -> Option<Result<ExecLine, String>> {
    let id = |key: &str| {
        obj[key]
            .as_u64()
            .ok_or_else(|| format!("\"{key}\" must be the id of the call"))
    };
    if let Some(d) = obj.get("declare") {
        let methods = match d.get("methods") {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(m)) => m
                .iter()
                .map(|n| {
                    n.as_str()
                        .map(str::to_string)
                        .ok_or("method names must be strings")
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(str::to_string),
            Some(_) => Err("\"methods\" must be an array of names".to_string()),
        };
        let filter = d
            .get("c2dFilter")
            .filter(|f| !f.is_null())
            .map(Value::to_string);
        return Some(
            methods.and_then(|m| Declarations::new(m, filter.as_deref()).map(ExecLine::Declare)),
        );
    }
    if obj.contains_key("methodResponse") {
        return Some(id("methodResponse").map(|id| {
            let status = obj.get("status").and_then(Value::as_i64).unwrap_or(0);
            let payload = obj
                .get("payload")
                .cloned()
                .unwrap_or(Value::Null)
                .to_string();
            ExecLine::MethodResponse(id, MethodAnswer::from_plugin(status, payload.as_bytes()))
        }));
    }
    if obj.contains_key("c2dAck") {
        return Some(id("c2dAck").map(|id| ExecLine::C2dAck(id, Ok(()))));
    }
    if obj.contains_key("c2dNack") {
        return Some(id("c2dNack").map(|id| {
            let reason = obj
                .get("reason")
                .and_then(Value::as_str)
                .unwrap_or("no reason given");
            ExecLine::C2dAck(id, Err(reason.to_string()))
        }));
    }
    None
}

/// Parses an exec plugin's line: `{"body": …, "contentType": …, "contentEncoding": …,
/// "properties": {…}}`, `{"log": "…", "level": "info"}`, `{"health": "ok|degraded|failed",
/// "detail": "…"}` or `{"rejectSettings": "why"}`. A body that is not a string is sent as JSON.
pub fn exec_line(text: &str) -> Result<ExecLine, String> {
    let value: Value = serde_json::from_str(text).map_err(|e| format!("not JSON ({e})"))?;
    let Value::Object(obj) = value else {
        return Err("not a JSON object".into());
    };
    if let Some(call) = call_line(&obj) {
        return call;
    }
    if let Some(properties) = obj.get("reported") {
        return match properties {
            Value::Object(map) => Ok(ExecLine::Reported(map.clone())),
            _ => Err("\"reported\" must be a JSON object".into()),
        };
    }
    if let Some(reason) = obj.get("rejectSettings") {
        return Ok(ExecLine::Reject(
            reason
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| reason.to_string()),
        ));
    }
    if let Some(text) = obj.get("log") {
        let level = match obj.get("level").and_then(|l| l.as_str()).unwrap_or("info") {
            "error" => abi::LOG_ERROR,
            "warn" | "warning" => abi::LOG_WARN,
            "debug" => abi::LOG_DEBUG,
            "trace" => abi::LOG_TRACE,
            _ => abi::LOG_INFO,
        };
        let text = text
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| text.to_string());
        return Ok(ExecLine::Log(level, text));
    }
    if let Some(h) = obj.get("health") {
        let state = match h.as_str() {
            Some("ok") => abi::HEALTH_OK,
            Some("degraded") => abi::HEALTH_DEGRADED,
            Some("failed") => abi::HEALTH_FAILED,
            _ => return Err("health must be \"ok\", \"degraded\" or \"failed\"".into()),
        };
        let detail = obj
            .get("detail")
            .and_then(|d| d.as_str())
            .unwrap_or("")
            .to_string();
        return Ok(ExecLine::Health(state, detail));
    }
    let body = obj.get("body").ok_or("no \"body\"")?;
    let text_field = |key: &str| -> Result<Option<String>, String> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(format!("\"{key}\" must be a string")),
        }
    };
    let (body, default_type) = match body {
        Value::String(s) => (s.clone().into_bytes(), None),
        other => (other.to_string().into_bytes(), Some("application/json")),
    };
    let content_type = text_field("contentType")?.or(default_type.map(str::to_string));
    let content_encoding = text_field("contentEncoding")?
        .or_else(|| content_type.as_ref().map(|_| "utf-8".to_string()));
    let mut properties = Vec::new();
    match obj.get("properties") {
        None | Some(Value::Null) => {}
        Some(Value::Object(p)) => {
            for (k, v) in p {
                let v = v
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string());
                properties.push((k.clone(), v));
            }
        }
        Some(_) => return Err("\"properties\" must be an object".into()),
    }
    let creation_time = match obj.get("creationTime") {
        None | Some(Value::Null) => None,
        Some(Value::String(t)) => Some(rfc3339_utc(t).ok_or_else(|| {
            format!("\"creationTime\" '{t}' is not an RFC 3339 time such as \"2026-12-06T04:00:00.250Z\"")
        })?),
        Some(_) => return Err("\"creationTime\" must be a string such as \"2026-12-06T04:00:00Z\"".into()),
    };
    Ok(ExecLine::Message(PluginMessage {
        body,
        content_type,
        content_encoding,
        properties,
        creation_time,
    }))
}

/// An RFC 3339 time (any offset) as UTC with milliseconds, the form the agent sends.
fn rfc3339_utc(text: &str) -> Option<String> {
    let t =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    let ms = t.unix_timestamp_nanos() / 1_000_000;
    super::library::creation_time(i64::try_from(ms).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_lines_parse() {
        let m = exec_line(r#"{"body": {"t": 21.5}, "properties": {"unit": "C", "n": 3}}"#).unwrap();
        assert_eq!(
            m,
            ExecLine::Message(PluginMessage {
                body: br#"{"t":21.5}"#.to_vec(),
                content_type: Some("application/json".into()),
                content_encoding: Some("utf-8".into()),
                properties: vec![("n".into(), "3".into()), ("unit".into(), "C".into())],
                creation_time: None,
            })
        );
        let m =
            exec_line(r#"{"body": 1, "creationTime": "2026-12-06T05:00:00.25+01:00"}"#).unwrap();
        assert!(
            matches!(
                m,
                ExecLine::Message(PluginMessage { creation_time: Some(ref t), .. }) if t == "2026-12-06T04:00:00.250Z"
            ),
            "{m:?}"
        );
        assert!(
            exec_line(r#"{"body": 1, "creationTime": "yesterday"}"#)
                .unwrap_err()
                .contains("'yesterday' is not an RFC 3339 time")
        );
        assert_eq!(
            exec_line(r#"{"reported": {"fw": "1.2"}}"#).unwrap(),
            ExecLine::Reported(
                serde_json::json!({"fw": "1.2"})
                    .as_object()
                    .unwrap()
                    .clone()
            )
        );
        let m = exec_line(r#"{"body": "raw text"}"#).unwrap();
        assert!(matches!(
            m,
            ExecLine::Message(PluginMessage {
                content_type: None,
                ..
            })
        ));
        assert_eq!(
            exec_line(r#"{"rejectSettings": "interval too short"}"#).unwrap(),
            ExecLine::Reject("interval too short".into())
        );
        assert_eq!(
            exec_line(r#"{"log": "hi", "level": "warn"}"#).unwrap(),
            ExecLine::Log(abi::LOG_WARN, "hi".into())
        );
        assert_eq!(
            exec_line(r#"{"declare": {"methods": ["open"], "c2dFilter": {"kind": "valve"}}}"#)
                .unwrap(),
            ExecLine::Declare(
                Declarations::new(vec!["open".into()], Some(r#"{"kind":"valve"}"#)).unwrap()
            )
        );
        assert_eq!(
            exec_line(r#"{"methodResponse": 3, "status": 201, "payload": {"ok": 1}}"#).unwrap(),
            ExecLine::MethodResponse(
                3,
                MethodAnswer {
                    status: 201,
                    payload: serde_json::json!({"ok": 1})
                }
            )
        );
        assert_eq!(
            exec_line(r#"{"c2dAck": 4}"#).unwrap(),
            ExecLine::C2dAck(4, Ok(()))
        );
        assert_eq!(
            exec_line(r#"{"c2dNack": 5, "reason": "busy"}"#).unwrap(),
            ExecLine::C2dAck(5, Err("busy".into()))
        );
        assert!(exec_line(r#"{"c2dAck": "x"}"#).is_err());
        assert!(exec_line("not json").is_err());
        assert!(exec_line(r#"{"nobody": 1}"#).is_err());
        assert!(exec_line(r#"{"body": 1, "properties": [1]}"#).is_err());
    }
}
