//! JSON merge and diff, as the twin uses them: a desired-property patch is merged into the cached
//! document (`null` removes a key), and reported properties are sent as the diff against what the
//! hub already has.

use serde_json::{Map, Value};

/// Deep merge of a twin patch: objects merge key by key, `null` removes a key.
pub fn merge(target: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (key, value) in patch {
        match value {
            Value::Null => {
                target.remove(key);
            }
            Value::Object(child) => {
                let entry = target
                    .entry(key.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                if !entry.is_object() {
                    *entry = Value::Object(Map::new());
                }
                if let Value::Object(t) = entry {
                    merge(t, child);
                }
            }
            other => {
                target.insert(key.clone(), other.clone());
            }
        }
    }
}

/// The patch that turns `old` into `new`: changed keys, and `null` for removed ones (objects are
/// compared key by key at every depth; anything else is replaced whole). For documents without
/// `null` values, merging the patch into `old` gives `new` (the `twin_documents` fuzz target
/// checks it).
pub fn diff(old: &Value, new: &Value) -> Value {
    match (old, new) {
        (Value::Object(o), Value::Object(n)) => {
            let mut out = Map::new();
            for (k, v) in n {
                match o.get(k) {
                    Some(ov) if ov == v => {}
                    Some(ov) => {
                        out.insert(k.clone(), diff(ov, v));
                    }
                    None => {
                        out.insert(k.clone(), v.clone());
                    }
                }
            }
            for k in o.keys() {
                if !n.contains_key(k) {
                    out.insert(k.clone(), Value::Null);
                }
            }
            Value::Object(out)
        }
        _ => new.clone(),
    }
}
