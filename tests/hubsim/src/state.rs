//! The simulator's state: what Azure keeps in its DPS and IoT Hub databases (persisted to
//! `state.json`), what only lives while hubsim runs (live connections, records of traffic,
//! pending operations), and the fault switches tests flip.
//!
//! Every front end (MQTT devices, HTTPS device API, management API) works on one [`Sim`].

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::journal::{Persistence, Syncer};

/// A JSON object, as twins and payloads are.
pub type JsonObject = Map<String, Value>;

// ---------------------------------------------------------------------------------------------
// Persisted model (shaped like Azure's service REST API bodies, camelCase on the wire)
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SymmetricKeyPair {
    /// Empty when a client asks hubsim to generate it (as Azure does).
    #[serde(default)]
    pub primary_key: String,
    #[serde(default)]
    pub secondary_key: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CertificateRef {
    /// PEM (or base64 DER, as Azure also accepts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
    /// Filled in by hubsim from the certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CertificatePair {
    pub primary: Option<CertificateRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary: Option<CertificateRef>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct X509Attestation {
    /// Individual enrollments: the device's own certificate (thumbprint match).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificates: Option<CertificatePair>,
    /// Enrollment groups: a root or intermediate CA the device chain must lead to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_certificates: Option<CertificatePair>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TpmAttestation {
    /// base64 of the marshalled TPM2B_PUBLIC of the EK.
    pub endorsement_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_root_key: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum Attestation {
    #[serde(rename_all = "camelCase")]
    SymmetricKey {
        symmetric_key: SymmetricKeyPair,
    },
    X509 {
        x509: X509Attestation,
    },
    Tpm {
        tpm: TpmAttestation,
    },
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum AllocationPolicy {
    #[default]
    Hashed,
    Static,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum Status {
    #[default]
    Enabled,
    Disabled,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReprovisionPolicy {
    pub update_hub_assignment: bool,
    pub migrate_device_data: bool,
}

impl Default for ReprovisionPolicy {
    fn default() -> Self {
        Self {
            update_hub_assignment: true,
            migrate_device_data: true,
        }
    }
}

/// Fields that individual enrollments and enrollment groups share.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EnrollmentCommon {
    pub attestation: Attestation,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iot_hub_host_name: Option<String>,
    /// Hubs this enrollment may be assigned to (default: every linked hub).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iot_hubs: Option<Vec<String>>,
    #[serde(default)]
    pub allocation_policy: AllocationPolicy,
    #[serde(default)]
    pub provisioning_status: Status,
    #[serde(default)]
    pub reprovision_policy: ReprovisionPolicy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_twin: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_date_time_utc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated_date_time_utc: Option<String>,
    /// Sim-only (Azure links an enrollment to an ADR policy instead; docs/credentials.md): the
    /// hubsim CA that signs the certificate signing request a registration carries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_issuance: Option<CertificateIssuance>,
}

/// Which CA signs an enrollment's CSRs, and for how long its certificates are valid.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CertificateIssuance {
    /// A `hubsim certs root|intermediate` output directory (`cert.pem`, `key.pem`).
    pub issuer_dir: PathBuf,
    /// Lifetime of issued certificates (Azure's policies: 7 to 90 days; short in tests).
    #[serde(default = "default_issued_validity")]
    pub validity_seconds: u64,
}

fn default_issued_validity() -> u64 {
    30 * 86_400
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IndividualEnrollment {
    pub registration_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    #[serde(flatten)]
    pub common: EnrollmentCommon,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EnrollmentGroup {
    pub enrollment_group_id: String,
    #[serde(flatten)]
    pub common: EnrollmentCommon,
}

/// How a hub device authenticates.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DeviceAuthentication {
    /// `sas`, `selfSigned` or `certificateAuthority`.
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symmetric_key: Option<SymmetricKeyPair>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x509_thumbprint: Option<Thumbprints>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Thumbprints {
    pub primary_thumbprint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary_thumbprint: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Twin {
    pub desired: JsonObject,
    pub desired_version: u64,
    pub reported: JsonObject,
    pub reported_version: u64,
    pub tags: JsonObject,
}

/// A device identity in one linked hub, with its twin.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Device {
    pub device_id: String,
    pub hub: String,
    pub authentication: DeviceAuthentication,
    pub status: Status,
    pub generation_id: String,
    pub etag: String,
    pub twin: Twin,
    /// For `certificateAuthority` devices: the enrollment group whose CA they chain to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_group: Option<String>,
    /// The IoT Plug and Play model id the device announced in its last CONNECT (`model-id=` in
    /// the username), shown as `modelId` in the device and its twin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_id: Option<String>,
}

/// The outcome of a device's last DPS registration (DeviceRegistrationResult).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Registration {
    /// The full `registrationState` JSON as the device receives it.
    pub state: Value,
    pub assigned_hub: Option<String>,
    pub device_id: Option<String>,
}

/// Everything that survives a restart (persisted by [`crate::journal`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Store {
    pub id_scope: String,
    /// Keys of the service policies (`iothubowner`, `provisioningserviceowner`), base64.
    pub hub_owner_key: String,
    pub dps_owner_key: String,
    /// Keyed by lower-case registration id.
    pub enrollments: Table<IndividualEnrollment>,
    pub groups: Table<EnrollmentGroup>,
    /// Keyed by lower-case registration id (DPS ids are case-insensitive).
    pub registrations: Table<Registration>,
    /// Keyed by `{hub}/{deviceId}`: the same device id may exist in two hubs.
    pub devices: Table<Device>,
}

/// A map of the store that remembers which keys were changed since the journal last took them,
/// so a change is persisted as those rows alone, not as the whole store. Reads go through
/// `Deref`; every way to change a row is a method here, so no change escapes the journal.
#[derive(Debug, Clone)]
pub struct Table<T> {
    rows: BTreeMap<String, T>,
    changed: BTreeSet<String>,
}

impl<T> Default for Table<T> {
    fn default() -> Self {
        Self {
            rows: BTreeMap::new(),
            changed: BTreeSet::new(),
        }
    }
}

impl<T> std::ops::Deref for Table<T> {
    type Target = BTreeMap<String, T>;
    fn deref(&self) -> &Self::Target {
        &self.rows
    }
}

impl<T> Table<T> {
    pub fn insert(&mut self, key: String, value: T) -> Option<T> {
        self.changed.insert(key.clone());
        self.rows.insert(key, value)
    }

    pub fn remove(&mut self, key: &str) -> Option<T> {
        let removed = self.rows.remove(key);
        if removed.is_some() {
            self.changed.insert(key.to_string());
        }
        removed
    }

    /// The row to change in place (counted as changed whether or not the caller changes it).
    pub fn get_mut(&mut self, key: &str) -> Option<&mut T> {
        let row = self.rows.get_mut(key)?;
        self.changed.insert(key.to_string());
        Some(row)
    }

    /// The changed keys with their rows now (`None`: removed), forgetting that they changed.
    pub fn take_changes(&mut self) -> Vec<(String, Option<&T>)> {
        let keys = std::mem::take(&mut self.changed);
        keys.into_iter()
            .map(|k| {
                let row = self.rows.get(&k);
                (k, row)
            })
            .collect()
    }

    /// Sets or removes a row without counting it as changed (replaying the journal).
    pub fn restore(&mut self, key: String, value: Option<T>) {
        match value {
            Some(v) => self.rows.insert(key, v),
            None => self.rows.remove(&key),
        };
    }
}

impl<T: Serialize> Serialize for Table<T> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.rows.serialize(serializer)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Table<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(Self {
            rows: BTreeMap::deserialize(deserializer)?,
            changed: BTreeSet::new(),
        })
    }
}

impl Store {
    pub fn device_key(hub: &str, device_id: &str) -> String {
        format!("{}/{}", hub.to_ascii_lowercase(), device_id)
    }
}

// ---------------------------------------------------------------------------------------------
// Live state (not persisted)
// ---------------------------------------------------------------------------------------------

/// A command for the task that owns a device's MQTT connection.
#[derive(Debug)]
pub enum ConnCommand {
    Publish {
        topic: String,
        payload: Bytes,
        qos: rumqttc::QoS,
    },
    Close {
        reason: String,
    },
    /// Deliver a C2D message (QoS 1): the connection keeps it until the device's PUBACK and puts
    /// it back at the head of the device's queue if the connection ends first.
    DeliverC2d(C2dMessage),
}

#[derive(Debug, Clone)]
pub struct ConnHandle {
    /// Unique per connection, so a closing connection only removes itself.
    pub conn_id: u64,
    pub tx: mpsc::UnboundedSender<ConnCommand>,
    /// What the device has subscribed to: the hub only pushes desired patches, method calls and
    /// C2D to a device that asked for them (a method call to an unsubscribed device is a 404).
    pub subscriptions: std::sync::Arc<Subscriptions>,
}

#[derive(Debug, Default)]
pub struct Subscriptions {
    /// `$iothub/twin/res/#`: without it the hub answers twin requests to no one.
    pub twin_responses: std::sync::atomic::AtomicBool,
    pub desired: std::sync::atomic::AtomicBool,
    pub methods: std::sync::atomic::AtomicBool,
    pub c2d: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TelemetryRecord {
    pub body: Option<String>,
    pub body_base64: String,
    pub properties: BTreeMap<String, String>,
    pub system_properties: BTreeMap<String, String>,
    pub enqueued_time: String,
    /// A reading split out of a hubagent batch: the batch's message id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_message_id: Option<String>,
    /// A hubagent batch that did not split (recorded whole): why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_error: Option<String>,
}

/// One DPS registration request (`PUT …/register`, or the TPM challenge request) and what DPS
/// answered, with the polls of the operation it started.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistrationEvent {
    pub registration_id: String,
    /// The ID scope the device addressed.
    pub id_scope: String,
    /// When the request arrived (RFC 3339, and milliseconds since the Unix epoch for tests that
    /// measure how long a device waited between requests).
    pub time: String,
    pub time_ms: u64,
    pub outcome: String,
    pub assigned_hub: Option<String>,
    pub device_id: Option<String>,
    pub transport: String,
    pub attestation: String,
    /// The status DPS answered with (202, 429, 401, …) and its `retry-after`, if any.
    pub status: u16,
    pub retry_after: Option<u64>,
    /// The operation a 202 started; its polls are in `polls`.
    pub operation_id: Option<String>,
    pub polls: Vec<PollEvent>,
}

/// One poll of a registration's operation status, and DPS's answer.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PollEvent {
    pub time: String,
    pub time_ms: u64,
    pub status: u16,
    pub retry_after: Option<u64>,
}

/// Which DPS requests a throttling fault answers with 429.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ThrottledRequests {
    /// Registrations, TPM challenges and operation polls alike.
    #[default]
    Any,
    /// Only `PUT …/register` (and the TPM challenge request).
    Register,
    /// Only operation-status polls.
    Poll,
}

