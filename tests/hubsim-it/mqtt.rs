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
    assert_eq!(state["assignedHub"], hubsim::DEFAULT_HUB);
    assert_eq!(state["deviceId"], "dev-01");
    assert_eq!(state["payload"], json!({"site": "north"}));
    // The device now exists in the hub and can connect with the enrollment's key.
    assert!(
        running
            .sim
            .read(|s| { s.devices.contains_key(&device_key(&running.sim, "dev-01")) })
    );
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

    let device_key = device_key(&running.sim, "dev-04");
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

/// How a CONNECT of `client` ends: Ok on CONNACK 0, else the refusal.
async fn connack(client: &mut rumqttc::EventLoop) -> Result<(), ConnectionError> {
    until(client, |p| matches!(p, Packet::ConnAck(_)).then_some(())).await
}

fn refused(result: Result<(), ConnectionError>) -> bool {
    matches!(
        result,
        Err(ConnectionError::ConnectionRefused(
            ConnectReturnCode::NotAuthorized
        ))
    )
}

#[tokio::test]
async fn the_hub_is_another_host_than_dps_and_knows_only_its_own_name() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let hub = hubsim::DEFAULT_HUB;
    assert_eq!(running.sim.config.hubs, [hub]);
    assert_eq!(running.hub_addrs[0].1.ip().to_string(), hub);
    assert_ne!(running.hub_addrs[0].1.ip(), running.mqtt_addr.ip());
    let key = add_device(&running.sim, "dev-20");
    let (user, pass) = hub_credentials(hub, "dev-20", &key, in_an_hour());

    // The hub's own host, its own name in the username and `sr`: accepted.
    let (_ok, mut el) = mqtt_client_at(&running, hub, "dev-20", &user, &pass);
    connack(&mut el).await.unwrap();
    // The same CONNECT sent to the DPS endpoint: DPS does not know hubs' usernames.
    let (_c, mut el) = mqtt_client_at(&running, "localhost", "dev-20", &user, &pass);
    assert!(refused(connack(&mut el).await));
    // The hub's host, but another host named in the username (and `sr`).
    let (user_dps, pass_dps) = hub_credentials("localhost", "dev-20", &key, in_an_hour());
    let (_c, mut el) = mqtt_client_at(&running, hub, "dev-20", &user_dps, &pass_dps);
    assert!(refused(connack(&mut el).await));
    // The right username, a token for another host (`sr`).
    let (_c, mut el) = mqtt_client_at(&running, hub, "dev-20", &user, &pass_dps);
    assert!(refused(connack(&mut el).await));
    // A DPS registration sent to the hub's host.
    let scope = running.sim.read(|s| s.id_scope.clone());
    enroll(&running.sim, "dev-21");
    let (_c, mut el) = mqtt_client_at(
        &running,
        hub,
        "dev-21",
        &dps_username(&scope, "dev-21"),
        "SharedAccessSignature sr=x&sig=eA%3D%3D&se=1",
    );
    assert!(refused(connack(&mut el).await));

    let reasons: Vec<String> = connection_events(&running.sim, "dev-20")
        .into_iter()
        .filter(|e| e.event == "refused")
        .filter_map(|e| e.reason)
        .collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(
        reasons[0].contains("reached the DPS endpoint"),
        "{reasons:?}"
    );
    assert!(reasons[1].contains("reached the host of"), "{reasons:?}");
    assert!(
        reasons[2].contains("SAS token is for resource"),
        "{reasons:?}"
    );
    let dps_at_hub = connection_events(&running.sim, "dev-21");
    assert!(
        dps_at_hub[0]
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("DPS is another host")),
        "{dps_at_hub:?}"
    );
}

#[tokio::test]
async fn twin_answers_go_only_to_subscribers_of_twin_res() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let key = add_device(&running.sim, "dev-22");
    let (client, mut el) = hub_client(&running, "dev-22", &key, in_an_hour());
    // Not subscribed: the reported patch is applied, but neither it nor the GET is answered.
    client
        .publish(
            "$iothub/twin/PATCH/properties/reported/?$rid=p0",
            QoS::AtLeastOnce,
            false,
            r#"{"fw":"2.0"}"#,
        )
        .await
        .unwrap();
    client
        .publish("$iothub/twin/GET/?$rid=g0", QoS::AtLeastOnce, false, " ")
        .await
        .unwrap();
    client
        .subscribe("$iothub/twin/res/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    client
        .publish("$iothub/twin/GET/?$rid=g1", QoS::AtLeastOnce, false, " ")
        .await
        .unwrap();
    // Every publish the device receives until g1's answer: answers come in request order, so
    // p0's or g0's would come first.
    let mut received = Vec::new();
    let twin = until(&mut el, |p| match p {
        Packet::Publish(p) => {
            received.push(p.topic.clone());
            p.topic
                .contains("$rid=g1")
                .then(|| serde_json::from_slice::<Value>(&p.payload).unwrap())
        }
        _ => None,
    })
    .await
    .unwrap();
    assert_eq!(received, ["$iothub/twin/res/200/?$rid=g1"]);
    assert_eq!(twin["reported"]["fw"], "2.0");
}

