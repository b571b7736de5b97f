//! The TPM operations themselves, over tpm2-tss's ESAPI (tss-esapi): the only code of the agent
//! that links the TPM libraries. The device key is a persistent keyed-hash (HMAC-SHA256) object
//! at a configured handle; every SAS signature is a TPM2_HMAC computed inside the TPM.
//!
//! Every operation opens its own ESAPI context (the TCTI the request names), uses password
//! authorization or sessions it starts itself, and flushes every transient object and session it
//! created before returning, on success and on error alike: a long-running agent must not leak
//! the TPM's few object and session slots (swtpm has three object slots).

use std::str::FromStr;

use tss_esapi::Context;
use tss_esapi::attributes::{ObjectAttributesBuilder, SessionAttributesBuilder};
use tss_esapi::constants::response_code::Tss2ResponseCodeKind;
use tss_esapi::constants::{CapabilityType, SessionType};
use tss_esapi::handles::{KeyHandle, ObjectHandle, PersistentTpmHandle, SessionHandle, TpmHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::dynamic_handles::Persistent;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::resource_handles::{Hierarchy, Provision};
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{
    Auth, CapabilityData, Digest, KeyedHashScheme, MaxBuffer, Public, PublicBuilder, PublicKeyRsa,
    PublicKeyedHashParameters, PublicRsaParametersBuilder, RsaExponent, SensitiveData,
    SymmetricDefinition, SymmetricDefinitionObject,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::Marshall;

use hubagent::identity::tpm::protocol::Auth as HierarchyAuth;
use hubagent::identity::tpm::{
    EK_HANDLE, HandleCounts, MAX_SIGN_INPUT, Replaced, SRK_HANDLE, TpmError,
};

/// Maps a TPM response code onto the errors an operator can act on.
pub fn command_error(operation: &'static str, what: &str, e: tss_esapi::Error) -> TpmError {
    if let tss_esapi::Error::Tss2Error(rc) = e {
        match rc.kind() {
            Some(Tss2ResponseCodeKind::Lockout) => return TpmError::Lockout,
            Some(Tss2ResponseCodeKind::Retry) | Some(Tss2ResponseCodeKind::Yielded) => {
                return busy(operation, "it asked to be retried");
            }
            Some(Tss2ResponseCodeKind::Testing) => {
                return busy(operation, "it is running its self-tests");
            }
            Some(Tss2ResponseCodeKind::NvRate) => {
                return busy(operation, "its NV memory is rate-limiting writes");
            }
            Some(Tss2ResponseCodeKind::AuthFail) | Some(Tss2ResponseCodeKind::BadAuth) => {
                return TpmError::BadAuth {
                    what: what.to_string(),
                };
            }
            _ => {}
        }
    }
    TpmError::Command {
        operation: operation.to_string(),
        detail: e.to_string(),
    }
}

fn busy(operation: &str, why: &str) -> TpmError {
    TpmError::Busy {
        operation: operation.to_string(),
        why: why.to_string(),
    }
}

/// Hands the hierarchies' authorization values to ESAPI, which uses them for every password
/// authorization of the two hierarchies on this context.
fn apply(auth: &HierarchyAuth, ctx: &mut Context) -> Result<(), TpmError> {
    for (handle, value, name) in [
        (ObjectHandle::Owner, &auth.owner, "owner_auth"),
        (
            ObjectHandle::Endorsement,
            &auth.endorsement,
            "endorsement_auth",
        ),
    ] {
        if let Some(value) = value {
            let auth = Auth::try_from(value.to_vec()).map_err(|_| {
                TpmError::Invalid(format!(
                    "provisioning.attestation.{name} is {} bytes; a TPM authorization value takes at most 64",
                    value.len()
                ))
            })?;
            ctx.tr_set_auth(handle, auth)
                .map_err(|e| command_error("TR_SetAuth", name, e))?;
        }
    }
    Ok(())
}

/// Opens a context and sets the hierarchies' authorization values on it.
pub fn open_with(tcti: &str, auth: &HierarchyAuth) -> Result<Context, TpmError> {
    let mut ctx = open(tcti)?;
    apply(auth, &mut ctx)?;
    Ok(ctx)
}

/// Opens an ESAPI context over `tcti` (`device:/dev/tpmrm0`, `swtpm:host=…,port=…`, `mssim:…`).
pub fn open(tcti: &str) -> Result<Context, TpmError> {
    let conf = TctiNameConf::from_str(tcti).map_err(|e| TpmError::BadTcti {
        tcti: tcti.to_string(),
        detail: format!("{e}; write e.g. device:/dev/tpmrm0 or swtpm:host=127.0.0.1,port=2321"),
    })?;
    Context::new(conf).map_err(|e| TpmError::Unavailable {
        tcti: tcti.to_string(),
        detail: unavailable_detail(tcti, e),
    })
}

/// Why a TCTI did not open, in operator terms.
fn unavailable_detail(tcti: &str, e: tss_esapi::Error) -> String {
    if let Some(path) = tcti.strip_prefix("device:") {
        let path = if path.is_empty() { "/dev/tpm0" } else { path };
        return match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
        {
            Err(io) if io.kind() == std::io::ErrorKind::NotFound => format!(
                "{path} does not exist (no TPM, TPM disabled in firmware, or its driver not loaded)"
            ),
            Err(io) if io.kind() == std::io::ErrorKind::PermissionDenied => {
                format!("permission denied on {path}: the agent's user must be in the 'tss' group")
            }
            Err(io) if io.kind() == std::io::ErrorKind::ResourceBusy => format!(
                "{path} is in use by another process; use device:/dev/tpmrm0 (the kernel's resource manager), which lets processes share the TPM"
            ),
            Err(io) => format!("{path}: {io}"),
            Ok(_) => format!("{path} opened but the TSS could not initialize: {e}"),
        };
    }
    if tcti.starts_with("swtpm") || tcti.starts_with("mssim") {
        return format!("nothing answers at that address (is swtpm running?): {e}");
    }
    e.to_string()
}

fn persistent(handle: u32) -> Result<PersistentTpmHandle, TpmError> {
    PersistentTpmHandle::new(handle)
        .map_err(|_| TpmError::Invalid(format!("{handle:#010x} is not a persistent handle")))
}

/// What a persistent handle holds.
#[derive(Debug)]
pub enum Slot {
    Empty,
    /// A keyed-hash signing key hubagent can sign with.
    Hmac(ObjectHandle),
    /// Something else: the description says what.
    Foreign(ObjectHandle, String),
}

/// Looks at a persistent handle without changing anything.
pub fn inspect(ctx: &mut Context, handle: u32) -> Result<Slot, TpmError> {
    let tpm_handle = TpmHandle::Persistent(persistent(handle)?);
    let object = match ctx.tr_from_tpm_public(tpm_handle) {
        Ok(o) => o,
        Err(tss_esapi::Error::Tss2Error(rc)) if rc.kind() == Some(Tss2ResponseCodeKind::Handle) => {
            return Ok(Slot::Empty);
        }
        Err(e) => return Err(command_error("ReadPublic", "the key", e)),
    };
    let (public, _, _) = ctx
        .read_public(KeyHandle::from(object))
        .map_err(|e| command_error("ReadPublic", "the key", e))?;
    Ok(match describe_foreign(&public) {
        None => Slot::Hmac(object),
        Some(what) => Slot::Foreign(object, what),
    })
}

/// `None` when `public` is an HMAC key hubagent can sign with, else what it is.
fn describe_foreign(public: &Public) -> Option<String> {
    match public {
        Public::KeyedHash {
            object_attributes,
            parameters,
            ..
        } => {
            let hmac_sha256 = *parameters
                == PublicKeyedHashParameters::new(KeyedHashScheme::HMAC_SHA_256)
                || *parameters == PublicKeyedHashParameters::new(KeyedHashScheme::Null);
            if !object_attributes.sign_encrypt() {
                Some("a sealed data object (keyed-hash without the sign attribute)".into())
            } else if !hmac_sha256 {
                Some("a keyed-hash key with a scheme other than HMAC-SHA256".into())
            } else if !object_attributes.user_with_auth() {
                Some("an HMAC key usable only through a policy".into())
            } else {
                None
            }
        }
        Public::Rsa { .. } => Some("an RSA key".into()),
        Public::Ecc { .. } => Some("an ECC key".into()),
        Public::SymCipher { .. } => Some("a symmetric cipher key".into()),
    }
}

/// Runs `f`, then flushes every transient object and session it recorded in its list, whatever
/// `f` returned.
pub fn with_cleanup<T>(
    ctx: &mut Context,
    f: impl FnOnce(&mut Context, &mut Vec<ObjectHandle>) -> Result<T, TpmError>,
) -> Result<T, TpmError> {
    let mut transient = Vec::new();
    let result = f(ctx, &mut transient);
    ctx.clear_sessions();
    for handle in transient.into_iter().rev() {
        if let Err(e) = ctx.flush_context(handle) {
            eprintln!("hubagent-tpm: warning: could not flush a TPM transient handle: {e}");
        }
    }
    result
}

pub fn session_object(session: AuthSession) -> ObjectHandle {
    ObjectHandle::from(SessionHandle::from(session))
}

/// The HMAC key at `handle`, or a clear error when the handle holds none.
fn hmac_key(ctx: &mut Context, handle: u32) -> Result<ObjectHandle, TpmError> {
    match inspect(ctx, handle)? {
        Slot::Hmac(key) => Ok(key),
        Slot::Empty => Err(TpmError::HandleEmpty { handle }),
        Slot::Foreign(_, what) => Err(TpmError::ForeignKey { handle, what }),
    }
}

/// Fails with a clear error unless the handle holds a usable HMAC key.
pub fn check_hmac_key(tcti: &str, handle: u32) -> Result<(), TpmError> {
    let mut ctx = open(tcti)?;
    hmac_key(&mut ctx, handle).map(drop)
}

/// HMAC-SHA256 of `data` under the key at `handle`, computed by the TPM.
pub fn hmac(tcti: &str, handle: u32, data: &[u8]) -> Result<Vec<u8>, TpmError> {
    if data.len() > MAX_SIGN_INPUT {
        return Err(TpmError::Invalid(format!(
            "{} bytes to sign; TPM2_HMAC takes at most {MAX_SIGN_INPUT}",
            data.len()
        )));
    }
    let buffer = MaxBuffer::try_from(data.to_vec())
        .map_err(|e| TpmError::Invalid(format!("data to sign: {e}")))?;
    let mut ctx = open(tcti)?;
    let key = hmac_key(&mut ctx, handle)?;
    // A password authorization is no TPM session: nothing to flush.
    let digest = ctx
        .execute_with_session(Some(AuthSession::Password), |ctx| {
            ctx.hmac(key, buffer, HashingAlgorithm::Sha256)
        })
        .map_err(|e| command_error("HMAC", &format!("the key at handle {handle:#010x}"), e))?;
    Ok(digest.value().to_vec())
}

/// The template of the storage root key (TCG/Azure: RSA-2048, AES-128-CFB, noDA, unique = 256
/// zero bytes), so the same primary comes back every time it is created.
fn srk_template() -> Result<Public, TpmError> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
        .with_decrypt(true)
        .build()
        .map_err(|e| TpmError::Invalid(format!("SRK template: {e}")))?;
    let parameters = PublicRsaParametersBuilder::new_restricted_decryption_key(
        SymmetricDefinitionObject::AES_128_CFB,
        RsaKeyBits::Rsa2048,
        RsaExponent::default(),
    )
    .build()
    .map_err(|e| TpmError::Invalid(format!("SRK template: {e}")))?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Rsa)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_rsa_parameters(parameters)
        .with_rsa_unique_identifier(PublicKeyRsa::new_empty_with_size(RsaKeyBits::Rsa2048))
        .build()
        .map_err(|e| TpmError::Invalid(format!("SRK template: {e}")))
}

