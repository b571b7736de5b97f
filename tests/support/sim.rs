//! A hubsim on loopback, its enrollments and devices, and what it recorded about registrations,
//! connections and reported properties.

use std::path::{Path, PathBuf};

use hubsim::Sim;
use hubsim::state::{
    Attestation, CertificatePair, CertificateRef, ConnectionEvent, Device, DeviceAuthentication,
    EnrollmentCommon, EnrollmentGroup, IndividualEnrollment, RegistrationEvent, Status, Store,
    SymmetricKeyPair, TpmAttestation, X509Attestation, random_key,
};
use serde_json::Value;

/// hubsim's options for a test: loopback, free ports, state in `dir/hubsim`; DPS on `localhost`
/// and the hub on another host (`hubsim::DEFAULT_HUB`), TLS as Azure serves it.
pub fn sim_options(dir: &Path) -> hubsim::Options {
    hubsim::Options::ephemeral(dir.join("hubsim"))
}

/// A hubsim with [`sim_options`].
pub async fn start_sim(dir: &Path) -> hubsim::Running {
    hubsim::start(sim_options(dir))
        .await
        .expect("hubsim starts")
}

/// A fresh pair of random symmetric keys.
pub fn key_pair() -> SymmetricKeyPair {
    SymmetricKeyPair {
        primary_key: random_key(),
        secondary_key: random_key(),
    }
}

/// A DPS enrollment as a test writes it: an attestation with the service's defaults (enabled,
/// hashed allocation over every linked hub, reprovisioning that moves the device and its data);
/// [`Enrollment::with`] changes the rest. Stored with [`Enrollment::individual`] or
/// [`Enrollment::group`].
#[derive(Debug, Clone)]
pub struct Enrollment {
    pub common: EnrollmentCommon,
    /// An individual enrollment's `deviceId` (None: the registration id).
    pub device_id: Option<String>,
}

impl Enrollment {
    pub fn new(attestation: Attestation) -> Enrollment {
        Enrollment {
            common: EnrollmentCommon {
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
                certificate_issuance: None,
            },
            device_id: None,
        }
    }

    pub fn symmetric_key(keys: &SymmetricKeyPair) -> Enrollment {
        Enrollment::new(Attestation::SymmetricKey {
            symmetric_key: keys.clone(),
        })
    }

    /// An individual X.509 enrollment of this device certificate (PEM).
    pub fn x509_device(certificate_pem: String) -> Enrollment {
        Enrollment::new(Attestation::X509 {
            x509: X509Attestation {
                client_certificates: certificate_pair(certificate_pem),
                signing_certificates: None,
            },
        })
    }

    /// An X.509 enrollment group of the devices whose chain leads to this CA certificate (PEM).
    pub fn x509_ca(ca_pem: String) -> Enrollment {
        Enrollment::new(Attestation::X509 {
            x509: X509Attestation {
                client_certificates: None,
                signing_certificates: certificate_pair(ca_pem),
            },
        })
    }

    /// A TPM enrollment of this endorsement key (base64 TPM2B_PUBLIC).
    pub fn tpm(endorsement_key: String) -> Enrollment {
        Enrollment::new(Attestation::Tpm {
            tpm: TpmAttestation {
                endorsement_key,
                storage_root_key: None,
            },
        })
    }

    pub fn device_id(mut self, device_id: &str) -> Enrollment {
        self.device_id = Some(device_id.into());
        self
    }

    /// Changes any other field (status, allocation, hubs, initial twin, reprovision policy).
    pub fn with(mut self, change: impl FnOnce(&mut EnrollmentCommon)) -> Enrollment {
        change(&mut self.common);
        self
    }

    /// Stores it as the individual enrollment of `registration_id` (keyed in lower case, as
    /// hubsim's management API keys it).
    pub fn individual(self, sim: &Sim, registration_id: &str) {
        let enrollment = IndividualEnrollment {
            registration_id: registration_id.into(),
            device_id: self.device_id,
            common: self.common,
        };
        sim.mutate(|s| {
            s.enrollments
                .insert(registration_id.to_ascii_lowercase(), enrollment)
        })
        .unwrap();
    }

