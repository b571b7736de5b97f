//! Certificates issued by DPS (`[provisioning.issued_certificate]`, docs/credentials.md): a new
//! key and its certificate signing request for each renewal, and the generations of key + issued
//! chain kept in the state directory.
//!
//! Layout, under `<state_dir>/issued/`:
//!
//! - `gen-<n>/key.pem` (0600) and `gen-<n>/chain.pem` (leaf first): one generation. It is written
//!   as `.gen-<n>.tmp/`, both files fsynced, then renamed into place, so a generation directory
//!   is complete or absent; key and chain live in the same directory, so they always match.
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

use super::credential::Credential;
use super::x509::{Validity, check_x509_identity};

const CURRENT: &str = "current";
const KEY: &str = "key.pem";
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

/// A key made for one renewal, and the CSR that asks for its certificate.
pub struct NewKey {
    /// PKCS#8 PEM; never logged.
    pub key_pem: Zeroizing<String>,
    /// The PKCS#10 request, base64 DER as the DPS registration carries it.
    pub csr_base64: String,
}

/// A new ECDSA P-256 key (in memory: it reaches the disk only with its issued chain) and a CSR
/// with CN = the registration id, as DPS expects.
pub fn new_key(registration_id: &str) -> Result<NewKey, IssuedError> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| IssuedError::Key(e.to_string()))?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
        .map_err(|e| IssuedError::Key(e.to_string()))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, registration_id);
    let csr = params
        .serialize_request(&key)
        .map_err(|e| IssuedError::Key(e.to_string()))?;
    Ok(NewKey {
        key_pem: Zeroizing::new(key.serialize_pem()),
        csr_base64: B64.encode(csr.der()),
    })
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
    pub fn newest(&self) -> Result<Option<Generation>, IssuedError> {
        match self.numbers()?.last() {
            Some(&number) => self.load(number).map(Some),
            None => Ok(None),
        }
    }

    fn load(&self, number: u64) -> Result<Generation, IssuedError> {
        let dir = self.generation_dir(number);
        let (key_path, chain_path) = (dir.join(KEY), dir.join(CHAIN));
        let key_pem = Zeroizing::new(std::fs::read(&key_path).map_err(io(&key_path))?);
        let chain_pem = std::fs::read(&chain_path).map_err(io(&chain_path))?;
        // Refuses a key that does not belong to the leaf; expiry is the daemon's to report.
        check_x509_identity(&chain_path, &chain_pem, &key_path, &key_pem).map_err(|e| {
            IssuedError::Invalid {
                path: dir.clone(),
                message: e.to_string(),
            }
        })?;
        let validity = Validity::of_leaf(&chain_pem).map_err(|e| IssuedError::Invalid {
            path: chain_path.clone(),
            message: e.to_string(),
        })?;
        Ok(Generation {
            number,
            credential: Credential::X509 {
                cert_chain_pem: Arc::new(chain_pem),
                key_pem: Arc::new(key_pem),
            },
            validity,
        })
    }

    /// Stores a key and its issued chain (DER, leaf first) as the next generation: written
    /// aside, fsynced, then renamed into place. `current` does not move (see `promote`).
    pub fn save(&self, key_pem: &str, chain_der: &[Vec<u8>]) -> Result<Generation, IssuedError> {
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
        write_synced(&staging.join(KEY), key_pem.as_bytes())?;
        write_synced(&staging.join(CHAIN), chain_pem(chain_der).as_bytes())?;
        sync_dir(&staging)?;
        crate::util::test_hook::abort_at("issued-staged");
        let target = self.generation_dir(number);
        std::fs::rename(&staging, &target).map_err(io(&target))?;
        sync_dir(&self.dir)?;
        self.load(number)
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
        let key = new_key("dev-7").unwrap();
        let der = B64.decode(&key.csr_base64).unwrap();
        let (_, csr) =
            x509_parser::certification_request::X509CertificationRequest::from_der(&der).unwrap();
        assert_eq!(
            csr.certification_request_info.subject.to_string(),
            "CN=dev-7"
        );
        assert!(key.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
    }
}
