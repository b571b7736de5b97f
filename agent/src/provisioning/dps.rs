//! The DPS device client over MQTT/TLS (rumqttc + rustls): register, poll the operation with the
//! service's retry-after, honour throttling, and turn every failure into an error that names it.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS};
use serde_json::{Value, json};

use super::Assignment;
use crate::identity::credential::Credential;
use crate::identity::keys::{KeyError, sas_token};
use crate::mqtt::{self, ConnectOptions};
use crate::util::time::{sleep_until, unix_now};

/// What to register, where.
#[derive(Debug, Clone)]
pub struct DpsRequest {
    pub endpoint_host: String,
    pub port: u16,
    /// MQTT inside a WebSocket (`[hub] transport = "websockets"`).
    pub websocket: bool,
    /// The HTTP proxy to tunnel through.
    pub proxy: Option<mqtt::ProxyRoute>,
    /// `[hub] transport = "auto"` (then `port` and `websocket` are its memory's).
    pub auto: Option<Arc<mqtt::AutoRoute>>,
    pub id_scope: String,
    pub registration_id: String,
    pub payload: Option<Value>,
    /// A certificate signing request (base64 DER PKCS#10) for DPS certificate issuance
    /// (docs/credentials.md); it needs the preview api-version.
    pub csr: Option<String>,
    /// The whole exchange gives up after this (the daemon retries with backoff).
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum DpsError {
    #[error(
        "DPS refused the credentials for registration '{registration_id}' (CONNACK not authorized): check the id scope, registration id and key/certificate, and that the device clock is right (SAS tokens expire by it)"
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
    #[error("no answer from DPS within {}", humantime::format_duration(*.0))]
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
    /// DPS refused the credential itself (CONNACK not authorized, or 401).
    pub fn is_unauthorized(&self) -> bool {
        matches!(
            self,
            DpsError::NotAuthorized { .. } | DpsError::Service { status: 401, .. }
        )
    }

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
/// The first api-version that knows the registration's `csr` (certificate issuance preview;
/// Azure refuses a `csr` under older versions: docs/credentials.md).
pub(crate) const ISSUANCE_API_VERSION: &str = "2025-07-01-preview";
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
    let (client, mut eventloop) = connect(req, credential, tls).await?;
    subscribe_to_answers(req, &client, &mut eventloop).await?;
    let assignment = register_and_poll(req, &client, &mut eventloop).await?;
    mqtt::disconnect(&client, &mut eventloop).await;
    Ok(assignment)
}

fn unreachable(req: &DpsRequest, message: String) -> DpsError {
    DpsError::Unreachable {
        endpoint: format!("{}:{}", req.endpoint_host, req.port),
        message,
    }
}

/// CONNECT to DPS as the registration, with a SAS token signed for it or the certificate.
async fn connect(
    req: &DpsRequest,
    credential: &Credential,
    tls: Arc<rustls::ClientConfig>,
) -> Result<(AsyncClient, EventLoop), DpsError> {
    let password = match credential {
        Credential::Sas(signer) => {
            let expiry = unix_now() + 3600;
            let resource = format!("{}/registrations/{}", req.id_scope, req.registration_id);
            sas_token(signer.as_ref(), &resource, expiry, Some("registration"))?
        }
        // X.509: the certificate in the TLS handshake is the credential; no password.
        Credential::X509 { .. } => String::new(),
    };
    let connected = mqtt::connect(&ConnectOptions {
        client_id: req.registration_id.clone(),
        host: req.endpoint_host.clone(),
        port: req.port,
        websocket: req.websocket,
        proxy: req.proxy.clone(),
        auto: req.auto.clone(),
        username: format!(
            "{}/registrations/{}/api-version={}&ClientVersion=hubagent%2F{}",
            req.id_scope,
            req.registration_id,
            match req.csr {
                Some(_) => ISSUANCE_API_VERSION,
                None => API_VERSION,
            },
            env!("CARGO_PKG_VERSION")
        ),
        password,
        tls,
        keep_alive: Duration::from_secs(30),
        clean_session: true,
        max_packet_size: (64 * 1024, 64 * 1024),
        inflight: 1,
        request_capacity: 10,
        manual_acks: false,
    })
    .await;
    match connected {
        Ok(connected) => Ok(connected),
        Err(e) if e.is_auth_refusal() => Err(DpsError::NotAuthorized {
            registration_id: req.registration_id.clone(),
        }),
        Err(e) => Err(unreachable(req, e.to_string())),
    }
}

/// Answers go only to subscribers: the first request waits for the SUBACK.
async fn subscribe_to_answers(
    req: &DpsRequest,
    client: &AsyncClient,
    eventloop: &mut EventLoop,
) -> Result<(), DpsError> {
    client
        .subscribe(RESPONSE_FILTER, QoS::AtLeastOnce)
        .await
        .map_err(|e| DpsError::Protocol(e.to_string()))?;
    let codes = mqtt::wait_suback(eventloop)
        .await
        .map_err(|e| unreachable(req, e.to_string()))?;
    if codes
        .iter()
        .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
    {
        return Err(DpsError::Protocol(format!(
            "DPS refused the subscription to '{RESPONSE_FILTER}'"
        )));
    }
    Ok(())
}

/// Sends the registration, then polls its operation until DPS assigns the device, each time
/// after the pause DPS asked for.
async fn register_and_poll(
    req: &DpsRequest,
    client: &AsyncClient,
    eventloop: &mut EventLoop,
) -> Result<Assignment, DpsError> {
    let mut body = json!({"registrationId": req.registration_id, "payload": req.payload});
    if let Some(csr) = &req.csr {
        body["csr"] = json!(csr);
    }
    let body = body.to_string();
    let mut rid: u32 = 0;
    let mut operation: Option<String> = None;
    let mut retries = 0;
    // When to send the next request (register or poll); `None` while waiting for an answer.
    let mut next_request = Some(tokio::time::Instant::now());

    loop {
        let wait = sleep_until(next_request);
        tokio::select! {
            event = eventloop.poll() => {
                let event = event.map_err(|e| unreachable(req, e.to_string()))?;
                let Event::Incoming(Packet::Publish(publish)) = event else { continue };
                match read_answer(&publish.topic, &publish.payload, retries)? {
                    Step::Assigned(assignment) => return Ok(assignment),
                    Step::Poll { operation_id, after } => {
                        operation = Some(operation_id);
                        retries = 0;
                        next_request = Some(tokio::time::Instant::now() + after);
                    }
                    Step::Retry { after } => {
                        retries += 1;
                        tracing::info!(topic = %publish.topic, delay = %humantime::format_duration(after), "DPS asks to retry later");
                        next_request = Some(tokio::time::Instant::now() + after);
                    }
                }
            }
            _ = wait => {
                rid += 1;
                send_request(client, rid, operation.as_deref(), &body).await?;
                next_request = None;
            }
        }
    }
}

/// The registration itself, or once DPS answered `assigning`, a poll of its operation.
async fn send_request(
    client: &AsyncClient,
    rid: u32,
    operation: Option<&str>,
    body: &str,
) -> Result<(), DpsError> {
    let (topic, payload) = match operation {
        None => (
            format!("$dps/registrations/PUT/iotdps-register/?$rid={rid}"),
            body.to_string(),
        ),
        Some(op) => (
            format!(
                "$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={}",
                crate::util::encoding::url_encode(op)
            ),
            String::new(),
        ),
    };
    client
        .publish(topic, QoS::AtLeastOnce, false, payload)
        .await
        .map_err(|e| DpsError::Protocol(e.to_string()))
}

const RESPONSE_FILTER: &str = "$dps/registrations/res/#";

/// One DPS answer as it arrives over MQTT (topic and payload) → the next step, or why the answer
/// is unusable. Public for the `dps_answers` fuzz target.
pub fn read_answer(topic: &str, payload: &[u8], retries: u32) -> Result<Step, DpsError> {
    let (status, retry_after) = parse_response_topic(topic)
        .ok_or_else(|| DpsError::Protocol(format!("unexpected topic '{topic}'")))?;
    let answer: Value = serde_json::from_slice(payload)
        .map_err(|e| DpsError::Protocol(format!("answer to '{topic}' is not JSON: {e}")))?;
    interpret(status, retry_after, &answer, retries)
}

/// What to do after one DPS answer.
#[derive(Debug, PartialEq)]
pub enum Step {
    Assigned(Assignment),
    /// 202 `assigning`: ask for the operation's status after `after`.
    Poll {
        operation_id: String,
        after: Duration,
    },
    /// Throttled (429) or a server error: send the same request again after `after`.
    Retry {
        after: Duration,
    },
}

/// Turns one answer (status from the topic, retry-after, JSON body) into the next step.
/// `retries` counts the throttled/failed answers in a row so far.
fn interpret(
    status: u16,
    retry_after: Option<Duration>,
    answer: &Value,
    retries: u32,
) -> Result<Step, DpsError> {
    match status {
        200..=299 => match answer["status"].as_str() {
            Some("assigned") => assignment(answer).map(Step::Assigned),
            Some("assigning") => Ok(Step::Poll {
                operation_id: operation_id(answer)?.to_string(),
                after: retry_after
                    .unwrap_or(DEFAULT_RETRY_AFTER)
                    .min(MAX_RETRY_AFTER),
            }),
            _ => Err(not_assigned(answer)),
        },
        429 | 500..=599 if retries < MAX_RETRIES => {
            // Without a retry-after: a growing pause (3 s, 6 s, 9 s, …), capped.
            let after = retry_after
                .unwrap_or(DEFAULT_RETRY_AFTER * (retries + 1))
                .min(MAX_RETRY_AFTER);
            Ok(Step::Retry { after })
        }
        _ => Err(service_error(status, answer)),
    }
}

/// The operation an `assigning` answer asks to poll.
pub(crate) fn operation_id(answer: &Value) -> Result<&str, DpsError> {
    answer["operationId"]
        .as_str()
        .ok_or_else(|| DpsError::Protocol("'assigning' answer without operationId".into()))
}

/// A successful answer that neither assigns nor is still assigning (`failed`, `disabled`, …).
pub(crate) fn not_assigned(answer: &Value) -> DpsError {
    let state = &answer["registrationState"];
    let detail = match (state["errorCode"].as_u64(), state["errorMessage"].as_str()) {
        (Some(code), Some(message)) => format!(": {message} (errorCode {code})"),
        _ => String::new(),
    };
    DpsError::NotAssigned {
        status: answer["status"].as_str().unwrap_or("missing").to_string(),
        detail,
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
        assert_eq!(
            parse_response_topic("$dps/registrations/res/429/?$rid=4&retry-after=oops"),
            Some((429, None)),
            "a malformed retry-after counts as none"
        );
        assert_eq!(
            parse_response_topic("$dps/registrations/res/abc/?$rid=4"),
            None
        );
    }

    fn assigned() -> Value {
        json!({
            "operationId": "op-1",
            "status": "assigned",
            "registrationState": {
                "registrationId": "dev-1",
                "assignedHub": "hub-a.example",
                "deviceId": "dev-1",
                "status": "assigned",
                "substatus": "initialAssignment",
                "payload": {"tier": "gold"}
            }
        })
    }

    #[test]
    fn an_assigned_answer_becomes_the_assignment() {
        let Step::Assigned(a) = interpret(200, None, &assigned(), 0).unwrap() else {
            panic!("not assigned")
        };
        assert_eq!(a.assigned_hub, "hub-a.example");
        assert_eq!(a.device_id, "dev-1");
        assert_eq!(a.substatus, "initialAssignment");
        assert_eq!(a.registration_state["payload"]["tier"], "gold");
        let mut broken = assigned();
        broken["registrationState"]
            .as_object_mut()
            .unwrap()
            .remove("assignedHub");
        let err = interpret(200, None, &broken, 0).unwrap_err();
        assert!(err.to_string().contains("assignedHub"), "{err}");
    }

    #[test]
    fn assigning_polls_after_the_capped_retry_after() {
        let answer = json!({"operationId": "op-7", "status": "assigning"});
        assert_eq!(
            interpret(202, None, &answer, 0).unwrap(),
            Step::Poll {
                operation_id: "op-7".into(),
                after: DEFAULT_RETRY_AFTER
            }
        );
        assert_eq!(
            interpret(202, Some(Duration::from_secs(86400)), &answer, 0).unwrap(),
            Step::Poll {
                operation_id: "op-7".into(),
                after: MAX_RETRY_AFTER
            },
            "a bogus retry-after cannot park the agent for a day"
        );
        let err = interpret(202, None, &json!({"status": "assigning"}), 0).unwrap_err();
        assert!(matches!(err, DpsError::Protocol(_)), "{err}");
    }

    #[test]
    fn throttling_backs_off_then_gives_up() {
        let answer = json!({"errorCode": 429001, "message": "throttled", "trackingId": "t-1"});
        assert_eq!(
            interpret(429, Some(Duration::from_secs(2)), &answer, 0).unwrap(),
            Step::Retry {
                after: Duration::from_secs(2)
            }
        );
        // Without retry-after the pause grows with each retry.
        assert_eq!(
            interpret(503, None, &answer, 2).unwrap(),
            Step::Retry {
                after: DEFAULT_RETRY_AFTER * 3
            }
        );
        let err = interpret(429, None, &answer, MAX_RETRIES).unwrap_err();
        assert!(err.is_transient());
        assert_eq!(
            err.to_string(),
            "DPS answered 429: throttled (errorCode 429001, trackingId t-1)"
        );
    }

    #[test]
    fn refusals_carry_the_service_error() {
        let answer = json!({
            "errorCode": 401002,
            "message": "Invalid certificate.",
            "trackingId": "abc",
            "timestampUtc": "2026-01-01T00:00:00Z"
        });
        let err = interpret(401, None, &answer, 0).unwrap_err();
        assert!(!err.is_transient());
        assert!(
            matches!(&err, DpsError::Service { status: 401, error_code: 401002, tracking_id, .. } if tracking_id == "abc"),
            "{err:?}"
        );
        let disabled = json!({
            "operationId": "op",
            "status": "disabled",
            "registrationState": {"status": "disabled", "errorCode": 400203, "errorMessage": "Enrollment is disabled"}
        });
        let err = interpret(200, None, &disabled, 0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "DPS did not assign the device: status 'disabled': Enrollment is disabled (errorCode 400203)"
        );
    }
}