/// DPS assigning asynchronously: each registration started while this is set is answered
/// `assigning` on its first `polls` polls before the result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlowAssignment {
    pub polls: u32,
    /// The `retry-after` of those 202 answers (and of the register's 202); `None`: `--retry-after`.
    pub retry_after: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionEvent {
    pub time: String,
    pub client_id: String,
    pub service: String,
    pub event: String,
    pub reason: Option<String>,
    /// For `connected`: `mqtt` (TLS on 8883) or `mqtt-ws` (WebSockets on the HTTPS port).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct C2dMessage {
    pub body: Bytes,
    pub properties: Vec<(String, String)>,
}

impl C2dMessage {
    /// The message id (`$.mid`), empty when the message has none.
    pub fn message_id(&self) -> &str {
        self.properties
            .iter()
            .find(|(k, _)| k == "$.mid")
            .map_or("", |(_, v)| v.as_str())
    }
}

/// Where a C2D message is in its life cycle, with the hub's names for the states
/// (docs/hubsim.md, "C2D message states").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum C2dState {
    /// In the device's queue, waiting for a connection subscribed to C2D.
    Enqueued,
    /// Sent to the device and not yet completed (no PUBACK yet): the connection holds it, and it
    /// goes back to the queue if the connection ends.
    Invisible,
    /// The device's PUBACK completed it: the hub has forgotten it.
    Completed,
    /// Delivered [`MAX_C2D_DELIVERIES`] times without being completed: the hub gave up on it.
    DeadLettered,
}

