//! Several queued readings of one source packed into one hub message, so the hub, which bills in
//! 4 KB blocks, bills a block per few dozen readings instead of one per reading. The format is
//! the consumers' contract (docs/configuration.md, "Batching to the hub"):
//!
//! * body `{"readings":[{"id":…,"time":…,"props":{…},"body":<JSON>},…]}` (UTF-8 JSON, or gzipped);
//!   a reading whose body is not JSON carries `"bodyBase64"` and its own `contentType` and
//!   `contentEncoding` instead of `"body"`;
//! * system properties `$.ct = application/json`, `$.ce = utf-8` (or `gzip`), `$.ctime` of the
//!   first reading and a `$.mid` of its own;
//! * application properties: those every reading of the batch has with the same value (`source`
//!   among them: they stay routable), and `hubagent-batch` = the number of readings; `props` of a
//!   reading holds only the others.

use std::collections::HashMap;
use std::io::Write;

use base64::Engine;

use crate::config::batch::BatchSpec;
use crate::config::plugin::PluginSpec;
use crate::message::TelemetryMessage;

/// The application property that marks a batch and counts its readings.
pub const BATCH_PROPERTY: &str = "hubagent-batch";
/// The application property naming a reading's source (the plugin), set by the plugin outlet.
pub const SOURCE_PROPERTY: &str = "source";

/// Which sources batch, and how: from the `[[plugin]]` tables.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Batching {
    by_source: HashMap<String, BatchSpec>,
}

impl Batching {
    pub fn from_plugins(plugins: &[PluginSpec]) -> Batching {
        Batching {
            by_source: plugins
                .iter()
                .filter_map(|p| Some((p.name.clone(), p.batch.clone()?)))
                .collect(),
        }
    }

    /// The batch settings of the message's source, if it batches.
    pub fn spec_for(&self, message: &TelemetryMessage) -> Option<&BatchSpec> {
        self.by_source.get(source_of(message)?)
    }
}

pub fn source_of(message: &TelemetryMessage) -> Option<&str> {
    message
        .properties
        .iter()
        .find(|(k, _)| k == SOURCE_PROPERTY)
        .map(|(_, v)| v.as_str())
}

/// The size the hub meters a message at: body, system property values (`$.mid`, `$.ct`, `$.ce`,
/// `$.ctime`), application property names and values.
pub fn metered_size(message: &TelemetryMessage) -> usize {
    message.body.len()
        + message.message_id.len()
        + [
            &message.content_type,
            &message.content_encoding,
            &message.creation_time,
        ]
        .iter()
        .map(|v| v.as_ref().map_or(0, String::len))
        .sum::<usize>()
        + message
            .properties
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
}

/// The largest leading run of `readings` (at least one) whose batch the hub meters at no more
/// than `spec.max_bytes`, and that batch.
pub fn pack(readings: &[TelemetryMessage], spec: &BatchSpec) -> (usize, TelemetryMessage) {
    assert!(!readings.is_empty(), "a batch has a reading");
    let all = encode(readings, spec.gzip);
    if metered_size(&all) <= spec.max_bytes || readings.len() == 1 {
        return (readings.len(), all);
    }
    // Sizes grow with the count (near enough with gzip): the largest count that fits, by halves.
    let (mut fits, mut too_many) = (1, readings.len());
    let mut best = encode(&readings[..1], spec.gzip);
    while too_many - fits > 1 {
        let mid = (fits + too_many) / 2;
        let batch = encode(&readings[..mid], spec.gzip);
        if metered_size(&batch) <= spec.max_bytes {
            (fits, best) = (mid, batch);
        } else {
            too_many = mid;
        }
    }
    (fits, best)
}

/// One hub message carrying `readings` (all of one source), in order.
pub fn encode(readings: &[TelemetryMessage], gzip: bool) -> TelemetryMessage {
    let common = common_properties(readings);
    let mut body = Vec::with_capacity(readings.iter().map(|r| r.body.len() + 96).sum());
    body.extend_from_slice(b"{\"readings\":[");
    for (i, reading) in readings.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        write_reading(&mut body, reading, &common);
    }
    body.extend_from_slice(b"]}");
    let (body, encoding) = if gzip {
        let mut encoder = flate2::write::GzEncoder::new(
            Vec::with_capacity(body.len() / 3),
            flate2::Compression::default(),
        );
        // Writing into a Vec cannot fail.
        encoder.write_all(&body).expect("gzip into memory");
        (encoder.finish().expect("gzip into memory"), "gzip")
    } else {
        (body, "utf-8")
    };
    let mut properties = common;
    properties.push((BATCH_PROPERTY.into(), readings.len().to_string()));
    TelemetryMessage {
        message_id: uuid::Uuid::new_v4().to_string(),
        body: body.into(),
        content_type: Some("application/json".into()),
        content_encoding: Some(encoding.into()),
        creation_time: readings[0].creation_time.clone(),
        properties,
    }
}

/// The first reading's properties that every reading has with the same value.
fn common_properties(readings: &[TelemetryMessage]) -> Vec<(String, String)> {
    readings[0]
        .properties
        .iter()
        .filter(|p| readings[1..].iter().all(|r| r.properties.contains(p)))
        .cloned()
        .collect()
}