/// The storage root key: the persistent one at 0x81000001 when the TPM was provisioned with
/// one, else the primary created from the standard template (recorded in `transient`).
pub fn storage_root_key(
    ctx: &mut Context,
    transient: &mut Vec<ObjectHandle>,
) -> Result<(KeyHandle, Public), TpmError> {
    if let Ok(object) = ctx.tr_from_tpm_public(TpmHandle::Persistent(persistent(SRK_HANDLE)?)) {
        let (public, _, _) = ctx
            .read_public(KeyHandle::from(object))
            .map_err(|e| command_error("ReadPublic", "the SRK", e))?;
        if matches!(public, Public::Rsa { object_attributes, .. }
            if object_attributes.restricted() && object_attributes.decrypt())
        {
            return Ok((KeyHandle::from(object), public));
        }
    }
    let template = srk_template()?;
    let created = ctx
        .execute_with_session(Some(AuthSession::Password), |ctx| {
            ctx.create_primary(Hierarchy::Owner, template, None, None, None, None)
        })
        .map_err(|e| command_error("CreatePrimary (SRK)", "the owner hierarchy", e))?;
    transient.push(created.key_handle.into());
    Ok((created.key_handle, created.out_public))
}

/// The endorsement key: the persistent one at 0x81010001, else the primary created from the TCG
/// default RSA-2048 template (recorded in `transient`).
pub fn endorsement_key(
    ctx: &mut Context,
    transient: &mut Vec<ObjectHandle>,
) -> Result<(KeyHandle, Public), TpmError> {
    if let Ok(object) = ctx.tr_from_tpm_public(TpmHandle::Persistent(persistent(EK_HANDLE)?)) {
        let (public, _, _) = ctx
            .read_public(KeyHandle::from(object))
            .map_err(|e| command_error("ReadPublic", "the EK", e))?;
        if matches!(public, Public::Rsa { .. }) {
            return Ok((KeyHandle::from(object), public));
        }
    }
    let template = tss_esapi::abstraction::ek::create_ek_public_from_default_template(
        tss_esapi::interface_types::algorithm::AsymmetricAlgorithm::Rsa,
        None,
    )
    .map_err(|e| TpmError::Invalid(format!("EK template: {e}")))?;
    let created = ctx
        .execute_with_session(Some(AuthSession::Password), |ctx| {
            ctx.create_primary(Hierarchy::Endorsement, template, None, None, None, None)
        })
        .map_err(|e| command_error("CreatePrimary (EK)", "the endorsement hierarchy", e))?;
    transient.push(created.key_handle.into());
    Ok((created.key_handle, created.out_public))
}

