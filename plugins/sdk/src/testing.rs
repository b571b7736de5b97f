//! A fake host for a plugin's own unit tests: it starts the plugin as the agent would, records
//! what the plugin publishes, logs and reports, lets the test send settings, methods and C2D
//! messages, and stops it — no agent, no plugin process, no `.so`.
//!
//! ```
//! # use hubagent_plugin_sdk::{Host, Message, Plugin, StartError};
//! # struct Hello;
//! # impl Plugin for Hello {
//! #     fn start(host: Host, _: &str) -> Result<Self, StartError> {
//! #         let _ = host.publish(&Message::json(r#"{"hello":"world"}"#));
//! #         Ok(Hello)
//! #     }
//! #     fn apply_settings(&mut self, _: &str) -> Result<(), String> { Ok(()) }
//! # }
//! use hubagent_plugin_sdk::testing::FakeHost;
//! use std::time::Duration;
//!
//! let host = FakeHost::new();
//! let mut plugin = host.start::<Hello>(r#"{"interval": "10ms"}"#).unwrap();
//! let messages = host.wait_for_messages(1, Duration::from_secs(10));
//! assert_eq!(messages[0].body, br#"{"hello":"world"}"#);
//! assert_eq!(plugin.apply_settings("{}"), Ok(()));
//! plugin.stop();
//! assert_eq!(host.calls_after_stop(), 0);
//! ```
//!
//! The host's answers follow the agent's: a publish succeeds (the agent answers once the
//! message is on disk; here at once) until the test stops the plugin; while `stop` runs it is
//! answered `Stopping` (the harder case: the agent goes on queueing while a plugin stops, and
//! answers so only what its full queue cannot take), and a call after `stop` returned — which
//! the ABI forbids — is counted in [`FakeHost::calls_after_stop`]. Rate and size limits are the
//! agent's and not applied here (`hubagent plugins try` applies them).

use std::ffi::c_void;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::{C2dMessage, Health, Host, Level, Message, MethodAnswer, Plugin, StartError, abi};

/// What the plugin did, in order of arrival per kind.
#[derive(Debug, Clone, Default)]
pub struct Record {
    pub messages: Vec<Message>,
    pub logs: Vec<(Level, String)>,
    pub health: Vec<(Health, String)>,
    /// `Host::report_properties` texts, in order (the fake host only checks that each is a
    /// JSON object; the agent also holds them to IoT Hub's limits).
    pub reported: Vec<String>,
    /// Host calls after `stop` returned (the ABI forbids them).
    pub after_stop: usize,
}

/// Where the plugin stands, as the host sees it.
const RUNNING: u8 = 0;
const STOPPING: u8 = 1;
const STOPPED: u8 = 2;

struct Shared {
    record: Mutex<Record>,
    changed: Condvar,
    phase: AtomicU8,
}

/// The fake host; cheap to copy. Each one lives for the rest of the test process (a few hundred
/// bytes): a plugin thread that outlives its test can never reach freed memory through it.
#[derive(Clone, Copy)]
pub struct FakeHost {
    shared: &'static Shared,
    api: &'static abi::HostApi,
}

impl Default for FakeHost {
    fn default() -> Self {
        FakeHost::new()
    }
}

