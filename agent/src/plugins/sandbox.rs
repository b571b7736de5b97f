//! The plugin sandbox: what a plugin process may reach, and the kernel mechanisms that enforce it,
//! unprivileged, in the plugin's own process before any plugin code runs (the plugin host before
//! it loads the library, `hubagent sandbox-exec` before it executes an exec plugin).
//!
//! * **Landlock** (filesystem): read and execute beneath the system directories, minus every
//!   path that holds a secret or the agent's state (the configuration directory, key and password
//!   files, the state directory, the control socket); read the plugin's own files; read and write
//!   what the operator allows and the plugin's private directory. Landlock only grants, so "the
//!   system minus the secrets" is built by granting the siblings of each secret on the way down.
//!   Its scopes (ABI 6) keep the plugin from signalling the agent or reaching its abstract sockets.
//! * **A seccomp filter** (sockets): `socket(AF_UNIX)` fails with EACCES unless allowed — Landlock
//!   only governs connecting to a pathname UNIX socket from ABI 9, and the control socket must be
//!   out of reach on today's kernels — and `socket(AF_INET/AF_INET6/AF_PACKET)` when the plugin
//!   has no network. Ten BPF instructions: the crate that builds such filters (seccompiler) knows
//!   no 32-bit ARM, which hubagent is packaged for, and libseccomp would add a C library for them.
//! * **no_new_privs**, which both require and which keeps set-uid programs from widening it.
//!
//! docs/security.md, "What a plugin can reach".

use std::path::{Path, PathBuf};

use landlock::{
    ABI, Access, AccessFs, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, Scope,
};
use serde::{Deserialize, Serialize};

use crate::config::plugin::{Kind, PluginSpec, SandboxSettings};
use crate::config::{Config, SandboxMode};

/// The newest Landlock ABI the sandbox asks for; older kernels get what they support.
const LANDLOCK_ABI: ABI = ABI::V6;

/// System directories a plugin may read and execute from (those that exist), before the secrets
/// beneath them are taken out.
const SYSTEM_DIRS: &[&str] = &[
    "/usr", "/lib", "/lib32", "/lib64", "/bin", "/sbin", "/etc", "/opt", "/proc", "/sys",
];

/// Device files every program expects.
const STANDARD_DEVICES: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
];

/// What one plugin process may reach; built by the daemon, carried to the plugin's process as
/// JSON, enforced there by [`enter`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Read and execute beneath (system directories minus secrets, the plugin's program).
    pub execute: Vec<PathBuf>,
    /// Read beneath (the plugin's library and files, `allow_read`).
    pub read: Vec<PathBuf>,
    /// Read and write beneath (`allow_write`, the private directory).
    pub write: Vec<PathBuf>,
    /// Read and write, device operations included (`allow_devices`, the standard devices).
    pub devices: Vec<PathBuf>,
    /// TCP/UDP/raw sockets allowed.
    pub network: bool,
    /// UNIX sockets allowed (`socket(AF_UNIX)`; `socketpair` always is).
    pub unix_sockets: bool,
    /// The plugin's own writable directory (also in `write`), given to it as
    /// `HUBAGENT_PLUGIN_DIR` and `TMPDIR`.
    pub private_dir: Option<PathBuf>,
    /// `plugin_sandbox = "required"`: the plugin must not run unless Landlock and the seccomp
    /// filter are both in force.
    pub required: bool,
}

