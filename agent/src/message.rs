//! The message that flows from a telemetry source through the durable queue to the hub.

/// A telemetry message as the hub receives it: body plus system and application properties.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TelemetryMessage {
    /// `$.mid`: unique per message, so the cloud side can drop duplicates of at-least-once delivery.
    pub message_id: String,
    /// Base64 in JSON: the form older agents queued (and the queue still reads after an upgrade;
    /// it now stores the raw bytes, telemetry/record.rs). serde would write bytes as an array of
    /// numbers, ~4x larger.
    #[serde(with = "base64_body")]
    pub body: bytes::Bytes,
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    /// `$.ctime`, RFC 3339 UTC.
    pub creation_time: Option<String>,
    /// Application properties.
    pub properties: Vec<(String, String)>,
}

/// A new message id: a random (version 4) UUID, used for the hub message that carries a batch
/// (a plugin's readings are numbered instead: telemetry/batch.rs, `ReadingIds`). Its 122 random
/// bits come from the thread's cryptographically secure generator (`rand`, seeded from the
/// operating system), not from a `getrandom` system call as `Uuid::new_v4` makes: one per
/// message was on the hot path (docs/benchmarks.md, "Profile and what it changed").
pub fn new_message_id() -> String {
    uuid::Builder::from_random_bytes(rand::random())
        .into_uuid()
        .to_string()
}

mod base64_body {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(body: &bytes::Bytes, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(body))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<bytes::Bytes, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD
            .decode(text)
            .map(bytes::Bytes::from)
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn message_ids_are_random_version_4_uuids() {
        let ids: std::collections::BTreeSet<String> =
            (0..1000).map(|_| super::new_message_id()).collect();
        assert_eq!(ids.len(), 1000, "no id repeats");
        for id in &ids {
            let uuid = uuid::Uuid::parse_str(id).unwrap();
            assert_eq!(uuid.get_version_num(), 4, "{id}");
            assert_eq!(uuid.get_variant(), uuid::Variant::RFC4122, "{id}");
        }
    }
}
