//! Files that survive a crash or a power loss whole: atomic replacement of small files.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// A file operation failed; names the file (and the limit, when one was reached).
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}{}", limit_hint(.source))]
pub struct FileError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// Temp file in the same directory (0600), fsync, rename over the target, fsync the directory:
/// after a crash or power loss the file holds either the old or the new content.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), FileError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("state");
    // Unique per writer, so `hubagent provision` and the daemon never share a temp file.
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.{}.{seq}.tmp", std::process::id()));
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| FileError { path, source }
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    let written = file.write_all(bytes).and_then(|()| file.sync_all());
    drop(file);
    if let Err(source) = written {
        let _ = std::fs::remove_file(&tmp); // a full disk must not leave litter behind
        return Err(FileError { path: tmp, source });
    }
    if let Err(source) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(FileError {
            path: path.to_path_buf(),
            source,
        });
    }
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// What an error that comes from a limit rather than from the file means, to follow it in the
/// log: the process's open-file limit (EMFILE: the agent's own, set by `LimitNOFILE=` in its
/// unit) or the system's (ENFILE). Empty for other errors.
pub fn limit_hint(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EMFILE) => {
            let mut limit = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: getrlimit writes the struct it is given and nothing else.
            let known = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
            let soft = if known {
                limit.rlim_cur.to_string()
            } else {
                "unknown".to_string()
            };
            format!(
                " (the agent's open-file limit RLIMIT_NOFILE = {soft} is reached; `LimitNOFILE=` in hubagent.service sets it)"
            )
        }
        Some(libc::ENFILE) => " (the system's open-file limit fs.file-max is reached)".into(),
        _ => String::new(),
    }
}

/// [`limit_hint`] for an error known only by its text (a network library's, which wraps the
/// I/O error): the hint of the OS error number it names, if any.
pub fn limit_hint_in(text: &str) -> String {
    [libc::EMFILE, libc::ENFILE]
        .into_iter()
        .find(|n| text.contains(&format!("(os error {n})")))
        .map(|n| limit_hint(&std::io::Error::from_raw_os_error(n)))
        .unwrap_or_default()
}

/// Errors that say nothing about a file's content, only that it cannot be opened or read now
/// (a limit reached, memory short): the file is to be tried again later, not given up.
pub fn is_transient(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::EINTR | libc::EAGAIN)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_named() {
        let emfile = std::io::Error::from_raw_os_error(libc::EMFILE);
        assert!(limit_hint(&emfile).contains("RLIMIT_NOFILE = "));
        assert_eq!(
            limit_hint_in(&format!("I/O: {emfile}")),
            limit_hint(&emfile)
        );
        assert_eq!(limit_hint_in("Connection refused (os error 111)"), "");
        let enoent = std::io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(limit_hint(&enoent), "");
    }

    #[test]
    fn a_failed_write_leaves_no_temp_file_and_touches_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("provisioning.json");
        write_atomic(&target, b"old").unwrap();
        // A directory in the way of the rename: the write fails, the temp file is removed.
        let blocked = dir.path().join("blocked");
        std::fs::create_dir_all(blocked.join("inner")).unwrap();
        assert!(write_atomic(&blocked, b"new").is_err());
        assert_eq!(std::fs::read(&target).unwrap(), b"old");
        let litter = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".tmp")
            })
            .count();
        assert_eq!(litter, 0);
    }
}
