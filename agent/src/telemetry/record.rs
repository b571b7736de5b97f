//! One queued message as a record in a segment file: framing, checksum and encoding.
//!
//! Two kinds of record can be found in a segment; the top byte of the first (little-endian) word
//! tells them apart, so a queue written by an older agent is read after an upgrade, record by
//! record (docs/queue.md, "On disk", has the same tables):
//!
//! **Compact record** (written since issue 18), kind byte `0x81`:
//!
//! | bytes | field |
//! | --- | --- |
//! | 3 | `len`, u24 LE: the bytes after the checksum |
//! | 1 | kind `0x81` |
//! | 4 | CRC-32 (IEEE) of the `len` bytes that follow |
//! | 1–10 | sequence number, LEB128 varint |
//! | 1–10 | enqueued, ms since the Unix epoch, LEB128 varint |
//! | 1 | flags, see below |
//! | 16, 16 + varint or str | message id: the UUID's 16 bytes (flag bit 0), then (bit 7) the `n` of an id `<UUID>-<n>` as a LEB128 varint; else a str |
//! | 0, 8 or str | creation time (bits 1–2): 1 = i64 LE ns since the epoch, 2 = str |
//! | 0 or str | content type (bits 3–4): 1 = `application/json`, 2 = str |
//! | 0 or str | content encoding (bits 5–6): 1 = `utf-8`, 2 = str |
//! | varint + pairs | application properties: their count, then key str, value str each |
//! | rest | the body, raw bytes |
//!
//! A str is a LEB128 length and that many UTF-8 bytes. In bits 1–6, 0 means the property is
//! absent. A compact form is used only when it gives back exactly the original text: a message id
//! that is a lower-case hyphenated UUID, alone or numbered as the plugin outlet makes them
//! (`<UUID>-<n>`, telemetry/batch.rs), a creation time that formats back to the same RFC 3339
//! string. Bit 7 without bit 0, or a field running past its end, is undecodable.
//!
//! **JSON record** (agents before issue 18), kind byte `0x00` (the length is below 1 MiB):
//! `len u32 | crc32 u32 | seq u64 | enqueued_ms u64 | JSON of the message (body base64)`, little
//! endian, the CRC over everything after it.

use std::cell::RefCell;

use bytes::Bytes;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::message::TelemetryMessage;

/// A record longer than this (after its checksum) is a torn or corrupt length field.
pub(super) const MAX_RECORD: usize = 1024 * 1024;
/// A LEB128 u64 takes at most this many bytes.
const MAX_VARINT: usize = 10;
/// The longest encoded message a compact record holds (its two varints take the rest).
pub(super) const MAX_MESSAGE: usize = MAX_RECORD - 2 * MAX_VARINT;
/// A JSON record's header: `len u32 | crc32 u32 | seq u64 | enqueued_ms u64`.
pub(super) const JSON_HEADER: usize = 4 + 4 + 8 + 8;
/// A compact record's fixed prefix: `len u24 | kind u8 | crc32 u32`.
const COMPACT_PREFIX: usize = 4 + 4;

const KIND_JSON: u8 = 0x00;
const KIND_COMPACT: u8 = 0x81;

const ID_IS_UUID: u8 = 1;
const CREATION_TIME_SHIFT: u8 = 1;
const CONTENT_TYPE_SHIFT: u8 = 3;
const CONTENT_ENCODING_SHIFT: u8 = 5;
/// With `ID_IS_UUID`: the id is `<UUID>-<n>`, `n` a varint after the UUID.
const ID_IS_NUMBERED: u8 = 0x80;
/// The values of a two-bit field in the flags.
const ABSENT: u8 = 0;
const COMPACT_FORM: u8 = 1;
const STRING_FORM: u8 = 2;

const JSON_CONTENT_TYPE: &str = "application/json";
const UTF8_ENCODING: &str = "utf-8";

