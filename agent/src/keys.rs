//! Where key material comes from and how it signs. The SAS signer is a trait so the TPM back end
//! (`crate::tpm`, feature `tpm`) signs inside the TPM without any key byte in the agent's memory.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use zeroize::Zeroizing;

use crate::config::{Attestation, Secret};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// The TPM refused or failed (the message says what to do about it).
    #[error("{0}")]
    Tpm(String),
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

/// A symmetric key held in memory (from a file or an inline value), zeroized when dropped.
pub struct MemoryKey {
    key: ring::hmac::Key,
    source: String,
}

impl SasSigner for MemoryKey {
    fn sign(&self, data: &[u8]) -> Result<Vec<u8>, KeyError> {
        Ok(ring::hmac::sign(&self.key, data).as_ref().to_vec())
    }

    fn describe(&self) -> String {
        self.source.clone()
    }
}

impl MemoryKey {
    /// `key_b64` is the base64 key as Azure shows it; `source` says where it came from.
    pub fn from_base64(key_b64: &str, source: &str) -> Result<Self, KeyError> {
        let bytes = Zeroizing::new(B64.decode(key_b64.trim()).map_err(|_| {
            KeyError::Invalid(format!(
                "{source}: not a base64 key (expected the key as the Azure portal shows it)"
            ))
        })?);
        if bytes.is_empty() {
            return Err(KeyError::Invalid(format!("{source}: the key is empty")));
        }
        Ok(MemoryKey {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &bytes),
            source: source.to_string(),
        })
    }
}

/// Reads a secret's text (trailing whitespace trimmed), zeroized when dropped.
pub fn read_secret(secret: &Secret) -> Result<(Zeroizing<String>, String, Vec<String>), KeyError> {
    match secret {
        Secret::Value { value } => Ok((
            Zeroizing::new(value.trim().to_string()),
            "inline key in the configuration".to_string(),
            vec![],
        )),
        Secret::File { file } => {
            let text =
                Zeroizing::new(
                    std::fs::read_to_string(file).map_err(|source| KeyError::Io {
                        path: file.display().to_string(),
                        source,
                    })?,
                );
            let warnings = check_private(file).into_iter().collect();
            Ok((
                Zeroizing::new(text.trim().to_string()),
                format!("key file {}", file.display()),
                warnings,
            ))
        }
    }
}

/// A warning when a key file can be read by anyone but its owner.
pub fn check_private(path: &Path) -> Option<String> {
    let mode = std::fs::metadata(path).ok()?.permissions().mode();
    (mode & 0o077 != 0).then(|| {
        format!(
            "{} is readable by group or others (mode {:o}); key files must be private: chmod 600 {}",
            path.display(),
            mode & 0o777,
            path.display()
        )
    })
}

/// `base64(HMAC-SHA256(base64decode(group_key), registration_id))`: the device key of an
/// enrollment-group member, derived the way DPS derives it.
pub fn derive_device_key(
    group: &MemoryKey,
    registration_id: &str,
) -> Result<Zeroizing<String>, KeyError> {
    Ok(Zeroizing::new(
        B64.encode(group.sign(registration_id.as_bytes())?),
    ))
}

/// Builds the credential an attestation names. Returns warnings (loose key-file permissions) for
/// the daemon to log and `hubagent check` to report.
pub fn load_credential(
    attestation: &Attestation,
    registration_id: &str,
) -> Result<(Credential, Vec<String>), KeyError> {
    match attestation {
        Attestation::SymmetricKey {
            key: Some(secret), ..
        } => {
            let (text, source, warnings) = read_secret(secret)?;
            let key = MemoryKey::from_base64(&text, &source)?;
            Ok((Credential::Sas(Arc::new(key)), warnings))
        }
        Attestation::SymmetricKey {
            group_key: Some(secret),
            ..
        } => {
            let (text, source, warnings) = read_secret(secret)?;
            let group = MemoryKey::from_base64(&text, &source)?;
            let derived = derive_device_key(&group, registration_id)?;
            let key = MemoryKey::from_base64(
                &derived,
                &format!("device key derived for '{registration_id}' from group {source}"),
            )?;
            Ok((Credential::Sas(Arc::new(key)), warnings))
        }
        Attestation::SymmetricKey { .. } => Err(KeyError::Invalid(
            "symmetric_key attestation needs key or group_key".into(),
        )),
        Attestation::X509 {
            identity_cert,
            identity_pk,
        } => {
            let read = |path: &Path| {
                std::fs::read(path).map_err(|source| KeyError::Io {
                    path: path.display().to_string(),
                    source,
                })
            };
            let cert = read(identity_cert)?;
            if !String::from_utf8_lossy(&cert).contains("-----BEGIN CERTIFICATE-----") {
                return Err(KeyError::Invalid(format!(
                    "{}: no PEM certificate in it",
                    identity_cert.display()
                )));
            }
            let key = Zeroizing::new(read(identity_pk)?);
            if !String::from_utf8_lossy(&key).contains("PRIVATE KEY-----") {
                return Err(KeyError::Invalid(format!(
                    "{}: no PEM private key in it",
                    identity_pk.display()
                )));
            }
            let warnings = check_private(identity_pk).into_iter().collect();
            Ok((
                Credential::X509 {
                    cert_chain_pem: Arc::new(cert),
                    key_pem: Arc::new(key),
                },
                warnings,
            ))
        }
        #[cfg(feature = "tpm")]
        Attestation::Tpm {
            tcti,
            handle,
            key_source,
        } => {
            let signer = crate::tpm::TpmSigner::new(tcti, *handle);
            // An imported key must be there before anything is signed; with DPS attestation the
            // registration itself puts it there.
            if *key_source == crate::config::TpmKeySource::Imported {
                signer.check()?;
            }
            Ok((Credential::Sas(Arc::new(signer)), vec![]))
        }
        #[cfg(not(feature = "tpm"))]
        Attestation::Tpm { .. } => Err(KeyError::Invalid(
            "this hubagent was built without TPM support (cargo feature `tpm`); use symmetric_key or x509, or install a build with TPM support".into(),
        )),
    }
}

