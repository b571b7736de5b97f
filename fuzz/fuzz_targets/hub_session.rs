//! The agent's hub session, its real event loop and options (`hub::spawn`: rumqttc's
//! `EventLoop`, the session's packet ids, twin and telemetry handling), connected over plain TCP
//! on loopback (the fuzz build's `cfg(fuzzing)`, agent/src/mqtt.rs) to an in-process server
//! that answers with the fuzz input.
//!
//! The input: the first byte says how many telemetry messages (0 to 4) the session has to send;
//! the rest is chunks, each a length byte and that many bytes (the last one may be short). The
//! server reads the agent's CONNECT, then writes one chunk after each packet the agent sends (or
//! after a quiet millisecond), then closes its side of the connection. So an input can answer
//! what the agent sent: CONNACK, SUBACK, the twin GET's response, PUBACKs for the packet ids it
//! used.
//!
//! Beyond "no panic": the session notices the end of the connection within a bound (no hang on
//! any bytes), and no telemetry message is acknowledged to its sender (the queue) unless the
//! server sent a PUBACK for a packet id that carried it.
#![no_main]
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use bytes::BytesMut;
use hubagent::hub::{HubParams, SessionEvent, spawn};
use hubagent::identity::credential::Credential;
use hubagent::identity::keys::MemoryKey;
use hubagent::message::TelemetryMessage;
use libfuzzer_sys::fuzz_target;
use rumqttc::Packet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The most telemetry messages an input asks for (the session's window is larger).
const MESSAGES: u8 = 4;
/// How long the server waits for the agent's next packet before writing the next chunk anyway.
/// The agent runs on the same runtime: what it answers with is written within this.
const QUIET: Duration = Duration::from_millis(1);
/// The agent's incoming limit on the hub session (hub/session.rs: 512 KiB); the server reads the
/// agent's packets with the same reader.
const MAX_PACKET: usize = 512 * 1024;
/// The time an input may take, from the start to the session reporting the connection's end:
/// the server closes the connection after its last chunk, so the session must notice.
const BOUND: Duration = Duration::from_secs(10);

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
});

/// Unused on plain TCP, but part of the session's parameters (built once: it reads the system's
/// certificates).
static TLS: LazyLock<Arc<rustls::ClientConfig>> = LazyLock::new(|| {
    hubagent::identity::tls::client_config(None, None).expect("a TLS client configuration")
});

fuzz_target!(|data: &[u8]| {
    let Some((&count, rest)) = data.split_first() else {
        return;
    };
    RUNTIME.block_on(one_input(count % (MESSAGES + 1), chunks(rest)));
});

/// The chunks of the input: a length byte, then that many bytes (fewer at the end).
fn chunks(mut rest: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while let Some((&len, tail)) = rest.split_first() {
        let len = usize::from(len).min(tail.len());
        out.push(tail[..len].to_vec());
        rest = &tail[len..];
    }
    out
}

/// What the server saw and did on the connection.
#[derive(Default)]
struct Served {
    /// The bodies of the telemetry the agent sent, by packet id (a packet id is reused once
    /// acknowledged).
    sent: BTreeMap<u16, Vec<Vec<u8>>>,
    /// Everything the server wrote, in order.
    written: Vec<u8>,
}

impl Served {
    /// The packet ids of the PUBACKs in what the server wrote, read as the agent reads them up to
    /// the first packet it cannot read (where the agent ends the connection).
    fn acknowledged(&self) -> BTreeSet<u16> {
        let mut buffer = BytesMut::from(&self.written[..]);
        let mut ids = BTreeSet::new();
        while let Ok(packet) = Packet::read(&mut buffer, MAX_PACKET) {
            if let Packet::PubAck(ack) = packet {
                ids.insert(ack.pkid);
            }
        }
        ids
    }
}

