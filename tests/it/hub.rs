//! The agent's hub session against hubsim: telemetry with PUBACK, twin, methods, C2D, and
//! recovery from dropped connections and short-lived tokens without losing a message.

use std::sync::Arc;
use std::time::Duration;

use hubagent::hub::{HubParams, SessionEvent, SessionHandle, spawn};
use hubagent::identity::credential::Credential;
use hubagent::identity::keys::MemoryKey;
use hubagent::message::TelemetryMessage;
use hubagent_tests::*;
use serde_json::json;
use tokio::sync::mpsc::Receiver;

/// Registers `id` through DPS in hubsim and opens a session for it.
async fn session(
    running: &hubsim::Running,
    id: &str,
    sas_ttl: Duration,
) -> (SessionHandle, Receiver<SessionEvent>) {
    let key = enroll(&running.sim, id);
    let credential = Credential::Sas(Arc::new(MemoryKey::from_base64(&key, "test").unwrap()));
    let tls = hubagent::identity::tls::client_config(Some(&running.ca_pem_path), None).unwrap();
    let request = hubagent::provisioning::dps::DpsRequest {
        endpoint_host: "localhost".into(),
        port: running.mqtt_addr.port(),
        websocket: false,
        proxy: None,
        auto: None,
        id_scope: running.sim.read(|s| s.id_scope.clone()),
        registration_id: id.into(),
        payload: None,
        csr: None,
        timeout: WAIT,
    };
    let assignment = hubagent::provisioning::dps::register(&request, &credential, tls.clone())
        .await
        .unwrap();
    let (handle, events, _task) = spawn(HubParams {
        hub: assignment.assigned_hub,
        device_id: assignment.device_id,
        port: running.mqtt_addr.port(),
        websocket: false,
        proxy: None,
        auto: None,
        credential,
        tls,
        keep_alive: Duration::from_secs(30),
        sas_ttl,
        renew_before: sas_ttl / 3,
        backoff_max: Duration::from_secs(2),
        unavailable_backoff_max: Duration::from_secs(2),
        max_message_size: 256 * 1024,
        inflight: 8,
        desired_version: 0,
        model_id: None,
    });
    (handle, events)
}

async fn next_matching<T>(
    events: &mut Receiver<SessionEvent>,
    mut pick: impl FnMut(SessionEvent) -> Option<T>,
) -> T {
    tokio::time::timeout(WAIT, async {
        loop {
            let event = events.recv().await.expect("session alive");
            if let Some(found) = pick(event) {
                return found;
            }
        }
    })
    .await
    .expect("event in time")
}

async fn next_c2d(
    events: &mut Receiver<SessionEvent>,
) -> (Vec<u8>, Vec<(String, String)>, hubagent::hub::C2dToken) {
    next_matching(events, |e| match e {
        SessionEvent::CloudToDevice {
            body,
            properties,
            token,
        } => Some((body.to_vec(), properties, token)),
        _ => None,
    })
    .await
}

fn message(i: usize) -> TelemetryMessage {
    TelemetryMessage {
        message_id: format!("m-{i}"),
        body: format!("{{\"n\":{i}}}").into(),
        content_type: Some("application/json".into()),
        content_encoding: Some("utf-8".into()),
        creation_time: None,
        properties: vec![("source".into(), "test".into())],
    }
}

