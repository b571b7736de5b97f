//! The DPS device client over MQTT/TLS (rumqttc + rustls): register, poll the operation with the
//! service's retry-after, honour throttling, and turn every failure into an error that names it.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, Packet, QoS,
    TlsConfiguration, Transport,
};
use serde_json::{Value, json};

use super::Assignment;
use crate::keys::{Credential, KeyError, sas_token};

/// What to register, where.
#[derive(Debug, Clone)]
pub struct DpsRequest {
    pub endpoint_host: String,
    pub port: u16,
    pub id_scope: String,
    pub registration_id: String,
    pub payload: Option<Value>,
    /// The whole exchange gives up after this (the daemon retries with backoff).
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum DpsError {
    #[error(
        "DPS refused the credentials for registration '{registration_id}' (CONNACK not authorized): check the id scope, registration id and key/certificate"
    )]
    NotAuthorized { registration_id: String },
    #[error("cannot reach DPS at {endpoint}: {message}")]
    Unreachable { endpoint: String, message: String },
    #[error("DPS answered {status}: {message} (errorCode {error_code}, trackingId {tracking_id})")]
    Service {
        status: u16,
        error_code: u64,
        message: String,
        tracking_id: String,
    },
    #[error("DPS did not assign the device: status '{status}'{detail}")]
    NotAssigned { status: String, detail: String },
    #[error("DPS sent an answer hubagent does not understand: {0}")]
    Protocol(String),
    #[error("no answer from DPS within {0:?}")]
    Timeout(Duration),
    #[error("signing the DPS token: {0}")]
    Key(#[from] KeyError),
    /// DPS TPM attestation: the TPM could not do its part (the message says what to fix).
    #[error("TPM: {0}")]
    Tpm(String),
    /// DPS TPM attestation: DPS refused the EK or the signed registration.
    #[error(
        "DPS refused the TPM registration of '{registration_id}': {message} (check the TPM enrollment: registration id and endorsement key from `hubagent tpm show-ek`)"
    )]
    TpmRefused {
        registration_id: String,
        message: String,
    },
}

impl DpsError {
    /// Worth retrying later (network, throttling, server errors), as opposed to a configuration
    /// or enrollment problem an operator must fix (still retried, but slowly).
    pub fn is_transient(&self) -> bool {
        match self {
            DpsError::Unreachable { .. } | DpsError::Timeout(_) | DpsError::Protocol(_) => true,
            DpsError::Service { status, .. } => *status == 429 || *status >= 500,
            _ => false,
        }
    }
}

const API_VERSION: &str = "2019-03-31";
/// Used when DPS sends no retry-after; also the cap on what it may ask, so a bogus header
/// cannot park the agent for hours.
pub(crate) const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(3);
pub(crate) const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
/// How many throttled/5xx answers in a row before giving up this attempt.
pub(crate) const MAX_RETRIES: u32 = 10;

