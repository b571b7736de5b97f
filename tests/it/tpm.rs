//! The TPM back end against swtpm (each test starts its own, on free ports): HMAC inside the TPM,
//! key import, clear errors, no leaked handles; the real binary importing a key and then
//! provisioning and publishing through hubsim with no key on disk; DPS TPM attestation.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hubagent::identity::keys::SasSigner;
use hubagent::identity::tpm::{self, HandleCounts, HierarchyAuth, TpmError, TpmSigner};
use hubagent_tests::swtpm::Swtpm;
use hubagent_tests::*;
use tss_esapi::interface_types::dynamic_handles::Persistent;
use tss_esapi::interface_types::resource_handles::{Hierarchy, Provision};
use tss_esapi::interface_types::session_handles::AuthSession;

const HANDLE: u32 = 0x8100_0100;
/// The hierarchies of a fresh swtpm have empty authorization values.
const NO_AUTH: HierarchyAuth = HierarchyAuth::EMPTY;
const NOTHING_LOADED: HandleCounts = HandleCounts {
    transient_objects: 0,
    loaded_sessions: 0,
    saved_sessions: 0,
};

fn software_hmac(key_b64: &str, data: &[u8]) -> Vec<u8> {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &B64.decode(key_b64).unwrap());
    ring::hmac::sign(&key, data).as_ref().to_vec()
}

fn context(tcti: &str) -> tss_esapi::Context {
    tss_esapi::Context::new(tcti.parse().unwrap()).unwrap()
}

/// Persists a primary object made from `public` (with `auth`) at `handle`, flushing the primary.
fn persist_primary(
    tcti: &str,
    hierarchy: Hierarchy,
    public: tss_esapi::structures::Public,
    auth: Option<&[u8]>,
    handle: u32,
) {
    let mut ctx = context(tcti);
    let auth = auth.map(|a| tss_esapi::structures::Auth::try_from(a.to_vec()).unwrap());
    ctx.execute_with_session(Some(AuthSession::Password), |ctx| {
        let primary = ctx
            .create_primary(hierarchy, public, auth, None, None, None)
            .unwrap();
        ctx.evict_control(
            Provision::Owner,
            primary.key_handle.into(),
            Persistent::Persistent(tss_esapi::handles::PersistentTpmHandle::new(handle).unwrap()),
        )
        .unwrap();
        ctx.flush_context(primary.key_handle.into()).unwrap();
    });
}

fn rsa_key_public() -> tss_esapi::structures::Public {
    tss_esapi::utils::create_restricted_decryption_rsa_public(
        tss_esapi::structures::SymmetricDefinitionObject::AES_128_CFB,
        tss_esapi::interface_types::key_bits::RsaKeyBits::Rsa2048,
        tss_esapi::structures::RsaExponent::default(),
    )
    .unwrap()
}

/// An HMAC-SHA256 key (TPM-generated, dictionary-attack protected) for auth-value tests.
fn hmac_key_public() -> tss_esapi::structures::Public {
    use tss_esapi::attributes::ObjectAttributesBuilder;
    use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
    use tss_esapi::structures::{
        Digest, KeyedHashScheme, PublicBuilder, PublicKeyedHashParameters,
    };
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::KeyedHash)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(
            ObjectAttributesBuilder::new()
                .with_fixed_tpm(true)
                .with_fixed_parent(true)
                .with_sensitive_data_origin(true)
                .with_user_with_auth(true)
                .with_sign_encrypt(true)
                .build()
                .unwrap(),
        )
        .with_keyed_hash_parameters(PublicKeyedHashParameters::new(
            KeyedHashScheme::HMAC_SHA_256,
        ))
        .with_keyed_hash_unique_identifier(Digest::default())
        .build()
        .unwrap()
}

#[test]
fn hmac_happens_in_the_tpm_and_matches_software_without_leaking_handles() {
    let swtpm = Swtpm::start();
    let tcti = swtpm.tcti();
    let key = hubsim::state::random_key();
    assert_eq!(
        tpm::import_hmac_key(&tcti, &NO_AUTH, HANDLE, &B64.decode(&key).unwrap(), false).unwrap(),
        tpm::Replaced::Nothing
    );
    let signer = TpmSigner::new(&tcti, HANDLE);
    assert!(signer.describe().contains("0x81000100"));
    for i in 0..200 {
        let data = format!(
            "0ne00000001%2Fregistrations%2Fgw-{i}\n{}",
            1_900_000_000 + i
        );
        assert_eq!(
            signer.sign(data.as_bytes()).unwrap(),
            software_hmac(&key, data.as_bytes()),
            "signature {i}"
        );
    }
    assert_eq!(tpm::handle_counts(&tcti).unwrap(), NOTHING_LOADED);

    // Re-importing (key rotation) replaces the HMAC key; still nothing left loaded.
    let rotated = hubsim::state::random_key();
    for _ in 0..5 {
        assert_eq!(
            tpm::import_hmac_key(
                &tcti,
                &NO_AUTH,
                HANDLE,
                &B64.decode(&rotated).unwrap(),
                false
            )
            .unwrap(),
            tpm::Replaced::HmacKey
        );
    }
    assert_eq!(
        signer.sign(b"after rotation").unwrap(),
        software_hmac(&rotated, b"after rotation")
    );
    assert_eq!(tpm::handle_counts(&tcti).unwrap(), NOTHING_LOADED);
    // So does asking for the EK and SRK.
    let identity = tpm::identity(&tcti, &NO_AUTH).unwrap();
    assert_eq!(identity.registration_id.len(), 52);
    assert_eq!(tpm::handle_counts(&tcti).unwrap(), NOTHING_LOADED);

    // More than one TPM2B_MAX_BUFFER cannot be signed in one TPM2_HMAC: a clear refusal.
    let err = signer.sign(&[b'x'; 1025]).unwrap_err().to_string();
    assert!(err.contains("at most 1024"), "{err}");
}

