//! The TPM 2.0 back end (cargo feature `tpm`; docs/tpm.md). The device key is a persistent
//! keyed-hash (HMAC-SHA256) object at a configured handle (default 0x81000100, where Azure's SDKs
//! keep it); every SAS signature is a TPM2_HMAC computed inside the TPM, so no key byte is ever in
//! the agent's memory or on disk.
//!
//! Every TPM operation runs in `hubagent-tpm`, a helper executable the agent starts on its first
//! TPM operation (`client`, speaking `protocol`; the server is `src/bin/hubagent-tpm/`): only the
//! helper links the TPM libraries (libtss2-esys and the rest), so an agent without a TPM does not
//! map them (docs/benchmarks.md, "Where the memory goes"). This module is what the rest of the
//! agent calls; each function is one request to the helper.

pub mod attestation;
pub mod client;
pub mod ecc_key;
pub mod helper_stderr;
pub mod protocol;

use std::sync::Mutex;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::keys::{KeyError, SasSigner};
use crate::config::Secret;
use protocol::{Auth, KeyBytes, Reply, Request};

/// The TCG/Azure persistent handles of the endorsement key and the storage root key.
pub const EK_HANDLE: u32 = 0x8101_0001;
pub const SRK_HANDLE: u32 = 0x8100_0001;

/// TPM2_HMAC takes at most one TPM2B_MAX_BUFFER (1024 bytes); SAS strings-to-sign are far shorter.
pub const MAX_SIGN_INPUT: usize = 1024;

#[derive(Debug, Clone, thiserror::Error, Serialize, Deserialize)]
pub enum TpmError {
    #[error("'{tcti}' is not a TCTI: {detail}")]
    BadTcti { tcti: String, detail: String },
    #[error("no TPM reachable through '{tcti}': {detail}")]
    Unavailable { tcti: String, detail: String },
    #[error(
        "TPM handle {handle:#010x} is empty: no device key has been put there (import one with `hubagent tpm import-key`, or let DPS TPM attestation create it)"
    )]
    HandleEmpty { handle: u32 },
    #[error(
        "TPM handle {handle:#010x} holds {what}, not an HMAC-SHA256 signing key; hubagent does not use or evict it (choose another handle, or pass --force to `hubagent tpm import-key` to replace it)"
    )]
    ForeignKey { handle: u32, what: String },
    #[error(
        "the TPM is in dictionary-attack lockout and refuses authorizations for now; wait for the lockout to expire or reset it with the lockout authorization (tpm2_dictionarylockout --clear-lockout)"
    )]
    Lockout,
    #[error(
        "the TPM is busy ({why}) and did not run {operation}; the agent retries on its next attempt"
    )]
    Busy { operation: String, why: String },
    #[error(
        "the TPM refused the authorization for {what} (wrong authorization value); if the TPM's owner or endorsement hierarchy has a password, point owner_auth / endorsement_auth in [provisioning.attestation] at a file holding it (docs/tpm.md)"
    )]
    BadAuth { what: String },
    #[error("{0}")]
    Invalid(String),
    #[error("TPM {operation} failed: {detail}")]
    Command { operation: String, detail: String },
    /// The helper executable is missing, of another build, or died (client.rs).
    #[error("{0}")]
    Helper(String),
}

impl From<TpmError> for KeyError {
    fn from(e: TpmError) -> Self {
        KeyError::Tpm(e.to_string())
    }
}

/// A reply of another kind than the request asks for: a helper of another build slipped through.
fn unexpected(reply: Reply) -> TpmError {
    TpmError::Helper(format!(
        "the TPM helper answered with an unexpected reply ({}); reinstall the hubagent package",
        reply.kind()
    ))
}

/// The authorization values of the owner and endorsement hierarchies, for TPMs whose owner set
/// them (`tpm2_changeauth -c owner …`). Empty by default, as on a TPM fresh from the factory and
/// as Azure's SDKs assume. The owner hierarchy authorizes creating the SRK and persisting keys;
/// the endorsement hierarchy creating the EK and activating a DPS credential.
#[derive(Clone)]
pub struct HierarchyAuth {
    owner: Option<Zeroizing<Vec<u8>>>,
    endorsement: Option<Zeroizing<Vec<u8>>>,
}

impl std::fmt::Debug for HierarchyAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = |v: &Option<Zeroizing<Vec<u8>>>| if v.is_some() { "set" } else { "empty" };
        write!(
            f,
            "HierarchyAuth {{ owner: {}, endorsement: {} }}",
            state(&self.owner),
            state(&self.endorsement)
        )
    }
}

