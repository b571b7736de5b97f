//! Configuration: `/etc/hubagent/config.toml` plus `config.d/*.toml` drop-ins, parsed with serde and
//! toml into typed settings. Unknown keys and bad values are errors that name the file, line and key.
//! Azure's quickstart environment variables override the files so the quickstart works unchanged.
//! Every key is documented in docs/configuration.md.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub mod batch;
mod checks;
mod endpoint;
mod files;
pub mod plugin;
pub mod proxy;

pub use endpoint::DpsEndpoint;

use plugin::PluginSpec;

/// The whole configuration, checked: only `Config::load` makes one, so the typed values below
/// always agree with the settings they come from.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub agent: AgentSettings,
    pub provisioning: Provisioning,
    pub hub: HubSettings,
    pub queue: QueueConfig,
    /// The `[[plugin]]` tables as specs, in file order (names unique).
    pub plugins: Vec<PluginSpec>,
    /// `provisioning.global_endpoint` parsed; `None` when `source = "manual"`.
    dps_endpoint: Option<DpsEndpoint>,
    /// The HTTP proxy in force (`[hub] proxy`, or `https_proxy` from the environment).
    proxy: Option<proxy::Proxy>,
}

/// The merged files as serde reads them, before the checks that span keys and the typing of the
/// `[[plugin]]` tables (whose errors name `plugin[i] (name).key` the way operators know).
#[derive(Deserialize)]
#[serde(rename = "Config", deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    agent: AgentSettings,
    provisioning: Provisioning,
    #[serde(default)]
    hub: HubSettings,
    #[serde(default)]
    queue: QueueConfig,
    #[serde(default)]
    plugin: Vec<toml::Table>,
}

/// Which sink to write to. `Auto` picks the journal when systemd connected our stderr to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Auto,
    Text,
    Json,
    Journal,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentSettings {
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// The control socket `hubagent status`/`reprovision`/`reload` talk to.
    #[serde(default = "default_control_socket")]
    pub control_socket: PathBuf,
    /// An env-filter directive: "info", "debug", "hubagent=debug,rumqttc=warn".
    #[serde(default = "default_log_level")]
    pub log_level: String,
    #[serde(default)]
    pub log_format: LogFormat,
    /// Load plugins from paths that are not root-owned or are writable by group/others. Only
    /// honoured when the daemon does not run as root (development and tests); docs/plugins.md.
    #[serde(default)]
    pub allow_unsafe_plugin_paths: bool,
    /// Whether a plugin may run when the kernel cannot confine it (docs/security.md).
    #[serde(default)]
    pub plugin_sandbox: SandboxMode,
    /// Where to write the agent's counters in Prometheus' text format (node-exporter's textfile
    /// collector); none by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_file: Option<PathBuf>,
    /// How often the metrics file is rewritten.
    #[serde(default = "default_metrics_interval", with = "humantime_serde")]
    pub metrics_interval: Duration,
}

fn default_metrics_interval() -> Duration {
    Duration::from_secs(15)
}

/// `[agent] plugin_sandbox`: what happens when the kernel lacks what the plugin sandbox uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SandboxMode {
    /// Confine plugins as far as the kernel allows; log and report what it cannot enforce.
    #[default]
    BestEffort,
    /// Refuse to start a plugin the kernel cannot confine (no Landlock or no seccomp).
    Required,
    /// No sandbox (development, or diagnosing a plugin the sandbox stops).
    Off,
}

impl Default for AgentSettings {
    fn default() -> Self {
        AgentSettings {
            state_dir: default_state_dir(),
            control_socket: default_control_socket(),
            log_level: default_log_level(),
            log_format: LogFormat::default(),
            allow_unsafe_plugin_paths: false,
            plugin_sandbox: SandboxMode::default(),
            metrics_file: None,
            metrics_interval: default_metrics_interval(),
        }
    }
}

fn default_state_dir() -> PathBuf {
    "/var/lib/hubagent".into()
}
fn default_control_socket() -> PathBuf {
    "/run/hubagent/control.sock".into()
}
fn default_log_level() -> String {
    "info".into()
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    #[default]
    Dps,
    Manual,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Provisioning {
    #[serde(default)]
    pub source: Source,
    /// DPS device endpoint: a host name, `host:port` or `mqtts://host:port`.
    #[serde(default = "default_global_endpoint")]
    pub global_endpoint: String,
    pub id_scope: Option<String>,
    pub registration_id: Option<String>,
    /// Custom allocation payload sent with the registration.
    pub payload: Option<toml::Table>,
    /// The device's IoT Plug and Play model (a DTMI, `dtmi:com:example:Gateway;1`): announced in
    /// the hub CONNECT (`model-id=`) and in the DPS registration payload (`modelId`).
    pub model_id: Option<String>,
    /// `manual`: the hub and device to use without DPS.
    pub iothub_hostname: Option<String>,
    pub device_id: Option<String>,
    /// `manual`: a device connection string instead of hostname + device id + key.
    pub connection_string: Option<Secret>,
    pub attestation: Option<Attestation>,
    /// Ask DPS for an operational certificate with every registration (Azure's certificate
    /// issuance preview; docs/credentials.md): the attestation stays the onboarding credential
    /// for DPS, the issued chain (with a key the agent makes) becomes the hub credential.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_certificate: Option<IssuedCertificate>,
}

/// `[provisioning.issued_certificate]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IssuedCertificate {
    /// The fraction of the issued certificate's lifetime after which the agent renews it
    /// (Microsoft's guidance: 80 %). Not part of the identity: changing it never reprovisions.
    #[serde(default = "default_renew_at")]
    pub renew_at: f64,
    /// Where the key of each issued certificate is made and kept; absent: in the TPM with TPM
    /// attestation, else in a file. Not in the fingerprint: a generation whose key is kept the
    /// other way is unusable, which makes the agent ask DPS for a new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<IssuedKeyStore>,
    /// The TPM for `key = "tpm"`; absent: the attestation's `tcti` with TPM attestation, else
    /// `device:/dev/tpmrm0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcti: Option<String>,
}

/// Where an issued certificate's key lives (`[provisioning.issued_certificate] key`).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum IssuedKeyStore {
    /// A PKCS#8 PEM file (0600) beside the certificate in the generation's directory.
    File,
    /// An ECDSA P-256 key generated by the TPM under its storage root key; its public part and
    /// its SRK-wrapped private part are kept beside the certificate.
    Tpm,
}

impl Provisioning {
    /// Where the issued certificates' keys live (`None` without `[provisioning.issued_certificate]`).
    pub fn issued_key_store(&self) -> Option<IssuedKeyStore> {
        let issued = self.issued_certificate.as_ref()?;
        Some(match issued.key {
            Some(store) => store,
            None if matches!(self.attestation, Some(Attestation::Tpm { .. })) => {
                IssuedKeyStore::Tpm
            }
            None => IssuedKeyStore::File,
        })
    }

    /// Whether this configuration uses a TPM: TPM attestation, or issued certificates whose keys
    /// the TPM keeps.
    pub fn uses_tpm(&self) -> bool {
        matches!(self.attestation, Some(Attestation::Tpm { .. }))
            || self.issued_key_store() == Some(IssuedKeyStore::Tpm)
    }