/// The CN of the first certificate of a PEM chain: the registration id of an X.509 device.
pub fn certificate_common_name(cert_chain_pem: &[u8]) -> Result<String, KeyError> {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::pem_slice_iter(cert_chain_pem)
        .next()
        .ok_or_else(|| KeyError::Invalid("no certificate in the identity certificate file".into()))?
        .map_err(|e| KeyError::Invalid(format!("identity certificate: {e}")))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| KeyError::Invalid(format!("identity certificate: {e}")))?;
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string)
        .ok_or_else(|| KeyError::Invalid("the identity certificate has no subject CN".into()))
}

/// `SharedAccessSignature sr={url-encoded resource}&sig={url-encoded base64}&se={expiry}[&skn=…]`,
/// signed over the url-encoded resource, a newline and the expiry, as Azure's SDKs do.
pub fn sas_token(
    signer: &dyn SasSigner,
    resource: &str,
    expiry_unix: u64,
    key_name: Option<&str>,
) -> Result<String, KeyError> {
    let sr = url_encode(resource);
    let signature = B64.encode(signer.sign(format!("{sr}\n{expiry_unix}").as_bytes())?);
    let mut token = format!(
        "SharedAccessSignature sr={sr}&sig={}&se={expiry_unix}",
        url_encode(&signature)
    );
    if let Some(name) = key_name {
        token.push_str("&skn=");
        token.push_str(&url_encode(name));
    }
    Ok(token)
}

/// Percent-encoding as Python's `quote(safe="")`: unreserved characters stay, the rest is encoded.
pub fn url_encode(s: &str) -> String {
    const SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(s, SET).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "NMgJDvdKTxjLi+xBxxkDDEwDJxEvOE5u8BiT0mVgPeg=";

    #[test]
    fn tokens_match_the_python_sdk() {
        let key = MemoryKey::from_base64(K1, "test").unwrap();
        assert_eq!(
            sas_token(
                &key,
                "0neFEEDC0DE/registrations/myRegistrationId",
                1578941692,
                None
            )
            .unwrap(),
            "SharedAccessSignature sr=0neFEEDC0DE%2Fregistrations%2FmyRegistrationId&sig=%2Ft1VzEUrQ62f%2BJ%2B7chJSaFx3rh6pGwFWik1rI4kqc7E%3D&se=1578941692"
        );
        assert_eq!(
            sas_token(
                &key,
                "myiothub.azure-devices.net/devices/my_device",
                1578941692,
                None
            )
            .unwrap(),
            "SharedAccessSignature sr=myiothub.azure-devices.net%2Fdevices%2Fmy_device&sig=dIMMdDDBGFR8eqAfYkiMxoOphaFMPtMgj7Wg%2FYB1AvU%3D&se=1578941692"
        );
    }

    #[test]
    fn group_keys_derive_the_published_device_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("group.key");
        std::fs::write(
            &path,
            "8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE/+ah/lSh3lF8e2YG1Te7w1KpZhJFFXJrqYKi9yegxkqIChbqOS9Egw==\n",
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let (credential, warnings) = load_credential(
            &Attestation::SymmetricKey {
                key: None,
                group_key: Some(Secret::File { file: path.clone() }),
            },
            "sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6",
        )
        .unwrap();
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("chmod 600"));
        let Credential::Sas(signer) = credential else {
            panic!()
        };
        let expected =
            MemoryKey::from_base64("Jsm0lyGpjaVYVP2g3FnmnmG9dI/9qU24wNoykUmermc=", "x").unwrap();
        assert_eq!(
            signer.sign(b"probe").unwrap(),
            expected.sign(b"probe").unwrap()
        );
        assert!(signer.describe().contains("group.key"));
        assert!(
            !signer.describe().contains("8isr"),
            "descriptions never hold key material"
        );
    }

    #[cfg(not(feature = "tpm"))]
    #[test]
    fn tpm_attestation_needs_a_build_with_tpm_support() {
        let err = load_credential(
            &Attestation::Tpm {
                tcti: "device:/dev/tpmrm0".into(),
                handle: crate::config::DEFAULT_TPM_HANDLE,
                key_source: Default::default(),
            },
            "gw",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("without TPM support"), "{err}");
    }

    #[test]
    fn a_bad_key_file_is_named_without_echoing_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("device.key");
        std::fs::write(&path, "not-base64-secret!!").unwrap();
        let err = load_credential(
            &Attestation::SymmetricKey {
                key: Some(Secret::File { file: path }),
                group_key: None,
            },
            "gw",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("device.key"), "{err}");
        assert!(!err.contains("not-base64-secret"), "{err}");
    }
}
