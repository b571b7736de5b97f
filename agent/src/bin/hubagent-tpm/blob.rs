//! An activation blob from DPS turned into the TPM structures ActivateCredential and Import take,
//! before any of it reaches a TPM: a malformed blob is a clear error (fuzzed:
//! `fuzz/fuzz_targets/tpm_blobs.rs`, which includes this file).

use tss_esapi::structures::{EncryptedSecret, IdObject, Private, Public};
use tss_esapi::traits::UnMarshall;

use hubagent::identity::tpm::TpmError;
use hubagent::identity::tpm::attestation::ActivationBlob;

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

/// Decodes what DPS sent.
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
