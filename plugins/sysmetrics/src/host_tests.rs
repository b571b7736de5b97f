//! The plugin as the agent runs it, with the SDK's fake host: started, publishing, following new
//! settings, refusing bad ones, stopped with nothing after.

use std::time::Duration;

use hubagent_plugin_sdk::testing::FakeHost;
use serde_json::Value;

use super::SysMetrics;

const WAIT: Duration = Duration::from_secs(30);

fn body(message: &hubagent_plugin_sdk::Message) -> Value {
    serde_json::from_slice(&message.body).expect("a JSON body")
}

#[test]
fn publishes_samples_and_follows_settings() {
    let host = FakeHost::new();
    let mut plugin = host
        .start::<SysMetrics>(r#"{"interval": "1s", "disks": ["/"]}"#)
        .unwrap();
    let first = host.wait_for_messages(1, WAIT);
    assert_eq!(
        first[0].properties,
        vec![("kind".into(), "sysmetrics".into())]
    );
    assert_eq!(first[0].content_type.as_deref(), Some("application/json"));
    let sample = body(&first[0]);
    assert!(
        sample["disks"]["/"]["totalBytes"].as_u64() > Some(0),
        "{sample}"
    );
    assert!(sample["disks"].get("/proc").is_none(), "{sample}");

    // A refused change leaves it publishing on the old settings; an accepted one shows in the
    // next sample (here: a second disk).
    assert!(
        plugin
            .apply_settings(r#"{"interval": "10ms"}"#)
            .unwrap_err()
            .contains("minimum")
    );
    plugin
        .apply_settings(r#"{"interval": "1s", "disks": ["/", "/proc"]}"#)
        .unwrap();
    assert!(
        host.wait_for(WAIT, |r| r
            .messages
            .iter()
            .any(|m| body(m)["disks"].get("/proc").is_some())),
        "{:?}",
        host.messages()
    );
    plugin.stop();
    assert_eq!(host.calls_after_stop(), 0);
    assert!(host.health().is_empty(), "{:?}", host.health());
}

#[test]
fn unusable_settings_refuse_the_start() {
    let host = FakeHost::new();
    let refused = host.start::<SysMetrics>(r#"{"colour": "blue"}"#).err();
    assert!(
        matches!(&refused, Some(hubagent_plugin_sdk::StartError::Rejected(why)) if why.contains("colour")),
        "{:?}",
        refused.map(|_| ())
    );
    assert!(host.messages().is_empty());
}