/// The history of one C2D message sent to a device, as `GET /sim/c2d/{deviceId}` shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct C2dRecord {
    pub message_id: String,
    pub state: C2dState,
    /// How many times it was sent to the device (more than 1: redelivered).
    pub delivery_count: u32,
}

#[derive(Debug, Default)]
pub struct Faults {
    pub refuse_connections_until: Option<Instant>,
    /// (remaining count, retry-after seconds)
    pub dps_throttle: Option<(u32, u64)>,
    /// Which requests `dps_throttle` answers with 429.
    pub dps_throttle_requests: ThrottledRequests,
    pub dps_slow_assignment: Option<SlowAssignment>,
    pub delay: Option<Duration>,
    pub token_lifetime_cap: Option<Duration>,
    /// The next N device twin requests (GET, reported PATCH) are answered 429.
    pub twin_throttle: u32,
    /// The next N certificate issuances fail (the CA is unreachable).
    pub issuance_failures: u32,
}

#[derive(Debug, Default)]
pub struct Records {
    pub telemetry: HashMap<String, Vec<TelemetryRecord>>,
    /// Messages received per device since start (not reset by clearing the record).
    pub telemetry_received: HashMap<String, u64>,
    /// Readings received per device since start: a hubagent batch counts its readings, any
    /// other message one.
    pub readings_received: HashMap<String, u64>,
    /// 4 KB blocks billed per device since start, as the hub meters them (`metering`).
    pub billed_blocks: HashMap<String, u64>,
    /// Keep at most about this many recent messages per device in `telemetry` (0 = all), so a
    /// benchmark sending millions does not hold them all in memory.
    pub telemetry_keep: usize,
    pub registrations: Vec<RegistrationEvent>,
    pub connections: Vec<ConnectionEvent>,
    /// Every C2D message sent, by device key, oldest first.
    pub c2d: HashMap<String, Vec<C2dRecord>>,
}

