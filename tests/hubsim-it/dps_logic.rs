//! DPS logic without a transport: enrollment matching, allocation, the hub device it creates, the
//! JSON the real service answers with, and the IoT Hub CONNECT check on the result.

use hubagent_tests::{
    Enrollment, first_pem, in_an_hour, key_pair, registration_events, registration_outcomes,
    sas_token,
};
use hubsim::Sim;
use hubsim::auth::authenticate_hub_device;
use hubsim::dps::{self, DeviceCredential, DpsResponse};
use hubsim::pki::{CertKind, IssuedCert, issue};
use hubsim::state::{
    AllocationPolicy, SimConfig, SlowAssignment, Status, Store, SymmetricKeyPair,
    ThrottledRequests, random_key,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde_json::{Value, json};

const SCOPE: &str = "0ne00000001";

fn open_sim(dir: &std::path::Path, hubs: &[&str]) -> Sim {
    Sim::open(
        SimConfig {
            state_dir: dir.to_path_buf(),
            hubs: hubs.iter().map(|h| h.to_string()).collect(),
            retry_after_secs: 3,
            mqtt_port: 0,
            https_port: 0,
            extra_id_scopes: vec![],
        },
        SCOPE,
    )
    .unwrap()
}

fn dps_sas(key: &str, registration_id: &str) -> DeviceCredential {
    DeviceCredential::Sas(sas_token(
        key,
        &format!("{SCOPE}/registrations/{registration_id}"),
        in_an_hour(),
        Some("registration"),
    ))
}

fn hub_sas(key: &str, hub: &str, device_id: &str) -> DeviceCredential {
    DeviceCredential::Sas(sas_token(
        key,
        &format!("{hub}/devices/{device_id}"),
        in_an_hour(),
        None,
    ))
}

fn body(registration_id: &str) -> Vec<u8> {
    // Byte-exact what Azure's Python SDK sends.
    format!(r#"{{"payload": null, "registrationId": "{registration_id}"}}"#).into_bytes()
}

/// Registers and polls once, as a device does; returns the final operation status body.
fn provision(sim: &Sim, registration_id: &str, cred: &DeviceCredential) -> Value {
    let accepted = dps::register(
        sim,
        SCOPE,
        registration_id,
        cred,
        &body(registration_id),
        "mqtt",
    );
    assert_eq!(accepted.status, 202, "{}", accepted.body);
    poll(sim, registration_id, &accepted)
}

fn poll(sim: &Sim, registration_id: &str, accepted: &DpsResponse) -> Value {
    let operation_id = accepted.body["operationId"].as_str().unwrap();
    let done = dps::operation_status(sim, SCOPE, registration_id, operation_id);
    assert_eq!(done.status, 200, "{}", done.body);
    assert_eq!(done.body["operationId"], operation_id);
    done.body
}

fn chain_of(cert: &IssuedCert) -> Vec<Vec<u8>> {
    CertificateDer::pem_file_iter(&cert.cert_path)
        .unwrap()
        .map(|c| c.unwrap().to_vec())
        .collect()
}

#[test]
fn individual_symmetric_key_enrollment_is_assigned_with_the_real_json() {
    let dir = tempfile::tempdir().unwrap();
    let sim = open_sim(dir.path(), &["hub-a.example.net"]);
    let keys = key_pair();
    Enrollment::symmetric_key(&keys).individual(&sim, "Dev-01");

    // Registration ids are case-insensitive: the device may spell it differently.
    let cred = dps_sas(&keys.primary_key, "dev-01");
    dps::authenticate(&sim, SCOPE, "dev-01", &cred).unwrap();
    let accepted = dps::register(&sim, SCOPE, "dev-01", &cred, &body("dev-01"), "mqtt");
    assert_eq!(accepted.status, 202);
    assert_eq!(accepted.retry_after, Some(3));
    assert_eq!(accepted.body["status"], "assigning");
    let operation_id = accepted.body["operationId"].as_str().unwrap().to_string();
    let parts: Vec<&str> = operation_id.split('.').collect();
    assert_eq!(parts.len(), 3, "{operation_id}");
    assert_eq!(parts[0], "4");
    assert!(uuid::Uuid::parse_str(parts[2]).is_ok(), "{operation_id}");
    assert_eq!(
        accepted.body.as_object().unwrap().len(),
        2,
        "{}",
        accepted.body
    );

    let done = poll(&sim, "dev-01", &accepted);
    assert_eq!(done["status"], "assigned");
    let state = &done["registrationState"];
    assert_eq!(state["registrationId"], "dev-01");
    assert_eq!(state["assignedHub"], "hub-a.example.net");
    assert_eq!(state["deviceId"], "dev-01");
    assert_eq!(state["status"], "assigned");
    assert_eq!(state["substatus"], "initialAssignment");
    for field in ["createdDateTimeUtc", "lastUpdatedDateTimeUtc", "etag"] {
        assert!(
            state[field].as_str().is_some_and(|s| !s.is_empty()),
            "{field}: {state}"
        );
    }
    assert!(state.get("payload").is_none(), "{state}");
    assert!(state.get("x509").is_none() && state.get("symmetricKey").is_none());

    // The hub device exists with the enrollment's keys, and the registration is stored.
    let (device, registration) = sim.read(|s| {
        (
            s.devices
                .get(&Store::device_key("hub-a.example.net", "dev-01"))
                .cloned(),
            s.registrations.get("dev-01").cloned(),
        )
    });
    let device = device.expect("hub device created");
    assert_eq!(device.authentication.kind, "sas");
    assert_eq!(device.authentication.symmetric_key.as_ref(), Some(&keys));
    assert_eq!(&registration.unwrap().state, state);
    let events = registration_events(&sim);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].outcome, "assigned");
    assert_eq!(events[0].assigned_hub.as_deref(), Some("hub-a.example.net"));
    assert_eq!(events[0].transport, "mqtt");
    assert_eq!(events[0].attestation, "symmetricKey");

    // The state file has it too (a restart keeps the assignment).
    drop(sim);
    let sim = open_sim(dir.path(), &["hub-a.example.net"]);
    assert!(sim.read(|s| s.registrations.contains_key("dev-01")));

    // The device connects to its hub with either enrollment key; the host is case-insensitive.
    let now = hubsim::auth::unix_now();
    for key in [&keys.primary_key, &keys.secondary_key] {
        let expiry = authenticate_hub_device(
            &sim,
            "hub-a.example.net",
            "dev-01",
            &hub_sas(key, "HUB-A.example.net", "dev-01"),
            now,
        )
        .unwrap()
        .expect("SAS connections carry the token expiry");
        assert!(expiry > now && expiry <= in_an_hour(), "{expiry}");
    }
    // The secondary enrollment key registers as well.
    let again = provision(&sim, "dev-01", &dps_sas(&keys.secondary_key, "dev-01"));
    assert_eq!(
        again["registrationState"]["assignedHub"],
        "hub-a.example.net"
    );
    assert_eq!(
        again["registrationState"]["createdDateTimeUtc"], state["createdDateTimeUtc"],
        "re-registration keeps the creation time"
    );
}

