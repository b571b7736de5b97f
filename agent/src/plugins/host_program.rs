//! `hubagent-plugin-host`, the small executable each process-isolated library plugin runs in
//! (`src/bin/hubagent-plugin-host.rs`, the other side of `hosted.rs`): where it is found, and how
//! the daemon keeps running the host of its own build after an upgrade replaced the files.
//!
//! A host used to be the daemon re-executing itself (`/proc/self/exe plugin-host`), which mapped
//! the whole agent's code into every host (docs/benchmarks.md, "Where the memory goes"). To keep
//! what `/proc/self/exe` guaranteed, the daemon opens the host executable once, when it starts,
//! keeps that file open and starts every host through `/proc/self/fd/N`: a package upgrade
//! replaces the file on disk by a new one, but the daemon keeps executing the file it opened,
//! until systemd restarts it with the new build. The host also checks the build the daemon names
//! ([`BUILD`]), so a host from another version (a file copied by hand) refuses with a clear error
//! instead of speaking a protocol the daemon may not know.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The executable's file name.
pub const FILE_NAME: &str = "hubagent-plugin-host";

/// What the daemon and its host must agree on: both are built from this crate, so equal builds
/// give equal strings. The version names a release; a development build's host is its own.
pub const BUILD: &str = env!("CARGO_PKG_VERSION");

/// The places a host executable is looked for, in order, for the agent binary at `agent`: beside
/// it (a development build's `target/<profile>/`), then the package's `/usr/libexec/hubagent/` for
/// an agent in `/usr/bin/` (docs/packaging.md).
pub fn candidates(agent: &Path) -> Vec<PathBuf> {
    let dir = agent.parent().unwrap_or(Path::new("."));
    let mut places = vec![dir.join(FILE_NAME)];
    if let Some(prefix) = dir.parent() {
        places.push(prefix.join("libexec/hubagent").join(FILE_NAME));
    }
    places
}

/// The host executable for the agent binary at `agent`, or an error naming where it was looked
/// for.
pub fn locate(agent: &Path) -> Result<PathBuf, String> {
    let places = candidates(agent);
    places.iter().find(|p| p.is_file()).cloned().ok_or_else(|| {
        let list: Vec<String> = places.iter().map(|p| p.display().to_string()).collect();
        format!(
            "the plugin host executable {FILE_NAME} is missing (looked for {}): library plugins \
             with isolation = \"process\" cannot run without it; reinstall the hubagent package \
             or build the workspace's binaries (cargo build -p hubagent)",
            list.join(" and ")
        )
    })
}

/// The host executable this process opened, kept open for its life.
pub struct HostProgram {
    file: File,
    path: PathBuf,
}

impl HostProgram {
    /// Opens the host executable found for the agent binary at `agent`.
    pub fn open(agent: &Path) -> Result<HostProgram, String> {
        let path = locate(agent)?;
        // O_CLOEXEC (std's default): a child keeps nothing open but what it executes.
        let file = File::open(&path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        Ok(HostProgram { file, path })
    }

    /// What to execute: the file opened at start, whatever is at [`HostProgram::path`] now. A
    /// forked child inherits the descriptor until its exec, so the path resolves in the child.
    pub fn exec_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }

    /// Where the file was found when it was opened (for messages).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

static OPENED: OnceLock<Result<HostProgram, String>> = OnceLock::new();

/// The host executable of this process's build: opened on the first call, found beside the
/// running executable. The daemon calls this when it starts, so that an upgrade later on does
/// not change which host it runs.
pub fn opened() -> Result<&'static HostProgram, String> {
    OPENED
        .get_or_init(|| {
            let agent = std::env::current_exe()
                .map_err(|e| format!("cannot find the agent's own executable: {e}"))?;
            HostProgram::open(&agent)
        })
        .as_ref()
        .map_err(Clone::clone)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn looks_beside_the_agent_then_in_the_packages_libexec_directory() {
        assert_eq!(
            candidates(Path::new("/usr/bin/hubagent")),
            [
                PathBuf::from("/usr/bin/hubagent-plugin-host"),
                PathBuf::from("/usr/libexec/hubagent/hubagent-plugin-host"),
            ]
        );
    }

    #[test]
    fn a_missing_host_is_named_with_where_it_was_looked_for() {
        let dir = tempfile::tempdir().unwrap();
        let error = locate(&dir.path().join("bin/hubagent")).unwrap_err();
        assert!(error.contains("hubagent-plugin-host is missing"), "{error}");
        assert!(
            error.contains(&dir.path().join("libexec/hubagent").display().to_string()),
            "{error}"
        );
    }

    #[test]
    fn the_packages_libexec_directory_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let lib = dir.path().join("libexec/hubagent");
        std::fs::create_dir_all(&lib).unwrap();
        std::fs::write(lib.join(FILE_NAME), b"").unwrap();
        assert_eq!(
            locate(&dir.path().join("bin/hubagent")).unwrap(),
            lib.join(FILE_NAME)
        );
    }
}
