//! The HTTPS management API and DPS device API, over real TLS.

use hubagent_tests::*;
use serde_json::{Value, json};

/// Runs a blocking ureq call off the async runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test]
async fn enrollment_crud_with_generated_keys_and_auth_checks() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let agent = https_agent(&running.ca_pem);
    let dps = service_sas(&running.dps_connection_string);
    let hub = service_sas(&running.hub_connection_string);
    let u = url(&running, "/enrollments/gw-1?api-version=2021-10-01");
    let (a, u2, dps2, hub2) = (agent.clone(), u.clone(), dps.clone(), hub.clone());
    let (created, wrong_policy, missing, fetched, deleted, gone) = blocking(move || {
        let body = json!({"registrationId": "gw-1", "attestation": {"type": "symmetricKey"}});
        let created = a
            .put(&u2)
            .header("Authorization", &dps2)
            .send_json(&body)
            .unwrap();
        let created_status = created.status().as_u16();
        let created: Value = created.into_body().read_json().unwrap();
        let wrong_policy = a
            .get(&u2)
            .header("Authorization", &hub2)
            .call()
            .unwrap()
            .status()
            .as_u16();
        let missing = a.get(&u2).call().unwrap();
        let missing_status = missing.status().as_u16();
        let missing_body: Value = missing.into_body().read_json().unwrap();
        let fetched: Value = a
            .get(&u2)
            .header("Authorization", &dps2)
            .call()
            .unwrap()
            .into_body()
            .read_json()
            .unwrap();
        let deleted = a
            .delete(&u2)
            .header("Authorization", &dps2)
            .call()
            .unwrap()
            .status()
            .as_u16();
        let gone = a
            .get(&u2)
            .header("Authorization", &dps2)
            .call()
            .unwrap()
            .status()
            .as_u16();
        (
            (created_status, created),
            wrong_policy,
            (missing_status, missing_body),
            fetched,
            deleted,
            gone,
        )
    })
    .await;
    assert_eq!(created.0, 200);
    let key = created.1["attestation"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap();
    assert_eq!(base64_len(key), 32, "a generated 256-bit key");
    assert!(created.1["etag"].is_string());
    assert_eq!(
        wrong_policy, 401,
        "the hub policy cannot manage DPS enrollments"
    );
    assert_eq!(missing.0, 401);
    assert!(
        missing.1["message"]
            .as_str()
            .unwrap()
            .contains("Authorization")
    );
    assert_eq!(fetched["attestation"], created.1["attestation"]);
    assert_eq!((deleted, gone), (204, 404));
}

fn base64_len(key: &str) -> usize {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(key)
        .unwrap()
        .len()
}

#[tokio::test]
async fn malformed_json_and_unknown_fields_get_clear_400s() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let agent = https_agent(&running.ca_pem);
    let dps = service_sas(&running.dps_connection_string);
    let u = url(&running, "/enrollments/gw-2");
    let f = url(&running, "/sim/faults");
    let (bad_json, bad_att, bad_fault) = blocking(move || {
        let read = |r: ureq::http::Response<ureq::Body>| -> (u16, Value) {
            (r.status().as_u16(), r.into_body().read_json().unwrap())
        };
        let bad_json = read(
            agent
                .put(&u)
                .header("Authorization", &dps)
                .content_type("application/json")
                .send("{\"registrationId\": ")
                .unwrap(),
        );
        let bad_att = read(
            agent
                .put(&u)
                .header("Authorization", &dps)
                .send_json(
                    json!({"registrationId": "gw-2", "attestation": {"type": "carrierPigeon"}}),
                )
                .unwrap(),
        );
        let bad_fault = read(
            agent
                .post(&f)
                .header("Authorization", &dps)
                .send_json(json!({"explode": true}))
                .unwrap(),
        );
        (bad_json, bad_att, bad_fault)
    })
    .await;
    assert_eq!(bad_json.0, 400);
    assert!(
        bad_json.1["message"]
            .as_str()
            .unwrap()
            .contains("not valid JSON"),
        "{}",
        bad_json.1
    );
    assert_eq!(bad_att.0, 400);
    assert!(
        bad_att.1["message"]
            .as_str()
            .unwrap()
            .contains("carrierPigeon"),
        "{}",
        bad_att.1
    );
    assert_eq!(bad_fault.0, 400);
    assert!(bad_fault.1["message"].as_str().unwrap().contains("explode"));
    assert!(
        running.sim.read(|s| s.enrollments.is_empty()),
        "nothing stored from bad input"
    );
}