impl Policy {
    /// The policy of a plugin that runs `own_executables` (its program) and reads `own_files`
    /// (its library, the files its command names), widened by `widening`, never reaching
    /// `secrets` (files or directories).
    pub fn build(
        (own_executables, own_files): (&[PathBuf], &[PathBuf]),
        widening: &SandboxSettings,
        private_dir: Option<&Path>,
        secrets: &[PathBuf],
    ) -> Policy {
        let existing = |paths: &mut dyn Iterator<Item = PathBuf>| -> Vec<PathBuf> {
            paths.filter(|p| p.exists()).collect()
        };
        let mut execute = Vec::new();
        let system = existing(&mut SYSTEM_DIRS.iter().map(PathBuf::from));
        for path in system.iter().chain(own_executables) {
            execute.extend(without(path, secrets));
        }
        let mut read = Vec::new();
        for path in own_files.iter().chain(&widening.allow_read) {
            read.extend(without(path, secrets));
        }
        let mut write = Vec::new();
        for path in &widening.allow_write {
            write.extend(without(path, secrets));
        }
        // The private directory lies beneath the state directory, which is out of reach as a
        // whole: it is granted by itself.
        write.extend(private_dir.map(Path::to_path_buf));
        let devices = existing(
            &mut STANDARD_DEVICES
                .iter()
                .map(PathBuf::from)
                .chain(widening.allow_devices.iter().cloned()),
        );
        Policy {
            execute,
            read,
            write,
            devices,
            network: widening.network,
            unix_sockets: widening.unix_sockets,
            private_dir: private_dir.map(Path::to_path_buf),
            required: false,
        }
    }
}

/// What every plugin's policy is built from: what the agent keeps from plugins, what the kernel
/// offers, and what the operator chose.
#[derive(Debug, Clone)]
pub struct Confinement {
    mode: SandboxMode,
    support: Support,
    /// Files and directories no plugin may reach.
    denied: Vec<PathBuf>,
    /// Where the plugins' private directories are made.
    private_root: PathBuf,
}

impl Confinement {
    /// The agent's secrets and state for `config`, read from `config_path`: the configuration
    /// files, every secret file, the state directory and the control socket.
    pub fn new(config: &Config, config_path: &Path) -> Confinement {
        let mut denied = config.secret_files();
        denied.extend([
            config_path.to_path_buf(),
            config.agent.state_dir.clone(),
            config.agent.control_socket.clone(),
        ]);
        // The drop-in directory beside the configuration file (config/files.rs).
        denied.extend(config_path.parent().map(|dir| dir.join("config.d")));
        Confinement {
            mode: config.agent.plugin_sandbox,
            support: Support::of_this_kernel(),
            denied,
            private_root: config.agent.state_dir.join("plugin-data"),
        }
    }

    pub fn mode(&self) -> SandboxMode {
        self.mode
    }

    pub fn support(&self) -> Support {
        self.support
    }

    /// The policy `spec` runs under: None when it runs unconfined (sandbox off, or a plugin
    /// inside the agent's process); an error when it must be confined and cannot be.
    pub fn policy_for(&self, spec: &PluginSpec) -> Result<Option<Policy>, String> {
        if self.mode == SandboxMode::Off || !spec.confinable() {
            return Ok(None);
        }
        let required = self.mode == SandboxMode::Required;
        if required && !self.support.usable() {
            return Err(format!(
                "plugin_sandbox = \"required\", but this kernel cannot confine plugins: it lacks {}",
                self.support.missing().join("; ")
            ));
        }
        let private_dir = match spec.sandbox.private_dir {
            true => Some(self.make_private_dir(&spec.name)?),
            false => None,
        };
        let (executables, files) = own_files(spec);
        let mut policy = Policy::build(
            (&executables, &files),
            &spec.sandbox,
            private_dir.as_deref(),
            &self.denied,
        );
        policy.required = required;
        Ok(Some(policy))
    }

    fn make_private_dir(&self, name: &str) -> Result<PathBuf, String> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let dir = self.private_root.join(name);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .and_then(|()| std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)))
            .map_err(|e| format!("cannot make the private directory {}: {e}", dir.display()))?;
        Ok(dir)
    }

    /// How `spec` is confined, for `hubagent plugins list` and status.
    pub fn describe(&self, spec: &PluginSpec, policy: Option<&Policy>) -> serde_json::Value {
        let Some(policy) = policy else {
            let why = match self.mode {
                SandboxMode::Off => "off (plugin_sandbox = \"off\")",
                _ => "none: it runs inside the agent's process",
            };
            return serde_json::json!({ "confined": false, "why": why });
        };
        let missing = self.support.missing();
        serde_json::json!({
            "confined": true,
            "kernel": self.support.describe(),
            "notEnforced": missing,
            "read": spec.sandbox.allow_read,
            "write": spec.sandbox.allow_write,
            "devices": spec.sandbox.allow_devices,
            "privateDir": policy.private_dir,
            "network": policy.network,
            "unixSockets": policy.unix_sockets,
        })
    }
}

