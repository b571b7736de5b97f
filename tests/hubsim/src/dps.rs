//! Device Provisioning Service logic, independent of transport: match the registration to an
//! enrollment, check its credential, allocate a hub, create/update the hub device, and answer with
//! the exact JSON of the real service. MQTT (`mqtt`) and HTTPS (`http`) both call [`Dps`].

use std::collections::HashMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde_json::{Value, json};

use crate::auth::{self, AuthError};
use crate::state::{
    Attestation, CertificatePair, Device, DeviceAuthentication, EnrollmentCommon, PollEvent,
    RegistrationEvent, Sim, Status, Store, SymmetricKeyPair, ThrottledRequests, Thumbprints,
    TpmChallenge, Twin, now_rfc3339, random_key,
};

/// How the device authenticated its transport.
#[derive(Debug, Clone)]
pub enum DeviceCredential {
    /// The SAS token string (MQTT password or HTTP `Authorization`), not yet verified.
    Sas(String),
    /// The TLS client certificate chain the device presented, DER, leaf first.
    X509(Vec<Vec<u8>>),
    /// Nothing (TPM first call, or a client that sent no credential).
    None,
}

/// A DPS answer: status code (as the topic/HTTP status), optional retry-after, JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct DpsResponse {
    pub status: u16,
    pub retry_after: Option<u64>,
    pub body: Value,
}

/// A registration waiting to be polled, by operation id.
#[derive(Debug, Clone)]
pub struct PendingOperation {
    pub registration_id: String,
    /// The full `RegistrationOperationStatus` the poll answers with once assignment is done.
    pub result: Value,
    /// How many more polls are answered 202 `assigning` first.
    pub polls_assigning: u32,
    /// The `retry-after` of those answers.
    pub retry_after: u64,
}

/// Which enrollment a device's credential matched, and what the hub device will use.
#[derive(Debug, Clone)]
struct Matched {
    common: EnrollmentCommon,
    /// `Some(group id)` for enrollment groups.
    group: Option<String>,
    device_id: String,
    authentication: DeviceAuthentication,
    /// "symmetricKey", "x509" or "tpm" (registration history).
    attestation: &'static str,
    /// TPM attestation: the EK and SRK the hub key is wrapped to in `registrationState.tpm`.
    tpm: Option<TpmChallenge>,
    /// For X.509: `registrationState.x509` (certificateInfo, and for groups enrollmentGroupId and
    /// signingCertificateInfo).
    x509_state: Option<Value>,
}

/// Checks a CONNECT to DPS: the registration id in the username must match the credential
/// (SAS signed with the enrollment's or derived key; certificate CN = registration id chaining to
/// the enrollment). `Err` carries the reason recorded in the connection events (CONNACK 5).
pub fn authenticate(
    sim: &Sim,
    id_scope: &str,
    registration_id: &str,
    cred: &DeviceCredential,
) -> Result<(), String> {
    match_enrollment(sim, id_scope, registration_id, cred).map(|_| ())
}

/// DER certificates of an enrollment's `signingCertificates` (group CA).
pub fn signing_certificates(common: &EnrollmentCommon) -> Vec<Vec<u8>> {
    match &common.attestation {
        Attestation::X509 { x509 } => certificates(x509.signing_certificates.as_ref()),
        _ => vec![],
    }
}

fn certificates(pair: Option<&CertificatePair>) -> Vec<Vec<u8>> {
    let Some(pair) = pair else { return vec![] };
    [pair.primary.as_ref(), pair.secondary.as_ref()]
        .into_iter()
        .flatten()
        .filter_map(|c| c.certificate.as_deref())
        .filter_map(certificate_der)
        .collect()
}

/// Azure accepts PEM or bare base64 DER.
pub fn certificate_der(text: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    if text.contains("-----BEGIN") {
        CertificateDer::from_pem_slice(text.as_bytes())
            .ok()
            .map(|c| c.to_vec())
    } else {
        base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .ok()
    }
}