#[tokio::test]
async fn telemetry_twin_methods_and_c2d() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let (handle, mut events) = session(&running, "gw-hub-1", Duration::from_secs(3600)).await;
    let (desired_version, _) = next_matching(&mut events, |e| match e {
        SessionEvent::Twin {
            desired_version,
            desired,
            ..
        } => Some((desired_version, desired)),
        _ => None,
    })
    .await;
    assert_eq!(desired_version, 0);

    for i in 0..20 {
        handle.publish(message(i)).await.unwrap();
    }
    let ids = message_ids(&running.sim, "gw-hub-1");
    assert_eq!(ids, (0..20).map(|i| format!("m-{i}")).collect::<Vec<_>>());
    let first = records(&running.sim, "gw-hub-1")[0].clone();
    assert_eq!(first.properties["source"], "test");
    assert_eq!(first.system_properties["content-type"], "application/json");

    let v1 = handle
        .report(json!({"agent": {"version": "test"}}))
        .await
        .unwrap();
    let v2 = handle
        .report(json!({"agent": {"state": "ok"}}))
        .await
        .unwrap();
    assert_eq!(v2, v1 + 1);

    let key = device_key(&running.sim, "gw-hub-1");
    let v =
        hubsim::twin::apply_desired_patch(&running.sim, &key, &json!({"interval": "5s"})).unwrap();
    let (version, patch) = next_matching(&mut events, |e| match e {
        SessionEvent::DesiredPatch { version, patch } => Some((version, patch)),
        _ => None,
    })
    .await;
    assert_eq!((version, patch["interval"].as_str()), (v, Some("5s")));

    let sim = running.sim.clone();
    let key2 = key.clone();
    let call = tokio::spawn(async move {
        hubsim::twin::invoke_method(&sim, &key2, "ping", &json!({"x": 1}), WAIT).await
    });
    let rid = next_matching(&mut events, |e| match e {
        SessionEvent::Method { name, rid, payload } if name == "ping" => {
            assert_eq!(payload["x"], 1);
            Some(rid)
        }
        _ => None,
    })
    .await;
    handle.respond_to_method(&rid, 200, json!({"pong": true}));
    assert_eq!(call.await.unwrap().unwrap(), (200, json!({"pong": true})));

    hubsim::twin::send_c2d(
        &running.sim,
        &key,
        hubsim::state::C2dMessage {
            body: "valve=open".into(),
            properties: vec![
                ("$.mid".into(), "c2d-1".into()),
                ("color".into(), "red".into()),
            ],
        },
    )
    .unwrap();
    let (body, properties, first) = next_c2d(&mut events).await;
    assert_eq!(&body[..], b"valve=open");
    assert!(properties.contains(&("color".to_string(), "red".to_string())));
    // Until the daemon says so, the session does not complete the message, and the hub
    // delivers it again on the next connection.
    let c2d_state = |sim: &hubsim::state::Sim| {
        let records = sim.c2d_records(&key);
        assert_eq!(records.len(), 1, "{records:?}");
        (records[0].state, records[0].delivery_count)
    };
    use hubsim::state::C2dState;
    // A PUBACK would have gone out before this reported patch, on the same connection.
    handle.report(json!({"probe": 1})).await.unwrap();
    assert_eq!(c2d_state(&running.sim), (C2dState::Invisible, 1));
    assert!(drop_connection(&running.sim, "gw-hub-1"));
    let (again, _, second) = next_c2d(&mut events).await;
    assert_eq!(&again[..], b"valve=open");
    assert_eq!(c2d_state(&running.sim), (C2dState::Invisible, 2));
    // The first delivery's token is of a connection that ended: completing it does nothing
    // (its packet id could be another message's on this connection).
    assert!(!handle.is_current(&first) && handle.is_current(&second));
    handle.complete_c2d(first);
    handle.report(json!({"probe": 2})).await.unwrap();
    assert_eq!(c2d_state(&running.sim), (C2dState::Invisible, 2));
    // This connection's token completes it.
    handle.complete_c2d(second);
    assert!(
        running
            .sim
            .wait_until(WAIT, |s| c2d_state(s) == (C2dState::Completed, 2))
            .await,
        "{:?}",
        c2d_state(&running.sim)
    );

    let too_big = TelemetryMessage {
        body: vec![b'x'; 300 * 1024].into(),
        ..message(99)
    };
    let err = handle.publish(too_big).await.unwrap_err();
    assert!(err.to_string().contains("exceeds"), "{err}");
    handle.shutdown();
}

#[tokio::test]
async fn dropped_connections_lose_no_message() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let (handle, mut events) = session(&running, "gw-hub-2", Duration::from_secs(3600)).await;
    next_matching(&mut events, |e| {
        matches!(e, SessionEvent::Twin { .. }).then_some(())
    })
    .await;
    let publisher = {
        let handle = handle.clone();
        tokio::spawn(async move {
            for i in 0..200 {
                handle.publish(message(i)).await.unwrap();
            }
        })
    };
    // Cut the connection three times while messages flow.
    for _ in 0..3 {
        assert!(
            running
                .sim
                .wait_until(WAIT, |s| live_connection(s, "gw-hub-2").is_some())
                .await
        );
        drop_connection(&running.sim, "gw-hub-2");
        next_matching(&mut events, |e| {
            matches!(e, SessionEvent::Connected).then_some(())
        })
        .await;
    }
    tokio::time::timeout(LONG_WAIT, publisher)
        .await
        .unwrap()
        .unwrap();
    let ids = message_ids(&running.sim, "gw-hub-2");
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        unique.len(),
        200,
        "every message arrived (duplicates allowed: {})",
        ids.len() - unique.len()
    );
}

