//! An ECDSA P-256 signing key made inside the TPM for an issued certificate
//! (`[provisioning.issued_certificate] key = "tpm"`, docs/credentials.md): the TPM generates it
//! under the storage root key and hands out only its public part and its private part wrapped by
//! the SRK (a blob no other TPM, and nothing outside this one, can use). The agent keeps the two
//! blobs beside the certificate in the issued generation's directory; each signature (the CSR's,
//! then one per TLS handshake with the hub) has the TPM helper load them under the SRK, sign a
//! SHA-256 digest with TPM2_Sign and flush the key again (`src/bin/hubagent-tpm/ecc_key.rs`).
//!
//! The same key serves rcgen (it signs the CSR: [`rcgen::SigningKey`]) and rustls (it answers the
//! hub's CertificateRequest: [`TlsKey`]).

use std::sync::Arc;

use super::protocol::Reply;
use super::protocol::{EccBlobs, Request};
use super::unexpected;
use super::{HierarchyAuth, TpmError, client};

/// An ECDSA P-256 key held by the TPM: where to reach it and its two blobs.
pub struct EccKey {
    tcti: String,
    auth: HierarchyAuth,
    blobs: EccBlobs,
    /// The uncompressed point `04 || X || Y`, as a certificate's SubjectPublicKeyInfo holds it.
    point: Vec<u8>,
}

impl std::fmt::Debug for EccKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EccKey(TPM-held ECDSA P-256 key via {})", self.tcti)
    }
}

impl EccKey {
    fn from_reply(tcti: &str, auth: &HierarchyAuth, reply: Reply) -> Result<EccKey, TpmError> {
        match reply {
            Reply::EccKey { blobs, point } => Ok(EccKey {
                tcti: tcti.to_string(),
                auth: auth.clone(),
                blobs,
                point,
            }),
            other => Err(unexpected(other)),
        }
    }

    /// Has the TPM generate a new key under the SRK. Nothing stays loaded: the key exists as
    /// the returned blobs until they are loaded again to sign.
    pub fn create(tcti: &str, auth: &HierarchyAuth) -> Result<EccKey, TpmError> {
        let reply = client::call(&Request::CreateEccKey {
            tcti: tcti.to_string(),
            auth: auth.to_wire(),
        })?;
        EccKey::from_reply(tcti, auth, reply)
    }

    /// A key from its stored blobs (TPM2B_PUBLIC and TPM2B_PRIVATE, as `tpm2_create -u/-r` write
    /// them). Only parsed (by the helper, which knows the TPM's structures): [`EccKey::check`]
    /// asks the TPM whether it can use them.
    pub fn from_blobs(
        tcti: &str,
        auth: &HierarchyAuth,
        public_blob: &[u8],
        private_blob: &[u8],
    ) -> Result<EccKey, TpmError> {
        let reply = client::call(&Request::ReadEccKey {
            blobs: EccBlobs {
                public: public_blob.to_vec(),
                private: private_blob.to_vec(),
            },
        })?;
        EccKey::from_reply(tcti, auth, reply)
    }

    /// The TPM2B_PUBLIC blob.
    pub fn public_blob(&self) -> Result<Vec<u8>, TpmError> {
        Ok(self.blobs.public.clone())
    }

    /// The TPM2B_PRIVATE blob: the private key encrypted by the SRK (useless outside this TPM).
    pub fn private_blob(&self) -> Vec<u8> {
        self.blobs.private.clone()
    }

    /// The DER SubjectPublicKeyInfo, as the issued certificate must hold it.
    pub fn subject_public_key_info(&self) -> Vec<u8> {
        rcgen::PublicKeyData::subject_public_key_info(self)
    }

    /// Loads the key under this TPM's SRK (and flushes it): fails when the TPM was cleared or is
    /// another one than the key was made in.
    pub fn check(&self) -> Result<(), TpmError> {
        match client::call(&Request::CheckEccKey {
            tcti: self.tcti.clone(),
            auth: self.auth.to_wire(),
            blobs: self.blobs.clone(),
        })? {
            Reply::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// ECDSA P-256 over SHA-256 of `message`, computed by the TPM; the signature DER-encoded
    /// (`SEQUENCE { r INTEGER, s INTEGER }`), as X.509 and TLS carry it.
    pub fn sign_sha256(&self, message: &[u8]) -> Result<Vec<u8>, TpmError> {
        let digest = ring::digest::digest(&ring::digest::SHA256, message);
        match client::call(&Request::SignEcc {
            tcti: self.tcti.clone(),
            auth: self.auth.to_wire(),
            blobs: self.blobs.clone(),
            digest: digest.as_ref().to_vec(),
        })? {
            Reply::Bytes(signature) => Ok(signature),
            other => Err(unexpected(other)),
        }
    }
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
