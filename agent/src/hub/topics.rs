//! IoT Hub MQTT topics and property bags (docs/protocol.md §5), as pure functions.

use crate::message::TelemetryMessage;
use crate::util::encoding::push_url_encoded;

/// `devices/{id}/messages/events/{bag}` with system properties first (`%24.mid`, …) and then the
/// application properties, url-encoded as Azure's SDKs do. Built into one string (it is made
/// once per message sent: the hot path, docs/benchmarks.md).
pub fn telemetry_topic(device_id: &str, message: &TelemetryMessage) -> String {
    let mut topic = String::with_capacity(
        64 + device_id.len()
            + message.message_id.len()
            + message.creation_time.as_ref().map_or(0, |t| t.len() + 16)
            + message
                .properties
                .iter()
                .map(|(k, v)| k.len() + v.len() + 2)
                .sum::<usize>(),
    );
    topic.push_str("devices/");
    topic.push_str(device_id);
    topic.push_str("/messages/events/%24.mid=");
    push_url_encoded(&mut topic, &message.message_id);
    let system = [
        ("&%24.ct=", &message.content_type),
        ("&%24.ce=", &message.content_encoding),
        ("&%24.ctime=", &message.creation_time),
    ];
    for (name, value) in system {
        if let Some(value) = value {
            topic.push_str(name);
            push_url_encoded(&mut topic, value);
        }
    }
    for (k, v) in &message.properties {
        topic.push('&');
        push_url_encoded(&mut topic, k);
        topic.push('=');
        push_url_encoded(&mut topic, v);
    }
    topic
}

/// Splits `k=v&k2&k3=` into decoded pairs (C2D property bags).
pub fn parse_property_bag(bag: &str) -> Vec<(String, String)> {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    bag.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').find_map(|p| {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        (k == name).then_some(v)
    })
}

/// What an incoming hub publish is.
#[derive(Debug, PartialEq)]
pub enum Incoming {
    TwinResponse {
        status: u16,
        rid: String,
        version: Option<u64>,
    },
    DesiredPatch {
        version: Option<u64>,
    },
    Method {
        name: String,
        rid: String,
    },
    C2d {
        properties: Vec<(String, String)>,
    },
    Unknown,
}

