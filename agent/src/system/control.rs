//! The control socket: how `hubagent status`, `hubagent reprovision` and `hubagent plugins list`
//! talk to the running daemon. One JSON request line, one JSON answer line, over a Unix socket
//! (mode 0660, so root and members of the daemon's group can use it).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Request {
    Status,
    Reprovision,
    Reload,
    PluginsList,
    PluginRestart { name: String },
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "cannot reach the hubagent daemon at {path}: {source} (is `hubagent run` / hubagent.service running?)"
    )]
    Unreachable {
        path: String,
        source: std::io::Error,
    },
    #[error("the daemon sent an answer that is not JSON: {0}")]
    BadAnswer(String),
    #[error("{0}")]
    Refused(String),
}

/// Answers requests; implemented by the daemon.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, request: Request) -> Result<Value, String>;
}

/// How long the control socket waits after a failed accept before the next.
const ACCEPT_RETRY: Duration = Duration::from_millis(250);

/// Binds the socket (replacing a stale one) and serves until the task is dropped.
pub async fn serve(
    path: &Path,
    handler: Arc<dyn Handler>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // A socket left by a killed daemon would make bind fail.
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(tokio::spawn(async move {
        // A failing accept was logged and not yet followed by a working one.
        let mut refusing = false;
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => {
                    if std::mem::take(&mut refusing) {
                        tracing::info!("the control socket accepts connections again");
                    }
                    stream
                }
                Err(e) => {
                    // Out of file descriptors (EMFILE) the waiting connection stays queued and
                    // the socket stays readable: without a pause this loop would spin a core.
                    if !std::mem::replace(&mut refusing, true) {
                        tracing::error!(
                            "the control socket cannot take a connection: {e}{}",
                            crate::util::fs::limit_hint(&e)
                        );
                    }
                    tokio::time::sleep(ACCEPT_RETRY).await;
                    continue;
                }
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut line = String::new();
                // Bounded, so a misbehaving client cannot make the daemon buffer an endless line.
                let mut reader = tokio::io::BufReader::new(read.take(64 * 1024));
                if reader.read_line(&mut line).await.is_err() {
                    return;
                }
                let answer = match serde_json::from_str::<Request>(line.trim()) {
                    Ok(request) => match handler.handle(request) {
                        Ok(value) => serde_json::json!({ "ok": true, "result": value }),
                        Err(message) => serde_json::json!({ "ok": false, "error": message }),
                    },
                    Err(error) => {
                        serde_json::json!({ "ok": false, "error": format!("bad request: {error}") })
                    }
                };
                let mut bytes = answer.to_string().into_bytes();
                bytes.push(b'\n');
                let _ = write.write_all(&bytes).await;
            });
        }
    }))
}

/// Sends one request to the daemon (blocking; used by the CLI).
pub fn request(path: &Path, request: &Request) -> Result<Value, ControlError> {
    let unreachable = |source| ControlError::Unreachable {
        path: path.display().to_string(),
        source,
    };
    let mut stream = UnixStream::connect(path).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(unreachable)?;
    let mut line = serde_json::to_string(request).expect("requests serialize");
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(unreachable)?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .map_err(unreachable)?;
    let answer: Value =
        serde_json::from_str(answer.trim()).map_err(|_| ControlError::BadAnswer(answer.clone()))?;
    if answer["ok"] == Value::Bool(true) {
        Ok(answer["result"].clone())
    } else {
        Err(ControlError::Refused(
            answer["error"]
                .as_str()
                .unwrap_or("unknown error")
                .to_string(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;
    impl Handler for Echo {
        fn handle(&self, request: Request) -> Result<Value, String> {
            match request {
                Request::Status => Ok(serde_json::json!({ "state": "connected" })),
                other => Err(format!("{other:?} not supported here")),
            }
        }
    }

    #[tokio::test]
    async fn request_round_trip_and_refusal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let _server = serve(&path, Arc::new(Echo)).await.unwrap();
        let path2 = path.clone();
        let status = tokio::task::spawn_blocking(move || request(&path2, &Request::Status))
            .await
            .unwrap();
        assert_eq!(status.unwrap()["state"], "connected");
        let refused = tokio::task::spawn_blocking(move || request(&path, &Request::Reload))
            .await
            .unwrap();
        assert!(matches!(refused, Err(ControlError::Refused(m)) if m.contains("Reload")));
    }

    #[test]
    fn unreachable_daemon_names_the_socket() {
        let error = request(Path::new("/nonexistent/hubagent.sock"), &Request::Status).unwrap_err();
        assert!(
            error.to_string().contains("/nonexistent/hubagent.sock"),
            "{error}"
        );
    }
}
