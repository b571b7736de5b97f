//! Telemetry on its way to the hub: sources publish through `publisher` into the durable `queue`
//! (on disk before the publish returns), and `pump` hands the queue to the current hub session,
//! removing a message only when the hub acknowledged it. docs/queue.md has the rules.

pub mod batch;
pub mod publisher;
pub mod pump;
pub mod queue;
mod record;

pub use batch::Batching;
pub use publisher::DurablePublisher;
pub use queue::{Queue, QueueError, QueueSettings, QueueStats};