#[tokio::test]
async fn dps_over_https_registers_and_twin_patch_reaches_the_service_view() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let key = enroll(&running.sim, "gw-3");
    let scope = running.sim.read(|s| s.id_scope.clone());
    let agent = https_agent(&running.ca_pem);
    let device_sas = sas_token(
        &key,
        &format!("{scope}/registrations/gw-3"),
        in_an_hour(),
        Some("registration"),
    );
    let hub = service_sas(&running.hub_connection_string);
    let register = url(
        &running,
        &format!("/{scope}/registrations/gw-3/register?api-version=2021-06-01"),
    );
    let ops = url(
        &running,
        &format!("/{scope}/registrations/gw-3/operations/"),
    );
    let twin = url(&running, "/twins/gw-3");
    let (accepted, retry_after, done, patched, bad_sig) = blocking(move || {
        let r = agent
            .put(&register)
            .header("Authorization", &device_sas)
            .send_json(json!({"registrationId": "gw-3"}))
            .unwrap();
        let retry_after = r
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_string());
        let accepted: Value = r.into_body().read_json().unwrap();
        let op = accepted["operationId"].as_str().unwrap().to_string();
        let done: Value = agent
            .get(&format!("{ops}{op}"))
            .header("Authorization", &device_sas)
            .call()
            .unwrap()
            .into_body()
            .read_json()
            .unwrap();
        let patched: Value = agent
            .patch(&twin)
            .header("Authorization", &hub)
            .send_json(json!({"properties": {"desired": {"interval": 5}}}))
            .unwrap()
            .into_body()
            .read_json()
            .unwrap();
        let bad_sig = agent
            .put(&register)
            .header("Authorization", &device_sas.replace("sig=", "sig=AA"))
            .send_json(json!({"registrationId": "gw-3"}))
            .unwrap()
            .status()
            .as_u16();
        (accepted, retry_after, done, patched, bad_sig)
    })
    .await;
    assert_eq!(accepted["status"], "assigning");
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert_eq!(done["status"], "assigned");
    assert_eq!(done["registrationState"]["deviceId"], "gw-3");
    assert_eq!(patched["properties"]["desired"]["interval"], 5);
    assert_eq!(patched["properties"]["desired"]["$version"], 1);
    assert_eq!(bad_sig, 401);
    let history = registration_events(&running.sim);
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].transport, "https");
}

#[tokio::test]
async fn state_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (scope, key, hub_cs) = {
        let running = start_sim(dir.path()).await;
        let key = enroll(&running.sim, "persist-1");
        add_device(&running.sim, "persist-dev");
        let device_key = device_key(&running.sim, "persist-dev");
        hubsim::twin::apply_desired_patch(&running.sim, &device_key, &json!({"mode": "eco"}))
            .unwrap();
        let scope = running.sim.read(|s| s.id_scope.clone());
        (scope, key, running.hub_connection_string.clone())
        // dropped: every listener stops
    };
    let running = start_sim(dir.path()).await;
    assert_eq!(running.sim.read(|s| s.id_scope.clone()), scope);
    assert_eq!(
        running.hub_connection_string, hub_cs,
        "service keys are kept"
    );
    let enrolled = running
        .sim
        .read(|s| s.enrollments.get("persist-1").cloned())
        .unwrap();
    match enrolled.common.attestation {
        hubsim::state::Attestation::SymmetricKey { symmetric_key } => {
            assert_eq!(symmetric_key.primary_key, key)
        }
        other => panic!("{other:?}"),
    }
    let twin =
        hubsim::twin::device_twin_document(&running.sim, &device_key(&running.sim, "persist-dev"))
            .unwrap();
    assert_eq!(twin["desired"]["mode"], "eco");
    assert_eq!(twin["desired"]["$version"], 1);
}

