//! The twin document as the session sees it: a full GET answer split into its sections, the
//! order in which desired patches apply, and IoT Hub's limits on what a device may report. Pure
//! code; merging a patch into the desired document and diffing documents is `util::json`'s.

use serde_json::{Map, Value};

use crate::util::encoding::cap_text;

/// IoT Hub's limits on twin properties (docs/hubsim.md, "Twin limits", cites Azure's): a patch
/// that breaks one is refused whole, so the agent must never send one.
pub const MAX_KEY_BYTES: usize = 1024;
pub const MAX_STRING_BYTES: usize = 4096;
pub const MIN_INTEGER: i64 = -4_503_599_627_370_496;
pub const MAX_INTEGER: i64 = 4_503_599_627_370_495;
/// Objects and arrays nest at most this many levels below `reported` (its own properties are
/// level 1).
pub const MAX_DEPTH: usize = 10;
/// The whole reported section, as the hub counts it ([`reported_size`]).
pub const MAX_REPORTED_BYTES: usize = 32 * 1024;
/// What stands in for an entry left out to keep the section under [`MAX_REPORTED_BYTES`].
pub const OMITTED: &str = "omitted: the reported properties would exceed IoT Hub's 32 KB limit";

/// Makes a reported-properties document one the hub accepts, changing only what it would refuse:
/// property names lose control characters, `.`, `$` and spaces (each becomes `_`) and are cut to
/// 1 KB; strings are cut to 4 KB (saying so); integers outside ±2^52 become strings; objects and
/// arrays nested deeper than 10 levels become their JSON text; `null` inside arrays is dropped.
/// Then, while the whole section is over 32 KB, its largest entry one level down (one plugin's
/// properties, say) is replaced by [`OMITTED`], so what is small (the agent's own state) stays.
pub fn within_hub_limits(section: Map<String, Value>) -> Map<String, Value> {
    let mut section = fit_object(section, 1);
    while reported_size(&section) > MAX_REPORTED_BYTES {
        if !omit_largest_entry(&mut section) {
            break;
        }
    }
    section
}

/// A section's size as the hub counts it (hubsim counts the same way; docs/hubsim.md cites
/// Azure): each property's name plus its value, strings by their characters without control
/// characters, numbers 8, booleans 4, objects and arrays the sum of what they hold.
pub fn reported_size(section: &Map<String, Value>) -> usize {
    section
        .iter()
        .map(|(k, v)| text_size(k) + value_size(v))
        .sum()
}

fn text_size(text: &str) -> usize {
    text.chars().filter(|c| !c.is_control()).count()
}

fn value_size(value: &Value) -> usize {
    match value {
        Value::String(s) => text_size(s),
        Value::Number(_) => 8,
        Value::Bool(_) => 4,
        Value::Null => 0,
        Value::Array(items) => items.iter().map(value_size).sum(),
        Value::Object(map) => reported_size(map),
    }
}

/// Replaces the largest entry below a top-level object (or, with none left, the largest
/// top-level value) by [`OMITTED`]; false when nothing is left to shrink.
fn omit_largest_entry(section: &mut Map<String, Value>) -> bool {
    let omitted = Value::String(OMITTED.into());
    let largest_nested = section
        .iter()
        .filter_map(|(top, v)| v.as_object().map(|map| (top, map)))
        .flat_map(|(top, map)| map.iter().map(move |(key, v)| (top, key, v)))
        .filter(|(_, _, v)| **v != omitted)
        .max_by_key(|(_, _, v)| value_size(v))
        .map(|(top, key, _)| (top.clone(), key.clone()));
    if let Some((top, key)) = largest_nested {
        section[&top][&key] = omitted;
        return true;
    }
    let largest_top = section
        .iter()
        .filter(|(_, v)| **v != omitted)
        .max_by_key(|(_, v)| value_size(v))
        .map(|(top, _)| top.clone());
    match largest_top {
        Some(top) => {
            section.insert(top, omitted);
            true
        }
        None => false,
    }
}

