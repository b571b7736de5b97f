//! X.509 identities: the checks made before any connection (a readable chain, a matching key,
//! the validity period) and the CN that is the registration id.

use std::path::Path;

use super::keys::KeyError;

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
