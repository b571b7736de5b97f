//! HTTP proxies (`[hub] proxy`): the agent reaches DPS and the hub through a real proxy
//! (Debian's tinyproxy) that demands a password, which the agent reads from a file and never
//! shows; a proxy that refuses is named in the error with what its answer means. The proxy
//! restarting mid-session is a fault scenario (`tests/it/faults.rs`, `the_proxy_restarts`).

use hubagent_tests::*;

const PASSWORD: &str = "pr0xy-s3cret";

/// An enrolled agent whose `[hub] proxy` is `proxy` with the password file holding `password`.
fn config(
    dir: &std::path::Path,
    running: &hubsim::Running,
    device: &str,
    proxy_port: u16,
    password: &str,
) -> std::path::PathBuf {
    let password_file = write_key(dir, "proxy.pass", password);
    enrolled_agent(dir, running, device)
        .0
        .extra(&format!(
            "proxy = \"http://hubagent@127.0.0.1:{proxy_port}\"\nproxy_password = {{ file = \"{}\" }}\n",
            password_file.display()
        ))
        .extra(&builtin_sensor("100ms"))
        .write()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioning_telemetry_and_the_twin_go_through_an_authenticating_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let proxy = Tinyproxy::start(&dir.path().join("proxy"), Some(("hubagent", PASSWORD)));
    let device = "gw-proxy-1";
    let config = config(dir.path(), &running, device, proxy.port, PASSWORD);
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
    // Both connections were tunnels of the proxy.
    let tunnels = proxy.tunnels();
    let dps = format!("localhost:{}", running.mqtt_addr.port());
    assert!(tunnels.contains(&dps), "{tunnels:?}");
    assert!(
        tunnels
            .iter()
            .any(|t| *t != dps && t.ends_with(&format!(":{}", running.mqtt_addr.port()))),
        "the hub was not reached through the proxy: {tunnels:?}"
    );
    // `hubagent check` dials DPS and the hub through the same proxy, and says so.
    let tunnels_before = tunnels.len();
    let checks = network_checks(&agent);
    let through = format!(
        "through proxy http://hubagent@127.0.0.1:{} (from [hub] proxy) (TLS verified)",
        proxy.port
    );
    for id in ["network.dps", "network.hub"] {
        assert_eq!(checks[id]["result"], "pass", "{checks:?}");
        assert!(
            checks[id]["detail"].as_str().unwrap().contains(&through),
            "{checks:?}"
        );
    }
    assert_eq!(
        proxy.tunnels().len(),
        tunnels_before + 2,
        "{:?}",
        proxy.tunnels()
    );
    let status = agent.status().to_string();
    let log = agent.log_text();
    assert_eq!(agent.stop(), Some(0));
    assert!(!log.contains(PASSWORD) && !status.contains(PASSWORD));
    assert!(!checks.to_string().contains(PASSWORD));
}

/// `hubagent check --json`'s network checks, by id.
fn network_checks(agent: &AgentProcess) -> serde_json::Value {
    let out = agent.cli(&["check", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("check --json: {e}: {out:?}"));
    let checks = report["checks"].as_array().expect("checks").iter();
    checks
        .filter(|c| c["id"].as_str().unwrap().starts_with("network."))
        .map(|c| (c["id"].as_str().unwrap().to_string(), c.clone()))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_refuses_is_named_with_what_its_answer_means() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let proxy = Tinyproxy::start(&dir.path().join("proxy"), Some(("hubagent", PASSWORD)));
    let wrong = "not-the-password";
    let config = config(dir.path(), &running, "gw-proxy-2", proxy.port, wrong);
    let agent = AgentProcess::start(&config);
    let status = agent
        .wait_status("the proxy's refusal", |s| s["last_error"].is_string())
        .await;
    let error = status["last_error"].as_str().unwrap();
    assert!(
        error.contains(&format!(
            "proxy http://hubagent@127.0.0.1:{} (from [hub] proxy) refused the tunnel: HTTP 40",
            proxy.port
        )) && error
            .contains("proxy authentication required: check the proxy user and proxy_password"),
        "{error}"
    );
    assert_eq!(registrations(&running.sim, "gw-proxy-2"), 0);
    // `hubagent check` meets the same refusal, in the same words.
    let checks = network_checks(&agent);
    let dps = checks["network.dps"]["detail"].as_str().unwrap();
    assert_eq!(checks["network.dps"]["result"], "fail", "{checks:?}");
    assert!(
        dps.contains(&format!(
            "proxy http://hubagent@127.0.0.1:{} (from [hub] proxy) refused the tunnel: HTTP 40",
            proxy.port
        )) && dps.contains("proxy authentication required")
            && !dps.contains(wrong),
        "{dps}"
    );
    let log = agent.log_text();
    assert_eq!(agent.stop(), Some(0));
    assert!(
        log.contains("proxy authentication required") && !log.contains(wrong),
        "{log}"
    );
}
