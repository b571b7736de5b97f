//! Authentication as the real services check it: SAS tokens (every encoding variant real clients
//! send, see docs/protocol.md §4), enrollment-group derived keys, X.509 client certificates.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ring::{digest, hmac};
use x509_parser::prelude::{FromDer, X509Certificate};

/// A parsed `SharedAccessSignature sr=…&sig=…&se=…[&skn=…]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SasToken {
    /// `sr` exactly as it appears in the token (this literal is what was signed).
    pub sr_raw: String,
    /// `sr` percent-decoded.
    pub resource: String,
    /// Signature bytes (base64-decoded, after percent-decoding).
    pub signature: Vec<u8>,
    /// Expiry, seconds since the Unix epoch.
    pub expiry: u64,
    /// Policy name (`skn`); `None` when absent or empty.
    pub key_name: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("malformed SAS token: {0}")]
    Malformed(String),
    #[error("SAS token expired at {0}")]
    Expired(u64),
    #[error("SAS token is for resource '{actual}', expected '{expected}'")]
    WrongResource { expected: String, actual: String },
    #[error("SAS signature does not match")]
    BadSignature,
    #[error("{0}")]
    Certificate(String),
}

/// Parses a SAS token (fields in any order; unknown fields are an error).
pub fn parse_sas(token: &str) -> Result<SasToken, AuthError> {
    let body = token
        .trim()
        .strip_prefix("SharedAccessSignature ")
        .ok_or_else(|| {
            AuthError::Malformed("does not start with 'SharedAccessSignature '".into())
        })?;
    let (mut sr, mut sig, mut se, mut skn) = (None, None, None, None);
    for field in body.split('&') {
        let (name, value) = field
            .split_once('=')
            .ok_or_else(|| AuthError::Malformed(format!("field '{field}' has no '='")))?;
        let slot = match name {
            "sr" => &mut sr,
            "sig" => &mut sig,
            "se" => &mut se,
            "skn" => &mut skn,
            other => return Err(AuthError::Malformed(format!("unknown field '{other}'"))),
        };
        if slot.replace(value).is_some() {
            return Err(AuthError::Malformed(format!(
                "field '{name}' appears twice"
            )));
        }
    }
    let missing = |name: &str| AuthError::Malformed(format!("field '{name}' is missing"));
    let sr_raw = sr.ok_or_else(|| missing("sr"))?;
    let sig = sig.ok_or_else(|| missing("sig"))?;
    let se = se.ok_or_else(|| missing("se"))?;
    let expiry = se
        .parse::<u64>()
        .map_err(|_| AuthError::Malformed(format!("se '{se}' is not a number of seconds")))?;
    let signature = B64
        .decode(percent_decode(sig)?.as_bytes())
        .map_err(|_| AuthError::Malformed("sig is not base64".into()))?;
    Ok(SasToken {
        sr_raw: sr_raw.to_string(),
        resource: percent_decode(sr_raw)?,
        signature,
        expiry,
        key_name: skn
            .filter(|s| !s.is_empty())
            .map(percent_decode)
            .transpose()?,
    })
}

fn percent_decode(s: &str) -> Result<String, AuthError> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| AuthError::Malformed("a field is not UTF-8 after percent-decoding".into()))
}

fn decode_key(key_b64: &str) -> Result<Vec<u8>, AuthError> {
    B64.decode(key_b64.trim())
        .map_err(|_| AuthError::Malformed("the key is not base64".into()))
}

/// Verifies signature (HMAC-SHA256 over `sr_raw + "\n" + se` with the base64 key), expiry against
/// `now` (Unix seconds) and that the decoded resource matches `expected_resource`
/// case-insensitively (prefix by path segment allowed, as Azure allows).
pub fn verify_sas(
    token: &SasToken,
    key_b64: &str,
    expected_resource: &str,
    now: u64,
) -> Result<(), AuthError> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, &decode_key(key_b64)?);
    let signed = format!("{}\n{}", token.sr_raw, token.expiry);
    hmac::verify(&key, signed.as_bytes(), &token.signature).map_err(|_| AuthError::BadSignature)?;
    if token.expiry <= now {
        return Err(AuthError::Expired(token.expiry));
    }
    if !resource_covers(&token.resource, expected_resource) {
        return Err(AuthError::WrongResource {
            expected: expected_resource.to_string(),
            actual: token.resource.clone(),
        });
    }
    Ok(())
}