#[test]
fn operation_status_of_an_unknown_or_foreign_operation_is_404() {
    let dir = tempfile::tempdir().unwrap();
    let sim = open_sim(dir.path(), &["localhost"]);
    let keys = key_pair();
    Enrollment::symmetric_key(&keys).individual(&sim, "dev-02");
    let accepted = dps::register(
        &sim,
        SCOPE,
        "dev-02",
        &dps_sas(&keys.primary_key, "dev-02"),
        &body("dev-02"),
        "https",
    );
    let op = accepted.body["operationId"].as_str().unwrap();
    for (registration_id, operation_id) in [("dev-02", "4.0.nope"), ("someone-else", op)] {
        let answer = dps::operation_status(&sim, SCOPE, registration_id, operation_id);
        assert_eq!(answer.status, 404);
        assert_eq!(answer.body["errorCode"].as_u64().unwrap() / 1000, 404);
        for field in ["trackingId", "message", "timestampUtc"] {
            assert!(answer.body[field].is_string(), "{field}: {}", answer.body);
        }
    }
}

#[test]
fn group_members_use_the_derived_key_never_the_group_key() {
    let dir = tempfile::tempdir().unwrap();
    let sim = open_sim(dir.path(), &["localhost"]);
    let group_keys = key_pair();
    Enrollment::symmetric_key(&group_keys)
        .with(|c| {
            c.initial_twin = Some(json!({
                "tags": {"site": "plant-7"},
                "properties": {"desired": {"interval": 30}}
            }))
        })
        .group(&sim, "line-3");

    let derive = |k: &str| hubsim::auth::derive_device_key(k, "sensor-17").unwrap();
    let derived = SymmetricKeyPair {
        primary_key: derive(&group_keys.primary_key),
        secondary_key: derive(&group_keys.secondary_key),
    };
    // The group key itself is refused.
    let err = dps::authenticate(
        &sim,
        SCOPE,
        "sensor-17",
        &dps_sas(&group_keys.primary_key, "sensor-17"),
    )
    .unwrap_err();
    assert!(err.contains("sensor-17"), "{err}");
    let refused = dps::register(
        &sim,
        SCOPE,
        "sensor-17",
        &dps_sas(&group_keys.primary_key, "sensor-17"),
        &body("sensor-17"),
        "mqtt",
    );
    assert_eq!(refused.status, 401);

    // A key derived for another registration id is refused too.
    let other = hubsim::auth::derive_device_key(&group_keys.primary_key, "sensor-18").unwrap();
    assert!(dps::authenticate(&sim, SCOPE, "sensor-17", &dps_sas(&other, "sensor-17")).is_err());

    for key in [&derived.primary_key, &derived.secondary_key] {
        dps::authenticate(&sim, SCOPE, "sensor-17", &dps_sas(key, "sensor-17")).unwrap();
    }
    let done = provision(
        &sim,
        "sensor-17",
        &dps_sas(&derived.secondary_key, "sensor-17"),
    );
    let state = &done["registrationState"];
    assert_eq!(state["deviceId"], "sensor-17");
    assert_eq!(state["symmetricKey"]["enrollmentGroupId"], "line-3");

    let device = sim
        .read(|s| {
            s.devices
                .get(&Store::device_key("localhost", "sensor-17"))
                .cloned()
        })
        .unwrap();
    assert_eq!(device.authentication.symmetric_key.as_ref(), Some(&derived));
    assert_eq!(device.twin.tags["site"], "plant-7");
    assert_eq!(device.twin.desired["interval"], 30);
    assert_eq!(device.twin.desired_version, 1);

    let now = hubsim::auth::unix_now();
    authenticate_hub_device(
        &sim,
        "localhost",
        "sensor-17",
        &hub_sas(&derived.primary_key, "localhost", "sensor-17"),
        now,
    )
    .unwrap();
    let err = authenticate_hub_device(
        &sim,
        "localhost",
        "sensor-17",
        &hub_sas(&group_keys.primary_key, "localhost", "sensor-17"),
        now,
    )
    .unwrap_err();
    assert!(err.contains("signature"), "{err}");
}

