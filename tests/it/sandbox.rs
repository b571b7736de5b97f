//! The plugin sandbox (docs/security.md, "What a plugin can reach"): a library plugin in its host
//! and an exec plugin, both widened to read the whole test directory, still cannot read the
//! device key, a secret setting's file, a TPM password file, the state directory (the cached
//! assignment, the queue) or the configuration, nor connect to the control socket; what the
//! operator allowed works. Each probe runs inside the plugin (tests/plugins: the misbehave
//! plugin's "probe" mode and exec/probe.py), which prints what the kernel answered.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use hubagent_tests::*;
use serde_json::Value;

/// The probe results `plugin` printed, newest last (lines `probe {…}` of the agent's log).
fn probes(log: &str, plugin: &str) -> Vec<Value> {
    let suffix = format!(" plugin={plugin}");
    log.lines()
        .filter(|line| line.ends_with(&suffix))
        .filter_map(|line| {
            let start = line.find("probe {")? + "probe ".len();
            let end = line.rfind(&suffix)?;
            serde_json::from_str(&line[start..end]).ok()
        })
        .collect()
}

/// A probing library plugin ("lib") and exec plugin ("py"), each allowed to read `root` and
/// write `out`, with `network` as given, trying `read`, `write`, `connect` and `tcp`.
fn probing_plugins(root: &Path, out: &Path, network: bool, probes: &str) -> String {
    probing_plugins_with(root, out, network, "", probes)
}

/// [`probing_plugins`] with more sandbox keys (`widening`) for both plugins.
fn probing_plugins_with(
    root: &Path,
    out: &Path,
    network: bool,
    widening: &str,
    probes: &str,
) -> String {
    let library = install_plugin(root, &built_library("hubagent_test_misbehave"), 0o644);
    let script = install_plugin(
        root,
        &repo_root().join("tests/plugins/exec/probe.py"),
        0o644,
    );
    let widening = format!(
        "allow_read = [\"{root}\"]\nallow_write = [\"{out}\"]\nnetwork = {network}\n{widening}",
        root = root.display(),
        out = out.display()
    );
    format!(
        r#"
[[plugin]]
name = "lib"
kind = "library"
path = "{library}"
{widening}
[plugin.settings]
mode = "probe"
interval = "200ms"
{probes}

[[plugin]]
name = "py"
kind = "exec"
command = ["{PYTHON}", "{script}"]
{widening}
[plugin.settings]
interval = 0.2
{probes}
"#,
        library = library.display(),
        script = script.display(),
    )
}

/// The TOML list of `paths`.
fn list(paths: &[&Path]) -> String {
    let quoted: Vec<String> = paths
        .iter()
        .map(|p| format!("\"{}\"", p.display()))
        .collect();
    format!("[{}]", quoted.join(", "))
}

/// Waits until both plugins printed a round in which `ready` holds; returns those rounds.
async fn probed(agent: &AgentProcess, ready: impl Fn(&Value) -> bool) -> [Value; 2] {
    agent
        .wait_log_line("both plugins probing, with every target in place", |_| {
            let log = agent.log_text();
            ["lib", "py"]
                .iter()
                .all(|p| probes(&log, p).last().is_some_and(&ready))
        })
        .await;
    let log = agent.log_text();
    ["lib", "py"].map(|p| probes(&log, p).pop().unwrap())
}