#[test]
fn errors_name_the_problem() {
    let swtpm = Swtpm::start();
    let tcti = swtpm.tcti();

    // No TPM at all.
    let err = TpmSigner::new("device:/dev/hubagent-no-tpm", HANDLE)
        .sign(b"x")
        .unwrap_err()
        .to_string();
    assert!(err.contains("/dev/hubagent-no-tpm does not exist"), "{err}");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let err = TpmSigner::new(&format!("swtpm:host=127.0.0.1,port={port}"), HANDLE)
        .sign(b"x")
        .unwrap_err()
        .to_string();
    assert!(err.contains("no TPM reachable"), "{err}");

    // An empty handle.
    let err = TpmSigner::new(&tcti, HANDLE).hmac(b"x").unwrap_err();
    assert!(
        matches!(err, TpmError::HandleEmpty { handle: HANDLE }),
        "{err}"
    );
    assert!(err.to_string().contains("import-key"), "{err}");

    // A foreign key (RSA) at the handle: not used, not evicted without --force.
    persist_primary(&tcti, Hierarchy::Owner, rsa_key_public(), None, HANDLE);
    let err = TpmSigner::new(&tcti, HANDLE).hmac(b"x").unwrap_err();
    assert!(matches!(err, TpmError::ForeignKey { .. }), "{err}");
    assert!(err.to_string().contains("an RSA key"), "{err}");
    let key = hubsim::state::random_key();
    let err = tpm::import_hmac_key(&tcti, &NO_AUTH, HANDLE, &B64.decode(&key).unwrap(), false)
        .unwrap_err();
    assert!(matches!(err, TpmError::ForeignKey { .. }), "{err}");
    assert!(
        matches!(
            TpmSigner::new(&tcti, HANDLE).hmac(b"x"),
            Err(TpmError::ForeignKey { .. })
        ),
        "the RSA key is still there"
    );
    assert_eq!(
        tpm::import_hmac_key(&tcti, &NO_AUTH, HANDLE, &B64.decode(&key).unwrap(), true).unwrap(),
        tpm::Replaced::Foreign("an RSA key".into())
    );
    assert_eq!(
        TpmSigner::new(&tcti, HANDLE).sign(b"x").unwrap(),
        software_hmac(&key, b"x")
    );

    // An HMAC key with an authorization value hubagent does not know: wrong auth, and after
    // the TPM's allowed failures (swtpm: 3), dictionary-attack lockout.
    let protected = 0x8100_0200;
    persist_primary(
        &tcti,
        Hierarchy::Owner,
        hmac_key_public(),
        Some(b"secret"),
        protected,
    );
    let signer = TpmSigner::new(&tcti, protected);
    let mut errors = Vec::new();
    for _ in 0..4 {
        errors.push(signer.hmac(b"x").unwrap_err());
    }
    assert!(
        matches!(errors[0], TpmError::BadAuth { .. }),
        "{}",
        errors[0]
    );
    assert!(errors[0].to_string().contains("wrong authorization value"));
    assert!(
        matches!(errors[3], TpmError::Lockout),
        "{:?}",
        errors.iter().map(|e| e.to_string()).collect::<Vec<_>>()
    );
    assert!(errors[3].to_string().contains("lockout"));
    // The agent's own key is exempt from dictionary-attack lockout (noDA) and keeps working.
    assert_eq!(
        TpmSigner::new(&tcti, HANDLE).sign(b"y").unwrap(),
        software_hmac(&key, b"y")
    );
    assert_eq!(tpm::handle_counts(&tcti).unwrap(), NOTHING_LOADED);
}

/// Runs the real binary with `input` on stdin.
fn hubagent(args: &[&str], input: &str) -> std::process::Output {
    let mut child = Command::new(hubagent_bin())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A command that refuses its arguments exits before reading stdin; the pipe then breaks,
    // which is not the test's concern (its exit status and stderr are).
    match child.stdin.take().unwrap().write_all(input.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        other => other.unwrap(),
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("without the `tpm` feature"),
        "the hubagent binary must be built with --features tpm (tests/run-all.sh does): {stderr}"
    );
    out
}

/// An agent configuration in `dir/etc` with its state in `dir/state`, using the TPM.
fn tpm_config(
    dir: &Path,
    running: &hubsim::Running,
    swtpm: &Swtpm,
    registration_id: Option<&str>,
    key_source: &str,
) -> PathBuf {
    tpm_agent(dir, running, swtpm, registration_id, key_source)
        .extra(&builtin_sensor("100ms"))
        .write()
}

/// [`tpm_config`] before its plugin and its writing, for a test that adds `[hub]` keys.
fn tpm_agent(
    dir: &Path,
    running: &hubsim::Running,
    swtpm: &Swtpm,
    registration_id: Option<&str>,
    key_source: &str,
) -> AgentConfig {
    let attestation = format!(
        "method = \"tpm\"\ntcti = \"{tcti}\"\nhandle = 0x81000100\nkey_source = \"{key_source}\"\n",
        tcti = swtpm.tcti()
    );
    // DPS TPM attestation runs over HTTPS; an imported key registers over MQTT.
    let endpoint = if key_source == "attestation" {
        format!("https://localhost:{}", running.https_addr.port())
    } else {
        "localhost".to_string()
    };
    AgentConfig::new(dir, running, registration_id, &attestation)
        .global_endpoint(&endpoint)
        .path(dir.join("etc").join("config.toml"))
}