#[tokio::test]
async fn short_token_lifetimes_are_renewed_without_loss() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    // Tokens of 3 s, renewed 1 s before expiry: several renewals during the test.
    let (handle, mut events) = session(&running, "gw-hub-3", Duration::from_secs(3)).await;
    next_matching(&mut events, |e| {
        matches!(e, SessionEvent::Twin { .. }).then_some(())
    })
    .await;
    let sim = running.sim.clone();
    let connects_before = hub_connects(&sim, "gw-hub-3");
    let mut i = 0;
    while hub_connects(&sim, "gw-hub-3") < connects_before + 3 {
        handle.publish(message(i)).await.unwrap();
        i += 1;
        tokio::task::yield_now().await;
        if i % 50 == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let ids = message_ids(&running.sim, "gw-hub-3");
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), i);
    let expired = connection_events(&running.sim, "gw-hub-3")
        .iter()
        .any(|e| e.reason.as_deref() == Some("SAS token expired"));
    assert!(
        !expired,
        "the agent renews before the hub has to cut it off"
    );
}

fn unique(mut ids: Vec<String>) -> Vec<String> {
    ids.sort();
    ids.dedup();
    ids
}

#[tokio::test]
async fn a_hub_that_caps_token_lifetimes_costs_no_message() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    // The agent asks for hour-long tokens, the hub cuts every connection after 2 s.
    running.sim.faults.lock().unwrap().token_lifetime_cap = Some(Duration::from_secs(2));
    let (handle, mut events) = session(&running, "gw-hub-4", Duration::from_secs(3600)).await;
    next_matching(&mut events, |e| {
        matches!(e, SessionEvent::Twin { .. }).then_some(())
    })
    .await;
    let sim = running.sim.clone();
    let connects_before = hub_connects(&sim, "gw-hub-4");
    let mut sent = 0;
    while hub_connects(&sim, "gw-hub-4") < connects_before + 2 {
        tokio::time::timeout(WAIT, handle.publish(message(sent)))
            .await
            .expect("a publish completes once the session is back")
            .unwrap();
        sent += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let expired = connection_events(&sim, "gw-hub-4")
        .iter()
        .filter(|e| e.reason.as_deref() == Some("SAS token expired"))
        .count();
    assert!(expired >= 2, "the hub did cut the connections ({expired})");
    assert_eq!(
        unique(message_ids(&running.sim, "gw-hub-4")),
        unique((0..sent).map(|i| format!("m-{i}")).collect())
    );
    handle.shutdown();
}

#[tokio::test]
async fn desired_patches_arrive_once_each_in_version_order() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let (handle, mut events) = session(&running, "gw-hub-5", Duration::from_secs(3600)).await;
    let start = next_matching(&mut events, |e| match e {
        SessionEvent::Twin {
            desired_version, ..
        } => Some(desired_version),
        _ => None,
    })
    .await;
    let key = device_key(&running.sim, "gw-hub-5");
    for i in 1..=10 {
        hubsim::twin::apply_desired_patch(&running.sim, &key, &json!({"step": i})).unwrap();
    }
    let mut seen = Vec::new();
    while seen.len() < 10 {
        let (version, step) = next_matching(&mut events, |e| match e {
            SessionEvent::DesiredPatch { version, patch } => Some((version, patch["step"].clone())),
            _ => None,
        })
        .await;
        seen.push((version, step));
    }
    let expected: Vec<_> = (1..=10u64).map(|i| (start + i, json!(i))).collect();
    assert_eq!(seen, expected);

    // After a reconnect the full twin carries the latest version; nothing is delivered twice.
    drop_connection(&running.sim, "gw-hub-5");
    let (version, desired) = next_matching(&mut events, |e| match e {
        SessionEvent::Twin {
            desired_version,
            desired,
            ..
        } => Some((desired_version, desired)),
        SessionEvent::DesiredPatch { version, .. } => panic!("patch {version} delivered again"),
        _ => None,
    })
    .await;
    assert_eq!((version, desired["step"].clone()), (start + 10, json!(10)));
    handle.shutdown();
}

