//! Checking a plugin before the daemon runs it (`hubagent config check`, `hubagent check`): the
//! rules of which files may run, and for a library that it loads and exports a supported ABI with
//! every callback — tried in a throwaway child (`hubagent-plugin-host --probe`), so a library's
//! constructors never run in the checking process.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::config::plugin::{Kind, PluginSpec};

/// How long a library may take to load in the probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the check found of a plugin that can start as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// Verified, e.g. "library ABI 1.0, sysmetrics 0.1.0".
    Verified(String),
    /// The files pass the rules, but the library itself could not be tried here because the
    /// agent could not run its own binary for the probe (e.g. an ARM agent under qemu-user
    /// without binfmt_misc). Only an in-process library ends here: the daemon loads it without
    /// running that binary again, while a process-isolated one would meet the same wall.
    Untried(String),
}

impl Found {
    /// The finding as one line for `config check`: "OK (...)" or "NOT TRIED (...)".
    pub fn line(&self) -> String {
        match self {
            Found::Verified(what) => format!("OK ({what})"),
            Found::Untried(why) => format!("NOT TRIED ({why})"),
        }
    }
}

/// Why a library probe gave no verdict on the library.
enum ProbeFailure {
    /// The library failed to load, or its descriptor was refused: the plugin cannot start.
    Library(String),
    /// The probe process itself could not run (the plugin host executable is missing or cannot
    /// be executed).
    Probe(String),
}

/// What was verified of `spec`, or what is wrong with it and how to fix it. `agent` is the
/// hubagent binary that runs the probe.
pub fn check(spec: &PluginSpec, allow_unsafe: bool, agent: &Path) -> Result<Found, String> {
    match &spec.kind {
        Kind::Builtin(name) => Ok(Found::Verified(format!("built-in {name}"))),
        Kind::Library { path, .. } => {
            super::trust::check(path, allow_unsafe)?;
            match probe_library(&spec.name, path, allow_unsafe, agent) {
                Ok(found) => Ok(Found::Verified(found)),
                Err(ProbeFailure::Library(problem)) => Err(problem),
                Err(ProbeFailure::Probe(problem)) if !spec.confinable() => {
                    Ok(Found::Untried(format!(
                        "{problem}; its files pass the rules, and the agent loads it in-process"
                    )))
                }
                Err(ProbeFailure::Probe(problem)) => Err(format!(
                    "{problem}; the agent starts this plugin's host process the same way"
                )),
            }
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
            Ok(Found::Verified(format!("exec {}", program.display())))
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
) -> Result<String, ProbeFailure> {
    let host = super::host_program::locate(agent).map_err(ProbeFailure::Probe)?;
    let mut command = Command::new(&host);
    command
        .args([
            "--build",
            super::host_program::BUILD,
            "--probe",
            "--name",
            name,
            "--path",
        ])
        .arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if allow_unsafe {
        command.arg("--allow-unsafe-paths");
    }
    let mut child = command.spawn().map_err(|e| {
        ProbeFailure::Probe(format!(
            "cannot start {} to try the library: {e}{}",
            host.display(),
            crate::util::fs::limit_hint(&e)
        ))
    })?;
    let deadline = Instant::now() + PROBE_TIMEOUT;
    // A library whose constructor hangs must not hang the check: poll, then kill.
    while child
        .try_wait()
        .map_err(|e| ProbeFailure::Probe(e.to_string()))?
        .is_none()
    {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(ProbeFailure::Library(format!(
                "{}: loading it did not finish within {}s (a constructor that hangs?)",
                path.display(),
                PROBE_TIMEOUT.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child
        .wait_with_output()
        .map_err(|e| ProbeFailure::Probe(e.to_string()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let answer: Value = serde_json::from_str(stdout.trim()).unwrap_or(Value::Null);
    match (answer["ok"].as_bool(), answer["error"].as_str()) {
        (Some(true), _) => Ok(format!(
            "library ABI {}, {} {}",
            answer["abi"].as_str().unwrap_or("?"),
            answer["name"].as_str().unwrap_or("?"),
            answer["version"].as_str().unwrap_or("?")
        )),
        (_, Some(error)) => Err(ProbeFailure::Library(error.to_string())),
        // 127 and not a word: the child never became the host (exec failed after the fork, as
        // glibc's posix_spawn reports it when it cannot say more, e.g. under qemu-user).
        _ if output.status.code() == Some(127)
            && output.stdout.is_empty()
            && output.stderr.is_empty() =>
        {
            Err(ProbeFailure::Probe(format!(
                "the agent could not run {} to try the library (exit status 127, no output)",
                host.display()
            )))
        }
        _ => Err(ProbeFailure::Library(format!(
            "{}: the library could not be tried ({}): {}",
            path.display(),
            super::process::describe_exit(Ok(output.status)),
            String::from_utf8_lossy(&output.stderr).trim()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A plugin table naming `library` with the given isolation.
    fn library_spec(library: &Path, isolation: &str) -> PluginSpec {
        let table: toml::Table = toml::from_str(&format!(
            "name = \"p\"\nkind = \"library\"\npath = \"{}\"\nisolation = \"{isolation}\"\n",
            library.display()
        ))
        .unwrap();
        PluginSpec::from_table(&table).unwrap()
    }

    /// A stand-in for the plugin host: a script that runs `body`, in a directory of its own
    /// beside which the agent binary whose path this returns would be.
    fn agent_script(dir: &Path, body: &str) -> std::path::PathBuf {
        let bin = tempfile::tempdir_in(dir).unwrap().keep();
        let path = bin.join(super::super::host_program::FILE_NAME);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        bin.join("hubagent")
    }

    #[test]
    fn an_agent_that_cannot_run_itself_leaves_an_in_process_library_untried_and_a_hosted_one_refused()
     {
        let dir = tempfile::tempdir().unwrap();
        let library = dir.path().join("libp.so");
        std::fs::write(&library, b"not tried").unwrap();
        std::fs::set_permissions(&library, std::fs::Permissions::from_mode(0o644)).unwrap();
        // What glibc's posix_spawn leaves when the exec after the fork fails (qemu-user).
        let silent_127 = agent_script(dir.path(), "exit 127");

        let found = check(&library_spec(&library, "in-process"), true, &silent_127).unwrap();
        let Found::Untried(why) = &found else {
            panic!("expected untried, got {found:?}")
        };
        assert!(why.contains("could not run"), "{why}");
        assert!(found.line().starts_with("NOT TRIED ("), "{}", found.line());

        let refused = check(&library_spec(&library, "process"), true, &silent_127).unwrap_err();
        assert!(refused.contains("host process the same way"), "{refused}");

        // A probe that did run and said something is the library's verdict, whatever its status.
        let talking_127 =
            agent_script(dir.path(), "echo 'cannot open shared object' >&2; exit 127");
        let refused = check(&library_spec(&library, "in-process"), true, &talking_127).unwrap_err();
        assert!(refused.contains("cannot open shared object"), "{refused}");
    }
}
