//! What the cloud asks of a plugin (#17): direct methods `<plugin>.<method>` and cloud-to-device
//! messages. What a plugin declares it takes, how a C2D message is matched against that, and the
//! shapes of a method's answer and of a C2D message on their way to any kind of plugin.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// The largest method answer passed on: the hub's limit for a method payload (128 KiB,
/// docs/protocol.md §5.5).
pub const MAX_METHOD_ANSWER: usize = 128 * 1024;
/// At most this many methods per plugin, each name at most `MAX_METHOD_NAME` bytes.
pub const MAX_METHODS: usize = 64;
pub const MAX_METHOD_NAME: usize = 128;

/// The methods a plugin answers and the C2D messages it takes (nothing, for a plugin of ABI 1.0
/// or an exec plugin that declared nothing).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Declarations {
    pub methods: Vec<String>,
    /// Application property equalities a C2D message must all match; `None`: no C2D.
    pub c2d_filter: Option<Map<String, Value>>,
}

impl Declarations {
    /// Checks what a plugin declared; the error names what is wrong.
    pub fn new(methods: Vec<String>, c2d_filter: Option<&str>) -> Result<Declarations, String> {
        if methods.len() > MAX_METHODS {
            return Err(format!(
                "declares {} methods, more than {MAX_METHODS}",
                methods.len()
            ));
        }
        for m in &methods {
            check_method_name(m)?;
        }
        let c2d_filter = c2d_filter.map(parse_filter).transpose()?;
        Ok(Declarations {
            methods,
            c2d_filter,
        })
    }

    pub fn answers(&self, method: &str) -> bool {
        self.methods.iter().any(|m| m == method)
    }

    /// Whether this plugin takes a C2D message with these application properties.
    pub fn takes(&self, properties: &[(String, String)]) -> bool {
        let Some(filter) = &self.c2d_filter else {
            return false;
        };
        filter.iter().all(|(key, want)| {
            properties
                .iter()
                .any(|(k, v)| k == key && want.as_str() == Some(v.as_str()))
        })
    }
}

/// A method name travels in an MQTT topic level (`$iothub/methods/POST/{name}/…`).
fn check_method_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_METHOD_NAME {
        return Err(format!(
            "method name '{name}' must be 1 to {MAX_METHOD_NAME} bytes"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| matches!(c, '/' | '+' | '#' | '?') || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "method name '{}' contains '{}', which cannot be part of a method name",
            name.escape_default(),
            c.escape_default()
        ));
    }
    Ok(())
}

/// A C2D filter: a JSON object whose values are strings (property values are strings).
fn parse_filter(text: &str) -> Result<Map<String, Value>, String> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| format!("c2d filter '{text}' is not JSON: {e}"))?;
    let Value::Object(filter) = value else {
        return Err(format!(
            "c2d filter '{text}' must be a JSON object of property equalities ({{}} for every message)"
        ));
    };
    if let Some((k, _)) = filter.iter().find(|(_, v)| !v.is_string()) {
        return Err(format!(
            "c2d filter: the value of '{k}' must be a string (application properties are strings)"
        ));
    }
    Ok(filter)
}

/// A direct method's answer as the hub passes it to the caller.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodAnswer {
    pub status: u16,
    pub payload: Value,
}

impl MethodAnswer {
    /// An answer of the agent's own, on the plugin's behalf.
    pub fn error(status: u16, text: impl Into<String>) -> MethodAnswer {
        MethodAnswer {
            status,
            payload: json!({"error": text.into()}),
        }
    }