pub fn classify(device_id: &str, topic: &str) -> Incoming {
    if let Some(rest) = topic.strip_prefix("$iothub/twin/res/") {
        let (status, query) = rest.split_once("/?").unwrap_or((rest, ""));
        return match status.parse() {
            Ok(status) => Incoming::TwinResponse {
                status,
                rid: query_param(query, "$rid").unwrap_or("").to_string(),
                version: query_param(query, "$version").and_then(|v| v.parse().ok()),
            },
            Err(_) => Incoming::Unknown,
        };
    }
    if let Some(query) = topic.strip_prefix("$iothub/twin/PATCH/properties/desired/") {
        let query = query.trim_start_matches('?');
        return Incoming::DesiredPatch {
            version: query_param(query, "$version").and_then(|v| v.parse().ok()),
        };
    }
    if let Some(rest) = topic.strip_prefix("$iothub/methods/POST/") {
        let (name, query) = rest.split_once("/?").unwrap_or((rest, ""));
        return Incoming::Method {
            name: name.to_string(),
            rid: query_param(query, "$rid").unwrap_or("").to_string(),
        };
    }
    let c2d_prefix = format!("devices/{device_id}/messages/devicebound/");
    if let Some(bag) = topic.strip_prefix(&c2d_prefix) {
        return Incoming::C2d {
            properties: parse_property_bag(bag),
        };
    }
    Incoming::Unknown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn telemetry_topic_encodes_like_the_sdks() {
        let message = TelemetryMessage {
            message_id: "m-1".into(),
            body: "{}".into(),
            content_type: Some("application/json".into()),
            content_encoding: Some("utf-8".into()),
            creation_time: None,
            properties: vec![("alert".into(), "high temp".into())],
        };
        assert_eq!(
            telemetry_topic("dev-01", &message),
            "devices/dev-01/messages/events/%24.mid=m-1&%24.ct=application%2Fjson&%24.ce=utf-8&alert=high%20temp"
        );
    }

    #[test]
    fn queued_bodies_are_compact() {
        let message = TelemetryMessage {
            message_id: "m".into(),
            body: vec![7u8; 256].into(),
            content_type: None,
            content_encoding: None,
            creation_time: None,
            properties: vec![],
        };
        let json = serde_json::to_string(&message).unwrap();
        assert!(
            json.len() < 256 * 2,
            "{} bytes for a 256-byte body",
            json.len()
        );
        assert_eq!(
            serde_json::from_str::<TelemetryMessage>(&json).unwrap(),
            message
        );
    }

    #[test]
    fn incoming_topics_are_classified() {
        assert_eq!(
            classify("d", "$iothub/twin/res/204/?$rid=7&$version=3"),
            Incoming::TwinResponse {
                status: 204,
                rid: "7".into(),
                version: Some(3)
            }
        );
        assert_eq!(
            classify("d", "$iothub/twin/PATCH/properties/desired/?$version=12"),
            Incoming::DesiredPatch { version: Some(12) }
        );
        assert_eq!(
            classify("d", "$iothub/methods/POST/reboot/?$rid=a1"),
            Incoming::Method {
                name: "reboot".into(),
                rid: "a1".into()
            }
        );
        assert_eq!(
            classify("d", "devices/d/messages/devicebound/%24.mid=c-1&color=red"),
            Incoming::C2d {
                properties: vec![
                    ("$.mid".into(), "c-1".into()),
                    ("color".into(), "red".into())
                ]
            }
        );
        assert_eq!(
            classify("d", "devices/other/messages/devicebound/x"),
            Incoming::Unknown
        );
    }

    #[test]
    fn reserved_characters_in_properties_survive_a_round_trip() {
        let message = TelemetryMessage {
            message_id: "id with/slash".into(),
            body: bytes::Bytes::new(),
            content_type: None,
            content_encoding: None,
            creation_time: Some("2026-11-23T07:00:00Z".into()),
            properties: vec![
                ("a&b".into(), "x=y".into()),
                ("unit".into(), "°C".into()),
                ("empty".into(), String::new()),
                ("$.fake".into(), "not a system property".into()),
            ],
        };
        let topic = telemetry_topic("dev-9", &message);
        let bag = topic
            .strip_prefix("devices/dev-9/messages/events/")
            .unwrap();
        // Nothing in a value can split the bag or fake a system property.
        assert_eq!(bag.matches('&').count(), 5, "{bag}");
        assert!(bag.contains("%24.ctime=2026-11-23T07%3A00%3A00Z"), "{bag}");
        assert!(bag.contains("%24.fake="), "{bag}");
        assert_eq!(
            parse_property_bag(bag),
            vec![
                ("$.mid".to_string(), "id with/slash".to_string()),
                ("$.ctime".into(), "2026-11-23T07:00:00Z".into()),
                ("a&b".into(), "x=y".into()),
                ("unit".into(), "°C".into()),
                ("empty".into(), String::new()),
                ("$.fake".into(), "not a system property".into()),
            ]
        );
    }

    #[test]
    fn c2d_bags_decode_every_documented_form() {
        // docs/protocol.md §5.3: `key` (null), `key=` (empty), `key=value`, and encoded system keys.
        assert_eq!(
            parse_property_bag(
                "%24.mid=c2d-1&%24.to=%2Fdevices%2Fdev-01%2Fmessages%2FdeviceBound&iothub-ack=full&flag&blank="
            ),
            vec![
                ("$.mid".to_string(), "c2d-1".to_string()),
                ("$.to".into(), "/devices/dev-01/messages/deviceBound".into()),
                ("iothub-ack".into(), "full".into()),
                ("flag".into(), String::new()),
                ("blank".into(), String::new()),
            ]
        );
        // The decoded form from the docs parses too, and an empty bag has no properties.
        assert_eq!(
            parse_property_bag("$.mid=79ea&$.to=/devices/x/messages/deviceBound"),
            vec![
                ("$.mid".to_string(), "79ea".to_string()),
                ("$.to".into(), "/devices/x/messages/deviceBound".into()),
            ]
        );
        assert!(parse_property_bag("").is_empty());
        assert_eq!(
            classify("dev-01", "devices/dev-01/messages/devicebound/"),
            Incoming::C2d { properties: vec![] }
        );
    }

    #[test]
    fn twin_and_method_topics_tolerate_missing_parts() {
        // A reported-patch answer may come without $version (EMB-C treats it as optional).
        assert_eq!(
            classify("d", "$iothub/twin/res/204/?$rid=9"),
            Incoming::TwinResponse {
                status: 204,
                rid: "9".into(),
                version: None
            }
        );
        // $rid is echoed verbatim, whatever the device chose.
        assert_eq!(
            classify("d", "$iothub/twin/res/429/?$rid=337ba768-aa&$version=x"),
            Incoming::TwinResponse {
                status: 429,
                rid: "337ba768-aa".into(),
                version: None
            }
        );
        assert_eq!(
            classify("d", "$iothub/twin/res/abc/?$rid=1"),
            Incoming::Unknown
        );
        assert_eq!(
            classify(
                "d",
                "$iothub/twin/PATCH/properties/desired/?$version=4&other=1"
            ),
            Incoming::DesiredPatch { version: Some(4) }
        );
        assert_eq!(
            classify("d", "$iothub/twin/PATCH/properties/desired/"),
            Incoming::DesiredPatch { version: None }
        );
        assert_eq!(
            classify("d", "$iothub/methods/POST/set_interval/?$rid=1f"),
            Incoming::Method {
                name: "set_interval".into(),
                rid: "1f".into()
            }
        );
        assert_eq!(
            classify("d", "devices/d/messages/events/x"),
            Incoming::Unknown
        );
    }
}
