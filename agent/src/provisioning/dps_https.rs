//! DPS TPM attestation over HTTPS (docs/protocol.md §2, §6.1): TPM registrations exist only on DPS's
//! HTTPS (and AMQP) API, not over MQTT.
//!
//! 1. `PUT …/register` with the EK and SRK publics and no Authorization → 401 with
//!    `authenticationKey`, an activation blob only this TPM can open;
//! 2. the blob's key is imported into the TPM (persistent handle) and signs the registration SAS
//!    (`skn=registration`) inside the TPM;
//! 3. `PUT …/register` again with that SAS → 202, then `GET …/operations/{id}` until assigned;
//! 4. the assignment's `registrationState.tpm.authenticationKey` wraps the hub device key: it
//!    replaces the challenge key at the handle and signs every hub SAS from then on. With
//!    certificate issuance (a `csr` in the body, api-version `2025-07-01-preview`) the answer
//!    carries `issuedCertificateChain` instead, and the hub gets that certificate.
//!
//! The exchange is blocking (ureq, TPM calls) and runs on tokio's blocking pool with a deadline
//! checked between steps.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};

use super::Assignment;
use super::dps::{
    DEFAULT_RETRY_AFTER, DpsError, DpsRequest, ISSUANCE_API_VERSION, MAX_RETRIES, MAX_RETRY_AFTER,
    assignment, not_assigned, operation_id, service_error,
};
use crate::identity::keys::sas_token;
use crate::identity::tpm::{self, TpmSigner};
use crate::util::encoding::url_encode;
use crate::util::time::unix_now;

const API_VERSION: &str = "2021-06-01";

/// The TPM that attests.
#[derive(Debug, Clone)]
pub struct TpmTarget {
    pub tcti: String,
    pub handle: u32,
    pub auth: tpm::HierarchyAuth,
}

/// Registers with DPS by TPM attestation and waits for the assignment.
pub async fn register(
    req: &DpsRequest,
    target: &TpmTarget,
    trust_bundle: Option<PathBuf>,
) -> Result<Assignment, DpsError> {
    let req = req.clone();
    let target = target.clone();
    let deadline = Instant::now() + req.timeout;
    tokio::task::spawn_blocking(move || register_blocking(&req, &target, trust_bundle, deadline))
        .await
        .map_err(|e| DpsError::Protocol(format!("the registration task failed: {e}")))?
}

/// The HTTP status in ureq's text for a refused CONNECT ("proxy server responded 407/Proxy
/// Authentication Required"); none for its other texts ("proxy server did not respond").
fn refusal_status(reason: &str) -> Option<u16> {
    reason
        .strip_prefix("proxy server responded ")
        .and_then(|rest| rest.split('/').next())
        .and_then(|code| code.parse().ok())
}

/// The proxy for ureq, its password included (ureq sends it as Basic proxy authorization).
fn ureq_proxy(route: &crate::mqtt::ProxyRoute) -> Result<ureq::Proxy, DpsError> {
    let mut proxy = ureq::Proxy::builder(ureq::ProxyProtocol::Http)
        .host(&route.host)
        .port(route.port);
    if let Some((user, password)) = &route.credentials {
        proxy = proxy.username(user).password(password);
    }
    proxy
        .build()
        .map_err(|e| DpsError::Protocol(format!("proxy {}: {e}", route.describe)))
}

fn tpm_error(e: tpm::TpmError) -> DpsError {
    DpsError::Tpm(e.to_string())
}

struct Client {
    agent: ureq::Agent,
    base: String,
    endpoint: String,
    /// The proxy the requests tunnel through, as errors name it.
    proxy: Option<String>,
    deadline: Instant,
    timeout: Duration,
    /// `2021-06-01`, or the certificate-issuance preview's version when the registration carries
    /// a `csr` (DPS refuses one under older versions).
    api_version: &'static str,
}

/// One HTTP answer: status, retry-after, JSON body (`Null` when empty or not JSON).
struct Answer {
    status: u16,
    retry_after: Option<Duration>,
    body: Value,
}

