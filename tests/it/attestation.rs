//! Every attestation method the agent supports, end to end with the real binary against hubsim:
//! symmetric key (individual), enrollment-group key (the agent derives the device key) and X.509
//! (self-signed individual by thumbprint, and CA-signed through an enrollment group). For each,
//! the provisioning rules of docs/design.md: DPS outage and throttling at boot, cache on restart,
//! reprovision on request, on refused credentials and on a changed provisioning setting.

use std::path::Path;
use std::time::Duration;

use hubagent_tests::*;
use hubsim::pki::{CertKind, DAY, issue, issue_valid};

/// Writes the configuration of an agent registering as `registration_id` (None: the CN of its
/// certificate) with `attestation` (the lines of `[provisioning.attestation]`), adding the
/// built-in sensor.
fn config(
    dir: &Path,
    running: &hubsim::Running,
    registration_id: Option<&str>,
    attestation: &str,
) -> std::path::PathBuf {
    AgentConfig::new(dir, running, registration_id, attestation)
        .extra(&builtin_sensor("100ms"))
        .write()
}

/// The provisioning rules of docs/design.md, for every method: DPS throttling at first boot is
/// honoured; a restart uses the cache (no DPS call); `hubagent reprovision` registers again; the
/// hub refusing the credentials triggers a new registration; a changed provisioning setting
/// (fingerprint) reprovisions on reload.
async fn provision_publish_restart_reprovision(
    running: &hubsim::Running,
    config: &Path,
    device: &str,
) {
    let sim = running.sim.clone();
    // DPS unreachable at first boot (connections refused for 2 s), then throttling: the agent
    // keeps retrying in-process and honours retry-after.
    refuse_connections(&sim, Duration::from_secs(2));
    sim.faults.lock().unwrap().dps_throttle = Some((2, 1));
    let agent = AgentProcess::start(config);
    assert!(
        sim.wait_until(WAIT, |s| telemetry_count(s, device) >= 3)
            .await,
        "no telemetry from {device}\n{}",
        agent.log_text()
    );
    let throttled = registration_outcomes(&sim)
        .iter()
        .filter(|o| *o == "throttled")
        .count();
    assert_eq!(
        throttled, 2,
        "both 429 answers were honoured before registering"
    );
    assert_eq!(registrations(&sim, device), 1);
    assert_eq!(agent.stop(), Some(0));

    let connects = hub_connects(&sim, device);
    let agent = AgentProcess::start(config);
    assert!(
        sim.wait_until(WAIT, |s| hub_connects(s, device) > connects)
            .await,
        "{}",
        agent.log_text()
    );
    assert_eq!(
        registrations(&sim, device),
        1,
        "restart must use the cached assignment"
    );

    let out = agent.cli(&["reprovision"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        sim.wait_until(WAIT, |s| registrations(s, device) == 2)
            .await,
        "{}",
        agent.log_text()
    );
    let connects = hub_connects(&sim, device);
    assert!(
        sim.wait_until(WAIT, |s| hub_connects(s, device) > connects)
            .await
    );

    // The hub no longer accepts the device's credentials (its identity was changed behind the
    // agent's back): the agent registers again and DPS restores a working identity.
    let key = device_key(&sim, device);
    sim.mutate(|s| {
        let d = s.devices.get_mut(&key).unwrap();
        d.authentication = hubsim::state::DeviceAuthentication {
            kind: "sas".into(),
            symmetric_key: Some(hubsim::state::SymmetricKeyPair {
                primary_key: hubsim::state::random_key(),
                secondary_key: hubsim::state::random_key(),
            }),
            x509_thumbprint: None,
        };
    })
    .unwrap();
    assert!(drop_connection(&sim, device), "no live connection");
    assert!(
        sim.wait_until(LONG_WAIT, |s| registrations(s, device) == 3)
            .await,
        "{}",
        agent.log_text()
    );
    let connects = hub_connects(&sim, device);
    assert!(
        sim.wait_until(WAIT, |s| hub_connects(s, device) > connects)
            .await,
        "{}",
        agent.log_text()
    );

    // A provisioning setting changes (a custom allocation payload): reload reprovisions.
    let text = std::fs::read_to_string(config).unwrap();
    std::fs::write(
        config,
        text.replace(
            "[provisioning.attestation]",
            "payload = { site = \"line-4\" }\n\n[provisioning.attestation]",
        ),
    )
    .unwrap();
    let out = agent.cli(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        sim.wait_until(WAIT, |s| registrations(s, device) == 4)
            .await,
        "{}",
        agent.log_text()
    );
    let state = sim.read(|s| s.registrations[&device.to_ascii_lowercase()].state.clone());
    assert_eq!(state["payload"]["site"], "line-4");
    assert_eq!(agent.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symmetric_key_individual() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let key = enroll(&running.sim, "att-sym-1");
    let key_file = write_key(dir.path(), "device.key", &key);
    let config = config(
        dir.path(),
        &running,
        Some("att-sym-1"),
        &format!(
            "method = \"symmetric_key\"\nkey = {{ file = \"{}\" }}",
            key_file.display()
        ),
    );
    provision_publish_restart_reprovision(&running, &config, "att-sym-1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symmetric_key_group_with_derived_key() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let group_key = enroll_group(&running.sim, "att-fleet");
    let key_file = write_key(dir.path(), "group.key", &group_key);
    let config = config(
        dir.path(),
        &running,
        Some("att-grp-7"),
        &format!(
            "method = \"symmetric_key\"\ngroup_key = {{ file = \"{}\" }}",
            key_file.display()
        ),
    );
    provision_publish_restart_reprovision(&running, &config, "att-grp-7").await;
    let state = running
        .sim
        .read(|s| s.registrations["att-grp-7"].state.clone());
    assert_eq!(state["symmetricKey"]["enrollmentGroupId"], "att-fleet");
}

/// The operator regenerates a key through the service API as Azure's tools do: reads the record,
/// sets a new key, writes it back naming the etag it read (`If-Match`). `path` is an enrollment,
/// an enrollment group or a hub device; `field` the key (`primaryKey`, `secondaryKey`).
async fn regenerate_key(running: &hubsim::Running, path: &str, field: &str) {
    let policy = match path.starts_with("/devices/") {
        true => ServicePolicy::Hub,
        false => ServicePolicy::Dps,
    };
    let (status, mut record) = service_call(running, policy, path, None, None).await;
    assert_eq!(status, 200, "{record}");
    let keys = match policy {
        ServicePolicy::Hub => &mut record["authentication"]["symmetricKey"],
        ServicePolicy::Dps => &mut record["attestation"]["symmetricKey"],
    };
    keys[field] = serde_json::json!(hubsim::state::random_key());
    let etag = record["etag"].as_str().unwrap().to_string();
    // Without the etag the service refuses to overwrite a device (409), and a stale one (412).
    if let ServicePolicy::Hub = policy {
        let (status, _) = service_call(running, policy, path, Some(record.clone()), None).await;
        assert_eq!(status, 409);
    }
    let (status, answer) = service_call(
        running,
        policy,
        path,
        Some(record.clone()),
        Some("\"stale\""),
    )
    .await;
    assert_eq!(status, 412, "{answer}");
    let (status, answer) = service_call(running, policy, path, Some(record), Some(&etag)).await;
    assert_eq!(status, 200, "{answer}");
}

/// A group enrollment with these keys, made through DPS's service API.
async fn put_group(running: &hubsim::Running, group: &str, keys: &hubsim::state::SymmetricKeyPair) {
    let body = serde_json::json!({
        "enrollmentGroupId": group,
        "attestation": {"type": "symmetricKey", "symmetricKey": {
            "primaryKey": keys.primary_key, "secondaryKey": keys.secondary_key}},
    });
    let path = format!("/enrollmentGroups/{group}");
    let (status, answer) = service_call(running, ServicePolicy::Dps, &path, Some(body), None).await;
    assert_eq!(status, 200, "{answer}");
}

/// Key rotation without a visit, group enrollment: the group's primary key is regenerated in DPS
/// and the device's at the hub (so the hub no longer takes the device key derived from the old
/// one). The agent, refused by the hub, presents the secondary (derived from the group's
/// secondary) to DPS, which gives the hub the enrollment's keys again; it says so, reports it,
/// and keeps it across a restart without a new registration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_key_refused_by_the_hub_falls_back_to_the_secondary() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let sim = running.sim.clone();
    let keys = key_pair();
    put_group(&running, "att-rotating", &keys).await;
    let primary = write_key(dir.path(), "group.key", &keys.primary_key);
    let secondary = write_key(dir.path(), "group-secondary.key", &keys.secondary_key);
    let device = "att-rot-1";
    let config = config(
        dir.path(),
        &running,
        Some(device),
        &format!(
            "method = \"symmetric_key\"\ngroup_key = {{ file = \"{}\" }}\nsecondary_key = {{ file = \"{}\" }}",
            primary.display(),
            secondary.display()
        ),
    );
    let agent = AgentProcess::start(&config);
    assert!(
        sim.wait_until(WAIT, |s| reported(s, device, "agent")["identity"]["key"]
            == "primary")
            .await,
        "{}",
        agent.log_text()
    );
    assert_eq!(agent.status()["key"], "primary");

    // The operator regenerates the primary key in DPS and at the hub.
    regenerate_key(&running, "/enrollmentGroups/att-rotating", "primaryKey").await;
    regenerate_key(&running, &format!("/devices/{device}"), "primaryKey").await;
    let before = telemetry_count(&sim, device);
    assert!(drop_connection(&sim, device), "no live connection");
    assert!(
        sim.wait_until(
            LONG_WAIT,
            |s| reported(s, device, "agent")["identity"]["key"] == "secondary"
                && telemetry_count(s, device) > before + 2
        )
        .await,
        "{}",
        agent.log_text()
    );
    assert_eq!(registrations(&sim, device), 2);
    assert_eq!(agent.status()["key"], "secondary");
    let log = agent.log_text();
    assert!(
        log.contains("the hub refused the primary key; trying the secondary key"),
        "{log}"
    );
    assert_eq!(agent.stop(), Some(0));

    // A restart goes straight to the hub with the secondary key: no new registration.
    let connects = hub_connects(&sim, device);
    let agent = AgentProcess::start(&config);
    assert!(
        sim.wait_until(WAIT, |s| hub_connects(s, device) > connects)
            .await,
        "{}",
        agent.log_text()
    );
    assert_eq!(registrations(&sim, device), 2, "{}", agent.log_text());
    assert_eq!(agent.status()["key"], "secondary");
    assert_eq!(agent.stop(), Some(0));
}

/// Individual enrollment whose primary key was regenerated before the gateway registered: DPS
/// refuses the primary, the agent registers with the secondary at once and the hub takes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_key_refused_by_dps_falls_back_to_the_secondary() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let device = "att-rot-dps";
    let keys = key_pair();
    let body = serde_json::json!({
        "registrationId": device,
        "attestation": {"type": "symmetricKey", "symmetricKey": {
            "primaryKey": keys.primary_key, "secondaryKey": keys.secondary_key}},
    });
    let path = format!("/enrollments/{device}");
    let (status, answer) =
        service_call(&running, ServicePolicy::Dps, &path, Some(body), None).await;
    assert_eq!(status, 200, "{answer}");
    regenerate_key(&running, &path, "primaryKey").await;
    let primary = write_key(dir.path(), "device.key", &keys.primary_key);
    let secondary = write_key(dir.path(), "device-secondary.key", &keys.secondary_key);
    let config = config(
        dir.path(),
        &running,
        Some(device),
        &format!(
            "method = \"symmetric_key\"\nkey = {{ file = \"{}\" }}\nsecondary_key = {{ file = \"{}\" }}",
            primary.display(),
            secondary.display()
        ),
    );
    let agent = AgentProcess::start(&config);
    assert!(
        running
            .sim
            .wait_until(WAIT, |s| reported(s, device, "agent")["identity"]["key"]
                == "secondary"
                && telemetry_count(s, device) > 0)
            .await,
        "{}",
        agent.log_text()
    );
    assert_eq!(registrations(&running.sim, device), 1);
    let log = agent.log_text();
    assert!(
        log.contains("DPS refused the primary key") && log.contains("trying the secondary key"),
        "{log}"
    );
    assert_eq!(agent.stop(), Some(0));
}

/// Without DPS (`source = "manual"`), the hub is the only judge: the device's primary key is
/// regenerated at the hub, and the agent, refused, connects with the secondary; a restart keeps
/// it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_device_moves_to_the_secondary_key_when_the_hub_refuses_the_primary() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let sim = running.sim.clone();
    let device = "att-rot-manual";
    let path = format!("/devices/{device}");
    let (status, created) = service_call(
        &running,
        ServicePolicy::Hub,
        &path,
        Some(serde_json::json!({"deviceId": device})),
        None,
    )
    .await;
    assert_eq!(status, 200, "{created}");
    let keys = &created["authentication"]["symmetricKey"];
    let primary = write_key(
        dir.path(),
        "device.key",
        keys["primaryKey"].as_str().unwrap(),
    );
    let secondary = write_key(
        dir.path(),
        "device-secondary.key",
        keys["secondaryKey"].as_str().unwrap(),
    );
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\nstate_dir = \"{state}\"\ncontrol_socket = \"{socket}\"\nlog_format = \"text\"\n\
             [provisioning]\nsource = \"manual\"\niothub_hostname = \"{hub}\"\ndevice_id = \"{device}\"\n\
             [provisioning.attestation]\nmethod = \"symmetric_key\"\nkey = {{ file = \"{primary}\" }}\n\
             secondary_key = {{ file = \"{secondary}\" }}\n\
             [hub]\nport = {port}\ntrust_bundle = \"{ca}\"\n{sensor}",
            state = dir.path().join("state").display(),
            socket = dir.path().join("control.sock").display(),
            hub = sim.config.hubs[0],
            primary = primary.display(),
            secondary = secondary.display(),
            port = running.mqtt_addr.port(),
            ca = running.ca_pem_path.display(),
            sensor = builtin_sensor("100ms"),
        ),
    )
    .unwrap();
    let agent = AgentProcess::start(&config);
    assert!(
        sim.wait_until(WAIT, |s| reported(s, device, "agent")["identity"]["key"]
            == "primary")
            .await,
        "{}",
        agent.log_text()
    );
    regenerate_key(&running, &path, "primaryKey").await;
    let before = telemetry_count(&sim, device);
    assert!(drop_connection(&sim, device), "no live connection");
    assert!(
        sim.wait_until(
            LONG_WAIT,
            |s| reported(s, device, "agent")["identity"]["key"] == "secondary"
                && telemetry_count(s, device) > before + 2
        )
        .await,
        "{}",
        agent.log_text()
    );
    assert_eq!(agent.status()["key"], "secondary");
    agent
        .wait_log("the hub refused the primary key; trying the secondary key")
        .await;
    assert_eq!(agent.stop(), Some(0));
    let agent = AgentProcess::start(&config);
    agent
        .wait_status("connected with the secondary key", |s| {
            s["connection"] == "connected" && s["key"] == "secondary"
        })
        .await;
    assert!(
        !agent.log_text().contains("the hub refused"),
        "{}",
        agent.log_text()
    );
    assert_eq!(agent.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509_individual_self_signed() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let cert = issue(
        CertKind::Device,
        "att-x509-1",
        &dir.path().join("dev"),
        None,
    )
    .unwrap();
    Enrollment::x509_device(first_pem(&cert.cert_path)).individual(&running.sim, "att-x509-1");
    // No registration_id: the agent takes it from the certificate's CN.
    let config = config(
        dir.path(),
        &running,
        None,
        &format!(
            "method = \"x509\"\nidentity_cert = \"{}\"\nidentity_pk = \"{}\"",
            cert.cert_path.display(),
            cert.key_path.display()
        ),
    );
    provision_publish_restart_reprovision(&running, &config, "att-x509-1").await;
    let device = running
        .sim
        .read(|s| s.devices[&device_key(&running.sim, "att-x509-1")].clone());
    assert_eq!(device.authentication.kind, "selfSigned");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509_group_through_an_intermediate_ca() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let root = issue(CertKind::Root, "Att Root", &dir.path().join("root"), None).unwrap();
    issue(
        CertKind::Intermediate,
        "Att Intermediate",
        &dir.path().join("inter"),
        Some(&dir.path().join("root")),
    )
    .unwrap();
    let cert = issue(
        CertKind::Device,
        "att-x509-grp-3",
        &dir.path().join("dev"),
        Some(&dir.path().join("inter")),
    )
    .unwrap();
    Enrollment::x509_ca(first_pem(&root.cert_path)).group(&running.sim, "att-x509-fleet");
    let config = config(
        dir.path(),
        &running,
        None,
        &format!(
            "method = \"x509\"\nidentity_cert = \"{}\"\nidentity_pk = \"{}\"",
            cert.cert_path.display(),
            cert.key_path.display()
        ),
    );
    provision_publish_restart_reprovision(&running, &config, "att-x509-grp-3").await;
    let device = running
        .sim
        .read(|s| s.devices[&device_key(&running.sim, "att-x509-grp-3")].clone());
    assert_eq!(device.authentication.kind, "certificateAuthority");
}

