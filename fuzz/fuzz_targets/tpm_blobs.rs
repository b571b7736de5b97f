//! Activation blobs as DPS sends them in a TPM attestation (`authenticationKey`, base64-decoded):
//! split into their five TPM2B fields and unmarshalled into the TPM structures (tpm2-tss's
//! marshalling code) before any of it reaches a TPM. Malformed input is an error, never a panic
//! or a crash; a blob that decodes re-splits to the same fields. The decoding is the TPM helper's
//! (`hubagent-tpm`, which alone links tpm2-tss), included from its source.
#![no_main]
#[path = "../../agent/src/bin/hubagent-tpm/blob.rs"]
mod blob;

use blob::decode;
use hubagent::identity::tpm::attestation::ActivationBlob;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match decode(data) {
        Ok(decoded) => {
            let parts = ActivationBlob::parse(data).expect("decoded blobs split");
            assert_eq!(
                decoded.credential_blob.value(),
                parts.credential_blob.as_slice()
            );
            assert_eq!(decoded.duplicate.value(), parts.duplicate.as_slice());
            assert_eq!(decoded.secret.value(), parts.secret.as_slice());
            assert_eq!(decoded.in_sym_seed.value(), parts.in_sym_seed.as_slice());
            std::hint::black_box(&decoded.public);
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