    /// The TPM that keeps the issued certificates' keys with `key = "tpm"`.
    pub fn issued_key_tcti(&self) -> String {
        if let Some(tcti) = self
            .issued_certificate
            .as_ref()
            .and_then(|i| i.tcti.clone())
        {
            return tcti;
        }
        match &self.attestation {
            Some(Attestation::Tpm { tcti, .. }) => tcti.clone(),
            _ => default_tcti(),
        }
    }
}

fn default_renew_at() -> f64 {
    0.8
}

fn default_global_endpoint() -> String {
    "global.azure-devices-provisioning.net".into()
}

impl Provisioning {
    fn apply_env(&mut self, env: &dyn Fn(&str) -> Option<String>) {
        if let Some(host) = env("PROVISIONING_HOST") {
            self.global_endpoint = host;
        }
        if let Some(scope) = env("PROVISIONING_IDSCOPE") {
            self.id_scope = Some(scope);
        }
        if let Some(id) = env("PROVISIONING_REGISTRATION_ID") {
            self.registration_id = Some(id);
        }
        if let Some(key) = env("PROVISIONING_SYMMETRIC_KEY") {
            self.attestation = Some(Attestation::SymmetricKey {
                key: Some(Secret::Value { value: key }),
                group_key: None,
                secondary_key: None,
            });
        }
    }

    /// DPS TPM attestation only exists over HTTPS (and AMQP), not MQTT.
    pub fn dps_over_https(&self) -> bool {
        matches!(
            self.attestation,
            Some(Attestation::Tpm {
                key_source: TpmKeySource::Attestation,
                ..
            })
        )
    }
}

/// Where a secret comes from. Inline values are allowed (quickstart style) but files are better:
/// the agent warns when a key file is readable by others. Deserialized by hand (see
/// `secret_serde`) so a mistake says what to write and never echoes the key.
#[derive(Clone, Serialize, PartialEq)]
#[serde(untagged)]
pub enum Secret {
    File { file: PathBuf },
    Value { value: String },
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Secret::File { file } => write!(f, "file {}", file.display()),
            Secret::Value { .. } => write!(f, "inline value (hidden)"),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(tag = "method", rename_all = "snake_case", deny_unknown_fields)]
pub enum Attestation {
    SymmetricKey {
        /// The device's own key (individual enrollment, or an already derived group key).
        key: Option<Secret>,
        /// An enrollment group's key: the agent derives the device key from it.
        group_key: Option<Secret>,
        /// The secondary key of the same kind (the device's, or the group's), tried when DPS
        /// refuses the one in use: keys can be rotated without a visit (docs/configuration.md).
        /// Not part of the identity: adding or changing it never reprovisions.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        secondary_key: Option<Secret>,
    },
    X509 {
        /// PEM certificate chain, leaf first.
        identity_cert: PathBuf,
        /// PEM private key (PKCS#8, SEC1 or PKCS#1).
        identity_pk: PathBuf,
        /// How long before the certificate expires the agent starts warning (log, status,
        /// `reported.agent.identity`). Not part of the identity: changing it never reprovisions.
        #[serde(default = "default_expiry_warning", with = "humantime_serde")]
        expiry_warning: Duration,
    },
    /// The device key lives in the TPM and every HMAC is computed there (feature `tpm`; docs/tpm.md).
    Tpm {
        /// How to reach the TPM: `device:/dev/tpmrm0` (the kernel resource manager) or
        /// `swtpm:host=127.0.0.1,port=2321` (a software TPM, for tests).
        #[serde(default = "default_tcti")]
        tcti: String,
        /// Persistent handle of the HMAC key: `0x81000100` (TOML integer or string).
        #[serde(default = "default_tpm_handle", with = "tpm_handle_serde")]
        handle: u32,
        /// Where the key in the TPM comes from.
        #[serde(default)]
        key_source: TpmKeySource,
        /// The owner hierarchy's authorization value, when the TPM's owner set one (a file, like
        /// every secret). Empty when absent, as on a TPM fresh from the factory.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner_auth: Option<Secret>,
        /// The endorsement hierarchy's authorization value, likewise.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        endorsement_auth: Option<Secret>,
    },
}

/// How the HMAC key at the TPM handle gets there.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TpmKeySource {
    /// DPS TPM attestation: the agent sends its EK and SRK, DPS answers with an activation blob
    /// that only this TPM can import (the key never exists outside DPS and the TPM).
    #[default]
    Attestation,
    /// A symmetric (or group-derived) key imported once with `hubagent tpm import-key`; the
    /// enrollment is an ordinary symmetric-key one.
    Imported,
}

fn default_tcti() -> String {
    "device:/dev/tpmrm0".into()
}

/// Where Azure's SDKs keep the DPS/hub key (`DPS_ID_KEY_HANDLE` in the C SDK).
pub const DEFAULT_TPM_HANDLE: u32 = 0x8100_0100;

fn default_tpm_handle() -> u32 {
    DEFAULT_TPM_HANDLE
}

/// Checks a persistent handle for the agent's key: owner persistent range (0x81000000-0x817FFFFF),
/// not the SRK (0x81000001) or an endorsement key (0x81010000-0x8101FFFF).
pub fn check_tpm_handle(handle: u32) -> Result<(), String> {
    if !(0x8100_0000..=0x817F_FFFF).contains(&handle) {
        return Err(format!(
            "{handle:#010x} is not an owner persistent handle (0x81000000-0x817fffff)"
        ));
    }
    if handle == 0x8100_0001 || (0x8101_0000..=0x8101_FFFF).contains(&handle) {
        return Err(format!(
            "{handle:#010x} is reserved for the storage root key or an endorsement key; use e.g. 0x81000100"
        ));
    }
    Ok(())
}

/// TPM handles as a TOML integer (`0x81000100`) or a string (`"0x81000100"`).
mod tpm_handle_serde {
    use serde::{Deserialize, Deserializer, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Number(u32),
        Text(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(n),
            Raw::Text(text) => super::parse_tpm_handle(&text).map_err(serde::de::Error::custom),
        }
    }