fn match_enrollment(
    sim: &Sim,
    id_scope: &str,
    registration_id: &str,
    cred: &DeviceCredential,
) -> Result<Matched, String> {
    let (individual, groups) = sim.read(|s| {
        let individual = s
            .enrollments
            .get(&registration_id.to_ascii_lowercase())
            .cloned();
        (individual, s.groups.clone())
    });
    if !sim.serves_scope(id_scope) {
        return Err(format!("unknown ID scope '{id_scope}'"));
    }
    crate::state::check_registration_id(registration_id)
        .map_err(|why| format!("registration id '{registration_id}' is not valid: {why}"))?;
    let now = auth::unix_now();
    match cred {
        DeviceCredential::Sas(token) => {
            let token = auth::parse_sas(token).map_err(|e| e.to_string())?;
            // DPS documents `skn=registration` for device tokens; Azure's own Python SDK sends
            // none (and registers), so only another policy name is refused.
            if let Some(name) = token.key_name.as_deref()
                && name != "registration"
            {
                return Err(format!(
                    "the SAS token names policy (skn) '{name}': device registration tokens use 'registration' or none"
                ));
            }
            let resource = format!("{id_scope}/registrations/{registration_id}");
            let verify = |pair: &SymmetricKeyPair| -> Result<(), AuthError> {
                match auth::verify_sas(&token, &pair.primary_key, &resource, now) {
                    Err(AuthError::BadSignature) => {
                        auth::verify_sas(&token, &pair.secondary_key, &resource, now)
                    }
                    other => other,
                }
            };
            if let Some(e) = &individual
                && let Attestation::Tpm { .. } = &e.common.attestation
            {
                // The device signs with the key of the challenge it imported into its TPM.
                let challenge = sim
                    .live
                    .lock()
                    .unwrap()
                    .tpm_challenges
                    .get(&registration_id.to_ascii_lowercase())
                    .cloned()
                    .ok_or_else(|| {
                        format!(
                            "no TPM challenge was issued to '{registration_id}': the first request must carry the EK and SRK and no Authorization"
                        )
                    })?;
                auth::verify_sas(&token, &challenge.key, &resource, now)
                    .map_err(|err| err.to_string())?;
                return Ok(Matched {
                    common: e.common.clone(),
                    group: None,
                    device_id: e
                        .device_id
                        .clone()
                        .unwrap_or_else(|| registration_id.into()),
                    // The hub key is chosen at assignment and sent wrapped to the TPM.
                    authentication: sas_authentication(SymmetricKeyPair {
                        primary_key: String::new(),
                        secondary_key: String::new(),
                    }),
                    attestation: "tpm",
                    x509_state: None,
                    tpm: Some(challenge),
                });
            }
            if let Some(e) = &individual
                && let Attestation::SymmetricKey { symmetric_key } = &e.common.attestation
            {
                verify(symmetric_key).map_err(|err| err.to_string())?;
                return Ok(Matched {
                    common: e.common.clone(),
                    group: None,
                    device_id: e
                        .device_id
                        .clone()
                        .unwrap_or_else(|| registration_id.into()),
                    authentication: sas_authentication(symmetric_key.clone()),
                    attestation: "symmetricKey",
                    x509_state: None,
                    tpm: None,
                });
            }
            for group in groups.values() {
                let Attestation::SymmetricKey { symmetric_key } = &group.common.attestation else {
                    continue;
                };
                let derive = |k: &str| auth::derive_device_key(k, registration_id);
                let derived = SymmetricKeyPair {
                    primary_key: derive(&symmetric_key.primary_key).map_err(|e| e.to_string())?,
                    secondary_key: derive(&symmetric_key.secondary_key)
                        .map_err(|e| e.to_string())?,
                };
                match verify(&derived) {
                    Ok(()) => {
                        return Ok(Matched {
                            common: group.common.clone(),
                            group: Some(group.enrollment_group_id.clone()),
                            device_id: registration_id.to_string(),
                            authentication: sas_authentication(derived),
                            attestation: "symmetricKey",
                            x509_state: None,
                            tpm: None,
                        });
                    }
                    Err(AuthError::BadSignature) => continue,
                    Err(other) => return Err(other.to_string()),
                }
            }
            Err(format!(
                "no enrollment for '{registration_id}' accepts this SAS signature"
            ))
        }
        DeviceCredential::X509(chain) => {
            let leaf = chain.first().ok_or("no client certificate")?;
            let cn = auth::leaf_common_name(leaf).map_err(|e| e.to_string())?;
            if cn.chars().count() > crate::state::MAX_CN_LEN {
                return Err(format!(
                    "certificate CN '{cn}' is longer than the {} characters X.509 allows",
                    crate::state::MAX_CN_LEN
                ));
            }
            let leaf_info = auth::certificate_info(leaf).map_err(|e| e.to_string())?;
            if !cn.eq_ignore_ascii_case(registration_id) {
                return Err(format!(
                    "certificate CN '{cn}' differs from the registration id '{registration_id}'"
                ));
            }
            if let Some(e) = &individual
                && let Attestation::X509 { x509 } = &e.common.attestation
            {
                let enrolled = certificates(x509.client_certificates.as_ref());
                let leaf_print = auth::sha256_thumbprint(leaf);
                if !enrolled
                    .iter()
                    .any(|c| auth::sha256_thumbprint(c) == leaf_print)
                {
                    return Err("certificate is not the one enrolled for this device".into());
                }
                return Ok(Matched {
                    common: e.common.clone(),
                    group: None,
                    device_id: e
                        .device_id
                        .clone()
                        .unwrap_or_else(|| registration_id.into()),
                    authentication: DeviceAuthentication {
                        kind: "selfSigned".into(),
                        symmetric_key: None,
                        x509_thumbprint: Some(Thumbprints {
                            primary_thumbprint: Some(auth::sha1_thumbprint(leaf)),
                            secondary_thumbprint: None,
                        }),
                    },
                    attestation: "x509",
                    x509_state: Some(json!({"certificateInfo": leaf_info})),
                    tpm: None,
                });
            }
            let mut last_error = format!("no enrollment group's CA issued '{cn}'");
            for group in groups.values() {
                let cas = signing_certificates(&group.common);
                if cas.is_empty() {
                    continue;
                }
                match auth::verify_chain(chain, &cas, now) {
                    Ok(()) => {
                        let signing_info = cas
                            .first()
                            .and_then(|ca| auth::certificate_info(ca).ok())
                            .unwrap_or(Value::Null);
                        return Ok(Matched {
                            common: group.common.clone(),
                            group: Some(group.enrollment_group_id.clone()),
                            device_id: cn,
                            authentication: DeviceAuthentication {
                                kind: "certificateAuthority".into(),
                                symmetric_key: None,
                                x509_thumbprint: None,
                            },
                            attestation: "x509",
                            x509_state: Some(json!({
                                "certificateInfo": leaf_info,
                                "enrollmentGroupId": group.enrollment_group_id,
                                "signingCertificateInfo": signing_info,
                            })),
                            tpm: None,
                        });
                    }
                    Err(e) => last_error = e.to_string(),
                }
            }
            Err(last_error)
        }
        DeviceCredential::None => {
            Err("no credentials: neither a SAS token nor a client certificate".into())
        }
    }
}