/// Fails if any file under `dir` holds the key, as base64 or as raw bytes.
fn assert_no_key_under(dir: &Path, key_b64: &str) {
    let raw = B64.decode(key_b64).unwrap();
    let mut stack = vec![dir.to_path_buf()];
    let mut files = 0;
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.is_file() {
                files += 1;
                let bytes = std::fs::read(&path).unwrap();
                assert!(
                    !bytes
                        .windows(key_b64.len())
                        .any(|w| w == key_b64.as_bytes()),
                    "{} holds the base64 key",
                    path.display()
                );
                assert!(
                    !bytes.windows(raw.len()).any(|w| w == raw.as_slice()),
                    "{} holds the raw key",
                    path.display()
                );
            }
        }
    }
    assert!(files > 0, "{} is empty: nothing was checked", dir.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_imported_key_provisions_and_publishes_with_no_key_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let sim = running.sim.clone();
    let swtpm = Swtpm::start();
    let id = "gw-tpm-imported";
    let key = enroll(&sim, id);
    let config = tpm_config(dir.path(), &running, &swtpm, Some(id), "imported");
    let config_arg = config.to_str().unwrap();

    // Before the import the agent says what is missing.
    let out = hubagent(&["-c", config_arg, "provision"], "");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("0x81000100 is empty"), "{stderr}");

    // The import takes the TCTI and handle from the configuration; the key comes on stdin only.
    let out = hubagent(
        &["-c", config_arg, "tpm", "import-key"],
        &format!("{key}\n"),
    );
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("0x81000100"), "{stdout}");
    assert!(!stdout.contains(&key) && !String::from_utf8_lossy(&out.stderr).contains(&key));

    let agent = AgentProcess::start(&config);
    assert!(
        sim.wait_until(WAIT, |s| telemetry_count(s, id) >= 5).await,
        "{}",
        agent.log_text()
    );
    assert_eq!(registrations(&sim, id), 1);
    assert_eq!(agent.stop(), Some(0));
    assert_no_key_under(&dir.path().join("etc"), &key);
    assert_no_key_under(&dir.path().join("state"), &key);

    // An agent restart uses the cached assignment and the persisted key: no DPS call.
    let connects = hub_connects(&sim, id);
    let agent = AgentProcess::start(&config);
    assert!(
        sim.wait_until(WAIT, |s| hub_connects(s, id) > connects)
            .await,
        "{}",
        agent.log_text()
    );
    assert_eq!(registrations(&sim, id), 1, "{}", agent.log_text());
    assert!(agent.log_text().contains("cached assignment"));
    assert_eq!(agent.stop(), Some(0));

    // A TPM power cycle keeps the persistent key. (Its new port changes the TCTI, which is part
    // of the provisioning fingerprint, so the agent also registers again, signing in the TPM.)
    let mut swtpm = swtpm;
    swtpm.restart();
    let config = tpm_config(dir.path(), &running, &swtpm, Some(id), "imported");
    let before = telemetry_count(&sim, id);
    let agent = AgentProcess::start(&config);
    assert!(
        sim.wait_until(WAIT, |s| registrations(s, id) == 2
            && telemetry_count(s, id) >= before + 5)
            .await,
        "{}",
        agent.log_text()
    );
    assert_eq!(agent.stop(), Some(0));
    assert_no_key_under(&dir.path().join("etc"), &key);
    assert_no_key_under(&dir.path().join("state"), &key);
    assert_eq!(tpm::handle_counts(&swtpm.tcti()).unwrap(), NOTHING_LOADED);
}

#[test]
fn import_key_derives_group_keys_and_leaves_foreign_objects_alone() {
    let swtpm = Swtpm::start();
    let tcti = swtpm.tcti();
    let no_config = "/nonexistent/hubagent.toml";
    let group =
        "8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE/+ah/lSh3lF8e2YG1Te7w1KpZhJFFXJrqYKi9yegxkqIChbqOS9Egw==";
    let out = hubagent(
        &[
            "-c",
            no_config,
            "tpm",
            "import-key",
            "--tcti",
            &tcti,
            "--handle",
            "0x81000101",
            "--group-registration-id",
            "sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6",
        ],
        group,
    );
    assert!(out.status.success(), "{out:?}");
    // The published device key of that group member (docs/protocol.md §3).
    assert_eq!(
        TpmSigner::new(&tcti, 0x8100_0101).sign(b"probe").unwrap(),
        software_hmac("Jsm0lyGpjaVYVP2g3FnmnmG9dI/9qU24wNoykUmermc=", b"probe")
    );

    persist_primary(&tcti, Hierarchy::Owner, rsa_key_public(), None, HANDLE);
    let key = hubsim::state::random_key();
    let args = ["-c", no_config, "tpm", "import-key", "--tcti", &tcti];
    let out = hubagent(&args, &key);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("an RSA key") && stderr.contains("--force"),
        "{stderr}"
    );
    let out = hubagent(&[&args[..], &["--force"]].concat(), &key);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        TpmSigner::new(&tcti, HANDLE).sign(b"probe").unwrap(),
        software_hmac(&key, b"probe")
    );

    // Garbage on stdin and reserved handles are refused before the TPM is touched.
    let out = hubagent(&args, "not base64!!");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not base64"));
    let out = hubagent(
        &[
            "-c",
            no_config,
            "tpm",
            "import-key",
            "--tcti",
            &tcti,
            "--handle",
            "0x81010001",
        ],
        &key,
    );
    assert_eq!(out.status.code(), Some(78), "{out:?}");

    // show-ek: the EK public and the registration id Azure derives from it.
    let out = hubagent(
        &["-c", no_config, "tpm", "show-ek", "--tcti", &tcti, "--json"],
        "",
    );
    assert!(out.status.success(), "{out:?}");
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ek = B64
        .decode(shown["endorsementKey"].as_str().unwrap())
        .unwrap();
    assert_eq!(&ek[2..4], &[0x00, 0x01], "an RSA TPMT_PUBLIC");
    assert_eq!(
        usize::from(u16::from_be_bytes([ek[0], ek[1]])),
        ek.len() - 2,
        "TPM2B size prefix"
    );
    assert_eq!(
        shown["registrationId"],
        tpm::registration_id_from_ek(&ek).as_str()
    );
    assert_eq!(tpm::handle_counts(&tcti).unwrap(), NOTHING_LOADED);
}

#[test]
fn hubsim_activation_blobs_import_only_into_their_tpm() {
    let swtpm = Swtpm::start();
    let tcti = swtpm.tcti();
    let identity = tpm::identity(&tcti, &NO_AUTH).unwrap();
    let key = hubsim::state::random_key();
    let blob = hubsim::tpm::activation_blob(
        &identity.endorsement_key,
        &identity.storage_root_key,
        &B64.decode(&key).unwrap(),
    )
    .unwrap();
    assert_eq!(
        tpm::attestation::import_activation_blob(&tcti, &NO_AUTH, HANDLE, &blob).unwrap(),
        tpm::Replaced::Nothing
    );
    assert_eq!(
        TpmSigner::new(&tcti, HANDLE).sign(b"probe").unwrap(),
        software_hmac(&key, b"probe")
    );
    // A second blob (the hub key, after the DPS challenge key) replaces the first.
    let hub_key = hubsim::state::random_key();
    let blob = hubsim::tpm::activation_blob(
        &identity.endorsement_key,
        &identity.storage_root_key,
        &B64.decode(&hub_key).unwrap(),
    )
    .unwrap();
    assert_eq!(
        tpm::attestation::import_activation_blob(&tcti, &NO_AUTH, HANDLE, &blob).unwrap(),
        tpm::Replaced::HmacKey
    );
    assert_eq!(
        TpmSigner::new(&tcti, HANDLE).sign(b"probe").unwrap(),
        software_hmac(&hub_key, b"probe")
    );
    assert_eq!(tpm::handle_counts(&tcti).unwrap(), NOTHING_LOADED);

    // Another TPM (another EK) cannot open it, and its handle stays empty.
    let other = Swtpm::start();
    let err = tpm::attestation::import_activation_blob(&other.tcti(), &NO_AUTH, HANDLE, &blob)
        .unwrap_err();
    assert!(err.to_string().contains("another TPM"), "{err}");
    assert!(matches!(
        TpmSigner::new(&other.tcti(), HANDLE).hmac(b"x"),
        Err(TpmError::HandleEmpty { .. })
    ));
    assert_eq!(tpm::handle_counts(&other.tcti()).unwrap(), NOTHING_LOADED);
    // A corrupt blob is named as such.
    let err =
        tpm::attestation::import_activation_blob(&tcti, &NO_AUTH, HANDLE, &blob[..40]).unwrap_err();
    assert!(err.to_string().contains("malformed"), "{err}");
}

