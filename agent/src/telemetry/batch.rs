//! Several queued readings of one source packed into one hub message, so the hub, which bills in
//! 4 KB blocks, bills a block per few dozen readings instead of one per reading. The format is
//! the consumers' contract (docs/configuration.md, "Batching to the hub"), format 2:
//!
//! * body (UTF-8 JSON, or gzipped) `{"idBase":…,"idFirst":…,"time":…,"ms":[…],"readings":[…],
//!   "except":{…}}`: `readings` holds the readings' JSON bodies in queue order; reading `i`'s
//!   message id is `<idBase>-<idFirst + i>` and its creation time `time` + `ms[i]` milliseconds,
//!   unless `except["i"]` says otherwise. `except` holds, by index, only what does not follow
//!   these rules: an `id`, a `time` (then `ms[i]` is null), own `props`, `"base64": true` (the
//!   element is the body in base64: it is not JSON) and a `contentType`/`contentEncoding` other
//!   than `application/json`/`utf-8` (null: none);
//! * system properties `$.ct = application/json`, `$.ce = utf-8` (or `gzip`), `$.ctime` of the
//!   first reading and a `$.mid` of its own;
//! * application properties: those every reading of the batch has with the same value (`source`
//!   among them: they stay routable), `hubagent-batch` = the number of readings and
//!   `hubagent-batch-format` = `2`.
//!
//! The ids and times are what make a reading identifiable: the ids are the queue's (the outlet
//! numbers a run of ids from one base, [`ReadingIds`]), so a reading sent again after a crash, in
//! a batch cut differently, has the same id.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Write;

use base64::Engine;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::config::batch::BatchSpec;
use crate::config::plugin::PluginSpec;
use crate::message::TelemetryMessage;

/// The application property that marks a batch and counts its readings.
pub const BATCH_PROPERTY: &str = "hubagent-batch";
/// The application property naming the batch's format version ([`FORMAT`]).
pub const FORMAT_PROPERTY: &str = "hubagent-batch-format";
/// This module's format. Format 1 (no `hubagent-batch-format`) had an object per reading.
pub const FORMAT: &str = "2";
/// The application property naming a reading's source (the plugin), set by the plugin outlet.
pub const SOURCE_PROPERTY: &str = "source";
/// The content type and encoding a reading of a batch has unless `except` says otherwise.
const JSON_TYPE: &str = "application/json";
const UTF8: &str = "utf-8";

/// The message ids a plugin outlet gives its readings: `<base>-<n>`, one random UUID as the base
/// per outlet and `n` counting from 1, so that a batch names the ids of consecutive readings by
/// the base and the first number. The id is stamped before the reading is queued and stored with
/// it, so it never depends on how the reading is packed.
pub struct ReadingIds {
    base: String,
    next: u64,
}

impl Default for ReadingIds {
    fn default() -> ReadingIds {
        ReadingIds {
            base: uuid::Uuid::new_v4().to_string(),
            next: 1,
        }
    }
}

impl ReadingIds {
    pub fn next_id(&mut self) -> String {
        let id = format!("{}-{}", self.base, self.next);
        self.next += 1;
        id
    }
}

/// The base and number of an id of the form `<base>-<n>` (`n` decimal, as [`ReadingIds`] writes
/// it).
fn base_and_number(id: &str) -> Option<(&str, u64)> {
    let (base, digits) = id.rsplit_once('-')?;
    let n: u64 = digits.parse().ok()?;
    (!base.is_empty() && n.to_string() == digits).then_some((base, n))
}

/// Milliseconds since the epoch of an RFC 3339 time that a batch can give as an offset: a whole
/// millisecond that formats back to exactly `text` (as the outlet stamps times).
fn whole_millis(text: &str) -> Option<i64> {
    let nanos = OffsetDateTime::parse(text, &Rfc3339)
        .ok()?
        .unix_timestamp_nanos();
    let millis = i64::try_from(nanos / 1_000_000).ok()?;
    (nanos % 1_000_000 == 0 && format_millis(millis)? == text).then_some(millis)
}

