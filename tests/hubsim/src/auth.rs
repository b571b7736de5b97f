//! Authentication as the real services check it: SAS tokens (every encoding variant real clients
//! send, see reference/protocol.md §4), enrollment-group derived keys, X.509 client certificates.
//! OWNER: hubsim-mqtt helper. Signatures below are the contract other modules code against.

/// A parsed `SharedAccessSignature sr=…&sig=…&se=…[&skn=…]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SasToken {
    /// `sr` exactly as it appears in the token (this literal is what was signed).
    pub sr_raw: String,
    /// `sr` percent-decoded.
    pub resource: String,
    /// Signature bytes (base64-decoded, after percent-decoding).
    pub signature: Vec<u8>,
    /// Expiry, seconds since the Unix epoch.
    pub expiry: u64,
    /// Policy name (`skn`); `None` when absent or empty.
    pub key_name: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("malformed SAS token: {0}")]
    Malformed(String),
    #[error("SAS token expired at {0}")]
    Expired(u64),
    #[error("SAS token is for resource '{actual}', expected '{expected}'")]
    WrongResource { expected: String, actual: String },
    #[error("SAS signature does not match")]
    BadSignature,
    #[error("{0}")]
    Certificate(String),
}

/// Parses a SAS token (fields in any order; unknown fields are an error).
pub fn parse_sas(_token: &str) -> Result<SasToken, AuthError> {
    todo!("hubsim-mqtt helper")
}

/// Verifies signature (HMAC-SHA256 over `sr_raw + "\n" + se` with the base64 key), expiry against
/// `now` (Unix seconds) and that the decoded resource matches `expected_resource`
/// case-insensitively (prefix by path segment allowed, as Azure allows).
pub fn verify_sas(
    _token: &SasToken,
    _key_b64: &str,
    _expected_resource: &str,
    _now: u64,
) -> Result<(), AuthError> {
    todo!("hubsim-mqtt helper")
}

/// `base64(HMAC-SHA256(base64decode(group_key), registration_id))`.
pub fn derive_device_key(
    _group_key_b64: &str,
    _registration_id: &str,
) -> Result<String, AuthError> {
    todo!("hubsim-mqtt helper")
}

/// Current Unix time in seconds.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The IoT Hub CONNECT check for `device_id` in `hub`: SAS signed with the device's key for
/// `{hub}/devices/{deviceId}` (returns the token expiry), or an X.509 certificate matching the
/// device's thumbprint / chaining to its CA (returns `None`). `Err` names the reason.
pub fn authenticate_hub_device(
    _sim: &crate::state::Sim,
    _hub: &str,
    _device_id: &str,
    _cred: &crate::dps::DeviceCredential,
    _now: u64,
) -> Result<Option<u64>, String> {
    todo!("sim-logic helper")
}
