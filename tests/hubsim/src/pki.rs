//! The development PKI: a root CA and a TLS server certificate created on first start and kept in
//! the state dir, and `hubsim certs` for device certificates (X.509 attestation tests).
//! OWNER: hubsim-logic helper.

use std::path::{Path, PathBuf};

/// Files of the server PKI in a state dir (see docs/hubsim.md).
#[derive(Debug, Clone)]
pub struct ServerPki {
    pub ca_pem_path: PathBuf,
    /// PEM chain of the server certificate (leaf, then CA).
    pub server_cert_pem: String,
    /// PKCS#8 PEM.
    pub server_key_pem: String,
    pub ca_pem: String,
}

/// Loads `ca.pem`/`ca.key`/`server.pem`/`server.key` from `state_dir`, creating them when missing.
/// The server certificate covers localhost, 127.0.0.1, ::1 and `extra_names` (host names or IP
/// literals); it is re-issued (same CA) when a name is missing from the existing one.
pub fn load_or_create(_state_dir: &Path, _extra_names: &[String]) -> anyhow::Result<ServerPki> {
    todo!("hubsim-logic helper")
}

/// A certificate written by `hubsim certs`.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    /// `cert.pem`: the chain, leaf first, then the issuer's own `cert.pem` chain.
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    /// Upper-case hex, as the Azure portal shows.
    pub sha1_thumbprint: String,
    pub sha256_thumbprint: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertKind {
    Root,
    Intermediate,
    Device,
}

/// Issues a certificate with CN = `cn` into `out_dir` (`cert.pem`, `key.pem` mode 0600).
/// `issuer_dir` holds a previous `certs` output (root or intermediate); `None` = self-signed.
pub fn issue(
    _kind: CertKind,
    _cn: &str,
    _out_dir: &Path,
    _issuer_dir: Option<&Path>,
) -> anyhow::Result<IssuedCert> {
    todo!("hubsim-logic helper")
}

/// rustls server config: TLS 1.2 + 1.3, client certificates requested but optional (X.509 devices
/// present one; SAS devices do not). The certificate is checked by `auth`, not by rustls, because
/// the trusted CAs are the enrolled ones and change at run time.
pub fn server_tls_config(_pki: &ServerPki) -> anyhow::Result<std::sync::Arc<rustls::ServerConfig>> {
    todo!("hubsim-logic helper")
}