/// The files a plugin runs from, as (executed, read): a library is only read (mapped); an exec
/// plugin's program is executed, with its script interpreter, and the files its command names
/// are read.
pub(super) fn own_files(spec: &PluginSpec) -> (Vec<PathBuf>, Vec<PathBuf>) {
    match &spec.kind {
        Kind::Library { path, .. } => (Vec::new(), vec![path.clone()]),
        Kind::Exec { command, .. } => {
            let program = super::trust::resolve_program(&command[0]).ok();
            let interpreter = program.as_deref().and_then(script_interpreter);
            let files = command[1..]
                .iter()
                .map(PathBuf::from)
                .filter(|p| p.is_absolute() && p.exists())
                .collect();
            (program.into_iter().chain(interpreter).collect(), files)
        }
        Kind::Builtin(_) => (Vec::new(), Vec::new()),
    }
}

/// The interpreter a `#!` script names (the kernel executes it too).
fn script_interpreter(program: &Path) -> Option<PathBuf> {
    use std::io::Read;
    let mut head = [0u8; 256];
    let n = std::fs::File::open(program).ok()?.read(&mut head).ok()?;
    let line = head[..n].strip_prefix(b"#!")?;
    let line = &line[..line.iter().position(|&b| b == b'\n').unwrap_or(line.len())];
    let interpreter = std::str::from_utf8(line).ok()?.split_whitespace().next()?;
    Some(PathBuf::from(interpreter))
}

impl Policy {
    /// The policy as the one command-line argument the plugin's process reads it from.
    pub fn to_argument(&self) -> String {
        serde_json::to_string(self).expect("a policy is plain data")
    }

    pub fn from_argument(text: &str) -> Result<Policy, String> {
        serde_json::from_str(text).map_err(|e| format!("unreadable sandbox policy: {e}"))
    }
}

/// Confines this process to `policy` and says what it could not enforce on stderr (the agent
/// logs it); an error when it could not confine itself, or not enough for a `required` policy.
pub fn confine_self(policy: &Policy) -> Result<(), String> {
    let enforced = enter(policy)?;
    if policy.required && (enforced.landlock == "not enforced" || !enforced.seccomp) {
        return Err(format!(
            "plugin_sandbox = \"required\", but the sandbox is not in force (Landlock {}, seccomp {})",
            enforced.landlock,
            if enforced.seccomp { "on" } else { "missing" }
        ));
    }
    if !enforced.complete() {
        eprintln!(
            "sandbox: Landlock {}, seccomp {} (this kernel cannot enforce all of it)",
            enforced.landlock,
            if enforced.seccomp { "on" } else { "missing" }
        );
    }
    Ok(())
}

/// `root` minus every secret beneath it: `root` itself when none is, else the siblings along
/// the way down to each secret (a secret that is `root`, or above it, leaves nothing).
fn without(root: &Path, secrets: &[PathBuf]) -> Vec<PathBuf> {
    let root = canonical(root);
    let secrets: Vec<PathBuf> = secrets.iter().map(|s| canonical(s)).collect();
    if secrets.iter().any(|s| root.starts_with(s)) {
        return Vec::new();
    }
    if !secrets.iter().any(|s| s.starts_with(&root)) {
        return vec![root];
    }
    let Ok(entries) = std::fs::read_dir(&root) else {
        return Vec::new(); // unreadable: grant nothing rather than too much
    };
    let mut granted = Vec::new();
    for entry in entries.flatten() {
        granted.extend(without(&entry.path(), &secrets));
    }
    granted.sort();
    granted
}

/// The path with symbolic links resolved when it exists (Landlock sees the real files).
fn canonical(path: &Path) -> PathBuf {
    path.canonicalize().unwrap_or_else(|_| path.to_path_buf())
}

/// What the kernel offers the sandbox (for `hubagent check`, status and the log).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Support {
    /// The kernel's Landlock ABI version, None without Landlock.
    pub landlock_abi: Option<i32>,
    /// Seccomp filters available.
    pub seccomp: bool,
}

