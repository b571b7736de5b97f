//! Devices talking MQTT over TLS to a hubsim on loopback, with rumqttc as the client.

use std::time::Duration;

use hubagent_tests::*;
use rumqttc::{ConnectReturnCode, ConnectionError, Packet, QoS};
use serde_json::{Value, json};

fn dps_username(scope: &str, registration_id: &str) -> String {
    format!("{scope}/registrations/{registration_id}/api-version=2019-03-31")
}

#[tokio::test]
async fn dps_registers_an_individual_symmetric_key_enrollment() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let key = enroll(&running.sim, "dev-01");
    let scope = running.sim.read(|s| s.id_scope.clone());
    let password = sas_token(
        &key,
        &format!("{scope}/registrations/dev-01"),
        in_an_hour(),
        Some("registration"),
    );
    let (client, mut el) = mqtt_client(
        &running,
        "dev-01",
        &dps_username(&scope, "dev-01"),
        &password,
    );
    client
        .subscribe("$dps/registrations/res/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    client
        .publish(
            "$dps/registrations/PUT/iotdps-register/?$rid=7",
            QoS::AtLeastOnce,
            false,
            r#"{"payload": {"site": "north"}, "registrationId": "dev-01"}"#,
        )
        .await
        .unwrap();
    let (topic, body) = until(&mut el, |p| match p {
        Packet::Publish(p) => Some((p.topic.clone(), p.payload.clone())),
        _ => None,
    })
    .await
    .unwrap();
    assert!(
        topic.starts_with("$dps/registrations/res/202/?$rid=7&retry-after="),
        "{topic}"
    );
    let accepted: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(accepted["status"], "assigning");
    let operation = accepted["operationId"].as_str().unwrap().to_string();

    client
        .publish(
            format!(
                "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=8&operationId={operation}"
            ),
            QoS::AtLeastOnce,
            false,
            " ",
        )
        .await
        .unwrap();
    let (topic, body) = until(&mut el, |p| match p {
        Packet::Publish(p) => Some((p.topic.clone(), p.payload.clone())),
        _ => None,
    })
    .await
    .unwrap();
    assert_eq!(topic, "$dps/registrations/res/200/?$rid=8");
    let done: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(done["status"], "assigned");
    let state = &done["registrationState"];
    assert_eq!(state["registrationId"], "dev-01");
    assert_eq!(state["assignedHub"], "localhost");
    assert_eq!(state["deviceId"], "dev-01");
    assert_eq!(state["payload"], json!({"site": "north"}));
    // The device now exists in the hub and can connect with the enrollment's key.
    assert!(running.sim.read(|s| {
        s.devices
            .contains_key(&hubsim::state::Store::device_key("localhost", "dev-01"))
    }));
}

#[tokio::test]
async fn dps_refuses_a_wrong_key_with_connack_5() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    enroll(&running.sim, "dev-02");
    let scope = running.sim.read(|s| s.id_scope.clone());
    let wrong = hubsim::state::random_key();
    let password = sas_token(
        &wrong,
        &format!("{scope}/registrations/dev-02"),
        in_an_hour(),
        None,
    );
    let (_client, mut el) = mqtt_client(
        &running,
        "dev-02",
        &dps_username(&scope, "dev-02"),
        &password,
    );
    let err = until(&mut el, |_| Some(())).await.unwrap_err();
    assert!(
        matches!(
            err,
            ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized)
        ),
        "{err:?}"
    );
    let refused = connection_events(&running.sim, "dev-02")
        .iter()
        .any(|e| e.event == "refused" && e.service == "dps");
    assert!(refused);
}