/// TPM2B_PUBLIC: a u16 big-endian size, then the TPMT_PUBLIC (what DPS calls the key).
pub fn tpm2b_public(public: &Public) -> Result<Vec<u8>, TpmError> {
    let inner = public
        .marshall()
        .map_err(|e| TpmError::Invalid(format!("marshalling a public key: {e}")))?;
    let mut out = Vec::with_capacity(inner.len() + 2);
    out.extend_from_slice(&(inner.len() as u16).to_be_bytes());
    out.extend_from_slice(&inner);
    Ok(out)
}

/// Reads (or recreates from the standard templates) the EK and SRK: their TPM2B_PUBLIC.
pub fn identity(tcti: &str, auth: &HierarchyAuth) -> Result<(Vec<u8>, Vec<u8>), TpmError> {
    let mut ctx = open_with(tcti, auth)?;
    with_cleanup(&mut ctx, |ctx, transient| {
        let (_, ek) = endorsement_key(ctx, transient)?;
        let endorsement_key = tpm2b_public(&ek)?;
        // One primary at a time: swtpm has three object slots.
        for handle in transient.drain(..) {
            ctx.flush_context(handle)
                .map_err(|e| command_error("FlushContext", "the EK", e))?;
        }
        let (_, srk) = storage_root_key(ctx, transient)?;
        Ok((endorsement_key, tpm2b_public(&srk)?))
    })
}

