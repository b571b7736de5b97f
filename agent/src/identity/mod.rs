//! Who the device is: key material and SAS signing (`keys`), X.509 identities (`x509`), the TPM
//! signer (`tpm`, feature `tpm`), the credential an attestation names (`credential`, built from
//! those) and the TLS client configuration that presents it (`tls`). Inside, `keys` is the base;
//! `x509` and `tpm` build on it, `credential` on all three, `tls` stands alone: siblings reach
//! each other through `super::`, and this file re-exports nothing, so no path loops back.

pub mod credential;
pub mod keys;
pub mod tls;
#[cfg(feature = "tpm")]
pub mod tpm;
pub mod x509;