    /// Stores it as the enrollment group `group_id`.
    pub fn group(self, sim: &Sim, group_id: &str) {
        let group = EnrollmentGroup {
            enrollment_group_id: group_id.into(),
            common: self.common,
        };
        sim.mutate(|s| s.groups.insert(group_id.into(), group))
            .unwrap();
    }
}

fn certificate_pair(pem: String) -> Option<CertificatePair> {
    Some(CertificatePair {
        primary: Some(CertificateRef {
            certificate: Some(pem),
            info: None,
        }),
        secondary: None,
    })
}

/// The first certificate of a PEM file (a device's own, without the chain behind it).
pub fn first_pem(path: &Path) -> String {
    const END: &str = "-----END CERTIFICATE-----";
    let text = std::fs::read_to_string(path).unwrap();
    let end = text.find(END).unwrap() + END.len();
    text[..end].to_string() + "\n"
}

/// An individual symmetric-key enrollment; returns its primary key.
pub fn enroll(sim: &Sim, registration_id: &str) -> String {
    let keys = key_pair();
    Enrollment::symmetric_key(&keys).individual(sim, registration_id);
    keys.primary_key
}

/// A symmetric-key enrollment group; returns the group's primary key.
pub fn enroll_group(sim: &Sim, group_id: &str) -> String {
    let keys = key_pair();
    Enrollment::symmetric_key(&keys).group(sim, group_id);
    keys.primary_key
}

/// An individual X.509 enrollment for a fresh self-signed device certificate with CN =
/// `registration_id`; returns the paths of its `cert.pem` (chain) and `key.pem`.
pub fn enroll_x509(sim: &Sim, registration_id: &str, dir: &Path) -> (PathBuf, PathBuf) {
    let issued = hubsim::pki::issue(
        hubsim::pki::CertKind::Device,
        registration_id,
        &dir.join(registration_id),
        None,
    )
    .expect("device certificate");
    let chain = std::fs::read_to_string(&issued.cert_path).unwrap();
    Enrollment::x509_device(chain).individual(sim, registration_id);
    (issued.cert_path, issued.key_path)
}

/// A hub device with a SAS key in the first linked hub, made directly (no DPS); returns its
/// primary key.
pub fn add_device(sim: &Sim, device_id: &str) -> String {
    let keys = key_pair();
    let primary = keys.primary_key.clone();
    let hub = sim.config.hubs[0].clone();
    let device = Device {
        device_id: device_id.into(),
        hub: hub.clone(),
        authentication: DeviceAuthentication {
            kind: "sas".into(),
            symmetric_key: Some(keys),
            x509_thumbprint: None,
        },
        status: Status::Enabled,
        generation_id: "1".into(),
        etag: "1".into(),
        twin: Default::default(),
        ca_group: None,
        model_id: None,
    };
    sim.mutate(|s| s.devices.insert(Store::device_key(&hub, device_id), device))
        .unwrap();
    primary
}

/// Every DPS request hubsim answered, in order.
pub fn registration_events(sim: &Sim) -> Vec<RegistrationEvent> {
    sim.records.lock().unwrap().registrations.clone()
}

/// The successful DPS registrations of `registration_id`, oldest first.
pub fn assigned_registrations(sim: &Sim, registration_id: &str) -> Vec<RegistrationEvent> {
    registration_events(sim)
        .into_iter()
        .filter(|r| r.registration_id == registration_id && r.outcome == "assigned")
        .collect()
}

/// How many times `registration_id` was assigned by DPS.
pub fn registrations(sim: &Sim, registration_id: &str) -> usize {
    assigned_registrations(sim, registration_id).len()
}

