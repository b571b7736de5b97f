//! Shared helpers for the integration tests: a hubsim on loopback with enrollments, and files an
//! agent configuration points at.

use std::path::{Path, PathBuf};

pub mod swtpm;

use hubsim::state::{
    Attestation, EnrollmentCommon, EnrollmentGroup, IndividualEnrollment, Status, SymmetricKeyPair,
};

pub async fn start_sim(dir: &Path) -> hubsim::Running {
    hubsim::start(hubsim::Options::ephemeral(dir.join("hubsim")))
        .await
        .expect("hubsim starts")
}

fn common(attestation: Attestation) -> EnrollmentCommon {
    EnrollmentCommon {
        attestation,
        iot_hub_host_name: None,
        iot_hubs: None,
        allocation_policy: Default::default(),
        provisioning_status: Status::Enabled,
        reprovision_policy: Default::default(),
        initial_twin: None,
        etag: None,
        created_date_time_utc: None,
        last_updated_date_time_utc: None,
    }
}

fn key_pair() -> SymmetricKeyPair {
    SymmetricKeyPair {
        primary_key: hubsim::state::random_key(),
        secondary_key: hubsim::state::random_key(),
    }
}

/// An individual symmetric-key enrollment; returns its primary key.
pub fn enroll(sim: &hubsim::Sim, registration_id: &str) -> String {
    let keys = key_pair();
    let primary = keys.primary_key.clone();
    let enrollment = IndividualEnrollment {
        registration_id: registration_id.into(),
        device_id: None,
        common: common(Attestation::SymmetricKey {
            symmetric_key: keys,
        }),
    };
    sim.mutate(|s| {
        s.enrollments
            .insert(registration_id.to_ascii_lowercase(), enrollment)
    })
    .unwrap();
    primary
}

/// A symmetric-key enrollment group; returns the group's primary key.
pub fn enroll_group(sim: &hubsim::Sim, group_id: &str) -> String {
    let keys = key_pair();
    let primary = keys.primary_key.clone();
    let group = EnrollmentGroup {
        enrollment_group_id: group_id.into(),
        common: common(Attestation::SymmetricKey {
            symmetric_key: keys,
        }),
    };
    sim.mutate(|s| s.groups.insert(group_id.into(), group))
        .unwrap();
    primary
}

/// Writes a key file with owner-only permissions.
pub fn write_key(dir: &Path, name: &str, key: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("{key}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// A complete agent configuration for a DPS symmetric-key registration against `running`.
pub fn agent_config(
    dir: &Path,
    running: &hubsim::Running,
    registration_id: &str,
    key_line: &str,
) -> PathBuf {
    let scope = running.sim.read(|s| s.id_scope.clone());
    let text = format!(
        r#"[agent]
state_dir = "{state}"
control_socket = "{socket}"
log_format = "text"

[provisioning]
source = "dps"
global_endpoint = "localhost"
id_scope = "{scope}"
registration_id = "{registration_id}"

[provisioning.attestation]
method = "symmetric_key"
{key_line}

[hub]
port = {port}
trust_bundle = "{ca}"
"#,
        state = dir.join("state").display(),
        socket = dir.join("control.sock").display(),
        port = running.mqtt_addr.port(),
        ca = running.ca_pem_path.display(),
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A `hubagent run` process of the real binary, with its stderr captured to a file.
pub struct AgentProcess {
    pub child: std::process::Child,
    pub log: PathBuf,
    pub config: PathBuf,
}

pub fn hubagent_bin() -> PathBuf {
    // Integration tests live in another package: find the binary beside the test executable.
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let bin = dir.join("hubagent");
    assert!(
        bin.exists(),
        "{} missing: build the workspace first",
        bin.display()
    );
    bin
}

impl AgentProcess {
    pub fn start(config: &Path) -> AgentProcess {
        let log = config.with_extension(format!(
            "log.{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let file = std::fs::File::create(&log).unwrap();
        let child = std::process::Command::new(hubagent_bin())
            .args(["--config", config.to_str().unwrap(), "run"])
            .env("RUST_LOG", "hubagent=debug,info")
            .env_remove("NOTIFY_SOCKET")
            .stdout(std::process::Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        AgentProcess {
            child,
            log,
            config: config.to_path_buf(),
        }
    }

    /// Runs a CLI subcommand against this agent's configuration.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(hubagent_bin())
            .args(["--config", self.config.to_str().unwrap()])
            .args(args)
            .output()
            .unwrap()
    }

    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
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

/// How many hub connections `client_id` has made.
pub fn hub_connects(sim: &hubsim::Sim, client_id: &str) -> usize {
    sim.records
        .lock()
        .unwrap()
        .connections
        .iter()
        .filter(|e| e.client_id == client_id && e.service == "hub" && e.event == "connected")
        .count()
}

/// Successful DPS registrations of `registration_id`.
pub fn registrations(sim: &hubsim::Sim, registration_id: &str) -> usize {
    sim.records
        .lock()
        .unwrap()
        .registrations
        .iter()
        .filter(|r| r.registration_id == registration_id && r.outcome == "assigned")
        .count()
}

pub fn telemetry_count(sim: &hubsim::Sim, device_id: &str) -> usize {
    sim.records
        .lock()
        .unwrap()
        .telemetry
        .get(device_id)
        .map(Vec::len)
        .unwrap_or(0)
}

/// A shared library built by this workspace (`target/<profile>/lib<name>.so`).
pub fn built_library(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join(format!("lib{name}.so"));
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

/// An enrolled agent configuration with `plugins` (TOML `[[plugin]]` tables) appended. With
/// `allow_unsafe`, `[agent] allow_unsafe_plugin_paths = true` (honoured only when not root).
pub fn plugin_agent_config(
    dir: &Path,
    running: &hubsim::Running,
    registration_id: &str,
    plugins: &str,
    allow_unsafe: bool,
) -> PathBuf {
    let key = enroll(&running.sim, registration_id);
    let key_file = write_key(dir, "device.key", &key);
    let config = agent_config(
        dir,
        running,
        registration_id,
        &format!("key = {{ file = \"{}\" }}", key_file.display()),
    );
    let mut text = std::fs::read_to_string(&config).unwrap();
    if allow_unsafe {
        text = text.replace(
            "log_format = \"text\"",
            "log_format = \"text\"\nallow_unsafe_plugin_paths = true",
        );
    }
    text.push('\n');
    text.push_str(plugins);
    std::fs::write(&config, text).unwrap();
    config
}

/// `reported.plugins.<name>` of a device in hubsim.
pub fn reported_plugin(sim: &hubsim::Sim, device_id: &str, name: &str) -> serde_json::Value {
    sim.read(|s| {
        s.devices
            .get(&format!("localhost/{device_id}"))
            .and_then(|d| d.twin.reported.get("plugins"))
            .and_then(|p| p.get(name))
            .cloned()
            .unwrap_or(serde_json::Value::Null)
    })
}

/// The JSON bodies of the telemetry a plugin (`source` property) sent.
pub fn bodies_from(sim: &hubsim::Sim, device_id: &str, source: &str) -> Vec<serde_json::Value> {
    sim.records
        .lock()
        .unwrap()
        .telemetry
        .get(device_id)
        .map(|records| {
            records
                .iter()
                .filter(|r| r.properties.get("source").map(String::as_str) == Some(source))
                .filter_map(|r| serde_json::from_str(r.body.as_deref()?).ok())
                .collect()
        })
        .unwrap_or_default()
}
