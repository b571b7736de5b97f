//! Which files the agent runs as plugins: a library or program must be a regular file owned by
//! root and not writable by group or others, in directories with the same properties all the
//! way up to `/` (a root-owned directory with the sticky bit, such as `/tmp`, may be
//! world-writable: nobody but root can rename root's entries in it). Symbolic links are resolved
//! first and the target is what is checked.
//!
//! `allow_unsafe_plugin_paths = true` skips the check, and is honoured only when the daemon
//! does not run as root (development machines and tests); as root it is ignored with a warning.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// True when the unsafe-paths override is in force for this process.
pub fn override_active(allow_unsafe: bool) -> bool {
    // SAFETY: geteuid has no preconditions.
    allow_unsafe && unsafe { libc::geteuid() } != 0
}

/// Checks `path` (see the module docs); returns the resolved path that was checked.
pub fn check(path: &Path, allow_unsafe: bool) -> Result<PathBuf, String> {
    if !path.is_absolute() {
        return Err(format!("{}: plugin paths must be absolute", path.display()));
    }
    let real = path
        .canonicalize()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let meta = std::fs::metadata(&real).map_err(|e| format!("{}: {e}", real.display()))?;
    if !meta.is_file() {
        return Err(format!("{}: not a regular file", real.display()));
    }
    if override_active(allow_unsafe) {
        return Ok(real);
    }
    let mut child_is_root_owned = true;
    for (i, component) in real.ancestors().enumerate() {
        let meta = std::fs::symlink_metadata(component)
            .map_err(|e| format!("{}: {e}", component.display()))?;
        let what = if i == 0 { "plugin file" } else { "directory" };
        if meta.uid() != 0 {
            return Err(format!(
                "{}: {what} {} is owned by uid {}, not root; plugins are loaded only from root-owned paths not writable by group or others (docs/plugins.md)",
                path.display(),
                component.display(),
                meta.uid()
            ));
        }
        let writable = meta.mode() & 0o022 != 0;
        let sticky = meta.mode() & 0o1000 != 0;
        if writable && !(i > 0 && sticky && child_is_root_owned) {
            return Err(format!(
                "{}: {what} {} is writable by group or others (mode {:o}); plugins are loaded only from root-owned paths not writable by group or others (docs/plugins.md)",
                path.display(),
                component.display(),
                meta.mode() & 0o7777
            ));
        }
        child_is_root_owned = meta.uid() == 0;
    }
    Ok(real)
}

/// Finds a program like the shell does (absolute or relative names are taken as they are).
pub fn resolve_program(program: &str) -> Result<PathBuf, String> {
    if program.contains('/') {
        return Ok(PathBuf::from(program));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| format!("program '{program}' not found in PATH"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn relative_missing_and_writable_paths_are_refused() {
        assert!(
            check(Path::new("lib.so"), false)
                .unwrap_err()
                .contains("absolute")
        );
        assert!(check(Path::new("/nonexistent/lib.so"), false).is_err());
        let dir = tempfile::tempdir().unwrap();
        let lib = dir.path().join("lib.so");
        std::fs::write(&lib, b"x").unwrap();
        std::fs::set_permissions(&lib, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = check(&lib, false).unwrap_err();
        // As root: writable by others; as a user: not root-owned.
        assert!(e.contains("writable") || e.contains("not root"), "{e}");
        // The override only works for non-root daemons.
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        assert_eq!(check(&lib, true).is_ok(), !root);
    }

    #[test]
    fn a_root_owned_private_tree_passes_when_root() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return; // a user cannot create root-owned files
        }
        let dir = tempfile::tempdir().unwrap(); // under the sticky, root-owned /tmp
        let lib = dir.path().join("lib.so");
        std::fs::write(&lib, b"x").unwrap();
        std::fs::set_permissions(&lib, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        check(&lib, false).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o775)).unwrap();
        assert!(check(&lib, false).unwrap_err().contains("writable"));
    }
}