fn format_millis(millis: i64) -> Option<String> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(millis) * 1_000_000)
        .ok()?
        .format(&Rfc3339)
        .ok()
}

/// Now, to the millisecond, as the outlet stamps a reading's creation time: a batch carries it
/// as a millisecond offset.
pub fn now_millis_rfc3339() -> String {
    thread_local! {
        /// The last stamp made: the readings of a batch are stamped in the same millisecond.
        static LAST_STAMP: RefCell<(i64, String)> = const { RefCell::new((i64::MIN, String::new())) };
    }
    let millis = OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
    let Ok(millis) = i64::try_from(millis) else {
        return String::new();
    };
    LAST_STAMP.with_borrow_mut(|(last, text)| {
        if *last != millis {
            *text = format_millis(millis).unwrap_or_default();
            *last = millis;
        }
        text.clone()
    })
}

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
    let body = batch_body(readings, &common);
    let (body, encoding) = if gzip {
        let mut encoder = flate2::write::GzEncoder::new(
            Vec::with_capacity(body.len() / 3),
            flate2::Compression::default(),
        );
        // Writing into a Vec cannot fail.
        encoder.write_all(&body).expect("gzip into memory");
        (encoder.finish().expect("gzip into memory"), "gzip")
    } else {
        (body, UTF8)
    };
    let mut properties = common;
    properties.push((BATCH_PROPERTY.into(), readings.len().to_string()));
    properties.push((FORMAT_PROPERTY.into(), FORMAT.into()));
    TelemetryMessage {
        message_id: crate::message::new_message_id(),
        body: body.into(),
        content_type: Some(JSON_TYPE.into()),
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

fn put_string(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(&mut *out, s).expect("a string serializes");
}

/// The batch's JSON: ids and times derived from the first reading's where they follow on, the
/// bodies, and what does not follow the rules in `except`.
fn batch_body(readings: &[TelemetryMessage], common: &[(String, String)]) -> Vec<u8> {
    let ids = base_and_number(&readings[0].message_id);
    // Each reading's time in whole milliseconds, where it has one the batch can derive.
    let millis: Vec<_> = readings
        .iter()
        .map(|r| r.creation_time.as_deref().and_then(whole_millis))
        .collect();
    let base_time = readings[0].creation_time.as_deref().zip(millis[0]);
    let mut out =
        Vec::with_capacity(readings.iter().map(|r| r.body.len() + 4).sum::<usize>() + 128);
    out.push(b'{');
    if let Some((base, first)) = ids {
        out.extend_from_slice(b"\"idBase\":");
        put_string(&mut out, base);
        out.extend_from_slice(format!(",\"idFirst\":{first},").as_bytes());
    }
    if let Some((text, base_ms)) = base_time {
        out.extend_from_slice(b"\"time\":");
        put_string(&mut out, text);
        out.extend_from_slice(b",\"ms\":[");
        for (i, ms) in millis.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            match ms {
                Some(ms) => out.extend_from_slice((ms - base_ms).to_string().as_bytes()),
                None => out.extend_from_slice(b"null"),
            }
        }
        out.extend_from_slice(b"],");
    }
    out.extend_from_slice(b"\"readings\":[");
    let mut except = Vec::new();
    for (i, reading) in readings.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let inline = inline_json(reading);
        match inline {
            Some(json) => out.extend_from_slice(json),
            None => {
                out.push(b'"');
                out.extend_from_slice(
                    base64::engine::general_purpose::STANDARD
                        .encode(&reading.body)
                        .as_bytes(),
                );
                out.push(b'"');
            }
        }
        let derived_id = ids.and_then(|(base, first)| Some((base, first.checked_add(i as u64)?)));
        let time_derived = base_time.is_some() && millis[i].is_some();
        let fields = Exception {
            id: (base_and_number(&reading.message_id) != derived_id)
                .then_some(reading.message_id.as_str()),
            time: reading.creation_time.as_deref().filter(|_| !time_derived),
            props: reading
                .properties
                .iter()
                .filter(|p| !common.contains(p))
                .collect(),
            base64: inline.is_none(),
            content_type: (reading.content_type.as_deref() != Some(JSON_TYPE))
                .then_some(reading.content_type.as_deref()),
            content_encoding: (reading.content_encoding.as_deref() != Some(UTF8))
                .then_some(reading.content_encoding.as_deref()),
        };
        fields.write(&mut except, i);
    }
    out.push(b']');
    if !except.is_empty() {
        out.extend_from_slice(b",\"except\":{");
        out.extend_from_slice(&except);
        out.push(b'}');
    }
    out.push(b'}');
    out
}

