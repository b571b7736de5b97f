//! The protocol between the daemon and a plugin process (`hubagent-plugin-host`) on the child's
//! stdin/stdout: frames of a 4-byte big-endian length followed by that many bytes of JSON.
//!
//! Down (daemon → host): `start`, `settings`, `ack`, `ping`, `method`, `c2d`, `stop`.
//! Up (host → daemon): `hello` (or `fatal`), `started`/`start-failed`, `applied`, `message`,
//! `log`, `health`, `pong`, `method-answer`, `c2d-taken`, `stopped`. A message is acknowledged (`ack` with an ABI result code)
//! only after it is on disk in the durable queue.
//!
//! ABI 1.3 adds `batch` (up: several messages of one `publish_batch`, appended to the queue with
//! one write) answered by `batch-ack` (down: each message's code, in order). Both ends are the
//! same build (the daemon runs the `hubagent-plugin-host` it opened at its start, which refuses
//! another build: plugins/host_program.rs), so a frame type is added, never changed: older
//! frames keep their shape and meaning.
//!
//! A `batch` frame is the one frame that is not JSON: it carries the messages' bodies as they
//! are, in the binary layout of [`encode_batch`] (its first byte, [`BINARY_BATCH`], can never
//! start a JSON frame). It is the hot path of telemetry: JSON with base64 bodies cost an encode
//! and a decode of every message on both sides (docs/benchmarks.md, "Profile and what it changed").

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::calls::{C2dMessage, Declarations};
use super::library::PluginMessage;

/// Larger frames are a protocol violation (a message is at most 256 KiB, base64 adds a third to
/// one in a JSON `message` frame).
pub const MAX_FRAME: usize = 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Down {
    Start {
        settings: Value,
    },
    Settings {
        id: u64,
        settings: Value,
    },
    Ack {
        id: u64,
        code: i32,
    },
    /// ABI 1.3: the answer to `batch` `id`: each message's code, in the batch's order.
    BatchAck {
        id: u64,
        codes: Vec<i32>,
    },
    Ping {
        id: u64,
    },
    /// A direct method for the plugin's `invoke_method`, answered by `method-answer`.
    Method {
        id: u64,
        method: String,
        payload: Value,
    },
    /// A C2D message for `receive_c2d`, answered by `c2d-taken`.
    C2d {
        id: u64,
        message: C2dMessage,
    },
    Stop,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Up {
    Hello {
        abi_major: u16,
        abi_minor: u16,
        name: String,
        version: String,
        /// ABI 1.1: the methods and C2D messages the plugin takes.
        #[serde(default)]
        declarations: Declarations,
    },
    Fatal {
        error: String,
    },
    Started,
    StartFailed {
        code: i32,
        error: String,
    },
    Applied {
        id: u64,
        code: i32,
        reason: Option<String>,
    },
    Message {
        id: u64,
        /// base64
        body: String,
        content_type: Option<String>,
        content_encoding: Option<String>,
        properties: Vec<(String, String)>,
        /// ABI 1.2: when the reading was taken (RFC 3339), if the plugin said.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        creation_time: Option<String>,
    },
    /// ABI 1.3: messages of one `publish_batch`, answered by one `batch-ack`. Binary on the
    /// wire ([`encode_batch`]), never JSON.
    #[serde(skip)]
    Batch {
        id: u64,
        messages: Vec<PluginMessage>,
    },
    /// ABI 1.2: the plugin's own reported properties (checked in the plugin-host and again in
    /// the daemon).
    Reported {
        properties: serde_json::Map<String, Value>,
    },
    Log {
        level: i32,
        text: String,
    },
    Health {
        state: i32,
        detail: String,
    },
    Pong {
        id: u64,
    },
    MethodAnswer {
        id: u64,
        status: u16,
        payload: Value,
    },
    /// `code` 0: the plugin took the message; otherwise `reason` says why not.
    C2dTaken {
        id: u64,
        code: i32,
        reason: Option<String>,
    },
    Stopped,
}

/// The first byte of a binary `batch` frame (a JSON frame starts with `{`).
pub const BINARY_BATCH: u8 = 0x01;

/// The bytes one message takes in a `batch` frame.
pub fn batch_size(message: &PluginMessage) -> usize {
    let text = |t: &Option<String>| 1 + t.as_ref().map_or(0, |t| 4 + t.len());
    4 + message.body.len()
        + text(&message.content_type)
        + text(&message.content_encoding)
        + text(&message.creation_time)
        + 4
        + message
            .properties
            .iter()
            .map(|(k, v)| 8 + k.len() + v.len())
            .sum::<usize>()
}

/// A `batch` frame, length prefix included: [`BINARY_BATCH`], the id (u64), the message count
/// (u32), then per message its body (u32 length, bytes), content type, content encoding and
/// creation time (each a byte 0 for none, or 1 and a u32 length and UTF-8), and its properties
/// (u32 count, then each key and value as u32 length and UTF-8); integers little-endian.
pub fn encode_batch(id: u64, messages: &[PluginMessage]) -> Vec<u8> {
    fn bytes(out: &mut Vec<u8>, b: &[u8]) {
        out.extend_from_slice(&(b.len() as u32).to_le_bytes());
        out.extend_from_slice(b);
    }
    fn text(out: &mut Vec<u8>, t: &Option<String>) {
        match t {
            None => out.push(0),
            Some(t) => {
                out.push(1);
                bytes(out, t.as_bytes());
            }
        }
    }
    let size = 4 + 1 + 8 + 4 + messages.iter().map(batch_size).sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&((size - 4) as u32).to_be_bytes());
    out.push(BINARY_BATCH);
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&(messages.len() as u32).to_le_bytes());
    for m in messages {
        bytes(&mut out, &m.body);
        text(&mut out, &m.content_type);
        text(&mut out, &m.content_encoding);
        text(&mut out, &m.creation_time);
        out.extend_from_slice(&(m.properties.len() as u32).to_le_bytes());
        for (k, v) in &m.properties {
            bytes(&mut out, k.as_bytes());
            bytes(&mut out, v.as_bytes());
        }
    }
    debug_assert_eq!(out.len(), size);
    out
}