/// A token for `granted` is good for `wanted` when `granted` equals it or is a prefix of it
/// ending at a path segment boundary, compared case-insensitively.
fn resource_covers(granted: &str, wanted: &str) -> bool {
    let granted = granted.trim_end_matches('/').to_ascii_lowercase();
    let wanted = wanted.to_ascii_lowercase();
    wanted == granted
        || (wanted.starts_with(&granted) && wanted.as_bytes().get(granted.len()) == Some(&b'/'))
}

/// `base64(HMAC-SHA256(base64decode(group_key), registration_id))`.
pub fn derive_device_key(group_key_b64: &str, registration_id: &str) -> Result<String, AuthError> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, &decode_key(group_key_b64)?);
    Ok(B64.encode(hmac::sign(&key, registration_id.as_bytes()).as_ref()))
}

/// Builds a SAS token as Azure's SDKs do (for `hubsim token` and tests): the resource and the
/// signature url-encoded, the signature over the encoded resource, a newline and the expiry.
pub fn make_sas(
    key_b64: &str,
    resource: &str,
    expiry: u64,
    key_name: Option<&str>,
) -> Result<String, AuthError> {
    const SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    let encode = |s: &str| percent_encoding::utf8_percent_encode(s, SET).to_string();
    let key = hmac::Key::new(hmac::HMAC_SHA256, &decode_key(key_b64)?);
    let sr = encode(resource);
    let sig = B64.encode(hmac::sign(&key, format!("{sr}\n{expiry}").as_bytes()).as_ref());
    let mut token = format!(
        "SharedAccessSignature sr={sr}&sig={}&se={expiry}",
        encode(&sig)
    );
    if let Some(name) = key_name {
        token.push_str(&format!("&skn={}", encode(name)));
    }
    Ok(token)
}

/// SHA-1 thumbprint of a DER certificate, upper-case hex as the Azure portal shows it.
pub fn sha1_thumbprint(der: &[u8]) -> String {
    hex_upper(digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, der).as_ref())
}

pub fn sha256_thumbprint(der: &[u8]) -> String {
    hex_upper(digest::digest(&digest::SHA256, der).as_ref())
}

fn hex_upper(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

fn parse_cert(der: &[u8]) -> Result<X509Certificate<'_>, AuthError> {
    X509Certificate::from_der(der)
        .map(|(_, c)| c)
        .map_err(|e| AuthError::Certificate(format!("not a DER X.509 certificate: {e}")))
}

/// The subject common name of a DER certificate.
pub fn leaf_common_name(der: &[u8]) -> Result<String, AuthError> {
    let cert = parse_cert(der)?;
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string)
        .ok_or_else(|| AuthError::Certificate("the certificate has no subject CN".into()))
}

/// `X509CertificateInfo` as DPS reports it in `registrationState.x509` and enrollments:
/// subject and issuer as `CN=…` strings, upper-case hex thumbprints and serial, RFC 3339 dates.
pub fn certificate_info(der: &[u8]) -> Result<serde_json::Value, AuthError> {
    let cert = parse_cert(der)?;
    let rfc3339 = |t: x509_parser::time::ASN1Time| {
        t.to_datetime()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    };
    Ok(serde_json::json!({
        "subjectName": cert.subject().to_string(),
        "sha1Thumbprint": sha1_thumbprint(der),
        "sha256Thumbprint": sha256_thumbprint(der),
        "issuerName": cert.issuer().to_string(),
        "notBeforeUtc": rfc3339(cert.validity().not_before),
        "notAfterUtc": rfc3339(cert.validity().not_after),
        "serialNumber": hex_upper(cert.raw_serial()),
        "version": cert.version().0 + 1,
    }))
}

