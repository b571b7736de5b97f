//! The agent's side of `hubagent-tpm` (docs/tpm.md, "The TPM helper"): finds and opens the
//! helper executable, starts it on the first TPM operation of this process, and sends it one
//! request at a time.
//!
//! The helper is opened once and executed through `/proc/self/fd/N`, as the plugin host is
//! (plugins/host_program.rs): a package upgrade replacing the file does not change which build
//! this process runs. A helper that dies (killed, crashed, or its TPM library aborting) fails the
//! operation it was doing with [`TpmError::Helper`], which names how it ended; the next
//! operation starts a new one. Nothing is retried here: the callers (DPS registration, SAS token
//! renewal, the TLS handshake) already retry with their own back-off, and an operation that
//! changes the TPM (an import) must not run twice without its caller knowing. A helper the
//! dynamic loader could not start (a TPM library not installed: the package only recommends them)
//! fails with an error naming the library and what to install ([`helper_stderr`]).
//!
//! A helper left without requests for [`IDLE`] is stopped (its input closed; it exits): the TPM
//! is used in bursts (a registration, a SAS token renewal, a TLS handshake) and the helper maps
//! the TPM libraries, so between bursts the agent holds none of them (docs/tpm.md).

use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::TpmError;
use super::helper_stderr::{self, LOADER_FAILED, LoaderFailure};
use super::protocol::{self, Answer, BUILD, FILE_NAME, Hello, PROTOCOL, Reply, Request};
use crate::system::helper_program::{HelperExecutable, Program};

const TPM_HELPER: HelperExecutable = HelperExecutable {
    file_name: FILE_NAME,
    what: "the TPM helper",
    needed_for: "the TPM cannot be used",
    how_to_build: "build the agent with the tpm feature (cargo build -p hubagent --features tpm)",
};

static PROGRAM: OnceLock<Result<Program, String>> = OnceLock::new();

/// Opens the helper executable of this process's build (once; later calls return the same). The
/// daemon calls this when it starts with a configuration that uses the TPM, so that an upgrade
/// later on does not change which helper it runs; any other process opens it on its first TPM
/// operation.
pub fn open_program() -> Result<PathBuf, String> {
    program().map(|program| program.path().to_path_buf())
}

fn program() -> Result<&'static Program, String> {
    PROGRAM
        .get_or_init(|| Program::open_own(&TPM_HELPER))
        .as_ref()
        .map_err(Clone::clone)
}

/// How long a helper without requests keeps running.
pub const IDLE: Duration = Duration::from_secs(10);

/// A running helper and the two ends of its pipes.
struct Helper {
    child: Child,
    /// The thread passing its stderr on ([`helper_stderr::watch`]).
    stderr: JoinHandle<Option<LoaderFailure>>,
    requests: BufWriter<ChildStdin>,
    answers: BufReader<ChildStdout>,
    /// When its last answer came (or it started).
    last_used: Instant,
}

/// The helper of this process, started on first use; one request at a time (the TPM serves one
/// command at a time anyway, and swtpm one client).
static HELPER: Mutex<Option<Helper>> = Mutex::new(None);

/// The running helper's process id (0: none), readable while a request holds [`HELPER`].
static HELPER_PID: AtomicU32 = AtomicU32::new(0);

fn helper_error(text: String) -> TpmError {
    TpmError::Helper(text)
}

fn start() -> Result<Helper, TpmError> {
    let program = program().map_err(helper_error)?;
    // The forked child still holds the descriptor when it executes the path (close-on-exec
    // closes it only after), so the file opened at start is what runs.
    let mut child = Command::new(program.exec_path())
        .arg("--build")
        .arg(BUILD)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            helper_error(format!(
                "cannot start the TPM helper {}: {e}",
                program.path().display()
            ))
        })?;
    let requests = BufWriter::new(child.stdin.take().expect("piped stdin"));
    let mut answers = BufReader::new(child.stdout.take().expect("piped stdout"));
    let stderr = match helper_stderr::watch(child.stderr.take().expect("piped stderr")) {
        Ok(watch) => watch,
        Err(e) => {
            // Its stderr would be closed: a helper must not run with it so (the operation fails
            // and is retried by its caller, like any helper that does not start).
            let _ = child.kill();
            let _ = child.wait();
            return Err(helper_error(format!(
                "cannot start the TPM helper {}: no thread to pass its stderr on: {e}",
                program.path().display()
            )));
        }
    };
    let hello: Option<Hello> = match protocol::read_frame(&mut answers) {
        Ok(hello) => hello,
        Err(e) => {
            return Err(ended(
                child,
                stderr,
                program.path(),
                "its start",
                &e.to_string(),
            ));
        }
    };
    match hello {
        Some(Hello { protocol, build }) if protocol == PROTOCOL && build == BUILD => {
            HELPER_PID.store(child.id(), Ordering::Relaxed);
            start_idle_watch();
            Ok(Helper {
                child,
                stderr,
                requests,
                answers,
                last_used: Instant::now(),
            })
        }
        Some(Hello { protocol, build }) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(helper_error(format!(
                "the TPM helper {} is build {build} speaking protocol {protocol}; this agent is \
                 build {BUILD} speaking protocol {PROTOCOL}: reinstall the hubagent package",
                program.path().display()
            )))
        }
        None => Err(ended(
            child,
            stderr,
            program.path(),
            "starting",
            "it closed its output",
        )),
    }
}

