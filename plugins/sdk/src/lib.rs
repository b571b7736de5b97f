//! Write hubagent plugins in Rust.
//!
//! A plugin is a `cdylib` exporting one versioned C entry point, `hubagent_plugin_entry_v1`,
//! described in `include/hubagent_plugin.h` (the reference for the ABI and its rules). This crate
//! holds the same `#[repr(C)]` definitions ([`abi`]), a safe [`Plugin`] trait and the
//! [`export_plugin!`] macro that generates the entry point:
//!
//! ```no_run
//! use hubagent_plugin_sdk::{Host, Message, Plugin, StartError, StopSignal, export_plugin};
//!
//! struct Hello { stop: StopSignal, worker: Option<std::thread::JoinHandle<()>> }
//!
//! impl Plugin for Hello {
//!     fn start(host: Host, _settings: &str) -> Result<Self, StartError> {
//!         let stop = StopSignal::new();
//!         let signal = stop.clone();
//!         let worker = host.spawn("hello", move || {
//!             while !signal.wait(std::time::Duration::from_secs(1)) {
//!                 let _ = host.publish(&Message::json(r#"{"hello":"world"}"#));
//!             }
//!         });
//!         Ok(Hello { stop, worker: Some(worker) })
//!     }
//!     fn apply_settings(&mut self, _settings: &str) -> Result<(), String> { Ok(()) }
//!     fn stop(mut self) {
//!         self.stop.stop();
//!         if let Some(w) = self.worker.take() { let _ = w.join(); }
//!     }
//! }
//!
//! export_plugin!(Hello, name = "hello", version = "0.1.0");
//! ```
//!
//! Panics never cross the boundary: every callback runs under `catch_unwind` and a panic becomes
//! `HUBAGENT_ERR_PANICKED` (the host restarts the plugin). Threads started with [`Host::spawn`]
//! report a panic as `HUBAGENT_HEALTH_FAILED`, which also makes the host restart the plugin.

pub mod testing;

use std::ffi::c_void;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

pub mod settings;

/// The C ABI, field for field as in `hubagent_plugin.h`.
pub mod abi {
    use std::ffi::{c_char, c_void};

    pub const MAGIC: u32 = 0x4841_5047;
    pub const ABI_MAJOR: u16 = 1;
    pub const ABI_MINOR: u16 = 3;
    pub const ENTRY_SYMBOL: &str = "hubagent_plugin_entry_v1";

    pub const OK: i32 = 0;
    pub const ERR_REJECTED: i32 = 1;
    pub const ERR_FAILED: i32 = 2;
    pub const ERR_PANICKED: i32 = 3;
    pub const ERR_INVALID_ARGUMENT: i32 = 4;
    pub const ERR_RATE_LIMITED: i32 = 5;
    pub const ERR_STOPPING: i32 = 6;
    pub const ERR_TOO_LARGE: i32 = 7;
    /// ABI 1.2, settings accessors: no such key (the plugin keeps its default).
    pub const ERR_NOT_FOUND: i32 = 8;

    pub const LOG_ERROR: i32 = 1;
    pub const LOG_WARN: i32 = 2;
    pub const LOG_INFO: i32 = 3;
    pub const LOG_DEBUG: i32 = 4;
    pub const LOG_TRACE: i32 = 5;

    pub const HEALTH_OK: i32 = 0;
    pub const HEALTH_DEGRADED: i32 = 1;
    pub const HEALTH_FAILED: i32 = 2;

    /// A borrowed UTF-8 string (`ptr` may be null when `len` is 0).
    #[repr(C)]
    #[derive(Debug, Clone, Copy)]
    pub struct Str {
        pub ptr: *const c_char,
        pub len: usize,
    }

    impl Str {
        pub const EMPTY: Str = Str {
            ptr: std::ptr::null(),
            len: 0,
        };

        pub fn borrow(text: &str) -> Str {
            Str {
                ptr: text.as_ptr().cast(),
                len: text.len(),
            }
        }

        /// # Safety
        /// `ptr`/`len` must describe readable memory for the lifetime chosen by the caller.
        pub unsafe fn as_bytes<'a>(&self) -> &'a [u8] {
            if self.ptr.is_null() || self.len == 0 {
                &[]
            } else {
                // SAFETY: the caller guarantees the buffer is valid.
                unsafe { std::slice::from_raw_parts(self.ptr.cast(), self.len) }
            }
        }
    }

    /// A borrowed byte buffer.
    #[repr(C)]
    #[derive(Debug, Clone, Copy)]
    pub struct Bytes {
        pub ptr: *const u8,
        pub len: usize,
    }

    /// An output buffer owned by the host.
    #[repr(C)]
    #[derive(Debug)]
    pub struct Buf {
        pub ptr: *mut u8,
        pub cap: usize,
        pub len: usize,
    }

    #[repr(C)]
    #[derive(Debug, Clone, Copy)]
    pub struct Property {
        pub key: Str,
        pub value: Str,
    }

    impl Property {
        /// The ABI view of `(key, value)` pairs, borrowing them.
        pub fn borrow_all(pairs: &[(String, String)]) -> Vec<Property> {
            pairs
                .iter()
                .map(|(k, v)| Property {
                    key: Str::borrow(k),
                    value: Str::borrow(v),
                })
                .collect()
        }
    }

    #[repr(C)]
    #[derive(Debug)]
    pub struct Message {
        pub struct_size: u32,
        pub reserved: u32,
        pub body: Bytes,
        pub content_type: Str,
        pub content_encoding: Str,
        pub properties: *const Property,
        pub property_count: usize,
        /// ABI 1.2: when the reading was taken, milliseconds since the Unix epoch (UTC); 0 =
        /// when published. Sent as the message's creation time (`iothub-creation-time-utc`).
        pub creation_time_ms: i64,
    }