/// What of one reading a batch cannot derive: written to `except` under the reading's index.
struct Exception<'a> {
    id: Option<&'a str>,
    time: Option<&'a str>,
    props: Vec<&'a (String, String)>,
    base64: bool,
    /// `Some(None)`: the reading has none, where the batch assumes `application/json`/`utf-8`.
    content_type: Option<Option<&'a str>>,
    content_encoding: Option<Option<&'a str>>,
}

impl Exception<'_> {
    fn write(&self, out: &mut Vec<u8>, index: usize) {
        let mut fields = Vec::new();
        let mut field = |name: &str, value: &dyn Fn(&mut Vec<u8>)| {
            fields.push(if fields.is_empty() { b'{' } else { b',' });
            put_string(&mut fields, name);
            fields.push(b':');
            value(&mut fields);
        };
        if let Some(id) = self.id {
            field("id", &|out| put_string(out, id));
        }
        if let Some(time) = self.time {
            field("time", &|out| put_string(out, time));
        }
        if !self.props.is_empty() {
            field("props", &|out| {
                out.push(b'{');
                for (i, (k, v)) in self.props.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    put_string(out, k);
                    out.push(b':');
                    put_string(out, v);
                }
                out.push(b'}');
            });
        }
        if self.base64 {
            field("base64", &|out| out.extend_from_slice(b"true"));
        }
        for (name, value) in [
            ("contentType", self.content_type),
            ("contentEncoding", self.content_encoding),
        ] {
            if let Some(value) = value {
                field(name, &|out| match value {
                    Some(text) => put_string(out, text),
                    None => out.extend_from_slice(b"null"),
                });
            }
        }
        if fields.is_empty() {
            return;
        }
        fields.push(b'}');
        if !out.is_empty() {
            out.push(b',');
        }
        out.extend_from_slice(format!("\"{index}\":").as_bytes());
        out.extend_from_slice(&fields);
    }
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
    fn stamps_follow_the_clock_to_the_millisecond() {
        let millis_of = |text: &str| whole_millis(text).expect("a whole millisecond");
        let clock = || (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
        let first = now_millis_rfc3339();
        // Made again within the same millisecond it is the same stamp; once the clock moved on,
        // a later one (LAST_STAMP must not keep the first).
        let start = clock();
        while clock() < start + 2 {
            std::hint::spin_loop();
        }
        let before = clock();
        let later = now_millis_rfc3339();
        let after = clock();
        assert!(
            millis_of(&later) > millis_of(&first),
            "{first} then {later}"
        );
        assert!((before..=after).contains(&millis_of(&later)), "{later}");
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
                (BATCH_PROPERTY.to_string(), "3".to_string()),
                (FORMAT_PROPERTY.to_string(), "2".to_string())
            ]
        );
        // Ids `m-1`.. follow on from the first; the times are whole seconds apart.
        assert_eq!(
            body_json(&batch),
            json!({
                "idBase": "m", "idFirst": 1,
                "time": "2026-12-07T01:00:01Z", "ms": [0, 1000, 2000],
                "readings": [{"t": 1}, "bm90IGpzb24=", "e2JhZA=="],
                "except": {
                    "0": {"props": {"n": "1"}, "contentEncoding": null},
                    "1": {"props": {"n": "2"}, "base64": true, "contentType": "text/plain",
                          "contentEncoding": null},
                    "2": {"props": {"n": "3"}, "base64": true, "contentEncoding": null},
                },
            })
        );
        let gzipped = encode(&readings, true);
        assert_eq!(gzipped.content_encoding.as_deref(), Some("gzip"));
        assert_eq!(body_json(&gzipped), body_json(&batch));
    }

    /// Readings as the outlet makes them: ids of one base, times to the millisecond.
    fn stamped(ids: &mut ReadingIds, at_ms: i64) -> TelemetryMessage {
        TelemetryMessage {
            message_id: ids.next_id(),
            body: b"{\"v\":1}".to_vec().into(),
            content_type: Some("application/json".into()),
            content_encoding: Some("utf-8".into()),
            creation_time: format_millis(at_ms),
            properties: vec![("source".into(), "sensor".into())],
        }
    }

    #[test]
    fn ids_and_times_that_follow_on_cost_nothing_per_reading_and_others_are_spelled_out() {
        let mut ids = ReadingIds::default();
        let start = 1_796_000_000_123;
        let mut readings: Vec<_> = (0..4).map(|i| stamped(&mut ids, start + i * 7)).collect();
        let base = readings[0]
            .message_id
            .rsplit_once('-')
            .unwrap()
            .0
            .to_owned();
        assert!(uuid::Uuid::try_parse(&base).is_ok(), "{base}");
        assert_eq!(readings[3].message_id, format!("{base}-4"));
        let batch = body_json(&encode(&readings, false));
        assert_eq!(
            batch,
            json!({
                "idBase": base, "idFirst": 1, "time": "2026-11-30T00:53:20.123Z",
                "ms": [0, 7, 14, 21], "readings": [{"v": 1}, {"v": 1}, {"v": 1}, {"v": 1}],
            })
        );
        // Cut elsewhere (as after a crash), the same readings keep their ids and times.
        let later = body_json(&encode(&readings[2..], false));
        assert_eq!(
            (later["idBase"].as_str(), later["idFirst"].as_u64()),
            (Some(&base[..]), Some(3))
        );
        assert_eq!(later["time"], "2026-11-30T00:53:20.137Z");
        assert_eq!(later["ms"], json!([0, 7]));

        // A gap in the ids (a reading dropped), a time finer than a millisecond, one earlier
        // than the first, and none.
        ids.next_id();
        readings.push(stamped(&mut ids, start - 2));
        readings[1].creation_time = Some("2026-11-30T00:53:20.130000001Z".into());
        readings[2].creation_time = None;
        let batch = body_json(&encode(&readings, false));
        assert_eq!(batch["ms"], json!([0, null, null, 21, -2]));
        assert_eq!(
            batch["except"],
            json!({
                "1": {"time": "2026-11-30T00:53:20.130000001Z"},
                "4": {"id": format!("{base}-6")},
            })
        );
    }

    #[test]
    fn only_ids_and_times_as_the_outlet_writes_them_are_derived() {
        assert_eq!(base_and_number("ab-cd-12"), Some(("ab-cd", 12)));
        for id in [
            "12",
            "-12",
            "a-012",
            "a-+1",
            "a-",
            "a-1x",
            "a-99999999999999999999",
        ] {
            assert_eq!(base_and_number(id), None, "{id}");
        }
        let ms = whole_millis("2026-12-07T01:00:00.25Z").unwrap();
        assert_eq!(
            format_millis(ms).as_deref(),
            Some("2026-12-07T01:00:00.25Z")
        );
        for time in [
            "2026-12-07T01:00:00.250Z",
            "2026-12-07T01:00:00.2501Z",
            "2026-12-07T02:00:00.25+01:00",
            "yesterday",
        ] {
            assert_eq!(whole_millis(time), None, "{time}");
        }
        let now = now_millis_rfc3339();
        assert!(whole_millis(&now).is_some(), "{now}");
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
            assert_eq!(
                batch.properties.iter().find(|(k, _)| k == BATCH_PROPERTY),
                Some(&(BATCH_PROPERTY.to_string(), count.to_string()))
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
