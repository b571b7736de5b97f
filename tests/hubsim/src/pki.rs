//! The development PKI: a root CA and a TLS server certificate created on first start and kept in
//! the state dir, and `hubsim certs` for device certificates (X.509 attestation tests).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::DigitallySignedStruct;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use time::{Duration, OffsetDateTime};

/// How hubsim's TLS server presents itself (docs/hubsim.md, "TLS").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TlsProfile {
    /// As DPS and IoT Hub serve today: an RSA-2048 server certificate, TLS 1.2 only, ECDHE-RSA
    /// AES-GCM suites (Azure's recommended ones that rustls implements).
    #[default]
    Azure,
    /// An ECDSA P-256 server certificate, TLS 1.3 and 1.2 (what hubsim served before the Azure
    /// profile; close to IoT Hub's ECC certificate preview).
    Modern,
}

impl std::str::FromStr for TlsProfile {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "azure" => Ok(TlsProfile::Azure),
            "modern" => Ok(TlsProfile::Modern),
            other => Err(format!(
                "unknown TLS profile '{other}': use azure or modern"
            )),
        }
    }
}

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
pub fn load_or_create(state_dir: &Path, extra_names: &[String]) -> anyhow::Result<ServerPki> {
    load_or_create_for(state_dir, extra_names, TlsProfile::default())
}

/// [`load_or_create`] for a TLS profile: the server key is RSA-2048 for [`TlsProfile::Azure`] and
/// ECDSA P-256 for [`TlsProfile::Modern`]; a server certificate of the other kind is re-issued.
pub fn load_or_create_for(
    state_dir: &Path,
    extra_names: &[String],
    profile: TlsProfile,
) -> anyhow::Result<ServerPki> {
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    let ca_pem_path = state_dir.join("ca.pem");
    let ca_key_path = state_dir.join("ca.key");
    if !ca_pem_path.exists() || !ca_key_path.exists() {
        let key = KeyPair::generate()?;
        let mut params = ca_params("hubsim Development Root CA", 3650)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key)?;
        write_private(&ca_key_path, &key.serialize_pem())?;
        crate::state::write_atomic(&ca_pem_path, cert.pem().as_bytes())?;
    }
    let ca_pem = read(&ca_pem_path)?;
    let ca_key_pem = read(&ca_key_path)?;

    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    for name in extra_names {
        if !names.iter().any(|n| n.eq_ignore_ascii_case(name)) {
            names.push(name.clone());
        }
    }
    let server_pem_path = state_dir.join("server.pem");
    let server_key_path = state_dir.join("server.key");
    let current = std::fs::read_to_string(&server_pem_path).ok();
    let covers_all = current.as_deref().is_some_and(|pem| {
        server_cert_covers(pem, &names) && server_key_kind(pem) == Some(profile)
    });
    if !covers_all || !server_key_path.exists() {
        let key = match profile {
            TlsProfile::Azure => rsa::generate_2048()?,
            TlsProfile::Modern => KeyPair::generate()?,
        };
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = dn("hubsim");
        params.subject_alt_names = names.iter().map(|n| san(n)).collect::<Result<_, _>>()?;
        params.not_before = OffsetDateTime::now_utc() - Duration::days(1);
        params.not_after = OffsetDateTime::now_utc() + Duration::days(365);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let ca_key = KeyPair::from_pem(&ca_key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, &ca_key)?;
        let cert = params.signed_by(&key, &issuer)?;
        write_private(&server_key_path, &key.serialize_pem())?;
        crate::state::write_atomic(
            &server_pem_path,
            format!("{}{}", cert.pem(), ca_pem).as_bytes(),
        )?;
    }
    Ok(ServerPki {
        ca_pem_path,
        server_cert_pem: read(&server_pem_path)?,
        server_key_pem: read(&server_key_path)?,
        ca_pem,
    })
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    crate::state::write_atomic(path, text.as_bytes())?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 600 {}", path.display()))
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

fn san(name: &str) -> anyhow::Result<SanType> {
    Ok(match name.parse::<std::net::IpAddr>() {
        Ok(ip) => SanType::IpAddress(ip),
        Err(_) => SanType::DnsName(name.try_into()?),
    })
}

