//! Certificates issued by DPS (`[provisioning.issued_certificate]`, docs/credentials.md), with
//! the real binary against hubsim, whose enrollment signs the agent's CSR with a hubsim CA: the
//! first issuance and the hub connection with it, renewal on `hubagent reprovision` and at a
//! fraction of a lifetime shortened to seconds, the current certificate kept while issuance
//! fails, and crashes (the test-only `HUBAGENT_TEST_ABORT_AT` hook) at each step of a renewal.

use std::path::{Path, PathBuf};
use std::process::Command;

use hubagent_tests::*;
use hubsim::pki::{CertKind, issue};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// An individual symmetric-key enrollment whose registrations get certificates from a fresh
/// hubsim CA valid for `validity_seconds`; returns the agent's configuration (renewing at
/// `renew_at`).
fn issuing_agent(
    dir: &Path,
    running: &hubsim::Running,
    id: &str,
    validity_seconds: u64,
    renew_at: f64,
) -> PathBuf {
    issuing_agent_with(
        dir,
        running,
        id,
        validity_seconds,
        &format!("renew_at = {renew_at}\n"),
    )
}

/// [`issuing_agent`] with `issued` as the body of `[provisioning.issued_certificate]`.
fn issuing_agent_with(
    dir: &Path,
    running: &hubsim::Running,
    id: &str,
    validity_seconds: u64,
    issued: &str,
) -> PathBuf {
    hubagent_tests::issuing_agent(dir, running, id, validity_seconds, issued)
        .extra(&builtin_sensor("200ms"))
        .write()
}

fn issued_dir(dir: &Path) -> PathBuf {
    dir.join("state").join("issued")
}