/// The error of a helper that stopped answering during `operation`; reaps it. One the dynamic
/// loader refused (exit status 127 and its line on stderr) gets the error naming the library.
fn ended(
    mut child: Child,
    stderr: JoinHandle<Option<LoaderFailure>>,
    path: &Path,
    operation: &str,
    detail: &str,
) -> TpmError {
    HELPER_PID.store(0, Ordering::Relaxed);
    // A helper that closed its pipes but still runs is ended here, so that wait returns.
    let _ = child.kill();
    let status = child.wait();
    let how = match &status {
        Ok(status) => describe_exit(*status),
        Err(e) => format!("ended (its exit status is unknown: {e})"),
    };
    // Only for the loader's status: then the helper has exited, its stderr is closed and the
    // thread has finished or is about to (another status does not wait for it).
    if let Ok(status) = status
        && status.code() == Some(LOADER_FAILED)
        && let Ok(Some(failure)) = stderr.join()
    {
        return helper_error(helper_stderr::missing_library_error(path, &failure));
    }
    helper_error(format!(
        "the TPM helper {} {how} during {operation} ({detail}); the operation failed and the next \
         TPM operation starts the helper again",
        path.display()
    ))
}

fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (_, Some(signal)) => format!("was killed by signal {signal}"),
        (Some(code), _) => format!("exited with status {code}"),
        _ => format!("ended ({status})"),
    }
}

/// Starts (once per process) the thread that stops a helper idle for [`IDLE`]: it looks every
/// half period, so a helper lives between one and one and a half periods after its last answer.
fn start_idle_watch() {
    static WATCH: OnceLock<()> = OnceLock::new();
    WATCH.get_or_init(|| {
        let spawned = std::thread::Builder::new()
            .name("tpm-helper-idle".into())
            .spawn(|| {
                loop {
                    std::thread::sleep(IDLE / 2);
                    let mut slot = HELPER.lock().unwrap_or_else(|p| p.into_inner());
                    if slot.as_ref().is_some_and(|h| h.last_used.elapsed() >= IDLE) {
                        stop(slot.take().expect("checked"));
                    }
                }
            });
        if let Err(e) = spawned {
            // The helper then simply keeps running.
            tracing::warn!("cannot start the TPM helper's idle watch: {e}");
        }
    });
}

/// Ends an idle helper: closing its input is its signal to exit.
fn stop(helper: Helper) {
    HELPER_PID.store(0, Ordering::Relaxed);
    let Helper {
        mut child,
        stderr,
        requests,
        answers,
        ..
    } = helper;
    drop(requests);
    drop(answers);
    let status = child.wait();
    // Exited: its stderr is closed, so the thread passing it on ends.
    if status.is_ok() {
        let _ = stderr.join();
    }
    match status {
        Ok(status) if status.success() => {}
        Ok(status) => tracing::warn!(
            "the idle TPM helper {} {} when asked to stop",
            program_path().display(),
            describe_exit(status)
        ),
        Err(e) => tracing::warn!("the idle TPM helper could not be reaped: {e}"),
    }
}

/// Sends `request` to this process's helper (starting it if none runs) and returns its answer.
pub fn call(request: &Request) -> Result<Reply, TpmError> {
    let mut slot = HELPER.lock().unwrap_or_else(|p| p.into_inner());
    if slot.is_none() {
        *slot = Some(start()?);
    }
    let helper = slot.as_mut().expect("started above");
    let exchanged = protocol::write_frame(&mut helper.requests, request)
        .and_then(|()| protocol::read_frame::<Answer>(&mut helper.answers));
    let detail = match exchanged {
        Ok(Some(answer)) => {
            helper.last_used = Instant::now();
            return answer;
        }
        Ok(None) => "it closed its output without answering".to_string(),
        Err(e) => e.to_string(),
    };
    let helper = slot.take().expect("present");
    Err(ended(
        helper.child,
        helper.stderr,
        &program_path(),
        request.operation(),
        &detail,
    ))
}

fn program_path() -> PathBuf {
    match PROGRAM.get() {
        Some(Ok(program)) => program.path().to_path_buf(),
        _ => PathBuf::from(FILE_NAME),
    }
}

/// The process id of this process's running helper, if one runs, also while it works on a
/// request (for the tests that end it on purpose).
pub fn helper_pid() -> Option<u32> {
    Some(HELPER_PID.load(Ordering::Relaxed)).filter(|pid| *pid != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_helper_is_named_with_what_cannot_work_without_it() {
        // Where it is looked for is helper_program's (tested there); this is its own name.
        let dir = tempfile::tempdir().unwrap();
        let error =
            crate::system::helper_program::locate(&dir.path().join("bin/hubagent"), &TPM_HELPER)
                .unwrap_err();
        assert!(
            error.contains("the TPM helper executable hubagent-tpm is missing"),
            "{error}"
        );
        assert!(error.contains("the TPM cannot be used"), "{error}");
        assert!(error.contains("--features tpm"), "{error}");
    }
}
