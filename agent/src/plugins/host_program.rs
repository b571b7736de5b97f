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

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::system::helper_program::{self, HelperExecutable, Program};

/// The executable's file name.
pub const FILE_NAME: &str = "hubagent-plugin-host";

/// What the daemon and its host must agree on: both are built from this crate, so equal builds
/// give equal strings. The version names a release; a development build's host is its own.
pub const BUILD: &str = env!("CARGO_PKG_VERSION");

const HOST: HelperExecutable = HelperExecutable {
    file_name: FILE_NAME,
    what: "the plugin host",
    needed_for: "library plugins with isolation = \"process\" cannot run",
    how_to_build: "build the workspace's binaries (cargo build -p hubagent)",
};

/// The host executable for the agent binary at `agent`, or an error naming where it was looked
/// for ([`helper_program::candidates`]).
pub fn locate(agent: &Path) -> Result<PathBuf, String> {
    helper_program::locate(agent, &HOST)
}

/// The host executable this process opened, kept open for its life.
pub type HostProgram = Program;

static OPENED: OnceLock<Result<HostProgram, String>> = OnceLock::new();

/// The host executable of this process's build: opened on the first call, found beside the
/// running executable. The daemon calls this when it starts, so that an upgrade later on does
/// not change which host it runs.
pub fn opened() -> Result<&'static HostProgram, String> {
    OPENED
        .get_or_init(|| Program::open_own(&HOST))
        .as_ref()
        .map_err(Clone::clone)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_host_is_named_with_what_cannot_work_without_it() {
        // Where it is looked for is helper_program's (tested there); this is its own name.
        let dir = tempfile::tempdir().unwrap();
        let error = locate(&dir.path().join("bin/hubagent")).unwrap_err();
        assert!(
            error.contains("the plugin host executable hubagent-plugin-host is missing"),
            "{error}"
        );
        assert!(
            error.contains("isolation = \"process\" cannot run"),
            "{error}"
        );
    }
}