/// The generation `current` names.
fn current(dir: &Path) -> Option<String> {
    std::fs::read_link(issued_dir(dir).join("current"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// The complete generation directories, sorted.
fn generations(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(issued_dir(dir))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("gen-"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The SHA-256 thumbprint of a generation's leaf.
fn leaf_thumbprint(dir: &Path, generation: &str) -> String {
    let chain = issued_dir(dir).join(generation).join("chain.pem");
    let leaf = CertificateDer::pem_file_iter(&chain)
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    hubsim::auth::sha256_thumbprint(&leaf)
}

/// The thumbprint the hub knows the device by.
fn hub_thumbprint(sim: &hubsim::Sim, id: &str) -> Option<String> {
    let key = device_key(sim, id);
    sim.read(|s| {
        s.devices[&key]
            .authentication
            .x509_thumbprint
            .as_ref()
            .and_then(|t| t.primary_thumbprint.clone())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issued_certificate_is_used_for_the_hub_and_renewed_on_reprovision() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let sim = running.sim.clone();
    let config = issuing_agent(dir.path(), &running, "renew-1", 3600, 0.8);
    let agent = AgentProcess::start(&config);
    // The agent registers with a CSR, stores generation 1 and connects with it; generation 1
    // becomes current only once it has connected.
    let status = agent
        .wait_status("connected with issued generation 1", |s| {
            s["connection"] == "connected" && s["issued_generation"] == 1
        })
        .await;
    assert_eq!(status["certificate"]["expiry"], "valid", "{status}");
    assert_eq!(generations(dir.path()), ["gen-1"]);
    assert_eq!(current(dir.path()).as_deref(), Some("gen-1"));
    assert_eq!(
        hub_thumbprint(&sim, "renew-1"),
        Some(leaf_thumbprint(dir.path(), "gen-1")),
        "the hub knows the device by the issued certificate, and the agent connected with it"
    );
    let key = issued_dir(dir.path()).join("gen-1").join("key.pem");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let key_text = std::fs::read_to_string(&key).unwrap();
    // The reported properties follow the connection.
    assert!(
        sim.wait_until(
            WAIT,
            |s| reported(s, "renew-1", "agent")["identity"]["issuedGeneration"] == 1
        )
        .await,
        "{}",
        reported(&sim, "renew-1", "agent")
    );
    let twin = reported(&sim, "renew-1", "agent");
    assert!(
        twin["identity"]["certificateNotAfter"].is_string(),
        "{twin}"
    );
    let (_, report) = agent.check_report();
    let issued = check_entry(&report, "identity.issued");
    assert_eq!(issued["result"], "pass", "{issued}");
    assert!(
        issued["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("generation 1: the certificate")),
        "{issued}"
    );
    let status_text = String::from_utf8(agent.cli(&["status"]).stdout).unwrap();
    assert!(
        status_text.contains("issued cert:     generation 1"),
        "{status_text}"
    );
    assert!(!status_text.contains(key_text.lines().nth(1).unwrap()));

    // `hubagent reprovision`: a renewal beside the running session, a new key and generation 2,
    // then generation 1 is removed.
    let registered = registrations(&sim, "renew-1");
    let out = agent.cli(&["reprovision"]);
    assert!(out.status.success(), "{out:?}");
    agent
        .wait_status("connected with issued generation 2", |s| {
            s["connection"] == "connected" && s["issued_generation"] == 2
        })
        .await;
    assert_eq!(registrations(&sim, "renew-1"), registered + 1);
    assert_eq!(generations(dir.path()), ["gen-2"]);
    assert_eq!(current(dir.path()).as_deref(), Some("gen-2"));
    assert_eq!(
        hub_thumbprint(&sim, "renew-1"),
        Some(leaf_thumbprint(dir.path(), "gen-2"))
    );
    assert_ne!(
        std::fs::read_to_string(issued_dir(dir.path()).join("gen-2").join("key.pem")).unwrap(),
        key_text,
        "each renewal makes a new key"
    );
    assert_eq!(agent.stop(), Some(0));

    // A restart presents generation 2 from the cache: no DPS call.
    let registered = registrations(&sim, "renew-1");
    let agent = AgentProcess::start(&config);
    agent
        .wait_status("connected after restart", |s| {
            s["connection"] == "connected" && s["issued_generation"] == 2
        })
        .await;
    assert_eq!(registrations(&sim, "renew-1"), registered);
    assert_eq!(agent.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_x509_onboarding_certificate_gets_an_issued_one_for_the_hub() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let sim = running.sim.clone();
    let ca_dir = dir.path().join("issuing-ca");
    issue(CertKind::Root, "issuing-ca", &ca_dir, None).unwrap();
    // The onboarding certificate (self-signed, individual enrollment) proves the device to DPS;
    // the enrollment issues the certificate the hub gets.
    let (cert, key) = enroll_x509(&sim, "renew-x509", dir.path());
    sim.mutate(|s| {
        let enrollment = s.enrollments.get_mut("renew-x509").unwrap();
        enrollment.common.certificate_issuance = Some(hubsim::state::CertificateIssuance {
            issuer_dir: ca_dir.clone(),
            validity_seconds: 3600,
        });
    })
    .unwrap();
    let config = AgentConfig::new(
        dir.path(),
        &running,
        None,
        &format!(
            "method = \"x509\"\nidentity_cert = \"{}\"\nidentity_pk = \"{}\"\n",
            cert.display(),
            key.display()
        ),
    )
    .extra("[provisioning.issued_certificate]\n")
    .write();
    let agent = AgentProcess::start(&config);
    agent
        .wait_status("connected with issued generation 1", |s| {
            s["connection"] == "connected" && s["issued_generation"] == 1
        })
        .await;
    assert_eq!(
        hub_thumbprint(&sim, "renew-x509"),
        Some(leaf_thumbprint(dir.path(), "gen-1")),
        "the hub knows the issued certificate, not the onboarding one"
    );
    let onboarding_pem = std::fs::read(&cert).unwrap();
    let onboarding = CertificateDer::pem_slice_iter(&onboarding_pem)
        .next()
        .unwrap()
        .unwrap();
    assert_ne!(
        hubsim::auth::sha256_thumbprint(&onboarding),
        leaf_thumbprint(dir.path(), "gen-1")
    );
    assert_eq!(agent.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_at_the_fraction_keeps_the_current_certificate_while_issuance_fails() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let sim = running.sim.clone();
    // hubsim's certificates start a minute back: 60 + 40 s of lifetime, renewed at 70 %, i.e.
    // 10 s after issuance.
    let config = issuing_agent(dir.path(), &running, "renew-2", 40, 0.7);
    let agent = AgentProcess::start(&config);
    agent
        .wait_status("connected with issued generation 1", |s| {
            s["connection"] == "connected" && s["issued_generation"] == 1
        })
        .await;
    let connects = hub_connects(&sim, "renew-2");
    // The CA is down for the next two issuances: generation 1 stays in use (the session is not
    // interrupted) and the renewal is retried with backoff until the third attempt succeeds.
    sim.faults.lock().unwrap().issuance_failures = 2;
    agent
        .wait_log("renewing the issued certificate failed")
        .await;
    let status = agent.status();
    assert_eq!(status["issued_generation"], 1, "{status}");
    assert_eq!(
        status["certificate"]["expiry"], "expiring",
        "past its renewal time: {status}"
    );
    assert_eq!(status["connection"], "connected", "{status}");
    assert!(
        status["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("certificate renewal failed")),
        "{status}"
    );
    assert_eq!(hub_connects(&sim, "renew-2"), connects, "no reconnection");
    let (_, report) = agent.check_report();
    let issued = check_entry(&report, "identity.issued");
    assert_eq!(issued["result"], "warn", "{issued}");
    assert!(
        issued["detail"]
            .as_str()
            .is_some_and(|d| d.contains("overdue")),
        "{issued}"
    );
    assert_eq!(generations(dir.path()), ["gen-1"]);
    agent
        .wait_status("connected with issued generation 2", |s| {
            s["connection"] == "connected" && s["issued_generation"] == 2
        })
        .await;
    assert_eq!(sim.faults.lock().unwrap().issuance_failures, 0);
    let failed = registration_outcomes(&sim)
        .iter()
        .filter(|o| *o == "failed")
        .count();
    assert_eq!(failed, 2, "both failed issuances were retried");
    assert_eq!(generations(dir.path()), ["gen-2"]);
    assert_eq!(
        hub_thumbprint(&sim, "renew-2"),
        Some(leaf_thumbprint(dir.path(), "gen-2"))
    );
    assert_eq!(agent.stop(), Some(0));
}

/// Starts the agent with the crash hook at `point`, waits for it to connect with its current
/// generation, asks for a renewal (`hubagent reprovision`) and waits for the abort there.
async fn crash_during_renewal(config: &Path, point: &str) {
    let mut command = Command::new(hubagent_bin());
    command
        .args(["--config", config.to_str().unwrap(), "run"])
        .env("HUBAGENT_TEST_ABORT_AT", point);
    let mut agent = AgentProcess::spawn(command, config, "hubagent");
    agent
        .wait_status("connected before the renewal", |s| {
            s["connection"] == "connected"
        })
        .await;
    let out = agent.cli(&["reprovision"]);
    assert!(out.status.success(), "{out:?}");
    // Polled, not waited for: a blocking wait would stall this runtime, which also runs hubsim.
    let deadline = std::time::Instant::now() + LONG_WAIT;
    let status = loop {
        if let Some(status) = agent.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the agent did not abort at {point}\n{}",
            agent.log_text()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let log = agent.log_text();
    assert!(
        !status.success() && log.contains(&format!("HUBAGENT_TEST_ABORT_AT={point}")),
        "the agent did not abort at {point}: {status}\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_at_any_step_of_a_renewal_leaves_a_working_identity() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let sim = running.sim.clone();
    let config = issuing_agent(dir.path(), &running, "renew-3", 3600, 0.8);
    let agent = AgentProcess::start(&config);
    agent
        .wait_status("connected with generation 1", |s| {
            s["connection"] == "connected" && s["issued_generation"] == 1
        })
        .await;
    assert_eq!(agent.stop(), Some(0));

    // Each step of a renewal: the new key made (DPS not asked yet), DPS answered (the chain not
    // stored), the generation half written, the generation written but not yet connected.
    for (point, new_generation_kept) in [
        ("issuance-requested", false),
        ("issuance-answered", false),
        ("issued-staged", false),
        ("issued-connected", true),
    ] {
        let before: u64 = current(dir.path()).unwrap()["gen-".len()..]
            .parse()
            .unwrap();
        let registered = registrations(&sim, "renew-3");
        crash_during_renewal(&config, point).await;
        let mut expected = vec![format!("gen-{before}")];
        if new_generation_kept {
            expected.push(format!("gen-{}", before + 1));
        }
        assert_eq!(generations(dir.path()), expected, "after {point}");
        assert_eq!(
            current(dir.path()),
            Some(format!("gen-{before}")),
            "after {point}"
        );
        // Key and certificate of every complete generation belong together.
        for generation in generations(dir.path()) {
            let gen_dir = issued_dir(dir.path()).join(&generation);
            hubagent::identity::x509::check_x509_identity(
                &gen_dir.join("chain.pem"),
                &std::fs::read(gen_dir.join("chain.pem")).unwrap(),
                &gen_dir.join("key.pem"),
                &std::fs::read(gen_dir.join("key.pem")).unwrap(),
            )
            .unwrap_or_else(|e| panic!("{generation} after {point}: {e}"));
        }
        // The restarted agent gets to the hub: with the identity it has, or, when DPS had
        // already given the hub a certificate the agent lost, with a new one after the hub
        // refused the old; it ends with one generation, current, the one the hub knows.
        let agent = AgentProcess::start(&config);
        let status = agent
            .wait_status(&format!("connected after a crash at {point}"), |s| {
                s["connection"] == "connected" && s["issued_generation"].is_u64()
            })
            .await;
        let generation = format!("gen-{}", status["issued_generation"]);
        assert_eq!(current(dir.path()).as_deref(), Some(generation.as_str()));
        assert_eq!(
            generations(dir.path()),
            std::slice::from_ref(&generation),
            "after {point}"
        );
        assert_eq!(
            hub_thumbprint(&sim, "renew-3"),
            Some(leaf_thumbprint(dir.path(), &generation)),
            "after {point}"
        );
        match point {
            // DPS was not asked: the old generation still works, no registration needed.
            "issuance-requested" => {
                assert_eq!(generation, format!("gen-{before}"));
                assert_eq!(registrations(&sim, "renew-3"), registered);
            }
            // The stored generation connects after the restart without a new registration.
            "issued-connected" => {
                assert_eq!(generation, format!("gen-{}", before + 1));
                assert_eq!(registrations(&sim, "renew-3"), registered + 1);
            }
            _ => {}
        }
        assert_eq!(agent.stop(), Some(0));
    }
}

/// Every file under `dir`, recursively.
#[cfg(feature = "tpm")]
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut stack = vec![dir.to_path_buf()];
    let mut files = Vec::new();
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.is_file() {
                files.push(path);
            }
        }
    }
    files
}

/// A generation's TPM key, from its blobs, and the leaf's SubjectPublicKeyInfo.
#[cfg(feature = "tpm")]
fn tpm_generation(
    dir: &Path,
    generation: &str,
    tcti: &str,
) -> (hubagent::identity::tpm::ecc_key::EccKey, Vec<u8>) {
    let gen_dir = issued_dir(dir).join(generation);
    let key = hubagent::identity::tpm::ecc_key::EccKey::from_blobs(
        tcti,
        &hubagent::identity::tpm::HierarchyAuth::EMPTY,
        &std::fs::read(gen_dir.join("tpm-key.pub")).unwrap(),
        &std::fs::read(gen_dir.join("tpm-key.priv")).unwrap(),
    )
    .unwrap();
    let chain = gen_dir.join("chain.pem");
    let (leaf_spki, _) =
        hubagent::identity::x509::check_chain(&chain, &std::fs::read(&chain).unwrap()).unwrap();
    (key, leaf_spki)
}

/// With `key = "tpm"` the issued certificate's key is generated by the TPM (swtpm) and never
/// leaves it: the CSR and every TLS handshake with the hub (hubsim checks the client's
/// CertificateVerify against the issued leaf) are signed there, the generation holds only the
/// TPM's blobs, a renewal makes a new TPM key, a restart signs with the stored blobs, and a TPM
/// that cannot load them (another TPM, or a cleared one) makes the agent ask DPS for a new one.
#[cfg(feature = "tpm")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issued_certificate_key_is_made_and_used_in_the_tpm() {
    use hubagent::identity::tpm::{HandleCounts, handle_counts};
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let sim = running.sim.clone();
    let swtpm = hubagent_tests::swtpm::Swtpm::start();
    let tcti = swtpm.tcti();
    let id = "renew-tpm";
    let config = issuing_agent_with(
        dir.path(),
        &running,
        id,
        3600,
        &format!("key = \"tpm\"\ntcti = \"{tcti}\"\n"),
    );
    let agent = AgentProcess::start(&config);
    agent
        .wait_status("connected with issued generation 1", |s| {
            s["connection"] == "connected" && s["issued_generation"] == 1
        })
        .await;
    assert!(
        sim.wait_until(WAIT, |s| telemetry_count(s, id) >= 3).await,
        "{}",
        agent.log_text()
    );
    assert_eq!(
        hub_thumbprint(&sim, id),
        Some(leaf_thumbprint(dir.path(), "gen-1")),
        "the hub knows the device by the issued certificate, and the agent connected with it"
    );
    // The generation holds the TPM's blobs, no key file; nothing under the state dir is a
    // private key.
    let gen1 = issued_dir(dir.path()).join("gen-1");
    let mut names: Vec<String> = std::fs::read_dir(&gen1)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["chain.pem", "tpm-key.priv", "tpm-key.pub"]);
    for file in files_under(&dir.path().join("state")) {
        let bytes = std::fs::read(&file).unwrap();
        assert!(
            !String::from_utf8_lossy(&bytes).contains("PRIVATE KEY"),
            "{} holds a private key",
            file.display()
        );
    }
    // The leaf certifies the TPM's key, and what the TPM signs verifies against the leaf.
    let (key1, leaf_spki) = tpm_generation(dir.path(), "gen-1", &tcti);
    assert_eq!(key1.subject_public_key_info(), leaf_spki);
    let signature = key1.sign_sha256(b"probe").unwrap();
    let point = &leaf_spki[leaf_spki.len() - 65..];
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, point)
        .verify(b"probe", &signature)
        .expect("the TPM's signature verifies against the issued leaf");
    let (_, report) = agent.check_report();
    assert_eq!(check_entry(&report, "identity.issued")["result"], "pass");

    // A renewal makes a new key in the TPM.
    let out = agent.cli(&["reprovision"]);
    assert!(out.status.success(), "{out:?}");
    agent
        .wait_status("connected with issued generation 2", |s| {
            s["connection"] == "connected" && s["issued_generation"] == 2
        })
        .await;
    assert_eq!(generations(dir.path()), ["gen-2"]);
    let (key2, leaf2) = tpm_generation(dir.path(), "gen-2", &tcti);
    assert_eq!(key2.subject_public_key_info(), leaf2);
    assert_ne!(leaf2, leaf_spki, "each renewal makes a new key");
    assert_eq!(
        hub_thumbprint(&sim, id),
        Some(leaf_thumbprint(dir.path(), "gen-2"))
    );
    assert_eq!(agent.stop(), Some(0));

    // A restart signs its handshake with the stored blobs: no DPS call.
    let registered = registrations(&sim, id);
    let connects = hub_connects(&sim, id);
    let agent = AgentProcess::start(&config);
    agent
        .wait_status("connected after restart", |s| {
            s["connection"] == "connected" && s["issued_generation"] == 2
        })
        .await;
    assert_eq!(registrations(&sim, id), registered);
    assert!(hub_connects(&sim, id) > connects);
    assert_eq!(agent.stop(), Some(0));
    assert_eq!(
        handle_counts(&tcti).unwrap(),
        HandleCounts {
            transient_objects: 0,
            loaded_sessions: 0,
            saved_sessions: 0,
        },
        "nothing left loaded in the TPM"
    );

    // Another TPM (the same holds for this one cleared) cannot load generation 2's key: the
    // agent says so and asks DPS for a certificate for a key in the TPM it has.
    let other = hubagent_tests::swtpm::Swtpm::start();
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(&tcti, &other.tcti());
    std::fs::write(&config, text).unwrap();
    let agent = AgentProcess::start(&config);
    agent
        .wait_status("connected with a key in the other TPM", |s| {
            s["connection"] == "connected" && s["issued_generation"] == 3
        })
        .await;
    assert!(
        agent.log_text().contains("the TPM cannot load"),
        "{}",
        agent.log_text()
    );
    assert_eq!(registrations(&sim, id), registered + 1);
    let (key3, leaf3) = tpm_generation(dir.path(), "gen-3", &other.tcti());
    assert_eq!(key3.subject_public_key_info(), leaf3);
    assert_eq!(agent.stop(), Some(0));
}
