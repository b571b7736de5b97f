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