async fn one_input(count: u8, chunks: Vec<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
    let port = listener.local_addr().expect("its address").port();
    let key = MemoryKey::from_base64("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", "fuzz")
        .expect("a key");
    let (handle, mut events, task) = spawn(HubParams {
        hub: "127.0.0.1".into(),
        device_id: "fuzz-gw".into(),
        port,
        websocket: false,
        proxy: None,
        auto: None,
        credential: Credential::Sas(Arc::new(key)),
        tls: TLS.clone(),
        keep_alive: Duration::from_secs(30),
        sas_ttl: Duration::from_secs(3600),
        renew_before: Duration::from_secs(600),
        backoff_max: Duration::from_secs(1),
        unavailable_backoff_max: Duration::from_secs(1),
        max_message_size: 256 * 1024,
        inflight: 32,
        desired_version: 0,
        model_id: None,
    });
    let mut acknowledged = Vec::new();
    for n in 0..count {
        let message = TelemetryMessage {
            message_id: format!("m{n}"),
            body: bytes::Bytes::from(vec![b'0' + n]),
            content_type: None,
            content_encoding: None,
            creation_time: None,
            properties: Vec::new(),
        };
        let done = handle
            .enqueue(&message)
            .await
            .expect("the session takes it");
        acknowledged.push((vec![b'0' + n], done));
    }

    let outcome = tokio::time::timeout(BOUND, async {
        let (socket, _) = listener.accept().await.expect("the session connects");
        drop(listener);
        let served = serve(socket, chunks).await;
        // Each end of a connection is reported (lost, refused, unauthorized).
        while let Some(event) = events.recv().await {
            if matches!(
                event,
                SessionEvent::Disconnected { .. } | SessionEvent::Unauthorized
            ) {
                return served;
            }
        }
        panic!("the session ended without reporting the connection's end");
    })
    .await;
    task.abort();
    let served = outcome
        .unwrap_or_else(|_| panic!("the session did not see the connection end within {BOUND:?}"));

    let pubacked = served.acknowledged();
    for (body, mut done) in acknowledged {
        if let Ok(Ok(())) = done.try_recv() {
            let carried = served
                .sent
                .iter()
                .any(|(id, bodies)| pubacked.contains(id) && bodies.contains(&body));
            assert!(
                carried,
                "message {body:?} acknowledged without a PUBACK for a packet that carried it"
            );
        }
    }
}

/// Reads the agent's CONNECT, then writes one chunk after each packet the agent sends (or after
/// [`QUIET`]), then closes its side of the connection and reads what the agent sent until the
/// agent closes its side.
async fn serve(mut socket: TcpStream, chunks: Vec<Vec<u8>>) -> Served {
    let mut served = Served::default();
    let mut incoming = BytesMut::new();
    next_packet(&mut socket, &mut incoming, &mut served, None).await;
    for chunk in chunks {
        if socket.write_all(&chunk).await.is_err() {
            break;
        }
        served.written.extend_from_slice(&chunk);
        if !next_packet(&mut socket, &mut incoming, &mut served, Some(QUIET)).await {
            break;
        }
    }
    let _ = socket.shutdown().await;
    // What the agent sent after the last chunk (its PUBLISH may have gone out before a PUBACK
    // the server wrote, and not been read yet), up to its end of the connection.
    while next_packet(&mut socket, &mut incoming, &mut served, None).await {}
    served
}

/// Waits for the agent's next packet (at most `wait`), noting the telemetry it carries. False
/// when the agent closed the connection or sent what is not MQTT.
async fn next_packet(
    socket: &mut TcpStream,
    incoming: &mut BytesMut,
    served: &mut Served,
    wait: Option<Duration>,
) -> bool {
    loop {
        match Packet::read(incoming, MAX_PACKET) {
            Ok(Packet::Publish(publish)) => {
                if publish.topic.contains("/messages/events/") {
                    served
                        .sent
                        .entry(publish.pkid)
                        .or_default()
                        .push(publish.payload.to_vec());
                }
                return true;
            }
            Ok(_) => return true,
            Err(rumqttc::Error::InsufficientBytes(_)) => {}
            Err(_) => return false,
        }
        let mut buffer = [0u8; 4096];
        let read = match wait {
            Some(wait) => match tokio::time::timeout(wait, socket.read(&mut buffer)).await {
                Ok(read) => read,
                Err(_) => return true,
            },
            None => socket.read(&mut buffer).await,
        };
        match read {
            Ok(0) | Err(_) => return false,
            Ok(n) => incoming.extend_from_slice(&buffer[..n]),
        }
    }
}