fn ca_params(cn: &str, days: i64) -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = dn(cn);
    params.not_before = OffsetDateTime::now_utc() - Duration::days(1);
    params.not_after = OffsetDateTime::now_utc() + Duration::days(days);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

/// Which profile's key the first certificate of `pem` carries (RSA: Azure, EC: Modern).
fn server_key_kind(pem: &str) -> Option<TlsProfile> {
    let der = CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()?
        .ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    match cert
        .public_key()
        .algorithm
        .algorithm
        .to_id_string()
        .as_str()
    {
        "1.2.840.113549.1.1.1" => Some(TlsProfile::Azure),
        "1.2.840.10045.2.1" => Some(TlsProfile::Modern),
        _ => None,
    }
}

/// True when the first certificate of `pem` names every entry of `names` and is still valid.
fn server_cert_covers(pem: &str, names: &[String]) -> bool {
    let Some(Ok(der)) = CertificateDer::pem_slice_iter(pem.as_bytes()).next() else {
        return false;
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(&der) else {
        return false;
    };
    if !cert.validity().is_valid() {
        return false;
    }
    let Ok(Some(sans)) = cert.subject_alternative_name() else {
        return false;
    };
    let present: Vec<String> = sans
        .value
        .general_names
        .iter()
        .filter_map(|g| match g {
            x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
            x509_parser::extensions::GeneralName::IPAddress(bytes) => match bytes.len() {
                4 => Some(std::net::IpAddr::from(<[u8; 4]>::try_from(*bytes).ok()?).to_string()),
                16 => Some(std::net::IpAddr::from(<[u8; 16]>::try_from(*bytes).ok()?).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect();
    names.iter().all(|n| {
        let n = match n.parse::<std::net::IpAddr>() {
            Ok(ip) => ip.to_string(),
            Err(_) => n.to_ascii_lowercase(),
        };
        present.contains(&n)
    })
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
/// Valid from yesterday, for ten years (a CA) or one year (a device).
pub fn issue(
    kind: CertKind,
    cn: &str,
    out_dir: &Path,
    issuer_dir: Option<&Path>,
) -> anyhow::Result<IssuedCert> {
    issue_valid(kind, cn, out_dir, issuer_dir, None)
}

/// A day in seconds, for [`issue_valid`]'s validity periods.
pub const DAY: i64 = 86_400;

/// [`issue`] with its own validity period, in seconds from now (`-30 * DAY..5 * DAY`: issued a
/// month ago, expires in five days; `-60..90`: expires in a minute and a half): certificates that
/// expire soon, have expired or are not valid yet, for tests of what the agent says about them.
pub fn issue_valid(
    kind: CertKind,
    cn: &str,
    out_dir: &Path,
    issuer_dir: Option<&Path>,
    valid_secs: Option<std::ops::Range<i64>>,
) -> anyhow::Result<IssuedCert> {
    if kind != CertKind::Device && kind != CertKind::Root && issuer_dir.is_none() {
        bail!("an intermediate CA needs --issuer");
    }
    if kind == CertKind::Root && issuer_dir.is_some() {
        bail!("a root CA is self-signed; drop --issuer");
    }
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let key = KeyPair::generate()?;
    let mut params = match kind {
        CertKind::Root | CertKind::Intermediate => {
            let mut p = ca_params(cn, 3650)?;
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p
        }
        CertKind::Device => {
            let mut p = CertificateParams::new(Vec::<String>::new())?;
            p.distinguished_name = dn(cn);
            p.not_before = OffsetDateTime::now_utc() - Duration::days(1);
            p.not_after = OffsetDateTime::now_utc() + Duration::days(365);
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            p
        }
    };
    if let Some(secs) = valid_secs {
        let now = OffsetDateTime::now_utc();
        params.not_before = now + Duration::seconds(secs.start);
        params.not_after = now + Duration::seconds(secs.end);
    }
    params.use_authority_key_identifier_extension = issuer_dir.is_some();
    let (cert, chain_tail) = match issuer_dir {
        None => (params.self_signed(&key)?, String::new()),
        Some(dir) => {
            let issuer_chain = read(&dir.join("cert.pem"))?;
            let issuer_key = KeyPair::from_pem(&read(&dir.join("key.pem"))?)
                .with_context(|| format!("{}: not a private key", dir.join("key.pem").display()))?;
            let issuer =
                Issuer::from_ca_cert_pem(&issuer_chain, &issuer_key).with_context(|| {
                    format!("{}: not a CA certificate", dir.join("cert.pem").display())
                })?;
            (params.signed_by(&key, &issuer)?, issuer_chain)
        }
    };
    let cert_path = out_dir.join("cert.pem");
    let key_path = out_dir.join("key.pem");
    crate::state::write_atomic(
        &cert_path,
        format!("{}{}", cert.pem(), chain_tail).as_bytes(),
    )?;
    write_private(&key_path, &key.serialize_pem())?;
    Ok(IssuedCert {
        cert_path,
        key_path,
        sha1_thumbprint: crate::auth::sha1_thumbprint(cert.der()),
        sha256_thumbprint: crate::auth::sha256_thumbprint(cert.der()),
    })
}

/// Why a certificate signing request got no certificate.
#[derive(Debug)]
pub enum CsrRefused {
    /// The request itself is wrong (not a PKCS#10 request, bad signature, another CN).
    BadRequest(String),
    /// The CA could not sign (its files are unreadable).
    CaUnavailable(String),
}

/// Signs a DER PKCS#10 request whose subject CN must be `cn` with the CA in `issuer_dir` (a
/// `certs root|intermediate` output), valid from a minute ago for `validity_secs`: the issued
/// chain as DER, leaf first, then the issuer's own chain — as DPS returns
/// `issuedCertificateChain` (docs/credentials.md).
pub fn sign_csr(
    issuer_dir: &Path,
    csr_der: &[u8],
    cn: &str,
    validity_secs: u64,
) -> Result<Vec<Vec<u8>>, CsrRefused> {
    let der = rustls_pki_types::CertificateSigningRequestDer::from(csr_der);
    let mut csr = rcgen::CertificateSigningRequestParams::from_der(&der)
        .map_err(|e| CsrRefused::BadRequest(format!("not a valid PKCS#10 request: {e}")))?;
    let subject = match csr.params.distinguished_name.get(&DnType::CommonName) {
        Some(rcgen::DnValue::Utf8String(s)) => Some(s.clone()),
        Some(rcgen::DnValue::PrintableString(s)) => Some(s.as_str().to_string()),
        _ => None,
    };
    if subject.as_deref() != Some(cn) {
        return Err(CsrRefused::BadRequest(format!(
            "the request's subject CN {subject:?} is not the registration id '{cn}'"
        )));
    }
    let unavailable = |e: anyhow::Error| CsrRefused::CaUnavailable(format!("{e:#}"));
    let issuer_chain = read(&issuer_dir.join("cert.pem")).map_err(unavailable)?;
    let issuer_key = KeyPair::from_pem(&read(&issuer_dir.join("key.pem")).map_err(unavailable)?)
        .map_err(|e| CsrRefused::CaUnavailable(format!("the CA key: {e}")))?;
    let issuer = Issuer::from_ca_cert_pem(&issuer_chain, &issuer_key)
        .map_err(|e| CsrRefused::CaUnavailable(format!("the CA certificate: {e}")))?;
    let now = OffsetDateTime::now_utc();
    csr.params.not_before = now - Duration::minutes(1);
    csr.params.not_after =
        now + Duration::seconds(i64::try_from(validity_secs).unwrap_or(i64::MAX));
    csr.params.is_ca = IsCa::ExplicitNoCa;
    csr.params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    csr.params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    csr.params.use_authority_key_identifier_extension = true;
    let leaf = csr
        .signed_by(&issuer)
        .map_err(|e| CsrRefused::BadRequest(format!("cannot sign the request: {e}")))?;
    let mut chain = vec![leaf.der().to_vec()];
    for cert in CertificateDer::pem_slice_iter(issuer_chain.as_bytes()) {
        let cert = cert.map_err(|e| CsrRefused::CaUnavailable(format!("the CA chain: {e}")))?;
        chain.push(cert.to_vec());
    }
    Ok(chain)
}

/// rustls server config for [`TlsProfile::Azure`] ([`server_tls_config_for`]).
pub fn server_tls_config(pki: &ServerPki) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    server_tls_config_for(pki, TlsProfile::default())
}

/// rustls server config: the profile's TLS versions and suites, client certificates requested but
/// optional (X.509 devices present one; SAS devices do not). The certificate is checked by
/// `auth`, not by rustls, because the trusted CAs are the enrolled ones and change at run time.
pub fn server_tls_config_for(
    pki: &ServerPki,
    profile: TlsProfile,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use rustls::crypto::ring::cipher_suite;
    let mut provider = rustls::crypto::ring::default_provider();
    let versions: &[&rustls::SupportedProtocolVersion] = match profile {
        TlsProfile::Azure => {
            // IoT Hub's recommended TLS 1.2 suites (iot-hub-tls-support) that rustls has; the
            // CBC ones it also lists are not implemented by rustls.
            provider.cipher_suites = vec![
                cipher_suite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
                cipher_suite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
            ];
            &[&rustls::version::TLS12]
        }
        TlsProfile::Modern => &[&rustls::version::TLS13, &rustls::version::TLS12],
    };
    let provider = Arc::new(provider);
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(pki.server_cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .context("server.pem")?;
    let key = PrivateKeyDer::from_pem_slice(pki.server_key_pem.as_bytes()).context("server.key")?;
    let config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)?
        .with_client_cert_verifier(Arc::new(AnyClientCert { provider }))
        .with_single_cert(chain, key)?;
    Ok(Arc::new(config))
}

/// Accepts any client certificate at the TLS layer (checking only that the client owns its key);
/// whether it is trusted is decided per enrollment by `auth`.
#[derive(Debug)]
struct AnyClientCert {
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ClientCertVerifier for AnyClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// RSA-2048 key generation for the Azure profile's server certificate. ring (hubsim's crypto)
/// signs with RSA keys but cannot make them, and no RSA crate is in the dependency tree, so the
/// key is made here from num-bigint (already used for TPM blobs): two random 1024-bit primes
/// (small-prime sieve, then 40 Miller–Rabin rounds), e = 65537, written as PKCS#8 and handed to
/// rcgen/ring, which check the key's consistency when they load it.
mod rsa {
    use num_bigint::BigUint;
    use rcgen::{KeyPair, PKCS_RSA_SHA256};
    use rustls_pki_types::PrivatePkcs8KeyDer;

    const SMALL_PRIMES: [u32; 53] = [
        3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89,
        97, 101, 103, 107, 109, 113, 127, 131, 137, 139, 149, 151, 157, 163, 167, 173, 179, 181,
        191, 193, 197, 199, 211, 223, 227, 229, 233, 239, 241, 251,
    ];

    pub fn generate_2048() -> anyhow::Result<KeyPair> {
        let e = BigUint::from(65_537u32);
        loop {
            let (a, b) = (random_prime(1024), random_prime(1024));
            let (p, q) = if a > b { (a, b) } else { (b, a) };
            if p == q {
                continue;
            }
            let n = &p * &q;
            let (p1, q1) = (&p - 1u32, &q - 1u32);
            let phi = &p1 * &q1;
            let (Some(d), Some(qinv)) = (e.modinv(&phi), q.modinv(&p)) else {
                continue;
            };
            let (dp, dq) = (&d % &p1, &d % &q1);
            let pkcs1 = sequence(
                &[
                    integer(&BigUint::from(0u32)),
                    integer(&n),
                    integer(&e),
                    integer(&d),
                    integer(&p),
                    integer(&q),
                    integer(&dp),
                    integer(&dq),
                    integer(&qinv),
                ]
                .concat(),
            );
            // PrivateKeyInfo { version 0, rsaEncryption with NULL parameters, the PKCS#1 key }
            const RSA_ALGORITHM: &[u8] = &[
                0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05,
                0x00,
            ];
            let pkcs8 = sequence(
                &[
                    integer(&BigUint::from(0u32)),
                    RSA_ALGORITHM.to_vec(),
                    tlv(0x04, &pkcs1),
                ]
                .concat(),
            );
            return Ok(KeyPair::from_pkcs8_der_and_sign_algo(
                &PrivatePkcs8KeyDer::from(pkcs8),
                &PKCS_RSA_SHA256,
            )?);
        }
    }

    /// A random prime of exactly `bits` bits with its two top bits set (so that the product of
    /// two has exactly twice as many).
    fn random_prime(bits: usize) -> BigUint {
        loop {
            let mut bytes = vec![0u8; bits / 8];
            rand::fill(&mut bytes[..]);
            bytes[0] |= 0xc0;
            *bytes.last_mut().expect("non-empty") |= 1;
            let candidate = BigUint::from_bytes_be(&bytes);
            if SMALL_PRIMES
                .iter()
                .any(|&s| (&candidate % s) == BigUint::from(0u32))
            {
                continue;
            }
            if probably_prime(&candidate, 40) {
                return candidate;
            }
        }
    }

    fn probably_prime(n: &BigUint, rounds: usize) -> bool {
        let one = BigUint::from(1u32);
        let n1 = n - 1u32;
        let s = n1.trailing_zeros().unwrap_or(0);
        let d = &n1 >> s;
        let len = n.to_bytes_be().len();
        'rounds: for _ in 0..rounds {
            let mut bytes = vec![0u8; len];
            rand::fill(&mut bytes[..]);
            let a = BigUint::from_bytes_be(&bytes) % (n - 3u32) + 2u32;
            let mut x = a.modpow(&d, n);
            if x == one || x == n1 {
                continue;
            }
            for _ in 1..s {
                x = x.modpow(&BigUint::from(2u32), n);
                if x == n1 {
                    continue 'rounds;
                }
            }
            return false;
        }
        true
    }

    fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let len = content.len();
        if len < 0x80 {
            out.push(len as u8);
        } else {
            let len_bytes: Vec<u8> = len
                .to_be_bytes()
                .into_iter()
                .skip_while(|b| *b == 0)
                .collect();
            out.push(0x80 | len_bytes.len() as u8);
            out.extend(len_bytes);
        }
        out.extend_from_slice(content);
        out
    }

    fn sequence(content: &[u8]) -> Vec<u8> {
        tlv(0x30, content)
    }

    /// A DER INTEGER of a non-negative number (a leading zero when the top bit is set).
    fn integer(value: &BigUint) -> Vec<u8> {
        let mut bytes = value.to_bytes_be();
        if bytes[0] & 0x80 != 0 {
            bytes.insert(0, 0);
        }
        tlv(0x02, &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_pki_is_created_once_and_reissued_for_new_names() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create(dir.path(), &[]).unwrap();
        let again = load_or_create(dir.path(), &[]).unwrap();
        assert_eq!(first.server_cert_pem, again.server_cert_pem);
        let mode = std::fs::metadata(dir.path().join("server.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let ca_key_mode = std::fs::metadata(dir.path().join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(ca_key_mode & 0o777, 0o600);
        let ca_der = CertificateDer::from_pem_slice(first.ca_pem.as_bytes()).unwrap();
        assert_eq!(
            crate::auth::leaf_common_name(&ca_der).unwrap(),
            "hubsim Development Root CA"
        );
        let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        assert!(ca.is_ca());
        let years = (ca.validity().not_after.timestamp() - ca.validity().not_before.timestamp())
            / (365 * 86400);
        assert!(years >= 10, "CA valid for {years} years");
        // server.pem is the chain: leaf then the CA.
        let chain: Vec<_> = CertificateDer::pem_slice_iter(first.server_cert_pem.as_bytes())
            .map(Result::unwrap)
            .collect();
        assert_eq!(chain.len(), 2);
        assert_eq!(chain[1], ca_der);
        let more =
            load_or_create(dir.path(), &["hub.example.net".into(), "10.0.0.7".into()]).unwrap();
        assert_ne!(first.server_cert_pem, more.server_cert_pem);
        assert_eq!(first.ca_pem, more.ca_pem, "the CA stays");
        assert!(server_cert_covers(
            &more.server_cert_pem,
            &["hub.example.net".into(), "10.0.0.7".into(), "::1".into()]
        ));
        server_tls_config(&more).unwrap();
    }

    #[test]
    fn device_certificates_chain_to_their_issuers() {
        let dir = tempfile::tempdir().unwrap();
        let root = issue(CertKind::Root, "root", &dir.path().join("root"), None).unwrap();
        let inter = issue(
            CertKind::Intermediate,
            "inter",
            &dir.path().join("inter"),
            Some(&dir.path().join("root")),
        )
        .unwrap();
        let dev = issue(
            CertKind::Device,
            "dev-x509",
            &dir.path().join("dev"),
            Some(&dir.path().join("inter")),
        )
        .unwrap();
        let chain: Vec<Vec<u8>> = CertificateDer::pem_file_iter(&dev.cert_path)
            .unwrap()
            .map(|c| c.unwrap().to_vec())
            .collect();
        assert_eq!(chain.len(), 3, "leaf, intermediate, root");
        let root_der = CertificateDer::pem_file_iter(&root.cert_path)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .to_vec();
        let inter_der = CertificateDer::pem_file_iter(&inter.cert_path)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .to_vec();
        let now = crate::auth::unix_now();
        crate::auth::verify_chain(&chain[..1], std::slice::from_ref(&inter_der), now).unwrap();
        crate::auth::verify_chain(&chain[..2], std::slice::from_ref(&root_der), now).unwrap();
        assert_eq!(
            crate::auth::leaf_common_name(&chain[0]).unwrap(),
            "dev-x509"
        );
        // A self-signed device certificate chains to nothing enrolled.
        let lone = issue(CertKind::Device, "dev-x509", &dir.path().join("lone"), None).unwrap();
        let lone_der = CertificateDer::pem_file_iter(&lone.cert_path)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .to_vec();
        assert!(
            crate::auth::verify_chain(std::slice::from_ref(&lone_der), &[root_der], now).is_err()
        );
        assert_eq!(
            lone.sha256_thumbprint,
            crate::auth::sha256_thumbprint(&lone_der)
        );
        assert!(issue(CertKind::Intermediate, "x", &dir.path().join("bad"), None).is_err());
    }

    /// Handshakes a client against `server` over an in-memory pipe; returns what the server saw
    /// (negotiated version, client certificates), or each side's error.
    async fn handshake(
        server: Arc<rustls::ServerConfig>,
        client: rustls::ClientConfig,
    ) -> Result<(rustls::ProtocolVersion, Option<Vec<Vec<u8>>>), (Option<String>, Option<String>)>
    {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        match tokio::join!(acceptor.accept(a), connector.connect(name, b)) {
            (Ok(server_side), Ok(_client_side)) => {
                let (_, conn) = server_side.get_ref();
                Ok((
                    conn.protocol_version().unwrap(),
                    conn.peer_certificates()
                        .map(|c| c.iter().map(|d| d.to_vec()).collect()),
                ))
            }
            (server, client) => Err((
                server.err().map(|e| e.to_string()),
                client.err().map(|e| e.to_string()),
            )),
        }
    }

    fn client_builder(
        ca_pem: &str,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
    }

    #[tokio::test]
    async fn the_azure_profile_serves_an_rsa_certificate_over_tls12_only() {
        let dir = tempfile::tempdir().unwrap();
        let pki = load_or_create(dir.path(), &["127.0.0.2".into()]).unwrap();
        let leaf = CertificateDer::pem_slice_iter(pki.server_cert_pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
        let x509_parser::public_key::PublicKey::RSA(rsa) = cert.public_key().parsed().unwrap()
        else {
            panic!("the server key is not RSA")
        };
        assert_eq!(rsa.key_size(), 2048);
        let server = server_tls_config(&pki).unwrap();
        let (version, _) = handshake(
            server.clone(),
            client_builder(
                &pki.ca_pem,
                &[&rustls::version::TLS13, &rustls::version::TLS12],
            )
            .with_no_client_auth(),
        )
        .await
        .unwrap();
        assert_eq!(version, rustls::ProtocolVersion::TLSv1_2);
        let refused = handshake(
            server,
            client_builder(&pki.ca_pem, &[&rustls::version::TLS13]).with_no_client_auth(),
        )
        .await
        .unwrap_err();
        assert!(
            refused
                .0
                .as_deref()
                .is_some_and(|e| e.contains("Tls12NotOfferedOrEnabled")),
            "a TLS 1.3-only client is refused: {refused:?}"
        );
        // The modern profile on the same state dir: an ECDSA certificate, re-issued.
        let modern =
            load_or_create_for(dir.path(), &["127.0.0.2".into()], TlsProfile::Modern).unwrap();
        assert_eq!(
            server_key_kind(&modern.server_cert_pem),
            Some(TlsProfile::Modern)
        );
        assert_eq!(modern.ca_pem, pki.ca_pem, "the CA stays");
    }

    #[tokio::test]
    async fn server_config_serves_tls12_and_tls13_with_optional_client_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let pki = load_or_create_for(
            dir.path(),
            &["sim-hub.example.net".into()],
            TlsProfile::Modern,
        )
        .unwrap();
        let server = server_tls_config_for(&pki, TlsProfile::Modern).unwrap();
        let all = [&rustls::version::TLS13, &rustls::version::TLS12];

        // A SAS device: no client certificate, both protocol versions.
        let (version, certs) = handshake(
            server.clone(),
            client_builder(&pki.ca_pem, &all).with_no_client_auth(),
        )
        .await
        .unwrap();
        assert_eq!(version, rustls::ProtocolVersion::TLSv1_3);
        assert!(certs.is_none());
        // Azure's Python SDK pins TLS 1.2.
        let (version, _) = handshake(
            server.clone(),
            client_builder(&pki.ca_pem, &[&rustls::version::TLS12]).with_no_client_auth(),
        )
        .await
        .unwrap();
        assert_eq!(version, rustls::ProtocolVersion::TLSv1_2);

        // An X.509 device: its chain reaches the server, which did not judge it (auth does).
        let root = issue(CertKind::Root, "some root", &dir.path().join("r"), None).unwrap();
        let dev = issue(
            CertKind::Device,
            "dev-x509",
            &dir.path().join("d"),
            Some(&dir.path().join("r")),
        )
        .unwrap();
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&dev.cert_path)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let key = PrivateKeyDer::from_pem_file(&dev.key_path).unwrap();
        for versions in [&all[..1], &all[1..]] {
            let client = client_builder(&pki.ca_pem, versions)
                .with_client_auth_cert(chain.clone(), key.clone_key())
                .unwrap();
            let (_, certs) = handshake(server.clone(), client).await.unwrap();
            let certs = certs.expect("the client certificate reaches the server");
            assert_eq!(certs.len(), 2);
            assert_eq!(
                crate::auth::sha256_thumbprint(&certs[0]),
                dev.sha256_thumbprint
            );
            assert_eq!(
                crate::auth::leaf_common_name(&certs[0]).unwrap(),
                "dev-x509"
            );
        }
        assert!(root.cert_path.exists());

        // A client proving a key other than its certificate's fails the handshake signature check.
        let other = issue(CertKind::Device, "other", &dir.path().join("o"), None).unwrap();
        let wrong_key = PrivateKeyDer::from_pem_file(&other.key_path).unwrap();
        let signer = rustls::crypto::ring::sign::any_supported_type(&wrong_key).unwrap();
        let resolver = Arc::new(FixedClientCert(Arc::new(rustls::sign::CertifiedKey::new(
            chain.clone(),
            signer,
        ))));
        for versions in [&all[..1], &all[1..]] {
            let client =
                client_builder(&pki.ca_pem, versions).with_client_cert_resolver(resolver.clone());
            let (server_err, _) = handshake(server.clone(), client).await.unwrap_err();
            let server_err = server_err.expect("the server refuses");
            assert!(server_err.contains("ignature"), "{server_err}");
        }

        // A client that trusts another CA refuses the server.
        let other_dir = tempfile::tempdir().unwrap();
        let other_pki = load_or_create(other_dir.path(), &[]).unwrap();
        let err = handshake(
            server,
            client_builder(&other_pki.ca_pem, &all).with_no_client_auth(),
        )
        .await
        .unwrap_err();
        let client_err = err.1.expect("the client refuses");
        assert!(
            client_err.contains("invalid peer certificate"),
            "{client_err}"
        );
    }

    /// Presents a fixed certificate and key whatever the server asks (to test a mismatched key,
    /// which `with_client_auth_cert` would refuse to build).
    #[derive(Debug)]
    struct FixedClientCert(Arc<rustls::sign::CertifiedKey>);

    impl rustls::client::ResolvesClientCert for FixedClientCert {
        fn resolve(
            &self,
            _root_hint_subjects: &[&[u8]],
            _sigschemes: &[rustls::SignatureScheme],
        ) -> Option<Arc<rustls::sign::CertifiedKey>> {
            Some(self.0.clone())
        }

        fn has_certs(&self) -> bool {
            true
        }
    }
}
