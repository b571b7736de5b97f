//! Provisioning: finding out which hub this device belongs to. The DPS client registers; the
//! assignment is cached in the state dir (`state::ProvisioningCache`) with the fingerprint of
//! the settings that produced it, so a reboot with unchanged settings makes no DPS call.

pub mod dps;
#[cfg(feature = "tpm")]
pub mod dps_https;

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{Attestation, Config, Source};
use crate::identity::credential::Credential;
use crate::identity::issued::{self, Generation};
use crate::identity::keys;
use crate::state::{ProvisioningCache, StateDir};

/// Where DPS (or a manual configuration) put this device.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Assignment {
    pub assigned_hub: String,
    pub device_id: String,
    /// `initialAssignment`, `deviceDataMigrated`, … (empty for manual).
    pub substatus: String,
    /// DPS's full `registrationState`.
    pub registration_state: serde_json::Value,
}

/// The registration id: configured, or the certificate CN for X.509.
pub fn registration_id(config: &Config) -> Result<String, String> {
    let p = &config.provisioning;
    if p.source == Source::Manual {
        return p
            .device_id
            .clone()
            .or_else(|| manual_connection_string(config).ok().map(|(_, d, _)| d))
            .ok_or_else(|| "provisioning.device_id is required for source = \"manual\"".into());
    }
    if let Some(id) = &p.registration_id {
        return Ok(id.clone());
    }
    match &p.attestation {
        Some(Attestation::X509 { identity_cert, .. }) => {
            let pem = std::fs::read(identity_cert)
                .map_err(|e| format!("{}: {e}", identity_cert.display()))?;
            crate::identity::x509::certificate_common_name(&pem)
                .map_err(|e| format!("{}: {e}", identity_cert.display()))
        }
        #[cfg(feature = "tpm")]
        Some(Attestation::Tpm {
            tcti,
            owner_auth,
            endorsement_auth,
            ..
        }) => crate::identity::tpm::HierarchyAuth::from_secrets(
            owner_auth.as_ref(),
            endorsement_auth.as_ref(),
        )
        .and_then(|auth| crate::identity::tpm::identity(tcti, &auth))
        .map(|identity| identity.registration_id)
        .map_err(|e| format!("the registration id comes from the TPM's endorsement key: {e}")),
        _ => Err("provisioning.registration_id is not set".into()),
    }
}

/// What to send to DPS, where (MQTT host and port, or HTTPS for TPM attestation); `None` for
/// `source = "manual"`, which registers nowhere.
/// `auto`: the route memory of `transport = "auto"` (the daemon's, shared with the hub session).
pub fn dps_request(
    config: &Config,
    registration_id: &str,
    auto: Option<&crate::mqtt::AutoRoute>,
) -> Option<dps::DpsRequest> {
    let endpoint = config.dps_endpoint()?;
    Some(dps::DpsRequest {
        endpoint_host: endpoint.host.clone(),
        port: config.hub.port_for(endpoint.port),
        websocket: config.hub.websocket(),
        proxy: proxy_route(config, &endpoint.host),
        auto: auto.map(|a| Arc::new(a.for_ports(endpoint.port, config.hub.websocket_port))),
        id_scope: config.provisioning.id_scope.clone().unwrap_or_default(),
        registration_id: registration_id.to_string(),
        payload: config.payload_json(),
        csr: None,
        timeout: Duration::from_secs(60),
    })
}

/// The route memory of `[hub] transport = "auto"` (None for a fixed transport), kept in `state`.
pub fn auto_route(config: &Config, state: &StateDir) -> Option<Arc<crate::mqtt::AutoRoute>> {
    (config.hub.transport == crate::config::HubTransport::Auto).then(|| {
        Arc::new(crate::mqtt::AutoRoute::new(
            config.hub.port,
            config.hub.websocket_port,
            Some(state.clone()),
        ))
    })
}

/// The proxy a connection to `host` tunnels through, its password read now. A password that
/// cannot be read is logged (naming the file) and the proxy is tried without: it then refuses
/// with 407, which names the proxy.
pub fn proxy_route(config: &Config, host: &str) -> Option<crate::mqtt::ProxyRoute> {
    let proxy = config.proxy_for(host)?;
    let password = match &proxy.password {
        Some(secret) => match keys::read_secret(secret) {
            Ok((text, _, warnings)) => {
                for w in warnings {
                    tracing::warn!("proxy_password: {w}");
                }
                Some(text)
            }
            Err(e) => {
                tracing::error!("proxy_password of {proxy}: {e}");
                None
            }
        },
        None => None,
    };
    Some(crate::mqtt::ProxyRoute {
        host: proxy.host.clone(),
        port: proxy.port,
        credentials: proxy
            .user
            .clone()
            .map(|user| (user, password.unwrap_or_default())),
        describe: proxy.to_string(),
    })
}

