//! Settings made easy: typed settings, the one duration format, and a signal that wakes a worker
//! thread on either a stop or a settings change.
//!
//! ```
//! use std::time::Duration;
//! use hubagent_plugin_sdk::settings::{self, Control, Wake};
//!
//! #[derive(serde::Deserialize, Clone, Debug, PartialEq)]
//! #[serde(deny_unknown_fields)]
//! struct MySettings {
//!     #[serde(with = "hubagent_plugin_sdk::settings::duration", default = "five_seconds")]
//!     interval: Duration,
//!     #[serde(default)]
//!     room: String,
//! }
//! fn five_seconds() -> Duration { Duration::from_secs(5) }
//!
//! // In `start` and `apply_settings`: `?` turns the error into the rejection reason.
//! let s: MySettings = settings::parse(r#"{"interval": "250ms", "room": "lab"}"#).unwrap();
//! assert_eq!(s.interval, Duration::from_millis(250));
//! let why = settings::parse::<MySettings>(r#"{"interval": "soon"}"#).unwrap_err();
//! assert!(why.to_string().starts_with("settings.interval: "), "{why}");
//!
//! // The worker waits on a `Control`; `apply_settings` calls `control.update(new)`.
//! let control = Control::new(s);
//! let mut watch = control.watch();
//! control.update(MySettings { interval: Duration::from_secs(1), room: "hall".into() });
//! assert!(matches!(watch.wait(Duration::from_secs(3600)), Wake::Settings(n) if n.room == "hall"));
//! control.stop();
//! assert!(matches!(watch.wait(Duration::from_secs(3600)), Wake::Stopped));
//! ```

use std::fmt;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

use crate::StartError;

/// Why settings are unusable. Its text names the key (`settings.interval: …`) and is what the
/// operator sees as the rejection reason (`reported.plugins.<name>.rejectedSettings`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingsError(String);

impl SettingsError {
    pub fn new(reason: impl Into<String>) -> SettingsError {
        SettingsError(reason.into())
    }
}

impl fmt::Display for SettingsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SettingsError {}

/// In `Plugin::start`: unusable settings are a rejection, not a failure.
impl From<SettingsError> for StartError {
    fn from(e: SettingsError) -> StartError {
        StartError::Rejected(e.0)
    }
}

/// In `Plugin::apply_settings`: the reason of the rejection.
impl From<SettingsError> for String {
    fn from(e: SettingsError) -> String {
        e.0
    }
}

/// Reads the settings (a JSON object as text) into the plugin's own type. The error names the
/// key that is wrong, as a path from `settings` (`settings.disks[1]: invalid type: …`).
pub fn parse<T: DeserializeOwned>(text: &str) -> Result<T, SettingsError> {
    let mut json = serde_json::Deserializer::from_str(text);
    let value: T = serde_path_to_error::deserialize(&mut json).map_err(|e| {
        let path = e.path().to_string();
        let inner = without_position(e.into_inner());
        if path == "." || path.is_empty() {
            SettingsError(format!("settings: {inner}"))
        } else {
            SettingsError(format!("settings.{path}: {inner}"))
        }
    })?;
    json.end()
        .map_err(|e| SettingsError(format!("settings: {e}")))?;
    Ok(value)
}

/// serde_json's text without its " at line 1 column 24": settings are one line, the key path
/// says where.
fn without_position(e: serde_json::Error) -> String {
    let text = e.to_string();
    let position = format!(" at line {} column {}", e.line(), e.column());
    text.strip_suffix(&position).unwrap_or(&text).to_string()
}

