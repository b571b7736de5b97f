//! Who the device is: key material and SAS signing (`keys`), X.509 identities (`x509`), the TPM
//! signer (`tpm`, feature `tpm`), the credential an attestation names (`credential`, built from
//! those) and the TLS client configuration that presents it (`tls`).

pub mod credential;
pub mod keys;
pub mod tls;
#[cfg(feature = "tpm")]
pub mod tpm;
pub mod x509;

pub use credential::Credential;
