//! hubagent's batches (`hubagent-batch` application property; docs/configuration.md, "Batching
//! to the hub") split back into their readings, as a consumer of the hub would: the hub itself
//! does not, so this is hubsim standing in for the cloud side, and the tests can count readings
//! and check each reading's id, time, properties and body.
//!
//! Format 2 (`hubagent-batch-format` = `2`): `{"idBase", "idFirst", "time", "ms": [...],
//! "readings": [bodies], "except": {"<index>": {...}}}`, reading `i`'s id `<idBase>-<idFirst+i>`
//! and time `time + ms[i]` unless `except` names them. Format 1 (no `hubagent-batch-format`,
//! agents before it): `{"readings": [{"id", "time", "props", "body" | "bodyBase64"}]}`.

use std::collections::BTreeMap;
use std::io::Read;

use base64::Engine;
use serde_json::{Map, Value};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// The application property that marks a batch.
pub const BATCH_PROPERTY: &str = "hubagent-batch";
/// The application property naming the batch's format (absent: format 1).
pub const FORMAT_PROPERTY: &str = "hubagent-batch-format";

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
    let format = properties.get(FORMAT_PROPERTY).map(String::as_str);
    if !matches!(format, None | Some("2")) {
        return Err(format!(
            "{FORMAT_PROPERTY} {format:?} is not a format hubsim knows (2)"
        ));
    }
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
    shared.remove(FORMAT_PROPERTY);
    if format.is_none() {
        return readings
            .iter()
            .enumerate()
            .map(|(i, r)| reading_v1(r, &shared).map_err(|e| format!("reading {i}: {e}")))
            .collect();
    }
    let rules = Rules::of(&doc, readings.len())?;
    readings
        .iter()
        .enumerate()
        .map(|(i, body)| {
            rules
                .reading(i, body, &shared)
                .map_err(|e| format!("reading {i}: {e}"))
        })
        .collect()
}

