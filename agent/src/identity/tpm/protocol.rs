//! The protocol between the agent and `hubagent-tpm`, the executable that does every TPM
//! operation (docs/tpm.md, "The TPM helper"): the agent writes one [`Request`] and reads one
//! [`Reply`] (or the [`TpmError`] the helper met), each a frame on the helper's stdin and stdout.
//!
//! A frame is a big-endian u32 length, then that many bytes of JSON. The helper's first frame is
//! its [`Hello`]: the protocol version it speaks and its build, which the agent compares with its
//! own before it sends anything. A change of a message's meaning raises [`PROTOCOL`].
//!
//! Secrets travel in one direction only: a key to import and the hierarchies' authorization
//! values go to the helper; no reply carries key material (an ECC key's private part leaves it
//! wrapped by the TPM's storage root key, useless anywhere else).

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::{HandleCounts, Replaced, TpmError};

/// The version of this protocol; the helper and the agent must speak the same.
pub const PROTOCOL: u32 = 1;

/// The helper executable's file name.
pub const FILE_NAME: &str = "hubagent-tpm";

/// What the agent and its helper must agree on: both are built from this crate, so equal builds
/// give equal strings (as the plugin host's `--build`).
pub const BUILD: &str = env!("CARGO_PKG_VERSION");

/// The largest frame either side accepts: every message is a few KiB at most (a TPM2B is at most
/// 64 KiB, and the blobs DPS sends are far smaller).
pub const MAX_FRAME: usize = 256 * 1024;

/// The helper's first frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: u32,
    pub build: String,
}

/// The owner and endorsement hierarchies' authorization values, as the helper sets them on its
/// ESAPI context (cleared from memory when dropped, on both sides).
#[derive(Clone, Default, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub struct Auth {
    pub owner: Option<Vec<u8>>,
    pub endorsement: Option<Vec<u8>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Auth(..)")
    }
}

/// A key the agent hands to the helper to import (cleared from memory when dropped).
#[derive(Clone, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub struct KeyBytes(pub Vec<u8>);

impl std::fmt::Debug for KeyBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyBytes({} bytes)", self.0.len())
    }
}

/// An ECC key held by the TPM: its TPM2B_PUBLIC and TPM2B_PRIVATE (wrapped by the SRK) blobs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EccBlobs {
    pub public: Vec<u8>,
    pub private: Vec<u8>,
}

/// One TPM operation. `tcti` names the TPM (docs/tpm.md), `handle` a persistent handle.
#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    /// Is there a usable HMAC key at `handle`? Replies [`Reply::Done`].
    CheckHmacKey { tcti: String, handle: u32 },
    /// HMAC-SHA256 of `data` under the key at `handle`. Replies [`Reply::Bytes`].
    Hmac {
        tcti: String,
        handle: u32,
        data: Vec<u8>,
    },
    /// The EK and SRK publics. Replies [`Reply::Identity`].
    Identity { tcti: String, auth: Auth },
    /// Imports `key` as the HMAC key at `handle`. Replies [`Reply::Replaced`].
    ImportHmacKey {
        tcti: String,
        auth: Auth,
        handle: u32,
        key: KeyBytes,
        force: bool,
    },
    /// Unwraps a DPS activation blob into the HMAC key at `handle`. Replies [`Reply::Replaced`].
    ImportActivationBlob {
        tcti: String,
        auth: Auth,
        handle: u32,
        blob: Vec<u8>,
    },
    /// Removes the key at `handle`. Replies [`Reply::Replaced`] (what was removed).
    Evict {
        tcti: String,
        auth: Auth,
        handle: u32,
        force: bool,
    },
    /// How many transient objects and sessions the TPM holds. Replies [`Reply::HandleCounts`].
    HandleCounts { tcti: String },
    /// Has the TPM make an ECDSA P-256 key under the SRK. Replies [`Reply::EccKey`].
    CreateEccKey { tcti: String, auth: Auth },
    /// Parses stored blobs (no TPM is asked). Replies [`Reply::EccKey`].
    ReadEccKey { blobs: EccBlobs },
    /// Loads the key under the SRK and flushes it again. Replies [`Reply::Done`].
    CheckEccKey {
        tcti: String,
        auth: Auth,
        blobs: EccBlobs,
    },
    /// ECDSA over a SHA-256 `digest`; the signature DER-encoded. Replies [`Reply::Bytes`].
    SignEcc {
        tcti: String,
        auth: Auth,
        blobs: EccBlobs,
        digest: Vec<u8>,
    },
}