/// The `identity.expiry` check of `hubagent check` for a certificate valid for `days` from now.
fn expiry_check(
    dir: &Path,
    running: &hubsim::Running,
    cn: &str,
    days: std::ops::Range<i64>,
) -> (Option<i32>, serde_json::Value) {
    let secs = days.start * DAY..days.end * DAY;
    let cert = issue_valid(CertKind::Device, cn, &dir.join(cn), None, Some(secs)).unwrap();
    let config = AgentConfig::new(
        &dir.join(format!("{cn}-agent")),
        running,
        None,
        &format!(
            "method = \"x509\"\nidentity_cert = \"{}\"\nidentity_pk = \"{}\"",
            cert.cert_path.display(),
            cert.key_path.display()
        ),
    )
    .write();
    let out = std::process::Command::new(hubagent_bin())
        .args(["--config", config.to_str().unwrap(), "check", "--json"])
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let check = check_entry(&report, "identity.expiry");
    (out.status.code(), check)
}

/// A certificate that ends within the warning lead time (30 days by default) is told to the
/// operator before the hub refuses it: in the log, `hubagent status` and `reported.agent.identity`
/// while the agent keeps working; `hubagent check` warns, and fails within a week, after the end
/// or before the start (the clock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_expiry_is_told_before_it_bites() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let cert = issue_valid(
        CertKind::Device,
        "att-x509-expiring",
        &dir.path().join("dev"),
        None,
        Some(-300 * DAY..10 * DAY),
    )
    .unwrap();
    Enrollment::x509_device(first_pem(&cert.cert_path))
        .individual(&running.sim, "att-x509-expiring");
    let config = config(
        dir.path(),
        &running,
        None,
        &format!(
            "method = \"x509\"\nidentity_cert = \"{}\"\nidentity_pk = \"{}\"",
            cert.cert_path.display(),
            cert.key_path.display()
        ),
    );
    let agent = AgentProcess::start(&config);
    let device = "att-x509-expiring";
    assert!(
        running
            .sim
            .wait_until(WAIT, |s| reported(s, device, "agent")["identity"]["expiry"]
                == "expiring")
            .await,
        "{}",
        agent.log_text()
    );
    let identity = reported(&running.sim, device, "agent")["identity"].clone();
    // Ten days from issuance, less the seconds since (whole days, rounded down).
    let days_left = identity["daysLeft"].as_i64().unwrap();
    assert!(matches!(days_left, 9 | 10), "{identity}");
    let status = agent.status();
    assert_eq!(status["certificate"]["expiry"], "expiring", "{status}");
    assert_eq!(status["certificate"]["days_left"], days_left, "{status}");
    assert_eq!(
        status["certificate"]["not_after"], identity["certificateNotAfter"],
        "{status}"
    );
    let human = String::from_utf8_lossy(&agent.cli(&["status"]).stdout).to_string();
    assert!(
        human.contains(&format!(
            "certificate:     expiring until {}",
            identity["certificateNotAfter"].as_str().unwrap()
        )),
        "{human}"
    );
    let log = agent.log_text();
    assert!(
        log.contains("the identity certificate expires on")
            && log.contains(&format!("{days_left} days left")),
        "{log}"
    );
    // It keeps working meanwhile.
    assert!(
        running
            .sim
            .wait_until(WAIT, |s| telemetry_count(s, device) >= 3)
            .await
    );
    assert_eq!(agent.stop(), Some(0));

    // `hubagent check`: a warning within the lead time, a failure within a week, after the end
    // and before the start.
    let (code, check) = expiry_check(dir.path(), &running, "chk-10", -300..10);
    assert_eq!(
        (code, check["result"].as_str()),
        (Some(0), Some("warn")),
        "{check}"
    );
    assert!(
        check["detail"]
            .as_str()
            .unwrap()
            .contains(" days left): plan"),
        "{check}"
    );
    let (code, check) = expiry_check(dir.path(), &running, "chk-3", -300..3);
    assert_eq!(
        (code, check["result"].as_str()),
        (Some(1), Some("fail")),
        "{check}"
    );
    assert!(
        check["detail"].as_str().unwrap().contains("renew it now"),
        "{check}"
    );
    let (code, check) = expiry_check(dir.path(), &running, "chk-expired", -300..-1);
    assert_eq!(
        (code, check["result"].as_str()),
        (Some(1), Some("fail")),
        "{check}"
    );
    assert!(
        check["detail"].as_str().unwrap().contains("expired on"),
        "{check}"
    );
    let (code, check) = expiry_check(dir.path(), &running, "chk-future", 2..300);
    assert_eq!(
        (code, check["result"].as_str()),
        (Some(1), Some("fail")),
        "{check}"
    );
    assert!(
        check["detail"].as_str().unwrap().contains("clock"),
        "{check}"
    );
    // (A valid certificate leaves the exit status to the other checks: the daemon is stopped.)
    let (_, check) = expiry_check(dir.path(), &running, "chk-year", -1..365);
    assert_eq!(check["result"], "pass", "{check}");
    assert!(
        check["detail"].as_str().unwrap().contains(" days)"),
        "{check}"
    );
}