/// Enrolls `tcti`'s TPM (its EK, as `hubagent tpm show-ek` prints it) for DPS TPM attestation;
/// returns the registration id Azure derives from the EK.
fn enroll_tpm(sim: &hubsim::Sim, tcti: &str, registration_id: Option<&str>) -> String {
    let out = hubagent(
        &[
            "-c",
            "/nonexistent.toml",
            "tpm",
            "show-ek",
            "--tcti",
            tcti,
            "--json",
        ],
        "",
    );
    assert!(out.status.success(), "{out:?}");
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = registration_id
        .unwrap_or(shown["registrationId"].as_str().unwrap())
        .to_string();
    let ek = shown["endorsementKey"].as_str().unwrap().to_string();
    Enrollment::tpm(ek).individual(sim, &id);
    id
}

fn hub_primary_key(sim: &hubsim::Sim, device_id: &str) -> String {
    sim.read(|s| {
        s.devices[&device_key(sim, device_id)]
            .authentication
            .symmetric_key
            .as_ref()
            .unwrap()
            .primary_key
            .clone()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dps_tpm_attestation_provisions_and_the_hub_key_lives_in_the_tpm() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let sim = running.sim.clone();
    let swtpm = Swtpm::start();
    let tcti = swtpm.tcti();
    let id = enroll_tpm(&sim, &tcti, None);
    // No registration_id in the file: the agent derives it from the EK, as Azure does.
    let config = tpm_config(dir.path(), &running, &swtpm, None, "attestation");
    let config_arg = config.to_str().unwrap();

    // DPS throttles the first request and assigns slowly: the HTTPS client waits what each
    // retry-after asks, no less and not noticeably more.
    {
        let mut faults = sim.faults.lock().unwrap();
        faults.dps_throttle = Some((1, 1));
        faults.dps_throttle_requests = hubsim::state::ThrottledRequests::Register;
        faults.dps_slow_assignment = Some(hubsim::state::SlowAssignment {
            polls: 2,
            retry_after: Some(1),
        });
    }
    let out = hubagent(&["-c", config_arg, "provision", "--json"], "");
    assert!(out.status.success(), "{out:?}");
    assert_retry_after_honoured(&sim, &id, 4);
    sim.faults.lock().unwrap().dps_slow_assignment = None;
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(result["deviceId"], id.as_str());
    assert_eq!(result["hub"], hubsim::DEFAULT_HUB);
    assert!(
        result["registrationState"]["tpm"]["authenticationKey"].is_string(),
        "{result}"
    );
    assert_eq!(registrations(&sim, &id), 1);
    // The TPM now holds the hub device key (not the DPS challenge key).
    let hub_key = hub_primary_key(&sim, &id);
    assert_eq!(
        TpmSigner::new(&tcti, HANDLE).sign(b"probe").unwrap(),
        software_hmac(&hub_key, b"probe")
    );
    let attestations: Vec<String> = registration_events(&sim)
        .iter()
        .map(|r| format!("{}:{}:{}", r.transport, r.attestation, r.outcome))
        .collect();
    assert_eq!(
        attestations,
        [
            "https:tpm:throttled",
            "https:tpm:tpm-challenge",
            "https:tpm:assigned"
        ],
        "throttled, challenge, then the signed registration"
    );

    // The daemon boots from the cached assignment and signs hub tokens in the TPM.
    let agent = AgentProcess::start(&config);
    assert!(
        sim.wait_until(WAIT, |s| telemetry_count(s, &id) >= 5).await,
        "{}",
        agent.log_text()
    );
    assert_eq!(registrations(&sim, &id), 1, "{}", agent.log_text());

    // Reprovisioning runs the whole attestation again; the new hub key replaces the old one.
    let out = agent.cli(&["reprovision"]);
    assert!(out.status.success(), "{out:?}");
    let before = telemetry_count(&sim, &id);
    assert!(
        sim.wait_until(WAIT, |s| registrations(s, &id) == 2
            && telemetry_count(s, &id) >= before + 5)
            .await,
        "{}",
        agent.log_text()
    );
    let new_hub_key = hub_primary_key(&sim, &id);
    assert_ne!(new_hub_key, hub_key);
    assert_eq!(agent.stop(), Some(0));
    assert_eq!(
        TpmSigner::new(&tcti, HANDLE).sign(b"probe").unwrap(),
        software_hmac(&new_hub_key, b"probe")
    );

    // TPM cleared of the key: the cache is useless without it, so the agent attests again.
    assert_eq!(
        tpm::evict(&tcti, &NO_AUTH, HANDLE, false).unwrap(),
        tpm::Replaced::HmacKey
    );
    let agent = AgentProcess::start(&config);
    let before = telemetry_count(&sim, &id);
    assert!(
        sim.wait_until(WAIT, |s| registrations(s, &id) == 3
            && telemetry_count(s, &id) >= before + 5)
            .await,
        "{}",
        agent.log_text()
    );
    assert!(agent.log_text().contains("registering with DPS again"));
    assert_eq!(agent.stop(), Some(0));

    assert_eq!(tpm::handle_counts(&tcti).unwrap(), NOTHING_LOADED);
    let last_key = hub_primary_key(&sim, &id);
    assert_no_key_under(&dir.path().join("etc"), &last_key);
    assert_no_key_under(&dir.path().join("state"), &last_key);
}

/// DPS over HTTPS (TPM attestation) tunnels through `[hub] proxy` like the MQTT connections: a
/// refusal names the proxy and what its answer means, and with the right password the TPM
/// registers through it and the hub session follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dps_tpm_attestation_goes_through_an_authenticating_proxy() {
    const PASSWORD: &str = "tpm-pr0xy-s3cret";
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let sim = running.sim.clone();
    let proxy = Tinyproxy::start(&dir.path().join("proxy"), Some(("hubagent", PASSWORD)));
    let swtpm = Swtpm::start();
    let id = enroll_tpm(&sim, &swtpm.tcti(), None);
    let with_password = |password: &str| {
        let file = write_key(dir.path(), "proxy.pass", password);
        tpm_agent(dir.path(), &running, &swtpm, None, "attestation")
            .extra(&format!(
                "proxy = \"http://hubagent@127.0.0.1:{}\"\nproxy_password = {{ file = \"{}\" }}\n",
                proxy.port,
                file.display()
            ))
            .extra(&builtin_sensor("100ms"))
            .write()
    };

    let wrong = "not-the-tpm-password";
    let config = with_password(wrong);
    let out = hubagent(&["-c", config.to_str().unwrap(), "provision"], "");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        stderr.contains(&format!(
            "proxy http://hubagent@127.0.0.1:{} (from [hub] proxy) refused the tunnel: HTTP 40",
            proxy.port
        )) && stderr
            .contains("proxy authentication required: check the proxy user and proxy_password"),
        "{stderr}"
    );
    assert!(!stderr.contains(wrong), "{stderr}");
    assert_eq!(
        registration_events(&sim).len(),
        0,
        "DPS was reached around the proxy"
    );

    let config = with_password(PASSWORD);
    let agent = AgentProcess::start(&config);
    assert!(
        sim.wait_until(WAIT, |s| telemetry_count(s, &id) >= 3).await,
        "{}",
        agent.log_text()
    );
    let tunnels = proxy.tunnels();
    let dps = format!("localhost:{}", running.https_addr.port());
    assert!(
        tunnels.contains(&dps),
        "DPS over HTTPS not tunnelled: {tunnels:?}"
    );
    assert!(
        tunnels
            .iter()
            .any(|t| t.ends_with(&format!(":{}", running.mqtt_addr.port()))),
        "the hub was not reached through the proxy: {tunnels:?}"
    );
    assert_eq!(registrations(&sim, &id), 1);
    let status = agent.status().to_string();
    let log = agent.log_text();
    assert_eq!(agent.stop(), Some(0));
    assert!(!log.contains(PASSWORD) && !status.contains(PASSWORD));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tpm_with_another_endorsement_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let sim = running.sim.clone();
    let enrolled = Swtpm::start();
    let id = enroll_tpm(&sim, &enrolled.tcti(), Some("gw-tpm-enrolled"));
    // Another device claims the enrolled registration id with its own TPM.
    let impostor = Swtpm::start();
    let config = tpm_config(dir.path(), &running, &impostor, Some(&id), "attestation");
    let out = hubagent(&["-c", config.to_str().unwrap(), "provision"], "");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("refused the TPM registration")
            && stderr.contains("endorsement key differs"),
        "{stderr}"
    );
    assert_eq!(registrations(&sim, &id), 0);
    assert!(!sim.read(|s| s.devices.contains_key(&device_key(&sim, &id))));
    // Nothing was imported into the impostor's TPM, and nothing left loaded.
    assert!(matches!(
        TpmSigner::new(&impostor.tcti(), HANDLE).hmac(b"x"),
        Err(TpmError::HandleEmpty { .. })
    ));
    assert_eq!(
        tpm::handle_counts(&impostor.tcti()).unwrap(),
        NOTHING_LOADED
    );

    // A blob DPS made for the enrolled TPM is useless to the impostor even if intercepted.
    let identity = tpm::identity(&enrolled.tcti(), &NO_AUTH).unwrap();
    let blob = hubsim::tpm::activation_blob(
        &identity.endorsement_key,
        &identity.storage_root_key,
        &[1u8; 32],
    )
    .unwrap();
    assert!(
        tpm::attestation::import_activation_blob(&impostor.tcti(), &NO_AUTH, HANDLE, &blob)
            .is_err()
    );
}