    pub type PublishFn = unsafe extern "C" fn(ctx: *mut c_void, message: *const Message) -> i32;
    /// ABI 1.3: `count` messages (an array of pointers) queued with one round trip; `results`
    /// (NULL, or `count` entries) gets each message's code (rule 11 of the header).
    pub type PublishBatchFn = unsafe extern "C" fn(
        ctx: *mut c_void,
        messages: *const *const Message,
        count: usize,
        results: *mut i32,
    ) -> i32;
    pub type LogFn = unsafe extern "C" fn(ctx: *mut c_void, level: i32, text: Str);
    pub type HealthFn = unsafe extern "C" fn(ctx: *mut c_void, health: i32, detail: Str);
    /// ABI 1.2: one settings value by key (`OK`, `ERR_NOT_FOUND`, or `ERR_INVALID_ARGUMENT`
    /// with the reason in `error`).
    pub type SettingStringFn = unsafe extern "C" fn(
        ctx: *mut c_void,
        settings_json: Str,
        key: Str,
        out: *mut Buf,
        error: *mut Buf,
    ) -> i32;
    pub type SettingNumberFn = unsafe extern "C" fn(
        ctx: *mut c_void,
        settings_json: Str,
        key: Str,
        out: *mut f64,
        error: *mut Buf,
    ) -> i32;
    pub type SettingBoolFn = unsafe extern "C" fn(
        ctx: *mut c_void,
        settings_json: Str,
        key: Str,
        out: *mut i32,
        error: *mut Buf,
    ) -> i32;
    pub type SettingDurationFn = unsafe extern "C" fn(
        ctx: *mut c_void,
        settings_json: Str,
        key: Str,
        out_ms: *mut u64,
        error: *mut Buf,
    ) -> i32;
    /// ABI 1.2: the plugin's own reported properties (a JSON object), replacing the last ones.
    pub type ReportPropertiesFn =
        unsafe extern "C" fn(ctx: *mut c_void, properties_json: Str, error: *mut Buf) -> i32;

    #[repr(C)]
    #[derive(Debug)]
    pub struct HostApi {
        pub struct_size: u32,
        pub abi_major: u16,
        pub abi_minor: u16,
        pub ctx: *mut c_void,
        pub publish: Option<PublishFn>,
        pub log: Option<LogFn>,
        pub report_health: Option<HealthFn>,
        // ABI 1.2 (present when `struct_size` covers them):
        pub setting_string: Option<SettingStringFn>,
        pub setting_number: Option<SettingNumberFn>,
        pub setting_bool: Option<SettingBoolFn>,
        pub setting_duration_ms: Option<SettingDurationFn>,
        pub report_properties: Option<ReportPropertiesFn>,
        // ABI 1.3 (present when `struct_size` covers it):
        pub publish_batch: Option<PublishBatchFn>,
    }

    pub type StartFn = unsafe extern "C" fn(
        host: *const HostApi,
        settings_json: Str,
        instance: *mut *mut c_void,
        error: *mut Buf,
    ) -> i32;
    pub type ApplyFn =
        unsafe extern "C" fn(instance: *mut c_void, settings_json: Str, reason: *mut Buf) -> i32;
    pub type StopFn = unsafe extern "C" fn(instance: *mut c_void) -> i32;

    /// ABI 1.1: a cloud-to-device message handed to `receive_c2d`.
    #[repr(C)]
    #[derive(Debug)]
    pub struct C2dMessage {
        pub struct_size: u32,
        pub reserved: u32,
        /// The hub's message id (`$.mid`): the same on every redelivery of one message.
        pub message_id: Str,
        pub body: Bytes,
        pub content_type: Str,
        pub content_encoding: Str,
        pub properties: *const Property,
        pub property_count: usize,
    }

    /// ABI 1.1: answers a direct method; returns its status (200..=599) and writes the JSON
    /// answer (empty = `null`) into `answer`.
    pub type InvokeMethodFn = unsafe extern "C" fn(
        instance: *mut c_void,
        method: Str,
        payload_json: Str,
        answer: *mut Buf,
    ) -> i32;
    /// ABI 1.1: takes a C2D message: `OK` once the plugin has it (the hub is told "completed"),
    /// anything else leaves it with the hub, which delivers it again.
    pub type ReceiveC2dFn = unsafe extern "C" fn(
        instance: *mut c_void,
        message: *const C2dMessage,
        reason: *mut Buf,
    ) -> i32;

    #[repr(C)]
    #[derive(Debug)]
    pub struct PluginDescriptor {
        pub magic: u32,
        pub abi_major: u16,
        pub abi_minor: u16,
        pub descriptor_size: u32,
        pub host_api_size: u32,
        pub message_size: u32,
        pub reserved: u32,
        pub name: *const c_char,
        pub version: *const c_char,
        pub start: Option<StartFn>,
        pub apply_settings: Option<ApplyFn>,
        pub stop: Option<StopFn>,
        // ABI 1.1 (read by the host only when `descriptor_size` covers them):
        /// The direct methods the plugin answers: names each followed by a NUL, then an empty
        /// name (`"open_valve\0read_meter\0"` in C); null = none.
        pub methods: *const c_char,
        /// The C2D messages the plugin takes: a JSON object of property equalities (`"{}"` =
        /// every message), NUL-terminated; null = none.
        pub c2d_filter: *const c_char,
        pub invoke_method: Option<InvokeMethodFn>,
        pub receive_c2d: Option<ReceiveC2dFn>,
    }