fn assert_result(round: &Value, section: &str, target: &Path, expected: &str, log: &str) {
    let key = target.display().to_string();
    assert_eq!(
        round[section][&key], expected,
        "{section} {key}: {round}\n--- agent log ---\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_cannot_reach_the_agents_keys_state_or_control_socket() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let running = start_sim(&root).await;
    let device = "gw-sandbox-1";
    let secret = write_key(&root, "db.secret", "db-pass-5e1f");
    let allowed = root.join("allowed.txt");
    std::fs::write(&allowed, "fine").unwrap();
    let out = root.join("out");
    std::fs::create_dir(&out).unwrap();
    let key = root.join("device.key");
    let state = root.join("state");
    let cached_assignment = state.join("provisioning.json");
    let queue = state.join("queue");
    let config_file = root.join("config.toml");
    let control_socket = root.join("control.sock");
    let mine = out.join("mine.txt");
    let elsewhere = root.join("planted.txt");
    // Two device nodes outside every allowed directory (copies of /dev/zero): the plugins are
    // given one of them with allow_devices, as an operator gives a serial port.
    // Each plugin's private directory, under the state directory: its own, not the other's.
    let private: std::collections::BTreeMap<&str, std::path::PathBuf> = ["lib", "py"]
        .into_iter()
        .map(|name| (name, state.join("plugin-data").join(name).join("probe.txt")))
        .collect();
    let devices = tempfile::tempdir().unwrap();
    let (serial, other_device) = (devices.path().join("ttyS9"), devices.path().join("ttyS8"));
    for node in [&serial, &other_device] {
        make_char_device(node, 1, 5);
    }
    let probes_toml = format!(
        "read = {read}\nwrite = {write}\nconnect = {connect}\ntoken = {{ file = \"{secret}\" }}",
        read = list(&[
            &key,
            &secret,
            &cached_assignment,
            &queue,
            &config_file,
            &allowed,
            &serial,
            &other_device
        ]),
        write = list(&[&mine, &elsewhere, &private["lib"], &private["py"]]),
        connect = list(&[&control_socket]),
        secret = secret.display(),
    );
    let widening = format!(
        "allow_devices = [\"{}\"]\nprivate_dir = true",
        serial.display()
    );
    let plugins = probing_plugins_with(&root, &out, true, &widening, &probes_toml);
    let config = plugin_agent_config(&root, &running, device, &plugins, true);
    assert_eq!(config, config_file);
    let agent = AgentProcess::start(&config);
    // Once the assignment is cached and the queue exists, every target is there to be refused.
    let rounds = probed(&agent, |round| {
        round["read"][cached_assignment.display().to_string()] != "ENOENT"
            && round["read"][queue.display().to_string()] != "ENOENT"
    })
    .await;
    let log = agent.log_text();
    for (round, (own, other)) in rounds.iter().zip([("lib", "py"), ("py", "lib")]) {
        assert_result(round, "write", &private[own], "ok", &log);
        assert_result(round, "write", &private[other], "EACCES", &log);
    }
    for round in &rounds {
        for target in [&key, &secret, &cached_assignment, &queue, &config_file] {
            assert_result(round, "read", target, "EACCES", &log);
        }
        assert_result(round, "read", &allowed, "ok", &log);
        assert_result(round, "read", &serial, "ok", &log);
        assert_result(round, "read", &other_device, "EACCES", &log);
        assert_result(round, "write", &mine, "ok", &log);
        assert_result(round, "write", &elsewhere, "EACCES", &log);
        assert_result(round, "connect", &control_socket, "EACCES", &log);
    }
    assert!(!elsewhere.exists(), "a plugin wrote outside what it may");
    // `hubagent plugins list` shows each plugin's effective sandbox.
    let list = agent
        .wait_plugins("both plugins running", |p| {
            p["lib"]["status"] == "running" && p["py"]["status"] == "running"
        })
        .await;
    for name in ["lib", "py"] {
        let sandbox = &list[name]["sandbox"];
        assert_eq!(sandbox["confined"], true, "{sandbox}");
        assert_eq!(sandbox["write"][0], out.display().to_string(), "{sandbox}");
        assert_eq!(sandbox["unixSockets"], false, "{sandbox}");
    }
    let text = String::from_utf8_lossy(&agent.cli(&["plugins", "list"]).stdout).to_string();
    assert!(
        text.contains(&format!("write {}", out.display())) && text.contains("unix sockets no"),
        "{text}"
    );
    // This kernel has what the sandbox uses: `hubagent check` says so.
    let (_, report) = agent.check_report();
    let check = check_entry(&report, "plugins.sandbox");
    assert_eq!(check["result"], "pass", "{check}");
    assert!(
        check["detail"]
            .as_str()
            .unwrap()
            .contains("2 plugin(s) confined"),
        "{check}"
    );
    assert_eq!(agent.stop(), Some(0));
}

/// With TPM attestation the hierarchy password files are the secrets; `network = false` takes IP
/// sockets away; `plugin_sandbox = "required"` runs plugins where the kernel can confine them.
/// No TPM answers here: the plugins run while the agent cannot provision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_passwords_stay_out_of_reach_and_network_false_takes_ip_away() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let running = start_sim(&root).await;
    let owner_auth = write_key(&root, "tpm-owner.auth", "owner-pass-93c2");
    let endorsement_auth = write_key(&root, "tpm-endorsement.auth", "endorsement-pass-11ab");
    let out = root.join("out");
    std::fs::create_dir(&out).unwrap();
    let hub = format!("127.0.0.1:{}", running.mqtt_addr.port());
    let probes_toml = format!(
        "read = {read}\ntcp = [\"{hub}\"]",
        read = list(&[&owner_auth, &endorsement_auth]),
    );
    let plugins = probing_plugins(&root, &out, false, &probes_toml);
    let config = AgentConfig::new(
        &root,
        &running,
        Some("gw-sandbox-tpm"),
        &format!(
            "method = \"tpm\"\ntcti = \"swtpm:host=127.0.0.1,port=9\"\nowner_auth = {{ file = \"{}\" }}\nendorsement_auth = {{ file = \"{}\" }}",
            owner_auth.display(),
            endorsement_auth.display()
        ),
    )
    .allow_unsafe_plugin_paths(true)
    .extra(&plugins)
    .write();
    add_settings(&config, "[agent]", "plugin_sandbox = \"required\"\n");
    let agent = AgentProcess::start(&config);
    let rounds = probed(&agent, |round| round["tcp"].is_object()).await;
    let log = agent.log_text();
    for round in &rounds {
        assert_result(round, "read", &owner_auth, "EACCES", &log);
        assert_result(round, "read", &endorsement_auth, "EACCES", &log);
        assert_result(round, "tcp", Path::new(&hub), "EACCES", &log);
    }
    assert_eq!(agent.stop(), Some(0));
}

