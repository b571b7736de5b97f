//! The agent's DPS client against hubsim over MQTT/TLS.

use std::sync::Arc;
use std::time::Duration;

use hubagent::identity::credential::Credential;
use hubagent::identity::keys::MemoryKey;
use hubagent::provisioning::dps::{DpsError, DpsRequest, register};
use hubagent_tests::*;
use hubsim::state::{SlowAssignment, ThrottledRequests};

fn request(running: &hubsim::Running, registration_id: &str) -> DpsRequest {
    DpsRequest {
        endpoint_host: "localhost".into(),
        port: running.mqtt_addr.port(),
        websocket: false,
        proxy: None,
        auto: None,
        id_scope: running.sim.read(|s| s.id_scope.clone()),
        registration_id: registration_id.into(),
        payload: Some(serde_json::json!({"site": "plant-4"})),
        csr: None,
        timeout: WAIT,
    }
}

fn sas(key: &str) -> Credential {
    Credential::Sas(Arc::new(MemoryKey::from_base64(key, "test key").unwrap()))
}

fn tls(running: &hubsim::Running) -> Arc<rustls::ClientConfig> {
    hubagent::identity::tls::client_config(Some(&running.ca_pem_path), None).unwrap()
}

#[tokio::test]
async fn registers_an_individual_enrollment_and_gets_the_payload_back() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let key = enroll(&running.sim, "gw-dps-1");
    let assignment = register(&request(&running, "gw-dps-1"), &sas(&key), tls(&running))
        .await
        .unwrap();
    assert_eq!(assignment.assigned_hub, hubsim::DEFAULT_HUB);
    assert_eq!(assignment.device_id, "gw-dps-1");
    assert_eq!(assignment.substatus, "initialAssignment");
    assert_eq!(assignment.registration_state["payload"]["site"], "plant-4");
    let history = registration_events(&running.sim);
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].outcome, "assigned");
}

#[tokio::test]
async fn group_members_register_with_the_derived_key() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let group_key = enroll_group(&running.sim, "fleet");
    let group = MemoryKey::from_base64(&group_key, "group").unwrap();
    let derived = hubagent::identity::keys::derive_device_key(&group, "fleet-member-9").unwrap();
    let assignment = register(
        &request(&running, "fleet-member-9"),
        &sas(&derived),
        tls(&running),
    )
    .await
    .unwrap();
    assert_eq!(assignment.device_id, "fleet-member-9");
    assert_eq!(
        assignment.registration_state["symmetricKey"]["enrollmentGroupId"],
        "fleet"
    );
}

#[tokio::test]
async fn a_wrong_key_is_not_authorized() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    enroll(&running.sim, "gw-dps-2");
    let wrong = hubsim::state::random_key();
    let err = register(&request(&running, "gw-dps-2"), &sas(&wrong), tls(&running))
        .await
        .unwrap_err();
    assert!(matches!(err, DpsError::NotAuthorized { .. }), "{err}");
    assert!(!err.is_transient());
}

#[tokio::test]
async fn throttling_is_honoured_then_registration_completes() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let key = enroll(&running.sim, "gw-dps-3");
    // Two 429s, each asking for a 1 s pause.
    running.sim.faults.lock().unwrap().dps_throttle = Some((2, 1));
    let started = std::time::Instant::now();
    let assignment = register(&request(&running, "gw-dps-3"), &sas(&key), tls(&running))
        .await
        .unwrap();
    assert_eq!(assignment.device_id, "gw-dps-3");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "retry-after was honoured: {:?}",
        started.elapsed()
    );
    assert_eq!(
        registration_outcomes(&running.sim),
        ["throttled", "throttled", "assigned"]
    );
}