#[test]
fn wrong_keys_unknown_ids_and_bad_bodies_are_refused_with_the_service_codes() {
    let dir = tempfile::tempdir().unwrap();
    let sim = open_sim(dir.path(), &["localhost"]);
    let keys = key_pair();
    Enrollment::symmetric_key(&keys).individual(&sim, "dev-03");
    let wrong = dps_sas(&random_key(), "dev-03");

    assert!(dps::authenticate(&sim, SCOPE, "dev-03", &wrong).is_err());
    assert!(dps::authenticate(&sim, SCOPE, "dev-03", &DeviceCredential::None).is_err());
    // Right key, token for another registration.
    let err = dps::authenticate(&sim, SCOPE, "dev-03", &dps_sas(&keys.primary_key, "dev-04"))
        .unwrap_err();
    assert!(
        !err.contains(&keys.primary_key),
        "no secrets in errors: {err}"
    );
    // Another ID scope.
    assert!(
        dps::authenticate(
            &sim,
            "0ne99999999",
            "dev-03",
            &dps_sas(&keys.primary_key, "dev-03")
        )
        .is_err()
    );
    // No enrollment at all.
    let unknown = dps::register(
        &sim,
        SCOPE,
        "nobody",
        &dps_sas(&keys.primary_key, "nobody"),
        &body("nobody"),
        "mqtt",
    );
    assert_eq!(unknown.status, 401);

    let refused = dps::register(&sim, SCOPE, "dev-03", &wrong, &body("dev-03"), "mqtt");
    assert_eq!(refused.status, 401);
    assert_eq!(refused.body["errorCode"], 401002);
    assert!(refused.retry_after.is_none());

    let good = dps_sas(&keys.primary_key, "dev-03");
    for (payload, needle) in [
        (&b"{not json"[..], "not valid JSON"),
        (&b"[1,2]"[..], "JSON object"),
        (&br#"{"payload": {}}"#[..], "registrationId"),
        (&br#"{"registrationId": "dev-99"}"#[..], "dev-99"),
    ] {
        let answer = dps::register(&sim, SCOPE, "dev-03", &good, payload, "mqtt");
        assert_eq!(answer.status, 400, "{}", answer.body);
        assert_eq!(answer.body["errorCode"], 400004);
        let message = answer.body["message"].as_str().unwrap();
        assert!(message.contains(needle), "{message}");
    }
    assert!(sim.read(|s| s.devices.is_empty() && s.registrations.is_empty()));
    assert_eq!(
        registration_outcomes(&sim),
        [
            "unauthorized",
            "unauthorized",
            "bad-request",
            "bad-request",
            "bad-request",
            "bad-request"
        ]
    );
}

#[test]
fn a_disabled_enrollment_answers_disabled_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let sim = open_sim(dir.path(), &["localhost"]);
    let keys = key_pair();
    Enrollment::symmetric_key(&keys)
        .with(|c| c.provisioning_status = Status::Disabled)
        .individual(&sim, "dev-05");
    // As DPS does (docs/protocol.md §1.5): the device learns it from the operation status.
    let done = provision(&sim, "dev-05", &dps_sas(&keys.primary_key, "dev-05"));
    assert_eq!(done["status"], "disabled");
    // DeviceRegistrationResult with status "disabled": no hub, no device, no errorCode
    // (docs/hubsim.md, "DPS error answers").
    let state = &done["registrationState"];
    assert_eq!(state["registrationId"], "dev-05");
    assert_eq!(state["status"], "disabled");
    for absent in ["assignedHub", "deviceId", "errorCode"] {
        assert!(state.get(absent).is_none(), "{absent} in {state}");
    }
    for present in ["createdDateTimeUtc", "lastUpdatedDateTimeUtc", "etag"] {
        assert!(state[present].is_string(), "{present} missing from {state}");
    }
    assert!(sim.read(|s| s.devices.is_empty() && s.registrations.is_empty()));
    assert_eq!(registration_outcomes(&sim), ["disabled"]);

    // A disabled group refuses its members the same way.
    let group_keys = key_pair();
    Enrollment::symmetric_key(&group_keys)
        .with(|c| c.provisioning_status = Status::Disabled)
        .group(&sim, "off");
    let derived = hubsim::auth::derive_device_key(&group_keys.primary_key, "member").unwrap();
    let done = provision(&sim, "member", &dps_sas(&derived, "member"));
    assert_eq!(done["status"], "disabled");
    assert!(sim.read(|s| s.devices.is_empty()));
}

#[test]
fn an_enrollment_whose_hub_is_not_linked_fails_as_an_operation_with_400208() {
    let dir = tempfile::tempdir().unwrap();
    let sim = open_sim(dir.path(), &["localhost"]);
    let keys = key_pair();
    Enrollment::symmetric_key(&keys)
        .with(|c| c.iot_hub_host_name = Some("not-linked.example.net".into()))
        .individual(&sim, "dev-06");
    // DPS accepts the registration (202) and the poll tells the outcome, as the C SDK reads it.
    let done = provision(&sim, "dev-06", &dps_sas(&keys.primary_key, "dev-06"));
    assert_eq!(done["status"], "failed");
    let state = &done["registrationState"];
    assert_eq!(state["status"], "failed");
    assert_eq!(state["errorCode"], 400208);
    assert!(
        state["errorMessage"]
            .as_str()
            .is_some_and(|m| m.contains("not-linked.example.net")),
        "{state}"
    );
    assert!(state["lastUpdatedDateTimeUtc"].is_string(), "{state}");
    assert!(sim.read(|s| s.devices.is_empty()));
    assert_eq!(registration_outcomes(&sim), ["failed"]);
}

#[test]
fn throttling_answers_429_with_retry_after_then_lets_the_device_through() {
    let dir = tempfile::tempdir().unwrap();
    let sim = open_sim(dir.path(), &["localhost"]);
    let keys = key_pair();
    Enrollment::symmetric_key(&keys).individual(&sim, "dev-06");
    sim.faults.lock().unwrap().dps_throttle = Some((2, 7));
    let cred = dps_sas(&keys.primary_key, "dev-06");
    for _ in 0..2 {
        let answer = dps::register(&sim, SCOPE, "dev-06", &cred, &body("dev-06"), "mqtt");
        assert_eq!(answer.status, 429);
        assert_eq!(answer.retry_after, Some(7));
        assert_eq!(answer.body["errorCode"], 429001);
    }
    assert!(sim.faults.lock().unwrap().dps_throttle.is_none());
    // A count of zero throttles nothing.
    sim.faults.lock().unwrap().dps_throttle = Some((0, 7));
    let done = provision(&sim, "dev-06", &cred);
    assert_eq!(done["status"], "assigned");
    assert_eq!(
        registration_outcomes(&sim),
        ["throttled", "throttled", "assigned"]
    );
}

#[test]
fn payload_is_echoed_in_the_registration_state() {
    let dir = tempfile::tempdir().unwrap();
    let sim = open_sim(dir.path(), &["localhost"]);
    let keys = key_pair();
    Enrollment::symmetric_key(&keys)
        .device_id("thermostat-7")
        .individual(&sim, "dev-07");
    let request =
        br#"{"payload": {"modelId": "dtmi:com:example:Thermostat;1"}, "registrationId": "dev-07"}"#;
    let accepted = dps::register(
        &sim,
        SCOPE,
        "dev-07",
        &dps_sas(&keys.primary_key, "dev-07"),
        request,
        "mqtt",
    );
    let done = poll(&sim, "dev-07", &accepted);
    let state = &done["registrationState"];
    assert_eq!(
        state["payload"],
        json!({"modelId": "dtmi:com:example:Thermostat;1"})
    );
    // The enrollment's deviceId names the hub device.
    assert_eq!(state["deviceId"], "thermostat-7");
    assert!(sim.read(|s| {
        s.devices
            .contains_key(&Store::device_key("localhost", "thermostat-7"))
    }));
}

#[test]
fn x509_individual_enrollment_matches_the_enrolled_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let sim = open_sim(dir.path(), &["localhost"]);
    let certs = tempfile::tempdir().unwrap();
    let dev = issue(
        CertKind::Device,
        "dev-x509",
        &certs.path().join("dev"),
        None,
    )
    .unwrap();
    let impostor = issue(
        CertKind::Device,
        "dev-x509",
        &certs.path().join("imp"),
        None,
    )
    .unwrap();
    Enrollment::x509_device(first_pem(&dev.cert_path)).individual(&sim, "dev-x509");

    let cred = DeviceCredential::X509(chain_of(&dev));
    let err = dps::authenticate(
        &sim,
        SCOPE,
        "dev-x509",
        &DeviceCredential::X509(chain_of(&impostor)),
    )
    .unwrap_err();
    assert!(err.contains("not the one enrolled"), "{err}");
    // The CN must be the registration id.
    let err = dps::authenticate(&sim, SCOPE, "other-id", &cred).unwrap_err();
    assert!(err.contains("CN"), "{err}");

    let done = provision(&sim, "dev-x509", &cred);
    assert_eq!(done["registrationState"]["deviceId"], "dev-x509");
    let info = &done["registrationState"]["x509"]["certificateInfo"];
    assert_eq!(info["subjectName"], "CN=dev-x509");
    assert_eq!(info["issuerName"], "CN=dev-x509");
    assert_eq!(info["sha1Thumbprint"], dev.sha1_thumbprint.as_str());
    assert_eq!(info["sha256Thumbprint"], dev.sha256_thumbprint.as_str());
    assert_eq!(info["version"], 3);
    assert!(info["notAfterUtc"].as_str().unwrap() > info["notBeforeUtc"].as_str().unwrap());
    let device = sim
        .read(|s| {
            s.devices
                .get(&Store::device_key("localhost", "dev-x509"))
                .cloned()
        })
        .unwrap();
    assert_eq!(device.authentication.kind, "selfSigned");
    let prints = device.authentication.x509_thumbprint.unwrap();
    assert_eq!(
        prints.primary_thumbprint.as_deref(),
        Some(dev.sha1_thumbprint.as_str())
    );

    let now = hubsim::auth::unix_now();
    assert_eq!(
        authenticate_hub_device(&sim, "localhost", "dev-x509", &cred, now),
        Ok(None)
    );
    let err = authenticate_hub_device(
        &sim,
        "localhost",
        "dev-x509",
        &DeviceCredential::X509(chain_of(&impostor)),
        now,
    )
    .unwrap_err();
    assert!(err.contains("thumbprint"), "{err}");
    // A SAS token cannot stand in for the certificate.
    let err = authenticate_hub_device(
        &sim,
        "localhost",
        "dev-x509",
        &hub_sas(&random_key(), "localhost", "dev-x509"),
        now,
    )
    .unwrap_err();
    assert!(err.contains("SAS"), "{err}");
}