/// `hubsim serve` as a process of its own on free ports, so a test can kill it with -9.
struct HubsimProcess {
    child: std::process::Child,
    https: String,
    scope: String,
    agent: ureq::Agent,
    dps_auth: String,
}

impl HubsimProcess {
    fn start(dir: &std::path::Path) -> HubsimProcess {
        let endpoints = dir.join("endpoints.json");
        let _ = std::fs::remove_file(&endpoints);
        let child = std::process::Command::new(hubsim_bin())
            .args(["serve", "--state-dir"])
            .arg(dir)
            .args([
                "--mqtt-port",
                "0",
                "--https-port",
                "0",
                "--retry-after",
                "0",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("hubsim starts");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let endpoints: Value = loop {
            // Written atomically once the listeners are bound.
            if let Ok(text) = std::fs::read_to_string(&endpoints) {
                break serde_json::from_str(&text).unwrap();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "hubsim wrote no endpoints.json in 30 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let strings = std::fs::read_to_string(dir.join("connection-strings.txt")).unwrap();
        let dps = strings
            .lines()
            .find(|l| l.contains("provisioningserviceowner"))
            .unwrap();
        HubsimProcess {
            child,
            https: format!("https://{}", endpoints["https"].as_str().unwrap()),
            scope: endpoints["idScope"].as_str().unwrap().to_string(),
            agent: https_agent(&std::fs::read_to_string(dir.join("ca.pem")).unwrap()),
            dps_auth: service_sas(dps),
        }
    }

    fn kill_9(mut self) {
        self.child.kill().unwrap();
        let status = self.child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9),
            "{status}"
        );
    }
}

/// What DPS answered a device survives hubsim being killed with -9 right after the answer: each
/// registration is in the journal (and synced) before its 202 goes out (docs/hubsim.md,
/// "Persistence").
#[tokio::test]
async fn registrations_answered_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("hubsim");
    let ids: Vec<String> = (0..20).map(|n| format!("kill9-{n}")).collect();
    let answered = {
        let (state, ids) = (state.clone(), ids.clone());
        blocking(move || {
            let sim = HubsimProcess::start(&state);
            let group: Value = sim
                .agent
                .put(format!(
                    "{}/enrollmentGroups/kill9?api-version=2021-10-01",
                    sim.https
                ))
                .header("Authorization", &sim.dps_auth)
                .send_json(
                    json!({"enrollmentGroupId": "kill9", "attestation": {"type": "symmetricKey"}}),
                )
                .unwrap()
                .into_body()
                .read_json()
                .unwrap();
            let group_key = group["attestation"]["symmetricKey"]["primaryKey"]
                .as_str()
                .unwrap()
                .to_string();
            let mut answered = Vec::new();
            for id in &ids {
                let key = hubsim::auth::derive_device_key(&group_key, id).unwrap();
                let auth = sas_token(
                    &key,
                    &format!("{}/registrations/{id}", sim.scope),
                    in_an_hour(),
                    Some("registration"),
                );
                let r = sim
                    .agent
                    .put(format!(
                        "{}/{}/registrations/{id}/register?api-version=2021-06-01",
                        sim.https, sim.scope
                    ))
                    .header("Authorization", &auth)
                    .send_json(json!({"registrationId": id}))
                    .unwrap();
                answered.push((id.clone(), r.status().as_u16()));
            }
            sim.kill_9();
            answered
        })
        .await
    };
    assert!(
        answered.iter().all(|(_, status)| *status == 202),
        "every registration was accepted: {answered:?}"
    );
    let after = blocking(move || {
        let sim = HubsimProcess::start(&state);
        let found: Vec<(String, Value)> = ids
            .iter()
            .map(|id| {
                let r = sim
                    .agent
                    .get(format!(
                        "{}/registrations/{id}?api-version=2021-10-01",
                        sim.https
                    ))
                    .header("Authorization", &sim.dps_auth)
                    .call()
                    .unwrap();
                (id.clone(), r.into_body().read_json().unwrap_or(Value::Null))
            })
            .collect();
        sim.kill_9();
        found
    })
    .await;
    for (id, registration) in after {
        assert_eq!(
            registration["status"], "assigned",
            "{id} was answered 202, then hubsim was killed: {registration}"
        );
    }
}

#[tokio::test]
async fn tpm_enrollments_need_a_usable_endorsement_key_and_the_challenge_comes_over_https() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let agent = https_agent(&running.ca_pem);
    let dps = service_sas(&running.dps_connection_string);
    let enroll_url = url(&running, "/enrollments/tpm-1");
    let register_url = url(&running, "/0ne00000001/registrations/tpm-1/register");
    // The CLI's test EK (docs/protocol.md §6.7), also usable as the SRK here.
    let ek = "AToAAQALAAMAsgAgg3GXZ0SEs/gakMyNRqXXJP1S124GUgtk8qHaGzMUaaoABgCAAEMAEAgAAAAAAAEAibym9HQP9vxCGF5dVc1QQsAGe021aUGJzNol1/gycBx3jFsTpwmWbISRwnFvflWd0w2Mc44FAAZNaJOAAxwZvG8GvyLlHh6fGKdh+mSBL4iLH2bZ4Ry22cB3CJVjXmdGoz9Y/j3/NwLndBxQC+baNvzvyVQZ4/A2YL7vzIIj2ik4y+ve9ir7U0GbNdnxskqK1KFIITVVtkTIYyyFTIR0BySjPrRIDj7r7Mh5uF9HBppGKQCBoVSVV8dI91lNazmSdpGWyqCkO7iM4VvUMv2HT/ym53aYlUrau+Qq87Tu+uQipWYgRdF11KDfcpMHqqzBQQ1NpOJVhrsTrhyJzO7KNw==";
    let (bad, good, challenge) = blocking(move || {
        let enroll = |ek: &str| {
            let body = json!({"registrationId": "tpm-1", "attestation": {"type": "tpm", "tpm": {"endorsementKey": ek}}});
            let r = agent
                .put(&enroll_url)
                .header("Authorization", &dps)
                .send_json(&body)
                .unwrap();
            let status = r.status().as_u16();
            let body: Value = r.into_body().read_json().unwrap();
            (status, body)
        };
        let bad = enroll("AAEC");
        let good = enroll(ek);
        let r = agent
            .put(&register_url)
            .send_json(json!({"registrationId": "tpm-1", "tpm": {"endorsementKey": ek, "storageRootKey": ek}}))
            .unwrap();
        let status = r.status().as_u16();
        let body: Value = r.into_body().read_json().unwrap();
        (bad, good, (status, body))
    })
    .await;
    assert_eq!(bad.0, 400, "{}", bad.1);
    assert!(
        bad.1["message"]
            .as_str()
            .unwrap()
            .contains("attestation.tpm.endorsementKey"),
        "{}",
        bad.1
    );
    assert_eq!(good.0, 200, "{}", good.1);
    assert_eq!(challenge.0, 401, "{}", challenge.1);
    assert!(
        challenge.1["authenticationKey"].is_string(),
        "{}",
        challenge.1
    );
    assert_eq!(challenge.1["keyName"], "registration");
}