/// DPS assigns asynchronously: polls answered `assigning`, throttled registrations and throttled
/// polls each carry a `retry-after`, and the agent waits just that long before the next request
/// (as hubsim measures it), never less and not noticeably more.
#[tokio::test]
async fn retry_after_is_honoured_for_registrations_and_polls() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let sim = running.sim.clone();

    // A throttled registration (1 s), then two polls answered `assigning` (2 s each).
    let key = enroll(&sim, "gw-dps-slow-1");
    {
        let mut faults = sim.faults.lock().unwrap();
        faults.dps_throttle = Some((1, 1));
        faults.dps_throttle_requests = ThrottledRequests::Register;
        faults.dps_slow_assignment = Some(SlowAssignment {
            polls: 2,
            retry_after: Some(2),
        });
    }
    let assignment = register(
        &request(&running, "gw-dps-slow-1"),
        &sas(&key),
        tls(&running),
    )
    .await
    .unwrap();
    assert_eq!(assignment.device_id, "gw-dps-slow-1");
    assert_retry_after_honoured(&sim, "gw-dps-slow-1", 4);

    // Throttled polls (1 s each), then one `assigning` poll (1 s).
    let key = enroll(&sim, "gw-dps-slow-2");
    {
        let mut faults = sim.faults.lock().unwrap();
        faults.dps_throttle = Some((2, 1));
        faults.dps_throttle_requests = ThrottledRequests::Poll;
        faults.dps_slow_assignment = Some(SlowAssignment {
            polls: 1,
            retry_after: Some(1),
        });
    }
    register(
        &request(&running, "gw-dps-slow-2"),
        &sas(&key),
        tls(&running),
    )
    .await
    .unwrap();
    let polls: Vec<u16> = registration_events(&sim)
        .iter()
        .filter(|e| e.registration_id == "gw-dps-slow-2")
        .flat_map(|e| e.polls.iter().map(|p| p.status))
        .collect();
    assert_eq!(polls, [429, 429, 202, 200]);
    assert_retry_after_honoured(&sim, "gw-dps-slow-2", 4);
}

#[tokio::test]
async fn a_wrong_id_scope_is_not_authorized_and_a_dead_endpoint_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let key = enroll(&running.sim, "gw-dps-6");
    let mut wrong_scope = request(&running, "gw-dps-6");
    wrong_scope.id_scope = "0ne00000000".into();
    let err = register(&wrong_scope, &sas(&key), tls(&running))
        .await
        .unwrap_err();
    assert!(matches!(err, DpsError::NotAuthorized { .. }), "{err}");

    // A port nobody listens on: a transient error naming the endpoint, well before the timeout.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut dead = request(&running, "gw-dps-6");
    dead.port = port;
    let err = register(&dead, &sas(&key), tls(&running))
        .await
        .unwrap_err();
    assert!(matches!(err, DpsError::Unreachable { .. }), "{err}");
    assert!(err.is_transient());
    assert!(
        err.to_string().contains(&format!("localhost:{port}")),
        "{err}"
    );
    assert!(!err.to_string().contains(&key), "no secret in errors");
}

#[tokio::test]
async fn a_disabled_enrollment_is_reported_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let key = enroll(&running.sim, "gw-dps-4");
    running
        .sim
        .mutate(|s| {
            s.enrollments
                .get_mut("gw-dps-4")
                .unwrap()
                .common
                .provisioning_status = hubsim::state::Status::Disabled
        })
        .unwrap();
    let err = register(&request(&running, "gw-dps-4"), &sas(&key), tls(&running))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("disabled"), "{err}");
}

#[tokio::test]
async fn an_untrusted_server_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let key = enroll(&running.sim, "gw-dps-5");
    // Trust only a different CA: verification must fail, there is no way around it.
    let other = tempfile::tempdir().unwrap();
    let other_ca = hubsim::pki::load_or_create(other.path(), &[]).unwrap();
    let tls = hubagent::identity::tls::client_config(Some(&other_ca.ca_pem_path), None).unwrap();
    let err = register(&request(&running, "gw-dps-5"), &sas(&key), tls)
        .await
        .unwrap_err();
    assert!(matches!(err, DpsError::Unreachable { .. }), "{err}");
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "{err}"
    );
}
