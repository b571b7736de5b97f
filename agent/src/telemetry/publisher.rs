//! The enqueuing side of the durable queue: what plugins publish through.

use std::sync::Arc;

use super::queue::{Queue, QueueError};
use crate::message::TelemetryMessage;

/// What telemetry sources publish through: a message is on disk in the queue when `try_publish`
/// returns `Ok`. A full queue with `full_policy = "reject-new"` or a full disk is an error the
/// caller holds its source back on (the plugin supervisor retries while it keeps serving the
/// plugin); nothing already queued is touched.
#[derive(Clone)]
pub struct DurablePublisher {
    queue: Arc<Queue>,
}

impl DurablePublisher {
    pub fn new(queue: Arc<Queue>) -> Self {
        DurablePublisher { queue }
    }

    pub fn try_publish(&self, message: &TelemetryMessage) -> Result<(), QueueError> {
        self.queue.push(message).map(|_| ())
    }

    /// Queues `messages` with one write, all or none (`Queue::push_batch`).
    pub fn try_publish_batch(&self, messages: &[TelemetryMessage]) -> Result<(), QueueError> {
        self.queue.push_batch(messages).map(|_| ())
    }

    /// A source's message had to wait for room (full disk, or a full `reject-new` queue);
    /// counted once per message in the queue's `held_back`.
    pub fn note_held_back(&self) {
        self.queue.note_held_back();
    }
}