fn sas_authentication(keys: SymmetricKeyPair) -> DeviceAuthentication {
    DeviceAuthentication {
        kind: "sas".into(),
        symmetric_key: Some(keys),
        x509_thumbprint: None,
    }
}

fn error(status: u16, code: u32, message: &str) -> DpsResponse {
    DpsResponse {
        status,
        retry_after: None,
        body: error_body(code, message),
    }
}

/// `PUT iotdps-register` / HTTPS `…/register`: `body` is the raw request payload. Answers 202
/// `{"operationId","status":"assigning"}` with retry-after (or 429 when throttled, 4xx on bad input).
/// `transport` is "mqtt" or "https" (recorded in the registration history).
pub fn register(
    sim: &Sim,
    id_scope: &str,
    registration_id: &str,
    cred: &DeviceCredential,
    body: &[u8],
    transport: &str,
) -> DpsResponse {
    register_at_version(
        sim,
        id_scope,
        registration_id,
        cred,
        body,
        (transport, None),
    )
}

/// The first api-version whose registrations may carry a `csr` (certificate issuance preview;
/// docs/credentials.md).
pub const ISSUANCE_API_VERSION: &str = "2025-07-01-preview";

/// [`register`] for a device that named its api-version (MQTT: in the CONNECT username). A
/// registration with a `csr` under a version older than [`ISSUANCE_API_VERSION`] is refused,
/// as Azure refuses it; `None` (in-process callers) skips that check.
pub fn register_at_version(
    sim: &Sim,
    id_scope: &str,
    registration_id: &str,
    cred: &DeviceCredential,
    body: &[u8],
    (transport, api_version): (&str, Option<&str>),
) -> DpsResponse {
    let arrived = Arrival::now();
    let outcome = std::cell::RefCell::new(Outcome::default());
    let record = |o: &str, hub: Option<String>, device: Option<String>, att: &str| {
        *outcome.borrow_mut() = Outcome {
            outcome: o.to_string(),
            assigned_hub: hub,
            device_id: device,
            attestation: att.to_string(),
        };
    };
    let response = register_answer(
        sim,
        id_scope,
        registration_id,
        cred,
        body,
        (transport, api_version),
        &record,
    );
    let event =
        outcome
            .into_inner()
            .event(arrived, registration_id, id_scope, transport, &response);
    sim.record(|r| r.registrations.push(event));
    response
}

/// `response` once every change made for it is on disk (registrations journal their assignment
/// with [`Sim::mutate_before_sync`]); a 500 when it cannot be.
pub async fn once_synced(sim: &Sim, response: DpsResponse) -> DpsResponse {
    match sim.synced().await {
        Ok(()) => response,
        Err(e) => error(
            500,
            500000,
            &format!("hubsim could not persist its state: {e}"),
        ),
    }
}

/// Notes what a registration came to: (outcome, assigned hub, device id, attestation).
type Recorder<'a> = dyn Fn(&str, Option<String>, Option<String>, &str) + 'a;