    pub fn serialize<S: Serializer>(v: &u32, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{v:#010x}"))
    }
}

/// `0x81000100` or a decimal number.
pub fn parse_tpm_handle(text: &str) -> Result<u32, String> {
    let t = text.trim();
    let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => t.parse(),
    };
    parsed.map_err(|_| format!("'{text}' is not a TPM handle (write e.g. 0x81000100)"))
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HubSettings {
    /// Extra CA certificates (PEM) trusted for DPS and the hub, besides the system roots.
    pub trust_bundle: Option<PathBuf>,
    /// MQTT port of DPS and the hub (Azure: 8883).
    #[serde(default = "default_port")]
    pub port: u16,
    /// How MQTT reaches DPS and the hub: `mqtt` (TLS on `port`) or `websockets` (inside a
    /// WebSocket on `websocket_port`, through firewalls that let only HTTPS out).
    #[serde(default)]
    pub transport: HubTransport,
    /// The HTTPS port MQTT over WebSockets uses (Azure: 443).
    #[serde(default = "default_websocket_port")]
    pub websocket_port: u16,
    /// An HTTP proxy every connection tunnels through (CONNECT): `http://[user@]host:port`.
    /// Without it, `https_proxy`/`HTTPS_PROXY` from the environment (`config::proxy`).
    pub proxy: Option<String>,
    /// The proxy user's password (`{ file = "..." }`, mode 0600, like every secret).
    pub proxy_password: Option<Secret>,
    #[serde(default = "default_keep_alive", with = "humantime_serde")]
    pub keep_alive: Duration,
    /// Lifetime of each SAS token the agent signs.
    #[serde(default = "default_sas_ttl", with = "humantime_serde")]
    pub sas_ttl: Duration,
    /// Reconnect with a fresh token this long before the current one expires.
    #[serde(default = "default_renew_before", with = "humantime_serde")]
    pub renew_before: Duration,
    #[serde(default = "default_backoff_max", with = "humantime_serde")]
    pub reconnect_backoff_max: Duration,
    /// The reconnect backoff's cap after the hub refused a connection with CONNACK 3 ("server
    /// unavailable"), when below `reconnect_backoff_max`: a hub that refuses at the MQTT level
    /// can only be asked again by an attempt, and this bounds how long its return goes unseen.
    #[serde(default = "default_unavailable_backoff_max", with = "humantime_serde")]
    pub unavailable_backoff_max: Duration,
    /// Largest telemetry message (body + properties); IoT Hub's limit is 256 KiB.
    #[serde(default = "default_max_message", with = "bytesize_serde")]
    pub max_message_size: u64,
    /// Telemetry messages in flight (sent, not yet acknowledged by the hub).
    #[serde(default = "default_inflight")]
    pub inflight: u16,
}

impl Default for HubSettings {
    fn default() -> Self {
        HubSettings {
            trust_bundle: None,
            port: default_port(),
            transport: HubTransport::default(),
            websocket_port: default_websocket_port(),
            proxy: None,
            proxy_password: None,
            keep_alive: default_keep_alive(),
            sas_ttl: default_sas_ttl(),
            renew_before: default_renew_before(),
            reconnect_backoff_max: default_backoff_max(),
            unavailable_backoff_max: default_unavailable_backoff_max(),
            max_message_size: default_max_message(),
            inflight: default_inflight(),
        }
    }
}

fn default_port() -> u16 {
    8883
}
fn default_websocket_port() -> u16 {
    443
}

/// `[hub] transport`.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum HubTransport {
    /// MQTT over TLS on `[hub] port` (8883).
    #[default]
    Mqtt,
    /// MQTT over WebSockets over TLS on `[hub] websocket_port` (443).
    Websockets,
    /// `port` first; when it cannot be reached, `websocket_port`; what worked last first.
    Auto,
}

impl HubSettings {
    /// The port the hub is dialled on, for the transport in use (`auto` starts on `port`).
    pub fn dial_port(&self) -> u16 {
        self.port_for(self.port)
    }

    /// The port a server whose MQTT port is `mqtt_port` is dialled on: over WebSockets it is
    /// the HTTPS port, whatever the MQTT endpoint says (DPS's MQTT port may not be the hub's).
    pub fn port_for(&self, mqtt_port: u16) -> u16 {
        match self.transport {
            HubTransport::Mqtt | HubTransport::Auto => mqtt_port,
            HubTransport::Websockets => self.websocket_port,
        }
    }

    /// Whether MQTT travels inside a WebSocket from the start (`auto` starts without).
    pub fn websocket(&self) -> bool {
        self.transport == HubTransport::Websockets
    }

    /// The routes to a server whose MQTT port is `mqtt_port`, in the order the agent tries them:
    /// (port, over WebSockets).
    pub fn routes(&self, mqtt_port: u16) -> Vec<(u16, bool)> {
        match self.transport {
            HubTransport::Auto => vec![(mqtt_port, false), (self.websocket_port, true)],
            HubTransport::Mqtt | HubTransport::Websockets => {
                vec![(self.port_for(mqtt_port), self.websocket())]
            }
        }
    }
}
/// A month: time for an operator to renew a certificate by hand (docs/configuration.md).
fn default_expiry_warning() -> Duration {
    Duration::from_secs(30 * 24 * 3600)
}

fn default_keep_alive() -> Duration {
    Duration::from_secs(60)
}
fn default_sas_ttl() -> Duration {
    Duration::from_secs(3600)
}
fn default_renew_before() -> Duration {
    Duration::from_secs(300)
}
fn default_backoff_max() -> Duration {
    Duration::from_secs(300)
}
/// 8 s: 4 to 8 s between attempts once grown (half of each pause random), so the agent is back
/// within 10 s of the hub accepting again; in the range Azure's device SDKs retry at by default
/// (docs/reliability.md).
fn default_unavailable_backoff_max() -> Duration {
    Duration::from_secs(8)
}
fn default_max_message() -> u64 {
    256 * 1024
}
fn default_inflight() -> u16 {
    32
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum FsyncPolicy {
    /// fdatasync before `push` returns: survives power loss.
    Always,
    /// write() before `push` returns (survives kill -9), fdatasync every `fsync_interval`.
    #[default]
    Interval,
    /// Leave it to the kernel.
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum FullPolicy {
    /// Drop the oldest segment to make room (counted in `dropped_full`).
    #[default]
    DropOldest,
    /// Refuse the new message: the source sees back-pressure.
    RejectNew,
}

/// The durable telemetry queue (`state_dir/queue`): see docs/queue.md.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    #[serde(default)]
    pub fsync: FsyncPolicy,
    #[serde(default = "default_fsync_interval", with = "humantime_serde")]
    pub fsync_interval: Duration,
    #[serde(default = "default_queue_bytes", with = "bytesize_serde")]
    pub max_bytes: u64,
    #[serde(default = "default_max_age", with = "humantime_serde")]
    pub max_age: Duration,
    #[serde(default)]
    pub full_policy: FullPolicy,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            fsync: Default::default(),
            fsync_interval: default_fsync_interval(),
            max_bytes: default_queue_bytes(),
            max_age: default_max_age(),
            full_policy: Default::default(),
        }
    }
}

fn default_fsync_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_queue_bytes() -> u64 {
    256 * 1024 * 1024
}
fn default_max_age() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}

/// Durations in human units ("90s", "5m", "1h 30m").
mod humantime_serde {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!(
                "'{text}' is not a duration ({e}); write e.g. \"90s\", \"5m\" or \"1h\""
            ))
        })
    }

    pub fn serialize<S: Serializer>(v: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*v).to_string())
    }
}

/// Sizes in human units ("256KiB", "1 MiB", "64kB") or a plain number of bytes.
mod bytesize_serde {
    use serde::{Deserialize, Deserializer, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Number(u64),
        Text(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(n),
            Raw::Text(text) => text
                .parse::<bytesize::ByteSize>()
                .map(|b| b.as_u64())
                .map_err(|e| {
                    serde::de::Error::custom(format!(
                        "'{text}' is not a size ({e}); write e.g. \"256KiB\" or \"1MiB\""
                    ))
                }),
        }
    }

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&bytesize::ByteSize(*v).to_string())
    }
}

