//! An ECDSA P-256 signing key made inside the TPM for an issued certificate
//! (`[provisioning.issued_certificate] key = "tpm"`, docs/credentials.md): the TPM generates it
//! under the storage root key and hands out only its public part and its private part wrapped by
//! the SRK (a blob no other TPM, and nothing outside this one, can use). The agent keeps the two
//! blobs beside the certificate in the issued generation's directory; each signature (the CSR's,
//! then one per TLS handshake with the hub) loads them under the SRK, signs a SHA-256 digest with
//! TPM2_Sign and flushes the key again.
//!
//! The same key serves rcgen (it signs the CSR: [`rcgen::SigningKey`]) and rustls (it answers the
//! hub's CertificateRequest: [`TlsKey`]).

use std::sync::{Arc, Mutex};

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

use super::{HierarchyAuth, TpmError, command_error, open_with, storage_root_key, with_cleanup};

/// One TPM conversation at a time from this process for these keys (swtpm serves one client at
/// a time, and a TLS handshake may sign while a renewal makes a CSR).
static CONVERSATION: Mutex<()> = Mutex::new(());

/// A P-256 coordinate is 32 bytes.
const COORDINATE: usize = 32;

/// An ECDSA P-256 key held by the TPM: where to reach it and its two blobs.
pub struct EccKey {
    tcti: String,
    auth: HierarchyAuth,
    public: Public,
    private: Private,
    /// The uncompressed point `04 || X || Y`, as a certificate's SubjectPublicKeyInfo holds it.
    point: Vec<u8>,
}

impl std::fmt::Debug for EccKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EccKey(TPM-held ECDSA P-256 key via {})", self.tcti)
    }
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

