//! Device Provisioning Service logic, independent of transport: match the registration to an
//! enrollment, check its credential, allocate a hub, create/update the hub device, and answer with
//! the exact JSON of the real service. MQTT (`mqtt`) and HTTPS (`http`) both call [`Dps`].
//! OWNER: hubsim-logic helper.

use serde_json::Value;

use crate::state::Sim;

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

/// Checks a CONNECT to DPS: the registration id in the username must match the credential
/// (SAS signed with the enrollment's or derived key; certificate CN = registration id chaining to
/// the enrollment). `Err` carries the reason recorded in the connection events (CONNACK 5).
pub fn authenticate(
    _sim: &Sim,
    _id_scope: &str,
    _registration_id: &str,
    _cred: &DeviceCredential,
) -> Result<(), String> {
    todo!("hubsim-logic helper")
}

/// `PUT iotdps-register` / HTTPS `…/register`: `body` is the raw request payload. Answers 202
/// `{"operationId","status":"assigning"}` with retry-after (or 429 when throttled, 4xx on bad input).
/// `transport` is "mqtt" or "https" (recorded in the registration history).
pub fn register(
    _sim: &Sim,
    _id_scope: &str,
    _registration_id: &str,
    _cred: &DeviceCredential,
    _body: &[u8],
    _transport: &str,
) -> DpsResponse {
    todo!("hubsim-logic helper")
}

/// `GET iotdps-get-operationstatus` / HTTPS `…/operations/{id}`: 202 while assigning (the first
/// poll after register already completes unless retry-after says otherwise), then 200 with
/// `registrationState`; 404 for an unknown operation.
pub fn operation_status(
    _sim: &Sim,
    _id_scope: &str,
    _registration_id: &str,
    _operation_id: &str,
) -> DpsResponse {
    todo!("hubsim-logic helper")
}

/// The error body of the real service: `{"errorCode", "trackingId", "message", "timestampUtc"}`.
pub fn error_body(error_code: u32, message: &str) -> Value {
    serde_json::json!({
        "errorCode": error_code,
        "trackingId": uuid::Uuid::new_v4().to_string(),
        "message": message,
        "timestampUtc": crate::state::now_rfc3339(),
    })
}
