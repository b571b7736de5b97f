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
            let key = Zeroizing::new(read(identity_pk)?);
            let cert_warnings = check_x509_identity(identity_cert, &cert, identity_pk, &key)?;
            let warnings = check_private(identity_pk)
                .into_iter()
                .chain(cert_warnings)
                .collect();
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
            ..
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

/// Checks an X.509 identity before any connection: the certificate file holds a PEM chain of
/// valid certificates, the key file a PEM private key (PKCS#8, SEC1 or PKCS#1 RSA) that matches
/// the leaf. Errors name the file at fault and never include key material. Returns warnings for a
/// leaf that is expired or not yet valid (the hub will refuse it; the clock may be wrong).
pub fn check_x509_identity(
    cert_path: &Path,
    cert_pem: &[u8],
    key_path: &Path,
    key_pem: &[u8],
) -> Result<Vec<String>, KeyError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};

    let cert_err = |what: String| KeyError::Invalid(format!("{}: {what}", cert_path.display()));
    let key_err = |what: &str| KeyError::Invalid(format!("{}: {what}", key_path.display()));

    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(format!("not a PEM certificate chain ({e})")))?;
    if chain.is_empty() {
        return Err(cert_err(
            "no PEM certificate in it (expected -----BEGIN CERTIFICATE-----, leaf first)".into(),
        ));
    }
    let mut leaf_spki = Vec::new();
    let mut warnings = Vec::new();
    for (i, der) in chain.iter().enumerate() {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| cert_err(format!("certificate {} of the chain: {e}", i + 1)))?;
        if i == 0 {
            leaf_spki = cert.public_key().raw.to_vec();
            let validity = cert.validity();
            let now = x509_parser::time::ASN1Time::now();
            if now > validity.not_after {
                warnings.push(format!(
                    "{}: the certificate expired on {} (the hub will refuse it)",
                    cert_path.display(),
                    validity.not_after
                ));
            } else if now < validity.not_before {
                warnings.push(format!(
                    "{}: the certificate is valid only from {} (is the clock right?)",
                    cert_path.display(),
                    validity.not_before
                ));
            }
        }
    }

    let text = String::from_utf8_lossy(key_pem);
    if text.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----") {
        return Err(key_err(
            "the private key is encrypted; store it unencrypted with mode 0600 (openssl pkey -in KEY -out KEY.plain)",
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|_| {
        key_err("no PEM private key in it (expected PKCS#8, SEC1 EC or PKCS#1 RSA: -----BEGIN PRIVATE KEY-----)")
    })?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|_| {
        key_err("unsupported private key (use an RSA, ECDSA P-256/P-384 or Ed25519 key)")
    })?;
    if let Some(public) = signing.public_key()
        && public.as_ref() != leaf_spki.as_slice()
    {
        return Err(key_err(&format!(
            "the private key does not belong to the certificate {}",
            cert_path.display()
        )));
    }
    Ok(warnings)
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
        load_credential(
            &Attestation::X509 {
                identity_cert: cert_path,
                identity_pk: key_path,
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
        let (credential, warnings) = load_credential(
            &Attestation::SymmetricKey {
                key: Some(Secret::Value {
                    value: format!("  {K1}\n"),
                }),
                group_key: None,
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
        let err = load_credential(
            &Attestation::SymmetricKey {
                key: Some(Secret::Value {
                    value: String::new(),
                }),
                group_key: None,
            },
            "gw",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("empty"), "{err}");
    }

    #[test]
    fn sas_tokens_carry_the_key_name_when_given() {
        let key = MemoryKey::from_base64(K1, "test").unwrap();
        let token = sas_token(&key, "hub/devices/d", 1, Some("registration")).unwrap();
        assert!(token.ends_with("&se=1&skn=registration"), "{token}");
        assert_eq!(url_encode("a b/c+d=~"), "a%20b%2Fc%2Bd%3D~");
    }

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