    /// The v1.0 sizes: the smallest a host accepts.
    pub const DESCRIPTOR_SIZE_V1_0: u32 = std::mem::offset_of!(PluginDescriptor, methods) as u32;
    /// The descriptor of ABI 1.1 (methods and C2D).
    pub const DESCRIPTOR_SIZE_V1_1: u32 = std::mem::size_of::<PluginDescriptor>() as u32;
    pub const C2D_MESSAGE_SIZE_V1_1: u32 = std::mem::size_of::<C2dMessage>() as u32;
    pub const HOST_API_SIZE_V1_0: u32 = std::mem::offset_of!(HostApi, setting_string) as u32;
    pub const MESSAGE_SIZE_V1_0: u32 = std::mem::offset_of!(Message, creation_time_ms) as u32;
    /// ABI 1.2: the settings accessors and `report_properties`; a message's creation time.
    pub const HOST_API_SIZE_V1_2: u32 = std::mem::offset_of!(HostApi, publish_batch) as u32;
    /// ABI 1.3: `publish_batch`.
    pub const HOST_API_SIZE_V1_3: u32 = std::mem::size_of::<HostApi>() as u32;
    /// ABI 1.3: the most messages one `publish_batch` takes.
    pub const MAX_BATCH: usize = 1024;
    pub const MESSAGE_SIZE_V1_2: u32 = std::mem::size_of::<Message>() as u32;

    /// A descriptor that may live in a `static` (its raw pointers point at static data).
    #[repr(transparent)]
    pub struct StaticDescriptor(pub PluginDescriptor);
    // SAFETY: the descriptor is immutable and its pointers point at 'static read-only data.
    unsafe impl Sync for StaticDescriptor {}

    /// The signature of `hubagent_plugin_entry_v1`.
    pub type EntryFn = unsafe extern "C" fn() -> *const PluginDescriptor;
}

/// Why `start` refused to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartError {
    /// The settings are unusable (reported to the operator; the plugin is not restarted with them).
    Rejected(String),
    /// Anything else; the host restarts the plugin with backoff.
    Failed(String),
}

/// A plugin instance. The host calls `start`, then `apply_settings` for each settings change,
/// then `stop`, one at a time from one thread; each must return promptly.
pub trait Plugin: Send + Sized + 'static {
    /// Starts with the settings (a JSON object as text). Start worker threads here.
    fn start(host: Host, settings: &str) -> Result<Self, StartError>;
    /// New settings; `Err(reason)` rejects them and the plugin keeps its old ones.
    fn apply_settings(&mut self, settings: &str) -> Result<(), String>;
    /// Stops: join the worker threads. After this, the host must not be called.
    fn stop(self) {}
    /// A direct method `<plugin>.<method>` named in `export_plugin!(…, methods = [...])`, with
    /// its JSON payload (`null` when the caller sent none). Runs on the host's callback thread:
    /// a slow method holds back the plugin's other callbacks (the caller gets 504 after the
    /// plugin's `method_timeout`).
    fn invoke_method(&mut self, method: &str, _payload_json: &str) -> MethodAnswer {
        MethodAnswer::new(
            404,
            format!("{{\"error\":\"no method '{}'\"}}", method.escape_default()),
        )
    }
    /// A cloud-to-device message matching `export_plugin!(…, c2d_filter = "…")`. `Ok` takes it:
    /// only then is it completed at the hub. `Err(why)` leaves it with the hub, which delivers it
    /// again (the same `message_id`) until it expires or is dead-lettered.
    fn receive_c2d(&mut self, _message: &C2dMessage) -> Result<(), String> {
        Err("this plugin takes no cloud-to-device messages".into())
    }
}

/// A direct method's answer: a status (200..=599, passed to the caller as it is) and a JSON text.
///
/// ```
/// use hubagent_plugin_sdk::MethodAnswer;
///
/// let answer = MethodAnswer::ok(r#"{"count":3}"#);
/// assert_eq!((answer.status, answer.json.as_str()), (200, r#"{"count":3}"#));
/// let refused = MethodAnswer::new(400, r#"{"error":"the payload must be a number"}"#);
/// assert_eq!(refused.status, 400);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MethodAnswer {
    pub status: u16,
    pub json: String,
}

impl MethodAnswer {
    pub fn new(status: u16, json: impl Into<String>) -> MethodAnswer {
        MethodAnswer {
            status,
            json: json.into(),
        }
    }

    /// 200 with this JSON.
    pub fn ok(json: impl Into<String>) -> MethodAnswer {
        MethodAnswer::new(200, json)
    }
}

/// A cloud-to-device message as a plugin receives it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct C2dMessage {
    /// The hub's message id: the same on every redelivery of one message, so a plugin that
    /// must act once keeps the ids it has taken.
    pub message_id: String,
    pub body: Vec<u8>,
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    /// Application properties (the sender's), in the order the hub sent them.
    pub properties: Vec<(String, String)>,
}

/// Why a publish did not queue the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishError {
    /// Over the plugin's `max_rate`: dropped and counted by the host.
    RateLimited,
    /// The plugin is being stopped: stop publishing.
    Stopping,
    TooLarge,
    Invalid,
    Other(i32),
}

impl std::fmt::Display for PublishError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PublishError::RateLimited => write!(f, "rate limited (message dropped)"),
            PublishError::Stopping => write!(f, "the plugin is stopping"),
            PublishError::TooLarge => write!(f, "message too large"),
            PublishError::Invalid => write!(f, "invalid message"),
            PublishError::Other(code) => write!(f, "error code {code}"),
        }
    }
}

impl std::error::Error for PublishError {}

/// Log levels for [`Host::log`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Error = 1,
    Warn = 2,
    Info = 3,
    Debug = 4,
    Trace = 5,
}

/// Health states for [`Host::report_health`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Ok = 0,
    Degraded = 1,
    /// Asks the host to restart the plugin.
    Failed = 2,
}

/// A telemetry message: body, content type and encoding, application properties.
///
/// ```
/// use hubagent_plugin_sdk::Message;
///
/// let reading = Message::json(r#"{"temperature":21.5}"#).property("unit", "celsius");
/// assert_eq!(reading.content_type.as_deref(), Some("application/json"));
/// assert_eq!(reading.properties, [("unit".to_string(), "celsius".to_string())]);
/// let raw = Message::bytes(vec![0x01, 0x02]);
/// assert_eq!(raw.content_type, None);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    pub body: Vec<u8>,
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    pub properties: Vec<(String, String)>,
    /// When the reading was taken (`iothub-creation-time-utc`); `None`: when published.
    pub creation_time: Option<std::time::SystemTime>,
}

