//! TLS for DPS and the hub: rustls with the ring provider, the system's root certificates plus an
//! optional trust bundle (a private CA, hubsim's CA in tests and the demo), and the device's
//! certificate for X.509. Certificate verification is always on: there is no switch to turn it off.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error(
        "no trusted root certificates: the system store is empty and no hub.trust_bundle is set"
    )]
    NoRoots,
    #[error("TLS client identity: {0}")]
    Identity(String),
}

/// The system's root certificates plus those of `trust_bundle` (each of which must parse as a CA
/// certificate): what every TLS client of the agent trusts.
pub fn root_certificates(
    trust_bundle: Option<&Path>,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let mut out = rustls_native_certs::load_native_certs().certs;
    if let Some(path) = trust_bundle {
        let file_error = |message: String| TlsError::File {
            path: path.to_path_buf(),
            message,
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| file_error(format!("cannot read the trust bundle: {e}")))?
            .collect::<Result<_, _>>()
            .map_err(|e| file_error(format!("not a PEM certificate bundle: {e}")))?;
        if certs.is_empty() {
            return Err(file_error("no certificate in the trust bundle".into()));
        }
        let mut check = rustls::RootCertStore::empty();
        for cert in &certs {
            check
                .add(cert.clone())
                .map_err(|e| file_error(format!("unusable CA certificate: {e}")))?;
        }
        out.extend(certs);
    }
    if out.is_empty() {
        return Err(TlsError::NoRoots);
    }
    Ok(out)
}

/// The private key of a client certificate.
pub enum ClientKey<'a> {
    /// A PEM private key (PKCS#8, SEC1 or PKCS#1).
    Pem(&'a [u8]),
    /// A key that signs elsewhere (the TPM): rustls asks it for each handshake signature.
    Signer(Arc<dyn rustls::sign::SigningKey>),
}

/// A client configuration trusting the system roots plus `trust_bundle`, presenting
/// `client_identity` (PEM chain, its key) when given.
pub fn client_config(
    trust_bundle: Option<&Path>,
    client_identity: Option<(&[u8], ClientKey<'_>)>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in root_certificates(trust_bundle)? {
        // The bundle's certificates were checked by root_certificates; unusable system ones are
        // skipped: what matters is that something is trusted.
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(TlsError::NoRoots);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Identity(e.to_string()))?
        .with_root_certificates(roots);
    let config = match client_identity {
        None => builder.with_no_client_auth(),
        Some((chain_pem, key)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
                .collect::<Result<_, _>>()
                .map_err(|e| TlsError::Identity(format!("certificate chain: {e}")))?;
            match key {
                ClientKey::Pem(key_pem) => {
                    let key = PrivateKeyDer::from_pem_slice(key_pem)
                        .map_err(|e| TlsError::Identity(format!("private key: {e}")))?;
                    builder
                        .with_client_auth_cert(chain, key)
                        .map_err(|e| TlsError::Identity(e.to_string()))?
                }
                ClientKey::Signer(key) => {
                    let certified = rustls::sign::CertifiedKey::new(chain, key);
                    builder.with_client_cert_resolver(Arc::new(
                        rustls::sign::SingleCertAndKey::from(certified),
                    ))
                }
            }
        }
    };
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle_error(contents: Option<&str>) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        if let Some(text) = contents {
            std::fs::write(&path, text).unwrap();
        }
        let err = client_config(Some(&path), None).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with(&path.display().to_string()),
            "the error names the file: {text}"
        );
        text
    }

    #[test]
    fn trust_bundle_errors_name_the_file() {
        assert!(bundle_error(None).contains("cannot read the trust bundle"));
        assert!(bundle_error(Some("")).contains("no certificate"));
        // A key is PEM too, but not a certificate.
        assert!(
            bundle_error(Some(
                "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
            ))
            .contains("no certificate")
        );
        assert!(
            bundle_error(Some(
                "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n"
            ))
            .contains("not a PEM certificate bundle")
        );
        assert!(
            bundle_error(Some(
                "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
            ))
            .contains("unusable CA certificate")
        );
    }

    #[test]
    fn an_unusable_client_identity_is_refused() {
        let no_key = client_config(None, Some((b"", ClientKey::Pem(b""))));
        // Either the machine has no system roots (NoRoots) or the identity is refused.
        match no_key {
            Err(TlsError::Identity(message)) => assert!(message.contains("private key")),
            Err(TlsError::NoRoots) => {}
            other => panic!("accepted an empty identity: {other:?}"),
        }
    }
}