/// What a format 2 batch says of all its readings.
struct Rules<'a> {
    /// `idBase`, `idFirst`.
    ids: Option<(&'a str, u64)>,
    /// `time` as ms since the epoch, and `ms`.
    times: Option<(i64, &'a [Value])>,
    except: Option<&'a Map<String, Value>>,
}

impl<'a> Rules<'a> {
    fn of(doc: &'a Value, count: usize) -> Result<Rules<'a>, String> {
        let ids = match (doc.get("idBase"), doc.get("idFirst")) {
            (None, None) => None,
            (Some(Value::String(base)), Some(first)) => Some((
                base.as_str(),
                first.as_u64().ok_or("\"idFirst\" is not a whole number")?,
            )),
            _ => return Err("\"idBase\" (a string) and \"idFirst\" go together".into()),
        };
        let times = match (doc.get("time"), doc.get("ms")) {
            (None, None) => None,
            (Some(Value::String(time)), Some(Value::Array(ms))) if ms.len() == count => {
                let nanos = OffsetDateTime::parse(time, &Rfc3339)
                    .map_err(|e| format!("\"time\" {time:?} is not RFC 3339: {e}"))?
                    .unix_timestamp_nanos();
                let millis = i64::try_from(nanos / 1_000_000)
                    .ok()
                    .filter(|_| nanos % 1_000_000 == 0)
                    .ok_or(format!("\"time\" {time:?} is not a whole millisecond"))?;
                Some((millis, ms.as_slice()))
            }
            _ => {
                return Err(format!(
                    "\"time\" (a string) and \"ms\" (an array of {count}) go together"
                ));
            }
        };
        let except = match doc.get("except") {
            None => None,
            Some(Value::Object(except)) => {
                if let Some(bad) = except
                    .keys()
                    .find(|k| k.parse::<usize>().map_or(true, |i| i >= count))
                {
                    return Err(format!("\"except\" names {bad:?}, not a reading's index"));
                }
                Some(except)
            }
            Some(_) => return Err("\"except\" is not an object".into()),
        };
        Ok(Rules { ids, times, except })
    }

    fn reading(
        &self,
        i: usize,
        body: &Value,
        shared: &BTreeMap<String, String>,
    ) -> Result<Reading, String> {
        let no_exception = Map::new();
        let except = match self.except.and_then(|e| e.get(&i.to_string())) {
            None => &no_exception,
            Some(Value::Object(fields)) => fields,
            Some(_) => return Err("its \"except\" entry is not an object".into()),
        };
        let text = |key: &str| match except.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(format!("\"except\" {key:?} is not a string")),
        };
        let message_id = match (text("id")?, self.ids) {
            (Some(id), _) => id,
            (None, Some((base, first))) => format!(
                "{base}-{}",
                first
                    .checked_add(i as u64)
                    .ok_or("\"idFirst\" + its index overflows")?
            ),
            (None, None) => return Err("no id: neither \"idBase\" nor its own".into()),
        };
        let creation_time = match (text("time")?, self.times) {
            (Some(time), _) => Some(time),
            (None, Some((base, ms))) => match &ms[i] {
                Value::Null => None,
                offset => {
                    let offset = offset.as_i64().ok_or("its \"ms\" is not a whole number")?;
                    let nanos = i128::from(base) * 1_000_000 + i128::from(offset) * 1_000_000;
                    Some(
                        OffsetDateTime::from_unix_timestamp_nanos(nanos)
                            .ok()
                            .and_then(|t| t.format(&Rfc3339).ok())
                            .ok_or("its time is out of range")?,
                    )
                }
            },
            (None, None) => None,
        };
        let properties = with_own_properties(shared, except.get("props"))?;
        let body = match except.get("base64") {
            None | Some(Value::Bool(false)) => body.to_string().into_bytes(),
            Some(Value::Bool(true)) => base64::engine::general_purpose::STANDARD
                .decode(body.as_str().ok_or("a base64 body that is not a string")?)
                .map_err(|e| format!("its body is not base64: {e}"))?,
            Some(_) => return Err("\"except\" \"base64\" is not true or false".into()),
        };
        let with_default = |key: &str, default: &str| match except.get(key) {
            None => Ok(Some(default.to_owned())),
            Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(format!("\"except\" {key:?} is not a string or null")),
        };
        Ok(Reading {
            message_id,
            creation_time,
            content_type: with_default("contentType", "application/json")?,
            content_encoding: with_default("contentEncoding", "utf-8")?,
            body,
            properties,
        })
    }
}

/// A reading's application properties: the batch's shared ones and its own `props` (an object of
/// strings), which win.
fn with_own_properties(
    shared: &BTreeMap<String, String>,
    own: Option<&Value>,
) -> Result<BTreeMap<String, String>, String> {
    let mut properties = shared.clone();
    if let Some(own) = own {
        let own = own.as_object().ok_or("\"props\" is not an object")?;
        for (k, v) in own {
            let v = v
                .as_str()
                .ok_or(format!("property '{k}' is not a string"))?;
            properties.insert(k.clone(), v.to_owned());
        }
    }
    Ok(properties)
}

fn reading_v1(r: &Value, shared: &BTreeMap<String, String>) -> Result<Reading, String> {
    let text = |key: &str| r.get(key).and_then(Value::as_str).map(str::to_owned);
    let message_id = text("id").ok_or("no \"id\"")?;
    let properties = with_own_properties(shared, r.get("props"))?;
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
    const BATCH_2: &str = r#"{"idBase":"b","idFirst":41,"time":"2026-12-07T01:00:00.5Z",
        "ms":[0,-500,null,1],"readings":[{"t":1},{"t":2},"aGk=",{"t":4}],
        "except":{"1":{"props":{"n":"2"}},"2":{"id":"x","time":"then","base64":true,
        "contentType":"text/plain","contentEncoding":null}}}"#;

    #[test]
    fn format_2_readings_come_back_with_derived_ids_and_times_and_their_exceptions() {
        let all = props(&[
            ("source", "s"),
            (BATCH_PROPERTY, "4"),
            (FORMAT_PROPERTY, "2"),
        ]);
        let readings = split(BATCH_2.as_bytes(), Some("utf-8"), &all).unwrap();
        let got: Vec<_> = readings
            .iter()
            .map(|r| (r.message_id.as_str(), r.creation_time.as_deref()))
            .collect();
        assert_eq!(
            got,
            [
                ("b-41", Some("2026-12-07T01:00:00.5Z")),
                ("b-42", Some("2026-12-07T01:00:00Z")),
                ("x", Some("then")),
                ("b-44", Some("2026-12-07T01:00:00.501Z")),
            ]
        );
        assert_eq!(readings[0].body, br#"{"t":1}"#);
        assert_eq!(readings[0].properties, props(&[("source", "s")]));
        assert_eq!(
            readings[1].properties,
            props(&[("source", "s"), ("n", "2")])
        );
        assert_eq!(
            (
                readings[0].content_type.as_deref(),
                readings[0].content_encoding.as_deref()
            ),
            (Some("application/json"), Some("utf-8"))
        );
        assert_eq!(readings[2].body, b"hi");
        assert_eq!(
            (
                readings[2].content_type.as_deref(),
                readings[2].content_encoding.as_deref()
            ),
            (Some("text/plain"), None)
        );
    }

    #[test]
    fn a_bad_format_2_batch_says_why() {
        let split2 = |body: &str, count: &str| {
            split(
                body.as_bytes(),
                None,
                &props(&[(BATCH_PROPERTY, count), (FORMAT_PROPERTY, "2")]),
            )
            .unwrap_err()
        };
        assert!(split2(r#"{"readings":[1]}"#, "1").contains("no id"));
        assert!(split2(r#"{"idBase":"b","readings":[1]}"#, "1").contains("go together"));
        assert!(
            split2(
                r#"{"time":"2026-12-07T01:00:00Z","ms":[],"readings":[1]}"#,
                "1"
            )
            .contains("an array of 1")
        );
        assert!(
            split2(
                r#"{"time":"2026-12-07T01:00:00.1234Z","ms":[0],"readings":[1]}"#,
                "1"
            )
            .contains("whole millisecond")
        );
        assert!(
            split2(
                r#"{"idBase":"b","idFirst":1,"readings":[1],"except":{"1":{}}}"#,
                "1"
            )
            .contains("not a reading's index")
        );
        assert!(
            split2(
                r#"{"idBase":"b","idFirst":1,"readings":[1],"except":{"0":{"base64":true}}}"#,
                "1"
            )
            .contains("reading 0: a base64 body that is not a string")
        );
        let unknown = split(
            b"{\"readings\":[]}",
            None,
            &props(&[(BATCH_PROPERTY, "0"), (FORMAT_PROPERTY, "3")]),
        )
        .unwrap_err();
        assert!(unknown.contains("not a format hubsim knows"), "{unknown}");
    }
}