impl Support {
    pub fn of_this_kernel() -> Support {
        // SAFETY: the version query takes no pointer (NULL, size 0) and only returns a number.
        let abi = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                std::ptr::null::<libc::c_void>(),
                0usize,
                1u32, // LANDLOCK_CREATE_RULESET_VERSION
            )
        };
        // SAFETY: PR_GET_SECCOMP reads this process's mode; -1/EINVAL without seccomp support.
        let seccomp = unsafe { libc::prctl(libc::PR_GET_SECCOMP) } >= 0;
        Support {
            landlock_abi: (abi > 0).then_some(abi as i32),
            seccomp,
        }
    }

    /// Everything the sandbox uses is there (Landlock with scopes, seccomp).
    pub fn complete(&self) -> bool {
        self.landlock_abi
            .is_some_and(|abi| abi >= LANDLOCK_ABI as i32)
            && self.seccomp
    }

    /// Enough to keep plugins from the agent's files and control socket: Landlock (any ABI) and
    /// seccomp. What `plugin_sandbox = "required"` requires.
    pub fn usable(&self) -> bool {
        self.landlock_abi.is_some() && self.seccomp
    }

    /// What a plugin sandbox lacks on this kernel, in words; empty when nothing.
    pub fn missing(&self) -> Vec<String> {
        let mut missing = Vec::new();
        match self.landlock_abi {
            None => missing.push(
                "Landlock (no filesystem confinement: plugins can read the agent's keys and state)"
                    .to_string(),
            ),
            Some(abi) if abi < LANDLOCK_ABI as i32 => missing.push(format!(
                "Landlock ABI {} (the kernel has {abi}: {})",
                LANDLOCK_ABI as i32,
                lacking_in(abi)
            )),
            Some(_) => {}
        }
        if !self.seccomp {
            missing.push(
                "seccomp (plugins can open UNIX sockets, the control socket included)".to_string(),
            );
        }
        missing
    }

    /// One line: "Landlock ABI 7, seccomp" or what is missing.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(abi) = self.landlock_abi {
            parts.push(format!("Landlock ABI {abi}"));
        }
        if self.seccomp {
            parts.push("seccomp".to_string());
        }
        if parts.is_empty() {
            "none (no Landlock, no seccomp)".to_string()
        } else {
            parts.join(", ")
        }
    }
}

fn lacking_in(abi: i32) -> &'static str {
    match abi {
        1 => {
            "files can be renamed across directories and truncated; signals and abstract sockets of the agent are reachable"
        }
        2 | 3 => {
            "signals and abstract sockets of the agent are reachable, devices' ioctl is not governed"
        }
        4 | 5 => "signals and abstract sockets of the agent are reachable",
        _ => "",
    }
}

/// What [`enter`] enforced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enforced {
    pub landlock: &'static str,
    pub seccomp: bool,
}

impl Enforced {
    pub fn complete(&self) -> bool {
        self.landlock == "fully enforced" && self.seccomp
    }
}

/// Confines the calling process (and everything it executes) to `policy`, for good. Call it
/// while the process is single-threaded, before any plugin code runs.
pub fn enter(policy: &Policy) -> Result<Enforced, String> {
    let landlock = restrict_filesystem(policy)?;
    let seccomp = filter_sockets(policy)?;
    Ok(Enforced { landlock, seccomp })
}

fn restrict_filesystem(policy: &Policy) -> Result<&'static str, String> {
    let abi = LANDLOCK_ABI;
    let read_only = AccessFs::ReadFile | AccessFs::ReadDir;
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(abi))
        .and_then(|r| r.scope(Scope::Signal | Scope::AbstractUnixSocket))
        .and_then(|r| r.create())
        .map_err(|e| format!("cannot create the Landlock ruleset: {e}"))?;
    let rules = [
        (&policy.execute, AccessFs::from_read(abi)),
        (&policy.read, read_only),
        (&policy.write, AccessFs::from_all(abi)),
        (&policy.devices, AccessFs::from_file(abi)),
    ];
    for (paths, access) in rules {
        for path in paths {
            let Ok(fd) = PathFd::new(path) else {
                continue; // gone since the policy was built: nothing to grant
            };
            // A file takes only the rights that apply to files.
            let access = if path.is_dir() {
                access
            } else {
                access & AccessFs::from_file(abi)
            };
            ruleset = ruleset
                .add_rule(PathBeneath::new(fd, access))
                .map_err(|e| format!("cannot allow {}: {e}", path.display()))?;
        }
    }
    let status = ruleset
        .restrict_self()
        .map_err(|e| format!("cannot enter the Landlock sandbox: {e}"))?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => "fully enforced",
        RulesetStatus::PartiallyEnforced => "partially enforced",
        RulesetStatus::NotEnforced => "not enforced",
    })
}

