//! {{name}}: a hubagent library plugin. Every `interval` it publishes `{"count": N}`, counting
//! up by `step`; the direct method `{{name}}.get` answers the count.
//!
//! Settings (a JSON object: `[plugin.settings]` with the twin's `desired.plugins.{{name}}` over
//! it): `interval` (a duration, "500ms", "5s", "1m"; default "1s") and `step` (a whole number,
//! not 0; default 1).
//!
//! Build: `cargo build --release` → `target/release/lib{{crate}}.so`.
//! Try:   `hubagent plugins try target/release/lib{{crate}}.so --settings '{"step": 2}'`.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use hubagent_plugin_sdk::{
    Host, Level, Message, MethodAnswer, Plugin, PublishError, StartError, StopSignal,
    export_plugin, parse_duration,
};
use serde_json::{Value, json};

#[derive(Debug, Clone, Copy, PartialEq)]
struct Settings {
    interval: Duration,
    step: i64,
}

/// Reads the settings; the error names the key at fault (the agent reports it to the operator).
fn parse_settings(text: &str) -> Result<Settings, String> {
    let value: Value = serde_json::from_str(text).map_err(|e| format!("settings: {e}"))?;
    let mut settings = Settings {
        interval: Duration::from_secs(1),
        step: 1,
    };
    for (key, v) in value.as_object().ok_or("settings must be a JSON object")? {
        match key.as_str() {
            "interval" => {
                let text = v.as_str().ok_or("interval must be a duration such as \"5s\"")?;
                settings.interval = parse_duration(text)?;
                if settings.interval < Duration::from_millis(10) {
                    return Err(format!("interval '{text}' is below 10ms"));
                }
            }
            "step" => match v.as_i64() {
                Some(0) => return Err("step must not be 0".into()),
                Some(step) => settings.step = step,
                None => return Err("step must be a whole number".into()),
            },
            other => return Err(format!("unknown setting '{other}' (known: interval, step)")),
        }
    }
    Ok(settings)
}

struct State {
    settings: Settings,
    count: i64,
}

struct Counter {
    state: Arc<Mutex<State>>,
    stop: StopSignal,
    worker: Option<JoinHandle<()>>,
}

impl Plugin for Counter {
    fn start(host: Host, settings: &str) -> Result<Self, StartError> {
        let settings = parse_settings(settings).map_err(StartError::Rejected)?;
        let state = Arc::new(Mutex::new(State { settings, count: 0 }));
        let stop = StopSignal::new();
        let (shared, signal) = (state.clone(), stop.clone());
        let worker = host.spawn("{{name}}", move || {
            loop {
                let interval = shared.lock().unwrap().settings.interval;
                if signal.wait(interval) {
                    return;
                }
                let count = {
                    let mut s = shared.lock().unwrap();
                    s.count += s.settings.step;
                    s.count
                };
                // Returns once the message is on disk in the agent's queue.
                match host.publish(&Message::json(json!({"count": count}).to_string())) {
                    Ok(()) => {}
                    Err(PublishError::Stopping) => return,
                    Err(e) => host.log(Level::Warn, &format!("count {count} not published: {e}")),
                }
            }
        });
        host.log(Level::Info, "started");
        Ok(Counter {
            state,
            stop,
            worker: Some(worker),
        })
    }

    fn apply_settings(&mut self, settings: &str) -> Result<(), String> {
        // Err(why) refuses them: the old settings stay.
        let settings = parse_settings(settings)?;
        self.state.lock().unwrap().settings = settings;
        Ok(())
    }

    fn invoke_method(&mut self, method: &str, _payload: &str) -> MethodAnswer {
        match method {
            "get" => MethodAnswer::ok(json!({"count": self.state.lock().unwrap().count}).to_string()),
            _ => MethodAnswer::new(404, "{}"),
        }
    }

    fn stop(mut self) {
        self.stop.stop();
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

export_plugin!(
    Counter,
    name = "{{name}}",
    version = env!("CARGO_PKG_VERSION"),
    methods = ["get"],
);

#[cfg(test)]
mod tests {
    use super::*;
    use hubagent_plugin_sdk::testing::FakeHost;

    const WAIT: Duration = Duration::from_secs(10);

    fn count(message: &Message) -> i64 {
        let body: Value = serde_json::from_slice(&message.body).unwrap();
        body["count"].as_i64().unwrap()
    }

    #[test]
    fn counts_by_step_and_follows_new_settings() {
        let host = FakeHost::new();
        let mut plugin = host
            .start::<Counter>(r#"{"interval": "10ms", "step": 2}"#)
            .unwrap();
        let first = host.wait_for_messages(1, WAIT);
        assert_eq!(count(&first[0]), 2);
        plugin
            .apply_settings(r#"{"interval": "10ms", "step": 100}"#)
            .unwrap();
        let jumped = host.wait_for(WAIT, |r| r.messages.iter().any(|m| count(m) > 100));
        assert!(jumped, "{:?}", host.messages());
        assert_eq!(plugin.invoke_method("get", "null").status, 200);
        plugin.stop();
        assert_eq!(host.calls_after_stop(), 0);
    }

    #[test]
    fn refuses_a_step_of_zero() {
        assert_eq!(
            parse_settings(r#"{"step": 0}"#).unwrap_err(),
            "step must not be 0"
        );
        let host = FakeHost::new();
        assert!(host.start::<Counter>(r#"{"step": 0}"#).is_err());
    }
}
