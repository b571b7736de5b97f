//! ECDSA P-256 keys made inside the TPM for issued certificates (the agent's side is
//! `identity/tpm/ecc_key.rs`): the TPM generates one under the storage root key and hands out
//! only its public part and its private part wrapped by the SRK. Each signature loads the two
//! blobs under the SRK, signs a SHA-256 digest with TPM2_Sign and flushes the key again.

use tss_esapi::Context;
use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::constants::tss::{TPM2_RH_NULL, TPM2_ST_HASHCHECK};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{
    Digest, EccPoint, EccScheme, HashScheme, HashcheckTicket, Private, Public, PublicBuilder,
    PublicEccParametersBuilder, Signature, SignatureScheme,
};
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::tss2_esys::TPMT_TK_HASHCHECK;

use hubagent::identity::tpm::TpmError;
use hubagent::identity::tpm::protocol::{Auth as HierarchyAuth, EccBlobs};

use crate::esapi::{command_error, open_with, storage_root_key, with_cleanup};

/// A P-256 coordinate is 32 bytes.
const COORDINATE: usize = 32;

/// A key's public and wrapped private parts, parsed.
struct EccKey {
    public: Public,
    private: Private,
}

/// The template: ECDSA P-256 with SHA-256, signing only, generated in the TPM
/// (`sensitiveDataOrigin`), bound to this TPM and its parent, empty authorization, no
/// dictionary-attack counting (as the device HMAC key).
fn template() -> Result<Public, TpmError> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_sign_encrypt(true)
        .build()
        .map_err(|e| TpmError::Invalid(format!("ECC key template: {e}")))?;
    let parameters = PublicEccParametersBuilder::new_unrestricted_signing_key(
        EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)),
        EccCurve::NistP256,
    )
    .build()
    .map_err(|e| TpmError::Invalid(format!("ECC key template: {e}")))?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(parameters)
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
        .map_err(|e| TpmError::Invalid(format!("ECC key template: {e}")))
}

/// `04 || X || Y` of a P-256 public area; anything else is refused.
fn uncompressed_point(public: &Public) -> Result<Vec<u8>, TpmError> {
    let Public::Ecc { unique, .. } = public else {
        return Err(TpmError::Invalid(
            "the key blob is not an ECC key's public area".into(),
        ));
    };
    let mut point = vec![0x04];
    for coordinate in [unique.x().value(), unique.y().value()] {
        if coordinate.len() > COORDINATE {
            return Err(TpmError::Invalid(format!(
                "the key blob's point has a {}-byte coordinate; a P-256 one has {COORDINATE}",
                coordinate.len()
            )));
        }
        // The TPM may drop leading zero bytes.
        point.resize(point.len() + COORDINATE - coordinate.len(), 0);
        point.extend_from_slice(coordinate);
    }
    Ok(point)
}

/// A TPM2B: a big-endian u16 size, then the bytes.
fn tpm2b(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + 2);
    out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    out.extend_from_slice(bytes);
    out
}

/// The bytes of a TPM2B, checking its size.
fn untpm2b<'a>(blob: &'a [u8], what: &str) -> Result<&'a [u8], TpmError> {
    let bad = || TpmError::Invalid(format!("{what}: not a TPM2B blob of the size it announces"));
    let size = blob.get(..2).ok_or_else(bad)?;
    let size = usize::from(u16::from_be_bytes([size[0], size[1]]));
    let rest = &blob[2..];
    if rest.len() != size || size == 0 {
        return Err(bad());
    }
    Ok(rest)
}

/// Has the TPM generate a new key under the SRK. Nothing stays loaded: the key exists as the
/// returned blobs (and its point) until they are loaded again to sign.
pub fn create(tcti: &str, auth: &HierarchyAuth) -> Result<(EccBlobs, Vec<u8>), TpmError> {
    let mut ctx = open_with(tcti, auth)?;
    let created = with_cleanup(&mut ctx, |ctx, transient| {
        let (srk, _) = storage_root_key(ctx, transient)?;
        let template = template()?;
        ctx.execute_with_session(Some(AuthSession::Password), |ctx| {
            ctx.create(srk, template, None, None, None, None)
        })
        .map_err(|e| command_error("Create (ECC key)", "the SRK", e))
    })?;
    let inner = created
        .out_public
        .marshall()
        .map_err(|e| TpmError::Invalid(format!("marshalling the public key: {e}")))?;
    let blobs = EccBlobs {
        public: tpm2b(&inner),
        private: tpm2b(created.out_private.value()),
    };
    Ok((blobs, uncompressed_point(&created.out_public)?))
}

/// Parses stored blobs (TPM2B_PUBLIC and TPM2B_PRIVATE, as `tpm2_create -u/-r` write them).
fn parse(blobs: &EccBlobs) -> Result<EccKey, TpmError> {
    let public = Public::unmarshall(untpm2b(&blobs.public, "the public key blob")?)
        .map_err(|e| TpmError::Invalid(format!("the public key blob: {e}")))?;
    let private = Private::try_from(untpm2b(&blobs.private, "the private key blob")?.to_vec())
        .map_err(|e| TpmError::Invalid(format!("the private key blob: {e}")))?;
    Ok(EccKey { public, private })
}