/// Every DPS answer that carried a `retry-after` to `registration_id`, with how long the device
/// then waited before its next request, as hubsim saw it (request arrivals, in order):
/// `(asked, waited)`.
pub fn retry_after_waits(
    sim: &Sim,
    registration_id: &str,
) -> Vec<(std::time::Duration, std::time::Duration)> {
    let mut requests: Vec<(u64, Option<u64>)> = Vec::new();
    for event in registration_events(sim)
        .into_iter()
        .filter(|e| e.registration_id.eq_ignore_ascii_case(registration_id))
    {
        requests.push((event.time_ms, event.retry_after));
        requests.extend(event.polls.iter().map(|p| (p.time_ms, p.retry_after)));
    }
    requests.sort_by_key(|(time, _)| *time);
    requests
        .windows(2)
        .filter_map(|pair| {
            let asked = pair[0].1?;
            Some((
                std::time::Duration::from_secs(asked),
                std::time::Duration::from_millis(pair[1].0 - pair[0].0),
            ))
        })
        .collect()
}

/// How much later than asked a device may send its next DPS request: its own scheduling, the
/// answer's way to it and the request's way back, on loopback.
pub const RETRY_AFTER_SLACK: std::time::Duration = std::time::Duration::from_secs(1);

/// Asserts that `registration_id` waited what DPS asked after each of at least `expected`
/// answers carrying `retry-after`: never less, and at most [`RETRY_AFTER_SLACK`] more.
pub fn assert_retry_after_honoured(sim: &Sim, registration_id: &str, expected: usize) {
    let waits = retry_after_waits(sim, registration_id);
    assert!(
        waits.len() >= expected,
        "{registration_id}: {} answers with retry-after followed by a request, expected {expected}: {waits:?}",
        waits.len()
    );
    for (asked, waited) in &waits {
        assert!(
            waited >= asked && *waited <= *asked + RETRY_AFTER_SLACK,
            "{registration_id}: DPS asked for {asked:?} and the device waited {waited:?} (all: {waits:?})"
        );
    }
}

/// The outcome of every DPS request hubsim answered (`assigned`, `throttled`, ...), in order.
pub fn registration_outcomes(sim: &Sim) -> Vec<String> {
    registration_events(sim)
        .into_iter()
        .map(|r| r.outcome)
        .collect()
}

/// What happened to the connections of `client_id` (to DPS or the hub), in order: `connected`,
/// `refused`, `disconnected` with its reason.
pub fn connection_events(sim: &Sim, client_id: &str) -> Vec<ConnectionEvent> {
    sim.records
        .lock()
        .unwrap()
        .connections
        .iter()
        .filter(|e| e.client_id == client_id)
        .cloned()
        .collect()
}

/// How many hub connections `client_id` has made.
pub fn hub_connects(sim: &Sim, client_id: &str) -> usize {
    connection_events(sim, client_id)
        .iter()
        .filter(|e| e.service == "hub" && e.event == "connected")
        .count()
}

/// How many connections of `client_id` (to DPS or the hub) hubsim refused.
pub fn refused_connections(sim: &Sim, client_id: &str) -> usize {
    connection_events(sim, client_id)
        .iter()
        .filter(|e| e.event == "refused")
        .count()
}

/// The key of `device_id` in the first linked hub (`hubsim::DEFAULT_HUB` for [`start_sim`]),
/// as `Store::devices` is keyed.
pub fn device_key(sim: &Sim, device_id: &str) -> String {
    Store::device_key(&sim.config.hubs[0], device_id)
}

/// `reported.<key>` of a device in the first linked hub (null when absent).
pub fn reported(sim: &Sim, device_id: &str, key: &str) -> Value {
    sim.read(|s| {
        s.devices
            .get(&device_key(sim, device_id))
            .and_then(|d| d.twin.reported.get(key))
            .cloned()
            .unwrap_or(Value::Null)
    })
}

/// `reported.plugins.<name>` of a device (null when absent).
pub fn reported_plugin(sim: &Sim, device_id: &str, name: &str) -> Value {
    reported(sim, device_id, "plugins")
        .get(name)
        .cloned()
        .unwrap_or(Value::Null)
}

