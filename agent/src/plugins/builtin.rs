//! The built-in simulated sensor: temperature, humidity and wind speed readings on a schedule,
//! what `hubagent demo` streams. Configured like any plugin (`[[plugin]] kind = "builtin"`,
//! `builtin = "simulated-sensor"`), and its `interval` follows the twin's
//! `desired.plugins.<name>.interval` live.

use std::time::Duration;

use hubagent_plugin_sdk::abi;
use serde_json::{Map, Value, json};
use tokio::sync::watch;

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
}

impl BuiltinPlugin {
    /// Starts the sensor; the answer (settings refused or not) arrives as [`Event::Started`].
    pub fn launch(name: &str, settings: &Value, events: Events) -> BuiltinPlugin {
        match SensorSettings::from_json(settings.as_object().unwrap_or(&Map::new())) {
            Ok(s) => {
                let (tx, rx) = watch::channel(s);
                let task = tokio::spawn(run(name.to_string(), rx, events.clone()));
                let _ = events.send(Event::Started(Ok(())));
                BuiltinPlugin { settings: tx, task }
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

    pub fn stop(self) {
        self.task.abort();
    }
}

/// Produces readings until its settings channel closes. `settings` changes take effect at the
/// next reading. Messages go to the supervisor like any plugin's (rate limit, counters, queue).
async fn run(name: String, mut settings: watch::Receiver<SensorSettings>, events: Events) {
    let _ = name;
    let mut n: u64 = 0;
    // Identifies this run of the sensor: `seq` restarts at 1 in every run, so (run, seq) names a
    // reading uniquely and a gap in one run's numbers is a lost message.
    let run = format!("{:08x}", rand::random::<u32>());
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
        let message = PluginMessage {
            body: reading.to_string().into_bytes(),
            content_type: Some("application/json".into()),
            content_encoding: Some("utf-8".into()),
            properties: vec![("run".into(), run.clone())],
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        if events.send(Event::Message(message, tx)).is_err() {
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