/// The uncompressed point of stored blobs; no TPM is asked.
pub fn read(blobs: &EccBlobs) -> Result<Vec<u8>, TpmError> {
    uncompressed_point(&parse(blobs)?.public)
}

/// Loads the key under this TPM's SRK (and flushes it): fails when the TPM was cleared or is
/// another one than the key was made in.
pub fn check(tcti: &str, auth: &HierarchyAuth, blobs: &EccBlobs) -> Result<(), TpmError> {
    with_loaded(tcti, auth, blobs, |_, _| Ok(()))
}

/// Runs `f` with the key loaded under the SRK; everything is flushed afterwards.
fn with_loaded<T>(
    tcti: &str,
    auth: &HierarchyAuth,
    blobs: &EccBlobs,
    f: impl FnOnce(&mut Context, tss_esapi::handles::KeyHandle) -> Result<T, TpmError>,
) -> Result<T, TpmError> {
    let key = parse(blobs)?;
    let mut ctx = open_with(tcti, auth)?;
    with_cleanup(&mut ctx, |ctx, transient| {
        let (srk, _) = storage_root_key(ctx, transient)?;
        let loaded = ctx
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.load(srk, key.private, key.public)
            })
            .map_err(|e| match command_error("Load (ECC key)", "the SRK", e) {
                TpmError::Command { detail, .. } => TpmError::Invalid(format!(
                    "the TPM cannot load the issued certificate's key (the TPM was cleared, or it is not the TPM the key was made in): {detail}"
                )),
                other => other,
            })?;
        transient.push(loaded.into());
        f(ctx, loaded)
    })
}

/// ECDSA P-256 over a SHA-256 `digest`, computed by the TPM; the signature DER-encoded
/// (`SEQUENCE { r INTEGER, s INTEGER }`), as X.509 and TLS carry it.
pub fn sign(
    tcti: &str,
    auth: &HierarchyAuth,
    blobs: &EccBlobs,
    digest: &[u8],
) -> Result<Vec<u8>, TpmError> {
    let digest =
        Digest::try_from(digest.to_vec()).map_err(|e| TpmError::Invalid(format!("digest: {e}")))?;
    // No ticket: the key is not restricted, so the TPM signs any digest.
    let ticket = HashcheckTicket::try_from(TPMT_TK_HASHCHECK {
        tag: TPM2_ST_HASHCHECK,
        hierarchy: TPM2_RH_NULL,
        digest: Default::default(),
    })
    .map_err(|e| TpmError::Invalid(format!("hash check ticket: {e}")))?;
    let scheme = SignatureScheme::EcDsa {
        hash_scheme: HashScheme::new(HashingAlgorithm::Sha256),
    };
    let signature = with_loaded(tcti, auth, blobs, |ctx, key| {
        ctx.execute_with_session(Some(AuthSession::Password), |ctx| {
            ctx.sign(key, digest, scheme, ticket)
        })
        .map_err(|e| command_error("Sign (ECDSA)", "the issued certificate's key", e))
    })?;
    let Signature::EcDsa(signature) = signature else {
        return Err(TpmError::Invalid(
            "the TPM answered with another kind of signature than ECDSA".into(),
        ));
    };
    Ok(der_ecdsa_signature(
        signature.signature_r().value(),
        signature.signature_s().value(),
    ))
}

/// `SEQUENCE { INTEGER r, INTEGER s }` of two unsigned big-endian numbers (P-256: short form
/// lengths suffice).
fn der_ecdsa_signature(r: &[u8], s: &[u8]) -> Vec<u8> {
    fn integer(value: &[u8]) -> Vec<u8> {
        let trimmed: &[u8] = match value.iter().position(|b| *b != 0) {
            Some(first) => &value[first..],
            None => &[0],
        };
        let mut out = vec![0x02];
        // A set high bit would read as negative: a zero byte in front.
        let pad = trimmed[0] & 0x80 != 0;
        out.push((trimmed.len() + usize::from(pad)) as u8);
        if pad {
            out.push(0);
        }
        out.extend_from_slice(trimmed);
        out
    }
    let body: Vec<u8> = [integer(r), integer(s)].concat();
    let mut out = vec![0x30, body.len() as u8];
    out.extend(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_minimal_der_integers() {
        // High bit set: a zero byte in front; leading zeros: dropped.
        let r = [0x80u8; 32];
        let mut s = [0u8; 32];
        s[31] = 0x01;
        let der = der_ecdsa_signature(&r, &s);
        assert_eq!(&der[..4], &[0x30, 2 + 33 + 3, 0x02, 33]);
        assert_eq!(der[4], 0);
        assert_eq!(&der[der.len() - 3..], &[0x02, 1, 1]);
    }

    #[test]
    fn a_tpm2b_must_hold_what_it_announces() {
        assert_eq!(untpm2b(&tpm2b(b"abc"), "x").unwrap(), b"abc");
        for bad in [&[][..], &[0, 4, 1][..], &[0, 0][..]] {
            let err = untpm2b(bad, "the public key blob").unwrap_err().to_string();
            assert!(err.starts_with("the public key blob:"), "{err}");
        }
    }
}
