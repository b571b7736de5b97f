//! MQTT over WebSockets: the bytes of binary WebSocket messages are the MQTT byte stream. The
//! bridge copies them between the WebSocket and one end of an in-memory pipe whose other end the
//! MQTT code reads and writes like a TLS stream. MQTT packets may be split across messages or
//! several may share one (OASIS MQTT 3.1.1, 6.0 "Using WebSocket as a network transport").

use axum::extract::ws::{Message, WebSocket};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

/// Largest WebSocket message sent to the client: MQTT bytes as they come, in chunks this size.
const CHUNK: usize = 16 * 1024;

/// Copies both ways until either side closes (or sends text, which MQTT over WebSockets does not
/// allow: the connection is closed).
pub async fn bridge(socket: WebSocket, pipe: DuplexStream) {
    let (mut ws_out, mut ws_in) = socket.split();
    let (mut pipe_in, mut pipe_out) = tokio::io::split(pipe);
    let to_mqtt = async {
        while let Some(Ok(message)) = ws_in.next().await {
            match message {
                Message::Binary(bytes) => {
                    if pipe_out.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
                // Pings are answered by the WebSocket layer; pongs need nothing.
                Message::Ping(_) | Message::Pong(_) => {}
                Message::Text(_) | Message::Close(_) => break,
            }
        }
        let _ = pipe_out.shutdown().await;
    };
    let from_mqtt = async {
        let mut buffer = vec![0u8; CHUNK];
        loop {
            match pipe_in.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let bytes = axum::body::Bytes::copy_from_slice(&buffer[..n]);
                    if ws_out.send(Message::Binary(bytes)).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = ws_out.send(Message::Close(None)).await;
    };
    tokio::select! {
        _ = to_mqtt => {}
        _ = from_mqtt => {}
    }
}
