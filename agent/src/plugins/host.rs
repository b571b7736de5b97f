//! `hubagent-plugin-host` (and the hidden `hubagent plugin-host`): one library plugin in its own
//! process. The daemon starts it (see `hosted.rs`) with the protocol on stdin/stdout (see
//! `protocol.rs`); the plugin's own writes to stdout and stderr end up on stderr, which the
//! daemon logs line by line.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::os::fd::FromRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};

use base64::Engine;
use hubagent_plugin_sdk::abi;

use super::calls::{C2dMessage, MethodAnswer};
use super::library::{self, HostSide, Library, PluginMessage};
use super::protocol::{self, Down, Up};

/// Moves the protocol off fds 0 and 1 so that nothing the plugin prints can corrupt it: fd 0
/// becomes /dev/null and fd 1 a copy of stderr.
fn take_stdio() -> std::io::Result<(File, File)> {
    // SAFETY: plain fd syscalls on fds this process owns; results are checked.
    unsafe {
        let input = libc::fcntl(0, libc::F_DUPFD_CLOEXEC, 3);
        let output = libc::fcntl(1, libc::F_DUPFD_CLOEXEC, 3);
        if input < 0 || output < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        if null < 0 || libc::dup2(null, 0) < 0 || libc::dup2(2, 1) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        libc::close(null);
        Ok((File::from_raw_fd(input), File::from_raw_fd(output)))
    }
}

type Writer = Arc<Mutex<BufWriter<File>>>;

fn send(out: &Writer, frame: &Up) {
    write_frame(out, &protocol::encode(frame));
}

/// Writes an encoded frame (length prefix included).
fn write_frame(out: &Writer, bytes: &[u8]) {
    let mut w = out.lock().unwrap_or_else(|e| e.into_inner());
    if w.write_all(bytes).and_then(|()| w.flush()).is_err() {
        // The daemon is gone: nothing left to do.
        std::process::exit(0);
    }
}

/// Frames of a batch stay under this size (well below `protocol::MAX_FRAME`); a message larger
/// than it travels alone.
const BATCH_FRAME_BUDGET: usize = protocol::MAX_FRAME / 2;

/// A publish waiting for the daemon's answer.
enum Waiter {
    One(SyncSender<i32>),
    /// One frame of a batch: its messages' codes, in order.
    Batch(SyncSender<Vec<i32>>, usize),
}

impl Waiter {
    fn stopping(self) {
        match self {
            Waiter::One(tx) => {
                let _ = tx.send(abi::ERR_STOPPING);
            }
            Waiter::Batch(tx, count) => {
                let _ = tx.send(vec![abi::ERR_STOPPING; count]);
            }
        }
    }
}

/// Splits messages into frames of at most `budget` bytes of `batch` encoding (a larger message
/// alone), in order.
fn frames_of(messages: Vec<PluginMessage>, budget: usize) -> Vec<Vec<PluginMessage>> {
    let mut frames: Vec<Vec<PluginMessage>> = Vec::new();
    let mut size = 0;
    for message in messages {
        let len = protocol::batch_size(&message);
        match frames.last_mut() {
            Some(frame) if size + len < budget => {
                size += len;
                frame.push(message);
            }
            _ => {
                size = len;
                frames.push(vec![message]);
            }
        }
    }
    frames
}

struct FrameHost {
    out: Writer,
    pending: Mutex<HashMap<u64, Waiter>>,
    next_id: AtomicU64,
    closed: AtomicBool,
}

impl FrameHost {
    fn take_waiter(&self, id: u64) -> Option<Waiter> {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id)
    }

    /// The plugin's `stop` returned: answer every publish still waiting (a thread it left
    /// running) and every later one with `ERR_STOPPING`. Until then the daemon answers them as
    /// at any other time, also while the plugin stops (plugins/task.rs, `stop`), so that its
    /// `stop` can join its publishing threads.
    fn release_publishers(&self) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        self.closed.store(true, Ordering::SeqCst);
        for (_, waiter) in pending.drain() {
            waiter.stopping();
        }
    }
}

impl HostSide for FrameHost {
    fn publish(&self, message: PluginMessage) -> i32 {
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = sync_channel(1);
        {
            // Checked under the lock that `release_publishers` takes, so no publish can slip
            // in after it and wait for an answer that never comes.
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            if self.closed.load(Ordering::SeqCst) {
                return abi::ERR_STOPPING;
            }
            pending.insert(id, Waiter::One(tx));
        }
        send(
            &self.out,
            &Up::Message {
                id,
                body: base64::engine::general_purpose::STANDARD.encode(&message.body),
                content_type: message.content_type,
                content_encoding: message.content_encoding,
                properties: message.properties,
                creation_time: message.creation_time,
            },
        );
        rx.recv().unwrap_or(abi::ERR_STOPPING)
    }

