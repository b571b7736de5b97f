//! Where key material comes from and how it signs SAS tokens. The SAS signer is a trait so the TPM
//! back end (`identity::tpm`, feature `tpm`) signs inside the TPM without any key byte in the
//! agent's memory.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use zeroize::Zeroizing;

use crate::config::Secret;
use crate::util::encoding::url_encode;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::encoding::url_encode;

    const K1: &str = "NMgJDvdKTxjLi+xBxxkDDEwDJxEvOE5u8BiT0mVgPeg=";

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
}
