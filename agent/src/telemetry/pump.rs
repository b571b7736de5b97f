//! The sending side of the durable queue: from disk to whichever hub session is current.

use std::sync::Arc;

use tokio::sync::{Semaphore, watch};

use super::queue::Queue;
use crate::hub::{PublishError, SessionHandle};

/// Hands queued telemetry to the current hub session in queue order, up to `inflight` at a
/// time, and removes a message from the queue only when the hub acknowledged it. A message whose
/// session stopped (reprovisioning, reload) is handed to the next session; one the hub can never
/// accept (too large) is dropped with its id logged.
pub async fn pump(
    queue: Arc<Queue>,
    mut sessions: watch::Receiver<Option<SessionHandle>>,
    inflight: usize,
) {
    let permits = Arc::new(Semaphore::new(inflight.max(1)));
    loop {
        let permit = permits.clone().acquire_owned().await.expect("never closed");
        let (seq, message) = queue.next().await;
        // Enqueue here, one message after the other, so the wire order is the queue order.
        let acknowledged = loop {
            let current = sessions.borrow_and_update().clone();
            let Some(session) = current else {
                if sessions.changed().await.is_err() {
                    return;
                }
                continue;
            };
            match session.enqueue(message.clone()).await {
                Ok(rx) => break Some(rx),
                Err(PublishError::TooLarge { size, limit }) => {
                    queue.ack(seq);
                    tracing::error!(message_id = %message.message_id, size, limit, "message dropped: larger than the hub accepts");
                    break None;
                }
                Err(PublishError::Stopped) => {
                    if sessions.changed().await.is_err() {
                        return;
                    }
                }
            }
        };
        let Some(acknowledged) = acknowledged else {
            continue;
        };
        let queue = queue.clone();
        let mut sessions = sessions.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Ok(Ok(())) = acknowledged.await {
                queue.ack(seq);
                return;
            }
            // The session stopped before the hub acknowledged: send it through the next one.
            loop {
                if sessions.changed().await.is_err() {
                    return;
                }
                let Some(session) = sessions.borrow_and_update().clone() else {
                    continue;
                };
                match session.publish(message.clone()).await {
                    Ok(()) | Err(PublishError::TooLarge { .. }) => {
                        queue.ack(seq);
                        return;
                    }
                    Err(PublishError::Stopped) => {}
                }
            }
        });
    }
}