    /// Sends the batch in as few frames as fit (usually one), all before waiting for any
    /// answer; the daemon queues each frame with one write.
    fn publish_batch(&self, messages: Vec<PluginMessage>) -> Vec<i32> {
        if messages.is_empty() {
            return Vec::new();
        }
        let mut answers = Vec::new();
        for frame in frames_of(messages, BATCH_FRAME_BUDGET) {
            let id = self.next_id.fetch_add(1, Ordering::SeqCst);
            let (tx, rx) = sync_channel(1);
            {
                let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                if self.closed.load(Ordering::SeqCst) {
                    answers.push((frame.len(), None));
                    continue;
                }
                pending.insert(id, Waiter::Batch(tx, frame.len()));
            }
            let bytes = protocol::encode_batch(id, &frame);
            write_frame(&self.out, &bytes);
            answers.push((frame.len(), Some(rx)));
        }
        let mut codes = Vec::new();
        for (count, rx) in answers {
            let answer = rx.and_then(|rx| rx.recv().ok());
            match answer {
                Some(frame_codes) if frame_codes.len() == count => codes.extend(frame_codes),
                _ => codes.extend(std::iter::repeat_n(abi::ERR_STOPPING, count)),
            }
        }
        codes
    }

    fn report(&self, properties: serde_json::Map<String, serde_json::Value>) {
        send(&self.out, &Up::Reported { properties });
    }

    fn log(&self, level: i32, text: &str) {
        send(
            &self.out,
            &Up::Log {
                level,
                text: text.chars().take(8192).collect(),
            },
        );
    }

    fn health(&self, state: i32, detail: &str) {
        send(
            &self.out,
            &Up::Health {
                state,
                detail: detail.chars().take(2048).collect(),
            },
        );
    }
}

/// A plugin callback for the callback thread.
enum Call {
    Start(String),
    Apply(u64, String),
    Method(u64, String, String),
    C2d(u64, C2dMessage),
    Stop,
}

/// `plugin-host --probe`: loads the library as the host would, prints what it found as one JSON
/// line (`{"ok": true, "abi", "name", "version"}` or `{"ok": false, "error"}`) and exits, without
/// starting the plugin (plugins/preflight.rs).
pub fn probe(path: &Path, allow_unsafe: bool) -> i32 {
    let answer = match Library::load(path, allow_unsafe) {
        Ok(library) => serde_json::json!({
            "ok": true,
            "abi": format!("{}.{}", library.abi_major, library.abi_minor),
            "name": library.name,
            "version": library.version,
        }),
        Err(error) => serde_json::json!({"ok": false, "error": error}),
    };
    println!("{answer}");
    if answer["ok"] == true { 0 } else { 2 }
}

/// Runs the plugin process; returns the exit code (0 after a clean stop).
pub fn run(name: &str, path: &Path, allow_unsafe: bool, sandbox: Option<&str>) -> i32 {
    let (input, output) = match take_stdio() {
        Ok(fds) => fds,
        Err(e) => {
            eprintln!("hubagent plugin-host {name}: cannot set up stdio: {e}");
            return 2;
        }
    };
    let out: Writer = Arc::new(Mutex::new(BufWriter::new(output)));
    // Confined before the library is loaded: none of its code, constructors included, runs with
    // the agent's access. Still single-threaded here, as Landlock and seccomp want.
    if let Some(policy) = sandbox {
        let confined = super::sandbox::Policy::from_argument(policy)
            .and_then(|policy| super::sandbox::confine_self(&policy));
        if let Err(error) = confined {
            send(&out, &Up::Fatal { error });
            return 2;
        }
    }
    let library = match Library::load(path, allow_unsafe) {
        Ok(l) => l,
        Err(error) => {
            send(&out, &Up::Fatal { error });
            return 2;
        }
    };
    send(
        &out,
        &Up::Hello {
            abi_major: library.abi_major,
            abi_minor: library.abi_minor,
            name: library.name.clone(),
            version: library.version.clone(),
            declarations: library.declarations.clone(),
        },
    );
    let host = Arc::new(FrameHost {
        out: out.clone(),
        pending: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(1),
        closed: AtomicBool::new(false),
    });

    // Plugin callbacks run one at a time on this thread; the main thread keeps reading frames
    // (acks for messages published from inside a callback, pings) meanwhile.
    let (calls, receiver) = std::sync::mpsc::channel::<Call>();
    {
        let host = host.clone();
        std::thread::Builder::new()
            .name("plugin-callbacks".into())
            .spawn(move || serve_callbacks(library, host, receiver))
            .expect("spawn the callback thread");
    }
    read_frames(BufReader::new(input), &host, &calls)
}