/// Sets `desired.plugins.<plugin>` to `settings` through the hub and waits until the agent
/// reports that desired version for the plugin: the version, or None when the agent does not
/// report it within [`crate::WAIT`].
pub async fn plugin_settings_followed(
    sim: &Sim,
    device_id: &str,
    plugin: &str,
    settings: Value,
) -> Option<u64> {
    let patch = serde_json::json!({ "plugins": { plugin: settings } });
    let version = hubsim::twin::apply_desired_patch(sim, &device_key(sim, device_id), &patch)
        .expect("the desired patch is refused");
    sim.wait_until(crate::WAIT, |s| {
        reported_plugin(s, device_id, plugin)["desiredVersion"] == version
    })
    .await
    .then_some(version)
}

/// Twin patches on both sides of each of IoT Hub's limits on keys, values and nesting
/// (docs/hubsim.md, "Twin limits"): `(what it probes, patch, whether the hub accepts it)`.
pub fn twin_limit_cases() -> Vec<(&'static str, Value, bool)> {
    use serde_json::json;
    let nested = |levels: usize| {
        let mut v = json!("leaf");
        for _ in 0..levels {
            v = json!({"d": v});
        }
        v
    };
    let arrays = |levels: usize| {
        let mut v = json!(1);
        for _ in 0..levels {
            v = json!([v]);
        }
        v
    };
    let max_int: i64 = 4_503_599_627_370_495;
    let min_int: i64 = -4_503_599_627_370_496;
    let key_1k = "k".repeat(1024);
    let key_over = "k".repeat(1025);
    vec![
        ("key of 1024 bytes", json!({key_1k: 1}), true),
        ("key of 1025 bytes", json!({key_over: 1}), false),
        (
            "nested key of 1025 bytes",
            json!({"a": {"k".repeat(1025): 1}}),
            false,
        ),
        (
            "key with a C0 control character",
            json!({"a\u{1}b": 1}),
            false,
        ),
        (
            "key with a C1 control character",
            json!({"a\u{85}b": 1}),
            false,
        ),
        ("key with '.'", json!({"a.b": 1}), false),
        ("key with '$'", json!({"a$b": 1}), false),
        ("key with ' '", json!({"a b": 1}), false),
        ("key with other punctuation", json!({"a-b_c:d#e": 1}), true),
        ("string of 4096 bytes", json!({"s": "x".repeat(4096)}), true),
        (
            "string of 4097 bytes",
            json!({"s": "x".repeat(4097)}),
            false,
        ),
        (
            "string of 4098 bytes in 2-byte characters",
            json!({"s": "é".repeat(2049)}),
            false,
        ),
        (
            "nested string of 4097 bytes",
            json!({"a": {"s": "x".repeat(4097)}}),
            false,
        ),
        ("largest integer", json!({"i": max_int}), true),
        ("smallest integer", json!({"i": min_int}), true),
        ("integer above the range", json!({"i": max_int + 1}), false),
        ("integer below the range", json!({"i": min_int - 1}), false),
        ("u64 integer", json!({"i": u64::MAX}), false),
        (
            "float beyond the integer range",
            json!({"f": 1.0e300}),
            true,
        ),
        ("objects 10 levels deep", json!({"top": nested(10)}), true),
        ("objects 11 levels deep", json!({"top": nested(11)}), false),
        ("arrays 10 levels deep", json!({"top": arrays(10)}), true),
        ("arrays 11 levels deep", json!({"top": arrays(11)}), false),
        ("null in an array", json!({"a": [1, null]}), false),
        ("null removing a key", json!({"gone": null}), true),
        // 8 × (2-character key + 4094-character string) = 32768 as the hub counts.
        ("section of 32768 bytes", section_of(0), true),
        ("section of 32769 bytes", section_of(1), false),
    ]
}

fn section_of(extra: usize) -> Value {
    let mut map = serde_json::Map::new();
    for i in 0..8 {
        let len = if i == 0 { 4094 + extra } else { 4094 };
        map.insert(format!("s{i}"), Value::String("x".repeat(len)));
    }
    Value::Object(map)
}
