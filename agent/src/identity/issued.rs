//! Certificates issued by DPS (`[provisioning.issued_certificate]`, docs/credentials.md): a new
//! key and its certificate signing request for each renewal, and the generations of key + issued
//! chain kept in the state directory.
//!
//! Layout, under `<state_dir>/issued/`:
//!
//! - `gen-<n>/chain.pem` (leaf first) and its key: `gen-<n>/key.pem` (0600) with
//!   `key = "file"`, or with `key = "tpm"` the TPM key's blobs `gen-<n>/tpm-key.pub`
//!   (TPM2B_PUBLIC) and `gen-<n>/tpm-key.priv` (TPM2B_PRIVATE, the private key encrypted by the
//!   TPM's storage root key: only that TPM can use it). One generation. It is written as
//!   `.gen-<n>.tmp/`, every file fsynced, then renamed into place, so a generation directory is
//!   complete or absent; key and chain live in the same directory, so they always match.
//! - `current` → `gen-<n>`: a symlink naming the generation that last connected to the hub,
//!   replaced atomically (a new symlink renamed over it). Older generations are removed only
//!   after a newer one has connected and become `current`.
//!
//! The agent presents the newest complete generation: after a renewal that wrote `gen-<n+1>` but
//! was killed before connecting, the restarted agent tries it first (DPS has already given the
//! hub its certificate); `current` moves to it once it connects.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use zeroize::Zeroizing;

use super::credential::{Credential, PrivateKey};
use super::x509::{Validity, check_x509_identity};
use crate::config::{Config, IssuedKeyStore};

const CURRENT: &str = "current";
const KEY: &str = "key.pem";
const TPM_PUBLIC: &str = "tpm-key.pub";
#[cfg(feature = "tpm")]
const TPM_PRIVATE: &str = "tpm-key.priv";
const CHAIN: &str = "chain.pem";

#[derive(Debug, thiserror::Error)]
pub enum IssuedError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("making the key and certificate signing request: {0}")]
    Key(String),
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IssuedError + '_ {
    move |source| IssuedError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where the keys of issued certificates are made and kept (`[provisioning.issued_certificate]
/// key`), with what reaching the TPM takes.
#[derive(Debug, Clone)]
pub enum KeyHome {
    File,
    #[cfg(feature = "tpm")]
    Tpm {
        tcti: String,
        auth: super::tpm::HierarchyAuth,
    },
}

impl KeyHome {
    /// The configuration's choice (`File` without `[provisioning.issued_certificate]`). The TPM's
    /// owner authorization is the attestation's `owner_auth` with TPM attestation, else empty
    /// (a persistent SRK at 0x81000001 needs none).
    pub fn of(config: &Config) -> Result<KeyHome, IssuedError> {
        match config.provisioning.issued_key_store() {
            None | Some(IssuedKeyStore::File) => Ok(KeyHome::File),
            #[cfg(feature = "tpm")]
            Some(IssuedKeyStore::Tpm) => {
                let auth = match &config.provisioning.attestation {
                    Some(crate::config::Attestation::Tpm { owner_auth, .. }) => {
                        super::tpm::HierarchyAuth::from_secrets(owner_auth.as_ref(), None)
                            .map_err(|e| IssuedError::Key(e.to_string()))?
                    }
                    _ => super::tpm::HierarchyAuth::EMPTY,
                };
                Ok(KeyHome::Tpm {
                    tcti: config.provisioning.issued_key_tcti(),
                    auth,
                })
            }
            #[cfg(not(feature = "tpm"))]
            Some(IssuedKeyStore::Tpm) => Err(IssuedError::Key(
                "key = \"tpm\" needs a hubagent built with TPM support (cargo feature `tpm`)"
                    .into(),
            )),
        }
    }
}

/// The key of a new generation, as it will be stored.
pub enum NewKeyMaterial {
    /// PKCS#8 PEM; never logged.
    Pem(Zeroizing<String>),
    /// Made by the TPM; only its blobs leave it.
    #[cfg(feature = "tpm")]
    Tpm(Arc<super::tpm::ecc_key::EccKey>),
}

/// A key made for one renewal, and the CSR that asks for its certificate.
pub struct NewKey {
    pub material: NewKeyMaterial,
    /// The PKCS#10 request, base64 DER as the DPS registration carries it.
    pub csr_base64: String,
}

/// The request DPS expects: CN = the registration id, signed by `key`.
fn csr(registration_id: &str, key: &impl rcgen::SigningKey) -> Result<String, IssuedError> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
        .map_err(|e| IssuedError::Key(e.to_string()))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, registration_id);
    let csr = params
        .serialize_request(key)
        .map_err(|e| IssuedError::Key(e.to_string()))?;
    Ok(B64.encode(csr.der()))
}

