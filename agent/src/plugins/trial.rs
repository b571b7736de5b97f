//! `hubagent plugins try`: one plugin alone, with no hub, no configuration and no queue — the
//! plugin author's unit of work. It runs on the daemon's own machinery (`running::launch`: a
//! library in a `hubagent-plugin-host` child, an exec plugin as its process, each confined as
//! the daemon would confine it), prints what the plugin publishes, logs and reports, and takes
//! lines on stdin: settings (a JSON object, merged like a desired patch), `method NAME [JSON]`,
//! `c2d [PROPERTIES] BODY`, `stop`. docs/plugins.md, "Try a plugin".

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use hubagent_plugin_sdk::abi;
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::calls::{C2dMessage, Declarations};
use super::library::{PluginMessage, code_name};
use super::outlet::TokenBucket;
use super::running::{self, Event, RunningPlugin};
use super::sandbox::{Policy, Support, own_files};
use crate::config::plugin::{Isolation, Kind, Limits, PluginSpec, SandboxSettings};

/// What the author asked for on the command line.
pub struct Trial {
    pub spec: PluginSpec,
    /// Confine the plugin as the daemon would (`--no-sandbox` turns it off).
    pub sandbox: bool,
}

/// Where the daemon keeps what no plugin may reach, by default: even with no configuration at
/// hand, a tried plugin does not get them.
const DEFAULT_SECRETS: &[&str] = &["/etc/hubagent", "/var/lib/hubagent", "/run/hubagent"];

impl Trial {
    /// The plugin `target` names: a shared library (`*.so`, or `--kind library`), else a
    /// program and its arguments (an exec plugin). Relative paths are taken from the current
    /// directory; `settings` is the `--settings` object.
    pub fn new(
        target: &[String],
        kind: Option<&str>,
        name: Option<&str>,
        settings: Map<String, Value>,
        sandbox: &SandboxSettings,
    ) -> Result<Trial, String> {
        let first = target
            .first()
            .ok_or("name the plugin: a library (.so) or a program and its arguments")?;
        let library = match kind {
            Some("library") => true,
            Some("exec") => false,
            Some(other) => return Err(format!("--kind '{other}': write library or exec")),
            None => looks_like_library(first),
        };
        let kind = if library {
            if target.len() > 1 {
                return Err(format!(
                    "a library takes no arguments (got {}); settings go in --settings",
                    target[1..].join(" ")
                ));
            }
            Kind::Library {
                path: absolute(first)?,
                isolation: Isolation::Process,
                env: std::collections::BTreeMap::new(),
            }
        } else {
            let mut command = target.to_vec();
            // A program named by a path runs from that path: make it absolute, as the
            // configuration requires. Arguments that are existing files too, so the sandbox
            // lets the program read them.
            for (i, arg) in command.iter_mut().enumerate() {
                if (i == 0 && arg.contains('/')) || (i > 0 && Path::new(arg).is_file()) {
                    *arg = absolute(arg)?.display().to_string();
                }
            }
            Kind::Exec {
                command,
                env: Default::default(),
            }
        };
        let name = match name {
            Some(n)
                if n.is_empty()
                    || !n
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') =>
            {
                return Err(format!(
                    "--name '{n}' must be letters, digits, '-' or '_' (it is a twin property name)"
                ));
            }
            Some(n) => n.to_string(),
            // `python3 sensor.py`: the script's name, not the interpreter's.
            None => default_name(
                target[1..]
                    .iter()
                    .rev()
                    .find(|a| Path::new(a).is_file())
                    .unwrap_or(first),
                library,
            ),
        };
        Ok(Trial {
            spec: PluginSpec {
                name,
                kind,
                settings,
                limits: Limits::default(),
                sandbox: sandbox.clone(),
                // A trial's messages are printed, never sent to the hub.
                batch: None,
            },
            sandbox: true,
        })
    }

