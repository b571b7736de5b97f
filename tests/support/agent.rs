//! The agent side: configuration files, the real `hubagent` binary as a daemon process, and what
//! it says through its control socket (status, plugin list) and its log.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{LONG_WAIT, enroll};

/// Writes a key file with owner-only permissions.
pub fn write_key(dir: &Path, name: &str, key: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("{key}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// The built-in simulated sensor as a `[[plugin]]` table, publishing every `interval`.
pub fn builtin_sensor(interval: &str) -> String {
    format!(
        "\n[[plugin]]\nname = \"sensor\"\nkind = \"builtin\"\nbuiltin = \"simulated-sensor\"\ninterval = \"{interval}\"\n"
    )
}

/// An agent configuration for a DPS registration against a hubsim, state and control socket in
/// the test's directory; the builder methods set what varies between tests, [`AgentConfig::write`]
/// writes it.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    dir: PathBuf,
    id_scope: String,
    mqtt_port: u16,
    ca_pem_path: PathBuf,
    registration_id: Option<String>,
    attestation: String,
    global_endpoint: String,
    allow_unsafe_plugin_paths: bool,
    extra: String,
    path: PathBuf,
}

impl AgentConfig {
    /// `attestation`: the lines of `[provisioning.attestation]`, `method` included.
    /// `registration_id` None leaves it to the agent (a certificate's CN, the TPM's EK).
    pub fn new(
        dir: &Path,
        running: &hubsim::Running,
        registration_id: Option<&str>,
        attestation: &str,
    ) -> AgentConfig {
        AgentConfig {
            dir: dir.to_path_buf(),
            id_scope: running.sim.read(|s| s.id_scope.clone()),
            mqtt_port: running.mqtt_addr.port(),
            ca_pem_path: running.ca_pem_path.clone(),
            registration_id: registration_id.map(str::to_string),
            attestation: attestation.to_string(),
            global_endpoint: "localhost".into(),
            allow_unsafe_plugin_paths: false,
            extra: String::new(),
            path: dir.join("config.toml"),
        }
    }

    /// A symmetric-key registration with the key in `key_file`.
    pub fn symmetric_key(
        dir: &Path,
        running: &hubsim::Running,
        registration_id: &str,
        key_file: &Path,
    ) -> AgentConfig {
        let attestation = format!(
            "method = \"symmetric_key\"\nkey = {{ file = \"{}\" }}\n",
            key_file.display()
        );
        AgentConfig::new(dir, running, Some(registration_id), &attestation)
    }

    /// DPS's `global_endpoint` (default `localhost`: MQTT on hubsim's port).
    pub fn global_endpoint(mut self, endpoint: &str) -> AgentConfig {
        self.global_endpoint = endpoint.into();
        self
    }

    /// `[hub] port`: the MQTT port of DPS and the hub (default hubsim's; a closed one makes
    /// MQTT over TLS unreachable).
    pub fn mqtt_port(mut self, port: u16) -> AgentConfig {
        self.mqtt_port = port;
        self
    }

    /// `[agent] allow_unsafe_plugin_paths` (honoured only when not root).
    pub fn allow_unsafe_plugin_paths(mut self, allow: bool) -> AgentConfig {
        self.allow_unsafe_plugin_paths = allow;
        self
    }

    /// Appends TOML tables after `[hub]` (plugins, `[queue]`).
    pub fn extra(mut self, toml: &str) -> AgentConfig {
        self.extra.push('\n');
        self.extra.push_str(toml);
        self
    }

    /// Where the file goes (default `config.toml` in the test's directory).
    pub fn path(mut self, path: PathBuf) -> AgentConfig {
        self.path = path;
        self
    }

    /// Writes the file (and its directory); returns its path.
    pub fn write(&self) -> PathBuf {
        let unsafe_paths = if self.allow_unsafe_plugin_paths {
            "allow_unsafe_plugin_paths = true\n"
        } else {
            ""
        };
        let registration = self
            .registration_id
            .as_ref()
            .map(|id| format!("registration_id = \"{id}\"\n"))
            .unwrap_or_default();
        let text = format!(
            r#"[agent]
state_dir = "{state}"
control_socket = "{socket}"
log_format = "text"
{unsafe_paths}
[provisioning]
source = "dps"
global_endpoint = "{endpoint}"
id_scope = "{scope}"
{registration}
[provisioning.attestation]
{attestation}
[hub]
port = {port}
trust_bundle = "{ca}"
{extra}"#,
            state = self.dir.join("state").display(),
            socket = self.dir.join("control.sock").display(),
            endpoint = self.global_endpoint,
            scope = self.id_scope,
            attestation = self.attestation,
            port = self.mqtt_port,
            ca = self.ca_pem_path.display(),
            extra = self.extra,
        );
        std::fs::create_dir_all(self.path.parent().unwrap()).unwrap();
        std::fs::write(&self.path, text).unwrap();
        self.path.clone()
    }
}

/// Enrolls `registration_id` with a symmetric key in `running` and writes its key file
/// (`dir/device.key`); returns the configuration of an agent using it, to complete and write,
/// and the key.
pub fn enrolled_agent(
    dir: &Path,
    running: &hubsim::Running,
    registration_id: &str,
) -> (AgentConfig, String) {
    let key = enroll(&running.sim, registration_id);
    let key_file = write_key(dir, "device.key", &key);
    let config = AgentConfig::symmetric_key(dir, running, registration_id, &key_file);
    (config, key)
}

/// Enrolls `registration_id` with a symmetric key and has DPS issue it a hub certificate valid
/// `validity_seconds` (hubsim's CA, made in `dir/issuing-ca`, signing its CSRs); returns the
/// configuration of an agent using it, with `issued` as the body of
/// `[provisioning.issued_certificate]`, to complete and write.
pub fn issuing_agent(
    dir: &Path,
    running: &hubsim::Running,
    registration_id: &str,
    validity_seconds: u64,
    issued: &str,
) -> AgentConfig {
    let ca_dir = dir.join("issuing-ca");
    hubsim::pki::issue(hubsim::pki::CertKind::Root, "issuing-ca", &ca_dir, None).unwrap();
    let keys = crate::key_pair();
    crate::Enrollment::symmetric_key(&keys)
        .with(|c| {
            c.certificate_issuance = Some(hubsim::state::CertificateIssuance {
                issuer_dir: ca_dir.clone(),
                validity_seconds,
            })
        })
        .individual(&running.sim, registration_id);
    let key_file = write_key(dir, "device.key", &keys.primary_key);
    AgentConfig::symmetric_key(dir, running, registration_id, &key_file)
        .extra(&format!("[provisioning.issued_certificate]\n{issued}"))
}

/// An enrolled agent's configuration with `plugins` (TOML `[[plugin]]` tables) appended. With
/// `allow_unsafe`, `[agent] allow_unsafe_plugin_paths = true` (honoured only when not root).
pub fn plugin_agent_config(
    dir: &Path,
    running: &hubsim::Running,
    registration_id: &str,
    plugins: &str,
    allow_unsafe: bool,
) -> PathBuf {
    enrolled_agent(dir, running, registration_id)
        .0
        .allow_unsafe_plugin_paths(allow_unsafe)
        .extra(plugins)
        .write()
}

/// Adds `lines` at the top of `section` (e.g. `[hub]`) of a written configuration.
pub fn add_settings(config: &Path, section: &str, lines: &str) {
    let text = std::fs::read_to_string(config).unwrap();
    let header = format!("{section}\n");
    assert!(
        text.contains(&header),
        "no {section} in {}",
        config.display()
    );
    let text = text.replacen(&header, &format!("{header}{lines}"), 1);
    std::fs::write(config, text).unwrap();
}

/// The directory cargo builds this workspace's binaries and libraries in.
fn build_dir() -> PathBuf {
    // Integration tests live in another package: their executables are in `target/<profile>/deps`.
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

pub fn hubagent_bin() -> PathBuf {
    let bin = build_dir().join("hubagent");
    assert!(
        bin.exists(),
        "{} missing: build the workspace first",
        bin.display()
    );
    bin
}

/// The `hubsim` binary of this build, for tests that must kill the process itself.
pub fn hubsim_bin() -> PathBuf {
    let bin = build_dir().join("hubsim");
    assert!(
        bin.exists(),
        "{} missing: build the workspace first",
        bin.display()
    );
    bin
}

/// A shared library built by this workspace (`target/<profile>/lib<name>.so`).
pub fn built_library(name: &str) -> PathBuf {
    let path = build_dir().join(format!("lib{name}.so"));
    assert!(
        path.exists(),
        "{} missing: build the workspace first (cargo build --workspace)",
        path.display()
    );
    path
}

/// The repository root (for the example sources).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Waits until every plugin in `names` runs and has declared `declared` (`"methods"` or
/// `"c2dFilter"` in `hubagent plugins list`), and the hub has the agent's reported properties
/// for the first of them (so its subscriptions, methods and C2D included, are in place).
pub async fn wait_plugins_declared(
    sim: &hubsim::Sim,
    device: &str,
    agent: &AgentProcess,
    names: &[&str],
    declared: &str,
) -> Value {
    let list = agent
        .wait_plugins(&format!("plugins running with their {declared}"), |list| {
            names
                .iter()
                .all(|n| list[n]["status"] == "running" && !list[n][declared].is_null())
        })
        .await;
    assert!(
        sim.wait_until(
            LONG_WAIT,
            |s| crate::reported_plugin(s, device, names[0])["status"] == "running"
        )
        .await,
        "the hub never saw the plugins\n{}",
        agent.log_text()
    );
    list
}

/// Builds a C plugin library with gcc (warnings are errors) against the header in `include`;
/// returns its path in `dir`.
pub fn build_c_plugin(dir: &Path, source: &Path, out: &str, include: &Path) -> PathBuf {
    let target = dir.join(out);
    let status = Command::new("gcc")
        .args([
            "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror", "-pthread", "-I",
        ])
        .arg(include)
        .arg(source)
        .arg("-o")
        .arg(&target)
        .status()
        .expect("gcc runs");
    assert!(status.success(), "gcc failed for {}", source.display());
    target
}

/// Copies a plugin file into `dir/plugins/` (0755 directory, `mode` file), as an operator would
/// install it; returns its path.
pub fn install_plugin(dir: &Path, source: &Path, mode: u32) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::set_permissions(&plugins, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let target = plugins.join(source.file_name().unwrap());
    std::fs::copy(source, &target).unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode)).unwrap();
    target
}