/// The callback thread: calls the plugin; a stop ends the process.
fn serve_callbacks(library: Library, host: Arc<FrameHost>, calls: Receiver<Call>) {
    let out = host.out.clone();
    let mut instance = None;
    for call in calls {
        match call {
            Call::Start(settings) => {
                match library.start(host.clone(), &settings) {
                    Ok(i) => {
                        instance = Some(i);
                        // The host's start-up (arguments, loading and checking the library, the
                        // sandbox) is over: its pages go back before the daemon hears of it.
                        crate::system::start_up_memory::release();
                        send(&out, &Up::Started);
                    }
                    Err(e) => send(
                        &out,
                        &Up::StartFailed {
                            code: e.code,
                            error: e.reason,
                        },
                    ),
                };
            }
            Call::Apply(id, settings) => {
                let result = library::apply_if_started(instance.as_mut(), &settings);
                let (code, reason) = match result {
                    Ok(()) => (abi::OK, None),
                    Err(e) => (e.code, Some(e.reason)),
                };
                send(&out, &Up::Applied { id, code, reason });
            }
            Call::Method(id, method, payload) => {
                let MethodAnswer { status, payload } =
                    library::invoke_if_started(instance.as_mut(), &method, &payload);
                send(
                    &out,
                    &Up::MethodAnswer {
                        id,
                        status,
                        payload,
                    },
                );
            }
            Call::C2d(id, message) => {
                let (code, reason) = match library::receive_if_started(instance.as_mut(), &message)
                {
                    Ok(()) => (abi::OK, None),
                    Err(e) => (e.code, Some(e.reason)),
                };
                send(&out, &Up::C2dTaken { id, code, reason });
            }
            Call::Stop => {
                if let Some(i) = instance.take() {
                    i.stop();
                }
                host.release_publishers();
                send(&out, &Up::Stopped);
                let _ = out.lock().map(|mut w| w.flush());
                std::process::exit(0);
            }
        }
    }
}

/// The main thread: reads the daemon's frames, passing calls on to the callback thread and
/// answering acks and pings itself; leaves when the daemon closes the pipe.
fn read_frames(mut input: BufReader<File>, host: &FrameHost, calls: &Sender<Call>) -> ! {
    loop {
        match protocol::read_sync::<Down>(&mut input) {
            Ok(Some(Down::Start { settings })) => {
                let _ = calls.send(Call::Start(settings.to_string()));
            }
            Ok(Some(Down::Settings { id, settings })) => {
                let _ = calls.send(Call::Apply(id, settings.to_string()));
            }
            Ok(Some(Down::Ack { id, code })) => {
                if let Some(Waiter::One(w)) = host.take_waiter(id) {
                    let _ = w.send(code);
                }
            }
            Ok(Some(Down::BatchAck { id, codes })) => {
                if let Some(Waiter::Batch(w, _)) = host.take_waiter(id) {
                    let _ = w.send(codes);
                }
            }
            Ok(Some(Down::Ping { id })) => send(&host.out, &Up::Pong { id }),
            Ok(Some(Down::Method {
                id,
                method,
                payload,
            })) => {
                let _ = calls.send(Call::Method(id, method, payload.to_string()));
            }
            Ok(Some(Down::C2d { id, message })) => {
                let _ = calls.send(Call::C2d(id, message));
            }
            Ok(Some(Down::Stop)) => {
                let _ = calls.send(Call::Stop);
            }
            Ok(None) | Err(_) => {
                // The daemon closed the pipe (it stopped or died): leave at once.
                host.closed.store(true, Ordering::SeqCst);
                std::process::exit(0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_split_into_frames_under_the_budget_in_order() {
        // Bodies that make messages of 30, 30, 30, 100, 12 and 12 bytes of `batch` encoding.
        let bodies = [19, 19, 19, 89, 1, 1];
        let messages: Vec<PluginMessage> = bodies
            .iter()
            .enumerate()
            .map(|(i, &n)| PluginMessage {
                body: vec![i as u8; n],
                content_type: None,
                content_encoding: None,
                properties: Vec::new(),
                creation_time: None,
            })
            .collect();
        assert_eq!(protocol::batch_size(&messages[0]), 30);
        let frames = frames_of(messages, 64);
        let shape: Vec<Vec<(u8, usize)>> = frames
            .iter()
            .map(|f| {
                f.iter()
                    .map(|m| (m.body[0], protocol::batch_size(m)))
                    .collect()
            })
            .collect();
        // Two of 30 fit, the third starts a frame, the one larger than the budget travels
        // alone, and the small ones after it share one.
        assert_eq!(
            shape,
            vec![
                vec![(0, 30), (1, 30)],
                vec![(2, 30)],
                vec![(3, 100)],
                vec![(4, 12), (5, 12)],
            ]
        );
    }
}