#[derive(Debug, Default)]
pub struct Live {
    /// Device connections by `{hub}/{deviceId}` (see [`Store::device_key`]).
    pub connections: HashMap<String, ConnHandle>,
    /// Direct method calls waiting for the device's answer, by `$rid`.
    pub pending_methods: HashMap<String, oneshot::Sender<(u16, Value)>>,
    /// C2D messages waiting for an offline device, by device key.
    pub c2d_queues: HashMap<String, VecDeque<C2dMessage>>,
    /// DPS registrations waiting to be polled.
    pub operations: crate::dps::Operations,
    /// DPS TPM attestation: the challenge key issued to each registration id (lower case) and
    /// the EK/SRK it was wrapped to; the device signs with it until it is assigned.
    pub tpm_challenges: HashMap<String, TpmChallenge>,
}

#[derive(Debug, Clone)]
pub struct TpmChallenge {
    /// base64 of the key sent in the activation blob.
    pub key: String,
    pub endorsement_key: Vec<u8>,
    pub storage_root_key: Vec<u8>,
}

/// Settings fixed at start.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub state_dir: PathBuf,
    /// Linked hub host names; the first is the default for static allocation.
    pub hubs: Vec<String>,
    pub retry_after_secs: u64,
    pub mqtt_port: u16,
    pub https_port: u16,
    /// ID scopes served besides the store's own (`Store::id_scope`), sharing its enrollments:
    /// what a device sees when its operator moves it to another DPS instance (docs/hubsim.md).
    pub extra_id_scopes: Vec<String>,
}