impl HierarchyAuth {
    /// Both hierarchies without a password.
    pub const EMPTY: HierarchyAuth = HierarchyAuth {
        owner: None,
        endorsement: None,
    };

    /// Reads the values from the configuration's `owner_auth` / `endorsement_auth` (a file's
    /// text, trailing whitespace trimmed, is the password as `tpm2_changeauth` took it). A file
    /// others can read is used but warned about.
    pub fn from_secrets(
        owner: Option<&Secret>,
        endorsement: Option<&Secret>,
    ) -> Result<Self, TpmError> {
        let read = |secret: Option<&Secret>, name: &str| -> Result<_, TpmError> {
            let Some(secret) = secret else {
                return Ok(None);
            };
            let (text, _, warnings) = super::keys::read_secret(secret)
                .map_err(|e| TpmError::Invalid(format!("provisioning.attestation.{name}: {e}")))?;
            for warning in warnings {
                tracing::warn!("{warning}");
            }
            Ok(Some(Zeroizing::new(text.as_bytes().to_vec())))
        };
        Ok(HierarchyAuth {
            owner: read(owner, "owner_auth")?,
            endorsement: read(endorsement, "endorsement_auth")?,
        })
    }

    /// The values as the helper takes them.
    fn to_wire(&self) -> Auth {
        Auth {
            owner: self.owner.as_ref().map(|v| v.to_vec()),
            endorsement: self.endorsement.as_ref().map(|v| v.to_vec()),
        }
    }
}

/// Signs SAS strings with TPM2_HMAC under the persistent key at `handle`.
pub struct TpmSigner {
    tcti: String,
    handle: u32,
    /// One TPM conversation at a time from this signer (the helper serves one request at a time
    /// anyway; this keeps a signer's check and signature in order).
    lock: Mutex<()>,
}

impl TpmSigner {
    pub fn new(tcti: &str, handle: u32) -> Self {
        TpmSigner {
            tcti: tcti.to_string(),
            handle,
            lock: Mutex::new(()),
        }
    }

    /// Fails with a clear error unless the handle holds a usable HMAC key.
    pub fn check(&self) -> Result<(), TpmError> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        match client::call(&Request::CheckHmacKey {
            tcti: self.tcti.clone(),
            handle: self.handle,
        })? {
            Reply::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// HMAC-SHA256 of `data`, computed by the TPM.
    pub fn hmac(&self, data: &[u8]) -> Result<Vec<u8>, TpmError> {
        if data.len() > MAX_SIGN_INPUT {
            return Err(TpmError::Invalid(format!(
                "{} bytes to sign; TPM2_HMAC takes at most {MAX_SIGN_INPUT}",
                data.len()
            )));
        }
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        match client::call(&Request::Hmac {
            tcti: self.tcti.clone(),
            handle: self.handle,
            data: data.to_vec(),
        })? {
            Reply::Bytes(digest) => Ok(digest),
            other => Err(unexpected(other)),
        }
    }
}

impl SasSigner for TpmSigner {
    fn sign(&self, data: &[u8]) -> Result<Vec<u8>, KeyError> {
        self.hmac(data).map_err(KeyError::from)
    }

    fn describe(&self) -> String {
        format!("TPM key at handle {:#010x} ({})", self.handle, self.tcti)
    }
}

/// The registration id Azure derives from an EK: base32 (RFC 4648, lower case, no padding) of
/// SHA-256 over the TPM2B_PUBLIC.
pub fn registration_id_from_ek(ek_tpm2b_public: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, ek_tpm2b_public);
    base32_lower(digest.as_ref())
}

