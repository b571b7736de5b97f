//! Shared helpers for the integration tests: a hubsim on loopback with enrollments, and files an
//! agent configuration points at.

use std::path::{Path, PathBuf};

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