/// Registers with DPS and waits for the assignment.
pub async fn register(
    req: &DpsRequest,
    credential: &Credential,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Assignment, DpsError> {
    tokio::time::timeout(req.timeout, register_inner(req, credential, tls))
        .await
        .map_err(|_| DpsError::Timeout(req.timeout))?
}

async fn register_inner(
    req: &DpsRequest,
    credential: &Credential,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Assignment, DpsError> {
    let endpoint = format!("{}:{}", req.endpoint_host, req.port);
    let mut options = MqttOptions::new(&req.registration_id, &req.endpoint_host, req.port);
    options.set_keep_alive(Duration::from_secs(30));
    // DPS keeps no sessions.
    options.set_clean_session(true);
    options.set_max_packet_size(64 * 1024, 64 * 1024);
    options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    let username = format!(
        "{}/registrations/{}/api-version={API_VERSION}&ClientVersion=hubagent%2F{}",
        req.id_scope,
        req.registration_id,
        env!("CARGO_PKG_VERSION")
    );
    let password = match credential {
        Credential::Sas(signer) => {
            let expiry = unix_now() + 3600;
            let resource = format!("{}/registrations/{}", req.id_scope, req.registration_id);
            sas_token(signer.as_ref(), &resource, expiry, Some("registration"))?
        }
        // X.509: the certificate in the TLS handshake is the credential; no password.
        Credential::X509 { .. } => String::new(),
    };
    options.set_credentials(username, password);
    let (client, mut eventloop) = AsyncClient::new(options, 10);

    let body = json!({"registrationId": req.registration_id, "payload": req.payload}).to_string();
    let mut rid: u32 = 0;
    let mut operation: Option<String> = None;
    let mut retries = 0;
    // When to send the next request (register or poll); `None` while waiting for an answer.
    let mut next_request = Some(tokio::time::Instant::now());
    let mut subscribed = false;

    loop {
        let wait = async {
            match next_request {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            event = eventloop.poll() => {
                let event = event.map_err(|e| connection_error(e, &endpoint, &req.registration_id))?;
                let Event::Incoming(Packet::Publish(publish)) = event else {
                    if matches!(event, Event::Incoming(Packet::ConnAck(_))) && !subscribed {
                        client
                            .subscribe("$dps/registrations/res/#", QoS::AtLeastOnce)
                            .await
                            .map_err(|e| DpsError::Protocol(e.to_string()))?;
                        subscribed = true;
                    }
                    continue;
                };
                let (status, retry_after) = parse_response_topic(&publish.topic)
                    .ok_or_else(|| DpsError::Protocol(format!("unexpected topic '{}'", publish.topic)))?;
                let answer: Value = serde_json::from_slice(&publish.payload).map_err(|e| {
                    DpsError::Protocol(format!("answer to '{}' is not JSON: {e}", publish.topic))
                })?;
                match status {
                    200..=299 => match answer["status"].as_str() {
                        Some("assigned") => {
                            // Say goodbye properly: DPS logs an abrupt close as an error.
                            let _ = client.try_disconnect();
                            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                                while eventloop.poll().await.is_ok() {}
                            })
                            .await;
                            return assignment(&answer);
                        }
                        Some("assigning") => {
                            let op = answer["operationId"].as_str().ok_or_else(|| {
                                DpsError::Protocol("'assigning' answer without operationId".into())
                            })?;
                            operation = Some(op.to_string());
                            retries = 0;
                            next_request = Some(tokio::time::Instant::now() + retry_after.unwrap_or(DEFAULT_RETRY_AFTER).min(MAX_RETRY_AFTER));
                        }
                        other => {
                            let state = &answer["registrationState"];
                            let detail = match (state["errorCode"].as_u64(), state["errorMessage"].as_str()) {
                                (Some(code), Some(message)) => format!(": {message} (errorCode {code})"),
                                _ => String::new(),
                            };
                            return Err(DpsError::NotAssigned {
                                status: other.unwrap_or("missing").to_string(),
                                detail,
                            });
                        }
                    },
                    429 | 500..=599 if retries < MAX_RETRIES => {
                        retries += 1;
                        let delay = retry_after.unwrap_or(DEFAULT_RETRY_AFTER * retries).min(MAX_RETRY_AFTER);
                        tracing::info!(status, ?delay, "DPS asks to retry later");
                        next_request = Some(tokio::time::Instant::now() + delay);
                    }
                    _ => return Err(service_error(status, &answer)),
                }
            }
            _ = wait => {
                rid += 1;
                let (topic, payload) = match &operation {
                    None => (format!("$dps/registrations/PUT/iotdps-register/?$rid={rid}"), body.clone()),
                    Some(op) => (
                        format!("$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={}", crate::keys::url_encode(op)),
                        String::new(),
                    ),
                };
                client
                    .publish(topic, QoS::AtLeastOnce, false, payload)
                    .await
                    .map_err(|e| DpsError::Protocol(e.to_string()))?;
                next_request = None;
            }
        }
    }
}

fn connection_error(e: ConnectionError, endpoint: &str, registration_id: &str) -> DpsError {
    match e {
        ConnectionError::ConnectionRefused(
            ConnectReturnCode::NotAuthorized | ConnectReturnCode::BadUserNamePassword,
        ) => DpsError::NotAuthorized {
            registration_id: registration_id.to_string(),
        },
        other => DpsError::Unreachable {
            endpoint: endpoint.to_string(),
            message: other.to_string(),
        },
    }
}

pub(crate) fn service_error(status: u16, answer: &Value) -> DpsError {
    DpsError::Service {
        status,
        error_code: answer["errorCode"].as_u64().unwrap_or(0),
        message: answer["message"]
            .as_str()
            .unwrap_or("no message")
            .to_string(),
        tracking_id: answer["trackingId"].as_str().unwrap_or("-").to_string(),
    }
}

pub(crate) fn assignment(answer: &Value) -> Result<Assignment, DpsError> {
    let state = &answer["registrationState"];
    let field = |name: &str| {
        state[name]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| DpsError::Protocol(format!("assigned without registrationState.{name}")))
    };
    Ok(Assignment {
        assigned_hub: field("assignedHub")?,
        device_id: field("deviceId")?,
        substatus: state["substatus"].as_str().unwrap_or("").to_string(),
        registration_state: state.clone(),
    })
}

/// `$dps/registrations/res/{status}/?$rid=…[&retry-after=N]` → (status, retry-after).
pub fn parse_response_topic(topic: &str) -> Option<(u16, Option<Duration>)> {
    let rest = topic.strip_prefix("$dps/registrations/res/")?;
    let (status, query) = rest
        .split_once("/?")
        .unwrap_or((rest.trim_end_matches('/'), ""));
    let status = status.parse().ok()?;
    let retry_after = query
        .split('&')
        .find_map(|p| p.strip_prefix("retry-after="))
        .and_then(|s| s.parse::<u64>().ok())
        .map(Duration::from_secs);
    Some((status, retry_after))
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_topics_parse() {
        assert_eq!(
            parse_response_topic("$dps/registrations/res/202/?$rid=1&retry-after=3"),
            Some((202, Some(Duration::from_secs(3))))
        );
        assert_eq!(
            parse_response_topic("$dps/registrations/res/200/?$rid=abc"),
            Some((200, None))
        );
        assert_eq!(parse_response_topic("$iothub/twin/res/200/?$rid=1"), None);
    }
}