/// A new ECDSA P-256 key and its CSR. In a file's case the key stays in memory: it reaches the
/// disk only with its issued chain. In the TPM's case the TPM generates it and signs the CSR;
/// the agent holds only its blobs. Blocking (TPM calls).
pub fn new_key(registration_id: &str, home: &KeyHome) -> Result<NewKey, IssuedError> {
    match home {
        KeyHome::File => {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                .map_err(|e| IssuedError::Key(e.to_string()))?;
            Ok(NewKey {
                csr_base64: csr(registration_id, &key)?,
                material: NewKeyMaterial::Pem(Zeroizing::new(key.serialize_pem())),
            })
        }
        #[cfg(feature = "tpm")]
        KeyHome::Tpm { tcti, auth } => {
            let key = super::tpm::ecc_key::EccKey::create(tcti, auth)
                .map_err(|e| IssuedError::Key(format!("in the TPM: {e}")))?;
            Ok(NewKey {
                csr_base64: csr(registration_id, &key)?,
                material: NewKeyMaterial::Tpm(Arc::new(key)),
            })
        }
    }
}

/// One stored generation, loaded and checked (the key belongs to the leaf).
#[derive(Clone)]
pub struct Generation {
    pub number: u64,
    pub credential: Credential,
    pub validity: Validity,
}

impl std::fmt::Debug for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Generation({})", self.number)
    }
}

impl Generation {
    /// When to renew: `renew_at` of the way from the leaf's start to its end (Unix seconds).
    pub fn renew_time(&self, renew_at: f64) -> i64 {
        let lifetime = (self.validity.not_after - self.validity.not_before).max(0) as f64;
        self.validity.not_before + (lifetime * renew_at) as i64
    }
}

