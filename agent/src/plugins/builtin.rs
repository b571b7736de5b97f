//! The built-in simulated sensor: temperature, humidity and wind speed readings on a schedule,
//! what `hubagent demo` streams. Configured like any plugin (`[[plugin]] kind = "builtin"`,
//! `builtin = "simulated-sensor"`), and its `interval` follows the twin's
//! `desired.plugins.<name>.interval` live. It answers the direct method `<name>.read` with its
//! last reading, and takes C2D messages whose property `to` is its name: each is echoed as a
//! telemetry message `{"c2dReceived": messageId, "bytes": N}`, and taken (completed at the hub)
//! once that echo is in the durable queue.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use hubagent_plugin_sdk::abi;
use serde_json::{Map, Value, json};
use tokio::sync::watch;

use super::answer::Answer;
use super::calls::{C2dMessage, Declarations, MethodAnswer};
use super::library::{CallError, PluginMessage};
use super::running::{Event, Events};

/// Settings the sensor understands; anything else is rejected with the key named.
#[derive(Debug, Clone, PartialEq)]
pub struct SensorSettings {
    pub interval: Duration,
}

impl SensorSettings {
    pub fn from_json(settings: &Map<String, Value>) -> Result<Self, String> {
        let mut out = SensorSettings {
            interval: Duration::from_secs(5),
        };
        for (key, value) in settings {
            match key.as_str() {
                "interval" => {
                    let text = value
                        .as_str()
                        .ok_or("interval must be a duration string such as \"2s\"")?;
                    let interval = humantime::parse_duration(text)
                        .map_err(|e| format!("interval '{text}': {e}"))?;
                    if interval < Duration::from_millis(50) {
                        return Err(format!("interval '{text}' is below the 50ms minimum"));
                    }
                    out.interval = interval;
                }
                // Keys the host itself consumes.
                "name" | "kind" | "builtin" => {}
                other => return Err(format!("unknown setting '{other}' (known: interval)")),
            }
        }
        Ok(out)
    }
}

/// The running sensor.
pub struct BuiltinPlugin {
    settings: watch::Sender<SensorSettings>,
    task: tokio::task::JoinHandle<()>,
    events: Events,
    /// The last reading (`null` before the first).
    last: Arc<Mutex<Value>>,
}

impl BuiltinPlugin {
    /// Starts the sensor; the answer (settings refused or not) arrives as [`Event::Started`].
    pub fn launch(name: &str, settings: &Value, events: Events) -> BuiltinPlugin {
        let last = Arc::new(Mutex::new(Value::Null));
        let declarations =
            Declarations::new(vec!["read".into()], Some(&json!({"to": name}).to_string()))
                .expect("a plugin name is a valid filter value");
        let _ = events.send(Event::Declared(declarations));
        match SensorSettings::from_json(settings.as_object().unwrap_or(&Map::new())) {
            Ok(s) => {
                let (tx, rx) = watch::channel(s);
                let task = tokio::spawn(run(name.to_string(), rx, events.clone(), last.clone()));
                let _ = events.send(Event::Started(Ok(())));
                BuiltinPlugin {
                    settings: tx,
                    task,
                    events,
                    last,
                }
            }
            Err(reason) => {
                let (tx, _) = watch::channel(SensorSettings {
                    interval: Duration::from_secs(5),
                });
                let _ = events.send(Event::Started(Err(CallError {
                    code: abi::ERR_REJECTED,
                    reason,
                })));
                BuiltinPlugin {
                    settings: tx,
                    task: tokio::spawn(async {}),
                    events,
                    last,
                }
            }
        }
    }

    /// New settings take effect at the next reading; the answer arrives as
    /// [`Event::Applied`].
    pub fn apply(&self, settings: &Value, events: &Events) {
        let result = SensorSettings::from_json(settings.as_object().unwrap_or(&Map::new()))
            .map(|s| {
                let _ = self.settings.send(s);
            })
            .map_err(|reason| CallError {
                code: abi::ERR_REJECTED,
                reason,
            });
        let _ = events.send(Event::Applied(result));
    }