/// Parses a duration in the one format of hubagent's settings and configuration: a number and a
/// unit, `ms`, `s`, `m` (or `min`) or `h`, such as `"250ms"`, `"5s"`, `"1.5m"`, `"1h"`. Spaces
/// around the text and between number and unit are allowed; negative numbers are not.
///
/// Older settings may hold a bare number of seconds (`"5"`); it is still accepted, as seconds.
///
/// ```
/// use hubagent_plugin_sdk::parse_duration;
/// use std::time::Duration;
///
/// assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
/// assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
/// assert!(parse_duration("soon").is_err());
/// ```
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().map_err(|_| {
        format!("'{text}' is not a duration (write e.g. \"500ms\", \"5s\", \"1m\")")
    })?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "s" | "" => value,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        other => return Err(format!("unknown unit '{other}' in '{text}' (ms, s, m, h)")),
    };
    if !seconds.is_finite() || !(0.0..=1e12).contains(&seconds) {
        return Err(format!("'{text}' is not a duration"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// `#[serde(with = "hubagent_plugin_sdk::settings::duration")]` on a `std::time::Duration`
/// field: reads the duration format of [`parse_duration`] (`"5s"`), and, for settings written
/// before it, a JSON number of seconds (`5`, `0.5`). Writes `"5s"`-style text (milliseconds when
/// the duration has a fraction of a second).
pub mod duration {
    use std::time::Duration;

    use serde::de::{self, Deserializer, Visitor};
    use serde::ser::Serializer;

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        deserializer.deserialize_any(DurationVisitor)
    }

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&super::format_duration(*value))
    }

    struct DurationVisitor;

    impl Visitor<'_> for DurationVisitor {
        type Value = Duration;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a duration such as \"500ms\", \"5s\", \"2m\" or \"1h\"")
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
            super::parse_duration(v).map_err(E::custom)
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
            Ok(Duration::from_secs(v))
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
            u64::try_from(v)
                .map(Duration::from_secs)
                .map_err(|_| E::custom(format!("{v} is not a duration (negative)")))
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
            if v.is_finite() && (0.0..1e12).contains(&v) {
                Ok(Duration::from_secs_f64(v))
            } else {
                Err(E::custom(format!("{v} is not a duration")))
            }
        }
    }
}

/// A duration as the settings format writes it: `"5s"`, `"250ms"`, `"2m"`, `"1h"`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) || !d.subsec_nanos().is_multiple_of(1_000_000) {
        return format!("{}ms", d.as_secs_f64() * 1000.0);
    }
    let s = ms / 1000;
    if s != 0 && s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s != 0 && s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

/// What woke a [`Watch::wait`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wake<S> {
    /// `Control::stop` was called: return from the worker.
    Stopped,
    /// New settings: use them at once (an interval restarts from now).
    Settings(S),
    /// The timeout elapsed: do the periodic work.
    Elapsed,
}

struct State<S> {
    stopped: bool,
    settings: S,
    generation: u64,
}

/// A stop flag and the current settings, shared by the plugin (which calls [`Control::update`]
/// from `apply_settings` and [`Control::stop`] from `stop`) and its worker threads (which wait on
/// a [`Watch`]). Unlike [`crate::StopSignal`], a wait also ends when the settings change, so a
/// new interval applies at once rather than after the old one has elapsed.
pub struct Control<S> {
    shared: Arc<(Mutex<State<S>>, Condvar)>,
}

impl<S> Clone for Control<S> {
    fn clone(&self) -> Self {
        Control {
            shared: self.shared.clone(),
        }
    }
}

