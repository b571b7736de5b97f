//! A plugin's own reported properties (`reported.plugins.<name>.properties`, ABI 1.2's
//! `report_properties` and the exec line `{"reported": {…}}`): checked against IoT Hub's twin
//! limits before they go anywhere, since the hub refuses a whole patch that breaks one of them
//! (the limits and their sources: docs/hubsim.md, "Twin limits"). Unlike the agent's own entries,
//! which are fitted to the limits, a plugin's are refused with the reason: its author can fix them.

use serde_json::{Map, Value};

use crate::hub::twin::{MAX_DEPTH, MAX_INTEGER, MAX_KEY_BYTES, MAX_STRING_BYTES, MIN_INTEGER};

/// At most this much per plugin, counted as the hub counts reported properties: every plugin's
/// entry and the agent's own share IoT Hub's 32 KB.
pub const MAX_OWN_BYTES: usize = 4096;

/// `plugins`, `<name>` and `properties` are the three levels above a plugin's own keys.
const LEVELS_ABOVE: usize = 3;

/// The plugin's properties as it reports them, or why the hub would refuse them, naming the
/// property by its dotted path.
pub fn check(value: &Value) -> Result<Map<String, Value>, String> {
    let Value::Object(map) = value else {
        return Err("reported properties must be a JSON object".into());
    };
    check_object(map, "", LEVELS_ABOVE + 1)?;
    let size = crate::hub::twin::reported_size(map);
    if size > MAX_OWN_BYTES {
        return Err(format!(
            "reported properties of {size} bytes (as IoT Hub counts them): at most {MAX_OWN_BYTES} per plugin"
        ));
    }
    Ok(map.clone())
}

fn check_object(map: &Map<String, Value>, path: &str, level: usize) -> Result<(), String> {
    for (key, value) in map {
        let here = if path.is_empty() {
            key.clone()
        } else {
            format!("{path}.{key}")
        };
        check_key(key, &here)?;
        check_value(value, &here, level)?;
    }
    Ok(())
}

/// IoT Hub's rule for twin property names: UTF-8, at most 1 KB, no control characters, `.`,
/// `$` or space.
fn check_key(key: &str, here: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err(format!("{here}: an empty property name"));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(format!(
            "{here}: a property name of {} bytes (at most {MAX_KEY_BYTES})",
            key.len()
        ));
    }
    if let Some(c) = key
        .chars()
        .find(|c| c.is_control() || matches!(c, '.' | '$' | ' '))
    {
        return Err(format!(
            "{here}: property names cannot contain {} (IoT Hub refuses control characters, '.', '$' and spaces)",
            match c {
                '.' | '$' | ' ' => format!("'{c}'"),
                other => format!("U+{:04X}", other as u32),
            }
        ));
    }
    Ok(())
}

fn check_value(value: &Value, here: &str, level: usize) -> Result<(), String> {
    match value {
        Value::String(s) if s.len() > MAX_STRING_BYTES => Err(format!(
            "{here}: a string of {} bytes (at most {MAX_STRING_BYTES})",
            s.len()
        )),
        Value::Number(n)
            if n.as_i64()
                .is_some_and(|i| !(MIN_INTEGER..=MAX_INTEGER).contains(&i))
                || n.as_u64().is_some_and(|u| u > MAX_INTEGER as u64) =>
        {
            Err(format!(
                "{here}: {n} is beyond the integers IoT Hub takes (±2^52); send it as a string"
            ))
        }
        Value::Object(_) | Value::Array(_) if level > MAX_DEPTH => Err(format!(
            "{here}: nested deeper than IoT Hub's {MAX_DEPTH} levels below reported (the plugin's own properties are level {})",
            LEVELS_ABOVE + 1
        )),
        Value::Object(map) => check_object(map, here, level + 1),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                if item.is_null() {
                    return Err(format!("{here}[{i}]: IoT Hub takes no null in arrays"));
                }
                check_value(item, &format!("{here}[{i}]"), level + 1)?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn what_the_hub_refuses_is_refused_naming_the_property() {
        assert!(
            check(&json!({"firmware": "1.2", "calibration": {"offset": 0.5, "at": [1, 2]}}))
                .is_ok()
        );
        let refused = |v: Value| check(&v).unwrap_err();
        assert_eq!(
            refused(json!([1])),
            "reported properties must be a JSON object"
        );
        assert!(
            refused(json!({"fw.version": 1}))
                .starts_with("fw.version: property names cannot contain '.'")
        );
        assert!(
            refused(json!({"a": {"$b": 1}})).starts_with("a.$b: property names cannot contain '$'")
        );
        assert!(refused(json!({"has space": 1})).contains("cannot contain ' '"));
        assert!(refused(json!({"bell\u{7}": 1})).contains("U+0007"));
        assert!(refused(json!({"s": "x".repeat(4097)})).starts_with("s: a string of 4097 bytes"));
        assert!(refused(json!({"n": 1u64 << 60})).starts_with("n: 1152921504606846976 is beyond"));
        assert!(refused(json!({"a": [1, null]})).starts_with("a[1]: IoT Hub takes no null"));
        // Own keys are level 4.
        let seven = json!({"l4": {"l5": {"l6": {"l7": {"l8": {"l9": {"l10": {"l11": 1}}}}}}}});
        assert!(check(&seven).is_ok(), "{seven}");
        // As hubsim counts (tests/hubsim/src/twin.rs): a property at level 10 may hold an
        // object; one at level 11 may not.
        let deeper =
            json!({"l4": {"l5": {"l6": {"l7": {"l8": {"l9": {"l10": {"l11": {"l12": 1}}}}}}}}});
        assert!(refused(deeper).starts_with("l4.l5.l6.l7.l8.l9.l10.l11: nested deeper"));
        let big: Map<String, Value> = (0..5)
            .map(|i| (format!("k{i}"), json!("x".repeat(1000))))
            .collect();
        assert!(refused(Value::Object(big)).contains("at most 4096 per plugin"));
    }
}