/// One DPS registration: over MQTT with a SAS or X.509 credential, or, for TPM attestation,
/// the HTTPS challenge flow that also puts the hub key into the TPM.
pub async fn register(
    config: &Config,
    request: &dps::DpsRequest,
    credential: &Credential,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Assignment, dps::DpsError> {
    #[cfg(feature = "tpm")]
    if let Some(Attestation::Tpm {
        tcti,
        handle,
        key_source: crate::config::TpmKeySource::Attestation,
        owner_auth,
        endorsement_auth,
    }) = &config.provisioning.attestation
    {
        let auth = crate::identity::tpm::HierarchyAuth::from_secrets(
            owner_auth.as_ref(),
            endorsement_auth.as_ref(),
        )
        .map_err(|e| dps::DpsError::Tpm(e.to_string()))?;
        let target = dps_https::TpmTarget {
            tcti: tcti.clone(),
            handle: *handle,
            auth,
        };
        return dps_https::register(request, &target, config.hub.trust_bundle.clone()).await;
    }
    #[cfg(not(feature = "tpm"))]
    let _ = config;
    dps::register(request, credential, tls).await
}

/// With DPS TPM attestation the hub key lives only in the TPM: when it is gone (TPM cleared,
/// handle evicted) a cached assignment is useless and the agent must register again. Says why,
/// or `None` when the key is there (or the method keeps its key elsewhere).
pub fn attestation_key_missing(config: &Config) -> Option<String> {
    #[cfg(feature = "tpm")]
    if let Some(Attestation::Tpm {
        tcti,
        handle,
        key_source: crate::config::TpmKeySource::Attestation,
        ..
    }) = &config.provisioning.attestation
        && let Err(e @ crate::identity::tpm::TpmError::HandleEmpty { .. }) =
            crate::identity::tpm::TpmSigner::new(tcti, *handle).check()
    {
        return Some(e.to_string());
    }
    #[cfg(not(feature = "tpm"))]
    let _ = config;
    None
}

/// `HostName=…;DeviceId=…;SharedAccessKey=…` of a manual configuration.
pub fn manual_connection_string(config: &Config) -> Result<(String, String, String), String> {
    let Some(secret) = &config.provisioning.connection_string else {
        return Err("no connection string".into());
    };
    let (text, source, _) = keys::read_secret(secret).map_err(|e| e.to_string())?;
    let mut host = None;
    let mut device = None;
    let mut key = None;
    for part in text.split(';') {
        match part.split_once('=') {
            Some(("HostName", v)) => host = Some(v.to_string()),
            Some(("DeviceId", v)) => device = Some(v.to_string()),
            Some(("SharedAccessKey", v)) => key = Some(v.to_string()),
            _ => {}
        }
    }
    match (host, device, key) {
        (Some(h), Some(d), Some(k)) => Ok((h, d, k)),
        _ => Err(format!(
            "{source}: a device connection string needs HostName, DeviceId and SharedAccessKey"
        )),
    }
}

pub fn load_credential(config: &Config, registration_id: &str) -> Result<Credential, String> {
    if config.provisioning.source == Source::Manual && config.provisioning.attestation.is_none() {
        let (_, _, key) = manual_connection_string(config)?;
        let signer = keys::MemoryKey::from_base64(&key, "connection string key")
            .map_err(|e| e.to_string())?;
        return Ok(Credential::Sas(Arc::new(signer)));
    }
    let attestation = config
        .provisioning
        .attestation
        .as_ref()
        .ok_or("provisioning.attestation is missing")?;
    let (credential, warnings) =
        Credential::load(attestation, registration_id).map_err(|e| e.to_string())?;
    for w in warnings {
        tracing::warn!("{w}");
    }
    Ok(credential)
}

pub fn client_tls(
    config: &Config,
    credential: &Credential,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let identity = match credential {
        Credential::X509 {
            cert_chain_pem,
            key,
        } => Some((cert_chain_pem.as_slice(), key.client_key())),
        Credential::Sas(_) => None,
    };
    crate::identity::tls::client_config(config.hub.trust_bundle.as_deref(), identity)
        .map_err(|e| e.to_string())
}

/// Everything the device presents to DPS and the hub: loaded once per provisioning pass.
#[derive(Clone)]
pub struct DeviceIdentity {
    pub registration_id: String,
    /// The credential in use: the primary key, or the secondary after DPS refused the primary.
    pub credential: Credential,
    pub tls: Arc<rustls::ClientConfig>,
    /// The other symmetric key (`secondary_key`), when one is configured.
    pub other_key: Option<Credential>,
    /// Whether `credential` is the secondary key.
    pub on_secondary: bool,
    /// With `[provisioning.issued_certificate]`: the newest generation DPS issued, which the hub
    /// gets instead of `credential` (that stays the onboarding credential for DPS).
    pub issued: Option<IssuedIdentity>,
}

/// An issued generation and the TLS configuration that presents it.
#[derive(Clone)]
pub struct IssuedIdentity {
    pub generation: Generation,
    pub tls: Arc<rustls::ClientConfig>,
}

impl DeviceIdentity {
    /// What the hub gets: the issued certificate when there is one, else the credential.
    pub fn hub_credential(&self) -> (&Credential, &Arc<rustls::ClientConfig>) {
        match &self.issued {
            Some(issued) => (&issued.generation.credential, &issued.tls),
            None => (&self.credential, &self.tls),
        }
    }
}

impl DeviceIdentity {
    /// Swaps the key in use with the other one; false when there is no other key.
    pub fn switch_key(&mut self) -> bool {
        let Some(other) = self.other_key.take() else {
            return false;
        };
        self.other_key = Some(std::mem::replace(&mut self.credential, other));
        self.on_secondary = !self.on_secondary;
        true
    }

    /// "primary" or "secondary" when a secondary key is configured (for status and the twin).
    pub fn key_in_use(&self) -> Option<&'static str> {
        self.other_key.as_ref().map(|_| {
            if self.on_secondary {
                "secondary"
            } else {
                "primary"
            }
        })
    }
}