/// Reads a binary `batch` frame (without its length prefix); the error says what is wrong and
/// where.
fn decode_batch(frame: &[u8]) -> std::io::Result<Up> {
    struct Reader<'a> {
        rest: &'a [u8],
        at: usize,
    }
    impl<'a> Reader<'a> {
        fn take(&mut self, n: usize, what: &str) -> std::io::Result<&'a [u8]> {
            if self.rest.len() < n {
                return Err(bad_frame(format!(
                    "batch frame cut short at byte {} ({what})",
                    self.at
                )));
            }
            let (head, rest) = self.rest.split_at(n);
            self.rest = rest;
            self.at += n;
            Ok(head)
        }
        fn u32(&mut self, what: &str) -> std::io::Result<usize> {
            let b = self.take(4, what)?;
            Ok(u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
        }
        fn bytes(&mut self, what: &str) -> std::io::Result<&'a [u8]> {
            let len = self.u32(what)?;
            self.take(len, what)
        }
        fn string(&mut self, what: &str) -> std::io::Result<String> {
            let at = self.at;
            let b = self.bytes(what)?;
            String::from_utf8(b.to_vec())
                .map_err(|_| bad_frame(format!("batch frame: {what} at byte {at} is not UTF-8")))
        }
        fn text(&mut self, what: &str) -> std::io::Result<Option<String>> {
            match self.take(1, what)?[0] {
                0 => Ok(None),
                1 => self.string(what).map(Some),
                other => Err(bad_frame(format!(
                    "batch frame: {what} at byte {} has the marker {other}, not 0 or 1",
                    self.at - 1
                ))),
            }
        }
    }
    let mut r = Reader { rest: frame, at: 0 };
    r.take(1, "type")?;
    let id = u64::from_le_bytes(r.take(8, "id")?.try_into().expect("8 bytes"));
    let count = r.u32("message count")?;
    // Each message takes at least 16 bytes: a count beyond that is a lie, not an allocation.
    let mut messages = Vec::with_capacity(count.min(frame.len() / 16));
    for _ in 0..count {
        let body = r.bytes("body")?.to_vec();
        let content_type = r.text("content type")?;
        let content_encoding = r.text("content encoding")?;
        let creation_time = r.text("creation time")?;
        let pairs = r.u32("property count")?;
        let mut properties = Vec::with_capacity(pairs.min(r.rest.len() / 8));
        for _ in 0..pairs {
            properties.push((r.string("property name")?, r.string("property value")?));
        }
        messages.push(PluginMessage {
            body,
            content_type,
            content_encoding,
            properties,
            creation_time,
        });
    }
    if !r.rest.is_empty() {
        return Err(bad_frame(format!(
            "batch frame: {} bytes after its {count} messages",
            r.rest.len()
        )));
    }
    Ok(Up::Batch { id, messages })
}

fn bad_frame(text: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, text)
}

pub fn encode<T: Serialize>(frame: &T) -> Vec<u8> {
    let json = serde_json::to_vec(frame).expect("frames serialize");
    let mut out = Vec::with_capacity(json.len() + 4);
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(&json);
    out
}