/// A configuration problem, naming where it is.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A syntax or type error at a position in a file; `key` is the dotted key at that position
    /// (`hub.sas_ttl`), empty when the error is not inside one (a syntax error between keys).
    #[error("{path}:{line}:{column}: {key}{sep}{message}", sep = if key.is_empty() { "" } else { ": " })]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        key: String,
        message: String,
    },
    /// A setting that parsed but makes no sense with the others.
    #[error("{path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

/// The quickstart variables that override the file (Azure's own samples read these).
pub const ENV_OVERRIDES: [&str; 4] = [
    "PROVISIONING_HOST",
    "PROVISIONING_IDSCOPE",
    "PROVISIONING_REGISTRATION_ID",
    "PROVISIONING_SYMMETRIC_KEY",
];

impl Config {
    /// The lead time of certificate-expiry warnings (X.509 attestation only).
    pub fn certificate_expiry_warning(&self) -> Option<Duration> {
        match &self.provisioning.attestation {
            Some(Attestation::X509 { expiry_warning, .. }) => Some(*expiry_warning),
            // An issued certificate is watched like a configured one.
            _ if self.provisioning.issued_certificate.is_some() => Some(default_expiry_warning()),
            _ => None,
        }
    }

    /// Reads `path`, then `config.d/*.toml` beside it (lexical order; tables merge, later files
    /// win, `[[plugin]]` entries add up), then the quickstart environment variables from `env`.
    pub fn load(path: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let mut file: ConfigFile = files::read_merged(path)?;
        file.provisioning.apply_env(env);
        let invalid = |checks::Invalid { key, message }| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            message,
        };
        let mut config = Config::check(file).map_err(invalid)?;
        config.proxy = proxy::resolve(
            config.hub.proxy.as_deref(),
            config.hub.proxy_password.as_ref(),
            env,
        )
        .map_err(|message| {
            invalid(checks::Invalid {
                key: "hub.proxy".into(),
                message,
            })
        })?;
        Ok(config)
    }

    /// Whether `other` differs from this configuration in its `[[plugin]]` tables at most.
    pub fn same_but_plugins(&self, other: &Config) -> bool {
        let mut this = self.clone();
        this.plugins = other.plugins.clone();
        this == *other
    }

    /// A digest of what the files the hub session is built from read now: the credential
    /// secrets, the identity certificate and the trust bundle.
    pub fn connection_files_digest(&self) -> String {
        let mut files = self.credential_secret_files();
        if let Some(Attestation::X509 { identity_cert, .. }) = &self.provisioning.attestation {
            files.push(identity_cert.clone());
        }
        files.extend(self.hub.trust_bundle.clone());
        let mut content = Vec::new();
        for file in files {
            content.extend(file.as_os_str().as_encoded_bytes());
            content.push(0);
            content.extend(std::fs::read(&file).unwrap_or_default());
            content.push(0);
        }
        sha256_hex(&content)
    }

    /// The files holding the secrets of provisioning and the hub connection (not the plugins').
    fn credential_secret_files(&self) -> Vec<PathBuf> {
        let mut secrets: Vec<&Option<Secret>> = vec![
            &self.hub.proxy_password,
            &self.provisioning.connection_string,
        ];
        let mut files = Vec::new();
        match &self.provisioning.attestation {
            Some(Attestation::SymmetricKey {
                key,
                group_key,
                secondary_key,
            }) => secrets.extend([key, group_key, secondary_key]),
            Some(Attestation::Tpm {
                owner_auth,
                endorsement_auth,
                ..
            }) => secrets.extend([owner_auth, endorsement_auth]),
            Some(Attestation::X509 { identity_pk, .. }) => files.push(identity_pk.clone()),
            None => {}
        }
        for secret in secrets.into_iter().flatten() {
            if let Secret::File { file } = secret {
                files.push(file.clone());
            }
        }
        files
    }

    /// Every file holding a secret the configuration names: the attestation's keys and
    /// passwords, the proxy password, the plugins' settings secrets.
    pub fn secret_files(&self) -> Vec<PathBuf> {
        let mut files = self.credential_secret_files();
        for plugin in &self.plugins {
            let references = plugin::secret_references(&plugin.settings);
            files.extend(references.into_iter().map(|(_, file)| PathBuf::from(file)));
        }
        files
    }

    /// The proxy a connection to `host` goes through, if any (`no_proxy` excludes hosts).
    pub fn proxy_for(&self, host: &str) -> Option<&proxy::Proxy> {
        self.proxy.as_ref().filter(|p| p.applies_to(host))
    }

    /// The checks serde cannot make, in the order operators have always seen their errors.
    fn check(file: ConfigFile) -> Result<Config, checks::Invalid> {
        let p = &file.provisioning;
        let dps_endpoint = match p.source {
            Source::Dps => Some(checks::dps_settings(p, file.hub.port)?),
            Source::Manual => {
                checks::manual_settings(p)?;
                None
            }
        };
        checks::key_sources(p)?;
        checks::issued_certificate(p)?;
        checks::model_id(p)?;
        checks::hub_and_queue_limits(&file.hub, &file.queue)?;
        let plugins = checks::plugin_specs(&file.plugin)?;
        Ok(Config {
            agent: file.agent,
            provisioning: file.provisioning,
            hub: file.hub,
            queue: file.queue,
            plugins,
            dps_endpoint,
            proxy: None,
        })
    }

    /// A digest of every setting that decides the DPS registration. When it changes (new scope,
    /// registration id, endpoint or key source) the cached assignment is stale and the agent
    /// reprovisions. Inline secrets enter as their own digest, never as text.
    pub fn provisioning_fingerprint(&self) -> String {
        let p = &self.provisioning;
        let secret = |s: &Option<Secret>| match s {
            None => "-".to_string(),
            Some(Secret::File { file }) => format!("file:{}", file.display()),
            Some(Secret::Value { value }) => {
                format!("value-sha256:{}", sha256_hex(value.as_bytes()))
            }
        };
        let attestation = match &p.attestation {
            None => "-".to_string(),
            Some(Attestation::SymmetricKey { key, group_key, .. }) => {
                format!(
                    "symmetric_key;key={};group_key={}",
                    secret(key),
                    secret(group_key)
                )
            }
            Some(Attestation::X509 {
                identity_cert,
                identity_pk,
                ..
            }) => format!(
                "x509;cert={};pk={}",
                identity_cert.display(),
                identity_pk.display()
            ),
            // The hierarchy authorizations unlock the TPM; they do not change the identity.
            Some(Attestation::Tpm {
                tcti,
                handle,
                key_source,
                ..
            }) => {
                format!("tpm;tcti={tcti};handle={handle:#010x};key_source={key_source:?}")
            }
        };
        // Asking for issued certificates (or no longer) needs a registration; the fraction does not.
        let attestation = match p.issued_certificate {
            Some(_) => format!("{attestation};issued_certificate"),
            None => attestation,
        };
        let canonical = format!(
            "source={:?}\nendpoint={}\nport={}\nscope={}\nregistration_id={}\npayload={}\nhub={}\ndevice={}\nconnection_string={}\nattestation={}",
            p.source,
            p.global_endpoint.to_ascii_lowercase(),
            self.hub.port,
            p.id_scope.as_deref().unwrap_or("-").to_ascii_lowercase(),
            p.registration_id.as_deref().unwrap_or("-"),
            p.payload
                .as_ref()
                .map(|t| t.to_string())
                .unwrap_or_else(|| "-".into()),
            p.iothub_hostname.as_deref().unwrap_or("-"),
            p.device_id.as_deref().unwrap_or("-"),
            secret(&p.connection_string),
            attestation,
        );
        // Added only when set, so that configurations without one keep their fingerprint (and
        // their cached assignment) across the upgrade that introduced it.
        let canonical = match &p.model_id {
            Some(model_id) => format!("{canonical}\nmodel_id={model_id}"),
            None => canonical,
        };
        sha256_hex(canonical.as_bytes())
    }

    /// DPS TPM attestation only exists over HTTPS (and AMQP), not MQTT.
    pub fn dps_over_https(&self) -> bool {
        self.provisioning.dps_over_https()
    }

    /// Host and port of DPS (HTTPS for TPM attestation, else MQTT); `None` when
    /// `source = "manual"`, which registers nowhere.
    pub fn dps_endpoint(&self) -> Option<&DpsEndpoint> {
        self.dps_endpoint.as_ref()
    }

    /// The DPS registration payload as JSON: the custom allocation payload, with `modelId` added
    /// when `model_id` is set (as Azure's SDKs send it: `{"modelId": "dtmi:…;1"}`).
    pub fn payload_json(&self) -> Option<serde_json::Value> {
        let mut payload = self
            .provisioning
            .payload
            .as_ref()
            .and_then(|t| serde_json::to_value(t).ok());
        if let Some(model_id) = &self.provisioning.model_id {
            let object = payload.get_or_insert_with(|| serde_json::json!({}));
            if let Some(object) = object.as_object_mut() {
                object.insert("modelId".into(), model_id.clone().into());
            }
        }
        payload
    }
}