/// A hubsim whose DPS asks for no wait before polling (retry-after 0), for tests that register
/// many times.
async fn start_sim_without_retry_wait(dir: &Path) -> hubsim::Running {
    let mut options = sim_options(dir);
    options.retry_after_secs = 0;
    hubsim::start(options).await.expect("hubsim starts")
}

/// Issue #4: "a loop of 200 provisionings on swtpm leaves the TPM with no leaked handles". Each
/// cycle is a whole DPS TPM attestation (EK/SRK read, challenge, ActivateCredential, Import,
/// persist, SAS signed in the TPM) against hubsim, run in-process so the loop stays quick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_tpm_provisionings_leak_no_handle() {
    const CYCLES: usize = 200;
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim_without_retry_wait(dir.path()).await;
    let sim = running.sim.clone();
    let swtpm = Swtpm::start();
    let tcti = swtpm.tcti();
    let id = enroll_tpm(&sim, &tcti, None);
    let config_path = tpm_config(dir.path(), &running, &swtpm, None, "attestation");
    let config = hubagent::config::Config::load(&config_path, &|_| None).unwrap();

    let mut hub_keys = std::collections::HashSet::new();
    for cycle in 0..CYCLES {
        let (cache, fresh) = hubagent::provisioning::provision_once(&config, true)
            .await
            .unwrap_or_else(|e| panic!("cycle {cycle}: {e}"));
        assert!(fresh, "cycle {cycle} used the cache");
        assert_eq!(cache.device_id, id);
        assert_eq!(
            tpm::handle_counts(&tcti).unwrap(),
            NOTHING_LOADED,
            "cycle {cycle} left something loaded in the TPM"
        );
        hub_keys.insert(hub_primary_key(&sim, &id));
    }
    assert_eq!(registrations(&sim, &id), CYCLES);
    // Every cycle imported the key DPS issued, and the last one is what the TPM now signs with.
    assert_eq!(
        hub_keys.len(),
        CYCLES,
        "each registration issues a new hub key"
    );
    assert_eq!(
        TpmSigner::new(&tcti, HANDLE).sign(b"probe").unwrap(),
        software_hmac(&hub_primary_key(&sim, &id), b"probe")
    );
}

