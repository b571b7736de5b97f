//! A library plugin in a child process (`isolation = "process"`, the default), seen from the
//! daemon: it starts `hubagent-plugin-host` (the other side, in `host.rs`; the executable the
//! daemon opened when it started, `host_program.rs`) and turns the frames of `protocol.rs` into
//! [`Event`]s and back.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use base64::Engine;
use hubagent_plugin_sdk::abi;
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::process::ChildStdout;
use tokio::sync::mpsc;

use super::answer::Answer;
use super::calls::{C2dMessage, MethodAnswer};
use super::library::{CallError, PluginMessage};
use super::process::{self, ChildProcess};
use super::protocol::{self, Down, Up};
use super::running::{Event, Events};
use super::sandbox::Policy;
use crate::config::plugin::PluginSpec;

/// A running `hubagent-plugin-host` process.
pub struct HostedPlugin {
    process: ChildProcess,
    down: mpsc::UnboundedSender<Down>,
    apply_id: u64,
}

impl HostedPlugin {
    /// Starts the plugin-host for the library at `path` and asks it to start the plugin; the
    /// answer arrives as [`Event::Started`].
    pub fn launch(
        spec: &PluginSpec,
        path: &Path,
        env: &BTreeMap<String, String>,
        settings: &Value,
        allow_unsafe: bool,
        sandbox: Option<&Policy>,
        events: Events,
    ) -> Result<HostedPlugin, String> {
        // Checked here too so that the reason shows without starting a process.
        super::trust::check(path, allow_unsafe)?;
        let program = super::host_program::opened()?;
        let mut cmd = tokio::process::Command::new(program.exec_path());
        // `ps` shows the host's file, not /proc/self/fd/N.
        cmd.arg0(program.path());
        cmd.arg("--build")
            .arg(super::host_program::BUILD)
            .arg("--name")
            .arg(&spec.name)
            .arg("--path")
            .arg(path);
        if allow_unsafe {
            cmd.arg("--allow-unsafe-paths");
        }
        // The host confines itself before it loads the library (host.rs).
        if let Some(policy) = sandbox {
            cmd.arg("--sandbox").arg(policy.to_argument());
        }
        process::base_env(&mut cmd, &spec.name);
        process::private_dir_env(&mut cmd, sandbox);
        // Fewer malloc arenas: address space is what RLIMIT_AS counts.
        cmd.env("MALLOC_ARENA_MAX", "2");
        cmd.envs(env);
        process::limit_child(&mut cmd, spec.limits.memory_limit);
        let (mut process, mut stdin, stdout) = ChildProcess::spawn(
            cmd,
            &events,
            spec.limits.stderr_level,
            spec.limits.memory_limit,
        )?;
        let (down, mut frames) = mpsc::unbounded_channel::<Down>();
        process.write_stdin(async move {
            while let Some(frame) = frames.recv().await {
                if stdin.write_all(&protocol::encode(&frame)).await.is_err() {
                    break;
                }
            }
        });
        let signals = process.signaller();
        process.read_stdout(read_frames(stdout, down.clone(), events, signals));
        let plugin = HostedPlugin {
            process,
            down,
            apply_id: 0,
        };
        plugin.send(Down::Start {
            settings: settings.clone(),
        });
        Ok(plugin)
    }