#[test]
fn x509_group_admits_certificates_chaining_to_its_ca() {
    let dir = tempfile::tempdir().unwrap();
    let sim = open_sim(dir.path(), &["localhost"]);
    let certs = tempfile::tempdir().unwrap();
    let p = |n: &str| certs.path().join(n);
    let root = issue(CertKind::Root, "Fleet Root", &p("root"), None).unwrap();
    issue(
        CertKind::Intermediate,
        "Fleet Issuing",
        &p("inter"),
        Some(&p("root")),
    )
    .unwrap();
    let dev = issue(CertKind::Device, "cam-042", &p("dev"), Some(&p("inter"))).unwrap();
    issue(CertKind::Root, "Fleet Root", &p("rogue"), None).unwrap();
    let rogue = issue(
        CertKind::Device,
        "cam-042",
        &p("rogue-dev"),
        Some(&p("rogue")),
    )
    .unwrap();
    Enrollment::x509_ca(first_pem(&root.cert_path)).group(&sim, "cameras");

    let chain = chain_of(&dev);
    assert_eq!(chain.len(), 3);
    // The device may send the intermediate with or without the root.
    dps::authenticate(
        &sim,
        SCOPE,
        "cam-042",
        &DeviceCredential::X509(chain[..2].to_vec()),
    )
    .unwrap();
    assert!(
        dps::authenticate(
            &sim,
            SCOPE,
            "cam-042",
            &DeviceCredential::X509(chain[..1].to_vec())
        )
        .is_err()
    );
    assert!(
        dps::authenticate(
            &sim,
            SCOPE,
            "cam-042",
            &DeviceCredential::X509(chain_of(&rogue))
        )
        .is_err()
    );

    let cred = DeviceCredential::X509(chain.clone());
    let done = provision(&sim, "cam-042", &cred);
    let state = &done["registrationState"];
    assert_eq!(state["deviceId"], "cam-042");
    assert_eq!(state["x509"]["enrollmentGroupId"], "cameras");
    assert_eq!(
        state["x509"]["certificateInfo"]["subjectName"],
        "CN=cam-042"
    );
    assert_eq!(
        state["x509"]["certificateInfo"]["issuerName"],
        "CN=Fleet Issuing"
    );
    assert_eq!(
        state["x509"]["signingCertificateInfo"]["sha1Thumbprint"],
        root.sha1_thumbprint.as_str()
    );
    assert_eq!(
        state["x509"]["signingCertificateInfo"]["subjectName"],
        "CN=Fleet Root"
    );
    let device = sim
        .read(|s| {
            s.devices
                .get(&Store::device_key("localhost", "cam-042"))
                .cloned()
        })
        .unwrap();
    assert_eq!(device.authentication.kind, "certificateAuthority");
    assert_eq!(device.ca_group.as_deref(), Some("cameras"));

    let now = hubsim::auth::unix_now();
    assert_eq!(
        authenticate_hub_device(&sim, "localhost", "cam-042", &cred, now),
        Ok(None)
    );
    assert!(
        authenticate_hub_device(
            &sim,
            "localhost",
            "cam-042",
            &DeviceCredential::X509(chain_of(&rogue)),
            now
        )
        .is_err()
    );
    // The CN must be the device id.
    let twin_dev = issue(CertKind::Device, "cam-043", &p("dev43"), Some(&p("inter"))).unwrap();
    let err = authenticate_hub_device(
        &sim,
        "localhost",
        "cam-042",
        &DeviceCredential::X509(chain_of(&twin_dev)),
        now,
    )
    .unwrap_err();
    assert!(err.contains("CN"), "{err}");
}