/// The whole simulator state, shared by every front end.
pub struct Sim {
    pub config: SimConfig,
    store: Mutex<Store>,
    /// Locked after `store`, so journal lines follow the order of the changes.
    persistence: Mutex<Persistence>,
    syncer: Arc<Syncer>,
    pub live: Mutex<Live>,
    pub records: Mutex<Records>,
    pub faults: Mutex<Faults>,
    /// Woken on every recorded event, so tests can await conditions instead of sleeping.
    pub changed: Notify,
    next_conn_id: std::sync::atomic::AtomicU64,
}

pub const MAX_C2D_QUEUE: usize = 50;
/// The hub's default maximum delivery count of a C2D message (`maxDeliveryCount`).
pub const MAX_C2D_DELIVERIES: u32 = 10;

impl Sim {
    /// Loads the state dir (`state.json` and its journal, see [`crate::journal`]), or starts
    /// empty with fresh service keys.
    pub fn open(config: SimConfig, id_scope: &str) -> anyhow::Result<Self> {
        let (store, persistence) = Persistence::open(&config.state_dir, || Store {
            id_scope: id_scope.to_string(),
            hub_owner_key: random_key(),
            dps_owner_key: random_key(),
            ..Store::default()
        })?;
        let syncer = persistence.syncer().clone();
        Ok(Sim {
            config,
            store: Mutex::new(store),
            persistence: Mutex::new(persistence),
            syncer,
            live: Mutex::default(),
            records: Mutex::default(),
            faults: Mutex::default(),
            changed: Notify::new(),
            next_conn_id: 1.into(),
        })
    }

    /// Whether `scope` is one this DPS answers (case-insensitive, as Azure's).
    pub fn serves_scope(&self, scope: &str) -> bool {
        self.read(|s| s.id_scope.eq_ignore_ascii_case(scope))
            || self
                .config
                .extra_id_scopes
                .iter()
                .any(|s| s.eq_ignore_ascii_case(scope))
    }

    /// Reads the store.
    pub fn read<R>(&self, f: impl FnOnce(&Store) -> R) -> R {
        f(&self.store.lock().unwrap())
    }

    /// Changes the store and returns once the change is on disk (journaled and synced).
    pub fn mutate<R>(&self, f: impl FnOnce(&mut Store) -> R) -> anyhow::Result<R> {
        let (result, line) = self.journaled(f)?;
        self.syncer.wait(line)?;
        Ok(result)
    }

    /// Changes the store and journals the change without waiting for its sync, so concurrent
    /// changes share one: the caller must await [`Sim::synced`] before it answers the client.
    pub fn mutate_before_sync<R>(&self, f: impl FnOnce(&mut Store) -> R) -> anyhow::Result<R> {
        self.journaled(f).map(|(result, _)| result)
    }

    fn journaled<R>(&self, f: impl FnOnce(&mut Store) -> R) -> anyhow::Result<(R, u64)> {
        let mut store = self.store.lock().unwrap();
        let result = f(&mut store);
        let line = self.persistence.lock().unwrap().append(&mut store)?;
        drop(store);
        self.changed.notify_waiters();
        Ok((result, line))
    }

    /// Waits until every change journaled so far is on disk: a front end awaits this before
    /// it answers a request whose handling may have used [`Sim::mutate_before_sync`].
    pub async fn synced(&self) -> anyhow::Result<()> {
        self.syncer.wait_async(self.syncer.last_written()).await
    }

