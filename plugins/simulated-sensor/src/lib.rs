//! Simulated temperature, humidity and wind readings as a library plugin
//! (`libhubagent_simulated_sensor.so`). Settings: `interval` (default "5s", at least "50ms").

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use hubagent_plugin_sdk::{
    Host, Level, Message, Plugin, StartError, StopSignal, export_plugin, parse_duration,
};
use serde_json::{Value, json};

fn parse_settings(text: &str) -> Result<Duration, String> {
    let value: Value = serde_json::from_str(text).map_err(|e| format!("settings: {e}"))?;
    let obj = value.as_object().ok_or("settings must be an object")?;
    let mut interval = Duration::from_secs(5);
    for (key, v) in obj {
        match key.as_str() {
            "interval" => {
                let text = v
                    .as_str()
                    .ok_or("interval must be a string such as \"2s\"")?;
                interval = parse_duration(text)?;
                if interval < Duration::from_millis(50) {
                    return Err(format!("interval '{text}' is below the 50ms minimum"));
                }
            }
            other => return Err(format!("unknown setting '{other}' (known: interval)")),
        }
    }
    Ok(interval)
}

struct Sensor {
    interval: Arc<Mutex<Duration>>,
    stop: StopSignal,
    worker: Option<JoinHandle<()>>,
}

impl Plugin for Sensor {
    fn start(host: Host, settings: &str) -> Result<Self, StartError> {
        let interval = Arc::new(Mutex::new(
            parse_settings(settings).map_err(StartError::Rejected)?,
        ));
        let stop = StopSignal::new();
        let (every, signal) = (interval.clone(), stop.clone());
        let worker = host.spawn("simulated-sensor", move || {
            let mut n: u64 = 0;
            loop {
                let wait = *every.lock().unwrap_or_else(|e| e.into_inner());
                if signal.wait(wait) {
                    return;
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
            interval,
            stop,
            worker: Some(worker),
        })
    }

    fn apply_settings(&mut self, settings: &str) -> Result<(), String> {
        let interval = parse_settings(settings)?;
        *self.interval.lock().unwrap_or_else(|e| e.into_inner()) = interval;
        Ok(())
    }

    fn stop(mut self) {
        self.stop.stop();
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
