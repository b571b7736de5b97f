//! A plugin's child process, whichever kind runs in it (a hosted library or an exec plugin):
//! its environment and limits, its exit, its stderr as log lines, and signals to it.

use std::process::Stdio;
use std::time::Duration;

use hubagent_plugin_sdk::abi;
use tokio::io::AsyncBufReadExt;
use tokio::process::{ChildStdin, ChildStdout, Command};
use tokio::sync::{mpsc, oneshot, watch};

use super::running::{Event, Events};
use super::sandbox::Policy;

/// Environment for plugin processes: nothing of the daemon's (which may hold
/// PROVISIONING_SYMMETRIC_KEY), only the basics and what the configuration adds.
pub fn base_env(cmd: &mut Command, name: &str) {
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

/// A sandboxed plugin's private directory, where it can find it: `HUBAGENT_PLUGIN_DIR`, and
/// `TMPDIR` (the sandbox keeps it out of `/tmp`).
pub fn private_dir_env(cmd: &mut Command, sandbox: Option<&Policy>) {
    if let Some(dir) = sandbox.and_then(|p| p.private_dir.as_ref()) {
        cmd.env("HUBAGENT_PLUGIN_DIR", dir).env("TMPDIR", dir);
    }
}

/// Memory cap and parent-death signal, set in the child between fork and exec.
pub fn limit_child(cmd: &mut Command, memory_limit: Option<u64>) {
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

/// What runtimes print when an allocation fails: Rust's (`memory allocation of N bytes
/// failed`, then an abort), C++'s `std::bad_alloc`, Python's `MemoryError`, glibc's and others'
/// "out of memory" / "Cannot allocate memory".
fn says_allocation_failed(line: &str) -> bool {
    let lower = line.to_ascii_lowercase();
    (lower.contains("memory allocation of") && lower.contains("failed"))
        || lower.contains("bad_alloc")
        || lower.contains("memoryerror")
        || lower.contains("out of memory")
        || lower.contains("cannot allocate memory")
}

/// A size for the log: whole MiB when it is, else bytes.
fn mebibytes(bytes: u64) -> String {
    const MIB: u64 = 1024 * 1024;
    match bytes % MIB {
        0 => format!("{} MiB", bytes / MIB),
        _ => format!("{bytes} bytes"),
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

/// A running plugin process and the tasks that serve it; killed when dropped.
pub struct ChildProcess {
    pid: u32,
    signals: mpsc::UnboundedSender<i32>,
    exited: watch::Receiver<bool>,
    /// Taken by `read_stdout`: its end lets the exit be reported after what the plugin wrote.
    reader_done: Option<oneshot::Sender<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let _ = self.signals.send(libc::SIGKILL);
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A stderr line's level and text: a line may start with the level it wants, as systemd reads
/// them (`<3>` error … `<7>` debug, sd-daemon(3)) or as a word (`ERROR:`, `WARN:`, `WARNING:`,
/// `INFO:`, `DEBUG:`, `TRACE:`); the prefix is cut off. Other lines get `default` (the
/// plugin's `stderr_level`).
pub fn stderr_line(line: &str, default: i32) -> (i32, &str) {
    if let Some(rest) = line.strip_prefix('<')
        && let Some((digit, text)) = rest.split_once('>')
        && let Ok(n) = digit.parse::<u8>()
        && digit.len() == 1
    {
        let level = match n {
            0..=3 => abi::LOG_ERROR,
            4 => abi::LOG_WARN,
            5 | 6 => abi::LOG_INFO,
            _ => abi::LOG_DEBUG,
        };
        return (level, text);
    }
    const WORDS: &[(&str, i32)] = &[
        ("ERROR:", abi::LOG_ERROR),
        ("WARNING:", abi::LOG_WARN),
        ("WARN:", abi::LOG_WARN),
        ("INFO:", abi::LOG_INFO),
        ("DEBUG:", abi::LOG_DEBUG),
        ("TRACE:", abi::LOG_TRACE),
    ];
    for (word, level) in WORDS {
        if let Some(text) = line.strip_prefix(word) {
            return (*level, text.trim_start());
        }
    }
    (default, line)
}

impl ChildProcess {
    /// Starts `cmd` with piped stdio; its stderr becomes [`Event::Log`]s and its exit
    /// [`Event::Ended`]. The caller drives stdin and reads stdout (`read_stdout`).
    /// `memory_limit` is the address-space limit the process runs under: when it ends after
    /// saying an allocation failed, its end names that limit.
    pub fn spawn(
        mut cmd: Command,
        events: &Events,
        stderr_level: i32,
        memory_limit: Option<u64>,
    ) -> Result<(ChildProcess, ChildStdin, ChildStdout), String> {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            // A process group of its own: Ctrl-C at a terminal (`hubagent run`, `plugins try`)
            // reaches the agent, which stops its plugins in order, instead of killing them all
            // at once. PR_SET_PDEATHSIG still ends them with the agent.
            .process_group(0);
        let mut child = cmd.spawn().map_err(|e| {
            let limit = crate::util::fs::limit_hint(&e);
            format!("cannot start the plugin process: {e}{limit}")
        })?;
        let pid = child.id().unwrap_or(0);
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let mut tasks = Vec::new();

        // The child's exit, and signals to it (only while it is not yet reaped, so the pid is ours).
        let (signals, mut signal_rx) = mpsc::unbounded_channel::<i32>();
        let (exited_tx, exited) = watch::channel(false);
        // The reader reports done at EOF; the exit is reported after what the plugin wrote.
        let (reader_done, reader_done_rx) = oneshot::channel::<()>();
        // The stderr reader reports done at EOF, with whether the process said an allocation
        // failed (read before its end is described).
        let (stderr_done, stderr_done_rx) = oneshot::channel::<bool>();
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
                let out_of_memory = tokio::time::timeout(Duration::from_secs(2), stderr_done_rx)
                    .await
                    .is_ok_and(|said| said.unwrap_or(false));
                let ended = describe_exit(status);
                let _ = events.send(Event::Ended(match (out_of_memory, memory_limit) {
                    (true, Some(limit)) => format!(
                        "the plugin process {ended} after an allocation failed: it reached its memory_limit of {}",
                        mebibytes(limit)
                    ),
                    _ => format!("the plugin process {ended}"),
                }));
                let _ = exited_tx.send(true);
            }));
        }

        // stderr: log lines (the plugin's own prints end up here too).
        {
            let events = events.clone();
            tasks.push(tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(stderr).lines();
                let mut out_of_memory = false;
                while let Ok(Some(line)) = lines.next_line().await {
                    let (level, text) = stderr_line(&line, stderr_level);
                    out_of_memory |= says_allocation_failed(text);
                    let text: String = text.chars().take(4096).collect();
                    let _ = events.send(Event::Log(level, text));
                }
                let _ = stderr_done.send(out_of_memory);
            }));
        }
        let process = ChildProcess {
            pid,
            signals,
            exited,
            reader_done: Some(reader_done),
            tasks,
        };
        Ok((process, stdin, stdout))
    }

    /// Runs a task that feeds the plugin's stdin; it lives as long as the process.
    pub fn write_stdin(&mut self, writer: impl Future<Output = ()> + Send + 'static) {
        self.tasks.push(tokio::spawn(writer));
    }

    /// Runs the task that reads the plugin's stdout until EOF.
    pub fn read_stdout(&mut self, reader: impl Future<Output = ()> + Send + 'static) {
        let done = self.reader_done.take();
        self.tasks.push(tokio::spawn(async move {
            reader.await;
            if let Some(done) = done {
                let _ = done.send(());
            }
        }));
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// A handle that sends signals to the process (until it is reaped).
    pub fn signaller(&self) -> mpsc::UnboundedSender<i32> {
        self.signals.clone()
    }

    pub fn signal(&self, sig: i32) {
        let _ = self.signals.send(sig);
    }

    async fn wait_exit(&mut self) {
        let _ = self.exited.wait_for(|e| *e).await;
    }

    /// Waits up to `timeout` for the process to leave (it was asked to), then kills it.
    pub async fn wait_or_kill(&mut self, timeout: Duration) {
        if tokio::time::timeout(timeout, self.wait_exit())
            .await
            .is_err()
        {
            self.kill().await;
        }
    }

    pub async fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        self.wait_exit().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_failures_are_recognised() {
        assert!(says_allocation_failed(
            "memory allocation of 16777216 bytes failed"
        ));
        assert!(says_allocation_failed(
            "terminate called after throwing an instance of 'std::bad_alloc'"
        ));
        assert!(says_allocation_failed("MemoryError"));
        assert!(!says_allocation_failed("allocated 16 MiB for the cache"));
        assert_eq!(mebibytes(128 * 1024 * 1024), "128 MiB");
        assert_eq!(mebibytes(1000), "1000 bytes");
    }

    #[test]
    fn stderr_lines_may_name_their_level() {
        let info = abi::LOG_INFO;
        assert_eq!(
            stderr_line("<3>disk gone", info),
            (abi::LOG_ERROR, "disk gone")
        );
        assert_eq!(stderr_line("<4>slow", info), (abi::LOG_WARN, "slow"));
        assert_eq!(stderr_line("<7>x=1", info), (abi::LOG_DEBUG, "x=1"));
        assert_eq!(stderr_line("WARN: slow", info), (abi::LOG_WARN, "slow"));
        assert_eq!(stderr_line("WARNING: slow", info), (abi::LOG_WARN, "slow"));
        assert_eq!(stderr_line("ERROR:bad", info), (abi::LOG_ERROR, "bad"));
        assert_eq!(
            stderr_line("Traceback (most recent call last):", abi::LOG_WARN),
            (abi::LOG_WARN, "Traceback (most recent call last):")
        );
        assert_eq!(
            stderr_line("<12>not a level", info),
            (info, "<12>not a level")
        );
        assert_eq!(
            stderr_line("warn: lower case is text", info),
            (info, "warn: lower case is text")
        );
    }
}