    /// `read`: the last reading (the only method it declares).
    pub fn invoke(&self, id: u64) {
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let answer = MethodAnswer {
            status: 200,
            payload: last,
        };
        let _ = self.events.send(Event::MethodAnswer(id, answer));
    }

    /// Echoes the message as telemetry and takes it once the echo is queued.
    pub fn deliver(&self, id: u64, message: &C2dMessage) {
        let echo = PluginMessage {
            body: json!({"c2dReceived": message.message_id, "bytes": message.body.len()})
                .to_string()
                .into_bytes(),
            content_type: Some("application/json".into()),
            content_encoding: Some("utf-8".into()),
            properties: Vec::new(),
            creation_time: None,
        };
        let events = self.events.clone();
        tokio::spawn(async move {
            let (answer, rx) = Answer::channel();
            if events.send(Event::Message(echo, answer)).is_err() {
                return;
            }
            let taken = match rx.await {
                Ok(abi::OK) => Ok(()),
                Ok(code) => Err(format!(
                    "its echo was not queued ({})",
                    super::library::code_name(code)
                )),
                Err(_) => Err("the sensor stopped".into()),
            };
            let _ = events.send(Event::C2dTaken(id, taken));
        });
    }

    pub fn stop(self) {
        self.task.abort();
    }
}

/// Produces readings until its settings channel closes. `settings` changes take effect at the
/// next reading. Messages go to the supervisor like any plugin's (rate limit, counters, queue).
async fn run(
    name: String,
    mut settings: watch::Receiver<SensorSettings>,
    events: Events,
    last: Arc<Mutex<Value>>,
) {
    let mut n: u64 = 0;
    // Identifies this run of the sensor: `seq` restarts at 1 in every run, so (run, seq) names a
    // reading uniquely and a gap in one run's numbers is a lost message.
    let run = format!("{:08x}", rand::random::<u32>());
    // Which run a process's readings belong to (the loss checks of the tests read it here).
    tracing::info!(plugin = %name, run = %run, "simulated sensor started; its readings are numbered from 1 in this run");
    loop {
        let interval = settings.borrow_and_update().interval;
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            changed = settings.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
        }
        n += 1;
        let t = n as f64 / 10.0;
        let reading = json!({
            "temperature": round(21.0 + 3.0 * t.sin() + noise()),
            "humidity": round(55.0 + 10.0 * (t / 3.0).cos() + noise()),
            "windSpeed": round((8.0 + 4.0 * (t / 2.0).sin() + noise()).max(0.0)),
            "seq": n,
        });
        *last.lock().unwrap_or_else(|e| e.into_inner()) = reading.clone();
        let message = PluginMessage {
            body: reading.to_string().into_bytes(),
            content_type: Some("application/json".into()),
            content_encoding: Some("utf-8".into()),
            properties: vec![("run".into(), run.clone())],
            creation_time: None,
        };
        let (answer, rx) = Answer::channel();
        if events.send(Event::Message(message, answer)).is_err() {
            return;
        }
        // Queued (or refused) before the next reading.
        let _ = rx.await;
    }
}

fn noise() -> f64 {
    rand::random::<f64>() - 0.5
}

fn round(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_validated_with_the_key_named() {
        let ok =
            SensorSettings::from_json(json!({"interval": "250ms"}).as_object().unwrap()).unwrap();
        assert_eq!(ok.interval, Duration::from_millis(250));
        let err =
            SensorSettings::from_json(json!({"interval": 5}).as_object().unwrap()).unwrap_err();
        assert!(err.contains("interval"));
        let err =
            SensorSettings::from_json(json!({"color": "red"}).as_object().unwrap()).unwrap_err();
        assert!(err.contains("color"));
    }
}