/// A TPM whose owner set hierarchy passwords: without them the agent fails naming the settings
/// to fill in; with them (files, mode 0600) it attests and imports, and the passwords appear in
/// no output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hierarchy_passwords_come_from_files() {
    const OWNER: &str = "owner-pw-7f3a9c";
    const ENDORSEMENT: &str = "endorsement-pw-51be2d";
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim_without_retry_wait(dir.path()).await;
    let sim = running.sim.clone();
    let swtpm = Swtpm::start();
    let tcti = swtpm.tcti();
    // Enrolled while the hierarchies are still open (the EK public does not depend on them).
    let id = enroll_tpm(&sim, &tcti, None);
    {
        let mut ctx = context(&tcti);
        ctx.execute_with_session(Some(AuthSession::Password), |ctx| {
            for (hierarchy, password) in [
                (tss_esapi::handles::AuthHandle::Owner, OWNER),
                (tss_esapi::handles::AuthHandle::Endorsement, ENDORSEMENT),
            ] {
                let auth = tss_esapi::structures::Auth::try_from(password.as_bytes().to_vec());
                ctx.hierarchy_change_auth(hierarchy, auth.unwrap()).unwrap();
            }
        });
    }
    let config = tpm_config(dir.path(), &running, &swtpm, None, "attestation");
    let config_arg = config.to_str().unwrap();

    // Without the passwords: a clear refusal that names the settings, and nothing registered.
    let out = hubagent(&["-c", config_arg, "provision"], "");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("wrong authorization value") && stderr.contains("endorsement_auth"),
        "{stderr}"
    );
    assert_eq!(registrations(&sim, &id), 0);

    // With them, from private files.
    let secrets = dir.path().join("etc");
    let owner_file = write_key(&secrets, "owner.auth", OWNER);
    let endorsement_file = write_key(&secrets, "endorsement.auth", ENDORSEMENT);
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "key_source = \"attestation\"\n",
        &format!(
            "key_source = \"attestation\"\nowner_auth = {{ file = \"{}\" }}\nendorsement_auth = {{ file = \"{}\" }}\n",
            owner_file.display(),
            endorsement_file.display()
        ),
    );
    std::fs::write(&config, text).unwrap();
    let out = hubagent(&["-c", config_arg, "provision", "--json"], "");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(registrations(&sim, &id), 1);
    assert_eq!(
        TpmSigner::new(&tcti, HANDLE).sign(b"probe").unwrap(),
        software_hmac(&hub_primary_key(&sim, &id), b"probe")
    );
    // show-ek and import-key take the passwords from the same configuration.
    let out = hubagent(&["-c", config_arg, "tpm", "show-ek", "--json"], "");
    assert!(out.status.success(), "{out:?}");
    let key = hubsim::state::random_key();
    let out = hubagent(&["-c", config_arg, "tpm", "import-key"], &key);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        TpmSigner::new(&tcti, HANDLE).sign(b"x").unwrap(),
        software_hmac(&key, b"x")
    );
    // A wrong password is refused as such, and the password itself is never echoed.
    std::fs::write(&owner_file, "not-the-owner-password\n").unwrap();
    let out = hubagent(&["-c", config_arg, "tpm", "import-key", "--force"], &key);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all.contains("wrong authorization value"), "{all}");
    for password in [OWNER, ENDORSEMENT, "not-the-owner-password"] {
        assert!(!all.contains(password), "{all}");
    }
    assert_eq!(tpm::handle_counts(&tcti).unwrap(), NOTHING_LOADED);
}

/// DPS TPM attestation with certificate issuance (`[provisioning.issued_certificate]`): the
/// registration over HTTPS carries the CSR of a key the TPM made (the default with TPM
/// attestation), DPS answers with the issued chain instead of a hub key, the hub knows the
/// device by that certificate and the agent connects with it, signing in the TPM; a renewal runs
/// the whole attestation again with a new key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_attestation_gets_an_issued_certificate_with_its_key_in_the_tpm() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_sim(dir.path()).await;
    let sim = running.sim.clone();
    let swtpm = Swtpm::start();
    let tcti = swtpm.tcti();
    let id = enroll_tpm(&sim, &tcti, None);
    let ca_dir = dir.path().join("issuing-ca");
    hubsim::pki::issue(hubsim::pki::CertKind::Root, "issuing-ca", &ca_dir, None).unwrap();
    sim.mutate(|s| {
        s.enrollments
            .get_mut(&id)
            .unwrap()
            .common
            .certificate_issuance = Some(hubsim::state::CertificateIssuance {
            issuer_dir: ca_dir.clone(),
            validity_seconds: 3600,
        });
    })
    .unwrap();
    let config = tpm_agent(dir.path(), &running, &swtpm, None, "attestation")
        .extra("[provisioning.issued_certificate]\n")
        .extra(&builtin_sensor("100ms"))
        .write();
    let issued = dir.path().join("state").join("issued");
    let leaf_thumbprint = |generation: &str| {
        let pem = std::fs::read(issued.join(generation).join("chain.pem")).unwrap();
        use rustls_pki_types::pem::PemObject;
        let leaf = rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
            .next()
            .unwrap()
            .unwrap();
        hubsim::auth::sha256_thumbprint(&leaf)
    };
    let hub_auth = || sim.read(|s| s.devices[&device_key(&sim, &id)].authentication.clone());

    let agent = AgentProcess::start(&config);
    agent
        .wait_status("connected with issued generation 1", |s| {
            s["connection"] == "connected" && s["issued_generation"] == 1
        })
        .await;
    assert!(
        sim.wait_until(WAIT, |s| telemetry_count(s, &id) >= 3).await,
        "{}",
        agent.log_text()
    );
    let outcomes: Vec<String> = registration_events(&sim)
        .iter()
        .map(|r| format!("{}:{}:{}", r.transport, r.attestation, r.outcome))
        .collect();
    assert_eq!(outcomes, ["https:tpm:tpm-challenge", "https:tpm:assigned"]);
    let auth = hub_auth();
    assert!(auth.symmetric_key.is_none(), "no hub key: {auth:?}");
    assert_eq!(
        auth.x509_thumbprint.and_then(|t| t.primary_thumbprint),
        Some(leaf_thumbprint("gen-1")),
        "the hub knows the device by the issued certificate"
    );
    assert!(
        issued.join("gen-1").join("tpm-key.priv").is_file()
            && !issued.join("gen-1").join("key.pem").exists(),
        "with TPM attestation the issued certificate's key is in the TPM"
    );

    // A renewal: the attestation again, with a new key's CSR.
    let out = agent.cli(&["reprovision"]);
    assert!(out.status.success(), "{out:?}");
    agent
        .wait_status("connected with issued generation 2", |s| {
            s["connection"] == "connected" && s["issued_generation"] == 2
        })
        .await;
    assert_eq!(registrations(&sim, &id), 2);
    assert_eq!(
        hub_auth()
            .x509_thumbprint
            .and_then(|t| t.primary_thumbprint),
        Some(leaf_thumbprint("gen-2"))
    );
    assert_eq!(agent.stop(), Some(0));
    assert_eq!(tpm::handle_counts(&tcti).unwrap(), NOTHING_LOADED);
}