/// A frame read from the other side: JSON, except `Up`'s binary `batch`.
pub trait Frame: Sized {
    fn decode(bytes: &[u8]) -> std::io::Result<Self>;
}

fn decode_json<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> std::io::Result<T> {
    serde_json::from_slice(bytes).map_err(|e| bad_frame(format!("bad frame: {e}")))
}

impl Frame for Down {
    fn decode(bytes: &[u8]) -> std::io::Result<Down> {
        decode_json(bytes)
    }
}

impl Frame for Up {
    fn decode(bytes: &[u8]) -> std::io::Result<Up> {
        match bytes.first() {
            Some(&BINARY_BATCH) => decode_batch(bytes),
            _ => decode_json(bytes),
        }
    }
}

fn check_len(len: usize) -> std::io::Result<()> {
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes is over the {MAX_FRAME} byte limit"),
        ));
    }
    Ok(())
}

/// Blocking read (the plugin-host side). `Ok(None)` at a clean end of stream.
pub fn read_sync<T: Frame>(r: &mut impl Read) -> std::io::Result<Option<T>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    check_len(len)?;
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)?;
    T::decode(&buf).map(Some)
}

pub fn write_sync<T: Serialize>(w: &mut impl Write, frame: &T) -> std::io::Result<()> {
    w.write_all(&encode(frame))?;
    w.flush()
}

/// Async read (the daemon side). `Ok(None)` at a clean end of stream.
pub async fn read_async<T: Frame>(
    r: &mut (impl tokio::io::AsyncRead + Unpin),
) -> std::io::Result<Option<T>> {
    use tokio::io::AsyncReadExt;
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    check_len(len)?;
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    T::decode(&buf).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_oversize_is_refused() {
        let frames = vec![
            Up::Hello {
                abi_major: 1,
                abi_minor: 0,
                name: "x".into(),
                version: "1".into(),
                declarations: Declarations::default(),
            },
            Up::Message {
                id: 7,
                body: "e30=".into(),
                content_type: Some("application/json".into()),
                content_encoding: None,
                properties: vec![("a".into(), "b".into())],
                creation_time: Some("2026-01-02T03:04:05.678Z".into()),
            },
            Up::Reported {
                properties: serde_json::json!({"fw": "1.2"})
                    .as_object()
                    .unwrap()
                    .clone(),
            },
        ];
        let mut bytes = Vec::new();
        for f in &frames {
            write_sync(&mut bytes, f).unwrap();
        }
        let mut r = std::io::Cursor::new(bytes);
        assert_eq!(read_sync::<Up>(&mut r).unwrap(), Some(frames[0].clone()));
        assert_eq!(read_sync::<Up>(&mut r).unwrap(), Some(frames[1].clone()));
        assert_eq!(read_sync::<Up>(&mut r).unwrap(), Some(frames[2].clone()));
        assert_eq!(read_sync::<Up>(&mut r).unwrap(), None);
        // A batch frame reads as `batch`, bodies as they were (not UTF-8 here), names and
        // values with JSON's special characters.
        let message = PluginMessage {
            body: vec![0xff, 0, b'{', 0x80],
            content_type: Some("application/json".into()),
            content_encoding: None,
            properties: vec![
                ("k".into(), "v\n\"é".into()),
                (String::new(), String::new()),
            ],
            creation_time: Some("2026-01-02T03:04:05Z".into()),
        };
        let messages = vec![
            message.clone(),
            PluginMessage {
                body: Vec::new(),
                ..message
            },
        ];
        let batch = encode_batch(9, &messages);
        assert_eq!(
            read_sync::<Up>(&mut std::io::Cursor::new(batch.clone())).unwrap(),
            Some(Up::Batch { id: 9, messages })
        );
        // Cut short anywhere, or with bytes left over, it is refused with what and where.
        for cut in 5..batch.len() {
            let mut short = batch[..cut].to_vec();
            short[..4].copy_from_slice(&((cut - 4) as u32).to_be_bytes());
            let error = read_sync::<Up>(&mut std::io::Cursor::new(short)).unwrap_err();
            assert!(error.to_string().contains("cut short at byte"), "{error}");
        }
        let mut long = batch.clone();
        long.push(0);
        long[..4].copy_from_slice(&((batch.len() - 3) as u32).to_be_bytes());
        let error = read_sync::<Up>(&mut std::io::Cursor::new(long)).unwrap_err();
        assert!(
            error.to_string().contains("1 bytes after its 2 messages"),
            "{error}"
        );
        let mut huge = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        assert!(read_sync::<Up>(&mut std::io::Cursor::new(huge)).is_err());
    }
}
