//! The sending side of the durable queue: from disk to whichever hub session is current.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio::time::Instant;

use super::batch::{self, Batching};
use super::queue::Queue;
use crate::hub::{PublishError, SessionHandle};
use crate::message::TelemetryMessage;

/// Hands queued telemetry to the current hub session in queue order, up to `inflight` at a
/// time, and removes a message from the queue only when the hub acknowledged it. A message whose
/// session stopped (reprovisioning, reload) is handed to the next session; one the hub can never
/// accept (too large) is dropped with its id logged.
///
/// Consecutive queued readings of a source that batches (`batching`) go as one hub message
/// (telemetry/batch.rs); each of them stays queued until the hub acknowledged that message, so a
/// batch cut short by a crash is sent again, whole, after the restart.
pub async fn pump(
    queue: Arc<Queue>,
    mut sessions: watch::Receiver<Option<SessionHandle>>,
    inflight: usize,
    batching: watch::Receiver<Arc<Batching>>,
) {
    let permits = Arc::new(Semaphore::new(inflight.max(1)));
    // One task waits for the hub's acknowledgements, in the order the messages went out (a task
    // per message cost a spawn and a wake-up each: docs/benchmarks.md).
    let (sent_tx, sent_rx) = mpsc::unbounded_channel();
    tokio::spawn(acknowledge(queue.clone(), sessions.clone(), sent_rx));
    let mut taken = Taken::default();
    loop {
        let permit = permits.clone().acquire_owned().await.expect("never closed");
        let plan = batching.borrow().clone();
        let (seqs, message) = taken.next_hub_message(&queue, &plan).await;
        // Enqueue here, one message after the other, so the wire order is the queue order.
        let acknowledged = loop {
            let current = sessions.borrow_and_update().clone();
            let Some(session) = current else {
                if sessions.changed().await.is_err() {
                    return;
                }
                continue;
            };
            match session.enqueue(&message).await {
                Ok(rx) => break Some(rx),
                Err(PublishError::TooLarge { size, limit }) => {
                    seqs.iter().for_each(|seq| queue.ack(*seq));
                    tracing::error!(message_id = %message.message_id, readings = seqs.len(), size, limit, "message dropped: larger than the hub accepts");
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
        let sent = Sent {
            permit,
            seqs,
            message,
            acknowledged,
        };
        if sent_tx.send(sent).is_err() {
            return;
        }
    }
}

/// A hub message handed to a session, waiting for its PUBACK; its permit is the pump's window.
struct Sent {
    permit: OwnedSemaphorePermit,
    seqs: Vec<u64>,
    message: TelemetryMessage,
    acknowledged: oneshot::Receiver<Result<(), PublishError>>,
}

/// Acknowledges to the queue what the hub acknowledged, in the order it was sent (the hub
/// acknowledges in order; one acknowledged early waits for those before it, still in the
/// window). A message whose session stopped first is sent through the next one by a task of
/// its own, as it was before this one.
async fn acknowledge(
    queue: Arc<Queue>,
    sessions: watch::Receiver<Option<SessionHandle>>,
    mut sent: mpsc::UnboundedReceiver<Sent>,
) {
    while let Some(Sent {
        permit,
        seqs,
        message,
        acknowledged,
    }) = sent.recv().await
    {
        if let Ok(Ok(())) = acknowledged.await {
            seqs.iter().for_each(|seq| queue.ack(*seq));
            drop(permit);
            continue;
        }
        let queue = queue.clone();
        let mut sessions = sessions.clone();
        tokio::spawn(async move {
            let _permit = permit;
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
                        seqs.iter().for_each(|seq| queue.ack(*seq));
                        return;
                    }
                    Err(PublishError::Stopped) => {}
                }
            }
        });
    }
}

/// Messages taken from the queue and not sent yet, in queue order: the reading that ended a
/// batch (another source's) and those that did not fit in it go first next time.
#[derive(Default)]
struct Taken {
    waiting: VecDeque<(u64, TelemetryMessage)>,
}

impl Taken {
    fn pop(&mut self, queue: &Queue) -> Option<(u64, TelemetryMessage)> {
        self.waiting
            .pop_front()
            .or_else(|| queue.take_batch(1).pop())
    }

    /// The next hub message and the queue records it carries: one message, or a batch of the
    /// consecutive readings of a batching source. A batch is sent once it is full, the next
    /// queued record is another source's, or the first reading waited `max_delay`.
    async fn next_hub_message(
        &mut self,
        queue: &Queue,
        plan: &Batching,
    ) -> (Vec<u64>, TelemetryMessage) {
        let first = match self.waiting.pop_front() {
            Some(first) => first,
            None => queue.next().await,
        };
        let Some(spec) = plan.spec_for(&first.1).cloned() else {
            return (vec![first.0], first.1);
        };
        let source = batch::source_of(&first.1).map(str::to_owned);
        let deadline = Instant::now() + spec.max_delay;
        // Raw bytes taken that surely fill a batch: a reading takes at least its body and
        // properties in it; gzip rarely packs JSON more than 16 to 1.
        let enough = if spec.gzip {
            spec.max_bytes * 16
        } else {
            spec.max_bytes
        };
        let mut readings = vec![first];
        let mut raw = raw_size(&readings[0].1);
        let mut checked = 0;
        'gather: loop {
            while raw < enough {
                let Some(next) = self.pop(queue) else { break };
                if batch::source_of(&next.1).map(str::to_owned) != source {
                    self.waiting.push_front(next);
                    break 'gather;
                }
                raw += raw_size(&next.1);
                readings.push(next);
            }
            if raw >= enough {
                break;
            }
            // Nothing more queued: full already? (Looked at again once a few more came, as
            // gzip costs CPU.)
            if !spec.gzip || readings.len() > checked + checked / 8 {
                let messages: Vec<_> = readings.iter().map(|(_, m)| m.clone()).collect();
                if batch::pack(&messages, &spec).0 < messages.len() {
                    break;
                }
                checked = readings.len();
            }
            match tokio::time::timeout_at(deadline, queue.next()).await {
                Ok(next) => self.waiting.push_back(next),
                Err(_) => break,
            }
        }
        let messages: Vec<_> = readings.iter().map(|(_, m)| m.clone()).collect();
        let (count, message) = batch::pack(&messages, &spec);
        for unsent in readings.drain(count..).rev() {
            self.waiting.push_front(unsent);
        }
        (readings.into_iter().map(|(seq, _)| seq).collect(), message)
    }
}

fn raw_size(message: &TelemetryMessage) -> usize {
    message.body.len()
        + message
            .properties
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
}
