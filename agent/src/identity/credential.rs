//! The device's credential: what an `[provisioning.attestation]` names, loaded and checked once,
//! then shared by DPS and the hub session. Built from the lower pieces of this layer (keys, X.509,
//! the TPM signer), which do not know about each other.

use std::path::Path;
use std::sync::Arc;

use zeroize::Zeroizing;

use super::keys::{KeyError, MemoryKey, SasSigner, check_private, derive_device_key, read_secret};
use super::tls::ClientKey;
use super::x509::{Validity, check_x509_identity};
use crate::config::Attestation;

/// How the device proves its identity to DPS and the hub.
#[derive(Clone)]
pub enum Credential {
    Sas(Arc<dyn SasSigner>),
    /// PEM certificate chain (leaf first) and its private key.
    X509 {
        cert_chain_pem: Arc<Vec<u8>>,
        key: PrivateKey,
    },
}

/// The private key of an X.509 credential.
#[derive(Clone)]
pub enum PrivateKey {
    /// PEM (from the configured file, or an issued generation's `key.pem`); never logged.
    Pem(Arc<Zeroizing<Vec<u8>>>),
    /// Made and kept by the TPM (an issued generation with `key = "tpm"`).
    #[cfg(feature = "tpm")]
    Tpm(Arc<super::tpm::ecc_key::EccKey>),
}

impl PrivateKey {
    /// The key as the TLS client configuration takes it.
    pub fn client_key(&self) -> ClientKey<'_> {
        match self {
            PrivateKey::Pem(pem) => ClientKey::Pem(pem.as_slice()),
            #[cfg(feature = "tpm")]
            PrivateKey::Tpm(key) => {
                ClientKey::Signer(Arc::new(super::tpm::ecc_key::TlsKey(key.clone())))
            }
        }
    }

    /// Where the key is, for `hubagent check` and the logs.
    pub fn describe(&self) -> &'static str {
        match self {
            PrivateKey::Pem(_) => "private key file",
            #[cfg(feature = "tpm")]
            PrivateKey::Tpm(_) => "key held by the TPM",
        }
    }
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Sas(s) => write!(f, "Credential::Sas({})", s.describe()),
            Credential::X509 { .. } => write!(f, "Credential::X509(..)"),
        }
    }
}

impl Credential {
    /// What kind of credential this is, for `hubagent check` and the logs (never key material).
    pub fn describe(&self) -> String {
        match self {
            Credential::Sas(signer) => format!("SAS signing with {}", signer.describe()),
            Credential::X509 { .. } => "X.509 certificate and private key".to_string(),
        }
    }

    /// The identity certificate's validity period (X.509 only).
    pub fn certificate_validity(&self) -> Option<Validity> {
        match self {
            Credential::X509 { cert_chain_pem, .. } => Validity::of_leaf(cert_chain_pem).ok(),
            Credential::Sas(_) => None,
        }
    }

    /// The secondary symmetric key an attestation names (`secondary_key`: the device's, or the
    /// group's when the primary is a `group_key`), for when DPS refuses the primary.
    pub fn load_secondary(
        attestation: &Attestation,
        registration_id: &str,
    ) -> Result<Option<(Credential, Vec<String>)>, KeyError> {
        match attestation {
            Attestation::SymmetricKey {
                secondary_key: Some(secret),
                group_key,
                ..
            } => {
                let group = group_key.is_some().then_some(registration_id);
                sas_credential(secret, group).map(Some)
            }
            _ => Ok(None),
        }
    }

