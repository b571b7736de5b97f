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
        self.syncing(|| self.queue.push(message).map(|_| ()))
    }

    /// Queues `messages` with one write, all or none (`Queue::push_batch`).
    pub fn try_publish_batch(&self, messages: &[TelemetryMessage]) -> Result<(), QueueError> {
        self.syncing(|| self.queue.push_batch(messages).map(|_| ()))
    }

    /// Runs a push. With `fsync = "always"` it waits for a sync of the disk (milliseconds, more
    /// on an SD card); the push hands its worker thread (bin/hubagent/main.rs) to another thread
    /// for its length (tokio's `block_in_place`), so that the tasks of that worker (the hub
    /// session, the other plugins) go on meanwhile. Other policies write to the
    /// page cache only: no hand-over, which would cost more than the write.
    fn syncing<T>(&self, push: impl FnOnce() -> T) -> T {
        use tokio::runtime::{Handle, RuntimeFlavor};
        if !self.queue.syncs_each_push() {
            return push();
        }
        // block_in_place needs a multi-threaded runtime (the daemon's; not a test's own).
        let multi_threaded = Handle::try_current()
            .is_ok_and(|runtime| runtime.runtime_flavor() == RuntimeFlavor::MultiThread);
        match multi_threaded {
            true => tokio::task::block_in_place(push),
            false => push(),
        }
    }

    /// A source's message had to wait for room (full disk, or a full `reject-new` queue);
    /// counted once per message in the queue's `held_back`.
    pub fn note_held_back(&self) {
        self.queue.note_held_back();
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::config::FsyncPolicy;
    use crate::telemetry::QueueSettings;

    fn always(dir: &std::path::Path) -> Arc<Queue> {
        let settings = QueueSettings {
            fsync: FsyncPolicy::Always,
            ..QueueSettings::default()
        };
        Arc::new(Queue::open(dir, settings).unwrap().0)
    }

    fn reading() -> TelemetryMessage {
        TelemetryMessage {
            message_id: "m-1".into(),
            body: "{}".into(),
            content_type: None,
            content_encoding: None,
            creation_time: None,
            properties: vec![],
        }
    }

    #[test]
    fn a_push_waiting_for_its_sync_leaves_the_one_worker_to_the_other_tasks() {
        let dir = tempfile::tempdir().unwrap();
        let queue = always(dir.path());
        let publisher = DurablePublisher::new(queue.clone());
        // One worker: the hand-over is all that lets another task run.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        // The push writes, then waits at the gate for its sync, as on a slow disk.
        queue.leader_gate.set_closed(true);
        let push = runtime.spawn(async move { publisher.try_publish(&reading()) });
        let deadline = Instant::now() + Duration::from_secs(30);
        while queue.stats().pushed < 1 {
            assert!(Instant::now() < deadline, "the push did not write");
            std::thread::sleep(Duration::from_millis(1));
        }
        let (ran, other_ran) = std::sync::mpsc::channel();
        runtime.spawn(async move { ran.send(()).unwrap() });
        // Bounded: without the hand-over the worker stays blocked until the gate opens.
        let other_ran = other_ran.recv_timeout(Duration::from_secs(10)).is_ok();
        let synced_then = queue.stats().syncs;
        queue.leader_gate.set_closed(false);
        runtime.block_on(push).unwrap().unwrap();
        assert!(
            other_ran,
            "another task ran while the push waited for its sync"
        );
        assert_eq!(synced_then, 0, "the push was still waiting then");
        assert_eq!(queue.stats().syncs, 1);
    }

    #[tokio::test]
    async fn a_push_on_a_single_threaded_runtime_syncs_in_place() {
        // Where block_in_place is not allowed (a test's runtime), the push still syncs.
        let dir = tempfile::tempdir().unwrap();
        let queue = always(dir.path());
        DurablePublisher::new(queue.clone())
            .try_publish_batch(&[reading(), reading()])
            .unwrap();
        assert_eq!(queue.stats().syncs, 1);
    }
}
