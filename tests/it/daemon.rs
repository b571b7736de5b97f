//! The real `hubagent` binary as a daemon against hubsim: boot, cached assignment on restart,
//! reload and reprovision, recovery when the hub refuses the device, retries while DPS is down,
//! clear errors for bad configuration, and no key material in its output.

use std::time::Duration;

use hubagent_tests::*;

/// An enrolled agent with the built-in sensor; returns its configuration and key.
fn setup(
    dir: &std::path::Path,
    running: &hubsim::Running,
    id: &str,
) -> (std::path::PathBuf, String) {
    let (config, key) = enrolled_agent(dir, running, id);
    (config.extra(&builtin_sensor("100ms")).write(), key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boots_publishes_and_restarts_from_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let (config, key) = setup(dir.path(), &running, "gw-daemon-1");
    let sim = running.sim.clone();

    let agent = AgentProcess::start(&config);
    assert!(
        sim.wait_until(WAIT, |s| telemetry_count(s, "gw-daemon-1") >= 5)
            .await,
        "{}",
        agent.log_text()
    );
    assert_eq!(registrations(&sim, "gw-daemon-1"), 1);
    let status = agent.cli(&["status", "--json"]);
    assert!(status.status.success(), "{status:?}");
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["connection"], "connected");
    assert_eq!(status["hub"], hubsim::DEFAULT_HUB);
    assert!(status["published"].as_u64().unwrap() >= 1);
    // The same for a person: sections with fixed labels, the plugins with their state and counts.
    let human = String::from_utf8_lossy(&agent.cli(&["status"]).stdout).to_string();
    for expected in [
        "  provisioning:    provisioned".to_string(),
        format!("  hub:             {}", hubsim::DEFAULT_HUB),
        "  connection:      connected".to_string(),
        "  dropped:         0 (queue full 0, expired 0, damaged 0)".to_string(),
        "  plugins:         1 running".to_string(),
    ] {
        assert!(
            human.contains(&expected),
            "{expected:?} missing from:\n{human}"
        );
    }
    let sensor = human
        .lines()
        .find(|l| l.trim_start().starts_with("sensor "))
        .unwrap_or_else(|| panic!("no line for the sensor plugin:\n{human}"));
    assert!(
        sensor.contains("builtin")
            && sensor.contains("running")
            && sensor.contains(" published, 0 dropped, 0 restarts"),
        "{sensor}"
    );
    // The agent reported itself in the twin.
    assert!(
        sim.wait_until(WAIT, |s| s.read(|st| st.devices
            [&device_key(s, "gw-daemon-1")]
            .twin
            .reported
            .contains_key("agent")))
            .await
    );
    assert_eq!(agent.stop(), Some(0));

    // Restart: the cached assignment is used, DPS is not called again.
    let connects = hub_connects(&sim, "gw-daemon-1");
    let agent = AgentProcess::start(&config);
    assert!(
        sim.wait_until(WAIT, |s| hub_connects(s, "gw-daemon-1") > connects)
            .await,
        "{}",
        agent.log_text()
    );
    assert_eq!(
        registrations(&sim, "gw-daemon-1"),
        1,
        "no DPS call with a valid cache"
    );
    assert!(agent.log_text().contains("cached assignment"));

    // `hubagent reprovision` forces a fresh registration.
    let out = agent.cli(&["reprovision"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        sim.wait_until(WAIT, |s| registrations(s, "gw-daemon-1") == 2)
            .await,
        "{}",
        agent.log_text()
    );

    let log = agent.log_text();
    assert!(!log.contains(&key), "the key must never be logged");
    assert!(
        !log.contains("SharedAccessSignature"),
        "tokens must never be logged"
    );
    assert_eq!(agent.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_reprovisions_when_provisioning_settings_change_and_refuses_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let (config, _) = setup(dir.path(), &running, "gw-daemon-2");
    let sim = running.sim.clone();
    let agent = AgentProcess::start(&config);
    assert!(
        sim.wait_until(WAIT, |s| hub_connects(s, "gw-daemon-2") >= 1)
            .await,
        "{}",
        agent.log_text()
    );

    // A broken file is refused with the key named; the daemon keeps running on the old one.
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, good.replace("[hub]", "[hub]\nkeepalive = \"60s\"")).unwrap();
    let out = agent.cli(&["reload"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("keepalive") && stderr.contains("config.toml:"),
        "{stderr}"
    );
    assert_eq!(agent.status()["connection"], "connected");

    // A new registration id (another enrollment, same key file) → reload → DPS registration.
    let key = enroll(&running.sim, "gw-daemon-2b");
    write_key(dir.path(), "device.key", &key);
    std::fs::write(
        &config,
        good.replace(
            "registration_id = \"gw-daemon-2\"",
            "registration_id = \"gw-daemon-2b\"",
        ),
    )
    .unwrap();
    let out = agent.cli(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        sim.wait_until(WAIT, |s| hub_connects(s, "gw-daemon-2b") >= 1)
            .await,
        "{}",
        agent.log_text()
    );
    assert_eq!(registrations(&sim, "gw-daemon-2b"), 1);

    // SIGHUP reloads too; unchanged settings and credential files mean no new registration,
    // and the hub session stays.
    let connects = hub_connects(&sim, "gw-daemon-2b");
    let reloads = agent.status()["reloads"].as_u64().unwrap();
    agent.signal("HUP");
    agent
        .wait_status("the SIGHUP reload", |s| {
            s["reloads"].as_u64() > Some(reloads)
        })
        .await;
    assert_eq!(agent.status()["connection"], "connected");
    assert_eq!(hub_connects(&sim, "gw-daemon-2b"), connects);
    assert_eq!(registrations(&sim, "gw-daemon-2b"), 1);
    // The same file with a rotated key in it is a change: a new session, with the new key.
    let rotated = enroll(&running.sim, "gw-daemon-2b");
    write_key(dir.path(), "device.key", &rotated);
    let out = agent.cli(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        sim.wait_until(WAIT, |s| hub_connects(s, "gw-daemon-2b") > connects)
            .await,
        "{}",
        agent.log_text()
    );
    assert_eq!(agent.stop(), Some(0));
}

/// The scope a registration used, in hubsim's history.
fn scopes_registered(sim: &hubsim::Sim, registration_id: &str) -> Vec<String> {
    assigned_registrations(sim, registration_id)
        .into_iter()
        .map(|r| r.id_scope)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_id_scope_reprovisions_on_reload_and_restart() {
    // The operator moves the gateway to another DPS instance (a second scope of the same hubsim,
    // same enrollment): only the ID scope changes in the file.
    const MOVED: &str = "0ne000000B2";
    const BACK: &str = "0ne000000C3";
    let dir = tempfile::tempdir().unwrap();
    let mut options = sim_options(dir.path());
    options.extra_id_scopes = vec![MOVED.into(), BACK.into()];
    let running = hubsim::start(options).await.unwrap();
    let (config, _) = setup(dir.path(), &running, "gw-daemon-scope");
    let sim = running.sim.clone();
    let first = running.sim.read(|s| s.id_scope.clone());
    let mut agent = AgentProcess::start(&config);
    assert!(
        sim.wait_until(WAIT, |s| hub_connects(s, "gw-daemon-scope") >= 1)
            .await,
        "{}",
        agent.log_text()
    );
    assert_eq!(scopes_registered(&sim, "gw-daemon-scope"), [first.as_str()]);

    let good = std::fs::read_to_string(&config).unwrap();
    let with_scope = |scope: &str| {
        good.replace(
            &format!("id_scope = \"{first}\""),
            &format!("id_scope = \"{scope}\""),
        )
    };
    std::fs::write(&config, with_scope(MOVED)).unwrap();
    let out = agent.cli(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        sim.wait_until(WAIT, |s| registrations(s, "gw-daemon-scope") == 2)
            .await,
        "{}",
        agent.log_text()
    );
    assert_eq!(
        scopes_registered(&sim, "gw-daemon-scope"),
        [first.as_str(), MOVED]
    );

    // Changed while the agent was down: the restart registers again, under the new scope...
    assert_eq!(agent.stop(), Some(0));
    std::fs::write(&config, with_scope(BACK)).unwrap();
    let connects = hub_connects(&sim, "gw-daemon-scope");
    agent = AgentProcess::start(&config);
    assert!(
        sim.wait_until(WAIT, |s| registrations(s, "gw-daemon-scope") == 3
            && hub_connects(s, "gw-daemon-scope") > connects)
            .await,
        "{}",
        agent.log_text()
    );
    assert_eq!(
        scopes_registered(&sim, "gw-daemon-scope"),
        [first.as_str(), MOVED, BACK]
    );
    // ...and the next restart with the same scope uses the cache again.
    let connects = hub_connects(&sim, "gw-daemon-scope");
    assert_eq!(agent.stop(), Some(0));
    let agent = AgentProcess::start(&config);
    assert!(
        sim.wait_until(WAIT, |s| hub_connects(s, "gw-daemon-scope") > connects)
            .await,
        "{}",
        agent.log_text()
    );
    assert_eq!(registrations(&sim, "gw-daemon-scope"), 3);
    assert_eq!(agent.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_hub_connection_triggers_reprovisioning() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let (config, _) = setup(dir.path(), &running, "gw-daemon-3");
    let sim = running.sim.clone();
    let agent = AgentProcess::start(&config);
    assert!(
        sim.wait_until(WAIT, |s| hub_connects(s, "gw-daemon-3") >= 1)
            .await,
        "{}",
        agent.log_text()
    );
    // The hub forgets the device's key (as after a device was recreated by hand): the next
    // connect is refused, the agent registers again and DPS restores the identity.
    let key = device_key(&sim, "gw-daemon-3");
    sim.mutate(|s| {
        let d = s.devices.get_mut(&key).unwrap();
        d.authentication.symmetric_key.as_mut().unwrap().primary_key = hubsim::state::random_key();
        d.authentication
            .symmetric_key
            .as_mut()
            .unwrap()
            .secondary_key = hubsim::state::random_key();
    })
    .unwrap();
    assert!(drop_connection(&sim, "gw-daemon-3"), "no live connection");
    assert!(
        sim.wait_until(LONG_WAIT, |s| registrations(s, "gw-daemon-3") == 2)
            .await,
        "{}",
        agent.log_text()
    );
    let connects = hub_connects(&sim, "gw-daemon-3");
    assert!(
        sim.wait_until(WAIT, |s| hub_connects(s, "gw-daemon-3") > connects)
            .await
    );
    assert_eq!(agent.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_retrying_while_dps_is_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let (config, _) = setup(dir.path(), &running, "gw-daemon-4");
    let sim = running.sim.clone();
    refuse_connections(&sim, Duration::from_secs(4));
    let agent = AgentProcess::start(&config);
    assert!(
        sim.wait_until(LONG_WAIT, |s| telemetry_count(s, "gw-daemon-4") >= 1)
            .await,
        "{}",
        agent.log_text()
    );
    let refused = refused_connections(&sim, "gw-daemon-4");
    assert!(refused >= 1, "the agent tried while DPS was down");
    let code = agent.stop();
    assert_eq!(code, Some(0));
}

#[test]
fn bad_configuration_exits_78_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "[provisioning]\nsource = \"dps\"\nid_scope = \"0ne1\"\nregistration_id = \"x\"\n[provisioning.attestation]\nmethod = \"symmetric_key\"\nkey = { file = \"/k\" }\n[hub]\nport = \"eighty\"\n").unwrap();
    for args in [vec!["run"], vec!["config", "check"]] {
        let out = std::process::Command::new(hubagent_bin())
            .args(["--config", config.to_str().unwrap()])
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(78), "{args:?}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("config.toml:9:"), "{stderr}");
        assert!(
            stderr.contains("port") || stderr.contains("u16") || stderr.contains("integer"),
            "{stderr}"
        );
    }
    let out = std::process::Command::new(hubagent_bin())
        .args(["--config", config.to_str().unwrap(), "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69), "no daemon: EX_UNAVAILABLE");
}

/// Sequence numbers of one sensor run (each process numbers its readings from 1 under a run id).
fn sensor_seqs(sim: &hubsim::Sim, device: &str, run: &str) -> Vec<u64> {
    runs(&sensor_readings(sim, device))
        .remove(run)
        .unwrap_or_default()
}

fn sensor_readings(sim: &hubsim::Sim, device: &str) -> Vec<Numbered> {
    numbered(sim, device, Some("sensor"), "seq")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_hub_outage_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let (config, _) = setup(dir.path(), &running, "gw-daemon-5");
    let sim = running.sim.clone();
    let agent = AgentProcess::start(&config);
    assert!(
        sim.wait_until(WAIT, |s| telemetry_count(s, "gw-daemon-5") >= 3)
            .await,
        "{}",
        agent.log_text()
    );

    // The hub goes away: telemetry piles up in the agent's queue on disk.
    assert!(live_connection(&sim, "gw-daemon-5").is_some());
    begin_outage(&sim, "gw-daemon-5");
    agent
        .wait_status("queue did not grow", |st| {
            st["queue_depth"].as_u64().unwrap_or(0) >= 20
        })
        .await;
    // Every reading the agent acknowledged to the sensor until the kill must arrive.
    let mut acked = Acknowledged::new();
    let (first_run, _) = acked.note_sensor(&agent, "sensor").await;
    agent.kill_9();
    // Distinct, not raw: a message in flight when the hub went away may have been recorded
    // without its PUBACK reaching the agent, so it is both received and still queued.
    let received_before = sensor_seqs(&sim, "gw-daemon-5", &first_run).len();

    end_outage(&sim);
    let agent = AgentProcess::start(&config);
    // Everything both processes acknowledged arrives: the first's backlog and the second's own.
    acked.note_sensor(&agent, "sensor").await;
    if let Err(e) = drain(
        &agent,
        &acked,
        || sensor_readings(&sim, "gw-daemon-5"),
        LONG_WAIT,
    )
    .await
    {
        panic!("{e}\n--- agent log ---\n{}", agent.log_text());
    }
    assert_eq!(agent.stop(), Some(0));
    let seqs = sensor_seqs(&sim, "gw-daemon-5", &first_run);
    assert!(
        seqs.len() > received_before,
        "the backlog arrived ({received_before} messages before the restart, {} after)",
        seqs.len()
    );
    Delivery::of(&acked, &sensor_readings(&sim, "gw-daemon-5"))
        .assert_nothing_lost("kill -9 during a hub outage");
}

/// No plugin takes C2D here: a message must not be completed (PUBACKed) and dropped, which
/// would tell the sender it was delivered. The hub keeps it and delivers it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_c2d_message_nothing_takes_stays_with_the_hub() {
    use hubsim::state::C2dState;
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let (config, _) = enrolled_agent(dir.path(), &running, "gw-daemon-c2d");
    let config = config.write();
    let sim = running.sim.clone();
    let agent = AgentProcess::start(&config);
    agent
        .wait_status("not connected", |st| st["connection"] == "connected")
        .await;
    let key = device_key(&sim, "gw-daemon-c2d");
    hubsim::twin::send_c2d(
        &sim,
        &key,
        hubsim::state::C2dMessage {
            body: "valve=open".into(),
            properties: vec![
                ("$.mid".into(), "c2d-daemon-1".into()),
                ("token".into(), "prop-value-7f3a".into()),
            ],
        },
    )
    .unwrap();
    let state = |s: &hubsim::state::Sim| {
        s.c2d_records(&key)
            .first()
            .map(|r| (r.state, r.delivery_count))
    };
    assert!(
        sim.wait_until(WAIT, |s| state(s) == Some((C2dState::Invisible, 1)))
            .await,
        "{:?}\n{}",
        state(&sim),
        agent.log_text()
    );
    agent.wait_log("c2d-daemon-1").await;
    // A graceful stop sends whatever PUBACK is due before its DISCONNECT: none is.
    assert_eq!(agent.stop(), Some(0));
    assert!(
        sim.wait_until(WAIT, |s| state(s) == Some((C2dState::Enqueued, 1)))
            .await,
        "{:?}",
        state(&sim)
    );
    assert_eq!(sim.live.lock().unwrap().c2d_queues[&key].len(), 1);

    // The next run gets it again.
    let agent = AgentProcess::start(&config);
    assert!(
        sim.wait_until(WAIT, |s| state(s) == Some((C2dState::Invisible, 2)))
            .await,
        "{:?}\n{}",
        state(&sim),
        agent.log_text()
    );
    agent.wait_log("c2d-daemon-1").await;
    let log = agent.log_text();
    assert_eq!(agent.stop(), Some(0));
    // The sender's data is not logged, only the message id.
    assert!(
        !log.contains("valve=open") && !log.contains("prop-value-7f3a"),
        "{log}"
    );
    assert!(
        sim.wait_until(WAIT, |s| state(s) == Some((C2dState::Enqueued, 2)))
            .await,
        "{:?}",
        state(&sim)
    );
}

/// `provisioning.model_id` reaches DPS in the registration payload and the hub in the CONNECT
/// username; the service API shows it in the device and its twin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_id_reaches_dps_and_the_twin() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let (config, _) = enrolled_agent(dir.path(), &running, "gw-daemon-pnp");
    let config = config.write();
    add_settings(
        &config,
        "[provisioning]",
        "model_id = \"dtmi:com:example:Gateway;2\"\n",
    );
    let sim = running.sim.clone();
    let agent = AgentProcess::start(&config);
    agent
        .wait_status("not connected", |st| st["connection"] == "connected")
        .await;
    let payload = sim.read(|s| s.registrations["gw-daemon-pnp"].state["payload"].clone());
    assert_eq!(
        payload,
        serde_json::json!({"modelId": "dtmi:com:example:Gateway;2"})
    );

    let http = https_agent(&running.ca_pem);
    let auth = service_sas(&running.hub_connection_string);
    let (twin, device) = tokio::task::spawn_blocking({
        let (twin_url, device_url) = (
            url(&running, "/twins/gw-daemon-pnp"),
            url(&running, "/devices/gw-daemon-pnp"),
        );
        move || {
            let get = |u: &str| -> serde_json::Value {
                http.get(u)
                    .header("Authorization", &auth)
                    .call()
                    .unwrap()
                    .into_body()
                    .read_json()
                    .unwrap()
            };
            (get(&twin_url), get(&device_url))
        }
    })
    .await
    .unwrap();
    assert_eq!(twin["modelId"], "dtmi:com:example:Gateway;2", "{twin}");
    assert_eq!(device["modelId"], "dtmi:com:example:Gateway;2", "{device}");
    assert_eq!(agent.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_offline_with_the_cached_desired_settings() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let (config, _) = setup(dir.path(), &running, "gw-daemon-6");
    let sim = running.sim.clone();
    let agent = AgentProcess::start(&config);
    assert!(
        sim.wait_until(WAIT, |s| hub_connects(s, "gw-daemon-6") >= 1)
            .await,
        "{}",
        agent.log_text()
    );
    // The agent acknowledges the applied version, and the settings, in its reported properties.
    let version = plugin_settings_followed(
        &sim,
        "gw-daemon-6",
        "sensor",
        serde_json::json!({"interval": "250ms"}),
    )
    .await
    .unwrap_or_else(|| panic!("the new settings are not reported: {}", agent.log_text()));
    let reported = reported_plugin(&sim, "gw-daemon-6", "sensor");
    assert_eq!(reported["settings"]["interval"], "250ms", "{reported}");
    assert_eq!(agent.stop(), Some(0));

    // No hub at all now: the agent starts with what it cached.
    refuse_connections(&sim, Duration::from_secs(3600));
    let agent = AgentProcess::start(&config);
    let plugins = agent
        .wait_plugins("the sensor running offline", |p| {
            p["sensor"]["status"] == "running"
        })
        .await;
    assert_eq!(
        plugins["sensor"]["settings"]["interval"], "250ms",
        "cached desired settings apply offline"
    );
    assert_eq!(plugins["sensor"]["desiredVersion"], version);
    let status = agent.status();
    assert_ne!(status["connection"], "connected");
    assert_eq!(status["desired_version"], version);
    assert_eq!(agent.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_stable_ids_and_fails_on_problems() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let (config, _) = setup(dir.path(), &running, "gw-daemon-7");
    let agent = AgentProcess::start(&config);
    assert!(
        running
            .sim
            .wait_until(WAIT, |s| hub_connects(s, "gw-daemon-7") >= 1)
            .await
    );
    let out = agent.cli(&["check", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<&str> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    for id in [
        "config.valid",
        "clock.sane",
        "keys.load",
        "keys.private",
        "tls.trust",
        "state.dir",
        "provisioning.cache",
        "network.dps",
        "network.hub",
        "daemon.running",
    ] {
        assert!(ids.contains(&id), "missing check {id}: {ids:?}");
    }
    let dps = check_entry(&report, "network.dps");
    assert!(
        dps["detail"].as_str().unwrap().contains("TLS verified"),
        "{dps}"
    );
    assert_eq!(agent.stop(), Some(0));
    // A key file others can read is a warning; a missing key file is a failure (exit 1).
    let key_file = dir.path().join("device.key");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = std::process::Command::new(hubagent_bin())
        .args(["--config", config.to_str().unwrap(), "check"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("[WARN] keys.private") && text.contains("chmod 600"),
        "{text}"
    );
    std::fs::remove_file(&key_file).unwrap();
    let out = std::process::Command::new(hubagent_bin())
        .args(["--config", config.to_str().unwrap(), "check"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("[FAIL] keys.load"));
}

/// `[hub] transport = "websockets"`: DPS and the hub are reached inside WebSockets on the HTTPS
/// port, and everything works as over 8883: registration, telemetry, a desired change
/// acknowledged in the reported properties, a reconnection after the hub drops the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_over_websockets_carries_the_whole_session() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let device = "gw-daemon-ws";
    let (config, _) = enrolled_agent(dir.path(), &running, device);
    let config = config
        .extra(&format!(
            "transport = \"websockets\"\nwebsocket_port = {}\n",
            running.https_addr.port()
        ))
        .extra(&builtin_sensor("100ms"))
        .write();
    let sim = running.sim.clone();
    let agent = AgentProcess::start(&config);
    assert!(
        sim.wait_until(WAIT, |s| telemetry_count(s, device) >= 3)
            .await,
        "{}",
        agent.log_text()
    );
    assert!(
        plugin_settings_followed(
            &sim,
            device,
            "sensor",
            serde_json::json!({"interval": "200ms"})
        )
        .await
        .is_some(),
        "{}",
        agent.log_text()
    );
    let before = telemetry_count(&sim, device);
    assert!(drop_connection(&sim, device), "no live connection");
    assert!(
        sim.wait_until(WAIT, |s| hub_connects(s, device) >= 2
            && telemetry_count(s, device) > before + 2)
            .await,
        "{}",
        agent.log_text()
    );
    // `hubagent check` tries the route the agent takes.
    let (_, report) = agent.check_report();
    for id in ["network.dps", "network.hub"] {
        let check = check_entry(&report, id);
        assert_eq!(check["result"], "pass", "{check}");
        assert!(
            check["detail"].as_str().unwrap().contains(&format!(
                ":{}, MQTT over WebSockets (TLS verified",
                running.https_addr.port()
            )),
            "{check}"
        );
    }
    assert_eq!(agent.stop(), Some(0));
    // Every connection, to DPS and to the hub, took the WebSocket route.
    let routes: Vec<(String, Option<String>)> = connection_events(&sim, device)
        .into_iter()
        .filter(|e| e.event == "connected")
        .map(|e| (e.service, e.transport))
        .collect();
    let ws = Some("mqtt-ws".to_string());
    assert_eq!(
        routes,
        vec![
            ("dps".to_string(), ws.clone()),
            ("hub".to_string(), ws.clone()),
            ("hub".to_string(), ws)
        ]
    );
}

/// `transport = "auto"` where the MQTT port cannot be reached (nothing listens on it): the agent
/// falls back to WebSockets, says so once, shows the route in `hubagent status` and `check`, and
/// goes straight to WebSockets when it reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_falls_back_to_websockets_when_8883_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let device = "gw-daemon-auto";
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (config, _) = enrolled_agent(dir.path(), &running, device);
    let config = config
        .mqtt_port(closed_port)
        .extra(&format!(
            "transport = \"auto\"\nwebsocket_port = {}\n",
            running.https_addr.port()
        ))
        .extra(&builtin_sensor("100ms"))
        .write();
    let sim = running.sim.clone();
    let agent = AgentProcess::start(&config);
    assert!(
        sim.wait_until(WAIT, |s| telemetry_count(s, device) >= 3)
            .await,
        "{}",
        agent.log_text()
    );
    assert_eq!(agent.status()["route"], "MQTT over WebSockets");
    let before = telemetry_count(&sim, device);
    assert!(drop_connection(&sim, device), "no live connection");
    assert!(
        sim.wait_until(WAIT, |s| hub_connects(s, device) >= 2
            && telemetry_count(s, device) > before + 2)
            .await,
        "{}",
        agent.log_text()
    );
    let (_, report) = agent.check_report();
    let hub = check_entry(&report, "network.hub");
    let detail = hub["detail"].as_str().unwrap();
    assert_eq!(hub["result"], "pass", "{hub}");
    assert!(
        detail.contains("MQTT over WebSockets (TLS verified")
            && detail.contains(&format!(
                "before it: 127.0.0.2:{closed_port}, MQTT over TLS"
            )),
        "{hub}"
    );
    let log = agent.log_text();
    assert_eq!(agent.stop(), Some(0));
    // Said once: DPS found the way; the hub sessions used it at once.
    assert_eq!(
        log.matches("trying MQTT over WebSockets").count(),
        1,
        "{log}"
    );
    assert!(
        connection_events(&sim, device)
            .iter()
            .filter(|e| e.event == "connected")
            .all(|e| e.transport.as_deref() == Some("mqtt-ws"))
    );
}

/// `[agent] metrics_file`: the counters in Prometheus' text format, read by Debian's real
/// node-exporter through its textfile collector, as a monitoring system would scrape them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_exporter_serves_the_agents_counters() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let sim = running.sim.clone();
    let device = "gw-daemon-metrics";
    let textfiles = dir.path().join("node-exporter");
    std::fs::create_dir(&textfiles).unwrap();
    let plugins = "[[plugin]]\nname = \"sensor\"\nkind = \"builtin\"\nbuiltin = \"simulated-sensor\"\ninterval = \"100ms\"\n";
    let config = plugin_agent_config(dir.path(), &running, device, plugins, false);
    add_settings(
        &config,
        "[agent]",
        &format!(
            "metrics_file = \"{}\"\nmetrics_interval = \"200ms\"\n",
            textfiles.join("hubagent.prom").display()
        ),
    );
    let agent = AgentProcess::start(&config);
    // node-exporter with only the textfile collector, on a free loopback port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut exporter = std::process::Command::new("prometheus-node-exporter")
        .args(["--collector.disable-defaults", "--collector.textfile"])
        .arg(format!(
            "--collector.textfile.directory={}",
            textfiles.display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("prometheus-node-exporter (tests/setup.sh installs it)");
    let scrape = || -> String {
        ureq::get(&format!("http://127.0.0.1:{port}/metrics"))
            .call()
            .ok()
            .and_then(|mut r| r.body_mut().read_to_string().ok())
            .unwrap_or_default()
    };
    let value = |text: &str, sample: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
    };
    let sent_before_drop = |text: &str| {
        value(text, "hubagent_connected") == Some(1.0)
            && value(text, "hubagent_messages_published_total").is_some_and(|n| n >= 3.0)
    };
    let mut text = String::new();
    assert!(
        sim.wait_until(LONG_WAIT, |_| {
            text = scrape();
            sent_before_drop(&text)
        })
        .await,
        "{text}\n{}",
        agent.log_text()
    );
    assert_eq!(
        value(&text, "node_textfile_scrape_error"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "hubagent_plugin_running{plugin=\"sensor\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "hubagent_hub_connections_total"),
        Some(1.0),
        "{text}"
    );
    // What the hub acknowledged is what the counter says, never more.
    let published = value(&text, "hubagent_messages_published_total").unwrap();
    assert!(published <= telemetry_count(&sim, device) as f64, "{text}");
    // A dropped connection shows as a second session.
    assert!(drop_connection(&sim, device), "no live connection");
    assert!(
        sim.wait_until(LONG_WAIT, |_| {
            text = scrape();
            value(&text, "hubagent_hub_connections_total") == Some(2.0)
                && value(&text, "hubagent_connected") == Some(1.0)
        })
        .await,
        "{text}\n{}",
        agent.log_text()
    );
    let _ = exporter.kill();
    let _ = exporter.wait();
    assert_eq!(agent.stop(), Some(0));
}

/// Remote diagnostics without SSH: the `logs` direct method answers the agent's recent lines,
/// filtered by plugin, level, time and count; `check` answers what `hubagent check --json` does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_and_check_direct_methods_diagnose_from_the_cloud() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let sim = running.sim.clone();
    let device = "gw-daemon-diag";
    let plugins = "[[plugin]]\nname = \"sensor\"\nkind = \"builtin\"\nbuiltin = \"simulated-sensor\"\ninterval = \"100ms\"\n\n[[plugin]]\nname = \"broken\"\nkind = \"exec\"\ncommand = [\"/bin/sh\", \"-c\", \"echo 'calibration missing' >&2; exit 3\"]\nrestart_backoff = \"100ms\"\n";
    let config = plugin_agent_config(dir.path(), &running, device, plugins, false);
    let agent = AgentProcess::start(&config);
    // Subscribed and reporting: the session is fully up.
    assert!(
        sim.wait_until(WAIT, |s| !reported(s, device, "agent").is_null())
            .await,
        "{}",
        agent.log_text()
    );
    agent
        .wait_log_line("the broken plugin failing", |l| {
            l.contains("calibration missing")
        })
        .await;
    let key = device_key(&sim, device);
    let call = |payload: serde_json::Value| {
        let (sim, key) = (sim.clone(), key.clone());
        async move {
            hubsim::twin::invoke_method(&sim, &key, "logs", &payload, WAIT)
                .await
                .unwrap()
        }
    };
    // The broken plugin's lines only: its stderr and its failures, nothing of the sensor.
    let (status, answer) = call(serde_json::json!({"plugin": "broken"})).await;
    assert_eq!(status, 200, "{answer}");
    let lines = answer["lines"].as_array().unwrap();
    assert!(
        lines.iter().any(|l| l["message"] == "calibration missing"),
        "{answer}"
    );
    assert!(lines.iter().all(|l| l["plugin"] == "broken"), "{answer}");
    // Not under systemd: the lines kept in memory (the system test sees the journal's).
    assert_eq!(answer["source"], "memory", "{answer}");
    // Warnings and worse, the newest two.
    let (_, answer) = call(serde_json::json!({"level": "warn", "limit": 2})).await;
    let lines = answer["lines"].as_array().unwrap();
    assert_eq!(lines.len(), 2, "{answer}");
    assert!(
        lines
            .iter()
            .all(|l| l["level"] == "warn" || l["level"] == "error"),
        "{answer}"
    );
    assert_eq!(answer["leftOut"], true, "{answer}");
    // Nothing from the future; a bad level is named.
    let (_, answer) = call(serde_json::json!({"since": "2999-01-01T00:00:00Z"})).await;
    assert_eq!(answer["lines"], serde_json::json!([]), "{answer}");
    let (status, answer) = call(serde_json::json!({"level": "loud"})).await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("'loud'"),
        "{answer}"
    );
    // `check` answers the report `hubagent check --json` prints.
    let (status, report) =
        hubsim::twin::invoke_method(&sim, &key, "check", &serde_json::Value::Null, LONG_WAIT)
            .await
            .unwrap();
    assert_eq!(status, 200, "{report}");
    let hub = check_entry(&report, "network.hub");
    assert_eq!(hub["result"], "pass", "{report}");
    assert_eq!(
        check_entry(&report, "daemon.running")["result"],
        "pass",
        "{report}"
    );
    assert_eq!(agent.stop(), Some(0));
}

/// `transport = "auto"` keeps the route that worked in the state directory (`route.json`): a
/// restart goes straight to WebSockets where 8883 is closed, `hubagent status` shows what is
/// remembered, and a day after WebSockets was learned the agent tries 8883 first again, so a
/// firewall that opened gives the direct route back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_remembers_its_route_across_restarts_and_tries_8883_again_after_a_day() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let device = "gw-daemon-auto-memory";
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (config, _) = enrolled_agent(dir.path(), &running, device);
    let config = config
        .mqtt_port(closed_port)
        .extra(&format!(
            "transport = \"auto\"\nwebsocket_port = {}\n",
            running.https_addr.port()
        ))
        .extra(&builtin_sensor("100ms"))
        .write();
    let sim = running.sim.clone();
    let route_file = dir.path().join("state").join("route.json");
    let remembered = || -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(&route_file).unwrap()).unwrap()
    };
    let last_transport = || {
        connection_events(&sim, device)
            .iter()
            .rev()
            .find(|e| e.event == "connected")
            .and_then(|e| e.transport.clone())
    };

    // 1. 8883 closed: WebSockets is learned, saved, and shown.
    let agent = AgentProcess::start(&config);
    publishes(&sim, device, &agent).await;
    let status = agent.status();
    assert_eq!(status["route"], "MQTT over WebSockets");
    assert_eq!(
        status["route_memory"]["first"], "MQTT over WebSockets",
        "{status}"
    );
    assert!(
        status["route_memory"]["direct_again_at"].is_string(),
        "{status}"
    );
    assert_eq!(remembered()["websocket"], true);
    assert_eq!(remembered()["tls_port"], closed_port);
    assert_eq!(agent.stop(), Some(0));

    // 2. A restart starts with WebSockets: no attempt on 8883, no fallback.
    let agent = AgentProcess::start(&config);
    publishes(&sim, device, &agent).await;
    let log = agent.log_text();
    assert_eq!(agent.stop(), Some(0));
    assert!(log.contains("MQTT over WebSockets worked at"), "{log}");
    assert!(!log.contains("trying MQTT over WebSockets"), "{log}");
    assert_eq!(last_transport().as_deref(), Some("mqtt-ws"));

    // 3. Learned two days ago, and the firewall has opened 8883 since: the agent tries it first,
    //    takes it, and remembers MQTT over TLS.
    let mut aged = remembered();
    aged["learned_at"] = (hubagent::util::time::unix_now() - 2 * 24 * 3600).into();
    std::fs::write(&route_file, aged.to_string()).unwrap();
    open_port(closed_port, running.mqtt_addr.port()).await;
    let agent = AgentProcess::start(&config);
    publishes(&sim, device, &agent).await;
    let status = agent.status();
    let log = agent.log_text();
    assert_eq!(agent.stop(), Some(0));
    assert!(
        log.contains(&format!(
            "over a day ago: trying MQTT over TLS on port {closed_port} first again"
        )),
        "{log}"
    );
    assert_eq!(last_transport().as_deref(), Some("mqtt"));
    assert_eq!(status["route"], "MQTT over TLS", "{status}");
    assert_eq!(status["route_memory"]["first"], "MQTT over TLS", "{status}");
    assert!(
        status["route_memory"]["direct_again_at"].is_null(),
        "{status}"
    );
    assert_eq!(remembered()["websocket"], false);
}

/// Waits until `agent` has published 3 more messages (from now) to `device`.
async fn publishes(sim: &hubsim::Sim, device: &str, agent: &AgentProcess) {
    let before = telemetry_count(sim, device);
    assert!(
        sim.wait_until(WAIT, |s| telemetry_count(s, device) >= before + 3)
            .await,
        "{}",
        agent.log_text()
    );
}