/// The template of an imported device key: HMAC-SHA256, signing only, bound to this TPM, no
/// dictionary-attack counting (its authorization value is empty anyway).
fn hmac_key_template() -> Result<Public, TpmError> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_sign_encrypt(true)
        .build()
        .map_err(|e| TpmError::Invalid(format!("HMAC key template: {e}")))?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::KeyedHash)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_keyed_hash_parameters(PublicKeyedHashParameters::new(
            KeyedHashScheme::HMAC_SHA_256,
        ))
        .with_keyed_hash_unique_identifier(Digest::default())
        .build()
        .map_err(|e| TpmError::Invalid(format!("HMAC key template: {e}")))
}

/// Refuses to touch a handle that holds something hubagent did not put there, unless `force`.
pub fn check_replaceable(handle: u32, slot: &Slot, force: bool) -> Result<Replaced, TpmError> {
    match slot {
        Slot::Empty => Ok(Replaced::Nothing),
        Slot::Hmac(_) => Ok(Replaced::HmacKey),
        Slot::Foreign(_, what) if force => Ok(Replaced::Foreign(what.clone())),
        Slot::Foreign(_, what) => Err(TpmError::ForeignKey {
            handle,
            what: what.clone(),
        }),
    }
}

/// Makes the loaded object `loaded` persistent at `handle`, evicting what `slot` found there.
pub fn persist(
    ctx: &mut Context,
    loaded: ObjectHandle,
    slot: Slot,
    handle: u32,
) -> Result<(), TpmError> {
    let existing = match slot {
        Slot::Empty => None,
        Slot::Hmac(o) | Slot::Foreign(o, _) => Some(o),
    };
    let target = Persistent::Persistent(persistent(handle)?);
    ctx.execute_with_session(Some(AuthSession::Password), |ctx| {
        if let Some(old) = existing {
            ctx.evict_control(Provision::Owner, old, target)
                .map_err(|e| {
                    command_error(
                        "EvictControl (remove the old key)",
                        "the owner hierarchy",
                        e,
                    )
                })?;
        }
        ctx.evict_control(Provision::Owner, loaded, target)
            .map_err(|e| {
                command_error("EvictControl (persist the key)", "the owner hierarchy", e)
            })?;
        Ok(())
    })
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
    let sensitive = SensitiveData::try_from(key.to_vec())
        .map_err(|e| TpmError::Invalid(format!("key: {e}")))?;
    let mut ctx = open_with(tcti, auth)?;
    let slot = inspect(&mut ctx, handle)?;
    let replaced = check_replaceable(handle, &slot, force)?;
    with_cleanup(&mut ctx, move |ctx, transient| {
        let (srk, _) = storage_root_key(ctx, transient)?;
        // Parameter encryption: the key bytes cross the bus AES-encrypted under a session key
        // only this TPM can derive (salted with the SRK).
        let session = ctx
            .start_auth_session(
                Some(srk),
                None,
                None,
                SessionType::Hmac,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )
            .map_err(|e| command_error("StartAuthSession", "the SRK", e))?
            .ok_or_else(|| TpmError::Invalid("the TPM returned no session".into()))?;
        transient.push(session_object(session));
        let (attributes, mask) = SessionAttributesBuilder::new()
            .with_decrypt(true)
            .with_continue_session(true)
            .build();
        ctx.tr_sess_set_attributes(session, attributes, mask)
            .map_err(|e| command_error("SessionAttributes", "the session", e))?;
        let template = hmac_key_template()?;
        let created = ctx
            .execute_with_session(Some(session), |ctx| {
                ctx.create(srk, template, None, Some(sensitive), None, None)
            })
            .map_err(|e| command_error("Create (HMAC key)", "the SRK", e))?;
        let loaded = ctx
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.load(srk, created.out_private, created.out_public)
            })
            .map_err(|e| command_error("Load (HMAC key)", "the SRK", e))?;
        transient.push(loaded.into());
        persist(ctx, loaded.into(), slot, handle)?;
        Ok(replaced)
    })
}