/// Which part of the identity could not be loaded (the text says why, never with key material).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum IdentityError {
    #[error("{0}")]
    RegistrationId(String),
    #[error("{0}")]
    Credential(String),
    #[error("{0}")]
    Tls(String),
}

/// The registration id, the credential and the TLS configuration that presents it.
pub fn device_identity(config: &Config) -> Result<DeviceIdentity, IdentityError> {
    let registration_id = registration_id(config).map_err(IdentityError::RegistrationId)?;
    let credential =
        load_credential(config, &registration_id).map_err(IdentityError::Credential)?;
    let tls = client_tls(config, &credential).map_err(IdentityError::Tls)?;
    let other_key = match &config.provisioning.attestation {
        Some(attestation) => Credential::load_secondary(attestation, &registration_id)
            .map_err(|e| IdentityError::Credential(format!("secondary_key: {e}")))?
            .map(|(credential, warnings)| {
                for w in warnings {
                    tracing::warn!("{w}");
                }
                credential
            }),
        None => None,
    };
    let issued = match &config.provisioning.issued_certificate {
        Some(_) => newest_issued(config),
        None => None,
    };
    Ok(DeviceIdentity {
        registration_id,
        credential,
        tls,
        other_key,
        on_secondary: false,
        issued,
    })
}

/// The newest issued generation in the state dir, with its TLS configuration. One that cannot
/// be used is logged and skipped: the next registration asks DPS for a new one.
fn newest_issued(config: &Config) -> Option<IssuedIdentity> {
    let store = issued::Store::new(&config.agent.state_dir);
    let newest = issued::KeyHome::of(config).and_then(|home| store.newest(&home));
    let generation = match newest {
        Ok(generation) => generation?,
        Err(e) => {
            tracing::warn!("issued certificate: {e}; asking DPS for a new one");
            return None;
        }
    };
    match client_tls(config, &generation.credential) {
        Ok(tls) => Some(IssuedIdentity { generation, tls }),
        Err(e) => {
            tracing::warn!("issued certificate generation {}: {e}", generation.number);
            None
        }
    }
}