    /// The sandbox policy the plugin runs under (None: unconfined), and the line that says so.
    fn policy(&self) -> (Option<Policy>, String) {
        if !self.sandbox {
            return (None, "sandbox: off (--no-sandbox)".into());
        }
        let support = Support::of_this_kernel();
        let secrets: Vec<PathBuf> = DEFAULT_SECRETS.iter().map(PathBuf::from).collect();
        let (executables, files) = own_files(&self.spec);
        let policy = Policy::build((&executables, &files), &self.spec.sandbox, None, &secrets);
        let missing = support.missing();
        let line = format!(
            "sandbox: as the daemon confines it, best effort ({}{}); no private directory, {} out of reach; --no-sandbox turns it off",
            support.describe(),
            if missing.is_empty() {
                String::new()
            } else {
                format!("; not enforced here: {}", missing.join(", "))
            },
            DEFAULT_SECRETS.join(", ")
        );
        (Some(policy), line)
    }
}

fn looks_like_library(first: &str) -> bool {
    let file = Path::new(first)
        .file_name()
        .and_then(|f| f.to_str())
        .unwrap_or("");
    file.ends_with(".so") || file.contains(".so.")
}

fn absolute(path: &str) -> Result<PathBuf, String> {
    std::path::absolute(path).map_err(|e| format!("{path}: {e}"))
}

/// The plugin's name when none is given: the file's, without `lib` and `.so` (a library) or
/// the extension (a script), made a valid twin property name.
fn default_name(first: &str, library: bool) -> String {
    let stem = Path::new(first)
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("plugin");
    let stem = if library {
        stem.strip_prefix("lib").unwrap_or(stem)
    } else {
        stem
    };
    let name: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if name.is_empty() {
        "plugin".into()
    } else {
        name
    }
}

/// The lines of stdin, read on a thread of their own (a closed channel is the end of input).
pub fn stdin_lines() -> mpsc::UnboundedReceiver<String> {
    let (lines, input) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    input
}

/// How a trial ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ending {
    /// Stopped on request (`stop`, end of input, Ctrl-C, SIGTERM).
    Stopped,
    /// The plugin could not start, or failed while running: what happened.
    Failed(String),
}

/// Whether a plugin process that ended while being stopped did so as asked: it exited with
/// status 0, or (an exec plugin) ended by the SIGTERM the stop sends.
fn stopped_as_asked(why: &str) -> bool {
    why.ends_with("exited with status 0") || why.contains("SIGTERM")
}

/// A line the author typed.
#[derive(Debug, PartialEq)]
enum Input {
    Settings(Map<String, Value>),
    Method(String, Value),
    C2d(Vec<(String, String)>, Vec<u8>),
    Stop,
    Help,
    Nothing,
}

const HELP: &str = "input: a JSON object (settings, merged over those typed so far as a desired patch: null removes a key) | method NAME [JSON payload] | c2d [{\"property\": \"value\"}] BODY | stop (or end of input, Ctrl-C)";

fn parse_input(line: &str) -> Result<Input, String> {
    let line = line.trim();
    if line.is_empty() {
        return Ok(Input::Nothing);
    }
    if line.starts_with('{') {
        return match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(m)) => Ok(Input::Settings(m)),
            Ok(_) => Err("settings must be a JSON object".into()),
            Err(e) => Err(format!("not JSON: {e}")),
        };
    }
    let (word, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
    let rest = rest.trim();
    match word {
        "stop" | "quit" | "exit" => Ok(Input::Stop),
        "help" => Ok(Input::Help),
        "method" => {
            let (name, payload) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
            if name.is_empty() {
                return Err("method NAME [JSON payload]".into());
            }
            let payload = match payload.trim() {
                "" => Value::Null,
                text => serde_json::from_str(text)
                    .map_err(|e| format!("the payload of method {name} is not JSON: {e}"))?,
            };
            Ok(Input::Method(name.to_string(), payload))
        }
        "c2d" => {
            let (properties, body) = if rest.starts_with('{') {
                let mut stream = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
                let properties = match stream.next() {
                    Some(Ok(Value::Object(m))) => m,
                    _ => return Err("c2d: the properties must be a JSON object".into()),
                };
                let body = rest[stream.byte_offset()..].trim();
                let properties = properties
                    .into_iter()
                    .map(|(k, v)| match v {
                        Value::String(s) => Ok((k, s)),
                        other => Ok((k, other.to_string())),
                    })
                    .collect::<Result<Vec<_>, String>>()?;
                (properties, body)
            } else {
                (Vec::new(), rest)
            };
            Ok(Input::C2d(properties, body.as_bytes().to_vec()))
        }
        other => Err(format!("'{other}' is not understood ({HELP})")),
    }
}