impl FakeHost {
    pub fn new() -> FakeHost {
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            record: Mutex::new(Record::default()),
            changed: Condvar::new(),
            phase: AtomicU8::new(RUNNING),
        }));
        let api: &'static abi::HostApi = Box::leak(Box::new(abi::HostApi {
            struct_size: std::mem::size_of::<abi::HostApi>() as u32,
            abi_major: abi::ABI_MAJOR,
            abi_minor: abi::ABI_MINOR,
            ctx: shared as *const Shared as *mut c_void,
            publish: Some(publish),
            log: Some(log),
            report_health: Some(report_health),
            // The settings accessors are for C plugins; a Rust plugin reads `settings::parse`.
            setting_string: None,
            setting_number: None,
            setting_bool: None,
            setting_duration_ms: None,
            report_properties: Some(report_properties),
            publish_batch: Some(publish_batch),
        }));
        FakeHost { shared, api }
    }

    /// Starts a `P` with `settings` (a JSON object as text), as the agent's `start` does.
    pub fn start<P: Plugin>(&self, settings: &str) -> Result<Started<P>, StartError> {
        self.shared.phase.store(RUNNING, Ordering::SeqCst);
        // SAFETY: the table is leaked: it outlives every use of the Host.
        let host = unsafe { Host::from_raw(self.api) };
        P::start(host, settings).map(|plugin| Started {
            plugin: Some(plugin),
            host: *self,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Record> {
        self.shared.record.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy of everything recorded so far.
    pub fn record(&self) -> Record {
        self.lock().clone()
    }

    pub fn messages(&self) -> Vec<Message> {
        self.lock().messages.clone()
    }

    pub fn logs(&self) -> Vec<(Level, String)> {
        self.lock().logs.clone()
    }

    pub fn health(&self) -> Vec<(Health, String)> {
        self.lock().health.clone()
    }

    /// Host calls made after `stop` returned (0 for a plugin that joins its threads in `stop`).
    pub fn calls_after_stop(&self) -> usize {
        self.lock().after_stop
    }

    /// Waits until `done` holds for the record (checked at each call of the plugin), at most
    /// `timeout`; whether it held.
    pub fn wait_for(&self, timeout: Duration, done: impl Fn(&Record) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut record = self.lock();
        while !done(&record) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            record = self
                .shared
                .changed
                .wait_timeout(record, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Waits for at least `n` messages and returns all of them; panics, showing the record,
    /// when they do not come within `timeout`.
    pub fn wait_for_messages(&self, n: usize, timeout: Duration) -> Vec<Message> {
        if !self.wait_for(timeout, |r| r.messages.len() >= n) {
            panic!(
                "the plugin published {} of {n} messages within {timeout:?}; logs {:?}, health {:?}",
                self.lock().messages.len(),
                self.logs(),
                self.health()
            );
        }
        self.messages()
    }
}

impl Shared {
    fn change(&self, f: impl FnOnce(&mut Record)) {
        f(&mut self.record.lock().unwrap_or_else(|e| e.into_inner()));
        self.changed.notify_all();
    }
}

/// A started plugin; stopped when dropped (a test that panics does not leave its threads
/// running).
pub struct Started<P: Plugin> {
    plugin: Option<P>,
    host: FakeHost,
}

impl<P: Plugin> Started<P> {
    fn plugin(&mut self) -> &mut P {
        self.plugin.as_mut().expect("a started plugin")
    }

    /// New settings, as a twin change delivers them: `Err(why)` is the refusal.
    pub fn apply_settings(&mut self, settings: &str) -> Result<(), String> {
        self.plugin().apply_settings(settings)
    }

    /// A direct method the plugin declared.
    pub fn invoke_method(&mut self, method: &str, payload_json: &str) -> MethodAnswer {
        self.plugin().invoke_method(method, payload_json)
    }

    /// A cloud-to-device message its filter matches.
    pub fn receive_c2d(&mut self, message: &C2dMessage) -> Result<(), String> {
        self.plugin().receive_c2d(message)
    }

    /// Stops it: publishes meanwhile are answered `Stopping`, as the agent answers those its
    /// full queue cannot take while the plugin stops.
    pub fn stop(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        if let Some(plugin) = self.plugin.take() {
            self.host.shared.phase.store(STOPPING, Ordering::SeqCst);
            plugin.stop();
            self.host.shared.phase.store(STOPPED, Ordering::SeqCst);
            self.host.shared.change(|_| {});
        }
    }

    /// The plugin itself, for assertions on its state.
    pub fn get(&mut self) -> &mut P {
        self.plugin()
    }
}

impl<P: Plugin> Drop for Started<P> {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// The state behind a callback's `ctx`, and the plugin's phase.
///
/// # Safety
/// `ctx` is the `Shared` a `FakeHost` leaked.
unsafe fn shared_of(ctx: *mut c_void) -> (&'static Shared, u8) {
    // SAFETY: the caller passes the ctx of a leaked table.
    let shared: &'static Shared = unsafe { &*(ctx as *const Shared) };
    (shared, shared.phase.load(Ordering::SeqCst))
}

fn text(s: abi::Str) -> String {
    // SAFETY: borrowed for the duration of the call (ABI rule 2).
    String::from_utf8_lossy(unsafe { s.as_bytes() }).into_owned()
}

fn optional_text(s: abi::Str) -> Option<String> {
    (!s.ptr.is_null()).then(|| text(s))
}

/// ABI 1.3: each message as `publish` takes it, in order.
unsafe extern "C" fn publish_batch(
    ctx: *mut c_void,
    messages: *const *const abi::Message,
    count: usize,
    results: *mut i32,
) -> i32 {
    if ctx.is_null() || (count > 0 && messages.is_null()) {
        return abi::ERR_INVALID_ARGUMENT;
    }
    let mut first_refusal = abi::OK;
    for i in 0..count {
        // SAFETY: `count` pointers, each to a message valid for the call.
        let code = unsafe { publish(ctx, *messages.add(i)) };
        if !results.is_null() {
            // SAFETY: `results` has `count` entries.
            unsafe { *results.add(i) = code };
        }
        if first_refusal == abi::OK {
            first_refusal = code;
        }
    }
    first_refusal
}

unsafe extern "C" fn publish(ctx: *mut c_void, message: *const abi::Message) -> i32 {
    if ctx.is_null() || message.is_null() {
        return abi::ERR_INVALID_ARGUMENT;
    }
    // SAFETY: the ctx of a leaked table; `message` is valid for the call.
    let (host, phase) = unsafe { shared_of(ctx) };
    match phase {
        STOPPED => {
            host.change(|r| r.after_stop += 1);
            return abi::ERR_STOPPING;
        }
        STOPPING => return abi::ERR_STOPPING,
        _ => {}
    }
    // SAFETY: valid for the call.
    let raw = unsafe { &*message };
    let properties = if raw.properties.is_null() {
        &[][..]
    } else {
        // SAFETY: `property_count` entries, borrowed for the call.
        unsafe { std::slice::from_raw_parts(raw.properties, raw.property_count) }
    };
    let body = if raw.body.ptr.is_null() {
        Vec::new()
    } else {
        // SAFETY: `len` bytes, borrowed for the call.
        unsafe { std::slice::from_raw_parts(raw.body.ptr, raw.body.len) }.to_vec()
    };
    let message = Message {
        body,
        content_type: optional_text(raw.content_type),
        content_encoding: optional_text(raw.content_encoding),
        properties: properties
            .iter()
            .map(|p| (text(p.key), text(p.value)))
            .collect(),
        creation_time: (raw.struct_size >= abi::MESSAGE_SIZE_V1_2 && raw.creation_time_ms > 0)
            .then(|| std::time::UNIX_EPOCH + Duration::from_millis(raw.creation_time_ms as u64)),
    };
    host.change(|r| r.messages.push(message));
    abi::OK
}

unsafe extern "C" fn report_properties(
    ctx: *mut c_void,
    properties: abi::Str,
    error: *mut abi::Buf,
) -> i32 {
    if ctx.is_null() {
        return abi::ERR_INVALID_ARGUMENT;
    }
    // SAFETY: the ctx of a leaked table.
    let (host, phase) = unsafe { shared_of(ctx) };
    if phase == STOPPED {
        host.change(|r| r.after_stop += 1);
        return abi::ERR_STOPPING;
    }
    let json = text(properties);
    match serde_json::from_str::<serde_json::Value>(&json) {
        Ok(serde_json::Value::Object(_)) => {
            host.change(|r| r.reported.push(json));
            abi::OK
        }
        _ => {
            if !error.is_null() {
                let why = "reported properties must be a JSON object";
                // SAFETY: the SDK's buffer, valid for the call.
                let buf = unsafe { &mut *error };
                let n = why.len().min(buf.cap);
                // SAFETY: `n <= cap`.
                unsafe { std::ptr::copy_nonoverlapping(why.as_ptr(), buf.ptr, n) };
                buf.len = n;
            }
            abi::ERR_INVALID_ARGUMENT
        }
    }
}

fn level(code: i32) -> Level {
    match code {
        abi::LOG_ERROR => Level::Error,
        abi::LOG_WARN => Level::Warn,
        abi::LOG_DEBUG => Level::Debug,
        abi::LOG_TRACE => Level::Trace,
        _ => Level::Info,
    }
}

unsafe extern "C" fn log(ctx: *mut c_void, code: i32, message: abi::Str) {
    if ctx.is_null() {
        return;
    }
    // SAFETY: the ctx of a leaked table.
    let (host, phase) = unsafe { shared_of(ctx) };
    let line = (level(code), text(message));
    host.change(|r| {
        if phase == STOPPED {
            r.after_stop += 1;
        }
        r.logs.push(line);
    });
}

unsafe extern "C" fn report_health(ctx: *mut c_void, code: i32, detail: abi::Str) {
    if ctx.is_null() {
        return;
    }
    // SAFETY: the ctx of a leaked table.
    let (host, phase) = unsafe { shared_of(ctx) };
    let health = match code {
        abi::HEALTH_OK => Health::Ok,
        abi::HEALTH_DEGRADED => Health::Degraded,
        _ => Health::Failed,
    };
    let entry = (health, text(detail));
    host.change(|r| {
        if phase == STOPPED {
            r.after_stop += 1;
        }
        r.health.push(entry);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StopSignal;

    /// Publishes a numbered message every 5 ms; settings "fail" panics its worker.
    struct Ticker {
        stop: StopSignal,
        worker: Option<std::thread::JoinHandle<()>>,
    }

    impl Plugin for Ticker {
        fn start(host: Host, settings: &str) -> Result<Self, StartError> {
            if settings.contains("bad") {
                return Err(StartError::Rejected("bad settings".into()));
            }
            let stop = StopSignal::new();
            let signal = stop.clone();
            let worker = host.spawn("ticker", move || {
                let mut n = 0;
                while !signal.wait(Duration::from_millis(5)) {
                    n += 1;
                    let _ = host.publish(&Message::json(format!("{n}")).property("n", "x"));
                    if n == 3 {
                        host.log(Level::Warn, "three");
                        host.report_health(Health::Degraded, "tired");
                    }
                }
            });
            Ok(Ticker {
                stop,
                worker: Some(worker),
            })
        }
        fn apply_settings(&mut self, settings: &str) -> Result<(), String> {
            if settings.contains("bad") {
                Err("bad settings".into())
            } else {
                Ok(())
            }
        }
        fn stop(mut self) {
            self.stop.stop();
            if let Some(w) = self.worker.take() {
                let _ = w.join();
            }
        }
    }

    #[test]
    fn records_publishes_logs_and_health_until_stopped() {
        let host = FakeHost::new();
        let mut plugin = host.start::<Ticker>("{}").unwrap();
        let messages = host.wait_for_messages(3, Duration::from_secs(10));
        assert_eq!(messages[0].body, b"1");
        assert_eq!(
            messages[0].content_type.as_deref(),
            Some("application/json")
        );
        assert_eq!(messages[0].properties, vec![("n".into(), "x".into())]);
        assert!(host.wait_for(Duration::from_secs(10), |r| !r.health.is_empty()));
        assert_eq!(host.logs(), vec![(Level::Warn, "three".to_string())]);
        assert_eq!(host.health(), vec![(Health::Degraded, "tired".to_string())]);
        assert_eq!(plugin.apply_settings("bad"), Err("bad settings".into()));
        plugin.stop();
        let count = host.messages().len();
        assert_eq!(host.calls_after_stop(), 0);
        assert_eq!(host.messages().len(), count);
        assert!(matches!(
            host.start::<Ticker>("bad"),
            Err(StartError::Rejected(_))
        ));
    }

    #[test]
    fn a_call_after_stop_is_counted() {
        let host = FakeHost::new();
        let plugin = host.start::<Ticker>("{}").unwrap();
        plugin.stop();
        // SAFETY: the host's own table, used as a plugin would after stop.
        let late = unsafe { Host::from_raw(host.api) };
        assert!(late.publish(&Message::json("{}")).is_err());
        late.log(Level::Info, "late");
        assert_eq!(host.calls_after_stop(), 2);
    }
}
