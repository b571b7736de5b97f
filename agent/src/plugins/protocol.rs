//! The protocol between the daemon and a plugin process (`hubagent plugin-host`) on the child's
//! stdin/stdout: frames of a 4-byte big-endian length followed by that many bytes of JSON.
//!
//! Down (daemon → host): `start`, `settings`, `ack`, `ping`, `method`, `c2d`, `stop`.
//! Up (host → daemon): `hello` (or `fatal`), `started`/`start-failed`, `applied`, `message`,
//! `log`, `health`, `pong`, `method-answer`, `c2d-taken`, `stopped`. A message is acknowledged (`ack` with an ABI result code)
//! only after it is on disk in the durable queue.
//!
//! ABI 1.3 adds `batch` (up: several messages of one `publish_batch`, appended to the queue with
//! one write) answered by `batch-ack` (down: each message's code, in order). Both ends are the
//! same `hubagent` binary (the daemon runs `/proc/self/exe plugin-host`), so a frame type is
//! added, never changed: older frames keep their shape and meaning.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::calls::{C2dMessage, Declarations};
use super::library::PluginMessage;

/// Larger frames are a protocol violation (a message is at most 256 KiB, base64 adds a third).
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
    /// ABI 1.3: messages of one `publish_batch`, answered by one `batch-ack`.
    Batch {
        id: u64,
        messages: Vec<WireMessage>,
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

/// A message in a `batch` frame: the fields of `message`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireMessage {
    /// base64
    pub body: String,
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    pub properties: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_time: Option<String>,
}

impl WireMessage {
    pub fn from_plugin(message: PluginMessage) -> WireMessage {
        use base64::Engine;
        WireMessage {
            body: base64::engine::general_purpose::STANDARD.encode(&message.body),
            content_type: message.content_type,
            content_encoding: message.content_encoding,
            properties: message.properties,
            creation_time: message.creation_time,
        }
    }

    /// `None` when the body is not base64 (a broken plugin-host).
    pub fn into_plugin(self) -> Option<PluginMessage> {
        use base64::Engine;
        let body = base64::engine::general_purpose::STANDARD
            .decode(&self.body)
            .ok()?;
        Some(PluginMessage {
            body,
            content_type: self.content_type,
            content_encoding: self.content_encoding,
            properties: self.properties,
            creation_time: self.creation_time,
        })
    }
}

/// A `batch` frame (length prefix included) of messages already serialized one by one with
/// `serde_json`: the plugin-host sizes its frames by what it has encoded.
pub fn encode_batch(id: u64, messages: &[Vec<u8>]) -> Vec<u8> {
    let head = format!("{{\"type\":\"batch\",\"id\":{id},\"messages\":[");
    let mut out = Vec::with_capacity(
        4 + head.len() + messages.iter().map(|m| m.len() + 1).sum::<usize>() + 2,
    );
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(head.as_bytes());
    for (i, m) in messages.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(m);
    }
    out.extend_from_slice(b"]}");
    let len = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&len.to_be_bytes());
    out
}

pub fn encode<T: Serialize>(frame: &T) -> Vec<u8> {
    let json = serde_json::to_vec(frame).expect("frames serialize");
    let mut out = Vec::with_capacity(json.len() + 4);
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(&json);
    out
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> std::io::Result<T> {
    serde_json::from_slice(bytes).map_err(|e| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, format!("bad frame: {e}"))
    })
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
pub fn read_sync<T: for<'de> Deserialize<'de>>(r: &mut impl Read) -> std::io::Result<Option<T>> {
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
    decode(&buf).map(Some)
}

pub fn write_sync<T: Serialize>(w: &mut impl Write, frame: &T) -> std::io::Result<()> {
    w.write_all(&encode(frame))?;
    w.flush()
}

/// Async read (the daemon side). `Ok(None)` at a clean end of stream.
pub async fn read_async<T: for<'de> Deserialize<'de>>(
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
    decode(&buf).map(Some)
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
        // A batch frame assembled from messages serialized one by one reads as `batch`.
        let message = WireMessage {
            body: "e30=".into(),
            content_type: None,
            content_encoding: None,
            properties: vec![("k".into(), "v\n\"".into())],
            creation_time: None,
        };
        let encoded: Vec<Vec<u8>> = (0..3)
            .map(|_| serde_json::to_vec(&message).unwrap())
            .collect();
        let batch = encode_batch(9, &encoded);
        assert_eq!(
            read_sync::<Up>(&mut std::io::Cursor::new(batch)).unwrap(),
            Some(Up::Batch {
                id: 9,
                messages: vec![message.clone(); 3]
            })
        );
        let mut huge = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        assert!(read_sync::<Up>(&mut std::io::Cursor::new(huge)).is_err());
    }
}