/// One message as printed: body (JSON when it is JSON, else text, else base64), properties,
/// content type and encoding.
fn describe_message(message: &PluginMessage) -> Value {
    use base64::Engine;
    let body = match std::str::from_utf8(&message.body) {
        Ok(text) => serde_json::from_str::<Value>(text).unwrap_or_else(|_| json!(text)),
        Err(_) => json!({
            "base64": base64::engine::general_purpose::STANDARD.encode(&message.body)
        }),
    };
    let properties: Map<String, Value> = message
        .properties
        .iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    let mut out = json!({"body": body, "properties": properties});
    if let Some(t) = &message.content_type {
        out["contentType"] = json!(t);
    }
    if let Some(e) = &message.content_encoding {
        out["contentEncoding"] = json!(e);
    }
    if let Some(t) = &message.creation_time {
        out["creationTime"] = json!(t);
    }
    out
}

fn level_name(level: i32) -> &'static str {
    match level {
        abi::LOG_ERROR => "error",
        abi::LOG_WARN => "warn",
        abi::LOG_DEBUG => "debug",
        abi::LOG_TRACE => "trace",
        _ => "info",
    }
}

fn health_name(state: i32) -> &'static str {
    match state {
        abi::HEALTH_OK => "ok",
        abi::HEALTH_DEGRADED => "degraded",
        abi::HEALTH_FAILED => "failed",
        _ => "unknown",
    }
}