impl Message {
    /// A JSON body (`application/json`, `utf-8`).
    pub fn json(body: impl Into<String>) -> Message {
        Message {
            body: body.into().into_bytes(),
            content_type: Some("application/json".into()),
            content_encoding: Some("utf-8".into()),
            properties: Vec::new(),
            creation_time: None,
        }
    }

    /// Raw bytes with no content type.
    pub fn bytes(body: impl Into<Vec<u8>>) -> Message {
        Message {
            body: body.into(),
            ..Message::default()
        }
    }

    /// When the reading was taken, if not now (sent as `iothub-creation-time-utc`).
    pub fn created_at(mut self, time: std::time::SystemTime) -> Message {
        self.creation_time = Some(time);
        self
    }

    /// Adds an application property.
    pub fn property(mut self, key: impl Into<String>, value: impl Into<String>) -> Message {
        self.properties.push((key.into(), value.into()));
        self
    }
}

/// The ABI form of `message`, borrowing from it and from `properties` (its properties'
/// [`abi::Property::borrow_all`]).
fn raw_message(message: &Message, properties: &[abi::Property]) -> abi::Message {
    let opt = |s: &Option<String>| {
        s.as_deref()
            .map(abi::Str::borrow)
            .unwrap_or(abi::Str::EMPTY)
    };
    abi::Message {
        struct_size: std::mem::size_of::<abi::Message>() as u32,
        reserved: 0,
        body: abi::Bytes {
            ptr: message.body.as_ptr(),
            len: message.body.len(),
        },
        content_type: opt(&message.content_type),
        content_encoding: opt(&message.content_encoding),
        properties: properties.as_ptr(),
        property_count: properties.len(),
        creation_time_ms: message
            .creation_time
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0),
    }
}

fn publish_result(code: i32) -> Result<(), PublishError> {
    match code {
        abi::OK => Ok(()),
        abi::ERR_RATE_LIMITED => Err(PublishError::RateLimited),
        abi::ERR_STOPPING => Err(PublishError::Stopping),
        abi::ERR_TOO_LARGE => Err(PublishError::TooLarge),
        abi::ERR_INVALID_ARGUMENT => Err(PublishError::Invalid),
        other => Err(PublishError::Other(other)),
    }
}

/// The host's API, valid from `start` until `stop` returns. Cheap to clone; usable from any thread.
#[derive(Clone, Copy)]
pub struct Host {
    api: *const abi::HostApi,
}

// SAFETY: the ABI makes every host function thread-safe and the table valid until `stop` returns.
unsafe impl Send for Host {}
// SAFETY: as above.
unsafe impl Sync for Host {}

impl Host {
    /// # Safety
    /// `api` must point at a host API table that outlives every use of the returned `Host`.
    pub unsafe fn from_raw(api: *const abi::HostApi) -> Host {
        Host { api }
    }

    fn api(&self) -> &abi::HostApi {
        // SAFETY: valid until stop returns (ABI rule 2).
        unsafe { &*self.api }
    }

    /// Queues a message durably; returns when it is on disk in the agent's queue.
    pub fn publish(&self, message: &Message) -> Result<(), PublishError> {
        let api = self.api();
        let Some(publish) = api.publish else {
            return Err(PublishError::Other(abi::ERR_FAILED));
        };
        let properties = abi::Property::borrow_all(&message.properties);
        let raw = raw_message(message, &properties);
        // SAFETY: every pointer in `raw` borrows from `message`/`properties`, alive for the call.
        publish_result(unsafe { publish(api.ctx, &raw) })
    }

    /// Whether the agent takes batches in one round trip (ABI 1.3). Without it
    /// [`publish_batch`](Host::publish_batch) still works, one message at a time.
    pub fn batch_offered(&self) -> bool {
        let api = self.api();
        api.struct_size >= abi::HOST_API_SIZE_V1_3 && api.publish_batch.is_some()
    }

    /// Queues several messages with one round trip to the agent (ABI 1.3) and returns each
    /// one's outcome, in order: `Ok` means that message is on disk in the agent's queue, as
    /// after [`publish`](Host::publish). Outcomes are per message: one over `max_rate`, too
    /// large or invalid is refused alone and the others are still queued, in order. Use it when
    /// readings come faster than one round trip each (hundreds a second or more); for an
    /// occasional reading `publish` is as good. More than [`abi::MAX_BATCH`] messages are sent
    /// as several batches; an agent older than 1.3 gets them one `publish` at a time.
    pub fn publish_batch(&self, messages: &[Message]) -> Vec<Result<(), PublishError>> {
        let api = self.api();
        let batch = api
            .publish_batch
            .filter(|_| api.struct_size >= abi::HOST_API_SIZE_V1_3);
        let Some(publish_batch) = batch else {
            return messages.iter().map(|m| self.publish(m)).collect();
        };
        let mut outcomes = Vec::with_capacity(messages.len());
        for chunk in messages.chunks(abi::MAX_BATCH) {
            let properties: Vec<Vec<abi::Property>> = chunk
                .iter()
                .map(|m| abi::Property::borrow_all(&m.properties))
                .collect();
            let raw: Vec<abi::Message> = chunk
                .iter()
                .zip(&properties)
                .map(|(m, p)| raw_message(m, p))
                .collect();
            let pointers: Vec<*const abi::Message> = raw.iter().map(|m| m as *const _).collect();
            let mut results = vec![abi::ERR_FAILED; chunk.len()];
            // SAFETY: `pointers` has `chunk.len()` entries pointing into `raw`, whose pointers
            // borrow from `chunk` and `properties`; `results` has as many entries; all outlive
            // the call.
            unsafe {
                publish_batch(
                    api.ctx,
                    pointers.as_ptr(),
                    pointers.len(),
                    results.as_mut_ptr(),
                )
            };
            outcomes.extend(results.into_iter().map(publish_result));
        }
        outcomes
    }