fn register_answer(
    sim: &Sim,
    id_scope: &str,
    registration_id: &str,
    cred: &DeviceCredential,
    body: &[u8],
    (transport, api_version): (&str, Option<&str>),
    record: &Recorder<'_>,
) -> DpsResponse {
    if let Some(retry_after) = take_throttle(sim, ThrottledRequests::Register) {
        record("throttled", None, None, "");
        return throttled(retry_after);
    }
    let request: Value = match serde_json::from_slice(body) {
        Ok(Value::Object(map)) => Value::Object(map),
        Ok(other) => {
            record("bad-request", None, None, "");
            return error(
                400,
                400004,
                &format!("the request body must be a JSON object, got {other}"),
            );
        }
        Err(e) => {
            record("bad-request", None, None, "");
            return error(
                400,
                400004,
                &format!("the request body is not valid JSON: {e}"),
            );
        }
    };
    match request.get("registrationId").and_then(Value::as_str) {
        Some(id) if id.eq_ignore_ascii_case(registration_id) => {}
        Some(id) => {
            record("bad-request", None, None, "");
            return error(
                400,
                400004,
                &format!(
                    "registrationId '{id}' in the body differs from '{registration_id}' in the request"
                ),
            );
        }
        None => {
            record("bad-request", None, None, "");
            return error(400, 400004, "the request body has no registrationId");
        }
    }
    let matched = match match_enrollment(sim, id_scope, registration_id, cred) {
        Ok(m) => m,
        Err(reason) => {
            record("unauthorized", None, None, "");
            return error(401, 401002, &format!("Unauthorized: {reason}"));
        }
    };
    if matched.tpm.is_some() && transport != "https" {
        // As in Azure: TPM attestation exists over HTTPS and AMQP, not MQTT.
        record("unauthorized", None, None, matched.attestation);
        return error(
            401,
            401002,
            "Unauthorized: TPM attestation is only available over HTTPS",
        );
    }
    let operation_id = format!("4.{:016x}.{}", rand::random::<u64>(), uuid::Uuid::new_v4());
    if matched.common.provisioning_status == Status::Disabled {
        record("disabled", None, None, matched.attestation);
        // DeviceRegistrationResult with status "disabled" (REST API; the C SDK maps it to
        // PROV_DEVICE_RESULT_DISABLED): no hub, no device id, no errorCode.
        let result = json!({
            "operationId": operation_id,
            "status": "disabled",
            "registrationState": unassigned_state(sim, registration_id, "disabled", None),
        });
        return accepted(sim, &operation_id, registration_id, result);
    }
    let mut matched = matched;
    let mut issued = None;
    if let Some(csr) = request.get("csr").filter(|c| !c.is_null()) {
        // Dates order as text: "2019-03-31" < "2025-07-01-preview".
        if let Some(version) = api_version.filter(|v| *v < ISSUANCE_API_VERSION) {
            record("bad-request", None, None, matched.attestation);
            return error(
                400,
                400004,
                &format!(
                    "the registration carries a csr, which api-version={version} does not know: certificate issuance needs api-version={ISSUANCE_API_VERSION}"
                ),
            );
        }
        match issue_certificate(sim, registration_id, &matched.common, csr) {
            Ok(chain) => {
                // The hub knows the device by its issued certificate from now on.
                matched.authentication = DeviceAuthentication {
                    kind: "selfSigned".into(),
                    symmetric_key: None,
                    x509_thumbprint: Some(crate::state::Thumbprints {
                        primary_thumbprint: Some(auth::sha256_thumbprint(&chain[0])),
                        secondary_thumbprint: None,
                    }),
                };
                issued = Some(chain.iter().map(|c| B64.encode(c)).collect::<Vec<_>>());
            }
            Err(Issuance::BadRequest(message)) => {
                record("bad-request", None, None, matched.attestation);
                return error(400, 400004, &message);
            }
            Err(Issuance::Failed(message)) => {
                record("failed", None, None, matched.attestation);
                let result = json!({
                    "operationId": operation_id,
                    "status": "failed",
                    "registrationState": unassigned_state(sim, registration_id, "failed", Some((500000, message))),
                });
                return accepted(sim, &operation_id, registration_id, result);
            }
        }
    }
    let payload = request.get("payload").filter(|p| !p.is_null()).cloned();
    match assign(sim, registration_id, &matched, payload, issued.is_some()) {
        Ok(mut state) => {
            if let Some(chain) = issued {
                state["issuedCertificateChain"] = json!(chain);
            }
            record(
                "assigned",
                state["assignedHub"].as_str().map(str::to_string),
                state["deviceId"].as_str().map(str::to_string),
                matched.attestation,
            );
            let result = json!({
                "operationId": operation_id,
                "status": "assigned",
                "registrationState": state,
            });
            accepted(sim, &operation_id, registration_id, result)
        }
        Err(response) => {
            // An allocation failure is the operation's outcome, not the request's: DPS accepts
            // the registration and the poll answers status "failed" with registrationState's
            // errorCode/errorMessage (400208 "no hub", as the C SDK reads them).
            record("failed", None, None, matched.attestation);
            let error = (
                response.body["errorCode"].as_u64().unwrap_or(0),
                response.body["message"].as_str().unwrap_or("").to_string(),
            );
            let result = json!({
                "operationId": operation_id,
                "status": "failed",
                "registrationState": unassigned_state(sim, registration_id, "failed", Some(error)),
            });
            accepted(sim, &operation_id, registration_id, result)
        }
    }
}