#[tokio::test]
async fn an_unacknowledged_c2d_message_is_delivered_again_on_the_next_connection() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let key = add_device(&running.sim, "dev-23");
    let device = device_key(&running.sim, "dev-23");
    let hub = hubsim::DEFAULT_HUB;
    let connect = || {
        let (user, pass) = hub_credentials(hub, "dev-23", &key, in_an_hour());
        let mut options = mqtt_options_at(&running, hub, "dev-23", &user, &pass);
        options.set_manual_acks(true);
        rumqttc::AsyncClient::new(options, 16)
    };
    let send = |mid: &str| {
        let message = hubsim::state::C2dMessage {
            body: format!("body of {mid}").into(),
            properties: vec![("$.mid".into(), mid.into())],
        };
        hubsim::twin::send_c2d(&running.sim, &device, message).unwrap();
    };
    let receive = |client: rumqttc::AsyncClient, mut el: rumqttc::EventLoop| async move {
        client
            .subscribe("devices/dev-23/messages/devicebound/#", QoS::AtLeastOnce)
            .await
            .unwrap();
        let publish = until(&mut el, |p| match p {
            Packet::Publish(p) => Some(p.clone()),
            _ => None,
        })
        .await
        .unwrap();
        (client, el, publish)
    };
    let disconnected = |n: usize| {
        let sim = running.sim.clone();
        async move {
            let gone = sim
                .wait_until(WAIT, |s| {
                    connection_events(s, "dev-23")
                        .iter()
                        .filter(|e| e.event == "disconnected")
                        .count()
                        >= n
                })
                .await;
            assert!(gone, "connection {n} did not end");
        }
    };
    // What `GET /sim/c2d/dev-23` says: (messageId, state, deliveryCount) of each message.
    let states = || {
        let agent = https_agent(&running.ca_pem);
        let u = url(&running, "/sim/c2d/dev-23");
        let auth = service_sas(&running.hub_connection_string);
        async move {
            let records: Value = tokio::task::spawn_blocking(move || {
                agent
                    .get(&u)
                    .header("Authorization", &auth)
                    .call()
                    .unwrap()
                    .into_body()
                    .read_json()
                    .unwrap()
            })
            .await
            .unwrap();
            records
                .as_array()
                .unwrap()
                .iter()
                .map(|r| {
                    (
                        r["messageId"].as_str().unwrap().to_string(),
                        r["state"].as_str().unwrap().to_string(),
                        r["deliveryCount"].as_u64().unwrap(),
                    )
                })
                .collect::<Vec<_>>()
        }
    };
    let record = |mid: &str, state: &str, count: u64| (mid.to_string(), state.to_string(), count);
    send("c-1");
    assert_eq!(states().await, [record("c-1", "enqueued", 0)]);

    // Delivered, not acknowledged, connection gone: the hub still has it.
    let (client, el) = connect();
    let (client, el, first) = receive(client, el).await;
    assert!(first.topic.contains("%24.mid=c-1"), "{}", first.topic);
    assert_eq!(states().await, [record("c-1", "invisible", 1)]);
    drop((client, el));
    disconnected(1).await;
    assert_eq!(states().await, [record("c-1", "enqueued", 1)]);

    // Delivered again; this time the device completes it with its PUBACK.
    let (client, el) = connect();
    let (client, mut el, again) = receive(client, el).await;
    assert!(again.topic.contains("%24.mid=c-1"), "{}", again.topic);
    assert_eq!(again.payload, first.payload);
    client.ack(&again).await.unwrap();
    client.disconnect().await.unwrap();
    while el.poll().await.is_ok() {}
    disconnected(2).await;
    assert_eq!(states().await, [record("c-1", "completed", 2)]);

    // Completed: the next connection gets only what is new.
    send("c-2");
    let (client, el) = connect();
    let (_client, _el, next) = receive(client, el).await;
    assert!(next.topic.contains("%24.mid=c-2"), "{}", next.topic);
}

