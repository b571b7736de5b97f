//! Checking a plugin before the daemon runs it (`hubagent config check`, `hubagent check`): the
//! rules of which files may run, and for a library that it loads and exports a supported ABI with
//! every callback — tried in a throwaway child (`hubagent plugin-host --probe`), so a library's
//! constructors never run in the checking process.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::config::plugin::{Kind, PluginSpec};

/// How long a library may take to load in the probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// What was verified of `spec` (e.g. "library ABI 1.0, sysmetrics 0.1.0"), or what is wrong with
/// it and how to fix it. `agent` is the hubagent binary that runs the probe.
pub fn check(spec: &PluginSpec, allow_unsafe: bool, agent: &Path) -> Result<String, String> {
    match &spec.kind {
        Kind::Builtin(name) => Ok(format!("built-in {name}")),
        Kind::Library { path, .. } => {
            super::trust::check(path, allow_unsafe)?;
            probe_library(&spec.name, path, allow_unsafe, agent)
        }
        Kind::Exec { command, .. } => {
            let program = super::trust::resolve_program(&command[0])?;
            super::trust::check(&program, allow_unsafe)?;
            if !executable(&program) {
                return Err(format!(
                    "{}: not executable (chmod 755 it, or name its interpreter first: [\"/usr/bin/python3\", \"{}\"])",
                    program.display(),
                    program.display()
                ));
            }
            for arg in &command[1..] {
                let p = Path::new(arg);
                if p.is_absolute() && p.is_file() {
                    super::trust::check(p, allow_unsafe)?;
                }
            }
            Ok(format!("exec {}", program.display()))
        }
    }
}

fn executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o111 != 0)
}

fn probe_library(
    name: &str,
    path: &Path,
    allow_unsafe: bool,
    agent: &Path,
) -> Result<String, String> {
    let mut command = Command::new(agent);
    command
        .args(["plugin-host", "--probe", "--name", name, "--path"])
        .arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if allow_unsafe {
        command.arg("--allow-unsafe-paths");
    }
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot start {} to try the library: {e}", agent.display()))?;
    let deadline = Instant::now() + PROBE_TIMEOUT;
    // A library whose constructor hangs must not hang the check: poll, then kill.
    while child.try_wait().map_err(|e| e.to_string())?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "{}: loading it did not finish within {}s (a constructor that hangs?)",
                path.display(),
                PROBE_TIMEOUT.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let answer: Value = serde_json::from_str(stdout.trim()).unwrap_or(Value::Null);
    match (answer["ok"].as_bool(), answer["error"].as_str()) {
        (Some(true), _) => Ok(format!(
            "library ABI {}, {} {}",
            answer["abi"].as_str().unwrap_or("?"),
            answer["name"].as_str().unwrap_or("?"),
            answer["version"].as_str().unwrap_or("?")
        )),
        (_, Some(error)) => Err(error.to_string()),
        _ => Err(format!(
            "{}: the library could not be tried ({}): {}",
            path.display(),
            super::process::describe_exit(Ok(output.status)),
            String::from_utf8_lossy(&output.stderr).trim()
        )),
    }
}