impl Request {
    /// What the request does, for errors ("… during HMAC").
    pub fn operation(&self) -> &'static str {
        match self {
            Request::CheckHmacKey { .. } => "the check of the HMAC key",
            Request::Hmac { .. } => "an HMAC signature",
            Request::Identity { .. } => "reading the EK and SRK",
            Request::ImportHmacKey { .. } => "the import of a key",
            Request::ImportActivationBlob { .. } => "the import of DPS's activation blob",
            Request::Evict { .. } => "the removal of a key",
            Request::HandleCounts { .. } => "counting the TPM's handles",
            Request::CreateEccKey { .. } => "the creation of an ECC key",
            Request::ReadEccKey { .. } => "reading an ECC key's blobs",
            Request::CheckEccKey { .. } => "the check of an ECC key",
            Request::SignEcc { .. } => "an ECDSA signature",
        }
    }
}

/// What an operation gave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Done,
    Bytes(Vec<u8>),
    /// TPM2B_PUBLIC of the EK and of the SRK.
    Identity {
        endorsement_key: Vec<u8>,
        storage_root_key: Vec<u8>,
    },
    Replaced(Replaced),
    HandleCounts(HandleCounts),
    /// The key's blobs and its uncompressed point `04 || X || Y`.
    EccKey {
        blobs: EccBlobs,
        point: Vec<u8>,
    },
}

impl Reply {
    /// The reply's kind, for an error naming a reply the request did not ask for.
    pub fn kind(&self) -> &'static str {
        match self {
            Reply::Done => "done",
            Reply::Bytes(_) => "bytes",
            Reply::Identity { .. } => "identity",
            Reply::Replaced(_) => "replaced",
            Reply::HandleCounts(_) => "handle counts",
            Reply::EccKey { .. } => "ECC key",
        }
    }
}

/// The helper's answer to one request.
pub type Answer = Result<Reply, TpmError>;

/// Writes `message` as one frame. The JSON buffer is cleared afterwards: a request may hold a key.
pub fn write_frame<T: Serialize>(out: &mut impl Write, message: &T) -> std::io::Result<()> {
    let body = Zeroizing::new(serde_json::to_vec(message).map_err(std::io::Error::other)?);
    if body.len() > MAX_FRAME {
        return Err(std::io::Error::other(format!(
            "a TPM helper message of {} bytes is larger than {MAX_FRAME}",
            body.len()
        )));
    }
    let mut frame = Zeroizing::new(Vec::with_capacity(4 + body.len()));
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    out.write_all(&frame)?;
    out.flush()
}

/// Reads one frame; `Ok(None)` at a clean end of input (before a frame's first byte).
pub fn read_frame<T: for<'de> Deserialize<'de>>(
    input: &mut impl Read,
) -> std::io::Result<Option<T>> {
    let mut size = [0u8; 4];
    let mut got = 0;
    while got < size.len() {
        match input.read(&mut size[got..])? {
            0 if got == 0 => return Ok(None),
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => got += n,
        }
    }
    let size = u32::from_be_bytes(size) as usize;
    if size > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a TPM helper frame announces {size} bytes; at most {MAX_FRAME} are accepted"),
        ));
    }
    let mut body = Zeroizing::new(vec![0u8; size]);
    input.read_exact(&mut body)?;
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_and_an_answer_survive_a_frame() {
        let mut wire = Vec::new();
        let request = Request::Hmac {
            tcti: "swtpm:port=2321".into(),
            handle: 0x8100_0100,
            data: b"to sign".to_vec(),
        };
        write_frame(&mut wire, &request).unwrap();
        let answer: Answer = Err(TpmError::HandleEmpty {
            handle: 0x8100_0100,
        });
        write_frame(&mut wire, &answer).unwrap();
        let mut input = wire.as_slice();
        let back: Request = read_frame(&mut input).unwrap().unwrap();
        assert!(
            matches!(back, Request::Hmac { handle: 0x8100_0100, ref data, .. } if data == b"to sign")
        );
        let back: Answer = read_frame(&mut input).unwrap().unwrap();
        assert!(matches!(
            back,
            Err(TpmError::HandleEmpty {
                handle: 0x8100_0100
            })
        ));
        assert!(read_frame::<Answer>(&mut input).unwrap().is_none());
    }

    #[test]
    fn a_cut_or_oversized_frame_is_an_error() {
        let mut wire = Vec::new();
        write_frame(&mut wire, &Reply::Done).unwrap();
        let cut = &wire[..wire.len() - 1];
        assert!(read_frame::<Answer>(&mut &cut[..]).is_err());
        let huge = ((MAX_FRAME + 1) as u32).to_be_bytes();
        let error = read_frame::<Answer>(&mut &huge[..])
            .unwrap_err()
            .to_string();
        assert!(error.contains("announces"), "{error}");
    }

    #[test]
    fn secrets_do_not_show_in_debug_output() {
        let auth = Auth {
            owner: Some(b"owner-password".to_vec()),
            endorsement: None,
        };
        let key = KeyBytes(b"device-key".to_vec());
        let text = format!("{auth:?} {key:?}");
        assert!(
            !text.contains("owner-password") && !text.contains("device-key"),
            "{text}"
        );
    }
}
