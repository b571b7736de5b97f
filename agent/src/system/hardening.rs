//! Process hardening for the daemon and its plugin hosts, whose memory holds device keys and
//! SAS tokens: no core dump may write them to disk, and no other process of the same user (an
//! exec plugin, say) may read them through ptrace or /proc/<pid>/mem.

/// Sets RLIMIT_CORE to 0 (honoured by the kernel for core files and by systemd-coredump) and
/// marks the process non-dumpable (no core at all, whatever the core pattern, and no ptrace or
/// /proc access from other processes of the same user; root still can). Inherited by threads, and
/// the core limit by children; `exec` resets dumpability, so each plugin host calls this itself.
pub fn protect_secrets_in_memory() {
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls with valid arguments; failure only means less protection.
    unsafe {
        if libc::setrlimit(libc::RLIMIT_CORE, &zero) != 0 {
            tracing::warn!(
                "could not disable core dumps: {}",
                std::io::Error::last_os_error()
            );
        }
        if libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) != 0 {
            tracing::warn!(
                "could not mark the process non-dumpable: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}