#[tokio::test]
async fn hub_records_telemetry_with_decoded_properties_and_acks_it() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let key = add_device(&running.sim, "dev-03");
    let (client, mut el) = hub_client(&running, "dev-03", &key, in_an_hour());
    client
        .publish(
            "devices/dev-03/messages/events/%24.mid=m-1&%24.ct=application%2Fjson&%24.ce=utf-8&alert=high%20temp",
            QoS::AtLeastOnce,
            false,
            r#"{"temp":21.5}"#,
        )
        .await
        .unwrap();
    until(&mut el, |p| matches!(p, Packet::PubAck(_)).then_some(()))
        .await
        .unwrap();
    let records = records(&running.sim, "dev-03");
    assert_eq!(records.len(), 1);
    let record = &records[0];
    assert_eq!(record.body.as_deref(), Some(r#"{"temp":21.5}"#));
    assert_eq!(record.properties["alert"], "high temp");
    assert_eq!(record.system_properties["message-id"], "m-1");
    assert_eq!(record.system_properties["content-type"], "application/json");
    assert_eq!(
        record.system_properties["iothub-connection-device-id"],
        "dev-03"
    );
}

/// With `--telemetry-keep`, the record keeps only recent messages while `/sim/status` counts
/// every one (benchmarks send millions).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_is_counted_in_full_and_recorded_up_to_the_keep_limit() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    running.sim.records.lock().unwrap().telemetry_keep = 4;
    let key = add_device(&running.sim, "dev-keep");
    let (client, mut el) = hub_client(&running, "dev-keep", &key, in_an_hour());
    for n in 1..=20 {
        client
            .publish(
                format!("devices/dev-keep/messages/events/%24.mid=m-{n}"),
                QoS::AtLeastOnce,
                false,
                format!("{{\"n\":{n}}}"),
            )
            .await
            .unwrap();
        until(&mut el, |p| matches!(p, Packet::PubAck(_)).then_some(()))
            .await
            .unwrap();
    }
    let records = records(&running.sim, "dev-keep");
    assert!(
        (4..8).contains(&records.len()),
        "{} records kept",
        records.len()
    );
    assert_eq!(
        records.last().unwrap().system_properties["message-id"],
        "m-20"
    );
    let (ca, url, auth) = (
        running.ca_pem.clone(),
        url(&running, "/sim/status"),
        service_sas(&running.hub_connection_string),
    );
    let status: Value = tokio::task::spawn_blocking(move || {
        https_agent(&ca)
            .get(&url)
            .header("Authorization", &auth)
            .call()
            .unwrap()
            .into_body()
            .read_json()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(status["telemetryReceived"]["dev-keep"], 20, "{status}");
}

#[tokio::test]
async fn twin_get_reported_patch_and_desired_push() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let key = add_device(&running.sim, "dev-04");
    let (client, mut el) = hub_client(&running, "dev-04", &key, in_an_hour());
    client
        .subscribe_many(
            [
                "$iothub/twin/res/#",
                "$iothub/twin/PATCH/properties/desired/#",
            ]
            .map(|t| rumqttc::SubscribeFilter::new(t.into(), QoS::AtLeastOnce)),
        )
        .await
        .unwrap();
    until(&mut el, |p| matches!(p, Packet::SubAck(_)).then_some(()))
        .await
        .unwrap();
    client
        .publish(
            "$iothub/twin/PATCH/properties/reported/?$rid=r1",
            QoS::AtLeastOnce,
            false,
            r#"{"fw":"1.0"}"#,
        )
        .await
        .unwrap();
    let topic = until(&mut el, |p| match p {
        Packet::Publish(p) => Some(p.topic.clone()),
        _ => None,
    })
    .await
    .unwrap();
    assert!(
        topic.starts_with("$iothub/twin/res/204/?$rid=r1&$version="),
        "{topic}"
    );

    client
        .publish("$iothub/twin/GET/?$rid=g1", QoS::AtLeastOnce, false, " ")
        .await
        .unwrap();
    let twin: Value = until(&mut el, |p| match p {
        Packet::Publish(p) if p.topic == "$iothub/twin/res/200/?$rid=g1" => {
            serde_json::from_slice(&p.payload).ok()
        }
        _ => None,
    })
    .await
    .unwrap();
    assert_eq!(twin["reported"]["fw"], "1.0");
    let before = twin["desired"]["$version"].as_u64().unwrap();

    let device_key = hubsim::state::Store::device_key("localhost", "dev-04");
    let version =
        hubsim::twin::apply_desired_patch(&running.sim, &device_key, &json!({"interval": 10}))
            .unwrap();
    assert!(version > before);
    let (topic, patch): (String, Value) = until(&mut el, |p| match p {
        Packet::Publish(p)
            if p.topic
                .starts_with("$iothub/twin/PATCH/properties/desired/") =>
        {
            Some((p.topic.clone(), serde_json::from_slice(&p.payload).unwrap()))
        }
        _ => None,
    })
    .await
    .unwrap();
    assert_eq!(
        topic,
        format!("$iothub/twin/PATCH/properties/desired/?$version={version}")
    );
    assert_eq!(patch["interval"], 10);
    assert_eq!(patch["$version"], version);
}

#[tokio::test]
async fn qos2_publish_closes_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let key = add_device(&running.sim, "dev-05");
    let (client, mut el) = hub_client(&running, "dev-05", &key, in_an_hour());
    client
        .publish(
            "devices/dev-05/messages/events/",
            QoS::ExactlyOnce,
            false,
            "x",
        )
        .await
        .unwrap();
    assert!(until(&mut el, |_| None::<()>).await.is_err());
    assert!(
        running
            .sim
            .wait_until(WAIT, |sim| {
                connection_events(sim, "dev-05").iter().any(|e| {
                    e.event == "disconnected"
                        && e.reason.as_deref().is_some_and(|r| r.contains("QoS 2"))
                })
            })
            .await
    );
    assert!(records(&running.sim, "dev-05").is_empty());
}

