//! The TPM helper's stderr: passed on line by line to the agent's own stderr (the journal), as
//! when the helper inherited it, and read for the one line that explains a helper that could not
//! start: the dynamic loader's, when a library the helper links is not installed. The Debian
//! package only recommends the TPM libraries (docs/packaging.md, "Dependencies"), so a gateway
//! installed with `--no-install-recommends` and then configured for the TPM has a helper the
//! loader refuses with exit status 127; [`missing_library_error`] turns that into an error
//! naming the library and the packages to install.
//!
//! Only the library's name and the loader's reason are taken from the line (both checked to be
//! short and plain), never the rest of the helper's output.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::ChildStderr;
use std::thread::JoinHandle;

/// The exit status of a process the dynamic loader could not start (glibc's `ld.so`).
pub const LOADER_FAILED: i32 = 127;

/// The TPM libraries the hubagent package recommends, by each Debian release's package names
/// (agent/Cargo.toml's `recommends`; Debian 13's t64 names are also the ARM packages'). A test
/// below checks them against Cargo.toml.
pub const DEBIAN_12_PACKAGES: &str = "libtss2-esys-3.0.2-0 libtss2-mu0 libtss2-tctildr0";
pub const DEBIAN_13_PACKAGES: &str =
    "libtss2-esys-3.0.2-0t64 libtss2-mu-4.0.1-0t64 libtss2-tctildr0t64";

/// A shared library the loader could not load, as its error line names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoaderFailure {
    /// The soname, e.g. `libtss2-esys.so.0`.
    pub library: String,
    /// The loader's reason, e.g. `cannot open shared object file: No such file or directory`.
    pub reason: String,
}

/// Starts the thread that passes the helper's stderr on and returns what the loader said, if it
/// said it could not load a library; the thread ends when the helper's stderr closes (it exits).
pub fn watch(stderr: ChildStderr) -> std::io::Result<JoinHandle<Option<LoaderFailure>>> {
    std::thread::Builder::new()
        .name("tpm-helper-stderr".into())
        .spawn(move || {
            let mut failure = None;
            let mut lines = BufReader::new(stderr);
            let mut line = Vec::new();
            while matches!(lines.read_until(b'\n', &mut line), Ok(n) if n > 0) {
                // (A journal that cannot take a line loses that line only.)
                let _ = std::io::stderr().write_all(&line);
                if failure.is_none() {
                    failure = parse_loader_line(&String::from_utf8_lossy(&line));
                }
                line.clear();
            }
            failure
        })
}

/// The library and reason of glibc's loader line `PROGRAM: error while loading shared
/// libraries: LIBRARY: REASON`; `None` for any other line, or one whose parts are not a plain
/// file name and a short reason.
pub fn parse_loader_line(line: &str) -> Option<LoaderFailure> {
    let (_, rest) = line.split_once("error while loading shared libraries: ")?;
    let (library, reason) = rest.trim_end().split_once(": ")?;
    let plain_name = !library.is_empty()
        && library.len() <= 128
        && library
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._+-".contains(c));
    let plain_reason =
        reason.len() <= 160 && reason.chars().all(|c| c.is_ascii() && !c.is_control());
    (plain_name && plain_reason).then(|| LoaderFailure {
        library: library.to_string(),
        reason: reason.to_string(),
    })
}

/// The error for a helper at `path` that the loader could not start.
pub fn missing_library_error(path: &Path, failure: &LoaderFailure) -> String {
    let LoaderFailure { library, reason } = failure;
    let helper = path.display();
    if !reason.starts_with("cannot open shared object file") {
        return format!(
            "the TPM helper {helper} cannot start: the dynamic loader cannot load {library} \
             ({reason}); the TPM cannot be used"
        );
    }
    if !library.starts_with("libtss2") {
        return format!(
            "the TPM helper {helper} cannot start: {library}, a library it links, is not \
             installed; the TPM cannot be used"
        );
    }
    format!(
        "the TPM helper {helper} cannot start: {library} is not installed. The hubagent package \
         only recommends the TPM libraries (apt leaves them out with --no-install-recommends); \
         install them: `apt install {DEBIAN_13_PACKAGES}` \
         (Debian 13) or `apt install {DEBIAN_12_PACKAGES}` (Debian 12)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loader_line_gives_the_library_and_the_reason() {
        let line = "/proc/self/fd/7: error while loading shared libraries: libtss2-esys.so.0: \
                    cannot open shared object file: No such file or directory\n";
        assert_eq!(
            parse_loader_line(line),
            Some(LoaderFailure {
                library: "libtss2-esys.so.0".into(),
                reason: "cannot open shared object file: No such file or directory".into(),
            })
        );
        assert_eq!(parse_loader_line("WARN tpm: something else\n"), None);
        // Not a file name: nothing of the line is taken.
        assert_eq!(
            parse_loader_line("x: error while loading shared libraries: a b/c: d\n"),
            None
        );
    }

    #[test]
    fn a_missing_tpm_library_names_the_packages_to_install() {
        let failure = parse_loader_line(
            "hubagent-tpm: error while loading shared libraries: libtss2-mu.so.0: cannot open \
             shared object file: No such file or directory",
        )
        .unwrap();
        let text = missing_library_error(Path::new("/usr/libexec/hubagent/hubagent-tpm"), &failure);
        assert!(
            text.starts_with(
                "the TPM helper /usr/libexec/hubagent/hubagent-tpm cannot start: \
                 libtss2-mu.so.0 is not installed."
            ),
            "{text}"
        );
        assert!(
            text.contains(&format!("apt install {DEBIAN_13_PACKAGES}")),
            "{text}"
        );
        assert!(
            text.contains(&format!("apt install {DEBIAN_12_PACKAGES}")),
            "{text}"
        );
    }

    /// The packages the error names are the package's Recommends, as agent/Cargo.toml writes
    /// them: for amd64 each alternative group is Debian 12's name, then Debian 13's.
    #[test]
    fn the_packages_named_are_the_packages_recommends() {
        let manifest: toml::Value = toml::from_str(include_str!("../../../Cargo.toml")).unwrap();
        let recommends = manifest["package"]["metadata"]["deb"]["recommends"]
            .as_str()
            .expect("agent/Cargo.toml has [package.metadata.deb] recommends");
        let name = |alternative: &str| alternative.split_whitespace().next().unwrap().to_string();
        let (mut debian_12, mut debian_13) = (Vec::new(), Vec::new());
        for group in recommends.split(',') {
            let alternatives: Vec<&str> = group.split('|').collect();
            assert_eq!(
                alternatives.len(),
                2,
                "Debian 12's name | Debian 13's: {group}"
            );
            debian_12.push(name(alternatives[0]));
            debian_13.push(name(alternatives[1]));
        }
        assert_eq!(debian_12.join(" "), DEBIAN_12_PACKAGES);
        assert_eq!(debian_13.join(" "), DEBIAN_13_PACKAGES);
    }
}