fn base32_lower(data: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut out = String::with_capacity(data.len().div_ceil(5) * 8);
    let mut buffer: u32 = 0;
    let mut bits = 0;
    for &byte in data {
        buffer = (buffer << 8) | u32::from(byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((buffer >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((buffer << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// The EK and SRK publics (TPM2B_PUBLIC) and the registration id derived from the EK.
#[derive(Debug, Clone)]
pub struct Identity {
    pub endorsement_key: Vec<u8>,
    pub storage_root_key: Vec<u8>,
    pub registration_id: String,
}

impl Identity {
    pub fn endorsement_key_base64(&self) -> String {
        B64.encode(&self.endorsement_key)
    }
    pub fn storage_root_key_base64(&self) -> String {
        B64.encode(&self.storage_root_key)
    }
}

/// Reads (or recreates from the standard templates) the EK and SRK.
pub fn identity(tcti: &str, auth: &HierarchyAuth) -> Result<Identity, TpmError> {
    match client::call(&Request::Identity {
        tcti: tcti.to_string(),
        auth: auth.to_wire(),
    })? {
        Reply::Identity {
            endorsement_key,
            storage_root_key,
        } => Ok(Identity {
            registration_id: registration_id_from_ek(&endorsement_key),
            endorsement_key,
            storage_root_key,
        }),
        other => Err(unexpected(other)),
    }
}

/// What an import replaced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Replaced {
    Nothing,
    HmacKey,
    /// Only with `force`: what was there.
    Foreign(String),
}

fn replaced(reply: Reply) -> Result<Replaced, TpmError> {
    match reply {
        Reply::Replaced(replaced) => Ok(replaced),
        other => Err(unexpected(other)),
    }
}

/// Imports `key` (raw bytes of a DPS/hub symmetric key) as a persistent HMAC key at `handle`.
/// The key travels to the TPM encrypted (a session salted with the SRK); nothing is written to
/// disk. A handle holding anything but an HMAC key is left alone unless `force`.
pub fn import_hmac_key(
    tcti: &str,
    auth: &HierarchyAuth,
    handle: u32,
    key: &[u8],
    force: bool,
) -> Result<Replaced, TpmError> {
    if key.is_empty() || key.len() > 128 {
        return Err(TpmError::Invalid(format!(
            "a device key of {} bytes cannot be imported (1 to 128 bytes; Azure's keys are 32 or 64)",
            key.len()
        )));
    }
    replaced(client::call(&Request::ImportHmacKey {
        tcti: tcti.to_string(),
        auth: auth.to_wire(),
        handle,
        key: KeyBytes(key.to_vec()),
        force,
    })?)
}

/// Removes the persistent HMAC key at `handle` (refuses anything else unless `force`).
pub fn evict(
    tcti: &str,
    auth: &HierarchyAuth,
    handle: u32,
    force: bool,
) -> Result<Replaced, TpmError> {
    replaced(client::call(&Request::Evict {
        tcti: tcti.to_string(),
        auth: auth.to_wire(),
        handle,
        force,
    })?)
}

/// How many transient objects and sessions the TPM holds right now (all clients together when
/// talking to the TPM directly; the caller's own through the kernel resource manager).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandleCounts {
    pub transient_objects: usize,
    pub loaded_sessions: usize,
    pub saved_sessions: usize,
}

pub fn handle_counts(tcti: &str) -> Result<HandleCounts, TpmError> {
    match client::call(&Request::HandleCounts {
        tcti: tcti.to_string(),
    })? {
        Reply::HandleCounts(counts) => Ok(counts),
        other => Err(unexpected(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_id_matches_azure_for_the_cli_test_ek() {
        let ek = B64
            .decode("AToAAQALAAMAsgAgg3GXZ0SEs/gakMyNRqXXJP1S124GUgtk8qHaGzMUaaoABgCAAEMAEAgAAAAAAAEAibym9HQP9vxCGF5dVc1QQsAGe021aUGJzNol1/gycBx3jFsTpwmWbISRwnFvflWd0w2Mc44FAAZNaJOAAxwZvG8GvyLlHh6fGKdh+mSBL4iLH2bZ4Ry22cB3CJVjXmdGoz9Y/j3/NwLndBxQC+baNvzvyVQZ4/A2YL7vzIIj2ik4y+ve9ir7U0GbNdnxskqK1KFIITVVtkTIYyyFTIR0BySjPrRIDj7r7Mh5uF9HBppGKQCBoVSVV8dI91lNazmSdpGWyqCkO7iM4VvUMv2HT/ym53aYlUrau+Qq87Tu+uQipWYgRdF11KDfcpMHqqzBQQ1NpOJVhrsTrhyJzO7KNw==")
            .unwrap();
        assert_eq!(ek.len(), 316);
        assert_eq!(
            registration_id_from_ek(&ek),
            "t6t2cg5vnzscr7ty546hj7c7maamkggectqcxkccq637z5bvlnoa"
        );
    }

    #[test]
    fn base32_follows_rfc4648_without_padding() {
        // RFC 4648 §10 vectors, lower-cased and unpadded.
        assert_eq!(base32_lower(b""), "");
        assert_eq!(base32_lower(b"f"), "my");
        assert_eq!(base32_lower(b"fo"), "mzxq");
        assert_eq!(base32_lower(b"foo"), "mzxw6");
        assert_eq!(base32_lower(b"foob"), "mzxw6yq");
        assert_eq!(base32_lower(b"fooba"), "mzxw6ytb");
        assert_eq!(base32_lower(b"foobar"), "mzxw6ytboi");
    }
}