/// Checks that `chain` (leaf first, DER; intermediates optional) leads to one of `trusted_ca_der`
/// (a root or an intermediate the enrollment names): signatures, validity dates, CA flags.
pub fn verify_chain(
    chain: &[Vec<u8>],
    trusted_ca_der: &[Vec<u8>],
    now: u64,
) -> Result<(), AuthError> {
    let certs: Vec<X509Certificate<'_>> = chain
        .iter()
        .map(|d| parse_cert(d))
        .collect::<Result<_, _>>()?;
    let trusted: Vec<X509Certificate<'_>> = trusted_ca_der
        .iter()
        .map(|d| parse_cert(d))
        .collect::<Result<_, _>>()?;
    let leaf = certs
        .first()
        .ok_or_else(|| AuthError::Certificate("no client certificate presented".into()))?;
    let now = i64::try_from(now).unwrap_or(i64::MAX);
    let mut current = leaf;
    // Walk up: at each step the issuer is a trusted CA (done) or the next presented certificate.
    for depth in 0..=certs.len() {
        check_validity(current, now)?;
        for ca in &trusted {
            if ca.subject() == current.issuer()
                && current.verify_signature(Some(ca.public_key())).is_ok()
            {
                // An enrolled certificate without the CA flag must not vouch for others (a device
                // certificate uploaded as a "signing certificate" would otherwise sign itself in).
                if !ca.is_ca() {
                    return Err(AuthError::Certificate(format!(
                        "enrolled certificate '{}' is not a CA",
                        ca.subject()
                    )));
                }
                check_validity(ca, now)?;
                return Ok(());
            }
        }
        let Some(next) = certs.get(depth + 1) else {
            break;
        };
        if next.subject() != current.issuer() {
            return Err(AuthError::Certificate(format!(
                "chain is out of order: '{}' was not issued by '{}'",
                current.subject(),
                next.subject()
            )));
        }
        if !next.is_ca() {
            return Err(AuthError::Certificate(format!(
                "'{}' is not a CA but issued '{}'",
                next.subject(),
                current.subject()
            )));
        }
        current
            .verify_signature(Some(next.public_key()))
            .map_err(|_| {
                AuthError::Certificate(format!("bad signature on '{}'", current.subject()))
            })?;
        current = next;
    }
    Err(AuthError::Certificate(format!(
        "certificate '{}' does not chain to an enrolled CA",
        leaf.subject()
    )))
}

fn check_validity(cert: &X509Certificate<'_>, now: i64) -> Result<(), AuthError> {
    let validity = cert.validity();
    if now < validity.not_before.timestamp() || now > validity.not_after.timestamp() {
        return Err(AuthError::Certificate(format!(
            "certificate '{}' is not valid now (valid {} to {})",
            cert.subject(),
            validity.not_before,
            validity.not_after
        )));
    }
    Ok(())
}