fn fit_key(key: String) -> String {
    let clean = |c: char| !(c.is_control() || matches!(c, '.' | '$' | ' '));
    let key = if key.chars().all(clean) {
        key
    } else {
        key.chars()
            .map(|c| if clean(c) { c } else { '_' })
            .collect()
    };
    let mut key = key;
    if key.is_empty() {
        key.push('_');
    }
    if key.len() > MAX_KEY_BYTES {
        let mut end = MAX_KEY_BYTES;
        while !key.is_char_boundary(end) {
            end -= 1;
        }
        key.truncate(end);
    }
    key
}

/// `depth`: the level of the properties of this object.
fn fit_object(map: Map<String, Value>, depth: usize) -> Map<String, Value> {
    map.into_iter()
        .map(|(k, v)| (fit_key(k), fit_value(v, depth)))
        .collect()
}

/// `depth`: the level of the property holding `value`.
fn fit_value(value: Value, depth: usize) -> Value {
    match value {
        Value::Object(_) | Value::Array(_) if depth > MAX_DEPTH => {
            Value::String(cap_text(&value.to_string(), MAX_STRING_BYTES))
        }
        Value::Object(map) => Value::Object(fit_object(map, depth + 1)),
        Value::Array(items) => Value::Array(
            items
                .into_iter()
                .filter(|v| !v.is_null())
                .map(|v| fit_value(v, depth + 1))
                .collect(),
        ),
        Value::String(text) if text.len() > MAX_STRING_BYTES => {
            Value::String(cap_text(&text, MAX_STRING_BYTES))
        }
        Value::Number(n)
            if (n.is_i64() || n.is_u64())
                && !n
                    .as_i64()
                    .is_some_and(|i| (MIN_INTEGER..=MAX_INTEGER).contains(&i)) =>
        {
            Value::String(n.to_string())
        }
        other => other,
    }
}

/// A twin GET answer `{"desired": {…, "$version": n}, "reported": {…}}` → (desired, n, reported),
/// without the `$version` keys. Anything else in the document is ignored.
pub fn split_twin(doc: Value) -> (Map<String, Value>, u64, Map<String, Value>) {
    let mut desired = doc["desired"].as_object().cloned().unwrap_or_default();
    let version = desired
        .remove("$version")
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    let mut reported = doc["reported"].as_object().cloned().unwrap_or_default();
    reported.remove("$version");
    (desired, version, reported)
}

/// What to do with a desired patch of `version` when the agent has `current`.
#[derive(Debug, PartialEq)]
pub(super) enum DesiredStep {
    /// Already applied (a duplicate or a patch older than the last full twin).
    Stale,
    /// The next one: apply it.
    Apply,
    /// One or more patches in between were missed.
    Gap,
}