fn write_reading(out: &mut Vec<u8>, reading: &TelemetryMessage, common: &[(String, String)]) {
    let string = |out: &mut Vec<u8>, s: &str| {
        serde_json::to_writer(&mut *out, s).expect("a string serializes");
    };
    out.extend_from_slice(b"{\"id\":");
    string(out, &reading.message_id);
    if let Some(time) = &reading.creation_time {
        out.extend_from_slice(b",\"time\":");
        string(out, time);
    }
    let own: Vec<_> = reading
        .properties
        .iter()
        .filter(|p| !common.contains(p))
        .collect();
    if !own.is_empty() {
        out.extend_from_slice(b",\"props\":{");
        for (i, (k, v)) in own.into_iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            string(out, k);
            out.push(b':');
            string(out, v);
        }
        out.push(b'}');
    }
    match inline_json(reading) {
        Some(json) => {
            out.extend_from_slice(b",\"body\":");
            out.extend_from_slice(json);
        }
        None => {
            out.extend_from_slice(b",\"bodyBase64\":\"");
            out.extend_from_slice(
                base64::engine::general_purpose::STANDARD
                    .encode(&reading.body)
                    .as_bytes(),
            );
            out.push(b'"');
            for (key, value) in [
                ("contentType", &reading.content_type),
                ("contentEncoding", &reading.content_encoding),
            ] {
                if let Some(value) = value {
                    out.extend_from_slice(format!(",\"{key}\":").as_bytes());
                    string(out, value);
                }
            }
        }
    }
    out.push(b'}');
}

/// The body as JSON to put inline: only a body that says it is JSON (UTF-8) and is.
fn inline_json(reading: &TelemetryMessage) -> Option<&[u8]> {
    let json_type = reading.content_type.as_deref().is_some_and(|t| {
        let t = t
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        t == "application/json" || t.ends_with("+json")
    });
    let utf8 = reading
        .content_encoding
        .as_deref()
        .is_none_or(|e| e.eq_ignore_ascii_case("utf-8"));
    if !(json_type && utf8) {
        return None;
    }
    serde_json::from_slice::<serde::de::IgnoredAny>(&reading.body).ok()?;
    Some(reading.body.trim_ascii())
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::time::Duration;

    use serde_json::{Value, json};

    use super::*;

    fn reading(n: usize, body: &str, content_type: Option<&str>) -> TelemetryMessage {
        TelemetryMessage {
            message_id: format!("m-{n}"),
            body: body.as_bytes().to_vec().into(),
            content_type: content_type.map(Into::into),
            content_encoding: None,
            creation_time: Some(format!("2026-12-07T01:00:0{n}Z")),
            properties: vec![
                ("source".into(), "sensor".into()),
                ("n".into(), n.to_string()),
            ],
        }
    }

    fn body_json(message: &TelemetryMessage) -> Value {
        let bytes = if message.content_encoding.as_deref() == Some("gzip") {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(&message.body[..])
                .read_to_end(&mut out)
                .unwrap();
            out
        } else {
            message.body.to_vec()
        };
        serde_json::from_slice(&bytes).unwrap()
    }

    #[test]
    fn readings_are_inline_with_their_own_properties_and_shared_ones_on_the_batch() {
        let readings = [
            reading(1, "{\"t\": 1}\n", Some("application/json")),
            reading(2, "not json", Some("text/plain")),
            reading(3, "{bad", Some("application/json")),
        ];
        let batch = encode(&readings, false);
        assert_eq!(batch.content_type.as_deref(), Some("application/json"));
        assert_eq!(batch.content_encoding.as_deref(), Some("utf-8"));
        assert_eq!(batch.creation_time.as_deref(), Some("2026-12-07T01:00:01Z"));
        assert_eq!(
            batch.properties,
            [
                ("source".to_string(), "sensor".to_string()),
                (BATCH_PROPERTY.to_string(), "3".to_string())
            ]
        );
        assert_eq!(
            body_json(&batch),
            json!({"readings": [
                {"id": "m-1", "time": "2026-12-07T01:00:01Z", "props": {"n": "1"}, "body": {"t": 1}},
                {"id": "m-2", "time": "2026-12-07T01:00:02Z", "props": {"n": "2"},
                 "bodyBase64": "bm90IGpzb24=", "contentType": "text/plain"},
                {"id": "m-3", "time": "2026-12-07T01:00:03Z", "props": {"n": "3"},
                 "bodyBase64": "e2JhZA==", "contentType": "application/json"},
            ]})
        );
        let gzipped = encode(&readings, true);
        assert_eq!(gzipped.content_encoding.as_deref(), Some("gzip"));
        assert_eq!(body_json(&gzipped), body_json(&batch));
    }

    #[test]
    fn pack_takes_the_most_readings_that_fit() {
        let body = format!("{{\"v\":\"{}\"}}", "x".repeat(180));
        let readings: Vec<_> = (0..100)
            .map(|n| reading(n % 10, &body, Some("application/json")))
            .collect();
        for gzip in [false, true] {
            let spec = BatchSpec {
                max_bytes: 4096,
                max_delay: Duration::from_secs(1),
                gzip,
            };
            let (count, batch) = pack(&readings, &spec);
            assert!(metered_size(&batch) <= 4096, "gzip {gzip}");
            let one_more = encode(&readings[..(count + 1).min(100)], gzip);
            assert!(
                count == 100 || metered_size(&one_more) > 4096,
                "gzip {gzip}: {count} fit, one more would too"
            );
            assert_eq!(
                body_json(&batch)["readings"].as_array().unwrap().len(),
                count
            );
        }
        // A reading larger than a batch still goes, alone.
        let big = reading(
            1,
            &format!("\"{}\"", "y".repeat(5000)),
            Some("application/json"),
        );
        let spec = BatchSpec {
            max_bytes: 4096,
            max_delay: Duration::ZERO,
            gzip: false,
        };
        assert_eq!(pack(&[big.clone(), big], &spec).0, 1);
    }
}