/// Why a registration's CSR got no certificate.
enum Issuance {
    /// 400: the request is wrong (no issuance on this enrollment, not base64 DER, another CN).
    BadRequest(String),
    /// The operation fails: the CA is down (the `issuanceFailures` fault) or unusable.
    Failed(String),
}

/// Signs the registration's `csr` (base64 DER PKCS#10, as the 2025-07-01-preview API sends it)
/// with the enrollment's hubsim CA: the issued chain, DER, leaf first.
fn issue_certificate(
    sim: &Sim,
    registration_id: &str,
    common: &EnrollmentCommon,
    csr: &Value,
) -> Result<Vec<Vec<u8>>, Issuance> {
    let Some(issuance) = &common.certificate_issuance else {
        return Err(Issuance::BadRequest(
            "the registration carries a csr, but its enrollment issues no certificates".into(),
        ));
    };
    let der = csr
        .as_str()
        .and_then(|c| B64.decode(c.trim()).ok())
        .ok_or_else(|| Issuance::BadRequest("csr: not base64 (DER PKCS#10 expected)".into()))?;
    {
        let mut faults = sim.faults.lock().unwrap();
        if faults.issuance_failures > 0 {
            faults.issuance_failures -= 1;
            return Err(Issuance::Failed(
                "certificate issuance failed: the certificate authority is unavailable".into(),
            ));
        }
    }
    crate::pki::sign_csr(
        &issuance.issuer_dir,
        &der,
        registration_id,
        issuance.validity_seconds,
    )
    .map_err(|e| match e {
        crate::pki::CsrRefused::BadRequest(m) => Issuance::BadRequest(format!("csr: {m}")),
        crate::pki::CsrRefused::CaUnavailable(m) => {
            Issuance::Failed(format!("certificate issuance failed: {m}"))
        }
    })
}

/// `registrationState` of a registration that was not assigned (`disabled`, `failed`), shaped as
/// DPS sends it: `{registrationId, createdDateTimeUtc, status, [errorCode, errorMessage],
/// lastUpdatedDateTimeUtc, etag}`.
fn unassigned_state(
    sim: &Sim,
    registration_id: &str,
    status: &str,
    error: Option<(u64, String)>,
) -> Value {
    let now = now_rfc3339();
    let created = sim
        .read(|s| {
            s.registrations
                .get(&registration_id.to_ascii_lowercase())
                .and_then(|r| r.state["createdDateTimeUtc"].as_str().map(str::to_string))
        })
        .unwrap_or_else(|| now.clone());
    let mut state = json!({
        "registrationId": registration_id,
        "createdDateTimeUtc": created,
        "status": status,
        "lastUpdatedDateTimeUtc": now,
        "etag": base64_etag(&format!("\"{}\"", uuid::Uuid::new_v4())),
    });
    if let Some((code, message)) = error {
        state["errorCode"] = code.into();
        state["errorMessage"] = message.into();
    }
    state
}

/// The first call of a TPM registration (HTTPS, no Authorization, body with
/// `tpm.endorsementKey` and `tpm.storageRootKey`): when the EK is the enrolled one, answers 401
/// with `authenticationKey`, an activation blob holding a fresh challenge key that only that
/// TPM can import (docs/protocol.md §6.1 step 4). The device then signs its SAS with that key.
pub fn tpm_challenge(sim: &Sim, id_scope: &str, registration_id: &str, body: &[u8]) -> DpsResponse {
    let arrived = Arrival::now();
    let outcome = std::cell::RefCell::new(String::new());
    let response = tpm_challenge_answer(sim, id_scope, registration_id, body, &|o: &str| {
        *outcome.borrow_mut() = o.to_string();
    });
    let event = Outcome {
        outcome: outcome.into_inner(),
        attestation: "tpm".into(),
        ..Outcome::default()
    }
    .event(arrived, registration_id, id_scope, "https", &response);
    sim.record(|r| r.registrations.push(event));
    response
}