    /// Sets the plugin's own reported properties (`reported.plugins.<name>.properties`): a JSON
    /// object, replacing the last one. Refused, with the reason, when IoT Hub would refuse it
    /// (property names with `.`, `$`, spaces or control characters, strings over 4 KB, nesting
    /// too deep) or it is over 4 KB; or when the agent is older than ABI 1.2.
    pub fn report_properties(&self, properties_json: &str) -> Result<(), String> {
        let api = self.api();
        let offered = api.struct_size >= abi::HOST_API_SIZE_V1_2;
        let Some(report) = api.report_properties.filter(|_| offered) else {
            return Err("this agent does not take reported properties (ABI 1.2 needed)".into());
        };
        let mut bytes = vec![0u8; 1024];
        let mut error = abi::Buf {
            ptr: bytes.as_mut_ptr(),
            cap: bytes.len(),
            len: 0,
        };
        // SAFETY: the text and the error buffer outlive the call.
        let code = unsafe { report(api.ctx, abi::Str::borrow(properties_json), &mut error) };
        if code == abi::OK {
            return Ok(());
        }
        let len = error.len.min(bytes.len());
        Err(String::from_utf8_lossy(&bytes[..len]).into_owned())
    }

    pub fn log(&self, level: Level, text: &str) {
        let api = self.api();
        if let Some(log) = api.log {
            // SAFETY: `text` outlives the call.
            unsafe { log(api.ctx, level as i32, abi::Str::borrow(text)) }
        }
    }

    pub fn report_health(&self, health: Health, detail: &str) {
        let api = self.api();
        if let Some(report) = api.report_health {
            // SAFETY: `detail` outlives the call.
            unsafe { report(api.ctx, health as i32, abi::Str::borrow(detail)) }
        }
    }

    /// Starts a worker thread whose panic is reported as [`Health::Failed`] (the host then
    /// restarts the plugin) instead of silently ending the thread.
    pub fn spawn<F>(self, name: &str, work: F) -> std::thread::JoinHandle<()>
    where
        F: FnOnce() + Send + 'static,
    {
        let thread_name = name.to_string();
        std::thread::Builder::new()
            .name(thread_name.clone())
            .spawn(move || {
                if let Err(panic) = catch_unwind(AssertUnwindSafe(work)) {
                    let message = panic_message(&*panic);
                    self.report_health(
                        Health::Failed,
                        &format!("worker '{thread_name}' panicked: {message}"),
                    );
                }
            })
            .expect("spawn a plugin worker thread")
    }
}

/// A stop flag that worker threads can sleep on and be woken from at once.
///
/// ```
/// use hubagent_plugin_sdk::StopSignal;
/// use std::time::Duration;
///
/// let stop = StopSignal::new();
/// let signal = stop.clone();
/// let worker = std::thread::spawn(move || {
///     let mut rounds = 0;
///     // Each round sleeps up to a minute, but `stop()` wakes it at once.
///     while !signal.wait(Duration::from_secs(60)) {
///         rounds += 1;
///     }
///     rounds
/// });
/// stop.stop();
/// assert!(stop.is_stopped());
/// assert_eq!(worker.join().unwrap(), 0);
/// ```
#[derive(Clone, Default)]
pub struct StopSignal(Arc<(Mutex<bool>, Condvar)>);

impl StopSignal {
    pub fn new() -> StopSignal {
        StopSignal::default()
    }

    pub fn stop(&self) {
        let (flag, cv) = &*self.0;
        *flag.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
    }

    pub fn is_stopped(&self) -> bool {
        *self.0.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits up to `timeout`; true when stopped.
    pub fn wait(&self, timeout: Duration) -> bool {
        let (flag, cv) = &*self.0;
        let guard = flag.lock().unwrap_or_else(|e| e.into_inner());
        let (guard, _) = cv
            .wait_timeout_while(guard, timeout, |stopped| !*stopped)
            .unwrap_or_else(|e| e.into_inner());
        *guard
    }
}

/// The duration format of settings: see [`settings::parse_duration`].
pub use settings::parse_duration;

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".to_string()
    }
}

/// What [`export_plugin!`] expands to call. Not a stable API.
#[doc(hidden)]
pub mod __private {
    use super::*;

    /// `text` followed by a NUL, as a static array (descriptor name and version).
    pub const fn nul_terminated<const N: usize>(text: &str) -> [u8; N] {
        let bytes = text.as_bytes();
        assert!(bytes.len() + 1 == N, "length mismatch");
        let mut out = [0u8; N];
        let mut i = 0;
        while i < bytes.len() {
            assert!(
                bytes[i] != 0,
                "plugin name and version must not contain NUL"
            );
            out[i] = bytes[i];
            i += 1;
        }
        out
    }

    fn write_buf(buf: *mut abi::Buf, text: &str) {
        if buf.is_null() {
            return;
        }
        // SAFETY: the host owns `buf` and keeps it valid for the call (ABI rule 2).
        let buf = unsafe { &mut *buf };
        if buf.ptr.is_null() {
            return;
        }
        let mut n = text.len().min(buf.cap);
        while n > 0 && !text.is_char_boundary(n) {
            n -= 1;
        }
        // SAFETY: `n <= cap` bytes fit the host's buffer.
        unsafe { std::ptr::copy_nonoverlapping(text.as_ptr(), buf.ptr, n) };
        buf.len = n;
    }

    fn settings_text<'a>(settings: abi::Str) -> Result<&'a str, String> {
        // SAFETY: borrowed for the duration of the callback (ABI rule 2).
        let bytes = unsafe { settings.as_bytes() };
        std::str::from_utf8(bytes).map_err(|e| format!("settings are not UTF-8: {e}"))
    }