impl Client {
    fn new(
        req: &DpsRequest,
        trust_bundle: Option<PathBuf>,
        deadline: Instant,
    ) -> Result<Self, DpsError> {
        use ureq::tls::{Certificate, RootCerts, TlsConfig, TlsProvider};
        let roots = crate::identity::tls::root_certificates(trust_bundle.as_deref())
            .map_err(|e| DpsError::Protocol(e.to_string()))?;
        let certs: Vec<Certificate<'static>> = roots
            .iter()
            .map(|c| Certificate::from_der(c.as_ref()).to_owned())
            .collect();
        let tls = TlsConfig::builder()
            .provider(TlsProvider::Rustls)
            .root_certs(RootCerts::new_with_certs(&certs))
            .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .build();
        let agent = ureq::Agent::new_with_config(
            ureq::Agent::config_builder()
                .tls_config(tls)
                // The agent's own proxy (`[hub] proxy`, `https_proxy`, `no_proxy`), or none:
                // ureq's default would read its own list of variables (ALL_PROXY, HTTP_PROXY).
                .proxy(req.proxy.as_ref().map(ureq_proxy).transpose()?)
                .http_status_as_error(false)
                .user_agent(format!("hubagent/{}", env!("CARGO_PKG_VERSION")))
                .build(),
        );
        Ok(Client {
            agent,
            base: format!(
                "https://{}:{}/{}/registrations/{}",
                req.endpoint_host,
                req.port,
                url_encode(&req.id_scope),
                url_encode(&req.registration_id)
            ),
            endpoint: format!("{}:{}", req.endpoint_host, req.port),
            proxy: req.proxy.as_ref().map(|p| p.describe.clone()),
            deadline,
            timeout: req.timeout,
            api_version: match req.csr {
                Some(_) => ISSUANCE_API_VERSION,
                None => API_VERSION,
            },
        })
    }

    /// What went wrong before DPS answered; through a proxy, the proxy is named (with what its
    /// refusal means), as the MQTT connections do.
    fn failure(&self, e: &ureq::Error) -> String {
        let Some(proxy) = &self.proxy else {
            return e.to_string();
        };
        match e {
            ureq::Error::ConnectProxyFailed(reason) => {
                crate::mqtt::proxy_refusal_text(proxy, refusal_status(reason), reason)
            }
            other => format!("through proxy {proxy}: {other}"),
        }
    }

    fn remaining(&self) -> Result<Duration, DpsError> {
        self.deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or(DpsError::Timeout(self.timeout))
    }