/// A `hubagent run` process of the real binary, with its stderr captured to a file; killed when
/// dropped.
pub struct AgentProcess {
    pub child: std::process::Child,
    pub log: PathBuf,
    pub config: PathBuf,
}

impl AgentProcess {
    pub fn start(config: &Path) -> AgentProcess {
        let mut command = Command::new(hubagent_bin());
        command.args(["--config", config.to_str().unwrap(), "run"]);
        AgentProcess::spawn(command, config, "hubagent")
    }

    /// Spawns `command`, which runs `hubagent --config <config> run` in the end (under a wrapper
    /// or with a changed environment), as [`AgentProcess::start`] does; `what` names it when it
    /// cannot start.
    pub fn spawn(mut command: Command, config: &Path, what: &str) -> AgentProcess {
        let log = config.with_extension(format!(
            "log.{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let file = std::fs::File::create(&log).unwrap();
        let child = command
            .env("RUST_LOG", "hubagent=debug,info")
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        AgentProcess {
            child,
            log,
            config: config.to_path_buf(),
        }
    }

    /// Runs a CLI subcommand against this agent's configuration.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(hubagent_bin())
            .args(["--config", self.config.to_str().unwrap()])
            .args(args)
            .output()
            .unwrap()
    }

    /// `hubagent check --json`: the exit code and the report.
    pub fn check_report(&self) -> (Option<i32>, Value) {
        let out = self.cli(&["check", "--json"]);
        let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "check --json printed no report ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
        (out.status.code(), report)
    }

    /// `hubagent status --json` (null when the agent does not answer).
    pub fn status(&self) -> Value {
        serde_json::from_slice(&self.cli(&["status", "--json"]).stdout).unwrap_or_default()
    }

    /// `hubagent plugins list --json` (null when the agent does not answer).
    pub fn plugins_list(&self) -> Value {
        serde_json::from_slice(&self.cli(&["plugins", "list", "--json"]).stdout).unwrap_or_default()
    }

    /// Polls `hubagent <args>` (a `--json` command) until `cond` holds or `timeout` passes;
    /// returns the last answer and whether it held.
    async fn poll(
        &self,
        args: &[&str],
        timeout: Duration,
        cond: impl Fn(&Value) -> bool,
    ) -> (Value, bool) {
        let deadline = Instant::now() + timeout;
        loop {
            let answer: Value = serde_json::from_slice(&self.cli(args).stdout).unwrap_or_default();
            if cond(&answer) {
                return (answer, true);
            }
            if Instant::now() > deadline {
                return (answer, false);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Polls the status until `cond` holds; fails naming `what` after [`LONG_WAIT`].
    pub async fn wait_status(&self, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
        self.wait_json(&["status", "--json"], what, cond).await
    }

    /// Polls `hubagent plugins list` until `cond` holds; fails naming `what` after
    /// [`LONG_WAIT`].
    pub async fn wait_plugins(&self, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
        self.wait_json(&["plugins", "list", "--json"], what, cond)
            .await
    }

    async fn wait_json(&self, args: &[&str], what: &str, cond: impl Fn(&Value) -> bool) -> Value {
        let (answer, held) = self.poll(args, LONG_WAIT, cond).await;
        assert!(
            held,
            "{what}: not reached; hubagent {}: {answer}\n--- agent log ---\n{}",
            args.join(" "),
            self.log_text()
        );
        answer
    }

    /// Waits for a line of the log that contains `text`; fails after [`LONG_WAIT`].
    pub async fn wait_log(&self, text: &str) {
        self.wait_log_line(&format!("no log line with {text:?}"), |l| l.contains(text))
            .await
    }

    /// Waits until a line of the log satisfies `line`; fails naming `what` after [`LONG_WAIT`].
    pub async fn wait_log_line(&self, what: &str, line: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + LONG_WAIT;
        while !self.log_text().lines().any(&line) {
            assert!(
                Instant::now() < deadline,
                "{what}\n--- agent log ---\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// SIGTERM, then the exit code.
    pub fn stop(mut self) -> Option<i32> {
        self.signal("TERM");
        let code = self.child.wait().unwrap().code();
        std::mem::forget(self);
        code
    }

    /// SIGKILL: the agent gets no chance to flush anything.
    pub fn kill_9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The entry `id` of a `hubagent check --json` report (panics naming it when absent).
pub fn check_entry(report: &Value, id: &str) -> Value {
    report["checks"]
        .as_array()
        .and_then(|checks| checks.iter().find(|c| c["id"] == id))
        .cloned()
        .unwrap_or_else(|| panic!("no {id} check: {report}"))
}