/// The issued chain of a registration that carried a CSR (base64 DER, leaf first), taken out of
/// the registration state (it is kept in the generation directory, not in the cache).
fn take_issued_chain(assignment: &mut Assignment) -> Result<Vec<Vec<u8>>, dps::DpsError> {
    use base64::Engine;
    let chain = assignment
        .registration_state
        .as_object_mut()
        .and_then(|state| state.remove("issuedCertificateChain"));
    let Some(serde_json::Value::Array(chain)) = chain else {
        return Err(dps::DpsError::Protocol(
            "the registration carried a csr but DPS issued no certificate (registrationState.issuedCertificateChain is missing): does the enrollment issue certificates?".into(),
        ));
    };
    let decoded: Option<Vec<Vec<u8>>> = chain
        .iter()
        .map(|c| {
            c.as_str()
                .and_then(|c| base64::engine::general_purpose::STANDARD.decode(c).ok())
        })
        .collect();
    match decoded {
        Some(chain) if !chain.is_empty() => Ok(chain),
        _ => Err(dps::DpsError::Protocol(
            "registrationState.issuedCertificateChain is not a list of base64 DER certificates"
                .into(),
        )),
    }
}

/// What `resolve` decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Resolution {
    /// The cached assignment still fits: no DPS call.
    Cached(ProvisioningCache),
    /// Register with DPS; `reason` is `None` for a first registration or one that was asked for.
    Register { reason: Option<StaleCache> },
}

/// Why a cached assignment no longer serves.
#[derive(Debug, Clone, PartialEq)]
pub enum StaleCache {
    /// The provisioning settings changed since the registration that made it.
    SettingsChanged,
    /// With DPS TPM attestation, the hub key is gone from the TPM (cleared, evicted): the text
    /// says what was found.
    KeyMissing(String),
    /// With `[provisioning.issued_certificate]`: no usable issued certificate yet.
    Issuance(String),
}

/// The provisioning policy, for the daemon and `hubagent provision` alike: a cached assignment
/// made with the same provisioning settings (fingerprint) is used without a DPS call, unless a
/// fresh registration is forced or, with DPS TPM attestation, the hub key is gone from the TPM.
pub fn resolve(config: &Config, state: &StateDir, force: bool) -> Resolution {
    let cached = match state.load_provisioning() {
        Ok(cached) => cached,
        Err(e) => {
            tracing::warn!("{e}");
            None
        }
    };
    let Some(cache) = cached else {
        return Resolution::Register { reason: None };
    };
    if force {
        return Resolution::Register { reason: None };
    }
    if cache.fingerprint != config.provisioning_fingerprint() {
        return Resolution::Register {
            reason: Some(StaleCache::SettingsChanged),
        };
    }
    if let Some(missing) = attestation_key_missing(config) {
        return Resolution::Register {
            reason: Some(StaleCache::KeyMissing(missing)),
        };
    }
    match issuance_due(config) {
        Some(why) => Resolution::Register {
            reason: Some(StaleCache::Issuance(why)),
        },
        None => Resolution::Cached(cache),
    }
}

/// With `[provisioning.issued_certificate]` and no usable issued certificate yet: why DPS must
/// issue one before the hub session. A certificate due for renewal is renewed beside the
/// session instead (daemon/renewal.rs), so a failing issuance never keeps the device offline.
pub fn issuance_due(config: &Config) -> Option<String> {
    config.provisioning.issued_certificate.as_ref()?;
    newest_issued(config)
        .is_none()
        .then(|| "no issued certificate yet".to_string())
}

