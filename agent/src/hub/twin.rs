//! The twin document as the session sees it: a full GET answer split into its sections, and the
//! order in which desired patches apply. Pure code; merging a patch into the desired document and
//! diffing documents is `util::json`'s.

use serde_json::{Map, Value};

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