/// A running agent looks at its certificate again when its state changes, not only at start:
/// a certificate that enters the warning lead time while the agent runs is reported `expiring`
/// then, and its end is logged when it comes. (Short lifetimes: a 30-second lead time and a
/// certificate that ends 75 seconds after it was made.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_agent_notices_its_certificate_entering_the_warning_period() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let device = "att-x509-ticking";
    let cert = issue_valid(
        CertKind::Device,
        device,
        &dir.path().join("dev"),
        None,
        Some(-60..75),
    )
    .unwrap();
    Enrollment::x509_device(first_pem(&cert.cert_path)).individual(&running.sim, device);
    let config = config(
        dir.path(),
        &running,
        None,
        &format!(
            "method = \"x509\"\nidentity_cert = \"{}\"\nidentity_pk = \"{}\"\nexpiry_warning = \"30s\"",
            cert.cert_path.display(),
            cert.key_path.display()
        ),
    );
    let agent = AgentProcess::start(&config);
    assert!(
        running
            .sim
            .wait_until(WAIT, |s| reported(s, device, "agent")["identity"]["expiry"]
                == "valid")
            .await,
        "{}",
        agent.log_text()
    );
    // 45 seconds after issuance it enters the lead time: no restart, no reconnection needed.
    let connects = hub_connects(&running.sim, device);
    assert!(
        running
            .sim
            .wait_until(
                LONG_WAIT,
                |s| reported(s, device, "agent")["identity"]["expiry"] == "expiring"
            )
            .await,
        "{}",
        agent.log_text()
    );
    assert_eq!(hub_connects(&running.sim, device), connects);
    assert_eq!(agent.status()["certificate"]["expiry"], "expiring");
    agent.wait_log("the identity certificate expires on").await;
    // And its end is told when it comes.
    agent.wait_log("the identity certificate expired on").await;
    agent
        .wait_status("the status says expired", |s| {
            s["certificate"]["expiry"] == "expired"
        })
        .await;
    assert_eq!(agent.stop(), Some(0));
}