impl EccKey {
    /// Has the TPM generate a new key under the SRK. Nothing stays loaded: the key exists as
    /// the returned blobs until they are loaded again to sign.
    pub fn create(tcti: &str, auth: &HierarchyAuth) -> Result<EccKey, TpmError> {
        let _guard = CONVERSATION.lock().unwrap_or_else(|p| p.into_inner());
        let mut ctx = open_with(tcti, auth)?;
        let created = with_cleanup(&mut ctx, |ctx, transient| {
            let (srk, _) = storage_root_key(ctx, transient)?;
            let template = template()?;
            ctx.execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.create(srk, template, None, None, None, None)
            })
            .map_err(|e| command_error("Create (ECC key)", "the SRK", e))
        })?;
        Ok(EccKey {
            tcti: tcti.to_string(),
            auth: auth.clone(),
            point: uncompressed_point(&created.out_public)?,
            public: created.out_public,
            private: created.out_private,
        })
    }

    /// A key from its stored blobs (TPM2B_PUBLIC and TPM2B_PRIVATE, as `tpm2_create -u/-r` write
    /// them). Only parsed: [`EccKey::check`] asks the TPM whether it can use them.
    pub fn from_blobs(
        tcti: &str,
        auth: &HierarchyAuth,
        public_blob: &[u8],
        private_blob: &[u8],
    ) -> Result<EccKey, TpmError> {
        let public = Public::unmarshall(untpm2b(public_blob, "the public key blob")?)
            .map_err(|e| TpmError::Invalid(format!("the public key blob: {e}")))?;
        let private = Private::try_from(untpm2b(private_blob, "the private key blob")?.to_vec())
            .map_err(|e| TpmError::Invalid(format!("the private key blob: {e}")))?;
        Ok(EccKey {
            tcti: tcti.to_string(),
            auth: auth.clone(),
            point: uncompressed_point(&public)?,
            public,
            private,
        })
    }

    /// The TPM2B_PUBLIC blob.
    pub fn public_blob(&self) -> Result<Vec<u8>, TpmError> {
        let inner = self
            .public
            .marshall()
            .map_err(|e| TpmError::Invalid(format!("marshalling the public key: {e}")))?;
        Ok(tpm2b(&inner))
    }

    /// The TPM2B_PRIVATE blob: the private key encrypted by the SRK (useless outside this TPM).
    pub fn private_blob(&self) -> Vec<u8> {
        tpm2b(self.private.value())
    }

    /// The DER SubjectPublicKeyInfo, as the issued certificate must hold it.
    pub fn subject_public_key_info(&self) -> Vec<u8> {
        rcgen::PublicKeyData::subject_public_key_info(self)
    }

    /// Loads the key under this TPM's SRK (and flushes it): fails when the TPM was cleared or is
    /// another one than the key was made in.
    pub fn check(&self) -> Result<(), TpmError> {
        self.with_loaded(|_, _| Ok(()))
    }

    /// Runs `f` with the key loaded under the SRK; everything is flushed afterwards.
    fn with_loaded<T>(
        &self,
        f: impl FnOnce(&mut Context, tss_esapi::handles::KeyHandle) -> Result<T, TpmError>,
    ) -> Result<T, TpmError> {
        let _guard = CONVERSATION.lock().unwrap_or_else(|p| p.into_inner());
        let mut ctx = open_with(&self.tcti, &self.auth)?;
        with_cleanup(&mut ctx, |ctx, transient| {
            let (srk, _) = storage_root_key(ctx, transient)?;
            let loaded = ctx
                .execute_with_session(Some(AuthSession::Password), |ctx| {
                    ctx.load(srk, self.private.clone(), self.public.clone())
                })
                .map_err(|e| match command_error("Load (ECC key)", "the SRK", e) {
                    TpmError::Command { source, .. } => TpmError::Invalid(format!(
                        "the TPM cannot load the issued certificate's key (the TPM was cleared, or it is not the TPM the key was made in): {source}"
                    )),
                    other => other,
                })?;
            transient.push(loaded.into());
            f(ctx, loaded)
        })
    }

    /// ECDSA P-256 over SHA-256 of `message`, computed by the TPM; the signature DER-encoded
    /// (`SEQUENCE { r INTEGER, s INTEGER }`), as X.509 and TLS carry it.
    pub fn sign_sha256(&self, message: &[u8]) -> Result<Vec<u8>, TpmError> {
        let digest = ring::digest::digest(&ring::digest::SHA256, message);
        let digest = Digest::try_from(digest.as_ref().to_vec())
            .map_err(|e| TpmError::Invalid(format!("digest: {e}")))?;
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
        let signature = self.with_loaded(|ctx, key| {
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

impl rcgen::PublicKeyData for EccKey {
    fn der_bytes(&self) -> &[u8] {
        &self.point
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl rcgen::SigningKey for EccKey {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.sign_sha256(message).map_err(|e| {
            tracing::error!("signing the certificate signing request in the TPM: {e}");
            rcgen::Error::RemoteKeyError
        })
    }
}

/// The key as rustls's client-authentication key: each handshake signature is made by the TPM
/// (blocking the calling thread for the TPM's time, as any TLS signature blocks for the CPU's).
#[derive(Debug, Clone)]
pub struct TlsKey(pub Arc<EccKey>);

impl rustls::sign::SigningKey for TlsKey {
    fn choose_scheme(
        &self,
        offered: &[rustls::SignatureScheme],
    ) -> Option<Box<dyn rustls::sign::Signer>> {
        offered
            .contains(&rustls::SignatureScheme::ECDSA_NISTP256_SHA256)
            .then(|| Box::new(self.clone()) as Box<dyn rustls::sign::Signer>)
    }

    fn public_key(&self) -> Option<rustls_pki_types::SubjectPublicKeyInfoDer<'_>> {
        Some(self.0.subject_public_key_info().into())
    }

    fn algorithm(&self) -> rustls::SignatureAlgorithm {
        rustls::SignatureAlgorithm::ECDSA
    }
}

impl rustls::sign::Signer for TlsKey {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        self.0
            .sign_sha256(message)
            .map_err(|e| rustls::Error::General(format!("the TPM did not sign: {e}")))
    }

    fn scheme(&self) -> rustls::SignatureScheme {
        rustls::SignatureScheme::ECDSA_NISTP256_SHA256
    }
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