impl<S: Clone> Control<S> {
    pub fn new(settings: S) -> Control<S> {
        Control {
            shared: Arc::new((
                Mutex::new(State {
                    stopped: false,
                    settings,
                    generation: 0,
                }),
                Condvar::new(),
            )),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<S>> {
        self.shared.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The settings in force.
    pub fn settings(&self) -> S {
        self.lock().settings.clone()
    }

    /// New settings: every watcher wakes with them.
    pub fn update(&self, settings: S) {
        let mut state = self.lock();
        state.settings = settings;
        state.generation += 1;
        self.shared.1.notify_all();
    }

    /// Stops: every watcher wakes with [`Wake::Stopped`], now and on every later wait.
    pub fn stop(&self) {
        self.lock().stopped = true;
        self.shared.1.notify_all();
    }

    pub fn is_stopped(&self) -> bool {
        self.lock().stopped
    }

    /// A worker's view: it sees each settings change once, even one made while it was busy.
    pub fn watch(&self) -> Watch<S> {
        let generation = self.lock().generation;
        Watch {
            control: self.clone(),
            seen: generation,
        }
    }
}

/// One worker's waiting point on a [`Control`].
pub struct Watch<S> {
    control: Control<S>,
    seen: u64,
}

impl<S: Clone> Watch<S> {
    /// The settings in force (and counts them as seen).
    pub fn settings(&mut self) -> S {
        let state = self.control.lock();
        self.seen = state.generation;
        state.settings.clone()
    }

    /// Waits up to `timeout` for a stop or a settings change this watcher has not seen yet.
    pub fn wait(&mut self, timeout: Duration) -> Wake<S> {
        let deadline = Instant::now().checked_add(timeout);
        let mut state = self.control.lock();
        loop {
            if state.stopped {
                return Wake::Stopped;
            }
            if state.generation != self.seen {
                self.seen = state.generation;
                return Wake::Settings(state.settings.clone());
            }
            let left = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()),
                None => Duration::from_secs(3600),
            };
            if left.is_zero() {
                return Wake::Elapsed;
            }
            state = self
                .control
                .shared
                .1
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Example {
        #[serde(with = "duration")]
        interval: Duration,
        #[serde(default)]
        disks: Vec<String>,
        #[serde(default)]
        verbose: bool,
    }

    #[test]
    fn typed_settings_name_the_wrong_key() {
        let ok: Example = parse(r#"{"interval": "1.5m", "disks": ["/"]}"#).unwrap();
        assert_eq!(ok.interval, Duration::from_secs(90));
        let e = parse::<Example>(r#"{"interval": "5 parsecs"}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "settings.interval: unknown unit 'parsecs' in '5 parsecs' (ms, s, m, h)"
        );
        let e = parse::<Example>(r#"{"interval": "5s", "disks": ["/", 7]}"#).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("settings.disks[1]: invalid type: integer `7`"),
            "{e}"
        );
        let e = parse::<Example>(r#"{"interval": "5s", "colour": 1}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `colour`"), "{e}");
        let e = parse::<Example>(r#"{"disks": []}"#).unwrap_err();
        assert!(e.to_string().contains("missing field `interval`"), "{e}");
        let e = parse::<Example>(r#"{"interval": "5s", "verbose": "yes"}"#).unwrap_err();
        assert!(
            e.to_string().starts_with("settings.verbose: invalid type"),
            "{e}"
        );
        // The rejection reason the host receives is that text.
        let start: StartError = parse::<Example>("7").unwrap_err().into();
        assert!(
            matches!(start, StartError::Rejected(r) if r.starts_with("settings: invalid type"))
        );
    }

    #[test]
    fn durations_have_one_format_and_old_numbers_still_read() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration(" 5 s ").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("2min").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("5").unwrap(), Duration::from_secs(5));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("").is_err());
        let old: Example = parse(r#"{"interval": 0.5}"#).unwrap();
        assert_eq!(old.interval, Duration::from_millis(500));
        let e = parse::<Example>(r#"{"interval": -3}"#).unwrap_err();
        assert!(
            e.to_string().starts_with("settings.interval: -3 is not"),
            "{e}"
        );
        for d in ["250ms", "5s", "2m", "1h", "0s", "1500ms"] {
            assert_eq!(format_duration(parse_duration(d).unwrap()), d);
        }
    }

    #[test]
    fn a_watch_wakes_on_settings_and_on_stop() {
        let control = Control::new(1u32);
        let mut watch = control.watch();
        assert_eq!(watch.wait(Duration::from_millis(1)), Wake::Elapsed);
        let waiter = {
            let mut watch = control.watch();
            std::thread::spawn(move || watch.wait(Duration::from_secs(3600)))
        };
        control.update(2);
        // An hour's wait ends with the new settings.
        assert_eq!(waiter.join().unwrap(), Wake::Settings(2));
        // A change made while the worker was busy is seen at its next wait, once.
        assert_eq!(watch.wait(Duration::from_secs(3600)), Wake::Settings(2));
        assert_eq!(watch.wait(Duration::from_millis(1)), Wake::Elapsed);
        control.stop();
        assert_eq!(watch.wait(Duration::from_secs(3600)), Wake::Stopped);
        assert!(control.is_stopped());
    }
}