/// One management call: (status, JSON body or null).
fn call(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    auth: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let response = match (method, body) {
        ("PUT", Some(b)) => agent.put(url).header("Authorization", auth).send_json(b),
        ("PATCH", Some(b)) => agent.patch(url).header("Authorization", auth).send_json(b),
        ("POST", Some(b)) => agent.post(url).header("Authorization", auth).send_json(b),
        ("GET", None) => agent.get(url).header("Authorization", auth).call(),
        other => panic!("no such call {other:?}"),
    }
    .unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().read_json().unwrap_or(Value::Null);
    (status, body)
}

/// The key of a connection string.
fn shared_key(connection_string: &str) -> String {
    connection_string
        .split(';')
        .find_map(|p| p.strip_prefix("SharedAccessKey="))
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn desired_properties_and_tags_are_held_to_the_hubs_twin_limits() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let agent = https_agent(&running.ca_pem);
    let hub = service_sas(&running.hub_connection_string);
    let device = url(&running, "/devices/dev-desired");
    let twin = url(&running, "/twins/dev-desired");
    blocking(move || {
        let (status, _) = call(&agent, "PUT", &device, &hub, Some(&json!({})));
        assert_eq!(status, 200);
        for (what, patch, accepted) in twin_limit_cases() {
            let body = json!({"properties": {"desired": patch}});
            let (status, answer) = call(&agent, "PATCH", &twin, &hub, Some(&body));
            if accepted {
                assert_eq!(status, 200, "{what}: {answer}");
                let clear: serde_json::Map<String, Value> = patch
                    .as_object()
                    .unwrap()
                    .keys()
                    .map(|k| (k.clone(), Value::Null))
                    .collect();
                let body = json!({"properties": {"desired": clear}});
                assert_eq!(call(&agent, "PATCH", &twin, &hub, Some(&body)).0, 200);
            } else {
                assert!(status == 400 || status == 413, "{what}: {status} {answer}");
                assert!(answer["message"].is_string(), "{what}: {answer}");
            }
        }
        // Tags: the same rules, and 8 KB in all.
        let (status, answer) = call(
            &agent,
            "PATCH",
            &twin,
            &hub,
            Some(&json!({"tags": {"a.b": 1}})),
        );
        assert_eq!(status, 400, "{answer}");
        assert!(
            answer["message"].as_str().unwrap().contains("tags.a.b"),
            "{answer}"
        );
        let tags = |n: usize| json!({"tags": {"t1": "x".repeat(4094), "t2": "x".repeat(n)}});
        assert_eq!(call(&agent, "PUT", &twin, &hub, Some(&tags(4094))).0, 200);
        let (status, answer) = call(&agent, "PUT", &twin, &hub, Some(&tags(4095)));
        assert_eq!(status, 413, "{answer}");
        let (_, now) = call(&agent, "GET", &twin, &hub, None);
        assert_eq!(now["tags"]["t2"].as_str().unwrap().len(), 4094, "unchanged");
    })
    .await;
}