    fn send(
        &self,
        method: &str,
        path: &str,
        sas: Option<&str>,
        body: Option<&str>,
    ) -> Result<Answer, DpsError> {
        let url = format!("{}{path}?api-version={}", self.base, self.api_version);
        let timeout = self.remaining()?.min(Duration::from_secs(30));
        let unreachable = |e: ureq::Error| DpsError::Unreachable {
            endpoint: self.endpoint.clone(),
            message: self.failure(&e),
        };
        let response = match (method, body) {
            ("PUT", Some(body)) => {
                let mut request = self
                    .agent
                    .put(&url)
                    .config()
                    .timeout_global(Some(timeout))
                    .build()
                    .header("Content-Type", "application/json; charset=utf-8")
                    .header("Accept", "application/json");
                if let Some(sas) = sas {
                    request = request.header("Authorization", sas);
                }
                request.send(body).map_err(unreachable)?
            }
            _ => {
                let mut request = self
                    .agent
                    .get(&url)
                    .config()
                    .timeout_global(Some(timeout))
                    .build()
                    .header("Accept", "application/json");
                if let Some(sas) = sas {
                    request = request.header("Authorization", sas);
                }
                request.call().map_err(unreachable)?
            }
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let text = response
            .into_body()
            .read_to_string()
            .map_err(|e| DpsError::Protocol(format!("reading DPS's answer: {e}")))?;
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Ok(Answer {
            status,
            retry_after,
            body,
        })
    }

    /// Sends until the answer is neither throttled (429) nor a server error, waiting what DPS
    /// asks in between (bounded).
    fn send_retrying(
        &self,
        method: &str,
        path: &str,
        sas: Option<&str>,
        body: Option<&str>,
    ) -> Result<Answer, DpsError> {
        let mut retries = 0;
        loop {
            let answer = self.send(method, path, sas, body)?;
            if (answer.status == 429 || answer.status >= 500) && retries < MAX_RETRIES {
                retries += 1;
                let delay = answer
                    .retry_after
                    .unwrap_or(DEFAULT_RETRY_AFTER * retries)
                    .min(MAX_RETRY_AFTER);
                tracing::info!(status = answer.status, delay = %humantime::format_duration(delay), "DPS asks to retry later");
                self.wait(delay)?;
                continue;
            }
            return Ok(answer);
        }
    }

    /// DPS's retry-after, within the deadline.
    fn wait(&self, delay: Duration) -> Result<(), DpsError> {
        if delay >= self.remaining()? {
            return Err(DpsError::Timeout(self.timeout));
        }
        std::thread::sleep(delay);
        Ok(())
    }
}

fn registration_sas(signer: &TpmSigner, req: &DpsRequest) -> Result<String, DpsError> {
    let resource = format!("{}/registrations/{}", req.id_scope, req.registration_id);
    Ok(sas_token(
        signer,
        &resource,
        unix_now() + 3600,
        Some("registration"),
    )?)
}

fn register_blocking(
    req: &DpsRequest,
    target: &TpmTarget,
    trust_bundle: Option<PathBuf>,
    deadline: Instant,
) -> Result<Assignment, DpsError> {
    let identity = tpm::identity(&target.tcti, &target.auth).map_err(tpm_error)?;
    let client = Client::new(req, trust_bundle, deadline)?;
    let mut body = json!({
        "registrationId": req.registration_id,
        "tpm": {
            "endorsementKey": identity.endorsement_key_base64(),
            "storageRootKey": identity.storage_root_key_base64(),
        },
        "payload": req.payload,
    });
    // Certificate issuance: the same `csr` as over MQTT (docs/credentials.md).
    if let Some(csr) = &req.csr {
        body["csr"] = json!(csr);
    }
    let body = body.to_string();

    // 1. The challenge.
    let blob = request_challenge(&client, req, &body)?;
    // 2. Only this TPM can open it; the key lands at the handle.
    import_activation_blob(target, &blob)?;
    tracing::info!(
        handle = format_args!("{:#010x}", target.handle),
        "imported DPS's authentication key into the TPM"
    );
    let signer = TpmSigner::new(&target.tcti, target.handle);
    // 3. The registration proper, signed in the TPM.
    let answer = register_signed(&client, &signer, req, &body)?;
    let assigned = assignment(&answer)?;
    // 4. The hub key, wrapped to this TPM like the challenge (with an issued certificate the hub
    // gets that instead, and a hub key is optional).
    let issued = !answer["registrationState"]["issuedCertificateChain"].is_null();
    import_hub_key(target, &answer, issued)?;
    Ok(assigned)
}

/// The registration without credentials: DPS answers 401 with an activation blob only this TPM
/// can open.
fn request_challenge(client: &Client, req: &DpsRequest, body: &str) -> Result<Vec<u8>, DpsError> {
    let answer = client.send_retrying("PUT", "/register", None, Some(body))?;
    match (answer.status, answer.body["authenticationKey"].as_str()) {
        (401, Some(key)) => B64
            .decode(key)
            .map_err(|_| DpsError::Protocol("authenticationKey is not base64".into())),
        (401, None) => Err(tpm_refused(req, &answer.body, "no message")),
        (status, _) if status < 300 => Err(DpsError::Protocol(format!(
            "DPS answered {status} to a TPM registration without credentials; expected the 401 challenge"
        ))),
        (status, _) => Err(service_error(status, &answer.body)),
    }
}

/// Sends the registration signed by the TPM, then polls its operation until DPS assigns the
/// device. Returns the `assigned` answer's body.
fn register_signed(
    client: &Client,
    signer: &TpmSigner,
    req: &DpsRequest,
    body: &str,
) -> Result<Value, DpsError> {
    let sas = registration_sas(signer, req)?;
    let mut answer = client.send_retrying("PUT", "/register", Some(&sas), Some(body))?;
    loop {
        match answer.status {
            200..=299 => match answer.body["status"].as_str() {
                Some("assigned") => return Ok(answer.body),
                Some("assigning") => {
                    let op = operation_id(&answer.body)?.to_string();
                    client.wait(
                        answer
                            .retry_after
                            .unwrap_or(DEFAULT_RETRY_AFTER)
                            .min(MAX_RETRY_AFTER),
                    )?;
                    let sas = registration_sas(signer, req)?;
                    answer = client.send_retrying(
                        "GET",
                        &format!("/operations/{}", url_encode(&op)),
                        Some(&sas),
                        None,
                    )?;
                }
                _ => return Err(not_assigned(&answer.body)),
            },
            401 => {
                return Err(tpm_refused(
                    req,
                    &answer.body,
                    "the signed registration was refused",
                ));
            }
            status => return Err(service_error(status, &answer.body)),
        }
    }
}

/// The assignment's `registrationState.tpm.authenticationKey` wraps the hub device key: it
/// replaces the challenge key at the handle. Without one, the registration key signs on (and
/// with an issued certificate, `issued`, none is needed).
fn import_hub_key(target: &TpmTarget, answer: &Value, issued: bool) -> Result<(), DpsError> {
    match answer["registrationState"]["tpm"]["authenticationKey"].as_str() {
        Some(key) => {
            let blob = B64.decode(key).map_err(|_| {
                DpsError::Protocol("registrationState.tpm.authenticationKey is not base64".into())
            })?;
            import_activation_blob(target, &blob)?;
            tracing::info!(
                handle = format_args!("{:#010x}", target.handle),
                "imported the IoT Hub device key into the TPM"
            );
        }
        None if issued => {}
        None => tracing::warn!(
            "DPS sent no hub key (registrationState.tpm.authenticationKey); signing hub tokens with the registration key"
        ),
    }
    Ok(())
}

fn import_activation_blob(target: &TpmTarget, blob: &[u8]) -> Result<(), DpsError> {
    tpm::attestation::import_activation_blob(&target.tcti, &target.auth, target.handle, blob)
        .map_err(tpm_error)?;
    Ok(())
}

/// DPS refused the EK or the signed registration; `fallback` when it says nothing.
fn tpm_refused(req: &DpsRequest, answer: &Value, fallback: &str) -> DpsError {
    DpsError::TpmRefused {
        registration_id: req.registration_id.clone(),
        message: answer["message"].as_str().unwrap_or(fallback).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_connect_is_told_by_its_status_and_named_by_the_proxy() {
        assert_eq!(
            refusal_status("proxy server responded 407/Proxy Authentication Required"),
            Some(407)
        );
        assert_eq!(
            refusal_status("proxy server responded 502/Bad Gateway"),
            Some(502)
        );
        assert_eq!(refusal_status("proxy server did not respond"), None);
        let proxy = "http://agent@proxy.lan:3128 (from [hub] proxy)";
        let text =
            |reason: &str| crate::mqtt::proxy_refusal_text(proxy, refusal_status(reason), &reason);
        assert!(
            text("proxy server responded 403/Forbidden").contains(&format!(
                "proxy {proxy} refused the tunnel: HTTP 403 (forbidden"
            ))
        );
        assert!(
            text("proxy server responded 502/Bad Gateway").contains(&format!(
                "proxy {proxy} could not reach the destination: HTTP 502"
            ))
        );
        assert!(text("proxy server did not respond").starts_with(&format!("proxy {proxy}: ")));
    }
}