    /// A plugin's answer, checked: a status outside 200..=599 or an answer that is not JSON
    /// (or too large) becomes a 500 naming what was wrong.
    pub fn from_plugin(status: i64, answer: &[u8]) -> MethodAnswer {
        if !(200..=599).contains(&status) {
            return MethodAnswer::error(
                500,
                format!("the plugin answered with status {status}, not 200..599"),
            );
        }
        if answer.len() > MAX_METHOD_ANSWER {
            return MethodAnswer::error(
                500,
                format!(
                    "the plugin's answer of {} bytes is over the hub's {MAX_METHOD_ANSWER} byte limit",
                    answer.len()
                ),
            );
        }
        let payload = if answer.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            match serde_json::from_slice(answer) {
                Ok(v) => v,
                Err(e) => {
                    return MethodAnswer::error(
                        500,
                        format!("the plugin's answer is not JSON: {e}"),
                    );
                }
            }
        };
        MethodAnswer {
            status: status as u16,
            payload,
        }
    }
}

/// A C2D message on its way to a plugin (also a frame field and an exec line).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct C2dMessage {
    /// The hub's `$.mid`, the same on every redelivery ("" when the sender set none).
    pub message_id: String,
    /// base64 in frames and exec lines.
    #[serde(with = "base64_bytes")]
    pub body: Vec<u8>,
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    /// The sender's application properties (the system ones, `$.…` and `iothub-…`, are not
    /// repeated here).
    pub properties: Vec<(String, String)>,
}

impl C2dMessage {
    /// From the property bag of the hub's C2D topic.
    pub fn from_topic(body: Vec<u8>, bag: &[(String, String)]) -> C2dMessage {
        let find = |key: &str| bag.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
        C2dMessage {
            message_id: find("$.mid").unwrap_or_default(),
            body,
            content_type: find("$.ct"),
            content_encoding: find("$.ce"),
            properties: bag
                .iter()
                .filter(|(k, _)| !k.starts_with("$.") && !k.starts_with("iothub-"))
                .cloned()
                .collect(),
        }
    }
}

mod base64_bytes {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn filters_match_every_property_they_name() {
        let d = Declarations::new(vec![], Some(r#"{"kind": "valve"}"#)).unwrap();
        assert!(d.takes(&props(&[("kind", "valve"), ("x", "1")])));
        assert!(!d.takes(&props(&[("kind", "meter")])));
        assert!(!d.takes(&props(&[])));
        let all = Declarations::new(vec![], Some("{}")).unwrap();
        assert!(all.takes(&props(&[])));
        assert!(!Declarations::default().takes(&props(&[])));
        let e = Declarations::new(vec![], Some(r#"{"n": 1}"#)).unwrap_err();
        assert!(e.contains("'n' must be a string"), "{e}");
        assert!(Declarations::new(vec![], Some("[1]")).is_err());
        let e = Declarations::new(vec!["a/b".into()], None).unwrap_err();
        assert!(e.contains("'/'"), "{e}");
    }

    #[test]
    fn plugin_answers_are_checked() {
        assert_eq!(
            MethodAnswer::from_plugin(201, br#"{"ok": true}"#),
            MethodAnswer {
                status: 201,
                payload: json!({"ok": true})
            }
        );
        assert_eq!(MethodAnswer::from_plugin(200, b"").payload, Value::Null);
        let bad = MethodAnswer::from_plugin(200, b"{nope");
        assert_eq!(bad.status, 500);
        assert!(bad.payload["error"].as_str().unwrap().contains("not JSON"));
        assert_eq!(MethodAnswer::from_plugin(99, b"").status, 500);
    }

    #[test]
    fn c2d_messages_keep_the_id_and_the_senders_properties() {
        let m = C2dMessage::from_topic(
            b"hi".to_vec(),
            &props(&[("$.mid", "m1"), ("$.ct", "text/plain"), ("kind", "valve")]),
        );
        assert_eq!(m.message_id, "m1");
        assert_eq!(m.content_type.as_deref(), Some("text/plain"));
        assert_eq!(m.properties, props(&[("kind", "valve")]));
        let frame = serde_json::to_value(&m).unwrap();
        assert_eq!(frame["body"], "aGk=");
        assert_eq!(serde_json::from_value::<C2dMessage>(frame).unwrap(), m);
    }
}