#[test]
fn hashed_allocation_is_stable_and_spreads_over_the_linked_hubs() {
    let dir = tempfile::tempdir().unwrap();
    let hubs = ["hub-a.example.net", "hub-b.example.net"];
    let sim = open_sim(dir.path(), &hubs);
    let group_keys = key_pair();
    Enrollment::symmetric_key(&group_keys).group(&sim, "fleet");
    let mut seen = std::collections::BTreeMap::new();
    for i in 0..12 {
        let id = format!("unit-{i}");
        let key = hubsim::auth::derive_device_key(&group_keys.primary_key, &id).unwrap();
        let first = provision(&sim, &id, &dps_sas(&key, &id));
        let second = provision(&sim, &id, &dps_sas(&key, &id));
        let hub = first["registrationState"]["assignedHub"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(
            second["registrationState"]["assignedHub"],
            hub.as_str(),
            "{id} moved"
        );
        assert!(hubs.contains(&hub.as_str()), "{hub}");
        seen.insert(id, hub);
    }
    let on_a = seen.values().filter(|h| *h == hubs[0]).count();
    assert!(on_a > 0 && on_a < seen.len(), "all on one hub: {seen:?}");

    // Restricting the enrollment to one hub sends everyone there.
    sim.mutate(|s| s.groups.get_mut("fleet").unwrap().common.iot_hubs = Some(vec![hubs[1].into()]))
        .unwrap();
    for id in seen.keys() {
        let key = hubsim::auth::derive_device_key(&group_keys.primary_key, id).unwrap();
        let done = provision(&sim, id, &dps_sas(&key, id));
        assert_eq!(done["registrationState"]["assignedHub"], hubs[1]);
    }
    assert!(sim.read(|s| s.devices.values().all(|d| d.hub == hubs[1])));
}

#[test]
fn reprovisioning_to_another_hub_moves_the_device_and_its_twin() {
    let dir = tempfile::tempdir().unwrap();
    let hubs = ["hub-a.example.net", "hub-b.example.net"];
    let sim = open_sim(dir.path(), &hubs);
    let keys = key_pair();
    Enrollment::symmetric_key(&keys)
        .with(|c| {
            c.allocation_policy = AllocationPolicy::Static;
            c.iot_hub_host_name = Some(hubs[0].into());
            c.initial_twin = Some(json!({"properties": {"desired": {"mode": "initial"}}}));
        })
        .individual(&sim, "dev-08");
    let cred = dps_sas(&keys.primary_key, "dev-08");
    let first = provision(&sim, "dev-08", &cred);
    assert_eq!(first["registrationState"]["assignedHub"], hubs[0]);
    // The device reports something in hub A.
    let key_a = Store::device_key(hubs[0], "dev-08");
    sim.mutate(|s| {
        let twin = &mut s.devices.get_mut(&key_a).unwrap().twin;
        twin.reported.insert("firmware".into(), json!("1.2.3"));
        twin.reported_version = 2;
    })
    .unwrap();

    sim.mutate(|s| {
        s.enrollments
            .get_mut("dev-08")
            .unwrap()
            .common
            .iot_hub_host_name = Some(hubs[1].into())
    })
    .unwrap();
    let moved = provision(&sim, "dev-08", &cred);
    let state = &moved["registrationState"];
    assert_eq!(state["assignedHub"], hubs[1]);
    assert_eq!(state["substatus"], "deviceDataMigrated");
    let key_b = Store::device_key(hubs[1], "dev-08");
    let (old, new) = sim.read(|s| {
        (
            s.devices.get(&key_a).cloned(),
            s.devices.get(&key_b).cloned(),
        )
    });
    assert!(old.is_none(), "the device left hub A");
    let new = new.unwrap();
    assert_eq!(new.twin.reported["firmware"], "1.2.3");
    let now = hubsim::auth::unix_now();
    assert!(
        authenticate_hub_device(
            &sim,
            hubs[0],
            "dev-08",
            &hub_sas(&keys.primary_key, hubs[0], "dev-08"),
            now
        )
        .is_err()
    );
    authenticate_hub_device(
        &sim,
        hubs[1],
        "dev-08",
        &hub_sas(&keys.primary_key, hubs[1], "dev-08"),
        now,
    )
    .unwrap();

    // Without migration the twin starts over from the enrollment's initial twin.
    sim.mutate(|s| {
        let e = s.enrollments.get_mut("dev-08").unwrap();
        e.common.iot_hub_host_name = Some(hubs[0].into());
        e.common.reprovision_policy.migrate_device_data = false;
    })
    .unwrap();
    let reset = provision(&sim, "dev-08", &cred);
    assert_eq!(reset["registrationState"]["assignedHub"], hubs[0]);
    assert_eq!(reset["registrationState"]["substatus"], "deviceDataReset");
    let back = sim.read(|s| s.devices.get(&key_a).cloned()).unwrap();
    assert!(back.twin.reported.is_empty());
    assert_eq!(back.twin.desired["mode"], "initial");
    assert!(sim.read(|s| !s.devices.contains_key(&key_b)));

    // updateHubAssignment=false keeps the device where it is.
    sim.mutate(|s| {
        let e = s.enrollments.get_mut("dev-08").unwrap();
        e.common.iot_hub_host_name = Some(hubs[1].into());
        e.common.reprovision_policy.update_hub_assignment = false;
    })
    .unwrap();
    let kept = provision(&sim, "dev-08", &cred);
    assert_eq!(kept["registrationState"]["assignedHub"], hubs[0]);
}

#[test]
fn hub_connect_refuses_unknown_disabled_and_policy_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let sim = open_sim(dir.path(), &["localhost"]);
    let keys = key_pair();
    Enrollment::symmetric_key(&keys).individual(&sim, "dev-09");
    provision(&sim, "dev-09", &dps_sas(&keys.primary_key, "dev-09"));
    let now = hubsim::auth::unix_now();

    let err = authenticate_hub_device(
        &sim,
        "localhost",
        "ghost",
        &hub_sas(&keys.primary_key, "localhost", "ghost"),
        now,
    )
    .unwrap_err();
    assert!(err.contains("does not exist"), "{err}");
    // Device ids are case-sensitive in IoT Hub.
    assert!(
        authenticate_hub_device(
            &sim,
            "localhost",
            "DEV-09",
            &hub_sas(&keys.primary_key, "localhost", "DEV-09"),
            now
        )
        .is_err()
    );
    // A token for another device, an expired one, one with a policy name.
    let err = authenticate_hub_device(
        &sim,
        "localhost",
        "dev-09",
        &hub_sas(&keys.primary_key, "localhost", "dev-10"),
        now,
    )
    .unwrap_err();
    assert!(err.contains("resource"), "{err}");
    let expired = DeviceCredential::Sas(sas_token(
        &keys.primary_key,
        "localhost/devices/dev-09",
        now - 1,
        None,
    ));
    let err = authenticate_hub_device(&sim, "localhost", "dev-09", &expired, now).unwrap_err();
    assert!(err.contains("expired"), "{err}");
    let hub_owner = sim.read(|s| s.hub_owner_key.clone());
    let policy = DeviceCredential::Sas(sas_token(
        &hub_owner,
        "localhost/devices/dev-09",
        in_an_hour(),
        Some("iothubowner"),
    ));
    let err = authenticate_hub_device(&sim, "localhost", "dev-09", &policy, now).unwrap_err();
    assert!(err.contains("skn"), "{err}");
    assert!(
        authenticate_hub_device(&sim, "localhost", "dev-09", &DeviceCredential::None, now).is_err()
    );

    let good = hub_sas(&keys.primary_key, "localhost", "dev-09");
    authenticate_hub_device(&sim, "localhost", "dev-09", &good, now).unwrap();
    sim.mutate(|s| {
        s.devices
            .get_mut(&Store::device_key("localhost", "dev-09"))
            .unwrap()
            .status = Status::Disabled
    })
    .unwrap();
    let err = authenticate_hub_device(&sim, "localhost", "dev-09", &good, now).unwrap_err();
    assert!(err.contains("disabled"), "{err}");
    assert!(!err.contains(&keys.primary_key));
    // Provisioning again does not re-enable what the operator disabled in the hub.
    let again = provision(&sim, "dev-09", &dps_sas(&keys.primary_key, "dev-09"));
    assert_eq!(again["status"], "assigned");
    assert!(authenticate_hub_device(&sim, "localhost", "dev-09", &good, now).is_err());
}

