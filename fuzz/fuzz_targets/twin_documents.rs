//! Twin documents and desired patches as the agent applies them: the first JSON line is a twin
//! GET answer, every further line a desired patch. The document is split, the patches merged,
//! the built-in sensor's settings read from `desired.plugins.sensor` (accepted or refused with
//! the key named), never a panic. The reported-properties patch the agent computes (`diff`)
//! must turn the old document into the new one when merged.
#![no_main]
use hubagent::hub::split_twin;
use hubagent::plugins::builtin::SensorSettings;
use hubagent::util::json::diff;
use hubagent::util::json::merge;
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

fn has_null(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Array(a) => a.iter().any(has_null),
        Value::Object(o) => o.values().any(has_null),
        _ => false,
    }
}

fuzz_target!(|data: &[u8]| {
    let mut lines = data.split(|b| *b == b'\n');
    let Some(Ok(doc)) = lines.next().map(serde_json::from_slice::<Value>) else {
        return;
    };
    let (mut desired, _version, reported) = split_twin(doc);
    for line in lines {
        let Ok(Value::Object(patch)) = serde_json::from_slice::<Value>(line) else {
            continue;
        };
        let before = Value::Object(desired.clone());
        merge(&mut desired, &patch);
        let after = Value::Object(desired.clone());
        // null in a twin means "remove": a document holding one cannot round-trip.
        if !has_null(&before) && !has_null(&after) {
            let Value::Object(reported_patch) = diff(&before, &after) else {
                panic!("the diff of two objects is an object");
            };
            let mut rebuilt = before.as_object().cloned().unwrap();
            merge(&mut rebuilt, &reported_patch);
            assert_eq!(Value::Object(rebuilt), after);
        }
        let mut settings = Map::new();
        settings.insert("interval".into(), Value::String("5s".into()));
        if let Some(Value::Object(sensor)) = desired.get("plugins").and_then(|p| p.get("sensor")) {
            merge(&mut settings, sensor);
        }
        if let Err(e) = SensorSettings::from_json(&settings) {
            assert!(!e.is_empty());
        }
    }
    let _ = diff(&Value::Object(reported), &Value::Object(desired));
});
