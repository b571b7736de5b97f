//! DPS TPM attestation in the TPM (docs/protocol.md §6.3; the agent's side is
//! `identity/tpm/attestation.rs`): the activation blob DPS sends (`authenticationKey`) is
//! unwrapped with ActivateCredential (only this TPM's EK can) and Import (under this TPM's SRK),
//! and the HMAC key it carries becomes the persistent key at the configured handle. The key never
//! exists outside DPS and the TPM.

use tss_esapi::constants::SessionType;
use tss_esapi::handles::{AuthHandle, ObjectHandle};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{Data, Digest, Nonce, SymmetricDefinition, SymmetricDefinitionObject};

use hubagent::identity::tpm::protocol::Auth as HierarchyAuth;
use hubagent::identity::tpm::{Replaced, TpmError};

use crate::blob::{DecodedBlob, decode};
use crate::esapi::{
    check_replaceable, command_error, endorsement_key, inspect, open_with, persist, session_object,
    storage_root_key, with_cleanup,
};

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
                TpmError::Command { detail, .. } => TpmError::Invalid(format!(
                    "this TPM cannot open the activation blob from DPS (it was made for another TPM's endorsement key, or it is corrupt): {detail}"
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