fn tpm_challenge_answer(
    sim: &Sim,
    id_scope: &str,
    registration_id: &str,
    body: &[u8],
    record: &dyn Fn(&str),
) -> DpsResponse {
    if let Some(retry_after) = take_throttle(sim, ThrottledRequests::Register) {
        record("throttled");
        return throttled(retry_after);
    }
    let request: Value = match serde_json::from_slice(body) {
        Ok(v @ Value::Object(_)) => v,
        _ => {
            record("bad-request");
            return error(400, 400004, "the request body must be a JSON object");
        }
    };
    if !request
        .get("registrationId")
        .and_then(Value::as_str)
        .is_some_and(|id| id.eq_ignore_ascii_case(registration_id))
    {
        record("bad-request");
        return error(
            400,
            400004,
            &format!("the body's registrationId must be '{registration_id}'"),
        );
    }
    let decode = |field: &str| {
        request["tpm"][field]
            .as_str()
            .and_then(|b| B64.decode(b).ok())
    };
    let (Some(ek), Some(srk)) = (decode("endorsementKey"), decode("storageRootKey")) else {
        record("bad-request");
        return error(
            400,
            400004,
            "tpm.endorsementKey and tpm.storageRootKey (base64 TPM2B_PUBLIC) are required",
        );
    };
    let enrollment = sim.read(|s| {
        s.enrollments
            .get(&registration_id.to_ascii_lowercase())
            .cloned()
    });
    let refuse = |reason: String| {
        record("unauthorized");
        error(401, 401002, &format!("Unauthorized: {reason}"))
    };
    if !sim.serves_scope(id_scope) {
        return refuse(format!("unknown ID scope '{id_scope}'"));
    }
    let Some(Attestation::Tpm { tpm: enrolled }) = enrollment.map(|e| e.common.attestation) else {
        return refuse(format!(
            "no TPM enrollment for registration id '{registration_id}'"
        ));
    };
    if B64.decode(&enrolled.endorsement_key).ok().as_deref() != Some(ek.as_slice()) {
        return refuse("the endorsement key differs from the enrolled one".into());
    }
    if let Some(enrolled_srk) = &enrolled.storage_root_key
        && B64.decode(enrolled_srk).ok().as_deref() != Some(srk.as_slice())
    {
        return refuse("the storage root key differs from the enrolled one".into());
    }
    let key = random_key();
    let blob = match B64
        .decode(&key)
        .map_err(|e| e.to_string())
        .and_then(|k| crate::tpm::activation_blob(&ek, &srk, &k).map_err(|e| e.to_string()))
    {
        Ok(b) => b,
        Err(e) => {
            record("bad-request");
            return error(400, 400004, &format!("tpm: {e}"));
        }
    };
    sim.live.lock().unwrap().tpm_challenges.insert(
        registration_id.to_ascii_lowercase(),
        TpmChallenge {
            key,
            endorsement_key: ek,
            storage_root_key: srk,
        },
    );
    record("tpm-challenge");
    DpsResponse {
        status: 401,
        retry_after: None,
        body: json!({
            "authenticationKey": B64.encode(blob),
            "keyName": "registration",
            "message": "TPM challenge: import the authentication key and sign the registration with it",
        }),
    }
}

/// When the request arrived, for the registration history.
#[derive(Clone, Copy)]
struct Arrival {
    ms: u64,
}

impl Arrival {
    fn now() -> Arrival {
        Arrival {
            ms: crate::state::unix_ms(),
        }
    }
}

/// What a registration request came to, recorded with the answer's status.
#[derive(Default)]
struct Outcome {
    outcome: String,
    assigned_hub: Option<String>,
    device_id: Option<String>,
    attestation: String,
}

impl Outcome {
    fn event(
        self,
        arrived: Arrival,
        registration_id: &str,
        id_scope: &str,
        transport: &str,
        response: &DpsResponse,
    ) -> RegistrationEvent {
        RegistrationEvent {
            registration_id: registration_id.to_string(),
            id_scope: id_scope.to_string(),
            time: rfc3339_ms(arrived.ms),
            time_ms: arrived.ms,
            outcome: self.outcome,
            assigned_hub: self.assigned_hub,
            device_id: self.device_id,
            transport: transport.to_string(),
            attestation: self.attestation,
            status: response.status,
            retry_after: response.retry_after,
            operation_id: (response.status == 202)
                .then(|| response.body["operationId"].as_str().map(str::to_string))
                .flatten(),
            polls: vec![],
        }
    }
}

fn rfc3339_ms(ms: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(now_rfc3339)
}

/// DPS's answer to a throttled request.
fn throttled(retry_after: u64) -> DpsResponse {
    DpsResponse {
        status: 429,
        retry_after: Some(retry_after),
        body: error_body(429001, "Operations are being throttled for this tenant."),
    }
}

/// Takes one 429 from the throttling fault, if it applies to `request`.
fn take_throttle(sim: &Sim, request: ThrottledRequests) -> Option<u64> {
    let mut faults = sim.faults.lock().unwrap();
    let scope = faults.dps_throttle_requests;
    if scope != ThrottledRequests::Any && scope != request {
        return None;
    }
    let (remaining, retry_after) = faults.dps_throttle?;
    faults.dps_throttle = (remaining > 1).then(|| (remaining - 1, retry_after));
    // A count of 0 means "no throttling" (nothing left to answer with 429).
    (remaining > 0).then_some(retry_after)
}

fn accepted(sim: &Sim, operation_id: &str, registration_id: &str, result: Value) -> DpsResponse {
    let slow = sim.faults.lock().unwrap().dps_slow_assignment;
    let retry_after = slow
        .and_then(|s| s.retry_after)
        .unwrap_or(sim.config.retry_after_secs);
    sim.live.lock().unwrap().operations.insert(
        operation_id.to_string(),
        PendingOperation {
            registration_id: registration_id.to_string(),
            result,
            polls_assigning: slow.map_or(0, |s| s.polls),
            retry_after,
        },
    );
    DpsResponse {
        status: 202,
        retry_after: Some(retry_after),
        body: json!({"operationId": operation_id, "status": "assigning"}),
    }
}

