//! The plugin-host framing (4-byte big-endian length, JSON) as either side reads it from the
//! other process: any byte stream yields frames, a clean end or an error naming the problem,
//! never a panic or an allocation beyond the frame limit; every frame read re-encodes to
//! itself.
#![no_main]
use base64::Engine;
use hubagent::plugins::protocol::{Down, Up, encode, encode_batch, read_sync};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The daemon's side: frames from the plugin host.
    let mut r = data;
    for _ in 0..64 {
        match read_sync::<Up>(&mut r) {
            Ok(Some(frame)) => {
                // A batch is binary on the wire; every other frame is JSON.
                let bytes = match &frame {
                    Up::Batch { id, messages } => encode_batch(*id, messages),
                    other => encode(other),
                };
                let again = read_sync::<Up>(&mut &bytes[..]).unwrap().unwrap();
                assert_eq!(again, frame);
                if let Up::Message { body, .. } = &frame {
                    // What the daemon does with a message body: base64 or refused.
                    let _ = base64::engine::general_purpose::STANDARD.decode(body);
                }
            }
            Ok(None) => break,
            Err(e) => {
                let _ = e.to_string();
                break;
            }
        }
    }
    // The host's side: frames from the daemon.
    let mut r = data;
    for _ in 0..64 {
        match read_sync::<Down>(&mut r) {
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
});