#[tokio::test]
async fn service_tokens_must_name_the_services_host_and_ids_follow_azures_rules() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let agent = https_agent(&running.ca_pem);
    let hub_key = shared_key(&running.hub_connection_string);
    let dps_key = shared_key(&running.dps_connection_string);
    let hub = service_sas(&running.hub_connection_string);
    let dps = service_sas(&running.dps_connection_string);
    let hub_host = running.sim.config.hubs[0].clone();
    let https_port = running.https_addr.port();
    let u = |path: &str| url(&running, path);
    let (devices, enrollment, group) = (u("/devices"), u("/enrollments/"), u("/enrollmentGroups/"));
    let device = u("/devices/");
    blocking(move || {
        let token =
            |key: &str, sr: &str, policy: &str| sas_token(key, sr, in_an_hour(), Some(policy));
        // The hub policy's key, but a token for another host (or for DPS's): refused, naming it.
        for sr in [
            "other-hub.example",
            "localhost.evil",
            "evil/localhost",
            "localhost:1",
        ] {
            if sr == hub_host {
                continue;
            }
            let (status, answer) = call(
                &agent,
                "GET",
                &devices,
                &token(&hub_key, sr, "iothubowner"),
                None,
            );
            assert_eq!(status, 401, "{sr}: {answer}");
            assert!(answer["message"].as_str().unwrap().contains(sr), "{answer}");
        }
        // The host itself, or a path under it, as Azure's SDKs send.
        for sr in [
            hub_host.clone(),
            format!("{hub_host}/devices"),
            hub_host.to_uppercase(),
            // What a service SDK given `HostName=host:port` signs.
            format!("{hub_host}:{https_port}"),
        ] {
            let (status, answer) = call(
                &agent,
                "GET",
                &devices,
                &token(&hub_key, &sr, "iothubowner"),
                None,
            );
            assert_eq!(status, 200, "{sr}: {answer}");
        }
        let wrong_dps = token(&dps_key, "dps.example", "provisioningserviceowner");
        let (status, answer) = call(&agent, "GET", &format!("{enrollment}x"), &wrong_dps, None);
        assert_eq!(status, 401, "{answer}");

        // Device ids: 128 of Azure's characters, no more, no others.
        let longest = "a".repeat(128);
        for good in ["dev-1.a_b:c", "d%*?!(),=@$'", longest.as_str()] {
            let path = format!("{device}{}", hubagent::util::encoding::url_encode(good));
            let (status, answer) = call(&agent, "PUT", &path, &hub, Some(&json!({})));
            assert_eq!(status, 200, "{good}: {answer}");
        }
        for bad in [
            "a".repeat(129),
            "dev#1".into(),
            "dev+1".into(),
            "dev 1".into(),
            "dév".into(),
        ] {
            let path = format!("{device}{}", hubagent::util::encoding::url_encode(&bad));
            let (status, answer) = call(&agent, "PUT", &path, &hub, Some(&json!({})));
            assert_eq!(status, 400, "{bad}: {answer}");
            assert!(
                answer["message"].as_str().unwrap().contains("deviceId"),
                "{answer}"
            );
        }
        // Registration ids, an enrollment's device id and enrollment group ids.
        let att = json!({"type": "symmetricKey"});
        for (id, device_id, ok) in [
            ("gw-9.x_y:z", None, true),
            ("gw-", None, true),
            ("gw.", None, false),
            ("gw 9", None, false),
            ("gw-10", Some("bad#id"), false),
            ("gw-11", Some("fine-id"), true),
        ] {
            let mut body = json!({"registrationId": id, "attestation": att});
            if let Some(d) = device_id {
                body["deviceId"] = json!(d);
            }
            let path = format!("{enrollment}{}", hubagent::util::encoding::url_encode(id));
            let (status, answer) = call(&agent, "PUT", &path, &dps, Some(&body));
            assert_eq!(status == 200, ok, "{id} {device_id:?}: {status} {answer}");
        }
        for (id, ok) in [("fleet-1", true), ("fleet.", false), ("fleet/x", false)] {
            let body = json!({"enrollmentGroupId": id, "attestation": att});
            let path = format!("{group}{}", hubagent::util::encoding::url_encode(id));
            let (status, answer) = call(&agent, "PUT", &path, &dps, Some(&body));
            assert_eq!(status == 200, ok, "{id}: {status} {answer}");
        }
    })
    .await;
}