    /// # Safety
    /// Called by the host through the descriptor, with valid arguments per the ABI.
    pub unsafe extern "C" fn start<P: Plugin>(
        host: *const abi::HostApi,
        settings: abi::Str,
        instance: *mut *mut c_void,
        error: *mut abi::Buf,
    ) -> i32 {
        if host.is_null() || instance.is_null() {
            return abi::ERR_INVALID_ARGUMENT;
        }
        let result = catch_unwind(AssertUnwindSafe(|| {
            let text = settings_text(settings).map_err(StartError::Rejected)?;
            // SAFETY: the table outlives the instance (ABI rule 2).
            P::start(unsafe { Host::from_raw(host) }, text)
        }));
        match result {
            Ok(Ok(plugin)) => {
                let boxed = Box::new(plugin);
                // SAFETY: `instance` is a valid out pointer.
                unsafe { *instance = Box::into_raw(boxed).cast() };
                abi::OK
            }
            Ok(Err(StartError::Rejected(reason))) => {
                write_buf(error, &reason);
                abi::ERR_REJECTED
            }
            Ok(Err(StartError::Failed(reason))) => {
                write_buf(error, &reason);
                abi::ERR_FAILED
            }
            Err(panic) => {
                write_buf(error, &format!("panicked: {}", panic_message(&*panic)));
                abi::ERR_PANICKED
            }
        }
    }

    /// `OK`, or `ERR_REJECTED` / `ERR_PANICKED` with the reason written to `reason`.
    fn refusal_code(result: std::thread::Result<Result<(), String>>, reason: *mut abi::Buf) -> i32 {
        match result {
            Ok(Ok(())) => abi::OK,
            Ok(Err(why)) => {
                write_buf(reason, &why);
                abi::ERR_REJECTED
            }
            Err(panic) => {
                write_buf(reason, &format!("panicked: {}", panic_message(&*panic)));
                abi::ERR_PANICKED
            }
        }
    }

    /// # Safety
    /// `instance` must come from `start::<P>` and not be stopped.
    pub unsafe extern "C" fn apply_settings<P: Plugin>(
        instance: *mut c_void,
        settings: abi::Str,
        reason: *mut abi::Buf,
    ) -> i32 {
        if instance.is_null() {
            return abi::ERR_INVALID_ARGUMENT;
        }
        let result = catch_unwind(AssertUnwindSafe(|| {
            let text = settings_text(settings)?;
            // SAFETY: the host calls one callback at a time, so this is the only reference.
            let plugin = unsafe { &mut *instance.cast::<P>() };
            plugin.apply_settings(text)
        }));
        refusal_code(result, reason)
    }

    /// The length of [`nul_list`]'s result: each name and its NUL, then one more NUL.
    pub const fn nul_list_len(names: &[&str]) -> usize {
        let mut n = 1;
        let mut i = 0;
        while i < names.len() {
            n += names[i].len() + 1;
            i += 1;
        }
        n
    }

    /// The descriptor's `methods`: each name followed by a NUL, then an empty name.
    pub const fn nul_list<const N: usize>(names: &[&str]) -> [u8; N] {
        assert!(nul_list_len(names) == N, "length mismatch");
        let mut out = [0u8; N];
        let (mut at, mut i) = (0, 0);
        while i < names.len() {
            let bytes = names[i].as_bytes();
            assert!(!bytes.is_empty(), "a method name must not be empty");
            let mut j = 0;
            while j < bytes.len() {
                assert!(bytes[j] != 0, "method names must not contain NUL");
                out[at] = bytes[j];
                at += 1;
                j += 1;
            }
            at += 1; // the NUL after the name
            i += 1;
        }
        out
    }

    fn text(s: abi::Str) -> String {
        // SAFETY: borrowed for the duration of the callback (ABI rule 2).
        String::from_utf8_lossy(unsafe { s.as_bytes() }).into_owned()
    }

    fn optional_text(s: abi::Str) -> Option<String> {
        (!s.ptr.is_null()).then(|| text(s))
    }

    /// # Safety
    /// `instance` must come from `start::<P>` and not be stopped; the rest as the ABI says.
    pub unsafe extern "C" fn invoke_method<P: Plugin>(
        instance: *mut c_void,
        method: abi::Str,
        payload: abi::Str,
        answer: *mut abi::Buf,
    ) -> i32 {
        if instance.is_null() {
            return 500;
        }
        let result = catch_unwind(AssertUnwindSafe(|| {
            // SAFETY: the host calls one callback at a time, so this is the only reference.
            let plugin = unsafe { &mut *instance.cast::<P>() };
            plugin.invoke_method(&text(method), &text(payload))
        }));
        let answer_of = |a: MethodAnswer| (i32::from(a.status), a.json);
        let (status, json) = match result {
            Ok(a) => answer_of(a),
            Err(panic) => (
                500,
                format!(
                    "{{\"error\":\"the plugin panicked: {}\"}}",
                    panic_message(&*panic).escape_default()
                ),
            ),
        };
        write_buf(answer, &json);
        status
    }

    /// # Safety
    /// `instance` must come from `start::<P>` and not be stopped; `message` is borrowed for the
    /// call.
    pub unsafe extern "C" fn receive_c2d<P: Plugin>(
        instance: *mut c_void,
        message: *const abi::C2dMessage,
        reason: *mut abi::Buf,
    ) -> i32 {
        if instance.is_null() || message.is_null() {
            return abi::ERR_INVALID_ARGUMENT;
        }
        let result = catch_unwind(AssertUnwindSafe(|| {
            // SAFETY: valid for the call (ABI rule 2).
            let raw = unsafe { &*message };
            let properties = if raw.properties.is_null() {
                &[][..]
            } else {
                // SAFETY: `property_count` entries, borrowed for the call.
                unsafe { std::slice::from_raw_parts(raw.properties, raw.property_count) }
            };
            let message = C2dMessage {
                message_id: text(raw.message_id),
                // SAFETY: borrowed for the call.
                body: unsafe {
                    abi::Str {
                        ptr: raw.body.ptr.cast(),
                        len: raw.body.len,
                    }
                    .as_bytes()
                }
                .to_vec(),
                content_type: optional_text(raw.content_type),
                content_encoding: optional_text(raw.content_encoding),
                properties: properties
                    .iter()
                    .map(|p| (text(p.key), text(p.value)))
                    .collect(),
            };
            // SAFETY: the host calls one callback at a time, so this is the only reference.
            let plugin = unsafe { &mut *instance.cast::<P>() };
            plugin.receive_c2d(&message)
        }));
        refusal_code(result, reason)
    }

