//! hubagent's batches (`hubagent-batch` application property; docs/configuration.md, "Batching
//! to the hub") split back into their readings, as a consumer of the hub would: the hub itself
//! does not, so this is hubsim standing in for the cloud side, and the tests can count readings.

use std::collections::BTreeMap;
use std::io::Read;

use base64::Engine;
use serde_json::Value;

/// The application property that marks a batch.
pub const BATCH_PROPERTY: &str = "hubagent-batch";

/// One reading out of a batch: what it would have been as a message of its own.
#[derive(Debug, PartialEq)]
pub struct Reading {
    pub message_id: String,
    pub creation_time: Option<String>,
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    pub body: Vec<u8>,
    /// The batch's application properties (less `hubagent-batch`) with the reading's own.
    pub properties: BTreeMap<String, String>,
}

/// The readings of a batch, given its body, `content-encoding` and application properties; an
/// error says what is wrong with it.
pub fn split(
    body: &[u8],
    content_encoding: Option<&str>,
    properties: &BTreeMap<String, String>,
) -> Result<Vec<Reading>, String> {
    let json = if content_encoding.is_some_and(|e| e.eq_ignore_ascii_case("gzip")) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(body)
            .read_to_end(&mut out)
            .map_err(|e| format!("the batch is not gzip: {e}"))?;
        out
    } else {
        body.to_vec()
    };
    let doc: Value =
        serde_json::from_slice(&json).map_err(|e| format!("the batch is not JSON: {e}"))?;
    let readings = doc
        .get("readings")
        .and_then(Value::as_array)
        .ok_or("the batch has no \"readings\" array")?;
    let declared = properties.get(BATCH_PROPERTY).and_then(|n| n.parse().ok());
    if declared != Some(readings.len()) {
        return Err(format!(
            "{BATCH_PROPERTY} says {:?}, the batch holds {} readings",
            properties.get(BATCH_PROPERTY),
            readings.len()
        ));
    }
    let mut shared = properties.clone();
    shared.remove(BATCH_PROPERTY);
    readings
        .iter()
        .enumerate()
        .map(|(i, r)| reading(r, &shared).map_err(|e| format!("reading {i}: {e}")))
        .collect()
}

fn reading(r: &Value, shared: &BTreeMap<String, String>) -> Result<Reading, String> {
    let text = |key: &str| r.get(key).and_then(Value::as_str).map(str::to_owned);
    let message_id = text("id").ok_or("no \"id\"")?;
    let mut properties = shared.clone();
    if let Some(own) = r.get("props") {
        let own = own.as_object().ok_or("\"props\" is not an object")?;
        for (k, v) in own {
            let v = v
                .as_str()
                .ok_or(format!("property '{k}' is not a string"))?;
            properties.insert(k.clone(), v.to_owned());
        }
    }
    let (body, content_type, content_encoding) = match (r.get("body"), text("bodyBase64")) {
        (Some(body), None) => (
            body.to_string().into_bytes(),
            Some("application/json".to_owned()),
            Some("utf-8".to_owned()),
        ),
        (None, Some(b64)) => (
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| format!("\"bodyBase64\" is not base64: {e}"))?,
            text("contentType"),
            text("contentEncoding"),
        ),
        _ => return Err("needs one of \"body\" and \"bodyBase64\"".into()),
    };
    Ok(Reading {
        message_id,
        creation_time: text("time"),
        content_type,
        content_encoding,
        body,
        properties,
    })
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn props(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const BATCH: &str = r#"{"readings":[
        {"id":"a","time":"2026-12-07T01:00:00Z","props":{"n":"1"},"body":{"t":1}},
        {"id":"b","bodyBase64":"aGk=","contentType":"text/plain"}]}"#;

    #[test]
    fn readings_come_back_with_shared_and_own_properties() {
        let readings = split(
            BATCH.as_bytes(),
            Some("utf-8"),
            &props(&[("source", "s"), (BATCH_PROPERTY, "2")]),
        )
        .unwrap();
        assert_eq!(readings.len(), 2);
        assert_eq!(readings[0].message_id, "a");
        assert_eq!(readings[0].body, br#"{"t":1}"#);
        assert_eq!(
            readings[0].properties,
            props(&[("source", "s"), ("n", "1")])
        );
        assert_eq!(readings[1].body, b"hi");
        assert_eq!(readings[1].content_type.as_deref(), Some("text/plain"));
        assert_eq!(readings[1].creation_time, None);

        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(BATCH.as_bytes()).unwrap();
        let gz = gz.finish().unwrap();
        let again = split(&gz, Some("gzip"), &props(&[(BATCH_PROPERTY, "2")])).unwrap();
        assert_eq!(again[1].body, b"hi");
    }

    #[test]
    fn a_bad_batch_says_why() {
        let count = props(&[(BATCH_PROPERTY, "2")]);
        assert!(
            split(b"\x1f\x8bxx", Some("gzip"), &count)
                .unwrap_err()
                .contains("gzip")
        );
        assert!(split(b"[]", None, &count).unwrap_err().contains("readings"));
        let three = props(&[(BATCH_PROPERTY, "3")]);
        assert!(
            split(BATCH.as_bytes(), None, &three)
                .unwrap_err()
                .contains("holds 2")
        );
        let no_id = r#"{"readings":[{"body":1}]}"#;
        let one = props(&[(BATCH_PROPERTY, "1")]);
        assert!(
            split(no_id.as_bytes(), None, &one)
                .unwrap_err()
                .contains("reading 0")
        );
    }
}