    /// Builds the credential an attestation names. Returns warnings (loose key-file permissions) for
    /// the daemon to log and `hubagent check` to report.
    pub fn load(
        attestation: &Attestation,
        registration_id: &str,
    ) -> Result<(Credential, Vec<String>), KeyError> {
        match attestation {
            Attestation::SymmetricKey {
                key: Some(secret), ..
            } => sas_credential(secret, None),
            Attestation::SymmetricKey {
                group_key: Some(secret),
                ..
            } => sas_credential(secret, Some(registration_id)),
            Attestation::SymmetricKey { .. } => Err(KeyError::Invalid(
                "symmetric_key attestation needs key or group_key".into(),
            )),
            Attestation::X509 {
                identity_cert,
                identity_pk,
                ..
            } => {
                let read = |path: &Path| {
                    std::fs::read(path).map_err(|source| KeyError::Io {
                        path: path.display().to_string(),
                        source,
                    })
                };
                let cert = read(identity_cert)?;
                let key = Zeroizing::new(read(identity_pk)?);
                let cert_warnings = check_x509_identity(identity_cert, &cert, identity_pk, &key)?;
                let warnings = check_private(identity_pk)
                    .into_iter()
                    .chain(cert_warnings)
                    .collect();
                Ok((
                    Credential::X509 {
                        cert_chain_pem: Arc::new(cert),
                        key: PrivateKey::Pem(Arc::new(key)),
                    },
                    warnings,
                ))
            }
            #[cfg(feature = "tpm")]
            Attestation::Tpm {
                tcti,
                handle,
                key_source,
                ..
            } => {
                let signer = super::tpm::TpmSigner::new(tcti, *handle);
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
}

/// A SAS credential from a key secret; with `group_of`, the key is an enrollment group's and the
/// device key for that registration id is derived from it.
fn sas_credential(
    secret: &crate::config::Secret,
    group_of: Option<&str>,
) -> Result<(Credential, Vec<String>), KeyError> {
    let (text, source, warnings) = read_secret(secret)?;
    let key = MemoryKey::from_base64(&text, &source)?;
    let key = match group_of {
        None => key,
        Some(registration_id) => MemoryKey::from_base64(
            &derive_device_key(&key, registration_id)?,
            &format!("device key derived for '{registration_id}' from group {source}"),
        )?,
    };
    Ok((Credential::Sas(Arc::new(key)), warnings))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;
    use crate::identity::x509::certificate_common_name;
    use std::os::unix::fs::PermissionsExt;

    const K1: &str = "NMgJDvdKTxjLi+xBxxkDDEwDJxEvOE5u8BiT0mVgPeg=";

    /// A self-signed identity (PKCS#8 key), valid from `from` to `until` (years).
    fn identity(cn: &str, from: i32, until: i32) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![cn.to_string()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.not_before = rcgen::date_time_ymd(from, 1, 1);
        params.not_after = rcgen::date_time_ymd(until, 1, 1);
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn x509(dir: &Path, cert: &str, key: &str) -> Result<(Credential, Vec<String>), KeyError> {
        let (cert_path, key_path) = (dir.join("device.pem"), dir.join("device.key.pem"));
        std::fs::write(&cert_path, cert).unwrap();
        std::fs::write(&key_path, key).unwrap();
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
        Credential::load(
            &Attestation::X509 {
                identity_cert: cert_path,
                identity_pk: key_path,
                expiry_warning: std::time::Duration::from_secs(30 * 86_400),
            },
            "",
        )
    }

    #[test]
    fn an_x509_identity_loads_and_names_its_cn() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = identity("gw-x509", 2020, 2090);
        let (credential, warnings) = x509(dir.path(), &cert, &key).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        let Credential::X509 { cert_chain_pem, .. } = credential else {
            panic!("not an X.509 credential")
        };
        assert_eq!(certificate_common_name(&cert_chain_pem).unwrap(), "gw-x509");
    }

    #[test]
    fn x509_mistakes_name_the_file_at_fault() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = identity("gw-x509", 2020, 2090);
        let (_, other_key) = identity("someone-else", 2020, 2090);

        let err = x509(dir.path(), "hello", &key).unwrap_err().to_string();
        assert!(err.contains("device.pem: no PEM certificate"), "{err}");

        let broken = cert.replace("-----END CERTIFICATE-----", "");
        let err = x509(dir.path(), &broken, &key).unwrap_err().to_string();
        assert!(err.contains("device.pem:"), "{err}");

        let err = x509(dir.path(), &cert, &cert).unwrap_err().to_string();
        assert!(err.contains("device.key.pem: no PEM private key"), "{err}");

        let err = x509(dir.path(), &cert, &other_key).unwrap_err().to_string();
        assert!(
            err.contains("device.key.pem: the private key does not belong to the certificate"),
            "{err}"
        );
        assert!(!err.contains("PRIVATE KEY"), "no key material: {err}");

        let encrypted =
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED PRIVATE KEY-----\n";
        let err = x509(dir.path(), &cert, encrypted).unwrap_err().to_string();
        assert!(err.contains("encrypted"), "{err}");
    }

    #[test]
    fn an_expired_certificate_is_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = identity("gw-old", 2000, 2001);
        let (_, warnings) = x509(dir.path(), &cert, &key).unwrap();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("expired"), "{warnings:?}");
    }

    #[test]
    fn inline_keys_and_whitespace() {
        let (credential, warnings) = Credential::load(
            &Attestation::SymmetricKey {
                key: Some(Secret::Value {
                    value: format!("  {K1}\n"),
                }),
                group_key: None,
                secondary_key: None,
            },
            "gw",
        )
        .unwrap();
        assert!(warnings.is_empty());
        let Credential::Sas(signer) = credential else {
            panic!()
        };
        let expected = MemoryKey::from_base64(K1, "x").unwrap();
        assert_eq!(signer.sign(b"a").unwrap(), expected.sign(b"a").unwrap());
        assert!(!signer.describe().contains(K1));
        let err = Credential::load(
            &Attestation::SymmetricKey {
                key: Some(Secret::Value {
                    value: String::new(),
                }),
                group_key: None,
                secondary_key: None,
            },
            "gw",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("empty"), "{err}");
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
        let (credential, warnings) = Credential::load(
            &Attestation::SymmetricKey {
                key: None,
                group_key: Some(Secret::File { file: path.clone() }),
                secondary_key: None,
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
        let err = Credential::load(
            &Attestation::Tpm {
                tcti: "device:/dev/tpmrm0".into(),
                handle: crate::config::DEFAULT_TPM_HANDLE,
                key_source: Default::default(),
                owner_auth: None,
                endorsement_auth: None,
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
        let err = Credential::load(
            &Attestation::SymmetricKey {
                key: Some(Secret::File { file: path }),
                group_key: None,
                secondary_key: None,
            },
            "gw",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("device.key"), "{err}");
        assert!(!err.contains("not-base64-secret"), "{err}");
    }
}