// Multi-threaded: the fault is set through the (blocking) HTTPS client while hubsim serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_twin_throttle_fault_answers_429_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let key = add_device(&running.sim, "dev-24");
    let http = https_agent(&running.ca_pem);
    let answer = http
        .post(url(&running, "/sim/faults"))
        .header("Authorization", service_sas(&running.hub_connection_string))
        .header("Content-Type", "application/json")
        .send(r#"{"twinThrottle": 2}"#)
        .unwrap();
    assert_eq!(answer.status(), 204);
    let (client, mut el) = hub_client(&running, "dev-24", &key, in_an_hour());
    client
        .subscribe("$iothub/twin/res/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    until(&mut el, |p| matches!(p, Packet::SubAck(_)).then_some(()))
        .await
        .unwrap();
    let mut answers = Vec::new();
    for (topic, body) in [
        (
            "$iothub/twin/PATCH/properties/reported/?$rid=1",
            r#"{"a":1}"#,
        ),
        ("$iothub/twin/GET/?$rid=2", " "),
        ("$iothub/twin/GET/?$rid=3", " "),
    ] {
        client
            .publish(topic, QoS::AtLeastOnce, false, body)
            .await
            .unwrap();
        answers.push(
            until(&mut el, |p| match p {
                Packet::Publish(p) => Some((
                    p.topic.clone(),
                    serde_json::from_slice::<Value>(&p.payload).unwrap_or_default(),
                )),
                _ => None,
            })
            .await
            .unwrap(),
        );
    }
    assert_eq!(answers[0].0, "$iothub/twin/res/429/?$rid=1");
    assert_eq!(answers[0].1["errorCode"], 429001);
    assert_eq!(answers[1].0, "$iothub/twin/res/429/?$rid=2");
    assert_eq!(answers[2].0, "$iothub/twin/res/200/?$rid=3");
    assert!(
        answers[2].1["reported"].get("a").is_none(),
        "the throttled patch was not applied: {}",
        answers[2].1
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
        &hubsim::state::Store::device_key(hubsim::DEFAULT_HUB, "dev-limits"),
    )
    .unwrap();
    assert_eq!(
        twin["reported"],
        json!({"$version": twin["reported"]["$version"]})
    );
}

#[tokio::test]
async fn a_c2d_message_never_completed_is_dead_lettered_after_ten_deliveries() {
    use hubsim::state::{C2dState, MAX_C2D_DELIVERIES};
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let key = add_device(&running.sim, "dev-24");
    let device = device_key(&running.sim, "dev-24");
    let hub = hubsim::DEFAULT_HUB;
    hubsim::twin::send_c2d(
        &running.sim,
        &device,
        hubsim::state::C2dMessage {
            body: "never completed".into(),
            properties: vec![("$.mid".into(), "c-dl".into())],
        },
    )
    .unwrap();
    let state = |sim: &hubsim::Sim| {
        let records = sim.c2d_records(&device);
        assert_eq!(records.len(), 1, "{records:?}");
        (records[0].state, records[0].delivery_count)
    };
    for n in 1..=MAX_C2D_DELIVERIES {
        let (user, pass) = hub_credentials(hub, "dev-24", &key, in_an_hour());
        let mut options = mqtt_options_at(&running, hub, "dev-24", &user, &pass);
        options.set_manual_acks(true);
        let (client, mut el) = rumqttc::AsyncClient::new(options, 16);
        client
            .subscribe("devices/dev-24/messages/devicebound/#", QoS::AtLeastOnce)
            .await
            .unwrap();
        let publish = until(&mut el, |p| match p {
            Packet::Publish(p) => Some(p.clone()),
            _ => None,
        })
        .await
        .unwrap();
        assert!(publish.topic.contains("%24.mid=c-dl"), "{}", publish.topic);
        assert_eq!(state(&running.sim), (C2dState::Invisible, n));
        // Gone without its PUBACK.
        drop((client, el));
        let after = if n < MAX_C2D_DELIVERIES {
            C2dState::Enqueued
        } else {
            C2dState::DeadLettered
        };
        assert!(
            running
                .sim
                .wait_until(WAIT, |s| state(s) == (after, n))
                .await,
            "after delivery {n}: {:?}",
            state(&running.sim)
        );
    }
    // Nothing is left to deliver.
    assert!(
        running.sim.live.lock().unwrap().c2d_queues[&device].is_empty(),
        "the dead-lettered message left the queue"
    );
}
