//! Simulated temperature, humidity and wind readings as a library plugin
//! (`libhubagent_simulated_sensor.so`). Settings: `interval` (default "5s", at least "50ms").

use std::thread::JoinHandle;
use std::time::Duration;

use hubagent_plugin_sdk::settings::{self, Control, SettingsError, Wake};
use hubagent_plugin_sdk::{Host, Level, Message, Plugin, StartError, export_plugin};
use serde::Deserialize;
use serde_json::json;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(with = "settings::duration", default = "five_seconds")]
    interval: Duration,
}

fn five_seconds() -> Duration {
    Duration::from_secs(5)
}

fn parse_settings(text: &str) -> Result<Settings, SettingsError> {
    let s: Settings = settings::parse(text)?;
    if s.interval < Duration::from_millis(50) {
        return Err(SettingsError::new(format!(
            "settings.interval: {} is below the 50ms minimum",
            settings::format_duration(s.interval)
        )));
    }
    Ok(s)
}

struct Sensor {
    control: Control<Settings>,
    worker: Option<JoinHandle<()>>,
}

impl Plugin for Sensor {
    fn start(host: Host, settings: &str) -> Result<Self, StartError> {
        let control = Control::new(parse_settings(settings)?);
        let mut watch = control.watch();
        let worker = host.spawn("simulated-sensor", move || {
            let mut n: u64 = 0;
            let mut s = watch.settings();
            loop {
                match watch.wait(s.interval) {
                    Wake::Stopped => return,
                    // A new interval counts from now, not from the end of the old one.
                    Wake::Settings(new) => {
                        s = new;
                        continue;
                    }
                    Wake::Elapsed => {}
                }
                n += 1;
                let t = n as f64 / 10.0;
                let jitter = ((n * 7919) % 100) as f64 / 100.0 - 0.5;
                let reading = json!({
                    "temperature": ((21.0 + 3.0 * t.sin() + jitter) * 10.0).round() / 10.0,
                    "humidity": ((55.0 + 10.0 * (t / 3.0).cos() + jitter) * 10.0).round() / 10.0,
                    "windSpeed": ((8.0 + 4.0 * (t / 2.0).sin()).max(0.0) * 10.0).round() / 10.0,
                    "seq": n,
                });
                match host.publish(&Message::json(reading.to_string())) {
                    Ok(()) => {}
                    Err(hubagent_plugin_sdk::PublishError::Stopping) => return,
                    Err(e) => host.log(Level::Warn, &format!("reading {n} not published: {e}")),
                }
            }
        });
        Ok(Sensor {
            control,
            worker: Some(worker),
        })
    }

    fn apply_settings(&mut self, settings: &str) -> Result<(), String> {
        self.control.update(parse_settings(settings)?);
        Ok(())
    }

    fn stop(mut self) {
        self.control.stop();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

export_plugin!(
    Sensor,
    name = "simulated-sensor",
    version = env!("CARGO_PKG_VERSION")
);

#[cfg(test)]
mod host_tests;