pub(super) fn next_desired(current: u64, version: u64) -> DesiredStep {
    if version <= current {
        DesiredStep::Stale
    } else if version == current + 1 {
        DesiredStep::Apply
    } else {
        DesiredStep::Gap
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_section_over_32_kb_loses_its_largest_entries_first() {
        // Ten plugins of 4 KB each: 40 KB, over the limit; the agent's own entry is small.
        let mut plugins = Map::new();
        for i in 0..10 {
            plugins.insert(format!("p{i}"), json!({"error": "e".repeat(4000 + i)}));
        }
        let section = json!({"agent": {"version": "1"}, "plugins": plugins});
        let before = reported_size(section.as_object().unwrap());
        assert!(before > MAX_REPORTED_BYTES, "{before}");
        let fitted = within_hub_limits(section.as_object().unwrap().clone());
        assert!(reported_size(&fitted) <= MAX_REPORTED_BYTES);
        assert_eq!(fitted["agent"], json!({"version": "1"}));
        // The largest (p9, p8, …) went first; the smaller ones stay whole.
        assert_eq!(fitted["plugins"]["p9"], OMITTED);
        assert_eq!(
            fitted["plugins"]["p0"]["error"].as_str().unwrap().len(),
            4000
        );
        // A section under the limit is left alone.
        let small = json!({"plugins": {"p": {"error": "e".repeat(100)}}});
        assert_eq!(
            Value::Object(within_hub_limits(small.as_object().unwrap().clone())),
            small
        );
        // Sizes count as the hub counts them: characters (not bytes), numbers 8, booleans 4.
        let counted = json!({"é": "éé", "n": 1, "b": true, "o": {"a": [1, "x"]}});
        assert_eq!(
            reported_size(counted.as_object().unwrap()),
            1 + 2 + 1 + 8 + 1 + 4 + 1 + 1 + 8 + 1
        );
    }

    #[test]
    fn reported_documents_are_fitted_to_the_hub_limits_and_nothing_else_changes() {
        let ok = json!({
            "plugins": {"p": {"error": "x".repeat(MAX_STRING_BYTES), "n": MAX_INTEGER,
                               "m": MIN_INTEGER, "list": [1, "a", {"b": true}]}},
            "k": "y",
        });
        let fitted = within_hub_limits(ok.as_object().unwrap().clone());
        assert_eq!(
            Value::Object(fitted),
            ok,
            "what the hub accepts is left alone"
        );

        let key_at_limit = "k".repeat(MAX_KEY_BYTES);
        let bad = json!({
            "a.b": 1, "$x": 2, "sp ace": 3, "ctl\u{7}": 4,
            key_at_limit.clone(): 5,
            format!("{key_at_limit}k"): 6,
            "long": "é".repeat(MAX_STRING_BYTES),
            "big": MAX_INTEGER + 1, "small": MIN_INTEGER - 1, "huge": u64::MAX,
            "arr": [1, null, 2],
        });
        let fitted = Value::Object(within_hub_limits(bad.as_object().unwrap().clone()));
        for key in ["a_b", "_x", "sp_ace", "ctl_"] {
            assert!(fitted.get(key).is_some(), "{key} in {fitted}");
        }
        assert_eq!(
            fitted[&key_at_limit], 6,
            "a key cut to 1 KB (the later one wins)"
        );
        let long = fitted["long"].as_str().unwrap();
        assert!(long.len() <= MAX_STRING_BYTES && long.ends_with("truncated]"));
        assert_eq!(fitted["big"], "4503599627370496");
        assert_eq!(fitted["small"], "-4503599627370497");
        assert_eq!(fitted["huge"], u64::MAX.to_string());
        assert_eq!(fitted["arr"], json!([1, 2]));

        // Ten levels of objects below `reported` stay; the eleventh becomes text.
        let mut deep = json!("leaf");
        for _ in 0..10 {
            deep = json!({"d": deep});
        }
        let fitted = within_hub_limits(json!({"top": deep.clone()}).as_object().unwrap().clone());
        assert_eq!(fitted["top"], deep, "10 levels: {}", fitted["top"]);
        let fitted = within_hub_limits(
            json!({"top": {"d": deep.clone()}})
                .as_object()
                .unwrap()
                .clone(),
        );
        let mut level = &fitted["top"];
        for _ in 0..10 {
            level = &level["d"];
        }
        assert_eq!(
            level,
            &json!(json!({"d": "leaf"}).to_string()),
            "11th level: {fitted:?}"
        );
    }

    #[test]
    fn desired_patches_apply_in_version_order() {
        assert_eq!(next_desired(4, 5), DesiredStep::Apply);
        assert_eq!(next_desired(4, 4), DesiredStep::Stale);
        assert_eq!(next_desired(4, 2), DesiredStep::Stale);
        assert_eq!(next_desired(4, 7), DesiredStep::Gap);
        assert_eq!(next_desired(0, 1), DesiredStep::Apply);
    }

    #[test]
    fn twin_documents_split_into_sections_without_versions() {
        let (desired, version, reported) = split_twin(json!({
            "desired": {"interval": "5s", "$version": 9},
            "reported": {"agent": {"v": 1}, "$version": 3}
        }));
        assert_eq!(version, 9);
        assert_eq!(Value::Object(desired), json!({"interval": "5s"}));
        assert_eq!(Value::Object(reported), json!({"agent": {"v": 1}}));
        let (desired, version, reported) = split_twin(json!({}));
        assert!(desired.is_empty() && reported.is_empty());
        assert_eq!(version, 0);
    }
}
