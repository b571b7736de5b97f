//! Who the device is: key material and SAS signing (`keys`), X.509 identities (`x509`), the TPM
//! signer (`tpm`, feature `tpm`), the credential an attestation names (`credential`, built from
//! those), the TLS client configuration that presents it (`tls`) and the certificates DPS issues
//! (`issued`: a key and CSR per renewal, generations of key + chain in the state directory).
//!
//! Inside, too, a submodule uses only lower rows (`tests/layers.rs` checks this table as it checks
//! lib.rs's); siblings reach each other through `super::` and this file re-exports nothing, so no
//! path loops back through `identity`.
//!
//! | layer | modules |
//! |---|---|
//! | 3 | `issued` |
//! | 2 | `credential` |
//! | 1 | `x509`, `tpm` |
//! | 0 | `keys`, `tls` |

pub mod credential;
pub mod issued;
pub mod keys;
pub mod tls;
#[cfg(feature = "tpm")]
pub mod tpm;
pub mod x509;