#[tokio::test]
async fn an_outage_holds_publishes_until_the_hub_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let (handle, mut events) = session(&running, "gw-hub-6", Duration::from_secs(3600)).await;
    next_matching(&mut events, |e| {
        matches!(e, SessionEvent::Twin { .. }).then_some(())
    })
    .await;
    // The hub refuses every CONNECT (CONNACK 3) for 3 s and drops the device now.
    refuse_connections(&running.sim, Duration::from_secs(3));
    drop_connection(&running.sim, "gw-hub-6");
    next_matching(&mut events, |e| {
        matches!(e, SessionEvent::Disconnected { .. }).then_some(())
    })
    .await;
    // While disconnected a reported patch fails fast; telemetry waits.
    let err = handle.report(json!({"x": 1})).await.unwrap_err();
    assert_eq!(err, hubagent::hub::TwinError::Disconnected);
    let publisher = {
        let handle = handle.clone();
        tokio::spawn(async move { handle.publish(message(1)).await })
    };
    // A busy hub is not a credential problem: no Unauthorized, just reconnects until it works.
    next_matching(&mut events, |e| match e {
        SessionEvent::Unauthorized => panic!("CONNACK 3 taken for a refusal of the credentials"),
        SessionEvent::Connected => Some(()),
        _ => None,
    })
    .await;
    tokio::time::timeout(WAIT, publisher)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        message_ids(&running.sim, "gw-hub-6"),
        vec!["m-1".to_string()]
    );
    handle.shutdown();
}

#[tokio::test]
async fn a_disabled_device_is_reported_as_unauthorized() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let (handle, mut events) = session(&running, "gw-hub-7", Duration::from_secs(3600)).await;
    next_matching(&mut events, |e| {
        matches!(e, SessionEvent::Connected).then_some(())
    })
    .await;
    let key = device_key(&running.sim, "gw-hub-7");
    running
        .sim
        .mutate(|s| {
            s.devices.get_mut(&key).unwrap().status = hubsim::state::Status::Disabled;
        })
        .unwrap();
    drop_connection(&running.sim, "gw-hub-7");
    next_matching(&mut events, |e| {
        matches!(e, SessionEvent::Unauthorized).then_some(())
    })
    .await;
    handle.shutdown();
}

#[tokio::test]
async fn an_x509_device_provisions_and_keeps_one_connection() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let (cert, key) = enroll_x509(&running.sim, "gw-x509-1", dir.path());
    let attestation = hubagent::config::Attestation::X509 {
        identity_cert: cert,
        identity_pk: key,
        expiry_warning: std::time::Duration::from_secs(30 * 86_400),
    };
    let (credential, _) =
        hubagent::identity::credential::Credential::load(&attestation, "gw-x509-1").unwrap();
    let Credential::X509 {
        cert_chain_pem,
        key,
    } = &credential
    else {
        panic!("not an X.509 credential")
    };
    let tls = hubagent::identity::tls::client_config(
        Some(&running.ca_pem_path),
        Some((cert_chain_pem.as_slice(), key.client_key())),
    )
    .unwrap();
    let request = hubagent::provisioning::dps::DpsRequest {
        endpoint_host: "localhost".into(),
        port: running.mqtt_addr.port(),
        websocket: false,
        proxy: None,
        auto: None,
        id_scope: running.sim.read(|s| s.id_scope.clone()),
        registration_id: "gw-x509-1".into(),
        payload: None,
        csr: None,
        timeout: WAIT,
    };
    let assignment = hubagent::provisioning::dps::register(&request, &credential, tls.clone())
        .await
        .unwrap();
    assert_eq!(assignment.device_id, "gw-x509-1");
    assert_eq!(
        assignment.registration_state["x509"]["certificateInfo"]["subjectName"]
            .as_str()
            .map(|s| s.contains("gw-x509-1")),
        Some(true),
        "{}",
        assignment.registration_state
    );
    // A 2 s "token lifetime" means nothing to a certificate: no renewal reconnects.
    let (handle, mut events, _task) = spawn(HubParams {
        hub: assignment.assigned_hub,
        device_id: assignment.device_id,
        port: running.mqtt_addr.port(),
        websocket: false,
        proxy: None,
        auto: None,
        credential,
        tls,
        keep_alive: Duration::from_secs(30),
        sas_ttl: Duration::from_secs(2),
        renew_before: Duration::from_secs(1),
        backoff_max: Duration::from_secs(2),
        unavailable_backoff_max: Duration::from_secs(2),
        max_message_size: 256 * 1024,
        inflight: 8,
        desired_version: 0,
        model_id: None,
    });
    next_matching(&mut events, |e| {
        matches!(e, SessionEvent::Twin { .. }).then_some(())
    })
    .await;
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut sent = 0;
    while tokio::time::Instant::now() < until {
        handle.publish(message(sent)).await.unwrap();
        sent += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(message_ids(&running.sim, "gw-x509-1").len(), sent);
    assert_eq!(hub_connects(&running.sim, "gw-x509-1"), 1);
    let auth =
        records(&running.sim, "gw-x509-1")[0].system_properties["iothub-connection-auth-method"]
            .clone();
    assert!(auth.contains("\"type\":\"x509\""), "{auth}");
    handle.shutdown();
}

