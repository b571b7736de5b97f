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
    use rustls_pki_types::PrivateKeyDer;
    use rustls_pki_types::pem::PemObject;

    let key_err = |what: &str| KeyError::Invalid(format!("{}: {what}", key_path.display()));
    let (leaf_spki, warnings) = check_chain(cert_path, cert_pem)?;

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

/// Checks a PEM certificate chain (leaf first): there is one and every certificate parses.
/// Returns the leaf's SubjectPublicKeyInfo (DER) and warnings for a leaf that is expired or not
/// yet valid.
pub fn check_chain(cert_path: &Path, cert_pem: &[u8]) -> Result<(Vec<u8>, Vec<String>), KeyError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;

    let cert_err = |what: String| KeyError::Invalid(format!("{}: {what}", cert_path.display()));
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
    Ok((leaf_spki, warnings))
}

/// The validity period of an identity certificate (the leaf), in Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: i64,
    pub not_after: i64,
}

/// Where a certificate stands at a given time, measured against the warning lead time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// Valid, and its end is further away than the lead time.
    Valid { days_left: i64 },
    /// Valid, but it ends within the lead time: renew it.
    Expiring { days_left: i64 },
    /// Past its end: the hub refuses it.
    Expired,
    /// Before its start: the certificate or, more likely on a gateway, the clock is wrong.
    NotYetValid,
}

impl Expiry {
    /// The name status and the twin use (`valid`, `expiring`, `expired`, `not-yet-valid`).
    pub fn name(&self) -> &'static str {
        match self {
            Expiry::Valid { .. } => "valid",
            Expiry::Expiring { .. } => "expiring",
            Expiry::Expired => "expired",
            Expiry::NotYetValid => "not-yet-valid",
        }
    }
}

impl Validity {
    /// The leaf (first) certificate's validity period of a PEM chain.
    pub fn of_leaf(cert_chain_pem: &[u8]) -> Result<Validity, KeyError> {
        let der = leaf_der(cert_chain_pem)?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| KeyError::Invalid(format!("identity certificate: {e}")))?;
        let validity = cert.validity();
        Ok(Validity {
            not_before: validity.not_before.timestamp(),
            not_after: validity.not_after.timestamp(),
        })
    }

    /// Where the certificate stands at `now` (Unix seconds) with a warning lead time of `lead`.
    /// Whole days left, rounded down: "0 days" is the last day.
    pub fn at(&self, now: i64, lead: std::time::Duration) -> Expiry {
        if now < self.not_before {
            return Expiry::NotYetValid;
        }
        if now > self.not_after {
            return Expiry::Expired;
        }
        let left = self.not_after - now;
        let days_left = left / 86_400;
        if left <= i64::try_from(lead.as_secs()).unwrap_or(i64::MAX) {
            Expiry::Expiring { days_left }
        } else {
            Expiry::Valid { days_left }
        }
    }

    /// The next moment (Unix seconds) after `now` at which [`Validity::at`] gives another state
    /// (valid → expiring → expired, or not yet valid → valid), so a running agent looks again then
    /// rather than up to an hour late; None once expired (nothing changes any more).
    pub fn next_change(&self, now: i64, lead: std::time::Duration) -> Option<i64> {
        let lead = i64::try_from(lead.as_secs()).unwrap_or(i64::MAX);
        if now < self.not_before {
            Some(self.not_before)
        } else if self.not_after.saturating_sub(now) > lead {
            Some(self.not_after.saturating_sub(lead))
        } else if now <= self.not_after {
            Some(self.not_after + 1)
        } else {
            None
        }
    }

    /// What `expiry` means for this certificate, in the words the log and `hubagent check` share
    /// ("… expires on 2027-01-05T00:00:00Z (12 days left)"); each adds its own advice.
    pub fn describe(&self, expiry: Expiry) -> String {
        let until = self.not_after_rfc3339();
        match expiry {
            Expiry::Valid { days_left } => format!("is valid until {until} ({days_left} days)"),
            Expiry::Expiring { days_left } => {
                format!("expires on {until} ({days_left} days left)")
            }
            Expiry::Expired => format!("expired on {until}: the hub refuses it"),
            Expiry::NotYetValid => format!(
                "is valid only from {}: the system clock or the certificate is wrong (check NTP)",
                self.not_before_rfc3339()
            ),
        }
    }

    /// The end of validity as RFC 3339 UTC, for status, the twin and messages.
    pub fn not_after_rfc3339(&self) -> String {
        rfc3339(self.not_after)
    }

    /// The start of validity as RFC 3339 UTC.
    pub fn not_before_rfc3339(&self) -> String {
        rfc3339(self.not_before)
    }
}

fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("@{unix}"))
}

fn leaf_der(cert_chain_pem: &[u8]) -> Result<rustls_pki_types::CertificateDer<'static>, KeyError> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::pem_slice_iter(cert_chain_pem)
        .next()
        .ok_or_else(|| KeyError::Invalid("no certificate in the identity certificate file".into()))?
        .map_err(|e| KeyError::Invalid(format!("identity certificate: {e}")))
}

/// The CN of the first certificate of a PEM chain: the registration id of an X.509 device.
pub fn certificate_common_name(cert_chain_pem: &[u8]) -> Result<String, KeyError> {
    let der = leaf_der(cert_chain_pem)?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| KeyError::Invalid(format!("identity certificate: {e}")))?;
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string)
        .ok_or_else(|| KeyError::Invalid("the identity certificate has no subject CN".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const DAY: i64 = 86_400;

    #[test]
    fn expiry_is_judged_against_the_lead_time_and_the_period() {
        let v = Validity {
            not_before: 1_000,
            not_after: 1_000 + 40 * DAY,
        };
        let lead = Duration::from_secs(30 * DAY as u64);
        assert_eq!(v.at(1_000 + 5 * DAY, lead), Expiry::Valid { days_left: 35 });
        assert_eq!(
            v.at(v.not_after - 30 * DAY - 1, lead),
            Expiry::Valid { days_left: 30 }
        );
        assert_eq!(
            v.at(v.not_after - 30 * DAY, lead),
            Expiry::Expiring { days_left: 30 }
        );
        assert_eq!(
            v.at(v.not_after - 1, lead),
            Expiry::Expiring { days_left: 0 }
        );
        assert_eq!(v.at(v.not_after + 1, lead), Expiry::Expired);
        assert_eq!(v.at(999, lead), Expiry::NotYetValid);
        assert_eq!(v.at(999, lead).name(), "not-yet-valid");
    }

    #[test]
    fn the_next_change_is_the_next_state_boundary() {
        let v = Validity {
            not_before: 1_000,
            not_after: 1_000 + 40 * DAY,
        };
        let lead = Duration::from_secs(30 * DAY as u64);
        let warn_from = v.not_after - 30 * DAY;
        for (now, next) in [
            (0, Some(1_000)),
            (1_000, Some(warn_from)),
            (warn_from - 1, Some(warn_from)),
            (warn_from, Some(v.not_after + 1)),
            (v.not_after, Some(v.not_after + 1)),
            (v.not_after + 1, None),
        ] {
            assert_eq!(v.next_change(now, lead), next, "at {now}");
            // The state really changes there, and not before.
            if let Some(next) = next {
                assert_ne!(v.at(next, lead).name(), v.at(now, lead).name(), "at {now}");
                assert_eq!(
                    v.at(next - 1, lead).name(),
                    v.at(now, lead).name(),
                    "at {now}"
                );
            }
        }
    }

    #[test]
    fn the_leaf_validity_is_read_from_the_chain() {
        let mut params = rcgen::CertificateParams::new(vec!["gw-1".into()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2026, 1, 2);
        params.not_after = rcgen::date_time_ymd(2027, 3, 4);
        let key = rcgen::KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        let v = Validity::of_leaf(pem.as_bytes()).unwrap();
        assert_eq!(v.not_before_rfc3339(), "2026-01-02T00:00:00Z");
        assert_eq!(v.not_after_rfc3339(), "2027-03-04T00:00:00Z");
        let err = Validity::of_leaf(b"no pem here").unwrap_err().to_string();
        assert!(err.contains("no certificate"), "{err}");
    }
}