    /// # Safety
    /// `instance` must come from `start::<P>`; it is freed here.
    pub unsafe extern "C" fn stop<P: Plugin>(instance: *mut c_void) -> i32 {
        if instance.is_null() {
            return abi::ERR_INVALID_ARGUMENT;
        }
        // SAFETY: ownership returns to us; the host never uses the pointer again.
        let plugin = unsafe { Box::from_raw(instance.cast::<P>()) };
        match catch_unwind(AssertUnwindSafe(move || plugin.stop())) {
            Ok(()) => abi::OK,
            Err(_) => abi::ERR_PANICKED,
        }
    }
}

/// Exports a [`Plugin`] type as the library's `hubagent_plugin_entry_v1`:
/// `export_plugin!(MyPlugin, name = "my-plugin", version = env!("CARGO_PKG_VERSION"));`
/// Optionally, the direct methods it answers and the C2D messages it takes (a JSON object of
/// property equalities, `"{}"` for all): `…, methods = ["open_valve"], c2d_filter = r#"{"kind":"valve"}"#);`
///
/// A valve that answers the direct method `<plugin name>.open` and takes the cloud-to-device
/// messages whose property `kind` is `valve`:
///
/// ```no_run
/// use hubagent_plugin_sdk::{C2dMessage, Host, MethodAnswer, Plugin, StartError, export_plugin};
///
/// struct Valve { open: bool }
///
/// impl Plugin for Valve {
///     fn start(_host: Host, _settings: &str) -> Result<Self, StartError> {
///         Ok(Valve { open: false })
///     }
///     fn apply_settings(&mut self, _settings: &str) -> Result<(), String> { Ok(()) }
///     fn invoke_method(&mut self, method: &str, _payload_json: &str) -> MethodAnswer {
///         match method {
///             "open" => { self.open = true; MethodAnswer::ok(r#"{"open":true}"#) }
///             _ => MethodAnswer::new(404, r#"{"error":"no such method"}"#),
///         }
///     }
///     fn receive_c2d(&mut self, message: &C2dMessage) -> Result<(), String> {
///         match message.body.as_slice() {
///             b"open" => { self.open = true; Ok(()) }
///             b"close" => { self.open = false; Ok(()) }
///             _ => Err("the body must be open or close".into()), // the hub keeps the message
///         }
///     }
/// }
///
/// export_plugin!(Valve, name = "valve", version = "1.0.0",
///                methods = ["open"], c2d_filter = r#"{"kind":"valve"}"#);
/// ```
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty, name = $name:expr, version = $version:expr
     $(, methods = [$($method:expr),* $(,)?])? $(, c2d_filter = $filter:expr)? $(,)?) => {
        /// The plugin's versioned entry point (hubagent_plugin.h).
        #[unsafe(no_mangle)]
        pub extern "C" fn hubagent_plugin_entry_v1() -> *const $crate::abi::PluginDescriptor {
            const NAME: &str = $name;
            const VERSION: &str = $version;
            const METHODS: &[&str] = &[$($($method),*)?];
            const FILTER: &str = {
                #[allow(unused_variables)]
                let filter = "";
                $(let filter = $filter;)?
                filter
            };
            static NAME_Z: [u8; NAME.len() + 1] = $crate::__private::nul_terminated(NAME);
            static VERSION_Z: [u8; VERSION.len() + 1] = $crate::__private::nul_terminated(VERSION);
            static METHODS_Z: [u8; $crate::__private::nul_list_len(METHODS)] =
                $crate::__private::nul_list(METHODS);
            static FILTER_Z: [u8; FILTER.len() + 1] = $crate::__private::nul_terminated(FILTER);
            static DESCRIPTOR: $crate::abi::StaticDescriptor =
                $crate::abi::StaticDescriptor($crate::abi::PluginDescriptor {
                    magic: $crate::abi::MAGIC,
                    abi_major: $crate::abi::ABI_MAJOR,
                    abi_minor: $crate::abi::ABI_MINOR,
                    descriptor_size: ::core::mem::size_of::<$crate::abi::PluginDescriptor>() as u32,
                    host_api_size: ::core::mem::size_of::<$crate::abi::HostApi>() as u32,
                    message_size: ::core::mem::size_of::<$crate::abi::Message>() as u32,
                    reserved: 0,
                    name: NAME_Z.as_ptr().cast(),
                    version: VERSION_Z.as_ptr().cast(),
                    start: Some($crate::__private::start::<$plugin>),
                    apply_settings: Some($crate::__private::apply_settings::<$plugin>),
                    stop: Some($crate::__private::stop::<$plugin>),
                    methods: if METHODS.is_empty() {
                        ::core::ptr::null()
                    } else {
                        METHODS_Z.as_ptr().cast()
                    },
                    c2d_filter: if FILTER.is_empty() {
                        ::core::ptr::null()
                    } else {
                        FILTER_Z.as_ptr().cast()
                    },
                    invoke_method: Some($crate::__private::invoke_method::<$plugin>),
                    receive_c2d: Some($crate::__private::receive_c2d::<$plugin>),
                });
            &DESCRIPTOR.0
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::atomic::{AtomicI64, Ordering};

    static CREATED_MS: AtomicI64 = AtomicI64::new(-1);

    unsafe extern "C" fn record_publish(_ctx: *mut c_void, message: *const abi::Message) -> i32 {
        // SAFETY: the SDK passes a valid message for the call.
        CREATED_MS.store(unsafe { (*message).creation_time_ms }, Ordering::SeqCst);
        abi::OK
    }

    unsafe extern "C" fn refuse_properties(
        _ctx: *mut c_void,
        _json: abi::Str,
        error: *mut abi::Buf,
    ) -> i32 {
        __private_write(error, "a.b: property names cannot contain '.'");
        abi::ERR_INVALID_ARGUMENT
    }

    fn __private_write(buf: *mut abi::Buf, text: &str) {
        // SAFETY: the SDK's own buffer, valid for the call.
        let buf = unsafe { &mut *buf };
        let n = text.len().min(buf.cap);
        // SAFETY: `n <= cap`.
        unsafe { std::ptr::copy_nonoverlapping(text.as_ptr(), buf.ptr, n) };
        buf.len = n;
    }

    fn table(struct_size: u32) -> abi::HostApi {
        abi::HostApi {
            struct_size,
            abi_major: abi::ABI_MAJOR,
            abi_minor: abi::ABI_MINOR,
            ctx: std::ptr::null_mut(),
            publish: Some(record_publish),
            log: None,
            report_health: None,
            setting_string: None,
            setting_number: None,
            setting_bool: None,
            setting_duration_ms: None,
            report_properties: Some(refuse_properties),
            publish_batch: Some(rate_limit_the_second),
        }
    }

    static BATCH_SIZES: Mutex<Vec<usize>> = Mutex::new(Vec::new());
    static SINGLE_PUBLISHES: AtomicI64 = AtomicI64::new(0);

    /// A batch host that refuses the second message of each batch as over the rate.
    unsafe extern "C" fn rate_limit_the_second(
        _ctx: *mut c_void,
        _messages: *const *const abi::Message,
        count: usize,
        results: *mut i32,
    ) -> i32 {
        BATCH_SIZES.lock().unwrap().push(count);
        // SAFETY: the SDK passes `count` result slots.
        let results = unsafe { std::slice::from_raw_parts_mut(results, count) };
        for (i, r) in results.iter_mut().enumerate() {
            *r = if i == 1 {
                abi::ERR_RATE_LIMITED
            } else {
                abi::OK
            };
        }
        abi::ERR_RATE_LIMITED
    }

    unsafe extern "C" fn count_publish(_ctx: *mut c_void, _message: *const abi::Message) -> i32 {
        SINGLE_PUBLISHES.fetch_add(1, Ordering::SeqCst);
        abi::OK
    }

    #[test]
    fn a_batch_is_one_call_on_a_1_3_agent_and_one_publish_each_before() {
        let mut api = table(abi::HOST_API_SIZE_V1_3);
        api.publish = Some(count_publish);
        // SAFETY: `api` outlives `host`.
        let host = unsafe { Host::from_raw(&api) };
        assert!(host.batch_offered());
        let three = vec![Message::json("{}"); 3];
        assert_eq!(
            host.publish_batch(&three),
            vec![Ok(()), Err(PublishError::RateLimited), Ok(())]
        );
        // Over MAX_BATCH: split into calls of at most MAX_BATCH.
        let many = vec![Message::bytes(b"x".to_vec()); abi::MAX_BATCH + 2];
        assert_eq!(host.publish_batch(&many).len(), abi::MAX_BATCH + 2);
        assert_eq!(*BATCH_SIZES.lock().unwrap(), [3, abi::MAX_BATCH, 2]);
        assert_eq!(SINGLE_PUBLISHES.load(Ordering::SeqCst), 0);

        // A 1.2 agent's table ends before `publish_batch`, whatever lies beyond it.
        let mut old = table(abi::HOST_API_SIZE_V1_2);
        old.publish = Some(count_publish);
        // SAFETY: as above.
        let host = unsafe { Host::from_raw(&old) };
        assert!(!host.batch_offered());
        assert_eq!(host.publish_batch(&three), vec![Ok(()); 3]);
        assert_eq!(SINGLE_PUBLISHES.load(Ordering::SeqCst), 3);
        assert_eq!(BATCH_SIZES.lock().unwrap().len(), 3);
    }

    #[test]
    fn a_creation_time_and_reported_properties_cross_the_abi() {
        let api = table(abi::HOST_API_SIZE_V1_2);
        // SAFETY: `api` outlives `host`.
        let host = unsafe { Host::from_raw(&api) };
        let at = std::time::UNIX_EPOCH + Duration::from_millis(1_767_323_045_678);
        host.publish(&Message::json("{}").created_at(at)).unwrap();
        assert_eq!(CREATED_MS.load(Ordering::SeqCst), 1_767_323_045_678);
        host.publish(&Message::json("{}")).unwrap();
        assert_eq!(CREATED_MS.load(Ordering::SeqCst), 0, "0 = when published");
        assert_eq!(
            host.report_properties(r#"{"a.b": 1}"#).unwrap_err(),
            "a.b: property names cannot contain '.'"
        );
        // An agent older than ABI 1.2 has no such function, whatever the table holds beyond.
        let old = table(abi::HOST_API_SIZE_V1_0);
        // SAFETY: as above.
        let host = unsafe { Host::from_raw(&old) };
        assert!(
            host.report_properties("{}")
                .unwrap_err()
                .contains("ABI 1.2")
        );
    }

    #[test]
    fn stop_signal_wakes_waiters() {
        let s = StopSignal::new();
        assert!(!s.wait(Duration::from_millis(1)));
        let s2 = s.clone();
        let t = std::thread::spawn(move || s2.wait(Duration::from_secs(30)));
        s.stop();
        assert!(t.join().unwrap());
    }
}