// The seccomp audit architecture of this build (linux/audit.h), checked first by the filter so a
// syscall made through another ABI (32-bit calls on x86-64) cannot slip past it.
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7;
#[cfg(target_arch = "arm")]
const AUDIT_ARCH: u32 = 0x4000_0028;

/// Installs the socket filter; false when the kernel has no seccomp (nothing else fails then).
fn filter_sockets(policy: &Policy) -> Result<bool, String> {
    let mut denied_families = Vec::new();
    if !policy.unix_sockets {
        denied_families.push(libc::AF_UNIX as u32);
    }
    if !policy.network {
        denied_families.extend([libc::AF_INET, libc::AF_INET6, libc::AF_PACKET].map(|f| f as u32));
    }
    // SAFETY: PR_GET_SECCOMP only reads this process's mode.
    if unsafe { libc::prctl(libc::PR_GET_SECCOMP) } < 0 {
        return Ok(false);
    }
    if denied_families.is_empty() {
        return Ok(true);
    }
    let program = socket_filter(&denied_families);
    let fprog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: no_new_privs is set (Landlock's restrict_self sets it; set again in case Landlock
    // is missing), and `fprog` points at `program`, alive for the call.
    let installed = unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
            && libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &fprog as *const libc::sock_fprog,
            ) == 0
    };
    if installed {
        Ok(true)
    } else {
        Err(format!(
            "cannot install the seccomp filter: {}",
            std::io::Error::last_os_error()
        ))
    }
}

