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