/// The generations under `<state_dir>/issued`.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn new(state_dir: &Path) -> Store {
        Store {
            dir: state_dir.join("issued"),
        }
    }

    fn generation_dir(&self, number: u64) -> PathBuf {
        self.dir.join(format!("gen-{number}"))
    }

    /// The numbers of the complete generations, ascending.
    fn numbers(&self) -> Result<Vec<u64>, IssuedError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&self.dir)(e)),
        };
        let mut numbers: Vec<u64> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_prefix("gen-")?
                    .parse::<u64>()
                    .ok()
            })
            .collect();
        numbers.sort_unstable();
        Ok(numbers)
    }

    /// The generation `current` names (the one that last connected), if any.
    pub fn current(&self) -> Option<u64> {
        let target = std::fs::read_link(self.dir.join(CURRENT)).ok()?;
        target.to_str()?.strip_prefix("gen-")?.parse().ok()
    }

    /// The newest complete generation, loaded; `None` before the first issuance.
    pub fn newest(&self, home: &KeyHome) -> Result<Option<Generation>, IssuedError> {
        match self.numbers()?.last() {
            Some(&number) => self.load(number, home).map(Some),
            None => Ok(None),
        }
    }

    fn load(&self, number: u64, home: &KeyHome) -> Result<Generation, IssuedError> {
        let dir = self.generation_dir(number);
        let chain_path = dir.join(CHAIN);
        let chain_pem = std::fs::read(&chain_path).map_err(io(&chain_path))?;
        let invalid = |message: String| IssuedError::Invalid {
            path: dir.clone(),
            message,
        };
        // Refuses a key that does not belong to the leaf; expiry is the daemon's to report.
        let key = if dir.join(TPM_PUBLIC).exists() {
            self.load_tpm_key(&dir, &chain_path, &chain_pem, home)?
        } else {
            if !matches!(home, KeyHome::File) {
                return Err(invalid(
                    "its key is in a file, and key = \"tpm\" wants it in the TPM: DPS issues a new one".into(),
                ));
            }
            let key_path = dir.join(KEY);
            let key_pem = Zeroizing::new(std::fs::read(&key_path).map_err(io(&key_path))?);
            check_x509_identity(&chain_path, &chain_pem, &key_path, &key_pem)
                .map_err(|e| invalid(e.to_string()))?;
            PrivateKey::Pem(Arc::new(key_pem))
        };
        let validity = Validity::of_leaf(&chain_pem).map_err(|e| IssuedError::Invalid {
            path: chain_path.clone(),
            message: e.to_string(),
        })?;
        Ok(Generation {
            number,
            credential: Credential::X509 {
                cert_chain_pem: Arc::new(chain_pem),
                key,
            },
            validity,
        })
    }

    /// A generation's TPM key: its blobs parse, its public key is the leaf's, and the TPM can
    /// load it (it is this TPM's, which has not been cleared since).
    fn load_tpm_key(
        &self,
        dir: &Path,
        chain_path: &Path,
        chain_pem: &[u8],
        home: &KeyHome,
    ) -> Result<PrivateKey, IssuedError> {
        let invalid = |message: String| IssuedError::Invalid {
            path: dir.to_path_buf(),
            message,
        };
        #[cfg(feature = "tpm")]
        if let KeyHome::Tpm { tcti, auth } = home {
            let read = |name: &str| {
                let path = dir.join(name);
                std::fs::read(&path).map_err(io(&path))
            };
            let key = super::tpm::ecc_key::EccKey::from_blobs(
                tcti,
                auth,
                &read(TPM_PUBLIC)?,
                &read(TPM_PRIVATE)?,
            )
            .map_err(|e| invalid(e.to_string()))?;
            let (leaf_spki, _) = super::x509::check_chain(chain_path, chain_pem)
                .map_err(|e| invalid(e.to_string()))?;
            if leaf_spki != key.subject_public_key_info() {
                return Err(invalid(
                    "the TPM key does not belong to the certificate".into(),
                ));
            }
            key.check().map_err(|e| invalid(e.to_string()))?;
            return Ok(PrivateKey::Tpm(Arc::new(key)));
        }
        let _ = (chain_path, chain_pem, home);
        Err(invalid(
            "its key is in the TPM, and key = \"file\" wants it in a file: DPS issues a new one"
                .into(),
        ))
    }

    /// Stores a key and its issued chain (DER, leaf first) as the next generation: written
    /// aside, fsynced, then renamed into place. `current` does not move (see `promote`).
    pub fn save(
        &self,
        key: &NewKeyMaterial,
        chain_der: &[Vec<u8>],
        home: &KeyHome,
    ) -> Result<Generation, IssuedError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(io(&self.dir))?;
        let number = self.numbers()?.last().map_or(1, |n| n + 1);
        let staging = self.dir.join(format!(".gen-{number}.tmp"));
        // A leftover of a renewal killed while writing.
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&staging)
            .map_err(io(&staging))?;
        match key {
            NewKeyMaterial::Pem(pem) => write_synced(&staging.join(KEY), pem.as_bytes())?,
            #[cfg(feature = "tpm")]
            NewKeyMaterial::Tpm(key) => {
                let public = key
                    .public_blob()
                    .map_err(|e| IssuedError::Key(e.to_string()))?;
                write_synced(&staging.join(TPM_PUBLIC), &public)?;
                write_synced(&staging.join(TPM_PRIVATE), &key.private_blob())?;
            }
        }
        write_synced(&staging.join(CHAIN), chain_pem(chain_der).as_bytes())?;
        sync_dir(&staging)?;
        crate::util::test_hook::abort_at("issued-staged");
        let target = self.generation_dir(number);
        std::fs::rename(&staging, &target).map_err(io(&target))?;
        sync_dir(&self.dir)?;
        self.load(number, home)
    }

    /// Makes generation `number` the current one (it has connected to the hub): a new symlink
    /// renamed over `current`, then the older generations are removed.
    pub fn promote(&self, number: u64) -> Result<(), IssuedError> {
        let link = self.dir.join(CURRENT);
        let staging = self.dir.join(".current.tmp");
        let _ = std::fs::remove_file(&staging);
        std::os::unix::fs::symlink(format!("gen-{number}"), &staging).map_err(io(&staging))?;
        std::fs::rename(&staging, &link).map_err(io(&link))?;
        sync_dir(&self.dir)?;
        for older in self.numbers()?.into_iter().filter(|n| *n < number) {
            let dir = self.generation_dir(older);
            std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
        }
        Ok(())
    }
}

/// DER certificates → PEM, in order.
fn chain_pem(chain_der: &[Vec<u8>]) -> String {
    let mut pem = String::new();
    for der in chain_der {
        pem.push_str("-----BEGIN CERTIFICATE-----\n");
        let text = B64.encode(der);
        for line in text.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(line).unwrap_or_default());
            pem.push('\n');
        }
        pem.push_str("-----END CERTIFICATE-----\n");
    }
    pem
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), IssuedError> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(io(path))
}

fn sync_dir(path: &Path) -> Result<(), IssuedError> {
    std::fs::File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_csr_names_the_registration_id() {
        use x509_parser::prelude::FromDer;
        let key = new_key("dev-7", &KeyHome::File).unwrap();
        let der = B64.decode(&key.csr_base64).unwrap();
        let (_, csr) =
            x509_parser::certification_request::X509CertificationRequest::from_der(&der).unwrap();
        assert_eq!(
            csr.certification_request_info.subject.to_string(),
            "CN=dev-7"
        );
        match &key.material {
            NewKeyMaterial::Pem(pem) => assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----")),
            #[cfg(feature = "tpm")]
            NewKeyMaterial::Tpm(_) => panic!("not a file key"),
        }
    }
}
