//! Where key material comes from and how it signs. The SAS signer is a trait so the TPM back end
//! (a later issue) signs inside the TPM without any key byte in the agent's memory.
//! OWNER: agent-foundation helper (fleshes this out); agent-hub helper codes against the trait.

use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// Signs SAS strings-to-sign with HMAC-SHA256 under a device (or derived) key.
pub trait SasSigner: Send + Sync {
    /// HMAC-SHA256 of `data`.
    fn sign(&self, data: &[u8]) -> Result<Vec<u8>, KeyError>;
    /// What this key is, for logs and errors ("key file /etc/…", "TPM handle 0x81000100"); never the key.
    fn describe(&self) -> String;
}

/// How the device proves its identity to DPS and the hub.
#[derive(Clone)]
pub enum Credential {
    Sas(Arc<dyn SasSigner>),
    /// PEM certificate chain (leaf first) and PEM private key.
    X509 {
        cert_chain_pem: Arc<Vec<u8>>,
        key_pem: Arc<zeroize::Zeroizing<Vec<u8>>>,
    },
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Sas(s) => write!(f, "Credential::Sas({})", s.describe()),
            Credential::X509 { .. } => write!(f, "Credential::X509(..)"),
        }
    }
}