/// The IoT Hub CONNECT check for `device_id` in `hub`: SAS signed with the device's key for
/// `{hub}/devices/{deviceId}` (returns the token expiry), or an X.509 certificate matching the
/// device's thumbprint / chaining to its CA (returns `None`). `Err` names the reason.
pub fn authenticate_hub_device(
    sim: &crate::state::Sim,
    hub: &str,
    device_id: &str,
    cred: &crate::dps::DeviceCredential,
    now: u64,
) -> Result<Option<u64>, String> {
    use crate::dps::DeviceCredential;
    let key = crate::state::Store::device_key(hub, device_id);
    let (device, ca_certs) = sim.read(|s| {
        let device = s.devices.get(&key).cloned();
        // A device provisioned through an X.509 group chains to that group's CA; one created
        // through the service API (no group) may chain to any enrolled group CA, as a hub trusts
        // every CA certificate uploaded to it.
        let ca = match device.as_ref().map(|d| d.ca_group.as_ref()) {
            Some(Some(group)) => s
                .groups
                .get(group)
                .map(|g| crate::dps::signing_certificates(&g.common))
                .unwrap_or_default(),
            _ => s
                .groups
                .values()
                .flat_map(|g| crate::dps::signing_certificates(&g.common))
                .collect(),
        };
        (device, ca)
    });
    let device = device.ok_or_else(|| format!("device '{device_id}' does not exist in {hub}"))?;
    if device.status == crate::state::Status::Disabled {
        return Err(format!("device '{device_id}' is disabled"));
    }
    let auth = &device.authentication;
    match cred {
        DeviceCredential::Sas(token) => {
            let token = parse_sas(token).map_err(|e| e.to_string())?;
            if token.key_name.is_some() {
                return Err("policy tokens (skn) are not accepted for device connections".into());
            }
            let keys = auth
                .symmetric_key
                .as_ref()
                .ok_or_else(|| format!("device '{device_id}' does not use SAS authentication"))?;
            let resource = format!("{hub}/devices/{device_id}");
            let primary = verify_sas(&token, &keys.primary_key, &resource, now);
            match primary {
                Err(AuthError::BadSignature) => {
                    verify_sas(&token, &keys.secondary_key, &resource, now)
                }
                other => other,
            }
            .map_err(|e| e.to_string())?;
            Ok(Some(token.expiry))
        }
        DeviceCredential::X509(chain) => {
            let leaf = chain.first().ok_or("no client certificate")?;
            match auth.kind.as_str() {
                "selfSigned" => {
                    let prints = auth
                        .x509_thumbprint
                        .as_ref()
                        .ok_or("device has no registered thumbprint")?;
                    let (sha1, sha256) = (sha1_thumbprint(leaf), sha256_thumbprint(leaf));
                    let matches = [&prints.primary_thumbprint, &prints.secondary_thumbprint]
                        .into_iter()
                        .flatten()
                        .any(|p| p.eq_ignore_ascii_case(&sha1) || p.eq_ignore_ascii_case(&sha256));
                    if !matches {
                        return Err("certificate thumbprint does not match the device's".into());
                    }
                    // Thumbprint authentication checks the dates too, nothing else.
                    let cert = parse_cert(leaf).map_err(|e| e.to_string())?;
                    check_validity(&cert, i64::try_from(now).unwrap_or(i64::MAX))
                        .map_err(|e| e.to_string())?;
                    Ok(None)
                }
                "certificateAuthority" => {
                    let cn = leaf_common_name(leaf).map_err(|e| e.to_string())?;
                    if cn != device_id {
                        return Err(format!("certificate CN '{cn}' is not the device id"));
                    }
                    verify_chain(chain, &ca_certs, now).map_err(|e| e.to_string())?;
                    Ok(None)
                }
                other => Err(format!(
                    "device '{device_id}' uses {other} authentication, not a certificate"
                )),
            }
        }
        DeviceCredential::None => {
            Err("no credentials (neither SAS password nor certificate)".into())
        }
    }
}