#[tokio::test]
async fn stale_desired_patches_are_ignored_and_gaps_heal_with_a_full_get() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let (_handle, mut events) = session(&running, "gw-hub-4", Duration::from_secs(3600)).await;
    next_matching(&mut events, |e| {
        matches!(e, SessionEvent::Twin { .. }).then_some(())
    })
    .await;
    let key = device_key(&running.sim, "gw-hub-4");
    let v1 = hubsim::twin::apply_desired_patch(&running.sim, &key, &json!({"a": 1})).unwrap();
    next_matching(&mut events, |e| {
        matches!(e, SessionEvent::DesiredPatch { .. }).then_some(())
    })
    .await;
    let conn = live_connection(&running.sim, "gw-hub-4").unwrap();
    let push = |version: u64, body: serde_json::Value| {
        conn.tx
            .send(hubsim::state::ConnCommand::Publish {
                topic: format!("$iothub/twin/PATCH/properties/desired/?$version={version}"),
                payload: body.to_string().into(),
                qos: rumqttc::QoS::AtMostOnce,
            })
            .unwrap();
    };
    // A replayed (stale) patch is ignored…
    push(v1, json!({"a": "stale", "$version": v1}));
    // …and a patch that skips a version makes the session fetch the whole twin.
    hubsim::twin::apply_desired_patch(&running.sim, &key, &json!({"b": 2})).unwrap();
    // (the real v2 above reached the device; now pretend v4 arrives while v3 was lost)
    let v2 = next_matching(&mut events, |e| match e {
        SessionEvent::DesiredPatch { version, patch } => {
            assert_ne!(patch.get("a"), Some(&json!("stale")), "stale patch applied");
            Some(version)
        }
        _ => None,
    })
    .await;
    hubsim::twin::apply_desired_patch(&running.sim, &key, &json!({"c": 3})).unwrap();
    next_matching(&mut events, |e| {
        matches!(e, SessionEvent::DesiredPatch { .. }).then_some(())
    })
    .await;
    running
        .sim
        .mutate(|s| {
            let t = &mut s.devices.get_mut(&key).unwrap().twin;
            t.desired.insert("d".into(), json!(4));
            t.desired_version += 1;
        })
        .unwrap();
    push(v2 + 3, json!({"e": 5, "$version": v2 + 3}));
    let (desired, version) = next_matching(&mut events, |e| match e {
        SessionEvent::Twin {
            desired,
            desired_version,
            ..
        } => Some((desired, desired_version)),
        SessionEvent::DesiredPatch { version, .. } => {
            panic!("patch {version} applied across a gap")
        }
        _ => None,
    })
    .await;
    assert_eq!(
        version,
        v2 + 2,
        "the full twin carries hubsim's real version"
    );
    assert_eq!(
        desired["d"], 4,
        "the full GET brought what the lost patch carried"
    );
}

#[tokio::test]
async fn twin_requests_the_hub_throttles_are_sent_again() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    // The twin GET of the first connection is throttled: the session asks again.
    running.sim.faults.lock().unwrap().twin_throttle = 1;
    let (handle, mut events) = session(&running, "gw-hub-8", Duration::from_secs(3600)).await;
    next_matching(&mut events, |e| match e {
        SessionEvent::Twin { .. } => Some(()),
        _ => None,
    })
    .await;
    assert_eq!(running.sim.faults.lock().unwrap().twin_throttle, 0);

    // A reported patch throttled twice is still applied, once.
    running.sim.faults.lock().unwrap().twin_throttle = 2;
    let version = handle
        .report(json!({"agent": {"state": "throttled, then ok"}}))
        .await
        .unwrap();
    assert_eq!(running.sim.faults.lock().unwrap().twin_throttle, 0);
    assert_eq!(version, 1);
    assert_eq!(
        reported(&running.sim, "gw-hub-8", "agent")["state"],
        "throttled, then ok"
    );
}