/// Removes the persistent HMAC key at `handle` (refuses anything else unless `force`).
pub fn evict(
    tcti: &str,
    auth: &HierarchyAuth,
    handle: u32,
    force: bool,
) -> Result<Replaced, TpmError> {
    let mut ctx = open_with(tcti, auth)?;
    let slot = inspect(&mut ctx, handle)?;
    let removed = check_replaceable(handle, &slot, force)?;
    if let Slot::Hmac(o) | Slot::Foreign(o, _) = slot {
        let target = Persistent::Persistent(persistent(handle)?);
        ctx.execute_with_session(Some(AuthSession::Password), |ctx| {
            ctx.evict_control(Provision::Owner, o, target)
        })
        .map_err(|e| command_error("EvictControl", "the owner hierarchy", e))?;
    }
    Ok(removed)
}

/// How many transient objects and sessions the TPM holds right now.
pub fn handle_counts(tcti: &str) -> Result<HandleCounts, TpmError> {
    let mut ctx = open(tcti)?;
    let mut count = |first: u32| -> Result<usize, TpmError> {
        let (data, _) = ctx
            .get_capability(CapabilityType::Handles, first, 254)
            .map_err(|e| command_error("GetCapability", "handles", e))?;
        Ok(match data {
            CapabilityData::Handles(list) => list
                .iter()
                .filter(|h| u32::from(**h) >> 24 == first >> 24)
                .count(),
            _ => 0,
        })
    };
    Ok(HandleCounts {
        transient_objects: count(0x8000_0000)?,
        loaded_sessions: count(0x0200_0000)?,
        saved_sessions: count(0x0300_0000)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_tcti_is_named() {
        let err = open("carrier-pigeon:coop=1").err().unwrap().to_string();
        assert!(err.contains("carrier-pigeon"), "{err}");
    }

    #[test]
    fn a_missing_device_says_so() {
        let err = open("device:/dev/no-such-tpm").err().unwrap().to_string();
        assert!(err.contains("/dev/no-such-tpm does not exist"), "{err}");
    }
}