/// A library loaded into the agent cannot be confined: `config check` and `hubagent check` say so,
/// and a sandbox key on it is refused rather than silently meaningless.
#[test]
fn in_process_plugins_are_named_as_unconfinable() {
    let dir = tempfile::tempdir().unwrap();
    let library = install_plugin(dir.path(), &built_library("hubagent_test_misbehave"), 0o644);
    let table = |extra: &str| {
        format!(
            "[agent]\nstate_dir = \"{state}\"\n[provisioning]\nsource = \"manual\"\niothub_hostname = \"hub.local\"\ndevice_id = \"d\"\n[provisioning.attestation]\nmethod = \"symmetric_key\"\nkey = {{ value = \"a2V5\" }}\n[[plugin]]\nname = \"inside\"\nkind = \"library\"\npath = \"{library}\"\nisolation = \"in-process\"\n{extra}",
            state = dir.path().join("state").display(),
            library = library.display(),
        )
    };
    let config = dir.path().join("config.toml");
    let check = |text: String| {
        std::fs::write(&config, text).unwrap();
        std::process::Command::new(hubagent_bin())
            .args(["--config", config.to_str().unwrap(), "config", "check"])
            .output()
            .unwrap()
    };
    let out = check(table(""));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        stdout.contains("note: plugin inside (isolation = \"in-process\")")
            && stdout.contains("cannot confine it"),
        "{stdout}"
    );
    let out = check(table("allow_read = [\"/srv\"]\n"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    assert!(
        stderr.contains("allow_read") && stderr.contains("cannot be sandboxed"),
        "{stderr}"
    );
}

/// Makes `command` run as on a kernel without Landlock: a seccomp filter, inherited by every
/// process it starts, answers the three Landlock system calls with ENOSYS, as such a kernel does.
fn without_landlock(command: &mut Command) -> &mut Command {
    const LOAD_NR: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JUMP_IF_EQUAL: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const RETURN: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    let insn = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    let program = [
        insn(LOAD_NR, 0, 0, 0),
        insn(
            JUMP_IF_EQUAL,
            3,
            0,
            libc::SYS_landlock_create_ruleset as u32,
        ),
        insn(JUMP_IF_EQUAL, 2, 0, libc::SYS_landlock_add_rule as u32),
        insn(JUMP_IF_EQUAL, 1, 0, libc::SYS_landlock_restrict_self as u32),
        insn(RETURN, 0, 0, libc::SECCOMP_RET_ALLOW),
        insn(RETURN, 0, 0, libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
    ];
    // SAFETY: between fork and exec only prctl runs, on a program that lives in the closure.
    unsafe {
        command.pre_exec(move || {
            let fprog = libc::sock_fprog {
                len: program.len() as u16,
                filter: program.as_ptr() as *mut libc::sock_filter,
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &fprog) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// On a kernel without Landlock, `best-effort` runs the plugins with what is left (the seccomp
/// filter still keeps the control socket away) and says what it cannot enforce, in the log,
/// `plugins list` and `hubagent check`; `required` starts no plugin and `hubagent check` fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kernel_without_landlock_is_told_and_required_refuses_to_run_plugins() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let running = start_sim(&root).await;
    let out = root.join("out");
    std::fs::create_dir(&out).unwrap();
    let key = root.join("device.key");
    let control_socket = root.join("control.sock");
    let probes_toml = format!(
        "read = {read}\nconnect = {connect}",
        read = list(&[&key]),
        connect = list(&[&control_socket]),
    );
    let plugins = probing_plugins(&root, &out, true, &probes_toml);
    let config = plugin_agent_config(&root, &running, "gw-sandbox-old-kernel", &plugins, true);
    let check = |config: &Path| -> Value {
        let output = without_landlock(Command::new(hubagent_bin()).args([
            "--config",
            config.to_str().unwrap(),
            "check",
            "--json",
        ]))
        .output()
        .unwrap();
        let report: Value = serde_json::from_slice(&output.stdout).unwrap();
        check_entry(&report, "plugins.sandbox")
    };
    let start = |config: &Path| {
        let mut command = Command::new(hubagent_bin());
        command.args(["--config", config.to_str().unwrap(), "run"]);
        without_landlock(&mut command);
        AgentProcess::spawn(command, config, "hubagent")
    };

    let agent = start(&config);
    let rounds = probed(&agent, |round| round["read"].is_object()).await;
    let log = agent.log_text();
    assert!(
        log.contains(
            "the plugin sandbox cannot be fully enforced on this kernel; missing: Landlock"
        ),
        "{log}"
    );
    for round in &rounds {
        // Without Landlock the files are open to the plugin; the socket filter still holds.
        assert_result(round, "read", &key, "ok", &log);
        assert_result(round, "connect", &control_socket, "EACCES", &log);
    }
    let text = String::from_utf8_lossy(&agent.cli(&["plugins", "list"]).stdout).to_string();
    assert!(text.contains("NOT ENFORCED here"), "{text}");
    let sandbox_check = check(&config);
    assert_eq!(sandbox_check["result"], "warn", "{sandbox_check}");
    assert_eq!(agent.stop(), Some(0));

    add_settings(&config, "[agent]", "plugin_sandbox = \"required\"\n");
    let sandbox_check = check(&config);
    assert_eq!(sandbox_check["result"], "fail", "{sandbox_check}");
    assert!(
        sandbox_check["detail"]
            .as_str()
            .unwrap()
            .contains("will not start"),
        "{sandbox_check}"
    );
    let agent = start(&config);
    let plugins = agent
        .wait_plugins("both plugins failing for want of a sandbox", |p| {
            ["lib", "py"].iter().all(|name| {
                p[name]["lastFailure"]
                    .as_str()
                    .is_some_and(|f| f.contains("plugin_sandbox = \"required\""))
            })
        })
        .await;
    assert!(probes(&agent.log_text(), "lib").is_empty(), "{plugins}");
    assert!(probes(&agent.log_text(), "py").is_empty(), "{plugins}");
    assert_eq!(agent.stop(), Some(0));
}

/// A character device node at `path` (the tests run as root).
fn make_char_device(path: &Path, major: u32, minor: u32) {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a NUL-terminated path and plain numbers.
    let made = unsafe {
        libc::mknod(
            c_path.as_ptr(),
            libc::S_IFCHR | 0o666,
            libc::makedev(major, minor),
        )
    };
    assert_eq!(
        made,
        0,
        "mknod {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}