/// The names of the shared libraries an executable needs (its DT_NEEDED entries).
fn needed_libraries(executable: &Path) -> Vec<String> {
    let out = Command::new("readelf")
        .arg("--dynamic")
        .arg(executable)
        .output()
        .expect("readelf (binutils) runs");
    assert!(
        out.status.success(),
        "readelf {}: {out:?}",
        executable.display()
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|line| line.contains("(NEEDED)"))
        .filter_map(|line| Some(line.split('[').nth(1)?.trim_end_matches(']').to_string()))
        .collect()
}

/// Only the helper links the TPM libraries: the daemon of an installation without a TPM maps
/// none of them (docs/benchmarks.md, "Where the memory goes").
#[test]
fn only_the_tpm_helper_links_the_tpm_libraries() {
    let daemon = hubagent_bin();
    let helper = daemon.with_file_name("hubagent-tpm");
    let daemon_needs = needed_libraries(&daemon);
    let helper_needs = needed_libraries(&helper);
    assert!(
        daemon_needs.iter().any(|lib| lib.starts_with("libc.so")),
        "readelf's output was not understood: {daemon_needs:?}"
    );
    assert!(
        !daemon_needs
            .iter()
            .any(|lib| lib.starts_with("libtss2") || lib.starts_with("libcrypto")),
        "{} links {daemon_needs:?}",
        daemon.display()
    );
    assert!(
        helper_needs
            .iter()
            .any(|lib| lib.starts_with("libtss2-esys")),
        "{} links {helper_needs:?}",
        helper.display()
    );
}

/// A helper killed while it waits for the TPM fails that operation with an error saying what
/// happened; the next operation starts a new helper and works.
#[test]
fn a_helper_killed_mid_operation_fails_it_clearly_and_the_next_starts_another() {
    let swtpm = Swtpm::start();
    let tcti = swtpm.tcti();
    let key = hubsim::state::random_key();
    tpm::import_hmac_key(&tcti, &NO_AUTH, HANDLE, &B64.decode(&key).unwrap(), false).unwrap();
    let first = tpm::client::helper_pid().expect("a helper runs after an operation");

    // A "TPM" that takes commands and never answers (its command port and the control port
    // after it): the helper's HMAC waits in the middle of its conversation.
    let (silent, control) = loop {
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = silent.local_addr().unwrap().port();
        if let Ok(control) = std::net::TcpListener::bind(("127.0.0.1", port + 1)) {
            break (silent, control);
        }
    };
    let port = silent.local_addr().unwrap().port();
    let (received_tx, received) = std::sync::mpsc::channel();
    for listener in [silent, control] {
        let received_tx = received_tx.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for mut stream in listener.incoming().flatten() {
                let mut byte = [0u8; 1];
                if std::io::Read::read(&mut stream, &mut byte).unwrap_or(0) == 1 {
                    let _ = received_tx.send(());
                }
                held.push(stream);
            }
        });
    }
    let waiting = std::thread::spawn(move || {
        TpmSigner::new(&format!("swtpm:host=127.0.0.1,port={port}"), HANDLE).hmac(b"x")
    });
    received
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("the helper sends its command to the silent TPM");
    assert_eq!(tpm::client::helper_pid(), Some(first));
    // SAFETY: kill(2) on the helper this process started; no memory is involved.
    assert_eq!(unsafe { libc::kill(first as i32, libc::SIGKILL) }, 0);

    let err = waiting.join().unwrap().unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, TpmError::Helper(_)), "{err:?}");
    assert!(
        text.contains("hubagent-tpm") && text.contains("was killed by signal 9"),
        "{text}"
    );
    assert!(text.contains("during an HMAC signature"), "{text}");
    assert_eq!(tpm::client::helper_pid(), None);

    // The next operation starts another helper, and the key is still the TPM's.
    let signer = TpmSigner::new(&tcti, HANDLE);
    assert_eq!(
        signer.sign(b"after").unwrap(),
        software_hmac(&key, b"after")
    );
    let second = tpm::client::helper_pid().expect("a new helper runs");
    assert_ne!(second, first);
}

/// A helper without requests for a while is stopped (it exits on its own status 0, nothing is
/// left behind) and the next operation starts another.
#[test]
fn an_idle_helper_is_stopped_and_started_again_when_needed() {
    let swtpm = Swtpm::start();
    let tcti = swtpm.tcti();
    let key = hubsim::state::random_key();
    tpm::import_hmac_key(&tcti, &NO_AUTH, HANDLE, &B64.decode(&key).unwrap(), false).unwrap();
    let first = tpm::client::helper_pid().expect("a helper runs after an operation");
    let deadline = std::time::Instant::now() + tpm::client::IDLE * 4;
    while tpm::client::helper_pid().is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "the helper still runs {:?} after its last request",
            tpm::client::IDLE * 4
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // Reaped, not left a zombie: the process is gone.
    assert!(!Path::new(&format!("/proc/{first}")).exists());
    let signer = TpmSigner::new(&tcti, HANDLE);
    assert_eq!(
        signer.sign(b"later").unwrap(),
        software_hmac(&key, b"later")
    );
    assert_ne!(tpm::client::helper_pid(), Some(first));
}

