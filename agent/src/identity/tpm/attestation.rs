//! DPS TPM attestation, device side (docs/protocol.md §6.3): the activation blob DPS sends
//! (`authenticationKey`) is unwrapped with ActivateCredential (only this TPM's EK can) and
//! Import (under this TPM's SRK), and the HMAC key it carries becomes the persistent key at the
//! configured handle. The key never exists outside DPS and the TPM: the agent hands the blob to
//! the TPM helper, which does the unwrapping (`src/bin/hubagent-tpm/attestation.rs`).

use super::protocol::Request;
use super::{HierarchyAuth, Replaced, TpmError, client, replaced};

/// The parts of an activation blob (docs/protocol.md §6.2), each without its size prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActivationBlob {
    pub credential_blob: Vec<u8>,
    pub secret: Vec<u8>,
    pub duplicate: Vec<u8>,
    pub in_sym_seed: Vec<u8>,
    /// TPMT_PUBLIC of the HMAC key.
    pub public: Vec<u8>,
}

impl ActivationBlob {
    /// Splits the five TPM2B fields; the trailing encUriData (possibly absent) is ignored.
    pub fn parse(blob: &[u8]) -> Result<Self, TpmError> {
        let mut at = 0;
        let mut field = |what: &str| -> Result<Vec<u8>, TpmError> {
            let start = at;
            let bad = || {
                TpmError::Invalid(format!(
                    "the activation blob from DPS is malformed ({what} at byte {start} of {})",
                    blob.len()
                ))
            };
            let size = blob.get(at..at + 2).ok_or_else(bad)?;
            let size = usize::from(u16::from_be_bytes([size[0], size[1]]));
            let value = blob.get(at + 2..at + 2 + size).ok_or_else(bad)?.to_vec();
            at += 2 + size;
            if value.is_empty() {
                return Err(bad());
            }
            Ok(value)
        };
        Ok(ActivationBlob {
            credential_blob: field("credentialBlob")?,
            secret: field("secret")?,
            duplicate: field("duplicate")?,
            in_sym_seed: field("inSymSeed")?,
            public: field("objectPublic")?,
        })
    }
}

/// Imports the key an activation blob carries into the persistent `handle`, replacing the HMAC
/// key there (a handle holding anything else is left alone: [`TpmError::ForeignKey`]).
/// A blob made for another TPM fails in ActivateCredential. A malformed blob is refused before
/// the helper is asked.
pub fn import_activation_blob(
    tcti: &str,
    auth: &HierarchyAuth,
    handle: u32,
    blob: &[u8],
) -> Result<Replaced, TpmError> {
    ActivationBlob::parse(blob)?;
    replaced(client::call(&Request::ImportActivationBlob {
        tcti: tcti.to_string(),
        auth: auth.to_wire(),
        handle,
        blob: blob.to_vec(),
    })?)
}
