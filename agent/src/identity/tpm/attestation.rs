//! DPS TPM attestation, device side (docs/protocol.md §6.3): the activation blob DPS sends
//! (`authenticationKey`) is unwrapped with ActivateCredential (only this TPM's EK can) and
//! Import (under this TPM's SRK), and the HMAC key it carries becomes the persistent key at the
//! configured handle. The key never exists outside DPS and the TPM.

use tss_esapi::constants::SessionType;
use tss_esapi::handles::{AuthHandle, ObjectHandle};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    Data, Digest, EncryptedSecret, IdObject, Nonce, Private, Public, SymmetricDefinition,
    SymmetricDefinitionObject,
};
use tss_esapi::traits::UnMarshall;

use super::{
    HierarchyAuth, Replaced, TpmError, check_replaceable, command_error, endorsement_key, inspect,
    open_with, persist, session_object, storage_root_key, with_cleanup,
};

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

fn invalid<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> TpmError {
    move |e| TpmError::Invalid(format!("the activation blob's {what}: {e}"))
}

/// An activation blob turned into the TPM structures ActivateCredential and Import take.
pub struct DecodedBlob {
    pub credential_blob: IdObject,
    pub secret: EncryptedSecret,
    pub duplicate: Private,
    pub in_sym_seed: EncryptedSecret,
    pub public: Public,
}

/// Decodes what DPS sent before anything reaches the TPM: a malformed blob is a clear error
/// (fuzzed: `fuzz/fuzz_targets/tpm_blobs.rs`).
pub fn decode(blob: &[u8]) -> Result<DecodedBlob, TpmError> {
    let parts = ActivationBlob::parse(blob)?;
    Ok(DecodedBlob {
        credential_blob: IdObject::try_from(parts.credential_blob)
            .map_err(invalid("credentialBlob"))?,
        secret: EncryptedSecret::try_from(parts.secret).map_err(invalid("secret"))?,
        duplicate: Private::try_from(parts.duplicate).map_err(invalid("duplicate"))?,
        in_sym_seed: EncryptedSecret::try_from(parts.in_sym_seed).map_err(invalid("inSymSeed"))?,
        public: Public::unmarshall(&parts.public).map_err(invalid("objectPublic"))?,
    })
}

/// Imports the key an activation blob carries into the persistent `handle`, replacing the HMAC
/// key there (a handle holding anything else is left alone: [`TpmError::ForeignKey`]).
/// A blob made for another TPM fails in ActivateCredential.
pub fn import_activation_blob(
    tcti: &str,
    auth: &HierarchyAuth,
    handle: u32,
    blob: &[u8],
) -> Result<Replaced, TpmError> {
    let DecodedBlob {
        credential_blob,
        secret,
        duplicate,
        in_sym_seed,
        public,
    } = decode(blob)?;

    let mut ctx = open_with(tcti, auth)?;
    let slot = inspect(&mut ctx, handle)?;
    let replaced = check_replaceable(handle, &slot, false)?;
    with_cleanup(&mut ctx, move |ctx, transient| {
        let (ek, _) = endorsement_key(ctx, transient)?;
        let (srk, _) = storage_root_key(ctx, transient)?;
        // The EK's policy is PolicySecret(endorsement hierarchy).
        let session = ctx
            .start_auth_session(
                None,
                None,
                None,
                SessionType::Policy,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )
            .map_err(|e| command_error("StartAuthSession (policy)", "the EK", e))?
            .ok_or_else(|| TpmError::Invalid("the TPM returned no session".into()))?;
        transient.push(session_object(session));
        let policy = PolicySession::try_from(session)
            .map_err(|e| TpmError::Invalid(format!("policy session: {e}")))?;
        ctx.execute_with_session(Some(AuthSession::Password), |ctx| {
            ctx.policy_secret(
                policy,
                AuthHandle::Endorsement,
                Nonce::default(),
                Digest::default(),
                Nonce::default(),
                None,
            )
        })
        .map_err(|e| command_error("PolicySecret", "the endorsement hierarchy", e))?;
        let inner_key = ctx
            .execute_with_sessions((Some(AuthSession::Password), Some(session), None), |ctx| {
                ctx.activate_credential(srk, ek, credential_blob, secret)
            })
            .map_err(|e| match command_error("ActivateCredential", "the EK", e) {
                TpmError::Command { source, .. } => TpmError::Invalid(format!(
                    "this TPM cannot open the activation blob from DPS (it was made for another TPM's endorsement key, or it is corrupt): {source}"
                )),
                other => other,
            })?;
        // The policy session and a transient EK are done: free their slots before loading.
        let ek_object = ObjectHandle::from(ek);
        for done in [session_object(session), ek_object] {
            if let Some(i) = transient.iter().position(|h| *h == done) {
                transient.remove(i);
                ctx.flush_context(done)
                    .map_err(|e| command_error("FlushContext", "the EK", e))?;
            }
        }
        let encryption_key = Data::try_from(inner_key.value().to_vec())
            .map_err(|e| TpmError::Invalid(format!("the credential: {e}")))?;
        let private = ctx
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.import(
                    srk.into(),
                    Some(encryption_key),
                    public.clone(),
                    duplicate,
                    in_sym_seed,
                    SymmetricDefinitionObject::AES_128_CFB,
                )
            })
            .map_err(|e| command_error("Import", "the SRK", e))?;
        let loaded = ctx
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.load(srk, private, public)
            })
            .map_err(|e| command_error("Load (imported key)", "the SRK", e))?;
        transient.push(loaded.into());
        persist(ctx, loaded.into(), slot, handle)?;
        Ok(replaced)
    })
}