/// One registration attempt: DPS (MQTT, or HTTPS for TPM attestation), or, for a manual
/// configuration, the hub and device the configuration names.
/// With a secondary key configured, DPS refusing the key in use makes it try the other one at
/// once; `identity` then keeps the key DPS accepted (the hub gets the same).
pub async fn register_once(
    config: &Config,
    identity: &mut DeviceIdentity,
    auto: Option<&crate::mqtt::AutoRoute>,
) -> Result<Assignment, dps::DpsError> {
    // No DPS endpoint: a manual configuration names its hub and device itself.
    let Some(request) = dps_request(config, &identity.registration_id, auto) else {
        return Ok(Assignment {
            assigned_hub: config
                .provisioning
                .iothub_hostname
                .clone()
                .or_else(|| manual_connection_string(config).ok().map(|(h, _, _)| h))
                .unwrap_or_default(),
            device_id: identity.registration_id.clone(),
            substatus: String::new(),
            registration_state: serde_json::Value::Null,
        });
    };
    let key_home =
        issued::KeyHome::of(config).map_err(|e| dps::DpsError::Protocol(e.to_string()))?;
    let new_key = match config.provisioning.issued_certificate {
        Some(_) => {
            // A TPM key is generated and signs the CSR in the TPM: off the async threads.
            let (registration_id, home) = (identity.registration_id.clone(), key_home.clone());
            let made =
                tokio::task::spawn_blocking(move || issued::new_key(&registration_id, &home))
                    .await
                    .map_err(|e| {
                        dps::DpsError::Protocol(format!("making the new key failed: {e}"))
                    })?;
            Some(made.map_err(|e| dps::DpsError::Protocol(e.to_string()))?)
        }
        None => None,
    };
    let mut request = request;
    request.csr = new_key.as_ref().map(|k| k.csr_base64.clone());
    crate::util::test_hook::abort_at("issuance-requested");
    let mut assignment = register_with_either_key(config, identity, &request).await?;
    if let Some(new_key) = new_key {
        let chain = take_issued_chain(&mut assignment)?;
        crate::util::test_hook::abort_at("issuance-answered");
        let store = issued::Store::new(&config.agent.state_dir);
        let generation = store
            .save(&new_key.material, &chain, &key_home)
            .map_err(|e| dps::DpsError::Protocol(format!("storing the issued certificate: {e}")))?;
        let tls = client_tls(config, &generation.credential).map_err(dps::DpsError::Protocol)?;
        tracing::info!(
            generation = generation.number,
            not_after = %generation.validity.not_after_rfc3339(),
            "DPS issued a certificate; the hub gets it next"
        );
        identity.issued = Some(IssuedIdentity { generation, tls });
    }
    Ok(assignment)
}

/// One DPS registration with the key in use, and with the other key when DPS refuses it.
async fn register_with_either_key(
    config: &Config,
    identity: &mut DeviceIdentity,
    request: &dps::DpsRequest,
) -> Result<Assignment, dps::DpsError> {
    let first = register(config, request, &identity.credential, identity.tls.clone()).await;
    match first {
        Err(e) if e.is_unauthorized() && identity.switch_key() => {
            let (refused, trying) = match identity.on_secondary {
                true => ("primary", "secondary"),
                false => ("secondary", "primary"),
            };
            tracing::warn!(
                "DPS refused the {refused} key ({e}); trying the {trying} key (secondary_key)"
            );
            let second =
                register(config, request, &identity.credential, identity.tls.clone()).await;
            if second.is_err() {
                // Neither key works: start over from the configured order next time.
                identity.switch_key();
            }
            second
        }
        other => other,
    }
}

/// The cache entry for a new assignment (stamped now, with the settings' fingerprint), saved to
/// the state dir. The entry is returned even when saving failed: the agent can still use it.
pub fn record(
    state: &StateDir,
    config: &Config,
    assignment: Assignment,
    identity: &DeviceIdentity,
) -> (ProvisioningCache, Result<(), crate::state::StateError>) {
    let cache = ProvisioningCache {
        secondary_key: identity.on_secondary,
        hub: assignment.assigned_hub,
        device_id: assignment.device_id,
        provisioned_at: crate::util::time::now_rfc3339(),
        fingerprint: config.provisioning_fingerprint(),
        registration: assignment.registration_state,
    };
    let saved = state.save_provisioning(&cache);
    (cache, saved)
}

/// `hubagent provision`: one registration (or the cache when it is valid and not `force`),
/// saved to the state dir. Returns the cache entry and whether it is fresh.
pub async fn provision_once(
    config: &Config,
    force: bool,
) -> Result<(ProvisioningCache, bool), String> {
    let (state, _) = StateDir::open(&config.agent.state_dir).map_err(|e| e.to_string())?;
    if let Resolution::Cached(cache) = resolve(config, &state, force) {
        return Ok((cache, false));
    }
    let mut identity = device_identity(config).map_err(|e| e.to_string())?;
    let auto = auto_route(config, &state);
    let assignment = register_once(config, &mut identity, auto.as_deref())
        .await
        .map_err(|e| e.to_string())?;
    let (cache, saved) = record(&state, config, assignment, &identity);
    saved.map_err(|e| e.to_string())?;
    Ok((cache, true))
}