/// The EK of Azure CLI's tests (docs/protocol.md §6.7): an RSA-2048 restricted decryption key, so it
/// also serves as an SRK for blob building (no TPM in these tests; swtpm tests are in tests/it).
const TEST_EK: &str = "AToAAQALAAMAsgAgg3GXZ0SEs/gakMyNRqXXJP1S124GUgtk8qHaGzMUaaoABgCAAEMAEAgAAAAAAAEAibym9HQP9vxCGF5dVc1QQsAGe021aUGJzNol1/gycBx3jFsTpwmWbISRwnFvflWd0w2Mc44FAAZNaJOAAxwZvG8GvyLlHh6fGKdh+mSBL4iLH2bZ4Ry22cB3CJVjXmdGoz9Y/j3/NwLndBxQC+baNvzvyVQZ4/A2YL7vzIIj2ik4y+ve9ir7U0GbNdnxskqK1KFIITVVtkTIYyyFTIR0BySjPrRIDj7r7Mh5uF9HBppGKQCBoVSVV8dI91lNazmSdpGWyqCkO7iM4VvUMv2HT/ym53aYlUrau+Qq87Tu+uQipWYgRdF11KDfcpMHqqzBQQ1NpOJVhrsTrhyJzO7KNw==";

fn tpm_body(registration_id: &str, ek: &str) -> Vec<u8> {
    json!({"registrationId": registration_id, "tpm": {"endorsementKey": ek, "storageRootKey": TEST_EK}, "payload": null})
        .to_string()
        .into_bytes()
}

#[test]
fn tpm_attestation_challenges_the_enrolled_ek_and_wraps_the_hub_key() {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let dir = tempfile::tempdir().unwrap();
    let sim = open_sim(dir.path(), &["localhost"]);
    let id = "t6t2cg5vnzscr7ty546hj7c7maamkggectqcxkccq637z5bvlnoa";
    Enrollment::tpm(TEST_EK.into()).individual(&sim, id);

    // A signed registration before any challenge has nothing to be checked against.
    let early = dps::register(
        &sim,
        SCOPE,
        id,
        &dps_sas(&random_key(), id),
        &tpm_body(id, TEST_EK),
        "https",
    );
    assert_eq!(early.status, 401);
    assert!(
        early.body["message"]
            .as_str()
            .unwrap()
            .contains("no TPM challenge"),
        "{}",
        early.body
    );

    // Another EK, or an id without a TPM enrollment: 401 without a blob.
    let mut other_ek = b64.decode(TEST_EK).unwrap();
    other_ek[100] ^= 1;
    let refused = dps::tpm_challenge(&sim, SCOPE, id, &tpm_body(id, &b64.encode(&other_ek)));
    assert_eq!(refused.status, 401);
    assert!(refused.body.get("authenticationKey").is_none());
    assert!(
        refused.body["message"]
            .as_str()
            .unwrap()
            .contains("endorsement key differs")
    );
    let refused = dps::tpm_challenge(&sim, SCOPE, "nobody", &tpm_body("nobody", TEST_EK));
    assert_eq!(refused.status, 401);
    assert!(
        refused.body["message"]
            .as_str()
            .unwrap()
            .contains("no TPM enrollment")
    );
    let bad = dps::tpm_challenge(&sim, SCOPE, id, br#"{"registrationId": "x"}"#);
    assert_eq!(bad.status, 400);

    // The enrolled EK gets the challenge: 401 with the blob and keyName, as the SDKs expect.
    let challenge = dps::tpm_challenge(&sim, SCOPE, id, &tpm_body(id, TEST_EK));
    assert_eq!(challenge.status, 401, "{}", challenge.body);
    assert_eq!(challenge.body["keyName"], "registration");
    let blob = b64
        .decode(challenge.body["authenticationKey"].as_str().unwrap())
        .unwrap();
    assert!(
        blob.len() > 600 && blob.ends_with(&[0, 0]),
        "{}",
        blob.len()
    );
    // Only the TPM could open the blob; here the test reads the key from the simulator.
    let key = sim
        .live
        .lock()
        .unwrap()
        .tpm_challenges
        .get(id)
        .unwrap()
        .key
        .clone();
    let wrong = dps::register(
        &sim,
        SCOPE,
        id,
        &dps_sas(&random_key(), id),
        &tpm_body(id, TEST_EK),
        "https",
    );
    assert_eq!(wrong.status, 401);

    // Not over MQTT: DPS offers TPM attestation over HTTPS (and AMQP) only.
    let mqtt = dps::register(&sim, SCOPE, id, &dps_sas(&key, id), &body(id), "mqtt");
    assert_eq!(mqtt.status, 401, "{}", mqtt.body);
    let accepted = dps::register(
        &sim,
        SCOPE,
        id,
        &dps_sas(&key, id),
        &tpm_body(id, TEST_EK),
        "https",
    );
    assert_eq!(accepted.status, 202, "{}", accepted.body);
    let done = poll(&sim, id, &accepted);
    let state = &done["registrationState"];
    assert_eq!(state["deviceId"], id);
    assert!(state["tpm"]["authenticationKey"].is_string(), "{state}");
    assert!(state.get("symmetricKey").is_none());
    // The hub device got a fresh key (not the challenge key), usable for hub SAS.
    let device_key = sim.read(|s| {
        s.devices[&format!("localhost/{id}")]
            .authentication
            .symmetric_key
            .clone()
            .unwrap()
    });
    assert_ne!(device_key.primary_key, key);
    let now = hubsim::auth::unix_now();
    authenticate_hub_device(
        &sim,
        "localhost",
        id,
        &hub_sas(&device_key.primary_key, "localhost", id),
        now,
    )
    .unwrap();
    assert_eq!(
        registration_outcomes(&sim),
        [
            "unauthorized",
            "unauthorized",
            "unauthorized",
            "bad-request",
            "tpm-challenge",
            "unauthorized",
            "unauthorized",
            "assigned"
        ]
    );
}

#[test]
fn extra_id_scopes_share_the_enrollments_and_are_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Sim::open(
        SimConfig {
            state_dir: dir.path().to_path_buf(),
            hubs: vec!["localhost".into()],
            retry_after_secs: 0,
            mqtt_port: 0,
            https_port: 0,
            extra_id_scopes: vec!["0ne000000B2".into()],
        },
        SCOPE,
    )
    .unwrap();
    let keys = key_pair();
    Enrollment::symmetric_key(&keys).individual(&sim, "dev-scopes");
    let in_scope = |scope: &str| {
        DeviceCredential::Sas(sas_token(
            &keys.primary_key,
            &format!("{scope}/registrations/dev-scopes"),
            in_an_hour(),
            Some("registration"),
        ))
    };
    // The extra scope answers with the same enrollment; case does not matter, as in Azure.
    for scope in [SCOPE, "0ne000000b2"] {
        let answer = dps::register(
            &sim,
            scope,
            "dev-scopes",
            &in_scope(scope),
            &body("dev-scopes"),
            "mqtt",
        );
        assert_eq!(answer.status, 202, "{scope}: {}", answer.body);
    }
    // A scope the instance was not given is still refused.
    let refused = dps::register(
        &sim,
        "0ne000000C3",
        "dev-scopes",
        &in_scope("0ne000000C3"),
        &body("dev-scopes"),
        "mqtt",
    );
    assert_eq!(refused.status, 401, "{}", refused.body);
    assert!(
        refused.body.to_string().contains("unknown ID scope"),
        "{}",
        refused.body
    );
    let seen: Vec<(String, String)> = registration_events(&sim)
        .iter()
        .map(|r| (r.id_scope.clone(), r.outcome.clone()))
        .collect();
    assert_eq!(
        seen,
        [
            (SCOPE.to_string(), "assigned".to_string()),
            ("0ne000000b2".to_string(), "assigned".to_string()),
            ("0ne000000C3".to_string(), "unauthorized".to_string()),
        ]
    );
}

