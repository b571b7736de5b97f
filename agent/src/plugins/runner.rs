//! The ways a plugin runs, behind one small interface: a plugin process (`hubagent
//! plugin-host`), an exec plugin, a library loaded in-process, or a built-in. Each reports
//! through the same [`Event`]s; the supervisor does the rest (timeouts, restarts, limits).

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use hubagent_plugin_sdk::abi;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};

use super::library::{CallError, HostSide, Library, PluginMessage};
use super::protocol::{self, Down, Up};
use crate::config::plugin::{Isolation, Kind, PluginSpec};

/// What a running plugin tells its supervisor.
#[derive(Debug)]
pub enum Event {
    /// Library plugins: the descriptor passed the checks.
    Loaded {
        abi: String,
        version: String,
    },
    /// The answer to start.
    Started(Result<(), CallError>),
    /// The answer to the last apply.
    Applied(Result<(), CallError>),
    /// Exec plugins: the last settings were refused after the fact.
    LateReject(String),
    Message(PluginMessage, oneshot::Sender<i32>),
    Log(i32, String),
    Health(i32, String),
    /// The instance is gone (exit, crash, protocol violation).
    Ended(String),
    /// Plugin processes: the answer to a liveness ping.
    Pong(u64),
}

pub type Events = mpsc::UnboundedSender<Event>;

/// A running instance.
pub enum Instance {
    Child(ChildInstance),
    InProcess(InProcessInstance),
    Builtin(BuiltinInstance),
}

/// Environment for plugin processes: nothing of the daemon's (which may hold
/// PROVISIONING_SYMMETRIC_KEY), only the basics and what the configuration adds.
fn base_env(cmd: &mut tokio::process::Command, name: &str) {
    cmd.env_clear();
    for key in ["PATH", "LANG", "LC_ALL", "TZ"] {
        if let Some(v) = std::env::var_os(key) {
            cmd.env(key, v);
        }
    }
    if std::env::var_os("PATH").is_none() {
        cmd.env("PATH", "/usr/local/bin:/usr/bin:/bin");
    }
    cmd.env("HUBAGENT_PLUGIN_NAME", name);
}