#[derive(Debug, thiserror::Error)]
pub(super) enum RecordError {
    #[error("the {0} runs past the end of the record")]
    Truncated(&'static str),
    #[error("the {0} is not UTF-8")]
    NotUtf8(&'static str),
    #[error("unknown flags {0:#04x}")]
    UnknownFlags(u8),
    #[error("the {0} is out of range")]
    OutOfRange(&'static str),
    #[error("unknown record kind {0:#04x}")]
    UnknownKind(u8),
    #[error("the message JSON is invalid: {0}")]
    Json(#[from] serde_json::Error),
}

/// What the bytes at a record's start hold.
#[derive(Debug, PartialEq)]
pub(super) enum Frame {
    /// A whole record of `len` bytes whose checksum holds.
    Whole { len: usize },
    /// A whole record of `len` bytes whose checksum fails.
    BadChecksum { len: usize },
    /// Fewer bytes than a header: a write torn at the very end.
    TornHeader,
    /// A length past the end (a torn write) or impossible, or an unknown kind: nothing after it
    /// can be framed.
    Unframeable,
}

/// Frames the record at the start of `bytes`.
pub(super) fn frame(bytes: &[u8]) -> Frame {
    let Some(word) = bytes.first_chunk::<4>().map(|w| u32::from_le_bytes(*w)) else {
        return Frame::TornHeader;
    };
    let (header, len) = match (word >> 24) as u8 {
        KIND_JSON => (JSON_HEADER, word as usize),
        KIND_COMPACT => (COMPACT_PREFIX, (word & 0x00ff_ffff) as usize),
        _ => return Frame::Unframeable,
    };
    if bytes.len() < header {
        return Frame::TornHeader;
    }
    // Both kinds: the checksum follows the first word and covers everything after itself.
    let end = header + len;
    if len > MAX_RECORD || end > bytes.len() {
        return Frame::Unframeable;
    }
    let crc = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
    if crc32fast::hash(&bytes[8..end]) == crc {
        Frame::Whole { len: end }
    } else {
        Frame::BadChecksum { len: end }
    }
}

/// A whole record's sequence number and time, and where its message starts.
pub(super) struct RecordHeader {
    pub seq: u64,
    pub enqueued_ms: u64,
    compact: bool,
    message_at: usize,
}

impl RecordHeader {
    /// Reads the header of a whole record (as framed by `frame`).
    pub fn parse(record: &[u8]) -> Result<RecordHeader, RecordError> {
        let u64_at = |at: usize| {
            record
                .get(at..at + 8)
                .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
                .ok_or(RecordError::Truncated("header"))
        };
        match record.get(3).copied() {
            Some(KIND_JSON) => Ok(RecordHeader {
                seq: u64_at(8)?,
                enqueued_ms: u64_at(16)?,
                compact: false,
                message_at: JSON_HEADER,
            }),
            Some(KIND_COMPACT) => {
                let mut reader = Reader {
                    bytes: record,
                    at: COMPACT_PREFIX,
                };
                let seq = reader.varint("sequence number")?;
                let enqueued_ms = reader.varint("enqueue time")?;
                Ok(RecordHeader {
                    seq,
                    enqueued_ms,
                    compact: true,
                    message_at: reader.at,
                })
            }
            Some(kind) => Err(RecordError::UnknownKind(kind)),
            None => Err(RecordError::Truncated("header")),
        }
    }

    /// The message in `record`, whose header this is.
    pub fn message(&self, record: &[u8]) -> Result<TelemetryMessage, RecordError> {
        if self.compact {
            decode_message(&record[self.message_at..])
        } else {
            Ok(serde_json::from_slice(&record[self.message_at..])?)
        }
    }
}

/// The message part of a compact record (all after the enqueue time): encoded before the queue
/// takes its lock.
pub(super) fn encode_message(message: &TelemetryMessage) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + message.body.len());
    out.push(0);
    let mut flags = 0;
    if let Some(id) = exact_uuid(&message.message_id) {
        flags |= ID_IS_UUID;
        out.extend_from_slice(id.as_bytes());
    } else if let Some((id, n)) = numbered_uuid(&message.message_id) {
        flags |= ID_IS_UUID | ID_IS_NUMBERED;
        out.extend_from_slice(id.as_bytes());
        put_varint(&mut out, n);
    } else {
        put_str(&mut out, &message.message_id);
    }
    let form = match message.creation_time.as_deref() {
        None => ABSENT,
        Some(text) => match nanos_if_exact(text) {
            Some(nanos) => {
                out.extend_from_slice(&nanos.to_le_bytes());
                COMPACT_FORM
            }
            None => {
                put_str(&mut out, text);
                STRING_FORM
            }
        },
    };
    flags |= form << CREATION_TIME_SHIFT;
    flags |= put_known(&mut out, message.content_type.as_deref(), JSON_CONTENT_TYPE)
        << CONTENT_TYPE_SHIFT;
    flags |= put_known(&mut out, message.content_encoding.as_deref(), UTF8_ENCODING)
        << CONTENT_ENCODING_SHIFT;
    put_varint(&mut out, message.properties.len() as u64);
    for (key, value) in &message.properties {
        put_str(&mut out, key);
        put_str(&mut out, value);
    }
    out.extend_from_slice(&message.body);
    out[0] = flags;
    out
}

/// The UUID `text` is, when its lower-case hyphenated form is exactly `text`.
fn exact_uuid(text: &str) -> Option<uuid::Uuid> {
    let id = uuid::Uuid::try_parse(text).ok()?;
    (id.hyphenated().to_string() == text).then_some(id)
}

/// The UUID and number of an id `<UUID>-<n>` that formats back to exactly `text`.
fn numbered_uuid(text: &str) -> Option<(uuid::Uuid, u64)> {
    let (id, digits) = text.rsplit_once('-')?;
    let n: u64 = digits.parse().ok()?;
    (n.to_string() == digits).then_some((exact_uuid(id)?, n))
}

/// Appends a whole compact record holding `message` (from `encode_message`, at most
/// `MAX_MESSAGE` bytes) to `out`.
pub(super) fn put_compact_record(out: &mut Vec<u8>, seq: u64, enqueued_ms: u64, message: &[u8]) {
    let start = out.len();
    out.extend_from_slice(&[0; COMPACT_PREFIX]);
    put_varint(out, seq);
    put_varint(out, enqueued_ms);
    out.extend_from_slice(message);
    let len = out.len() - start - COMPACT_PREFIX;
    debug_assert!(
        len <= MAX_RECORD,
        "the caller keeps messages to MAX_MESSAGE"
    );
    let word = len as u32 | (KIND_COMPACT as u32) << 24;
    let crc = crc32fast::hash(&out[start + COMPACT_PREFIX..]);
    out[start..start + 4].copy_from_slice(&word.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn decode_message(bytes: &[u8]) -> Result<TelemetryMessage, RecordError> {
    let mut reader = Reader { bytes, at: 0 };
    let flags = reader.take(1, "flags")?[0];
    let form = |shift: u8| (flags >> shift) & 0b11;
    if flags & (ID_IS_UUID | ID_IS_NUMBERED) == ID_IS_NUMBERED
        || [
            CREATION_TIME_SHIFT,
            CONTENT_TYPE_SHIFT,
            CONTENT_ENCODING_SHIFT,
        ]
        .iter()
        .any(|shift| form(*shift) > STRING_FORM)
    {
        return Err(RecordError::UnknownFlags(flags));
    }
    let message_id = if flags & ID_IS_UUID != 0 {
        let raw: [u8; 16] = reader.take(16, "message id")?.try_into().expect("16");
        // Written into one string (the hot path: every message the pump sends is decoded).
        let mut id = String::with_capacity(uuid::fmt::Hyphenated::LENGTH + 21);
        let mut buffer = uuid::Uuid::encode_buffer();
        id.push_str(
            uuid::Uuid::from_bytes(raw)
                .hyphenated()
                .encode_lower(&mut buffer),
        );
        if flags & ID_IS_NUMBERED != 0 {
            let number = reader.varint("message id number")?;
            // Writing to a String cannot fail.
            let _ = std::fmt::Write::write_fmt(&mut id, format_args!("-{number}"));
        }
        id
    } else {
        reader.str("message id")?
    };
    let creation_time = match form(CREATION_TIME_SHIFT) {
        ABSENT => None,
        COMPACT_FORM => {
            let raw = reader.take(8, "creation time")?;
            let nanos = i64::from_le_bytes(raw.try_into().expect("8"));
            Some(format_nanos(nanos).ok_or(RecordError::OutOfRange("creation time"))?)
        }
        _ => Some(reader.str("creation time")?),
    };
    let content_type = reader.known(form(CONTENT_TYPE_SHIFT), JSON_CONTENT_TYPE, "content type")?;
    let content_encoding = reader.known(
        form(CONTENT_ENCODING_SHIFT),
        UTF8_ENCODING,
        "content encoding",
    )?;
    let count = reader.varint("property count")?;
    let mut properties = Vec::new();
    for _ in 0..count {
        let key = reader.str("property name")?;
        let value = reader.str("property value")?;
        properties.push((key, value));
    }
    Ok(TelemetryMessage {
        message_id,
        body: Bytes::copy_from_slice(&bytes[reader.at..]),
        content_type,
        content_encoding,
        creation_time,
        properties,
    })
}

thread_local! {
    /// The last creation time converted, as nanoseconds and as the text they format to. The
    /// messages of a batch carry one (the outlet stamps them in the same millisecond), so most
    /// conversions, either way, repeat the one before.
    static LAST_TIME: RefCell<Option<(i64, String)>> = const { RefCell::new(None) };
}

/// The nanoseconds since the epoch of an RFC 3339 time, when formatting them gives back exactly
/// `text` (UTC, as the agent stamps it); otherwise the text is kept as it is.
fn nanos_if_exact(text: &str) -> Option<i64> {
    let last = LAST_TIME.with_borrow(|last| {
        last.as_ref()
            .filter(|(_, last_text)| last_text == text)
            .map(|(nanos, _)| *nanos)
    });
    if last.is_some() {
        return last;
    }
    let time = OffsetDateTime::parse(text, &Rfc3339).ok()?;
    let nanos = i64::try_from(time.unix_timestamp_nanos()).ok()?;
    let exact = format_nanos(nanos)? == text;
    exact.then_some(nanos)
}

fn format_nanos(nanos: i64) -> Option<String> {
    let last = LAST_TIME.with_borrow(|last| {
        last.as_ref()
            .filter(|(last_nanos, _)| *last_nanos == nanos)
            .map(|(_, text)| text.clone())
    });
    if last.is_some() {
        return last;
    }
    let text = OffsetDateTime::from_unix_timestamp_nanos(nanos.into())
        .ok()?
        .format(&Rfc3339)
        .ok()?;
    LAST_TIME.set(Some((nanos, text.clone())));
    Some(text)
}

/// Writes `value` as a str unless it is `known` (the compact form); its two-bit form.
fn put_known(out: &mut Vec<u8>, value: Option<&str>, known: &str) -> u8 {
    match value {
        None => ABSENT,
        Some(v) if v == known => COMPACT_FORM,
        Some(v) => {
            put_str(out, v);
            STRING_FORM
        }
    }
}

fn put_str(out: &mut Vec<u8>, text: &str) {
    put_varint(out, text.len() as u64);
    out.extend_from_slice(text.as_bytes());
}

/// LEB128: seven bits a byte, low first, the top bit set on all but the last.
fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], RecordError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|end| *end <= self.bytes.len())
            .ok_or(RecordError::Truncated(what))?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn varint(&mut self, what: &'static str) -> Result<u64, RecordError> {
        let mut value = 0u64;
        for i in 0..MAX_VARINT {
            let byte = self.take(1, what)?[0];
            let bits = u64::from(byte & 0x7f);
            // The tenth byte holds the top bit of a u64 only.
            if i == MAX_VARINT - 1 && bits > 1 {
                return Err(RecordError::OutOfRange(what));
            }
            value |= bits << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(RecordError::OutOfRange(what))
    }

    fn str(&mut self, what: &'static str) -> Result<String, RecordError> {
        let len = self.varint(what)?;
        let len = usize::try_from(len).map_err(|_| RecordError::OutOfRange(what))?;
        let raw = self.take(len, what)?;
        String::from_utf8(raw.to_vec()).map_err(|_| RecordError::NotUtf8(what))
    }

    fn known(
        &mut self,
        form: u8,
        known: &str,
        what: &'static str,
    ) -> Result<Option<String>, RecordError> {
        Ok(match form {
            ABSENT => None,
            COMPACT_FORM => Some(known.to_string()),
            _ => Some(self.str(what)?),
        })
    }
}

/// Records as agents before the compact record wrote them: tests only, to check they are still
/// read after an upgrade.
#[cfg(test)]
pub(super) mod json {
    use super::*;

    /// The JSON record's checksum: over the sequence number, the time and the payload.
    pub fn checksum(seq: u64, enqueued_ms: u64, payload: &[u8]) -> u32 {
        let mut h = crc32fast::Hasher::new();
        h.update(&seq.to_le_bytes());
        h.update(&enqueued_ms.to_le_bytes());
        h.update(payload);
        h.finalize()
    }

    /// A whole JSON record.
    pub fn record(seq: u64, enqueued_ms: u64, message: &TelemetryMessage) -> Vec<u8> {
        let payload = serde_json::to_vec(message).unwrap();
        let mut out = Vec::new();
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&checksum(seq, enqueued_ms, &payload).to_le_bytes());
        out.extend_from_slice(&seq.to_le_bytes());
        out.extend_from_slice(&enqueued_ms.to_le_bytes());
        out.extend_from_slice(&payload);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compact_record(seq: u64, enqueued_ms: u64, message: &TelemetryMessage) -> Vec<u8> {
        let mut out = Vec::new();
        put_compact_record(&mut out, seq, enqueued_ms, &encode_message(message));
        out
    }

    fn read_back(record: &[u8]) -> (u64, u64, TelemetryMessage) {
        assert_eq!(frame(record), Frame::Whole { len: record.len() });
        let header = RecordHeader::parse(record).unwrap();
        let message = header.message(record).unwrap();
        (header.seq, header.enqueued_ms, message)
    }

    /// A reading as a plugin's `Message::json` publishes it and the agent stamps it.
    fn reading(body: &[u8]) -> TelemetryMessage {
        TelemetryMessage {
            message_id: uuid::Uuid::new_v4().to_string(),
            body: Bytes::copy_from_slice(body),
            content_type: Some("application/json".into()),
            content_encoding: Some("utf-8".into()),
            creation_time: Some(crate::util::time::now_rfc3339()),
            properties: vec![("source".into(), "bench".into())],
        }
    }

    #[test]
    fn creation_times_read_back_in_any_order_are_their_own() {
        // The last time converted is remembered (LAST_TIME): records made one after the other
        // and read back in another order, with a time kept as text between them.
        let times = [
            "2026-12-08T02:00:00.001Z",
            "2026-12-08T02:00:00.002Z",
            "2026-12-08T04:00:00.001+02:00",
            "2026-12-08T02:00:00.001Z",
        ];
        let records: Vec<(String, Vec<u8>)> = times
            .iter()
            .map(|time| {
                let mut message = reading(b"{}");
                message.creation_time = Some(time.to_string());
                (time.to_string(), compact_record(1, 1, &message))
            })
            .collect();
        // Exact times in 8 bytes, the other as its text.
        let len = |i: usize| records[i].1.len();
        assert!(len(0) == len(1) && len(1) == len(3) && len(0) + 16 < len(2));
        for (time, record) in records.iter().rev().chain(records.iter()) {
            let (_, _, back) = read_back(record);
            assert_eq!(back.creation_time.as_deref(), Some(time.as_str()));
        }
    }

    #[test]
    fn compact_records_give_back_exactly_what_was_queued() {
        let base = reading(br#"{"t":21.5}"#);
        let with = |f: &dyn Fn(&mut TelemetryMessage)| {
            let mut m = base.clone();
            f(&mut m);
            m
        };
        let all_bytes: Vec<u8> = (0..=255).collect();
        let messages = [
            base.clone(),
            // Ids the UUID form would not give back as they are.
            with(&|m| m.message_id = m.message_id.to_uppercase()),
            with(&|m| m.message_id = format!("{{{}}}", m.message_id)),
            with(&|m| m.message_id = m.message_id.replace('-', "")),
            with(&|m| m.message_id = "m-1".into()),
            // Numbered as the outlet numbers them, and near misses kept as text.
            with(&|m| m.message_id = format!("{}-7", m.message_id)),
            with(&|m| m.message_id = format!("{}-{}", m.message_id, u64::MAX)),
            with(&|m| m.message_id = format!("{}-07", m.message_id)),
            with(&|m| m.message_id = format!("{}-", m.message_id)),
            with(&|m| m.message_id = format!("{}-7", m.message_id.to_uppercase())),
            with(&|m| m.message_id = String::new()),
            // Creation times: exact in nanoseconds, or kept as text.
            with(&|m| m.creation_time = Some("2026-12-06T21:58:28Z".into())),
            with(&|m| m.creation_time = Some("2026-12-06T21:58:28.120Z".into())),
            with(&|m| m.creation_time = Some("2026-12-06T21:58:28.000000001Z".into())),
            with(&|m| m.creation_time = Some("2026-12-06T23:58:28+02:00".into())),
            with(&|m| m.creation_time = Some("2026-12-06t21:58:28z".into())),
            with(&|m| m.creation_time = Some("1969-12-31T23:59:59.5Z".into())),
            with(&|m| m.creation_time = Some("1600-01-01T00:00:00Z".into())),
            with(&|m| m.creation_time = Some("yesterday".into())),
            with(&|m| m.creation_time = None),
            // Content type and encoding: absent, the compact value, any other text.
            with(&|m| m.content_type = None),
            with(&|m| m.content_type = Some("text/plain; charset=utf-8".into())),
            with(&|m| m.content_type = Some(String::new())),
            with(&|m| m.content_encoding = None),
            with(&|m| m.content_encoding = Some("gzip".into())),
            with(&|m| m.content_encoding = Some("UTF-8".into())),
            // Properties: none, non-ASCII and empty ones, more than a one-byte count.
            with(&|m| m.properties.clear()),
            with(&|m| {
                m.properties = vec![
                    ("température".into(), "21 °C".into()),
                    (String::new(), String::new()),
                ]
            }),
            with(&|m| m.properties = (0..300).map(|i| (format!("k{i}"), "v".repeat(i))).collect()),
            // Bodies: empty, every byte value, large.
            with(&|m| m.body = Bytes::new()),
            with(&|m| m.body = Bytes::from(all_bytes.clone())),
            with(&|m| m.body = Bytes::from(vec![0xa5; 256 * 1024])),
        ];
        let times = [0, 1, crate::util::time::unix_millis(), u64::MAX];
        let seqs = [0, 1, 127, 128, 16_383, 16_384, u64::MAX];
        for (i, message) in messages.iter().enumerate() {
            for (seq, enqueued_ms) in seqs.iter().zip(times.iter().cycle()) {
                let record = compact_record(*seq, *enqueued_ms, message);
                let back = read_back(&record);
                assert_eq!(back, (*seq, *enqueued_ms, message.clone()), "message {i}");
            }
        }
    }

    #[test]
    fn a_256_byte_reading_as_the_benchmark_queues_it_takes_312_bytes() {
        // bench/run.py row 4c: a million 256-byte readings from the bench plugin. The
        // sequence numbers from 16,384 on take three bytes; the time since 1970 in ms six.
        let message = reading(&[b'x'; 256]);
        let record = compact_record(500_000, crate::util::time::unix_millis(), &message);
        // 8 (length, kind, checksum) + 3 (sequence number) + 6 (time) + 1 (flags) + 16 (id)
        // + 8 (creation time) + 14 (one property, `source` = `bench`) + 256 (body).
        assert_eq!(record.len(), 312);
        assert!(record.len() <= 320, "issue 18's target");
        assert_eq!(read_back(&record).2, message);
        // Numbered by the outlet (`<uuid>-<n>`, telemetry/batch.rs): 3 bytes more at n = 500,000.
        let mut numbered = message.clone();
        numbered.message_id = format!("{}-500000", message.message_id);
        let record = compact_record(500_000, crate::util::time::unix_millis(), &numbered);
        assert_eq!(record.len(), 315);
        assert_eq!(read_back(&record).2, numbered);
    }

    #[test]
    fn json_records_of_older_agents_are_read() {
        let message = reading(b"\x00\x01binary");
        let record = json::record(7, 1_800_000_000_000, &message);
        assert_eq!(read_back(&record), (7, 1_800_000_000_000, message));
    }

    #[test]
    fn damage_is_told_apart_from_a_torn_end() {
        let record = compact_record(9, 1_800_000_000_000, &reading(b"{}"));
        // A header cut short: a torn write at the end of the segment.
        assert_eq!(frame(&record[..3]), Frame::TornHeader);
        assert_eq!(frame(&record[..7]), Frame::TornHeader);
        // The length runs past the end.
        assert_eq!(frame(&record[..record.len() - 1]), Frame::Unframeable);
        // A kind no agent writes.
        let mut unknown = record.clone();
        unknown[3] = 0x82;
        assert_eq!(frame(&unknown), Frame::Unframeable);
        // A flipped bit anywhere after the checksum.
        for at in 8..record.len() {
            let mut flipped = record.clone();
            flipped[at] ^= 0x10;
            assert_eq!(
                frame(&flipped),
                Frame::BadChecksum { len: record.len() },
                "byte {at}"
            );
        }
        // A JSON record's header needs its 24 bytes.
        let json = json::record(1, 1, &reading(b"{}"));
        assert_eq!(frame(&json[..JSON_HEADER - 1]), Frame::TornHeader);
        assert_eq!(frame(&json[..JSON_HEADER]), Frame::Unframeable);
    }

    #[test]
    fn undecodable_messages_are_errors_not_panics() {
        let message = encode_message(&reading(br#"{"t":1}"#));
        // Every cut of the message part: an error or (cut in the body) a shorter body.
        for cut in 0..message.len() {
            let mut record = Vec::new();
            put_compact_record(&mut record, 1, 1, &message[..cut]);
            let header = RecordHeader::parse(&record).unwrap();
            if let Ok(back) = header.message(&record) {
                assert!(back.body.len() < 7, "cut at {cut}");
            }
        }
        let decode = |message: &[u8]| {
            let mut record = Vec::new();
            put_compact_record(&mut record, 1, 1, message);
            let header = RecordHeader::parse(&record).unwrap();
            header.message(&record).unwrap_err().to_string()
        };
        assert_eq!(decode(&[0x80, 0, 0]), "unknown flags 0x80");
        let mut cut_number = vec![0x81];
        cut_number.extend_from_slice(&[7; 16]);
        cut_number.push(0x80);
        assert_eq!(
            decode(&cut_number),
            "the message id number runs past the end of the record"
        );
        assert_eq!(decode(&[3 << 1, 0, 0]), "unknown flags 0x06");
        assert_eq!(
            decode(&[0, 2, 0xff, 0xfe, 0]),
            "the message id is not UTF-8"
        );
        assert_eq!(
            decode(&[0, 5, b'a']),
            "the message id runs past the end of the record"
        );
        assert_eq!(
            decode(&[
                0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f
            ]),
            "the property count is out of range"
        );
        assert_eq!(
            decode(&[0, 0, 1, 1, b'k']),
            "the property value runs past the end of the record"
        );
    }
}