/// A stable choice among `hubs` for a registration id (FNV-1a), like DPS's evenly weighted hashing.
fn hashed_choice<'a>(hubs: &'a [String], registration_id: &str) -> &'a String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in registration_id.to_ascii_lowercase().bytes() {
        hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    &hubs[(hash % hubs.len() as u64) as usize]
}

/// Allocates a hub, creates or moves the hub device, stores the registration; returns the
/// `registrationState` JSON.
/// `issued`: the registration got a certificate, which is how the hub knows the device from now
/// on (a TPM-attested one then gets no hub key).
fn assign(
    sim: &Sim,
    registration_id: &str,
    matched: &Matched,
    payload: Option<Value>,
    issued: bool,
) -> Result<Value, DpsResponse> {
    let linked = &sim.config.hubs;
    let candidates: Vec<String> = match &matched.common.iot_hubs {
        Some(list) if !list.is_empty() => list.clone(),
        _ => linked.clone(),
    };
    let chosen = match (
        &matched.common.allocation_policy,
        &matched.common.iot_hub_host_name,
    ) {
        (crate::state::AllocationPolicy::Static, Some(hub)) => hub.clone(),
        (_, Some(hub)) if matched.common.iot_hubs.is_none() => hub.clone(),
        _ if candidates.is_empty() => {
            return Err(error(
                400,
                400208,
                "no IoT hub is linked for this enrollment",
            ));
        }
        _ => hashed_choice(&candidates, registration_id).clone(),
    };
    let Some(hub) = linked
        .iter()
        .find(|h| h.eq_ignore_ascii_case(&chosen))
        .cloned()
    else {
        return Err(error(
            400,
            400208,
            &format!("IoT hub '{chosen}' is not linked to this DPS"),
        ));
    };
    let now = now_rfc3339();
    let key = registration_id.to_ascii_lowercase();
    // TPM attestation: a fresh hub device key, sent to the device wrapped to its EK and SRK.
    let mut authentication = matched.authentication.clone();
    let mut tpm_state = None;
    if let Some(challenge) = matched.tpm.as_ref().filter(|_| !issued) {
        let keys = SymmetricKeyPair {
            primary_key: random_key(),
            secondary_key: random_key(),
        };
        let blob = B64
            .decode(&keys.primary_key)
            .map_err(|e| e.to_string())
            .and_then(|k| {
                crate::tpm::activation_blob(
                    &challenge.endorsement_key,
                    &challenge.storage_root_key,
                    &k,
                )
                .map_err(|e| e.to_string())
            })
            .map_err(|e| error(500, 500000, &format!("cannot wrap the hub key: {e}")))?;
        tpm_state = Some(json!({"authenticationKey": B64.encode(blob)}));
        authentication = sas_authentication(keys);
    }
    // The front end awaits `Sim::synced` before it sends the answer, so registrations in
    // flight together share one journal sync.
    let result = sim.mutate_before_sync(|store| {
        let previous = store.registrations.get(&key).cloned();
        let previous_device = previous.as_ref().and_then(|p| {
            let old = Store::device_key(p.assigned_hub.as_deref()?, p.device_id.as_deref()?);
            store.devices.get(&old).cloned().map(|d| (old, d))
        });
        let policy = &matched.common.reprovision_policy;
        // Re-registration with updateHubAssignment=false keeps the earlier hub.
        let hub = match (&previous_device, policy.update_hub_assignment) {
            (Some((_, d)), false) => d.hub.clone(),
            _ => hub.clone(),
        };
        let new_key = Store::device_key(&hub, &matched.device_id);
        let initial_twin = initial_twin(&matched.common);
        let (twin, substatus, generation) = match previous_device {
            Some((old_key, old)) if old_key == new_key => {
                (old.twin, "initialAssignment", old.generation_id)
            }
            Some((old_key, old)) => {
                store.devices.remove(&old_key);
                if policy.migrate_device_data {
                    (old.twin, "deviceDataMigrated", old.generation_id)
                } else {
                    (
                        initial_twin,
                        "deviceDataReset",
                        uuid::Uuid::new_v4().to_string(),
                    )
                }
            }
            None => match store.devices.get(&new_key) {
                Some(existing) => (
                    existing.twin.clone(),
                    "initialAssignment",
                    existing.generation_id.clone(),
                ),
                None => (
                    initial_twin,
                    "initialAssignment",
                    uuid::Uuid::new_v4().to_string(),
                ),
            },
        };
        let etag = format!("\"{}\"", uuid::Uuid::new_v4());
        // DPS does not re-enable a device an operator disabled in its hub: it provisions, but the
        // hub keeps refusing it.
        let status = store
            .devices
            .get(&new_key)
            .map_or(Status::Enabled, |d| d.status);
        // Announced by the device on its next CONNECT; kept until then, as the twin is.
        let model_id = store.devices.get(&new_key).and_then(|d| d.model_id.clone());
        store.devices.insert(
            new_key,
            Device {
                device_id: matched.device_id.clone(),
                hub: hub.clone(),
                authentication: authentication.clone(),
                status,
                generation_id: generation,
                etag: etag.clone(),
                twin,
                ca_group: matched
                    .group
                    .clone()
                    .filter(|_| matched.authentication.kind == "certificateAuthority"),
                model_id,
            },
        );
        let created = previous
            .as_ref()
            .and_then(|p| p.state["createdDateTimeUtc"].as_str().map(str::to_string))
            .unwrap_or_else(|| now.clone());
        let mut state = json!({
            "registrationId": registration_id,
            "createdDateTimeUtc": created,
            "assignedHub": hub,
            "deviceId": matched.device_id,
            "status": "assigned",
            "substatus": substatus,
            "lastUpdatedDateTimeUtc": now,
            "etag": base64_etag(&etag),
        });
        if let Some(tpm) = &tpm_state {
            state["tpm"] = tpm.clone();
        } else if let Some(x509) = &matched.x509_state {
            state["x509"] = x509.clone();
        } else if let Some(group) = &matched.group {
            state["symmetricKey"] = json!({"enrollmentGroupId": group});
        }
        if let Some(payload) = payload {
            state["payload"] = payload;
        }
        store.registrations.insert(
            key.clone(),
            crate::state::Registration {
                state: state.clone(),
                assigned_hub: Some(hub),
                device_id: Some(matched.device_id.clone()),
            },
        );
        state
    });
    result.map_err(|e| {
        error(
            500,
            500000,
            &format!("hubsim could not persist its state: {e}"),
        )
    })
}