#[test]
fn slow_assignment_answers_polls_assigning_with_retry_after_and_records_every_poll() {
    let dir = tempfile::tempdir().unwrap();
    let sim = open_sim(dir.path(), &["localhost"]);
    let keys = key_pair();
    Enrollment::symmetric_key(&keys).individual(&sim, "dev-slow");
    let cred = dps_sas(&keys.primary_key, "dev-slow");
    sim.faults.lock().unwrap().dps_slow_assignment = Some(SlowAssignment {
        polls: 2,
        retry_after: Some(5),
    });
    let accepted = dps::register(&sim, SCOPE, "dev-slow", &cred, &body("dev-slow"), "mqtt");
    assert_eq!((accepted.status, accepted.retry_after), (202, Some(5)));
    let op = accepted.body["operationId"].as_str().unwrap().to_string();
    // Polls may be throttled too: a throttle of polls leaves registrations alone.
    {
        let mut faults = sim.faults.lock().unwrap();
        faults.dps_throttle = Some((1, 2));
        faults.dps_throttle_requests = ThrottledRequests::Poll;
    }
    let throttled = dps::operation_status(&sim, SCOPE, "dev-slow", &op);
    assert_eq!((throttled.status, throttled.retry_after), (429, Some(2)));
    assert_eq!(throttled.body["errorCode"], 429001);
    for _ in 0..2 {
        let answer = dps::operation_status(&sim, SCOPE, "dev-slow", &op);
        assert_eq!((answer.status, answer.retry_after), (202, Some(5)));
        assert_eq!(
            answer.body,
            json!({"operationId": op, "status": "assigning"})
        );
    }
    let done = dps::operation_status(&sim, SCOPE, "dev-slow", &op);
    assert_eq!((done.status, done.retry_after), (200, None));
    assert_eq!(done.body["status"], "assigned");

    let events = registration_events(&sim);
    assert_eq!(events.len(), 1, "polls are not registrations: {events:?}");
    let event = &events[0];
    assert_eq!((event.status, event.retry_after), (202, Some(5)));
    assert_eq!(event.operation_id.as_deref(), Some(op.as_str()));
    let polls: Vec<(u16, Option<u64>)> = event
        .polls
        .iter()
        .map(|p| (p.status, p.retry_after))
        .collect();
    assert_eq!(
        polls,
        [(429, Some(2)), (202, Some(5)), (202, Some(5)), (200, None)]
    );
    assert!(
        event.polls.windows(2).all(|w| w[0].time_ms <= w[1].time_ms)
            && event.time_ms <= event.polls[0].time_ms
    );

    // A throttle of registrations does not touch polls, and the fault's poll count is per
    // registration started while it is set.
    {
        let mut faults = sim.faults.lock().unwrap();
        faults.dps_throttle = Some((1, 4));
        faults.dps_throttle_requests = ThrottledRequests::Register;
        faults.dps_slow_assignment = Some(SlowAssignment {
            polls: 1,
            retry_after: None,
        });
    }
    let refused = dps::register(&sim, SCOPE, "dev-slow", &cred, &body("dev-slow"), "mqtt");
    assert_eq!((refused.status, refused.retry_after), (429, Some(4)));
    let accepted = dps::register(&sim, SCOPE, "dev-slow", &cred, &body("dev-slow"), "mqtt");
    assert_eq!(
        (accepted.status, accepted.retry_after),
        (202, Some(3)),
        "without its own retry-after the fault uses --retry-after"
    );
    let op = accepted.body["operationId"].as_str().unwrap();
    assert_eq!(
        dps::operation_status(&sim, SCOPE, "dev-slow", op).status,
        202
    );
    assert_eq!(
        dps::operation_status(&sim, SCOPE, "dev-slow", op).status,
        200
    );
    assert_eq!(
        registration_outcomes(&sim),
        ["assigned", "throttled", "assigned"]
    );
}

#[test]
fn the_registration_sas_names_policy_registration_or_none() {
    let dir = tempfile::tempdir().unwrap();
    let sim = open_sim(dir.path(), &["localhost"]);
    let group = key_pair();
    Enrollment::symmetric_key(&group).group(&sim, "skn-fleet");
    let derived = hubsim::auth::derive_device_key(&group.primary_key, "skn-dev").unwrap();
    let token = |skn: Option<&str>| {
        DeviceCredential::Sas(sas_token(
            &derived,
            &format!("{SCOPE}/registrations/skn-dev"),
            in_an_hour(),
            skn,
        ))
    };
    dps::authenticate(&sim, SCOPE, "skn-dev", &token(Some("registration"))).unwrap();
    // Azure's Python SDK sends no skn, and DPS registers it.
    dps::authenticate(&sim, SCOPE, "skn-dev", &token(None)).unwrap();
    for wrong in ["provisioningserviceowner", "Registration", "device"] {
        let err = dps::authenticate(&sim, SCOPE, "skn-dev", &token(Some(wrong))).unwrap_err();
        assert!(
            err.contains(&format!("'{wrong}'")) && err.contains("'registration'"),
            "{err}"
        );
        let answer = dps::register(
            &sim,
            SCOPE,
            "skn-dev",
            &token(Some(wrong)),
            &body("skn-dev"),
            "mqtt",
        );
        assert_eq!(answer.status, 401, "{}", answer.body);
    }
}