/// Memory cap and parent-death signal, set in the child between fork and exec.
fn limit_child(cmd: &mut tokio::process::Command, memory_limit: Option<u64>) {
    // SAFETY: the closure only makes async-signal-safe syscalls (setrlimit, prctl).
    unsafe {
        cmd.pre_exec(move || {
            if let Some(limit) = memory_limit {
                let rl = libc::rlimit {
                    rlim_cur: limit as libc::rlim_t,
                    rlim_max: limit as libc::rlim_t,
                };
                if libc::setrlimit(libc::RLIMIT_AS, &rl) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // A plugin process must not outlive a daemon killed with SIGKILL.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

pub fn describe_exit(status: std::io::Result<std::process::ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(0), _) => "exited with status 0".into(),
            (Some(code), _) => format!("exited with status {code}"),
            (None, Some(sig)) => {
                let name = match sig {
                    libc::SIGSEGV => "SIGSEGV",
                    libc::SIGABRT => "SIGABRT",
                    libc::SIGKILL => "SIGKILL",
                    libc::SIGBUS => "SIGBUS",
                    libc::SIGTERM => "SIGTERM",
                    libc::SIGILL => "SIGILL",
                    libc::SIGFPE => "SIGFPE",
                    _ => "signal",
                };
                format!(
                    "killed by {name} ({sig}){}",
                    if s.core_dumped() { ", core dumped" } else { "" }
                )
            }
            _ => "ended".into(),
        },
        Err(e) => format!("cannot wait for the process: {e}"),
    }
}

/// Starts an instance; the answer to start arrives as [`Event::Started`].
pub async fn launch(
    spec: &PluginSpec,
    settings: &Value,
    allow_unsafe: bool,
    events: Events,
) -> Result<Instance, String> {
    match &spec.kind {
        Kind::Library {
            path,
            isolation: Isolation::Process,
        } => {
            // Checked here too so that the reason shows without starting a process.
            super::trust::check(path, allow_unsafe)?;
            let mut cmd = tokio::process::Command::new("/proc/self/exe");
            cmd.arg("plugin-host")
                .arg("--name")
                .arg(&spec.name)
                .arg("--path")
                .arg(path);
            if allow_unsafe {
                cmd.arg("--allow-unsafe-paths");
            }
            base_env(&mut cmd, &spec.name);
            // Fewer malloc arenas: address space is what RLIMIT_AS counts.
            cmd.env("MALLOC_ARENA_MAX", "2");
            limit_child(&mut cmd, spec.limits.memory_limit);
            let child = ChildInstance::spawn(cmd, true, events)?;
            child.send(Down::Start {
                settings: settings.clone(),
            });
            Ok(Instance::Child(child))
        }
        Kind::Exec { command, env } => {
            let program = super::trust::resolve_program(&command[0])?;
            super::trust::check(&program, allow_unsafe)?;
            for arg in &command[1..] {
                let p = std::path::Path::new(arg);
                if p.is_absolute() && p.is_file() {
                    super::trust::check(p, allow_unsafe)?;
                }
            }
            let mut cmd = tokio::process::Command::new(&program);
            cmd.args(&command[1..]);
            base_env(&mut cmd, &spec.name);
            cmd.envs(env);
            limit_child(&mut cmd, spec.limits.memory_limit);
            let child = ChildInstance::spawn(cmd, false, events.clone())?;
            child.send_line(settings);
            let _ = events.send(Event::Started(Ok(())));
            Ok(Instance::Child(child))
        }
        Kind::Library {
            path,
            isolation: Isolation::InProcess,
        } => InProcessInstance::launch(path, settings, allow_unsafe, events)
            .await
            .map(Instance::InProcess),
        Kind::Builtin(_) => {
            BuiltinInstance::launch(&spec.name, settings, events).map(Instance::Builtin)
        }
    }
}

impl Instance {
    /// Sends new settings; the answer arrives as [`Event::Applied`].
    pub fn apply(&mut self, settings: &Value, events: &Events) {
        match self {
            Instance::Child(c) if c.framed => {
                c.apply_id += 1;
                c.send(Down::Settings {
                    id: c.apply_id,
                    settings: settings.clone(),
                });
            }
            Instance::Child(c) => {
                c.send_line(settings);
                let _ = events.send(Event::Applied(Ok(())));
            }
            Instance::InProcess(p) => {
                let _ = p.calls.send(InCall::Apply(settings.to_string()));
            }
            Instance::Builtin(b) => {
                let result = super::builtin::SensorSettings::from_json(
                    settings.as_object().unwrap_or(&serde_json::Map::new()),
                )
                .map(|s| {
                    let _ = b.settings.send(s);
                })
                .map_err(|reason| CallError {
                    code: abi::ERR_REJECTED,
                    reason,
                });
                let _ = events.send(Event::Applied(result));
            }
        }
    }

    /// Plugin processes: sends a liveness ping (answered by [`Event::Pong`]); false for the
    /// kinds that have none.
    pub fn ping(&self, id: u64) -> bool {
        match self {
            Instance::Child(c) if c.framed => {
                c.send(Down::Ping { id });
                true
            }
            _ => false,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        match self {
            Instance::Child(c) => Some(c.pid),
            _ => None,
        }
    }

    /// Whether a hung instance can be ended (an in-process plugin cannot).
    pub fn killable(&self) -> bool {
        !matches!(self, Instance::InProcess(_))
    }

    /// Asks the instance to stop and waits up to `timeout`, then kills it.
    pub async fn stop(self, timeout: Duration) {
        match self {
            Instance::Child(mut c) => {
                if c.framed {
                    c.send(Down::Stop);
                } else {
                    c.lines.take(); // EOF on the plugin's stdin
                    c.signal(libc::SIGTERM);
                }
                if tokio::time::timeout(timeout, c.wait_exit()).await.is_err() {
                    c.signal(libc::SIGKILL);
                    c.wait_exit().await;
                }
            }
            Instance::InProcess(p) => {
                let (tx, rx) = oneshot::channel();
                let _ = p.calls.send(InCall::Stop(tx));
                if tokio::time::timeout(timeout, rx).await.is_err() {
                    tracing::error!(
                        "an in-process plugin did not return from stop; its thread is left behind"
                    );
                }
            }
            Instance::Builtin(b) => b.task.abort(),
        }
    }

    /// Ends the instance at once (a failure was already decided).
    pub async fn kill(self) {
        match self {
            Instance::Child(mut c) => {
                c.signal(libc::SIGKILL);
                c.wait_exit().await;
            }
            Instance::InProcess(p) => {
                // Cannot be killed; ask it to stop without waiting (it may be hung).
                let (tx, _rx) = oneshot::channel();
                let _ = p.calls.send(InCall::Stop(tx));
            }
            Instance::Builtin(b) => b.task.abort(),
        }
    }
}

/// A child process: a plugin-host speaking frames, or an exec plugin writing JSON lines.
pub struct ChildInstance {
    pid: u32,
    framed: bool,
    apply_id: u64,
    down: Option<mpsc::UnboundedSender<Down>>,
    lines: Option<mpsc::UnboundedSender<String>>,
    signals: mpsc::UnboundedSender<i32>,
    exited: watch::Receiver<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for ChildInstance {
    fn drop(&mut self) {
        let _ = self.signals.send(libc::SIGKILL);
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl ChildInstance {
    fn spawn(
        mut cmd: tokio::process::Command,
        framed: bool,
        events: Events,
    ) -> Result<ChildInstance, String> {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start the plugin process: {e}"))?;
        let pid = child.id().unwrap_or(0);
        let mut stdin = child.stdin.take().expect("piped");
        let mut stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let mut tasks = Vec::new();

        // The child's exit, and signals to it (only while it is not yet reaped, so the pid is ours).
        let (signals, mut signal_rx) = mpsc::unbounded_channel::<i32>();
        let (exited_tx, exited) = watch::channel(false);
        // The reader reports done at EOF; the exit is reported after what the plugin wrote.
        let (reader_done, reader_done_rx) = oneshot::channel::<()>();
        {
            let events = events.clone();
            tasks.push(tokio::spawn(async move {
                let status = loop {
                    tokio::select! {
                        status = child.wait() => break status,
                        Some(sig) = signal_rx.recv() => {
                            if sig == libc::SIGKILL {
                                let _ = child.start_kill();
                            } else if let Some(pid) = child.id() {
                                // SAFETY: the child is not reaped yet, so `pid` is still ours.
                                unsafe { libc::kill(pid as i32, sig) };
                            }
                        }
                    }
                };
                let _ = tokio::time::timeout(Duration::from_secs(2), reader_done_rx).await;
                let _ = events.send(Event::Ended(format!(
                    "the plugin process {}",
                    describe_exit(status)
                )));
                let _ = exited_tx.send(true);
            }));
        }

        // stderr: log lines (the plugin's own prints end up here too).
        {
            let events = events.clone();
            tasks.push(tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let line: String = line.chars().take(4096).collect();
                    let _ = events.send(Event::Log(abi::LOG_INFO, line));
                }
            }));
        }

        let (mut down, mut lines) = (None, None);
        if framed {
            let (tx, mut rx) = mpsc::unbounded_channel::<Down>();
            tasks.push(tokio::spawn(async move {
                while let Some(frame) = rx.recv().await {
                    if stdin.write_all(&protocol::encode(&frame)).await.is_err() {
                        break;
                    }
                }
            }));
            let acks = tx.clone();
            let events2 = events.clone();
            let signals2 = signals.clone();
            let reader = async move {
                loop {
                    let frame = match protocol::read_async::<Up>(&mut stdout).await {
                        Ok(Some(f)) => f,
                        Ok(None) => return,
                        Err(e) => {
                            let _ = events2.send(Event::Ended(format!("protocol violation: {e}")));
                            let _ = signals2.send(libc::SIGKILL);
                            return;
                        }
                    };
                    let event = match frame {
                        Up::Hello {
                            abi_major,
                            abi_minor,
                            version,
                            ..
                        } => Event::Loaded {
                            abi: format!("{abi_major}.{abi_minor}"),
                            version,
                        },
                        Up::Fatal { error } => Event::Started(Err(CallError {
                            code: abi::ERR_FAILED,
                            reason: error,
                        })),
                        Up::Started => Event::Started(Ok(())),
                        Up::StartFailed { code, error } => Event::Started(Err(CallError {
                            code,
                            reason: error,
                        })),
                        Up::Applied { code, reason, .. } => Event::Applied(if code == abi::OK {
                            Ok(())
                        } else {
                            Err(CallError {
                                code,
                                reason: reason.unwrap_or_default(),
                            })
                        }),
                        Up::Message {
                            id,
                            body,
                            content_type,
                            content_encoding,
                            properties,
                        } => {
                            let Ok(body) = base64::engine::general_purpose::STANDARD.decode(&body)
                            else {
                                let _ = acks.send(Down::Ack {
                                    id,
                                    code: abi::ERR_INVALID_ARGUMENT,
                                });
                                continue;
                            };
                            let (tx, rx) = oneshot::channel();
                            let acks = acks.clone();
                            tokio::spawn(async move {
                                let code = rx.await.unwrap_or(abi::ERR_STOPPING);
                                let _ = acks.send(Down::Ack { id, code });
                            });
                            Event::Message(
                                PluginMessage {
                                    body,
                                    content_type,
                                    content_encoding,
                                    properties,
                                },
                                tx,
                            )
                        }
                        Up::Log { level, text } => Event::Log(level, text),
                        Up::Health { state, detail } => Event::Health(state, detail),
                        Up::Pong { id } => Event::Pong(id),
                        Up::Stopped => continue,
                    };
                    if events2.send(event).is_err() {
                        return;
                    }
                }
            };
            tasks.push(tokio::spawn(async move {
                reader.await;
                let _ = reader_done.send(());
            }));
            down = Some(tx);
        } else {
            let (tx, mut rx) = mpsc::unbounded_channel::<String>();
            tasks.push(tokio::spawn(async move {
                while let Some(mut line) = rx.recv().await {
                    line.push('\n');
                    if stdin.write_all(line.as_bytes()).await.is_err() {
                        break;
                    }
                    let _ = stdin.flush().await;
                }
                // Dropping stdin here gives the plugin EOF.
            }));
            let events2 = events.clone();
            let reader = async move {
                let mut reader = tokio::io::BufReader::new(stdout);
                let mut line = Vec::new();
                loop {
                    line.clear();
                    // Bounded: a line longer than a message can be is a broken plugin.
                    let mut limited = (&mut reader).take(protocol::MAX_FRAME as u64);
                    match tokio::io::AsyncBufReadExt::read_until(&mut limited, b'\n', &mut line)
                        .await
                    {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    if line.last() != Some(&b'\n') && line.len() >= protocol::MAX_FRAME {
                        let _ = events2.send(Event::Ended("wrote a line over 1 MiB".into()));
                        return;
                    }
                    let text = String::from_utf8_lossy(&line);
                    let text = text.trim();
                    if text.is_empty() {
                        continue;
                    }
                    match super::exec_line(text) {
                        Ok(super::ExecLine::Message(m)) => {
                            let (tx, rx) = oneshot::channel();
                            if events2.send(Event::Message(m, tx)).is_err() {
                                return;
                            }
                            // One message at a time: the pipe holds the plugin back.
                            let _ = rx.await;
                        }
                        Ok(super::ExecLine::Log(level, text)) => {
                            let _ = events2.send(Event::Log(level, text));
                        }
                        Ok(super::ExecLine::Health(state, detail)) => {
                            let _ = events2.send(Event::Health(state, detail));
                        }
                        Ok(super::ExecLine::Reject(reason)) => {
                            let _ = events2.send(Event::LateReject(reason));
                        }
                        Err(e) => {
                            let _ = events2.send(Event::Log(
                                abi::LOG_WARN,
                                format!("ignored a line that is not a message: {e}"),
                            ));
                        }
                    }
                }
            };
            tasks.push(tokio::spawn(async move {
                reader.await;
                let _ = reader_done.send(());
            }));
            lines = Some(tx);
        }
        Ok(ChildInstance {
            pid,
            framed,
            apply_id: 0,
            down,
            lines,
            signals,
            exited,
            tasks,
        })
    }

    fn send(&self, frame: Down) {
        if let Some(d) = &self.down {
            let _ = d.send(frame);
        }
    }

    fn send_line(&self, settings: &Value) {
        if let Some(l) = &self.lines {
            let _ = l.send(settings.to_string());
        }
    }

    fn signal(&self, sig: i32) {
        let _ = self.signals.send(sig);
    }

    async fn wait_exit(&mut self) {
        let _ = self.exited.wait_for(|e| *e).await;
    }
}

/// A library loaded into the daemon, called from a thread of its own.
pub struct InProcessInstance {
    calls: std::sync::mpsc::Sender<InCall>,
}

enum InCall {
    Apply(String),
    Stop(oneshot::Sender<()>),
}

struct DirectHost {
    events: Events,
}

impl HostSide for DirectHost {
    fn publish(&self, message: PluginMessage) -> i32 {
        let (tx, rx) = oneshot::channel();
        if self.events.send(Event::Message(message, tx)).is_err() {
            return abi::ERR_STOPPING;
        }
        // Plugin threads are not runtime threads, so blocking here is allowed.
        if tokio::runtime::Handle::try_current().is_ok() {
            return abi::ERR_FAILED; // never block a runtime thread
        }
        rx.blocking_recv().unwrap_or(abi::ERR_STOPPING)
    }

    fn log(&self, level: i32, text: &str) {
        let _ = self.events.send(Event::Log(level, text.to_string()));
    }

    fn health(&self, state: i32, detail: &str) {
        let _ = self.events.send(Event::Health(state, detail.to_string()));
    }
}

impl InProcessInstance {
    async fn launch(
        path: &std::path::Path,
        settings: &Value,
        allow_unsafe: bool,
        events: Events,
    ) -> Result<InProcessInstance, String> {
        let path = path.to_path_buf();
        let library = tokio::task::spawn_blocking(move || Library::load(&path, allow_unsafe))
            .await
            .map_err(|e| format!("loading panicked: {e}"))??;
        let _ = events.send(Event::Loaded {
            abi: format!("{}.{}", library.abi_major, library.abi_minor),
            version: library.version.clone(),
        });
        let (calls, receiver) = std::sync::mpsc::channel::<InCall>();
        let settings = settings.to_string();
        let host: Arc<dyn HostSide> = Arc::new(DirectHost {
            events: events.clone(),
        });
        std::thread::Builder::new()
            .name("plugin-inproc".into())
            .spawn(move || {
                let mut instance = match library.start(host, &settings) {
                    Ok(i) => {
                        let _ = events.send(Event::Started(Ok(())));
                        Some(i)
                    }
                    Err(e) => {
                        let _ = events.send(Event::Started(Err(e)));
                        None
                    }
                };
                for call in receiver {
                    match call {
                        InCall::Apply(s) => {
                            let r = match instance.as_mut() {
                                Some(i) => i.apply_settings(&s),
                                None => Err(CallError {
                                    code: abi::ERR_FAILED,
                                    reason: "not started".into(),
                                }),
                            };
                            let _ = events.send(Event::Applied(r));
                        }
                        InCall::Stop(done) => {
                            if let Some(i) = instance.take() {
                                i.stop();
                            }
                            let _ = done.send(());
                            return;
                        }
                    }
                }
            })
            .map_err(|e| format!("cannot start a thread: {e}"))?;
        Ok(InProcessInstance { calls })
    }
}

/// The built-in simulated sensor.
pub struct BuiltinInstance {
    settings: watch::Sender<super::builtin::SensorSettings>,
    task: tokio::task::JoinHandle<()>,
}

impl BuiltinInstance {
    fn launch(name: &str, settings: &Value, events: Events) -> Result<BuiltinInstance, String> {
        use super::builtin as sensor;
        match sensor::SensorSettings::from_json(
            settings.as_object().unwrap_or(&serde_json::Map::new()),
        ) {
            Ok(s) => {
                let (tx, rx) = watch::channel(s);
                let task = tokio::spawn(sensor::run(name.to_string(), rx, events.clone()));
                let _ = events.send(Event::Started(Ok(())));
                Ok(BuiltinInstance { settings: tx, task })
            }
            Err(reason) => {
                let (tx, _) = watch::channel(sensor::SensorSettings {
                    interval: Duration::from_secs(5),
                });
                let _ = events.send(Event::Started(Err(CallError {
                    code: abi::ERR_REJECTED,
                    reason,
                })));
                Ok(BuiltinInstance {
                    settings: tx,
                    task: tokio::spawn(async {}),
                })
            }
        }
    }
}