/// Prints a line of the trial's output (stdout, flushed: the author or a test reads it live).
fn say(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// What the running trial keeps track of.
struct Session {
    spec: PluginSpec,
    /// The settings typed so far, each line merged over them (the twin's desired settings: a
    /// refused value stays there, as in the twin, until a later line changes it).
    desired: Map<String, Value>,
    /// The settings the plugin last accepted (libraries say so; exec plugins only refuse).
    accepted: Map<String, Value>,
    /// Settings sent and not answered yet.
    applying: Option<Map<String, Value>>,
    /// Settings typed while others were being applied: sent once those are answered (one
    /// change at a time, as the daemon does).
    pending: bool,
    exec: bool,
    declarations: Declarations,
    next_call: u64,
    /// Calls sent, by id: what to print with the answer.
    calls: HashMap<u64, String>,
    rate: TokenBucket,
    paced: bool,
}

/// Runs the trial until the input says stop, the input ends (`input` closes), Ctrl-C or SIGTERM
/// arrives, or the plugin fails. `agent` is the hubagent binary (its preflight probe tries a
/// library first); `input` brings the author's lines.
pub async fn run(trial: Trial, agent: &Path, input: mpsc::UnboundedReceiver<String>) -> Ending {
    let spec = trial.spec.clone();
    // The checks `config check` makes, with the same messages; then the real start.
    match super::preflight::check(&spec, true, agent) {
        Ok(found) => say(&format!("plugin {}: {}", spec.name, found.line())),
        Err(problem) => return Ending::Failed(format!("cannot start: {problem}")),
    }
    let (policy, sandbox_line) = trial.policy();
    say(&sandbox_line);
    let settings = spec.settings.clone();
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let plugin = match running::launch(
        &spec,
        &Value::Object(settings.clone()),
        true,
        policy.as_ref(),
        events_tx.clone(),
    )
    .await
    {
        Ok(p) => p,
        Err(e) => return Ending::Failed(format!("cannot start: {e}")),
    };
    let mut session = Session {
        rate: TokenBucket::new(spec.limits.max_rate, spec.limits.burst),
        paced: matches!(spec.kind, Kind::Exec { .. }),
        exec: matches!(spec.kind, Kind::Exec { .. }),
        spec,
        desired: settings.clone(),
        accepted: settings,
        applying: None,
        pending: false,
        declarations: Declarations::default(),
        next_call: 0,
        calls: HashMap::new(),
    };
    let plugin = match session.await_start(plugin, &mut events).await {
        Ok(p) => p,
        Err(why) => return Ending::Failed(why),
    };
    say(&format!(
        "running with settings {} ({})",
        Value::Object(session.accepted.clone()),
        "type settings as JSON, `method NAME [JSON]`, `c2d [PROPERTIES] BODY`, `stop`; `help`"
    ));
    session.drive(plugin, events_tx, &mut events, input).await
}

impl Session {
    async fn await_start(
        &mut self,
        plugin: RunningPlugin,
        events: &mut mpsc::UnboundedReceiver<Event>,
    ) -> Result<RunningPlugin, String> {
        let timeout = self.spec.limits.callback_timeout;
        let deadline = Instant::now() + timeout;
        let started = loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(Event::Started(r)) => break r,
                    Some(Event::Ended(why)) => break Err(super::library::CallError { code: abi::ERR_FAILED, reason: why }),
                    Some(other) => { self.show(other); }
                    None => break Err(super::library::CallError { code: abi::ERR_FAILED, reason: "the plugin went away".into() }),
                },
                _ = tokio::time::sleep_until(deadline) => {
                    plugin.kill().await;
                    return Err(format!("hung: start did not return within {}", humantime::format_duration(timeout)));
                }
            }
        };
        match started {
            Ok(()) => Ok(plugin),
            Err(e) => {
                plugin.kill().await;
                Err(if e.code == abi::ERR_REJECTED {
                    format!("start rejected the settings: {}", e.reason)
                } else {
                    format!("start failed: {e}")
                })
            }
        }
    }

    async fn drive(
        &mut self,
        mut plugin: RunningPlugin,
        events_tx: running::Events,
        events: &mut mpsc::UnboundedReceiver<Event>,
        mut input: mpsc::UnboundedReceiver<String>,
    ) -> Ending {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        // One stream for the whole loop: a `ctrl_c()` future made anew in each turn misses a
        // Ctrl-C that arrives while an event is being shown, and the trial then never stops.
        let mut interrupt =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok();
        let failure = loop {
            tokio::select! {
                event = events.recv() => {
                    let Some(event) = event else { break Some("the plugin went away".to_string()) };
                    if let Some(failure) = self.show(event) {
                        break Some(failure);
                    }
                    if self.pending && self.applying.is_none() {
                        self.send_settings(&mut plugin, &events_tx);
                    }
                }
                line = input.recv() => match line {
                    Some(line) => match parse_input(&line) {
                        Ok(Input::Stop) => break None,
                        Ok(input) => self.take(&mut plugin, &events_tx, input),
                        Err(e) => say(&format!("? {e}")),
                    },
                    // End of input stops the plugin, as `stop` does.
                    None => break None,
                },
                _ = async { match interrupt.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending().await } } => break None,
                _ = async { match terminate.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending().await } } => break None,
            }
        };
        match failure {
            Some(why) => {
                plugin.kill().await;
                Ending::Failed(why)
            }
            None => {
                say("stopping");
                let timeout = self.spec.limits.callback_timeout;
                // What the plugin says while it stops (its last messages, logs) is shown too.
                let stop = plugin.stop(timeout);
                tokio::pin!(stop);
                // Its exit is what was asked for now; how it exited says whether it stopped
                // cleanly (a crash in stop, a kill after the timeout, a signal that reached it
                // before the agent asked are not).
                let mut unclean = None;
                let mut show = |event| match event {
                    Event::Ended(why) if !stopped_as_asked(&why) => unclean = Some(why),
                    Event::Ended(_) => {}
                    other => {
                        self.show(other);
                    }
                };
                loop {
                    tokio::select! {
                        () = &mut stop => break,
                        Some(event) = events.recv() => show(event),
                    }
                }
                while let Ok(event) = events.try_recv() {
                    show(event);
                }
                match unclean {
                    None => {
                        say("stopped");
                        Ending::Stopped
                    }
                    Some(why) => {
                        say(&format!("stopped uncleanly: {why}"));
                        Ending::Failed(format!("the plugin did not stop cleanly: {why}"))
                    }
                }
            }
        }
    }

    /// Sends the settings typed so far.
    fn send_settings(&mut self, plugin: &mut RunningPlugin, events: &running::Events) {
        let next = self.desired.clone();
        say(&format!("settings sent: {}", Value::Object(next.clone())));
        plugin.apply(&Value::Object(next.clone()), events);
        self.applying = Some(next);
        self.pending = false;
    }

    /// Acts on one line of input.
    fn take(&mut self, plugin: &mut RunningPlugin, events: &running::Events, input: Input) {
        match input {
            Input::Settings(patch) => {
                crate::util::json::merge(&mut self.desired, &patch);
                self.pending = true;
                if self.applying.is_none() {
                    self.send_settings(plugin, events);
                }
            }
            Input::Method(name, payload) => {
                if !self.declarations.answers(&name) {
                    say(&format!(
                        "method {name}: 404, the plugin does not declare it (declared: {})",
                        if self.declarations.methods.is_empty() {
                            "none".to_string()
                        } else {
                            self.declarations.methods.join(", ")
                        }
                    ));
                    return;
                }
                self.next_call += 1;
                self.calls.insert(self.next_call, format!("method {name}"));
                plugin.invoke(self.next_call, &name, &payload);
            }
            Input::C2d(properties, body) => {
                if !self.declarations.takes(&properties) {
                    say(&format!(
                        "c2d: not for this plugin (its filter: {}); the daemon would offer it to another plugin",
                        self.declarations
                            .c2d_filter
                            .as_ref()
                            .map(|f| Value::Object(f.clone()).to_string())
                            .unwrap_or_else(|| "none, it takes no C2D messages".into())
                    ));
                    return;
                }
                self.next_call += 1;
                let message = C2dMessage {
                    message_id: format!("try-{}", self.next_call),
                    body,
                    content_type: None,
                    content_encoding: None,
                    properties,
                };
                self.calls
                    .insert(self.next_call, format!("c2d {}", message.message_id));
                plugin.deliver(self.next_call, &message);
            }
            Input::Help => say(HELP),
            Input::Stop | Input::Nothing => {}
        }
    }

    /// Shows a published message and answers as the daemon would: refused over `max_rate`.
    fn take_message(&mut self, message: &PluginMessage) -> i32 {
        if !self.paced && !self.rate.take(Instant::now()) {
            say(&format!(
                "dropped: over max_rate {} a second (the daemon drops it too)",
                self.spec.limits.max_rate
            ));
            return abi::ERR_RATE_LIMITED;
        }
        say(&format!("message {}", describe_message(message)));
        abi::OK
    }

    /// Prints one event; a failure that ends the trial (as it would restart the plugin in the
    /// daemon) is returned.
    fn show(&mut self, event: Event) -> Option<String> {
        match event {
            Event::Message(message, reply) => {
                reply.send(self.take_message(&message));
            }
            Event::Batch(messages, reply) => {
                say(&format!("batch of {} messages", messages.len()));
                reply.send(messages.iter().map(|m| self.take_message(m)).collect());
            }
            Event::Log(level, text) => say(&format!("log {}: {text}", level_name(level))),
            Event::Health(abi::HEALTH_FAILED, detail) => {
                say(&format!("health failed: {detail}"));
                return Some(format!(
                    "the plugin reported itself failed (the daemon would restart it): {detail}"
                ));
            }
            Event::Health(state, detail) => {
                say(&format!("health {}: {detail}", health_name(state)))
            }
            Event::Loaded { abi, version } => {
                say(&format!("loaded: ABI {abi}, plugin version {version}"))
            }
            Event::Declared(d) => {
                let filter = d
                    .c2d_filter
                    .as_ref()
                    .map(|f| Value::Object(f.clone()).to_string())
                    .unwrap_or_else(|| "none".into());
                say(&format!(
                    "declared: methods [{}], c2d filter {filter}",
                    d.methods.join(", ")
                ));
                self.declarations = d;
            }
            Event::Applied(Ok(())) => {
                if let Some(next) = self.applying.take() {
                    self.accepted = next;
                    // An exec plugin does not say yes, it can only refuse (a line of its own).
                    if !self.exec {
                        say(&format!(
                            "settings applied: {}",
                            Value::Object(self.accepted.clone())
                        ));
                    }
                }
            }
            Event::Applied(Err(e)) => {
                self.applying = None;
                say(&format!(
                    "settings rejected: {} ({}); it keeps {}",
                    e.reason,
                    code_name(e.code),
                    Value::Object(self.accepted.clone())
                ));
            }
            Event::Reported(properties) => {
                match super::own_reported::check(&Value::Object(properties)) {
                    Ok(checked) => say(&format!("reported properties: {}", Value::Object(checked))),
                    Err(why) => say(&format!(
                        "log {}: reported properties refused: {why}",
                        level_name(abi::LOG_WARN)
                    )),
                }
            }
            Event::Junk(text) => say(&format!("log {}: {text}", level_name(abi::LOG_WARN))),
            Event::Silent(Some(warning)) => say(&format!("warning: {warning}")),
            Event::Silent(None) => say("the plugin writes lines again"),
            Event::LateReject(reason) => say(&format!(
                "settings rejected: {reason}; it keeps the settings it had before that line"
            )),
            Event::MethodAnswer(id, answer) => {
                let what = self.calls.remove(&id).unwrap_or_else(|| "method".into());
                say(&format!("{what}: {} {}", answer.status, answer.payload));
            }
            Event::C2dTaken(id, taken) => {
                let what = self.calls.remove(&id).unwrap_or_else(|| "c2d".into());
                match taken {
                    Ok(()) => say(&format!("{what}: taken (the hub would complete it)")),
                    Err(why) => say(&format!(
                        "{what}: refused: {why} (the hub would deliver it again)"
                    )),
                }
            }
            Event::Ended(why) => {
                say(&format!("ended: {why}"));
                return Some(format!("the plugin ended: {why}"));
            }
            Event::Started(_) | Event::Pong(_) => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_lines_parse() {
        assert_eq!(parse_input("  ").unwrap(), Input::Nothing);
        assert_eq!(
            parse_input(r#"{"step": 5}"#).unwrap(),
            Input::Settings(json!({"step": 5}).as_object().unwrap().clone())
        );
        assert!(parse_input("[1]").unwrap_err().contains("object"));
        assert_eq!(
            parse_input("method reset 100").unwrap(),
            Input::Method("reset".into(), json!(100))
        );
        assert_eq!(
            parse_input("method get").unwrap(),
            Input::Method("get".into(), Value::Null)
        );
        assert!(
            parse_input("method get {")
                .unwrap_err()
                .contains("not JSON")
        );
        assert_eq!(
            parse_input(r#"c2d {"to": "counter"} 23"#).unwrap(),
            Input::C2d(vec![("to".into(), "counter".into())], b"23".to_vec())
        );
        assert_eq!(
            parse_input("c2d hello").unwrap(),
            Input::C2d(vec![], b"hello".to_vec())
        );
        assert_eq!(parse_input("stop").unwrap(), Input::Stop);
        assert!(
            parse_input("frobnicate")
                .unwrap_err()
                .contains("frobnicate")
        );
    }

    #[test]
    fn targets_become_specs() {
        let none = SandboxSettings::default();
        let t = Trial::new(
            &["lib/libmy_sensor.so".into()],
            None,
            None,
            Map::new(),
            &none,
        )
        .unwrap();
        assert_eq!(t.spec.name, "my_sensor");
        assert!(matches!(&t.spec.kind, Kind::Library { path, .. } if path.is_absolute()));
        let t = Trial::new(
            &["python3".into(), "sensor.py".into()],
            None,
            None,
            Map::new(),
            &none,
        )
        .unwrap();
        assert_eq!(t.spec.name, "python3");
        assert!(matches!(&t.spec.kind, Kind::Exec { command, .. } if command[0] == "python3"));
        let e = Trial::new(
            &["libx.so".into(), "arg".into()],
            None,
            None,
            Map::new(),
            &none,
        );
        assert!(e.err().unwrap().contains("no arguments"));
        let t = Trial::new(
            &["./run".into()],
            Some("exec"),
            Some("probe"),
            Map::new(),
            &none,
        )
        .unwrap();
        assert_eq!(t.spec.name, "probe");
        let bad = Trial::new(&["./run".into()], None, Some("a.b"), Map::new(), &none);
        assert!(bad.err().unwrap().contains("--name 'a.b'"));
        assert!(matches!(&t.spec.kind, Kind::Exec { command, .. } if command[0].starts_with('/')));
    }
}