#[test]
fn registration_ids_and_certificate_names_follow_azures_rules() {
    let dir = tempfile::tempdir().unwrap();
    let sim = open_sim(dir.path(), &["localhost"]);
    let group = key_pair();
    Enrollment::symmetric_key(&group).group(&sim, "ids");
    let try_id = |id: &str| {
        let key = hubsim::auth::derive_device_key(&group.primary_key, id).unwrap();
        dps::authenticate(&sim, SCOPE, id, &dps_sas(&key, id))
    };
    // Both sides of each rule.
    let longest = "a".repeat(128);
    for good in ["gw-01.site_a:1", "x", "ends-with-dash-", longest.as_str()] {
        try_id(good).unwrap_or_else(|e| panic!("{good}: {e}"));
    }
    let too_long = "a".repeat(129);
    for (bad, why) in [
        ("gw 01", "' '"),
        ("gw/01", "'/'"),
        ("gw#01", "'#'"),
        ("gw.", "must end with"),
        ("gw:", "must end with"),
        ("gwé", "'é'"),
        (too_long.as_str(), "129 characters"),
    ] {
        let err = try_id(bad).unwrap_err();
        assert!(
            err.contains("is not valid") && err.contains(why),
            "{bad}: {err}"
        );
    }

    // X.509: the CN is the registration id, and a CN has at most 64 characters.
    let certs = tempfile::tempdir().unwrap();
    let p = |n: &str| certs.path().join(n);
    let root = issue(CertKind::Root, "Ids Root", &p("root"), None).unwrap();
    Enrollment::x509_ca(first_pem(&root.cert_path)).group(&sim, "ids-x509");
    let cn64 = "c".repeat(64);
    let cn65 = "c".repeat(65);
    let ok = issue(CertKind::Device, &cn64, &p("ok"), Some(&p("root"))).unwrap();
    dps::authenticate(&sim, SCOPE, &cn64, &DeviceCredential::X509(chain_of(&ok))).unwrap();
    let long = issue(CertKind::Device, &cn65, &p("long"), Some(&p("root"))).unwrap();
    let err = dps::authenticate(&sim, SCOPE, &cn65, &DeviceCredential::X509(chain_of(&long)))
        .unwrap_err();
    assert!(err.contains("64"), "{err}");
}

/// Certificate issuance (docs/credentials.md): an enrollment naming a hubsim CA has it sign the
/// CSR a registration carries (`csr`: base64 DER); the answer carries `issuedCertificateChain`
/// (base64 DER, leaf first, then the CA), the leaf is valid for the enrollment's lifetime, and the
/// hub takes it (and no longer the enrollment's keys). A CSR for another name is refused (400);
/// with the CA down (`issuanceFailures`) the operation fails and the next one succeeds.
#[test]
fn a_registration_with_a_csr_gets_a_certificate_the_hub_accepts() {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD as B64;
    let dir = tempfile::tempdir().unwrap();
    let sim = open_sim(dir.path(), &["hub-a.example.net"]);
    let ca_dir = dir.path().join("issuing-ca");
    issue(CertKind::Root, "issuing-ca", &ca_dir, None).unwrap();
    let keys = key_pair();
    Enrollment::symmetric_key(&keys)
        .with(|c| {
            c.certificate_issuance = Some(hubsim::state::CertificateIssuance {
                issuer_dir: ca_dir.clone(),
                validity_seconds: 120,
            })
        })
        .individual(&sim, "dev-issued");
    let request = |cn: &str| {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let csr = params.serialize_request(&key).unwrap();
        json!({"registrationId": "dev-issued", "csr": B64.encode(csr.der())})
            .to_string()
            .into_bytes()
    };
    let cred = dps_sas(&keys.primary_key, "dev-issued");
    let register = |body: &[u8]| dps::register(&sim, SCOPE, "dev-issued", &cred, body, "mqtt");

    let accepted = register(&request("dev-issued"));
    assert_eq!(accepted.status, 202, "{}", accepted.body);
    let done = poll(&sim, "dev-issued", &accepted);
    assert_eq!(done["status"], "assigned", "{done}");
    let chain: Vec<Vec<u8>> = done["registrationState"]["issuedCertificateChain"]
        .as_array()
        .expect("issuedCertificateChain")
        .iter()
        .map(|c| B64.decode(c.as_str().unwrap()).unwrap())
        .collect();
    let ca_der = pem_certs(&ca_dir.join("cert.pem"));
    assert_eq!(chain.len(), 2);
    assert_eq!(chain[1], ca_der[0], "the CA follows the leaf");
    assert_eq!(
        hubsim::auth::leaf_common_name(&chain[0]).unwrap(),
        "dev-issued"
    );
    let now = hubsim::auth::unix_now();
    hubsim::auth::verify_chain(&chain, &ca_der, now).expect("signed by the enrollment's CA");
    // Valid from a minute ago for the enrollment's 120 seconds: expired 3 minutes from now.
    assert!(hubsim::auth::verify_chain(&chain, &ca_der, now + 180).is_err());
    let info = hubsim::auth::certificate_info(&chain[0]).unwrap();
    assert_eq!(info["issuerName"], "CN=issuing-ca", "{info}");

    // The hub knows the device by its issued certificate now, not by the enrollment's keys.
    authenticate_hub_device(
        &sim,
        "hub-a.example.net",
        "dev-issued",
        &DeviceCredential::X509(chain.clone()),
        now,
    )
    .expect("the hub takes the issued certificate");
    let expired = authenticate_hub_device(
        &sim,
        "hub-a.example.net",
        "dev-issued",
        &DeviceCredential::X509(chain.clone()),
        now + 180,
    )
    .expect_err("the hub refuses it after its end");
    assert!(expired.contains("is not valid now"), "{expired}");
    assert!(
        authenticate_hub_device(
            &sim,
            "hub-a.example.net",
            "dev-issued",
            &hub_sas(&keys.primary_key, "hub-a.example.net", "dev-issued"),
            now,
        )
        .is_err()
    );

    // A request for another name gets no certificate.
    let refused = register(&request("someone-else"));
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert!(
        refused.body["message"]
            .as_str()
            .unwrap()
            .contains("is not the registration id"),
        "{}",
        refused.body
    );

    // The CA is down once: the operation fails, saying so; the next registration is issued.
    sim.faults.lock().unwrap().issuance_failures = 1;
    let accepted = register(&request("dev-issued"));
    assert_eq!(accepted.status, 202, "{}", accepted.body);
    let failed = poll(&sim, "dev-issued", &accepted);
    assert_eq!(failed["status"], "failed", "{failed}");
    assert_eq!(failed["registrationState"]["errorCode"], 500000, "{failed}");
    assert!(
        failed["registrationState"]["errorMessage"]
            .as_str()
            .unwrap()
            .contains("certificate authority is unavailable"),
        "{failed}"
    );
    let accepted = register(&request("dev-issued"));
    let again = poll(&sim, "dev-issued", &accepted);
    assert_eq!(again["status"], "assigned", "{again}");
    assert_ne!(
        again["registrationState"]["issuedCertificateChain"][0],
        done["registrationState"]["issuedCertificateChain"][0]
    );
}

/// Every certificate of a PEM file, DER.
fn pem_certs(path: &std::path::Path) -> Vec<Vec<u8>> {
    CertificateDer::pem_file_iter(path)
        .unwrap()
        .map(|c| c.unwrap().to_vec())
        .collect()
}