/// The BPF program: another architecture's syscalls (and x32's, on x86-64) fail with ENOSYS;
/// `socket(family, …)` with a denied family fails with EACCES; everything else is allowed.
fn socket_filter(denied_families: &[u32]) -> Vec<libc::sock_filter> {
    const LOAD_WORD: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const RETURN: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    let stmt = |code: u16, k: u32| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    // Jumps count the instructions they skip.
    let jump = |test: u32, k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: (libc::BPF_JMP | test | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    };
    let enosys = stmt(RETURN, libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32);
    // struct seccomp_data: nr at 0, arch at 4, args[0] at 16 (its low half: every target is
    // little-endian, and `int family` is 32 bits).
    let mut program = vec![
        stmt(LOAD_WORD, 4),
        jump(libc::BPF_JEQ, AUDIT_ARCH, 1, 0),
        enosys,
        stmt(LOAD_WORD, 0),
    ];
    if cfg!(target_arch = "x86_64") {
        // x32 syscalls share x86-64's audit arch and set bit 30 of the number.
        program.extend([jump(libc::BPF_JGE, 0x4000_0000, 0, 1), enosys]);
    }
    let n = denied_families.len() as u8;
    // Not socket(): skip the family checks to the allow right after them.
    program.push(jump(libc::BPF_JEQ, libc::SYS_socket as u32, 0, n + 1));
    program.push(stmt(LOAD_WORD, 16));
    for (i, family) in denied_families.iter().enumerate() {
        // Equal: skip the remaining checks and the allow, to the deny.
        program.push(jump(libc::BPF_JEQ, *family, n - i as u8, 0));
    }
    program.push(stmt(RETURN, libc::SECCOMP_RET_ALLOW));
    program.push(stmt(RETURN, libc::SECCOMP_RET_ERRNO | libc::EACCES as u32));
    program
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_beneath_a_granted_directory_takes_out_only_its_own_branch() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        for sub in ["etc/hubagent", "etc/ssl", "usr"] {
            std::fs::create_dir_all(root.join(sub)).unwrap();
        }
        std::fs::write(root.join("etc/hostname"), "gw").unwrap();
        std::fs::write(root.join("etc/hubagent/device.key"), "k").unwrap();
        let secrets = vec![root.join("etc/hubagent")];
        let granted = without(&root, &secrets);
        assert_eq!(
            granted,
            vec![
                root.join("etc/hostname"),
                root.join("etc/ssl"),
                root.join("usr")
            ]
        );
        // Nothing to take out: the root itself; the secret itself or above it: nothing.
        assert_eq!(without(&root.join("usr"), &secrets), vec![root.join("usr")]);
        assert!(without(&root.join("etc/hubagent"), &secrets).is_empty());
        assert!(without(&root.join("etc/hubagent/device.key"), &secrets).is_empty());
    }

    #[test]
    fn what_a_kernel_lacks_is_said_and_decides_whether_required_can_run() {
        let full = Support {
            landlock_abi: Some(7),
            seccomp: true,
        };
        assert!(full.complete() && full.usable() && full.missing().is_empty());
        assert_eq!(full.describe(), "Landlock ABI 7, seccomp");
        // Debian 12's kernel: Landlock without the scopes; usable, not complete.
        let older = Support {
            landlock_abi: Some(3),
            seccomp: true,
        };
        assert!(older.usable() && !older.complete());
        assert!(
            older.missing()[0].contains("the kernel has 3"),
            "{:?}",
            older.missing()
        );
        let none = Support {
            landlock_abi: None,
            seccomp: false,
        };
        assert!(!none.usable());
        let missing = none.missing().join("; ");
        assert!(
            missing.contains("Landlock (no filesystem confinement") && missing.contains("seccomp"),
            "{missing}"
        );
        assert_eq!(none.describe(), "none (no Landlock, no seccomp)");
    }

    #[test]
    fn the_filter_denies_exactly_the_listed_families() {
        // Walk the program as the kernel would, for socket() with each family.
        fn run(program: &[libc::sock_filter], nr: u32, arch: u32, family: u32) -> u32 {
            let (mut pc, mut acc) = (0usize, 0u32);
            loop {
                let insn = program[pc];
                match insn.code {
                    c if c == (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16 => {
                        acc = match insn.k {
                            0 => nr,
                            4 => arch,
                            16 => family,
                            k => panic!("load at {k}"),
                        };
                        pc += 1;
                    }
                    c if c == (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16 => {
                        pc += 1 + usize::from(if acc == insn.k { insn.jt } else { insn.jf });
                    }
                    c if c == (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16 => {
                        pc += 1 + usize::from(if acc >= insn.k { insn.jt } else { insn.jf });
                    }
                    _ => return insn.k,
                }
            }
        }
        let program = socket_filter(&[libc::AF_UNIX as u32, libc::AF_INET as u32]);
        let eacces = libc::SECCOMP_RET_ERRNO | libc::EACCES as u32;
        let socket = libc::SYS_socket as u32;
        assert_eq!(
            run(&program, socket, AUDIT_ARCH, libc::AF_UNIX as u32),
            eacces
        );
        assert_eq!(
            run(&program, socket, AUDIT_ARCH, libc::AF_INET as u32),
            eacces
        );
        assert_eq!(
            run(&program, socket, AUDIT_ARCH, libc::AF_INET6 as u32),
            libc::SECCOMP_RET_ALLOW
        );
        // Another syscall whose first argument happens to be AF_UNIX (1): allowed.
        assert_eq!(
            run(&program, libc::SYS_write as u32, AUDIT_ARCH, 1),
            libc::SECCOMP_RET_ALLOW
        );
        assert_eq!(
            run(&program, socket, 0x4000_0003, libc::AF_UNIX as u32),
            libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32
        );
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            run(
                &program,
                0x4000_0000 | socket,
                AUDIT_ARCH,
                libc::AF_UNIX as u32
            ),
            libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32
        );
        let only_unix = socket_filter(&[libc::AF_UNIX as u32]);
        assert_eq!(run(&only_unix, socket, AUDIT_ARCH, 1), eacces);
        assert_eq!(
            run(&only_unix, socket, AUDIT_ARCH, 2),
            libc::SECCOMP_RET_ALLOW
        );
    }
}
