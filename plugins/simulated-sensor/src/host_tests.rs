//! The plugin as the agent runs it, with the SDK's fake host: readings at the interval, a new
//! interval taken, a bad one refused, stopped with nothing after.

use std::time::Duration;

use hubagent_plugin_sdk::testing::FakeHost;
use serde_json::Value;

use super::Sensor;

const WAIT: Duration = Duration::from_secs(30);

fn body(message: &hubagent_plugin_sdk::Message) -> Value {
    serde_json::from_slice(&message.body).expect("a JSON body")
}

#[test]
fn publishes_numbered_readings_and_follows_settings() {
    let host = FakeHost::new();
    let mut plugin = host.start::<Sensor>(r#"{"interval": "50ms"}"#).unwrap();
    let readings = host.wait_for_messages(2, WAIT);
    let (first, second) = (body(&readings[0]), body(&readings[1]));
    assert_eq!(
        (first["seq"].as_u64(), second["seq"].as_u64()),
        (Some(1), Some(2))
    );
    for key in ["temperature", "humidity", "windSpeed"] {
        assert!(first[key].is_number(), "{key} in {first}");
    }
    assert!(
        plugin
            .apply_settings(r#"{"interval": "1ms"}"#)
            .unwrap_err()
            .contains("50ms minimum")
    );
    assert!(
        plugin
            .apply_settings(r#"{"every": "1s"}"#)
            .unwrap_err()
            .contains("unknown field `every`")
    );
    plugin.apply_settings(r#"{"interval": "60ms"}"#).unwrap();
    let count = host.messages().len();
    host.wait_for_messages(count + 2, WAIT);
    plugin.stop();
    assert_eq!(host.calls_after_stop(), 0);
    // Numbered without a gap: nothing was lost or repeated across the settings changes.
    let seqs: Vec<u64> = host
        .messages()
        .iter()
        .map(|m| body(m)["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
}

#[test]
fn a_bad_interval_refuses_the_start() {
    let host = FakeHost::new();
    assert!(host.start::<Sensor>(r#"{"interval": "soon"}"#).is_err());
    assert!(host.messages().is_empty());
}