#[tokio::test]
async fn dps_faults_set_slow_assignment_and_what_throttling_applies_to() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let agent = https_agent(&running.ca_pem);
    let hub = service_sas(&running.hub_connection_string);
    let faults = url(&running, "/sim/faults");
    let sim = running.sim.clone();
    blocking(move || {
        let body = json!({"dpsAssigning": {"polls": 3, "retryAfter": 2},
                          "dpsThrottle": {"count": 2, "retryAfter": 1, "requests": "poll"}});
        assert_eq!(call(&agent, "POST", &faults, &hub, Some(&body)).0, 204);
        {
            let f = sim.faults.lock().unwrap();
            assert_eq!(
                f.dps_slow_assignment,
                Some(hubsim::state::SlowAssignment {
                    polls: 3,
                    retry_after: Some(2)
                })
            );
            assert_eq!(f.dps_throttle, Some((2, 1)));
            assert_eq!(
                f.dps_throttle_requests,
                hubsim::state::ThrottledRequests::Poll
            );
        }
        for (body, needle) in [
            (json!({"dpsAssigning": {"polls": "many"}}), "dpsAssigning"),
            (
                json!({"dpsAssigning": {"polls": 1, "retryAfter": -1}}),
                "dpsAssigning",
            ),
            (
                json!({"dpsThrottle": {"count": 1, "retryAfter": 1, "requests": "later"}}),
                "\"later\"",
            ),
        ] {
            let (status, answer) = call(&agent, "POST", &faults, &hub, Some(&body));
            assert_eq!(status, 400, "{body}: {answer}");
            assert!(
                answer["message"].as_str().unwrap().contains(needle),
                "{answer}"
            );
        }
    })
    .await;
}