/// The directory the dynamic loader finds `libtss2-esys.so.0` in (`ldconfig -p`), as a real
/// path (Debian's `/lib` is a link to `/usr/lib`).
fn tpm_library_dir() -> PathBuf {
    let out = Command::new("ldconfig")
        .arg("-p")
        .output()
        .expect("ldconfig (libc-bin) runs");
    assert!(out.status.success(), "ldconfig -p: {out:?}");
    let listing = String::from_utf8(out.stdout).unwrap();
    let library = listing
        .lines()
        .filter(|line| line.trim_start().starts_with("libtss2-esys.so.0 "))
        .find_map(|line| line.split(" => ").nth(1))
        .unwrap_or_else(|| panic!("ldconfig -p lists no libtss2-esys.so.0:\n{listing}"));
    std::fs::canonicalize(library.trim())
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf()
}

/// On a gateway installed without the package's Recommends (no TPM libraries), a TPM command
/// fails with an error naming the missing library and the packages to install, and no key it was
/// given. The system is made to lack them for real: in a mount namespace of the agent's own
/// (`unshare -rm`), the directory holding the TPM libraries is replaced by one linking to all its
/// other entries, so the real dynamic loader finds no libtss2 for the real helper (exit 127).
#[test]
fn a_missing_tpm_library_is_named_with_the_packages_to_install() {
    let libraries = tpm_library_dir();
    let dir = tempfile::tempdir().unwrap();
    // `real`: where the namespace binds the library directory; `view`: links to its entries.
    let (real, view) = (dir.path().join("real"), dir.path().join("view"));
    std::fs::create_dir(&real).unwrap();
    std::fs::create_dir(&view).unwrap();
    let mut hidden = Vec::new();
    for entry in std::fs::read_dir(&libraries).unwrap() {
        let name = entry.unwrap().file_name();
        if name.to_string_lossy().starts_with("libtss2") {
            hidden.push(name);
        } else {
            std::os::unix::fs::symlink(real.join(&name), view.join(&name)).unwrap();
        }
    }
    assert!(!hidden.is_empty(), "no libtss2 in {}", libraries.display());

    let key = hubsim::state::random_key();
    let without_tpm_libraries = |args: &[&str]| {
        Command::new("unshare")
            .args(["-rm", "sh", "-c"])
            .arg(r#"mount --bind "$1" "$2" && mount --bind "$3" "$1" && shift 3 && exec "$@""#)
            .arg("sh")
            .arg(&libraries)
            .arg(&real)
            .arg(&view)
            .arg(hubagent_bin())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("unshare (util-linux) runs")
    };
    let helper = hubagent_bin().with_file_name("hubagent-tpm");
    let expected = format!(
        "the TPM helper {} cannot start: libtss2-esys.so.0 is not installed.",
        helper.display()
    );
    let run = |args: &[&str], input: &str| {
        let mut child = without_tpm_libraries(args);
        match child.stdin.take().unwrap().write_all(input.as_bytes()) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
            other => other.unwrap(),
        }
        child.wait_with_output().unwrap()
    };
    // No TPM is reached: the helper does not start. (Port 9, discard: nothing answers there.)
    let tcti = "swtpm:host=127.0.0.1,port=9";
    let no_config = "/nonexistent/hubagent.toml";
    for (args, input) in [
        (
            vec!["-c", no_config, "tpm", "show-ek", "--tcti", tcti],
            String::new(),
        ),
        (
            vec!["-c", no_config, "tpm", "import-key", "--tcti", tcti],
            format!("{key}\n"),
        ),
    ] {
        let out = run(&args, &input);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {out:?}");
        assert!(stderr.contains(&expected), "{args:?}: {stderr}");
        assert!(
            stderr.contains(
                "apt install libtss2-esys-3.0.2-0t64 libtss2-mu-4.0.1-0t64 libtss2-tctildr0t64"
            ) && stderr.contains("apt install libtss2-esys-3.0.2-0 libtss2-mu0 libtss2-tctildr0"),
            "{args:?}: {stderr}"
        );
        assert!(
            !stdout.contains(&key) && !stderr.contains(&key),
            "{args:?}: the key reached the output: {stderr}"
        );
    }

    // The daemon with `method = "tpm"`: its DPS registration fails with the same error, which it
    // logs (and retries later).
    let config = dir.path().join("config.toml");
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    std::fs::write(
        &config,
        format!(
            "[provisioning]\nsource = \"dps\"\nglobal_endpoint = \"https://127.0.0.1:9\"\n\
             id_scope = \"0ne00000000\"\nregistration_id = \"gw-no-tss\"\n\
             [provisioning.attestation]\nmethod = \"tpm\"\ntcti = \"{tcti}\"\n\
             [agent]\nstate_dir = \"{}\"\n",
            state.display()
        ),
    )
    .unwrap();
    /// Kills the daemon however the test ends (a failed assertion included).
    struct KilledOnDrop(std::process::Child);
    impl Drop for KilledOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut daemon = KilledOnDrop(without_tpm_libraries(&[
        "-c",
        config.to_str().unwrap(),
        "run",
    ]));
    let (lines_tx, lines) = std::sync::mpsc::channel();
    for output in [
        Box::new(daemon.0.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(daemon.0.stderr.take().unwrap()),
    ] {
        let lines_tx = lines_tx.clone();
        std::thread::spawn(move || {
            for line in
                std::io::BufRead::lines(std::io::BufReader::new(output)).map_while(Result::ok)
            {
                let _ = lines_tx.send(line);
            }
        });
    }
    drop(lines_tx);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut seen = Vec::new();
    let logged = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains("DPS registration failed") && line.contains(&expected) => {
                break line;
            }
            Ok(line) => seen.push(line),
            Err(e) => panic!(
                "the daemon did not log the error ({e}); it logged:\n{}",
                seen.join("\n")
            ),
        }
    };
    assert!(
        logged.contains("apt install libtss2-esys-3.0.2-0t64"),
        "{logged}"
    );
    // `unshare` executed the agent itself: this is its process.
    daemon.0.kill().unwrap();
    let status = daemon.0.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL),
        "the daemon ended before it was killed: {status}"
    );
}