fn base64_etag(etag: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(etag)
}

fn initial_twin(common: &EnrollmentCommon) -> Twin {
    let mut twin = Twin::default();
    if let Some(initial) = &common.initial_twin {
        if let Some(desired) = initial
            .pointer("/properties/desired")
            .and_then(Value::as_object)
        {
            twin.desired = desired.clone();
            twin.desired_version = 1;
        }
        if let Some(tags) = initial.get("tags").and_then(Value::as_object) {
            twin.tags = tags.clone();
        }
    }
    twin
}

/// `GET iotdps-get-operationstatus` / HTTPS `…/operations/{id}`: 202 `assigning` (with
/// retry-after) while the operation is not done — as many polls as the slow-assignment fault
/// asked for when it started — then 200 with `registrationState`; 429 when throttled; 404 for an
/// unknown operation. Each poll is recorded on the registration that started the operation.
pub fn operation_status(
    sim: &Sim,
    _id_scope: &str,
    registration_id: &str,
    operation_id: &str,
) -> DpsResponse {
    let arrived = Arrival::now();
    let known = sim
        .live
        .lock()
        .unwrap()
        .operations
        .get(operation_id)
        .is_some_and(|op| op.registration_id.eq_ignore_ascii_case(registration_id));
    if !known {
        return error(
            404,
            404005,
            &format!("operation '{operation_id}' was not found for '{registration_id}'"),
        );
    }
    let response = match take_throttle(sim, ThrottledRequests::Poll) {
        Some(retry_after) => throttled(retry_after),
        None => {
            let mut live = sim.live.lock().unwrap();
            match live.operations.get_mut(operation_id) {
                Some(op) if op.polls_assigning > 0 => {
                    op.polls_assigning -= 1;
                    DpsResponse {
                        status: 202,
                        retry_after: Some(op.retry_after),
                        body: json!({"operationId": operation_id, "status": "assigning"}),
                    }
                }
                Some(op) => DpsResponse {
                    status: 200,
                    retry_after: None,
                    body: op.result.clone(),
                },
                None => error(
                    404,
                    404005,
                    &format!("operation '{operation_id}' was not found for '{registration_id}'"),
                ),
            }
        }
    };
    let poll = PollEvent {
        time: rfc3339_ms(arrived.ms),
        time_ms: arrived.ms,
        status: response.status,
        retry_after: response.retry_after,
    };
    sim.record(|r| {
        if let Some(event) = r
            .registrations
            .iter_mut()
            .rev()
            .find(|e| e.operation_id.as_deref() == Some(operation_id))
        {
            event.polls.push(poll);
        }
    });
    response
}

/// Pending operations, kept in `Live`.
pub type Operations = HashMap<String, PendingOperation>;

/// The error body of the real service: `{"errorCode", "trackingId", "message", "timestampUtc"}`.
pub fn error_body(error_code: u32, message: &str) -> Value {
    serde_json::json!({
        "errorCode": error_code,
        "trackingId": uuid::Uuid::new_v4().to_string(),
        "message": message,
        "timestampUtc": crate::state::now_rfc3339(),
    })
}
