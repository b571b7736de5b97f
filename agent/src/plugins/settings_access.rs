//! ABI 1.2's settings accessors for C plugins (`hubagent_setting_string` and friends in
//! `hubagent_plugin.h`): one value of the settings JSON by key, with an error that names the key,
//! so a C plugin needs no JSON library. The host parses with the same parser and the same
//! duration format as the Rust SDK (`hubagent_plugin_sdk::settings`).

use std::time::Duration;

use serde_json::Value;

/// Why a value could not be had.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// No such key: the plugin keeps its default.
    Absent,
    /// The settings or the value are wrong; the text names the key.
    Wrong(String),
}

/// The value at `key` (a dotted path: `db.host` is `{"db": {"host": …}}`; twin property names
/// cannot contain '.', so the path is never ambiguous). `null` counts as absent: the twin's way
/// of removing a key.
pub fn value(settings: &str, key: &str) -> Result<Value, Lookup> {
    let root: Value = serde_json::from_str(settings)
        .map_err(|e| Lookup::Wrong(format!("settings are not JSON: {e}")))?;
    let mut at = &root;
    for part in key.split('.') {
        match at {
            Value::Object(map) => match map.get(part) {
                Some(v) => at = v,
                None => return Err(Lookup::Absent),
            },
            _ => return Err(Lookup::Absent),
        }
    }
    if at.is_null() {
        return Err(Lookup::Absent);
    }
    Ok(at.clone())
}

fn wrong(key: &str, wanted: &str, got: &Value) -> Lookup {
    let mut shown = got.to_string();
    if shown.len() > 60 {
        let mut cut = 60;
        while !shown.is_char_boundary(cut) {
            cut -= 1;
        }
        shown.truncate(cut);
        shown.push('…');
    }
    Lookup::Wrong(format!("settings.{key}: expected {wanted}, got {shown}"))
}

pub fn string(settings: &str, key: &str) -> Result<String, Lookup> {
    match value(settings, key)? {
        Value::String(s) => Ok(s),
        other => Err(wrong(key, "a string", &other)),
    }
}

pub fn number(settings: &str, key: &str) -> Result<f64, Lookup> {
    match value(settings, key)? {
        Value::Number(n) => n
            .as_f64()
            .ok_or_else(|| wrong(key, "a number", &Value::Number(n))),
        other => Err(wrong(key, "a number", &other)),
    }
}

pub fn boolean(settings: &str, key: &str) -> Result<bool, Lookup> {
    match value(settings, key)? {
        Value::Bool(b) => Ok(b),
        other => Err(wrong(key, "true or false", &other)),
    }
}

/// The SDK's duration format (`"500ms"`, `"5s"`, `"2m"`, `"1h"`), or a number of seconds as
/// older settings write it.
pub fn duration(settings: &str, key: &str) -> Result<Duration, Lookup> {
    match value(settings, key)? {
        Value::String(s) => hubagent_plugin_sdk::settings::parse_duration(&s)
            .map_err(|e| Lookup::Wrong(format!("settings.{key}: {e}"))),
        Value::Number(n) => match n.as_f64() {
            Some(secs) if secs.is_finite() && (0.0..1e12).contains(&secs) => {
                Ok(Duration::from_secs_f64(secs))
            }
            _ => Err(wrong(key, "a duration such as \"5s\"", &Value::Number(n))),
        },
        other => Err(wrong(key, "a duration such as \"5s\"", &other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_by_key_with_errors_that_name_it() {
        let s = r#"{"interval": "250ms", "old": 2, "step": 5, "on": true, "room": "lab", "db": {"host": "h"}, "gone": null}"#;
        assert_eq!(duration(s, "interval"), Ok(Duration::from_millis(250)));
        assert_eq!(duration(s, "old"), Ok(Duration::from_secs(2)));
        assert_eq!(number(s, "step"), Ok(5.0));
        assert_eq!(boolean(s, "on"), Ok(true));
        assert_eq!(string(s, "room"), Ok("lab".into()));
        assert_eq!(string(s, "db.host"), Ok("h".into()));
        assert_eq!(string(s, "missing"), Err(Lookup::Absent));
        assert_eq!(string(s, "gone"), Err(Lookup::Absent));
        assert_eq!(string(s, "room.x"), Err(Lookup::Absent));
        assert_eq!(
            number(s, "room"),
            Err(Lookup::Wrong(
                "settings.room: expected a number, got \"lab\"".into()
            ))
        );
        assert_eq!(
            duration(s, "room"),
            Err(Lookup::Wrong(
                "settings.room: 'lab' is not a duration (write e.g. \"500ms\", \"5s\", \"1m\")"
                    .into()
            ))
        );
        assert_eq!(
            boolean(s, "step"),
            Err(Lookup::Wrong(
                "settings.step: expected true or false, got 5".into()
            ))
        );
        assert!(
            matches!(string("{", "a"), Err(Lookup::Wrong(e)) if e.starts_with("settings are not JSON"))
        );
    }
}