#[tokio::test]
async fn oversize_message_closes_the_connection_and_is_not_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let key = add_device(&running.sim, "dev-06");
    let (client, mut el) = hub_client(&running, "dev-06", &key, in_an_hour());
    client
        .publish(
            "devices/dev-06/messages/events/",
            QoS::AtLeastOnce,
            false,
            vec![b'a'; 256 * 1024 + 1],
        )
        .await
        .unwrap();
    assert!(
        until(&mut el, |p| matches!(p, Packet::PubAck(_)).then_some(()))
            .await
            .is_err()
    );
    assert!(records(&running.sim, "dev-06").is_empty());
}

#[tokio::test]
async fn a_second_connection_closes_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let key = add_device(&running.sim, "dev-07");
    let expiry = in_an_hour();
    let (_c1, mut el1) = hub_client(&running, "dev-07", &key, expiry);
    until(&mut el1, |p| matches!(p, Packet::ConnAck(_)).then_some(()))
        .await
        .unwrap();
    let (_c2, mut el2) = hub_client(&running, "dev-07", &key, expiry);
    until(&mut el2, |p| matches!(p, Packet::ConnAck(_)).then_some(()))
        .await
        .unwrap();
    assert!(
        until(&mut el1, |_| None::<()>).await.is_err(),
        "first connection must be closed"
    );
}

#[tokio::test]
async fn the_hub_disconnects_when_the_token_expires() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let key = add_device(&running.sim, "dev-08");
    let expiry = hubsim::auth::unix_now() + 2;
    let (_client, mut el) = hub_client(&running, "dev-08", &key, expiry);
    until(&mut el, |p| matches!(p, Packet::ConnAck(_)).then_some(()))
        .await
        .unwrap();
    assert!(until(&mut el, |_| None::<()>).await.is_err());
    assert!(
        hubsim::auth::unix_now() + 1 >= expiry,
        "closed before the token expired"
    );
    let reason = connection_events(&running.sim, "dev-08")
        .into_iter()
        .rev()
        .find(|e| e.event == "disconnected")
        .and_then(|e| e.reason);
    assert_eq!(reason.as_deref(), Some("SAS token expired"));
}