fn sha256_hex(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// DPS registration id rules (case-insensitive alphanumerics and `-._:`).
pub fn valid_registration_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._:".contains(c))
        && id
            .chars()
            .last()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// An IoT Plug and Play model id: a DTMI with a version, `dtmi:<segment>(:<segment>)*;<version>`
/// (https://azure.github.io/opendigitaltwins-dtdl/DTMI): segments of letters, digits and
/// underscores, not starting with a digit nor ending with an underscore; the version 1 to
/// 999999999 without leading zeros; at most 128 characters, the DTDL limit for an interface's id.
pub fn valid_model_id(id: &str) -> bool {
    let Some(rest) = id.strip_prefix("dtmi:") else {
        return false;
    };
    let Some((path, version)) = rest.split_once(';') else {
        return false;
    };
    let segment_ok = |s: &str| {
        let first = s.chars().next();
        first.is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && !s.ends_with('_')
            && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    let version_ok = !version.is_empty()
        && version.len() <= 9
        && !version.starts_with('0')
        && version.chars().all(|c| c.is_ascii_digit());
    id.len() <= 128 && path.split(':').all(segment_ok) && version_ok
}

/// A key source is `{ file = "…" }` or `{ value = "…" }`. Hand-written so that mistakes say what
/// to write, and so that a bare string (likely the key itself) is never echoed in an error.
mod secret_serde {
    use std::fmt;

    use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};

    use super::Secret;

    const HINT: &str =
        "a key source is { file = \"/path/to/key\" } or { value = \"<base64 key>\" }";

    impl<'de> Deserialize<'de> for Secret {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Secret, D::Error> {
            // deserialize_any: a string goes to visit_str below, which does not echo it.
            d.deserialize_any(SecretVisitor)
        }
    }

    struct SecretVisitor;

    impl<'de> Visitor<'de> for SecretVisitor {
        type Value = Secret;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(HINT)
        }

        fn visit_str<E: de::Error>(self, _: &str) -> Result<Secret, E> {
            Err(E::custom(format!(
                "a bare string is not a key source (its text is not shown); {HINT}"
            )))
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Secret, A::Error> {
            let mut found = None;
            while let Some(name) = map.next_key::<String>()? {
                let secret = match name.as_str() {
                    "file" => Secret::File {
                        file: map.next_value()?,
                    },
                    "value" => Secret::Value {
                        value: map.next_value()?,
                    },
                    other => {
                        return Err(de::Error::custom(format!(
                            "unknown field `{other}`: {HINT}"
                        )));
                    }
                };
                if found.is_some() {
                    return Err(de::Error::custom(format!(
                        "give file or value, not both: {HINT}"
                    )));
                }
                found = Some(secret);
            }
            found.ok_or_else(|| de::Error::custom(format!("empty: {HINT}")))
        }
    }
}

impl Config {
    /// One line for `hubagent config check`: where the agent will provision or connect, with
    /// what kind of credential, and where it keeps state. Never shows key material.
    pub fn summary(&self) -> String {
        let p = &self.provisioning;
        let source = |s: &Secret| match s {
            Secret::File { file } => format!("file {}", file.display()),
            Secret::Value { .. } => "inline value".to_string(),
        };
        let attestation = match &p.attestation {
            None => None,
            Some(Attestation::SymmetricKey { key: Some(k), .. }) => {
                Some(format!("symmetric key from {}", source(k)))
            }
            Some(Attestation::SymmetricKey {
                group_key: Some(k), ..
            }) => Some(format!("device key derived from group key {}", source(k))),
            Some(Attestation::SymmetricKey { .. }) => Some("symmetric key".to_string()),
            Some(Attestation::X509 { identity_cert, .. }) => {
                Some(format!("X.509 certificate {}", identity_cert.display()))
            }
            Some(Attestation::Tpm { tcti, .. }) => Some(format!("TPM at {tcti}")),
        };
        let mut parts = match p.source {
            Source::Dps => vec![
                format!("DPS {}", p.global_endpoint),
                format!("id scope {}", p.id_scope.as_deref().unwrap_or("-")),
                format!(
                    "registration id {}",
                    p.registration_id.as_deref().unwrap_or(match p.attestation {
                        Some(Attestation::Tpm { .. }) => "from the TPM's endorsement key",
                        _ => "from the certificate CN",
                    })
                ),
            ],
            Source::Manual => match (&p.connection_string, &p.iothub_hostname) {
                (Some(cs), _) => vec![format!("manual, connection string from {}", source(cs))],
                (None, hub) => vec![
                    format!("manual, hub {}", hub.as_deref().unwrap_or("-")),
                    format!("device {}", p.device_id.as_deref().unwrap_or("-")),
                ],
            },
        };
        parts.extend(attestation);
        parts.push(format!("{} plugin(s)", self.plugins.len()));
        parts.push(format!("state in {}", self.agent.state_dir.display()));
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::endpoint::{parse_endpoint, parse_https_endpoint};
    use super::*;

    const GOOD: &str = r#"
[provisioning]
source = "dps"
global_endpoint = "mqtts://localhost:8883"
id_scope = "0ne00000001"
registration_id = "gw-1"

[provisioning.attestation]
method = "symmetric_key"
key = { file = "/etc/hubagent/device.key" }

[hub]
sas_ttl = "2h"
max_message_size = "128KiB"
"#;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn a_dropin_may_change_the_key_alone_and_merge_errors_point_at_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "config.toml", GOOD);
        write(
            dir.path(),
            "config.d/10-key.toml",
            "[provisioning.attestation]\nkey = { file = \"/etc/hubagent/other.key\" }\n",
        );
        let config = Config::load(&path, &no_env).unwrap();
        assert_eq!(
            config.provisioning.attestation,
            Some(Attestation::SymmetricKey {
                key: Some(Secret::File {
                    file: "/etc/hubagent/other.key".into()
                }),
                group_key: None,
                secondary_key: None,
            })
        );
        // Each file alone is fine; merged, an x509 field sits in a symmetric_key attestation.
        write(
            dir.path(),
            "config.d/20-cert.toml",
            "\n[provisioning.attestation]\nidentity_cert = \"/c.pem\"\n",
        );
        let err = Config::load(&path, &no_env).unwrap_err().to_string();
        assert!(
            err.contains("20-cert.toml:3:1: provisioning.attestation.identity_cert:"),
            "{err}"
        );
    }

    #[test]
    fn model_id_is_a_dtmi_added_to_the_dps_payload_and_the_fingerprint() {
        for good in [
            "dtmi:com:example:Thermostat;1",
            "dtmi:YOUR_COMPANY_NAME_HERE:sample_device;1",
            "dtmi:a;999999999",
        ] {
            assert!(valid_model_id(good), "{good}");
        }
        for bad in [
            "",
            "dtmi:com:example:Thermostat",
            "dtmi:com:example:Thermostat;0",
            "dtmi:com:example:Thermostat;01",
            "dtmi:com:example:Thermostat;1.2.3",
            "dtmi:com:9example;1",
            "dtmi:com:example_;1",
            "dtmi:com::example;1",
            "dtmi:com:exa-mple;1",
            "DTMI:com:example;1",
            "urn:com:example;1",
            "dtmi:;1",
        ] {
            assert!(!valid_model_id(bad), "{bad}");
        }
        assert!(!valid_model_id(&format!("dtmi:{};1", "a".repeat(130))));

        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "config.toml", GOOD);
        let base = Config::load(&path, &no_env).unwrap();
        assert_eq!(base.payload_json(), None);
        let with_model = GOOD.replace(
            "registration_id = \"gw-1\"\n",
            "registration_id = \"gw-1\"\nmodel_id = \"dtmi:com:example:Gateway;2\"\npayload = { site = \"north\" }\n",
        );
        write(dir.path(), "config.toml", &with_model);
        let config = Config::load(&path, &no_env).unwrap();
        assert_eq!(
            config.payload_json(),
            Some(serde_json::json!({"site": "north", "modelId": "dtmi:com:example:Gateway;2"}))
        );
        assert_ne!(
            base.provisioning_fingerprint(),
            config.provisioning_fingerprint()
        );

        let bad = GOOD.replace(
            "registration_id = \"gw-1\"\n",
            "registration_id = \"gw-1\"\nmodel_id = \"com.example.Gateway\"\n",
        );
        write(dir.path(), "config.toml", &bad);
        let err = Config::load(&path, &no_env).unwrap_err().to_string();
        assert!(
            err.contains("provisioning.model_id") && err.contains("'com.example.Gateway'"),
            "{err}"
        );
        let twice = GOOD.replace(
            "registration_id = \"gw-1\"\n",
            "registration_id = \"gw-1\"\nmodel_id = \"dtmi:a;1\"\npayload = { modelId = \"dtmi:b;1\" }\n",
        );
        write(dir.path(), "config.toml", &twice);
        let err = Config::load(&path, &no_env).unwrap_err().to_string();
        assert!(err.contains("provisioning.payload.modelId"), "{err}");
    }

    #[test]
    fn key_source_mistakes_point_at_their_line_and_never_echo_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let text = GOOD.replace(
            "key = { file = \"/etc/hubagent/device.key\" }",
            "key = \"c2VjcmV0a2V5\"",
        );
        let err = Config::load(&write(dir.path(), "config.toml", &text), &no_env)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("config.toml:10:7: provisioning.attestation.key:"),
            "{err}"
        );
        assert!(err.contains("{ file = "), "{err}");
        assert!(!err.contains("c2VjcmV0a2V5"), "{err}");
    }

    #[test]
    fn each_transport_dials_its_port_and_auto_tries_mqtt_then_websockets() {
        let hub = |transport| HubSettings {
            transport,
            port: 8884,
            websocket_port: 8443,
            ..HubSettings::default()
        };
        let mqtt = hub(HubTransport::Mqtt);
        assert_eq!((mqtt.dial_port(), mqtt.websocket()), (8884, false));
        assert_eq!(mqtt.routes(8885), vec![(8885, false)]);
        let websockets = hub(HubTransport::Websockets);
        assert_eq!(
            (websockets.dial_port(), websockets.websocket()),
            (8443, true)
        );
        // DPS's MQTT port says nothing about its HTTPS port.
        assert_eq!(websockets.port_for(8885), 8443);
        assert_eq!(websockets.routes(8885), vec![(8443, true)]);
        let auto = hub(HubTransport::Auto);
        assert_eq!((auto.dial_port(), auto.websocket()), (8884, false));
        assert_eq!(auto.routes(8885), vec![(8885, false), (8443, true)]);
    }

    #[test]
    fn a_missing_provisioning_section_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "config.toml",
            "[agent]\nlog_level = \"debug\"\n",
        );
        let err = Config::load(&path, &no_env).unwrap_err().to_string();
        assert!(err.contains("config.toml: provisioning: missing"), "{err}");
    }

    #[test]
    fn plugin_keys_are_named_with_their_index() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "{GOOD}\n[[plugin]]\nname = \"a\"\nkind = \"exec\"\ncommand = [\"/bin/true\"]\n\n[[plugin]]\nname = \"b\"\nkind = \"exec\"\ncommand = [\"/bin/true\"]\n[plugin.settings]\nx = 1\n"
        );
        let config = Config::load(&write(dir.path(), "config.toml", &text), &no_env).unwrap();
        assert_eq!(config.plugins.len(), 2);
        assert_eq!(config.plugins[1].name, "b");
        assert_eq!(config.plugins[1].settings["x"], 1);
        // Where a key inside such a table is reported: files::tests.
        let text = text.replace("name = \"b\"", "name = \"a\"");
        let err = Config::load(&write(dir.path(), "config.toml", &text), &no_env)
            .unwrap_err()
            .to_string();
        assert!(
            err.ends_with("config.toml: plugin[1].name: plugin name 'a' is used twice"),
            "{err}"
        );
    }

    #[test]
    fn a_good_file_parses_with_defaults_and_units() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::load(&write(dir.path(), "config.toml", GOOD), &no_env).unwrap();
        assert_eq!(config.hub.sas_ttl, Duration::from_secs(7200));
        assert_eq!(config.hub.max_message_size, 128 * 1024);
        assert_eq!(config.hub.keep_alive, Duration::from_secs(60));
        assert_eq!(config.agent.state_dir, PathBuf::from("/var/lib/hubagent"));
        assert_eq!(
            parse_endpoint(&config.provisioning.global_endpoint, 8883).unwrap(),
            ("localhost".to_string(), 8883)
        );
    }

    #[test]
    fn issued_certificate_takes_a_fraction_and_joins_the_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let with = |table: &str| {
            let text = GOOD.replace("[hub]", &format!("{table}\n[hub]"));
            Config::load(&write(dir.path(), "config.toml", &text), &no_env)
        };
        let plain = with("").unwrap();
        let issued = with("[provisioning.issued_certificate]").unwrap();
        assert_eq!(
            issued
                .provisioning
                .issued_certificate
                .as_ref()
                .unwrap()
                .renew_at,
            0.8
        );
        assert_ne!(
            plain.provisioning_fingerprint(),
            issued.provisioning_fingerprint(),
            "asking for issued certificates needs a registration"
        );
        let half = with("[provisioning.issued_certificate]\nrenew_at = 0.5").unwrap();
        assert_eq!(
            half.provisioning_fingerprint(),
            issued.provisioning_fingerprint(),
            "the fraction is not part of the identity"
        );
        for bad in ["0", "1", "1.5", "-0.2"] {
            let err = with(&format!(
                "[provisioning.issued_certificate]\nrenew_at = {bad}"
            ))
            .unwrap_err()
            .to_string();
            assert!(
                err.contains("provisioning.issued_certificate.renew_at")
                    && err.contains("between 0 and 1"),
                "{bad}: {err}"
            );
        }
        let err = with("[provisioning.issued_certificate]\nrenew = 0.5")
            .unwrap_err()
            .to_string();
        assert!(err.contains("renew"), "{err}");
    }

    #[test]
    fn an_issued_certificate_key_is_kept_in_a_file_or_the_tpm() {
        let dir = tempfile::tempdir().unwrap();
        let with = |table: &str| {
            let text = GOOD.replace("[hub]", &format!("{table}\n[hub]"));
            Config::load(&write(dir.path(), "config.toml", &text), &no_env)
        };
        // A symmetric-key onboarding keeps the key in a file unless told otherwise.
        let file = with("[provisioning.issued_certificate]").unwrap();
        assert_eq!(
            file.provisioning.issued_key_store(),
            Some(IssuedKeyStore::File)
        );
        let err = with("[provisioning.issued_certificate]\ntcti = \"device:/dev/tpmrm0\"")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("provisioning.issued_certificate.tcti") && err.contains("key = \"tpm\""),
            "{err}"
        );
        let tpm = with("[provisioning.issued_certificate]\nkey = \"tpm\"");
        if cfg!(feature = "tpm") {
            let tpm = tpm.unwrap();
            assert_eq!(
                tpm.provisioning.issued_key_store(),
                Some(IssuedKeyStore::Tpm)
            );
            assert_eq!(tpm.provisioning.issued_key_tcti(), "device:/dev/tpmrm0");
            assert_eq!(
                tpm.provisioning_fingerprint(),
                file.provisioning_fingerprint(),
                "where the key lives is not part of the identity"
            );
        } else {
            let err = tpm.unwrap_err().to_string();
            assert!(
                err.contains("provisioning.issued_certificate.key") && err.contains("TPM support"),
                "{err}"
            );
        }
        let err = with("[provisioning.issued_certificate]\nkey = \"hsm\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("hsm"), "{err}");
    }

    #[test]
    fn keep_alive_is_refused_above_what_iot_hub_honours() {
        let dir = tempfile::tempdir().unwrap();
        let with = |keep_alive: &str| {
            let text = GOOD.replace(
                "sas_ttl = \"2h\"",
                &format!("sas_ttl = \"2h\"\nkeep_alive = \"{keep_alive}\""),
            );
            Config::load(&write(dir.path(), "config.toml", &text), &no_env)
        };
        let config = with("1177s").unwrap();
        assert_eq!(config.hub.keep_alive, Duration::from_secs(1177));
        let err = with("1178s").unwrap_err().to_string();
        assert!(err.contains("hub.keep_alive"), "{err}");
        assert!(err.contains("1177s"), "names the limit: {err}");
        assert!(err.contains("19m 38s"), "names the value: {err}");
        assert!(with("1s").is_ok());
        let err = with("0s").unwrap_err().to_string();
        assert!(
            err.contains("hub.keep_alive") && err.contains("at least 1s"),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_name_file_line_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let text = GOOD.replace("sas_ttl = \"2h\"", "sas_ttl = \"2h\"\nsas_tll = \"1h\"");
        let path = write(dir.path(), "config.toml", &text);
        let err = Config::load(&path, &no_env).unwrap_err().to_string();
        assert!(err.contains("config.toml:14:"), "{err}");
        assert!(err.contains("sas_tll"), "{err}");
    }

    #[test]
    fn bad_durations_and_sizes_say_what_to_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "config.toml",
            &GOOD.replace("\"2h\"", "\"soon\""),
        );
        let err = Config::load(&path, &no_env).unwrap_err().to_string();
        assert!(err.contains("'soon' is not a duration"), "{err}");
        assert!(err.contains("config.toml:13:"), "{err}");
        let path = write(
            dir.path(),
            "config.toml",
            &GOOD.replace("\"128KiB\"", "\"lots\""),
        );
        let err = Config::load(&path, &no_env).unwrap_err().to_string();
        assert!(err.contains("'lots' is not a size"), "{err}");
    }

    #[test]
    fn dropins_override_and_env_overrides_both() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "config.toml", GOOD);
        write(
            dir.path(),
            "config.d/10-scope.toml",
            "[provisioning]\nid_scope = \"0ne0000000A\"\n",
        );
        let config = Config::load(&path, &no_env).unwrap();
        assert_eq!(config.provisioning.id_scope.as_deref(), Some("0ne0000000A"));
        let env = |k: &str| match k {
            "PROVISIONING_IDSCOPE" => Some("0neFROMENV".to_string()),
            "PROVISIONING_SYMMETRIC_KEY" => Some("a2V5".to_string()),
            _ => None,
        };
        let config = Config::load(&path, &env).unwrap();
        assert_eq!(config.provisioning.id_scope.as_deref(), Some("0neFROMENV"));
        assert!(matches!(
            config.provisioning.attestation,
            Some(Attestation::SymmetricKey {
                key: Some(Secret::Value { .. }),
                ..
            })
        ));
        // A type error inside a drop-in points at the drop-in.
        write(
            dir.path(),
            "config.d/20-bad.toml",
            "[hub]\nport = \"eighty\"\n",
        );
        let err = Config::load(&path, &no_env).unwrap_err().to_string();
        assert!(err.contains("20-bad.toml:2:"), "{err}");
    }

    #[test]
    fn missing_scope_and_both_keys_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "config.toml",
            &GOOD.replace("id_scope = \"0ne00000001\"\n", ""),
        );
        let err = Config::load(&path, &no_env).unwrap_err().to_string();
        assert!(err.contains("provisioning.id_scope"), "{err}");
        let both = GOOD.replace(
            "key = { file = \"/etc/hubagent/device.key\" }",
            "key = { file = \"/a\" }\ngroup_key = { file = \"/b\" }",
        );
        let err = Config::load(&write(dir.path(), "config.toml", &both), &no_env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("either key or group_key"), "{err}");
    }

    #[test]
    fn fingerprint_follows_provisioning_settings_only() {
        let dir = tempfile::tempdir().unwrap();
        let base = Config::load(&write(dir.path(), "config.toml", GOOD), &no_env).unwrap();
        let same = Config::load(
            &write(dir.path(), "config.toml", &GOOD.replace("\"2h\"", "\"3h\"")),
            &no_env,
        )
        .unwrap();
        assert_eq!(
            base.provisioning_fingerprint(),
            same.provisioning_fingerprint()
        );
        let moved = Config::load(
            &write(
                dir.path(),
                "config.toml",
                &GOOD.replace("0ne00000001", "0ne00000002"),
            ),
            &no_env,
        )
        .unwrap();
        assert_ne!(
            base.provisioning_fingerprint(),
            moved.provisioning_fingerprint()
        );
        let inline = |key: &str| {
            Config::load(
                &write(
                    dir.path(),
                    "config.toml",
                    &GOOD.replace(
                        "key = { file = \"/etc/hubagent/device.key\" }",
                        &format!("key = {{ value = \"{key}\" }}"),
                    ),
                ),
                &no_env,
            )
            .unwrap()
            .provisioning_fingerprint()
        };
        assert_ne!(inline("a2V5MQ=="), inline("a2V5Mg=="));
    }

    #[test]
    fn tpm_settings_parse_and_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in [
            (
                "dps-tpm.toml",
                include_str!("../../../config/examples/dps-tpm.toml"),
            ),
            (
                "dps-tpm-imported-key.toml",
                include_str!("../../../config/examples/dps-tpm-imported-key.toml"),
            ),
        ] {
            let config = Config::load(&write(dir.path(), name, text), &no_env)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let Some(Attestation::Tpm { handle, tcti, .. }) = &config.provisioning.attestation
            else {
                panic!("{name}")
            };
            assert_eq!(*handle, 0x8100_0100);
            assert_eq!(tcti, "device:/dev/tpmrm0");
        }
        let attest = Config::load(
            &write(
                dir.path(),
                "a.toml",
                include_str!("../../../config/examples/dps-tpm.toml"),
            ),
            &no_env,
        )
        .unwrap();
        assert!(attest.dps_over_https());
        assert_eq!(
            attest.dps_endpoint().map(|e| (e.host.as_str(), e.port)),
            Some(("global.azure-devices-provisioning.net", 443))
        );
        assert_eq!(
            parse_https_endpoint("https://localhost:8443").unwrap(),
            ("localhost".to_string(), 8443)
        );
        assert_eq!(
            parse_https_endpoint("mqtts://dps.example:8883").unwrap(),
            ("dps.example".to_string(), 443)
        );

        let tpm = |extra: &str| {
            format!(
                "[provisioning]\nid_scope = \"0ne1\"\n{extra}\n[provisioning.attestation]\nmethod = \"tpm\"\n"
            )
        };
        // Defaults: DPS attestation at 0x81000100 over /dev/tpmrm0; no registration id needed.
        let config = Config::load(&write(dir.path(), "b.toml", &tpm("")), &no_env).unwrap();
        assert_eq!(
            config.provisioning.attestation,
            Some(Attestation::Tpm {
                tcti: "device:/dev/tpmrm0".into(),
                handle: DEFAULT_TPM_HANDLE,
                key_source: TpmKeySource::Attestation,
                owner_auth: None,
                endorsement_auth: None,
            })
        );
        // The handle as a string, and the reserved ones refused with the key named.
        let text = tpm("") + "handle = \"0x81000101\"\n";
        let config = Config::load(&write(dir.path(), "c.toml", &text), &no_env).unwrap();
        assert!(matches!(
            config.provisioning.attestation,
            Some(Attestation::Tpm {
                handle: 0x8100_0101,
                ..
            })
        ));
        for bad in ["0x81010001", "0x81000001", "0x01000000"] {
            let text = tpm("") + &format!("handle = {bad}\n");
            let err = Config::load(&write(dir.path(), "d.toml", &text), &no_env)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("provisioning.attestation.handle"),
                "{bad}: {err}"
            );
        }
        let text = tpm("") + "handle = \"eighty-one\"\n";
        let err = Config::load(&write(dir.path(), "e.toml", &text), &no_env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a TPM handle"), "{err}");
        // An imported key is an ordinary symmetric-key enrollment: the id is required.
        let text = tpm("") + "key_source = \"imported\"\n";
        let err = Config::load(&write(dir.path(), "f.toml", &text), &no_env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("provisioning.registration_id"), "{err}");
        // The fingerprint follows the handle and the key source.
        let a = Config::load(&write(dir.path(), "g.toml", &tpm("")), &no_env).unwrap();
        let text = tpm("") + "handle = 0x81000102\n";
        let b = Config::load(&write(dir.path(), "h.toml", &text), &no_env).unwrap();
        assert_ne!(a.provisioning_fingerprint(), b.provisioning_fingerprint());
    }

    #[test]
    fn registration_ids_follow_dps_rules() {
        assert!(valid_registration_id("gw-01.site_a:1"));
        assert!(!valid_registration_id("gw 01"));
        assert!(!valid_registration_id("gw."));
        assert!(!valid_registration_id(&"a".repeat(129)));
    }

    /// The fingerprint is stored with the cached assignment: if it changed for the same settings,
    /// every device would register again after an upgrade. These values were computed by the
    /// agent before the configuration was parsed once into typed values; they must not move.
    #[test]
    fn fingerprints_of_fixed_settings_never_change() {
        let pinned = [
            (
                "[provisioning]\nglobal_endpoint = \"mqtts://DPS.example:8883\"\nid_scope = \"0NE00000001\"\nregistration_id = \"gw-1\"\npayload = { site = \"north\", rack = 7 }\n\n[provisioning.attestation]\nmethod = \"symmetric_key\"\ngroup_key = { value = \"a2V5MQ==\" }\n\n[hub]\nport = 8884\n",
                "194ced90c732440398a183301af527d4e35bda738c81043e781006eaf2d0f255",
            ),
            (
                "[provisioning]\nid_scope = \"0ne00000002\"\n\n[provisioning.attestation]\nmethod = \"x509\"\nidentity_cert = \"/etc/hubagent/cert.pem\"\nidentity_pk = \"/etc/hubagent/key.pem\"\n",
                "65ddfed1f0e3212b4e62b41472914c369291292f06edaead805f3b97f2a948c4",
            ),
            (
                "[provisioning]\nid_scope = \"0ne00000003\"\n\n[provisioning.attestation]\nmethod = \"tpm\"\nhandle = 0x81000102\nowner_auth = { file = \"/etc/hubagent/owner\" }\n",
                "20852d5baaebc03ee40901edc7f8e2c3766bec3db7cad9bc9bdfd82982bdf1d5",
            ),
            (
                "[provisioning]\nsource = \"manual\"\nconnection_string = { file = \"/etc/hubagent/cs\" }\n",
                "fdb65a4f60e847b134c3ac95eb23bb8d60be38a6e5b96b738265591439a9b503",
            ),
        ];
        let dir = tempfile::tempdir().unwrap();
        for (text, fingerprint) in pinned {
            let config = Config::load(&write(dir.path(), "config.toml", text), &no_env).unwrap();
            assert_eq!(config.provisioning_fingerprint(), fingerprint, "{text}");
        }
    }
}