/// Current Unix time in seconds.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "NMgJDvdKTxjLi+xBxxkDDEwDJxEvOE5u8BiT0mVgPeg=";

    #[test]
    fn python_sdk_dps_token_verifies() {
        let token = parse_sas("SharedAccessSignature sr=0neFEEDC0DE%2Fregistrations%2FmyRegistrationId&sig=%2Ft1VzEUrQ62f%2BJ%2B7chJSaFx3rh6pGwFWik1rI4kqc7E%3D&se=1578941692").unwrap();
        assert_eq!(token.resource, "0neFEEDC0DE/registrations/myRegistrationId");
        verify_sas(
            &token,
            K1,
            "0nefeedc0de/registrations/MYREGISTRATIONID",
            1_578_941_000,
        )
        .unwrap();
        assert_eq!(
            verify_sas(
                &token,
                K1,
                "0neFEEDC0DE/registrations/myRegistrationId",
                1_578_941_692
            ),
            Err(AuthError::Expired(1_578_941_692))
        );
        assert!(matches!(
            verify_sas(&token, K1, "0neFEEDC0DE/registrations/other", 0),
            Err(AuthError::WrongResource { .. })
        ));
    }

    #[test]
    fn the_literal_sr_is_what_was_signed() {
        // Lower-case %2f (C SDK style) with the signature of the upper-case form must fail…
        let token = parse_sas("SharedAccessSignature sr=0neFEEDC0DE%2fregistrations%2fmyRegistrationId&sig=%2Ft1VzEUrQ62f%2BJ%2B7chJSaFx3rh6pGwFWik1rI4kqc7E%3D&se=1578941692").unwrap();
        assert_eq!(
            verify_sas(&token, K1, "0neFEEDC0DE/registrations/myRegistrationId", 0),
            Err(AuthError::BadSignature)
        );
        // …and pass with its own signature, given lower-case escapes in sig too, fields reordered.
        let token = parse_sas("SharedAccessSignature sig=9ElmiQtRHaJo7RnzVGdIHFyBOY3rYMUQXVSzqaJhJ4s%3d&se=1578941692&skn=registration&sr=0neFEEDC0DE%2fregistrations%2fmyRegistrationId").unwrap();
        verify_sas(&token, K1, "0neFEEDC0DE/registrations/myRegistrationId", 0).unwrap();
        assert_eq!(token.key_name.as_deref(), Some("registration"));
    }

    #[test]
    fn hub_token_from_the_docs_verifies() {
        let token = parse_sas("SharedAccessSignature sr=MyExampleHub.azure-devices.net%2Fdevices%2Fmy-symkey-device&sig=f%2BwW8XOKeJOtiPc9Iwjc4OpExvPM7NlhM9qxN2a1aAM%3D&se=1663119026").unwrap();
        verify_sas(
            &token,
            "18RQk/hOPJR9EbsJlk2j8WA6vWaj/yi+oaYg7zmxfQNdOyMSu+SJ8O7TSlZhDJCYmn4rzEiVKIzNiVAWjLxrGA==",
            "myexamplehub.azure-devices.net/devices/my-symkey-device",
            0,
        )
        .unwrap();
    }

    #[test]
    fn unencoded_sr_and_empty_skn_are_accepted() {
        // C SDK hub tokens carry the resource raw and TPM tokens an empty skn.
        let key = hmac::Key::new(hmac::HMAC_SHA256, &B64.decode(K1).unwrap());
        let sig = B64.encode(hmac::sign(&key, b"hub/devices/d1\n99").as_ref());
        let token = parse_sas(&format!(
            "SharedAccessSignature sr=hub/devices/d1&sig={sig}&se=99&skn="
        ))
        .unwrap();
        assert_eq!(token.key_name, None);
        verify_sas(&token, K1, "hub/devices/d1", 0).unwrap();
    }

    #[test]
    fn malformed_tokens_name_the_problem() {
        for (token, needle) in [
            ("Bearer x", "SharedAccessSignature"),
            ("SharedAccessSignature sr=a&se=1", "sig"),
            ("SharedAccessSignature sr=a&sig=AA%3D%3D&se=soon", "se"),
            (
                "SharedAccessSignature sr=a&sig=AA%3D%3D&se=1&foo=bar",
                "foo",
            ),
        ] {
            let err = parse_sas(token).unwrap_err().to_string();
            assert!(err.contains(needle), "{token}: {err}");
        }
    }

    #[test]
    fn derived_keys_match_published_vectors() {
        assert_eq!(
            derive_device_key(
                "8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE/+ah/lSh3lF8e2YG1Te7w1KpZhJFFXJrqYKi9yegxkqIChbqOS9Egw==",
                "sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6"
            )
            .unwrap(),
            "Jsm0lyGpjaVYVP2g3FnmnmG9dI/9qU24wNoykUmermc="
        );
        assert_eq!(
            derive_device_key(
                "oiK77Oy7rBw8YB6IS6ukRChAw+Yq6GC61RMrPLSTiOOtdI+XDu0LmLuNm11p+qv2I+adqGUdZHm46zXAQdZoOA==",
                "mainbuilding167-contoso-hpsd-088"
            )
            .unwrap(),
            "6uejA9PfkQgmYylj8Zerp3kcbeVrGZ172YLa7VSnJzg="
        );
    }

    #[test]
    fn sdk_vectors_of_the_protocol_reference_verify() {
        // (token, key, resource the service expects)
        let derived = derive_device_key(
            "8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE/+ah/lSh3lF8e2YG1Te7w1KpZhJFFXJrqYKi9yegxkqIChbqOS9Egw==",
            "sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6",
        )
        .unwrap();
        let cases = [
            (
                "SharedAccessSignature sr=myiothub.azure-devices.net%2Fdevices%2Fmy_device&sig=dIMMdDDBGFR8eqAfYkiMxoOphaFMPtMgj7Wg%2FYB1AvU%3D&se=1578941692".to_string(),
                K1.to_string(),
                "MyIotHub.azure-devices.net/devices/my_device",
            ),
            (
                "SharedAccessSignature sr=myiothub.azure-devices.net%2Fdevices%2Fmy_device%2Fmodules%2Fmy_module&sig=iAQRxkGTvQpFKsLRYZsj0xf8UcgKBbNZhWDb5pCSK9o%3D&se=1578941692".to_string(),
                K1.to_string(),
                "myiothub.azure-devices.net/devices/my_device/modules/my_module",
            ),
            (
                "SharedAccessSignature sr=0ne00111111%2Fregistrations%2Fsn-007-888-abc-mac-a1-b2-c3-d4-e5-f6&sig=2srIk05%2FHc3kiyY2AcAwJosiRYk6C6jOscAYhKLO2L8%3D&se=1700000000".to_string(),
                derived,
                "0ne00111111/registrations/sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6",
            ),
            (
                // Node's order (skn before se) with an encoded policy name.
                "SharedAccessSignature sr=uri&sig=kcWxXAK2OAaAoq2oCkaGzX2NMqDB8nCyNuq2fPYCDhk%3D&skn=encode%28%27Me%27%29&se=12345".to_string(),
                "cGFzc3dvcmQ=".to_string(),
                "uri",
            ),
            (
                // The signature not percent-encoded at all ('+', '/' and '=' raw).
                "SharedAccessSignature sr=0neFEEDC0DE%2Fregistrations%2FmyRegistrationId&sig=/t1VzEUrQ62f+J+7chJSaFx3rh6pGwFWik1rI4kqc7E=&se=1578941692&skn=registration".to_string(),
                K1.to_string(),
                "0neFEEDC0DE/registrations/myRegistrationId",
            ),
        ];
        for (token, key, resource) in cases {
            let parsed = parse_sas(&token).unwrap();
            verify_sas(&parsed, &key, resource, 0).unwrap_or_else(|e| panic!("{token}: {e}"));
        }
        let node = parse_sas("SharedAccessSignature sr=uri&sig=kcWxXAK2OAaAoq2oCkaGzX2NMqDB8nCyNuq2fPYCDhk%3D&skn=encode%28%27Me%27%29&se=12345").unwrap();
        assert_eq!(node.key_name.as_deref(), Some("encode('Me')"));
        assert_eq!(node.expiry, 12345);
        // The module token does not cover the parent device, nor a sibling device.
        let module = parse_sas(
            "SharedAccessSignature sr=myiothub.azure-devices.net%2Fdevices%2Fmy_device%2Fmodules%2Fmy_module&sig=iAQRxkGTvQpFKsLRYZsj0xf8UcgKBbNZhWDb5pCSK9o%3D&se=1578941692"
        )
        .unwrap();
        assert!(matches!(
            verify_sas(
                &module,
                K1,
                "myiothub.azure-devices.net/devices/my_device",
                0
            ),
            Err(AuthError::WrongResource { .. })
        ));
        // A device token covers paths below the device, by whole segments only.
        let device = parse_sas("SharedAccessSignature sr=myiothub.azure-devices.net%2Fdevices%2Fmy_device&sig=dIMMdDDBGFR8eqAfYkiMxoOphaFMPtMgj7Wg%2FYB1AvU%3D&se=1578941692").unwrap();
        verify_sas(
            &device,
            K1,
            "myiothub.azure-devices.net/devices/my_device/modules/m",
            0,
        )
        .unwrap();
        assert!(matches!(
            verify_sas(
                &device,
                K1,
                "myiothub.azure-devices.net/devices/my_device2",
                0
            ),
            Err(AuthError::WrongResource { .. })
        ));
    }

    #[test]
    fn lower_cased_unencoded_resource_verifies_against_the_mixed_case_one() {
        // aziot-identity-service style: the whole URI lower-cased, '/' not encoded.
        let key = hmac::Key::new(hmac::HMAC_SHA256, &B64.decode(K1).unwrap());
        let sr = "0nefeedc0de/registrations/myregistrationid";
        let sig = B64.encode(hmac::sign(&key, format!("{sr}\n1578941692").as_bytes()).as_ref());
        let sig: String =
            percent_encoding::utf8_percent_encode(&sig, percent_encoding::NON_ALPHANUMERIC)
                .collect::<String>()
                .replace("%2B", "%2b")
                .replace("%2F", "%2f")
                .replace("%3D", "%3d");
        let token = parse_sas(&format!(
            "SharedAccessSignature sr={sr}&sig={sig}&se=1578941692&skn=registration"
        ))
        .unwrap();
        verify_sas(&token, K1, "0neFEEDC0DE/registrations/myRegistrationId", 0).unwrap();
        // Wrong key: the signature check fails before anything else is said.
        assert_eq!(
            verify_sas(
                &token,
                "cGFzc3dvcmQ=",
                "0neFEEDC0DE/registrations/myRegistrationId",
                0
            ),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn thumbprints_are_upper_case_hex_of_the_der() {
        assert_eq!(
            sha1_thumbprint(b"abc"),
            "A9993E364706816ABA3E25717850C26C9CD0D89D"
        );
        assert_eq!(
            sha256_thumbprint(b"abc"),
            "BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD"
        );
    }

    /// Reads the certificates of a `hubsim certs` output, leaf first.
    fn chain_of(cert: &crate::pki::IssuedCert) -> Vec<Vec<u8>> {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::CertificateDer::pem_file_iter(&cert.cert_path)
            .unwrap()
            .map(|c| c.unwrap().to_vec())
            .collect()
    }

    #[test]
    fn chains_are_refused_for_dates_non_ca_issuers_and_strangers() {
        use crate::pki::{CertKind, issue};
        let dir = tempfile::tempdir().unwrap();
        let d = |name: &str| dir.path().join(name);
        let root = chain_of(&issue(CertKind::Root, "Root A", &d("root"), None).unwrap());
        let inter = chain_of(
            &issue(
                CertKind::Intermediate,
                "Inter A",
                &d("inter"),
                Some(&d("root")),
            )
            .unwrap(),
        );
        let dev =
            chain_of(&issue(CertKind::Device, "dev-1", &d("dev"), Some(&d("inter"))).unwrap());
        let now = unix_now();
        // Intermediates may be sent or omitted; the trusted CA may be root or intermediate.
        verify_chain(&dev, std::slice::from_ref(&root[0]), now).unwrap();
        verify_chain(&dev[..2], std::slice::from_ref(&root[0]), now).unwrap();
        verify_chain(&dev[..1], std::slice::from_ref(&inter[0]), now).unwrap();
        // Without the intermediate the root cannot be reached.
        let err = verify_chain(&dev[..1], std::slice::from_ref(&root[0]), now).unwrap_err();
        assert!(err.to_string().contains("does not chain"), "{err}");
        // Twenty years on, nothing is valid any more.
        let err =
            verify_chain(&dev, std::slice::from_ref(&root[0]), now + 20 * 365 * 86400).unwrap_err();
        assert!(err.to_string().contains("not valid now"), "{err}");
        // A root with the same name but another key does not verify the signatures.
        let other = chain_of(&issue(CertKind::Root, "Root A", &d("other"), None).unwrap());
        assert!(verify_chain(&dev, std::slice::from_ref(&other[0]), now).is_err());
        // Out of order.
        let swapped = vec![dev[0].clone(), dev[2].clone(), dev[1].clone()];
        let err = verify_chain(&swapped, std::slice::from_ref(&root[0]), now).unwrap_err();
        assert!(err.to_string().contains("out of order"), "{err}");
        assert!(verify_chain(&[], std::slice::from_ref(&root[0]), now).is_err());
        // A device certificate cannot act as a CA, presented or enrolled.
        let fake_ca = chain_of(&issue(CertKind::Device, "not-a-ca", &d("fake"), None).unwrap());
        let under =
            chain_of(&issue(CertKind::Device, "dev-2", &d("under"), Some(&d("fake"))).unwrap());
        let err = verify_chain(&under[..1], std::slice::from_ref(&fake_ca[0]), now).unwrap_err();
        assert!(err.to_string().contains("not a CA"), "{err}");
        let err = verify_chain(&fake_ca, std::slice::from_ref(&fake_ca[0]), now).unwrap_err();
        assert!(err.to_string().contains("not a CA"), "{err}");
        assert_eq!(leaf_common_name(&under[0]).unwrap(), "dev-2");
        assert!(leaf_common_name(b"junk").is_err());
    }
}
