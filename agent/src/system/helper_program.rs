//! The agent's helper executables (`hubagent-plugin-host`, `hubagent-tpm`): where one is found,
//! and how a process keeps running the helper of its own build after an upgrade replaced the
//! files.
//!
//! A process opens a helper's file once and executes it through `/proc/self/fd/N`: a package
//! upgrade replaces the file on disk by a new one, but the process keeps executing the file it
//! opened, until systemd restarts it with the new build (docs/plugins.md, "Inside the agent: the
//! plugin process protocol"; docs/tpm.md, "The TPM helper").

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// One helper executable, and what an error about it tells the operator.
pub struct HelperExecutable {
    /// The executable's file name.
    pub file_name: &'static str,
    /// What it is, for messages: "the plugin host".
    pub what: &'static str,
    /// What cannot work without it: "the TPM cannot be used".
    pub needed_for: &'static str,
    /// How a developer builds it: "build the workspace's binaries (cargo build -p hubagent)".
    pub how_to_build: &'static str,
}

/// The places `file_name` is looked for, in order, for the executable at `exe`: beside it (a
/// development build's `target/<profile>/`), in `target/<profile>/` for a test executable in its
/// `deps/`, then the package's `/usr/libexec/hubagent/` for an agent in `/usr/bin/`
/// (docs/packaging.md).
pub fn candidates(exe: &Path, file_name: &str) -> Vec<PathBuf> {
    let dir = exe.parent().unwrap_or(Path::new("."));
    let mut places = vec![dir.join(file_name)];
    if let Some(prefix) = dir.parent() {
        if dir.file_name().is_some_and(|name| name == "deps") {
            places.push(prefix.join(file_name));
        }
        places.push(prefix.join("libexec/hubagent").join(file_name));
    }
    places
}

/// The helper's executable for the executable at `exe`, or an error naming where it was looked
/// for.
pub fn locate(exe: &Path, helper: &HelperExecutable) -> Result<PathBuf, String> {
    let places = candidates(exe, helper.file_name);
    places.iter().find(|p| p.is_file()).cloned().ok_or_else(|| {
        let list: Vec<String> = places.iter().map(|p| p.display().to_string()).collect();
        format!(
            "{} executable {} is missing (looked for {}): {} without it; reinstall the hubagent \
             package or {}",
            helper.what,
            helper.file_name,
            list.join(" and "),
            helper.needed_for,
            helper.how_to_build
        )
    })
}

/// A helper executable this process opened, kept open for its life.
pub struct Program {
    file: File,
    path: PathBuf,
}

impl Program {
    /// Opens the helper's executable found for the executable at `exe`.
    pub fn open(exe: &Path, helper: &HelperExecutable) -> Result<Program, String> {
        let path = locate(exe, helper)?;
        // O_CLOEXEC (std's default): a child keeps nothing open but what it executes.
        let file = File::open(&path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        Ok(Program { file, path })
    }

    /// Opens the helper's executable found for this process's own executable.
    pub fn open_own(helper: &HelperExecutable) -> Result<Program, String> {
        let exe = std::env::current_exe()
            .map_err(|e| format!("cannot find the agent's own executable: {e}"))?;
        Program::open(&exe, helper)
    }

    /// What to execute: the file opened at start, whatever is at [`Program::path`] now. A forked
    /// child inherits the descriptor until its exec, so the path resolves in the child.
    pub fn exec_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }

    /// Where the file was found when it was opened (for messages).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELPER: HelperExecutable = HelperExecutable {
        file_name: "hubagent-helper",
        what: "the helper",
        needed_for: "nothing works",
        how_to_build: "build it",
    };

    #[test]
    fn looks_beside_the_executable_then_in_target_for_a_test_then_in_libexec() {
        assert_eq!(
            candidates(Path::new("/usr/bin/hubagent"), HELPER.file_name),
            [
                PathBuf::from("/usr/bin/hubagent-helper"),
                PathBuf::from("/usr/libexec/hubagent/hubagent-helper"),
            ]
        );
        // A test executable in target/<profile>/deps/: the helper is built one level up.
        assert_eq!(
            candidates(
                Path::new("/src/target/debug/deps/tpm-0123"),
                HELPER.file_name
            ),
            [
                PathBuf::from("/src/target/debug/deps/hubagent-helper"),
                PathBuf::from("/src/target/debug/hubagent-helper"),
                PathBuf::from("/src/target/debug/libexec/hubagent/hubagent-helper"),
            ]
        );
    }

    #[test]
    fn a_missing_helper_is_named_with_where_it_was_looked_for_and_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("bin/hubagent");
        let error = locate(&exe, &HELPER).unwrap_err();
        assert!(
            error.starts_with("the helper executable hubagent-helper is missing"),
            "{error}"
        );
        for place in candidates(&exe, HELPER.file_name) {
            assert!(error.contains(&place.display().to_string()), "{error}");
        }
        assert!(
            error.contains("nothing works without it; reinstall the hubagent package or build it"),
            "{error}"
        );
    }

    #[test]
    fn the_packages_libexec_directory_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let libexec = dir.path().join("libexec/hubagent");
        std::fs::create_dir_all(&libexec).unwrap();
        std::fs::write(libexec.join(HELPER.file_name), b"").unwrap();
        assert_eq!(
            locate(&dir.path().join("bin/hubagent"), &HELPER).unwrap(),
            libexec.join(HELPER.file_name)
        );
    }
}