    fn send(&self, frame: Down) {
        let _ = self.down.send(frame);
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Sends new settings; the answer arrives as [`Event::Applied`].
    pub fn apply(&mut self, settings: &Value) {
        self.apply_id += 1;
        self.send(Down::Settings {
            id: self.apply_id,
            settings: settings.clone(),
        });
    }

    /// A liveness ping, answered by [`Event::Pong`].
    pub fn ping(&self, id: u64) {
        self.send(Down::Ping { id });
    }

    /// A direct method, answered by [`Event::MethodAnswer`].
    pub fn invoke(&self, id: u64, method: &str, payload: &Value) {
        self.send(Down::Method {
            id,
            method: method.to_string(),
            payload: payload.clone(),
        });
    }

    /// A C2D message, answered by [`Event::C2dTaken`].
    pub fn deliver(&self, id: u64, message: &C2dMessage) {
        self.send(Down::C2d {
            id,
            message: message.clone(),
        });
    }

    /// Asks the plugin to stop and waits up to `timeout`, then kills it.
    pub async fn stop(mut self, timeout: Duration) {
        self.send(Down::Stop);
        self.process.wait_or_kill(timeout).await;
    }

    pub async fn kill(mut self) {
        self.process.kill().await;
    }
}

/// Reads the plugin-host's frames until EOF; a protocol violation ends the process.
async fn read_frames(
    mut stdout: ChildStdout,
    acks: mpsc::UnboundedSender<Down>,
    events: Events,
    signals: mpsc::UnboundedSender<i32>,
) {
    loop {
        let frame = match protocol::read_async::<Up>(&mut stdout).await {
            Ok(Some(f)) => f,
            Ok(None) => return,
            Err(e) => {
                let _ = events.send(Event::Ended(format!("protocol violation: {e}")));
                let _ = signals.send(libc::SIGKILL);
                return;
            }
        };
        if let Up::Hello { declarations, .. } = &frame
            && events.send(Event::Declared(declarations.clone())).is_err()
        {
            return;
        }
        let Some(event) = event_of(frame, &acks) else {
            continue;
        };
        if events.send(event).is_err() {
            return;
        }
    }
}

/// The event a frame stands for; `None` for a frame the supervisor need not see.
fn event_of(frame: Up, acks: &mpsc::UnboundedSender<Down>) -> Option<Event> {
    let event = match frame {
        Up::Reported { properties } => Event::Reported(properties),
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
            creation_time,
        } => {
            let Ok(body) = base64::engine::general_purpose::STANDARD.decode(&body) else {
                let _ = acks.send(Down::Ack {
                    id,
                    code: abi::ERR_INVALID_ARGUMENT,
                });
                return None;
            };
            let message = PluginMessage {
                body,
                content_type,
                content_encoding,
                properties,
                creation_time,
            };
            Event::Message(message, ack_when_answered(id, acks.clone()))
        }
        Up::Batch { id, messages } => {
            Event::Batch(messages, batch_ack_when_answered(id, acks.clone()))
        }
        Up::Log { level, text } => Event::Log(level, text),
        Up::Health { state, detail } => Event::Health(state, detail),
        Up::Pong { id } => Event::Pong(id),
        Up::MethodAnswer {
            id,
            status,
            payload,
        } => Event::MethodAnswer(id, MethodAnswer { status, payload }),
        Up::C2dTaken { id, code, reason } => Event::C2dTaken(
            id,
            if code == abi::OK {
                Ok(())
            } else {
                Err(reason.unwrap_or_else(|| "no reason given".into()))
            },
        ),
        Up::Stopped => return None,
    };
    Some(event)
}

/// The answer to batch `id`, sent on to the plugin-host as a `batch-ack` frame (no codes, if
/// dropped unanswered: the host answers each message "stopping").
fn batch_ack_when_answered(id: u64, acks: mpsc::UnboundedSender<Down>) -> Answer<Vec<i32>> {
    Answer::to(move |codes: Option<Vec<i32>>| {
        let codes = codes.unwrap_or_default();
        let _ = acks.send(Down::BatchAck { id, codes });
    })
}

/// The answer to message `id`'s publish, sent on to the plugin-host as an `ack` frame.
fn ack_when_answered(id: u64, acks: mpsc::UnboundedSender<Down>) -> Answer<i32> {
    Answer::to(move |code: Option<i32>| {
        let code = code.unwrap_or(abi::ERR_STOPPING);
        let _ = acks.send(Down::Ack { id, code });
    })
}