    pub fn next_conn_id(&self) -> u64 {
        self.next_conn_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// Appends to the records and wakes waiters.
    pub fn record<R>(&self, f: impl FnOnce(&mut Records) -> R) -> R {
        let result = f(&mut self.records.lock().unwrap());
        self.changed.notify_waiters();
        result
    }

    /// Records a C2D message just queued for a device (by device key), and wakes waiters.
    pub fn record_c2d_sent(&self, device_key: &str, message: &C2dMessage) {
        self.record(|r| {
            r.c2d
                .entry(device_key.to_string())
                .or_default()
                .push(C2dRecord {
                    message_id: message.message_id().to_string(),
                    state: C2dState::Enqueued,
                    delivery_count: 0,
                })
        });
    }

    /// Records a C2D message's move to `state` (to `Invisible`: one more delivery), and wakes
    /// waiters. A message id sent twice updates its latest record not yet completed.
    pub fn record_c2d(&self, device_key: &str, message: &C2dMessage, state: C2dState) {
        let id = message.message_id();
        self.record(|r| {
            let open = r.c2d.get_mut(device_key).and_then(|records| {
                records.iter_mut().rev().find(|m| {
                    m.message_id == id
                        && !matches!(m.state, C2dState::Completed | C2dState::DeadLettered)
                })
            });
            if let Some(record) = open {
                record.state = state;
                if state == C2dState::Invisible {
                    record.delivery_count += 1;
                }
            }
        });
    }

    /// How many times the open (not completed, not dead-lettered) C2D message `message_id` of a
    /// device was delivered.
    pub fn c2d_deliveries(&self, device_key: &str, message_id: &str) -> u32 {
        self.records
            .lock()
            .unwrap()
            .c2d
            .get(device_key)
            .and_then(|records| {
                records.iter().rev().find(|m| {
                    m.message_id == message_id
                        && !matches!(m.state, C2dState::Completed | C2dState::DeadLettered)
                })
            })
            .map_or(0, |m| m.delivery_count)
    }

    /// The C2D records of a device (by device key), oldest first.
    pub fn c2d_records(&self, device_key: &str) -> Vec<C2dRecord> {
        self.records
            .lock()
            .unwrap()
            .c2d
            .get(device_key)
            .cloned()
            .unwrap_or_default()
    }

    /// Waits until `cond` holds (checked on every change) or the timeout passes.
    pub async fn wait_until(&self, timeout: Duration, mut cond: impl FnMut(&Sim) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            if cond(self) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return cond(self);
            }
        }
    }
}

/// Longest registration id, device id and enrollment group id the services accept.
pub const MAX_ID_LEN: usize = 128;
/// X.509 subject common names are at most 64 characters (RFC 5280's `ub-common-name`), so
/// registration ids taken from a certificate are too.
pub const MAX_CN_LEN: usize = 64;

/// DPS registration ids and enrollment group ids: case-insensitive ASCII letters and digits plus
/// `- . _ :`, at most 128, ending with a letter, digit or `-`. `Err` says what is wrong.
pub fn check_registration_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("it is empty".into());
    }
    if id.len() > MAX_ID_LEN {
        return Err(format!(
            "it is {} characters long; at most {MAX_ID_LEN}",
            id.len()
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "-._:".contains(*c)))
    {
        return Err(format!(
            "{c:?} is not allowed (letters, digits and '-', '.', '_', ':')"
        ));
    }
    if !id.ends_with(|c: char| c.is_ascii_alphanumeric() || c == '-') {
        return Err("it must end with a letter, a digit or '-'".into());
    }
    Ok(())
}

/// IoT Hub device ids: case-sensitive ASCII letters and digits plus `- . % _ * ? ! ( ) , : = @ $ '`,
/// at most 128.
pub fn check_device_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("it is empty".into());
    }
    if id.len() > MAX_ID_LEN {
        return Err(format!(
            "it is {} characters long; at most {MAX_ID_LEN}",
            id.len()
        ));
    }
    match id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "-.%_*?!(),:=@$'".contains(*c)))
    {
        Some(c) => Err(format!(
            "{c:?} is not allowed (letters, digits and - . % _ * ? ! ( ) , : = @ $ ')"
        )),
        None => Ok(()),
    }
}

pub fn random_key() -> String {
    let bytes: [u8; 32] = rand::random();
    B64.encode(bytes)
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Temp file in the same directory, fsync, rename: a crash leaves the old or the new file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("state")
    ));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