#[tokio::test]
async fn refusing_connections_answers_server_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let key = add_device(&running.sim, "dev-09");
    refuse_connections(&running.sim, Duration::from_secs(60));
    let (_client, mut el) = hub_client(&running, "dev-09", &key, in_an_hour());
    let err = until(&mut el, |_| Some(())).await.unwrap_err();
    assert!(
        matches!(
            err,
            ConnectionError::ConnectionRefused(ConnectReturnCode::ServiceUnavailable)
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_wrong_device_key_is_refused_by_the_hub() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    add_device(&running.sim, "dev-10");
    let wrong = hubsim::state::random_key();
    let (_client, mut el) = hub_client(&running, "dev-10", &wrong, in_an_hour());
    let err = until(&mut el, |_| Some(())).await.unwrap_err();
    assert!(
        matches!(
            err,
            ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized)
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn the_delay_fault_holds_answers_back() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let key = add_device(&running.sim, "dev-11");
    running.sim.faults.lock().unwrap().delay = Some(Duration::from_millis(400));
    let (client, mut el) = hub_client(&running, "dev-11", &key, in_an_hour());
    until(&mut el, |p| matches!(p, Packet::ConnAck(_)).then_some(()))
        .await
        .unwrap();
    let sent = std::time::Instant::now();
    client
        .publish(
            "devices/dev-11/messages/events/",
            QoS::AtLeastOnce,
            false,
            "slow",
        )
        .await
        .unwrap();
    until(&mut el, |p| matches!(p, Packet::PubAck(_)).then_some(()))
        .await
        .unwrap();
    // A lower bound only: the fault must delay the answer at least as long as asked.
    assert!(
        sent.elapsed() >= Duration::from_millis(400),
        "{:?}",
        sent.elapsed()
    );
}

/// Reported patches on both sides of every limit IoT Hub puts on twins: accepted with 204, refused
/// with 400 (413 for size) and a message naming the property, leaving the twin as it was.
#[tokio::test]
async fn reported_patches_are_held_to_the_hubs_twin_limits() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let key = add_device(&running.sim, "dev-limits");
    let (client, mut el) = hub_client(&running, "dev-limits", &key, in_an_hour());
    client
        .subscribe("$iothub/twin/res/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    until(&mut el, |p| matches!(p, Packet::SubAck(_)).then_some(()))
        .await
        .unwrap();
    for (i, (what, patch, accepted)) in twin_limit_cases().into_iter().enumerate() {
        let send = |rid: String, body: Value| {
            let client = client.clone();
            async move {
                client
                    .publish(
                        format!("$iothub/twin/PATCH/properties/reported/?$rid={rid}"),
                        QoS::AtLeastOnce,
                        false,
                        body.to_string(),
                    )
                    .await
                    .unwrap();
            }
        };
        send(format!("c{i}"), patch.clone()).await;
        let prefix = "$iothub/twin/res/";
        let (status, body): (u16, Value) = until(&mut el, |p| match p {
            Packet::Publish(p) if p.topic.contains(&format!("?$rid=c{i}")) => {
                let status = p.topic[prefix.len()..prefix.len() + 3].parse().unwrap();
                Some((
                    status,
                    serde_json::from_slice(&p.payload).unwrap_or(Value::Null),
                ))
            }
            _ => None,
        })
        .await
        .unwrap();
        if accepted {
            assert_eq!(status, 204, "{what}: {body}");
            // Leave the twin empty for the next case.
            let clear: serde_json::Map<String, Value> = patch
                .as_object()
                .unwrap()
                .keys()
                .map(|k| (k.clone(), Value::Null))
                .collect();
            send(format!("x{i}"), Value::Object(clear)).await;
            until(&mut el, |p| match p {
                Packet::Publish(p) if p.topic.contains(&format!("?$rid=x{i}")) => {
                    assert!(p.topic.starts_with("$iothub/twin/res/204/"), "{}", p.topic);
                    Some(())
                }
                _ => None,
            })
            .await
            .unwrap();
        } else {
            assert!(status == 400 || status == 413, "{what}: {status} {body}");
            assert!(body["message"].as_str().is_some(), "{what}: {body}");
        }
    }
    let twin = hubsim::twin::device_twin_document(
        &running.sim,
        &hubsim::state::Store::device_key("localhost", "dev-limits"),
    )
    .unwrap();
    assert_eq!(
        twin["reported"],
        json!({"$version": twin["reported"]["$version"]})
    );
}
