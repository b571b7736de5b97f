//! A plugin's messages on their way into the durable queue: the rate and size limits, the
//! `source` property, and the messages held back, in order, while the queue cannot take them.
//! A plugin's publish is answered only once its message is on disk (or refused).
//!
//! A batch (ABI 1.3 `publish_batch`) is checked message by message: one over the rate or too
//! large is refused alone, with its own code, and the rest are queued together with one write
//! (`Queue::push_batch`), in order, after whatever the plugin published before.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hubagent_plugin_sdk::abi;
use tokio::time::Instant;

use super::PluginStatus;
use super::answer::Answer;
use super::library::PluginMessage;
use crate::config::plugin::{Kind, PluginSpec};
use crate::message::TelemetryMessage;
use crate::telemetry::batch::{ReadingIds, now_millis_rfc3339};
use crate::telemetry::{DurablePublisher, QueueError};

/// How often a message held back by a full queue is tried again.
const HELD_RETRY: Duration = Duration::from_millis(250);

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Option<Instant>,
}

impl TokenBucket {
    pub fn new(rate: f64, burst: f64) -> TokenBucket {
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: None,
        }
    }

    /// How long until a token is available (zero when one is).
    pub fn wait_time(&mut self, now: Instant) -> Duration {
        self.refill(now);
        if self.tokens >= 1.0 || self.rate <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((1.0 - self.tokens) / self.rate)
        }
    }

    fn refill(&mut self, now: Instant) {
        if let Some(last) = self.last {
            let elapsed = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        }
        self.last = Some(now);
    }

    pub fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A publish (one message) or the accepted messages of a batch, waiting to be queued.
struct Held {
    messages: VecDeque<TelemetryMessage>,
    reply: Reply,
    /// Queue the messages one by one: the queue refused them together as too large, so each
    /// gets its own answer.
    one_at_a_time: bool,
}

/// Who waits for a [`Held`].
enum Reply {
    One(Answer<i32>, i32),
    /// A batch: the code of every message it had (those refused up front already set), and
    /// the places in it of the messages still held.
    Batch {
        codes: Vec<i32>,
        slots: VecDeque<usize>,
        reply: Answer<Vec<i32>>,
    },
}

impl Held {
    fn one(message: TelemetryMessage, reply: Answer<i32>) -> Held {
        Held {
            messages: VecDeque::from([message]),
            reply: Reply::One(reply, abi::ERR_STOPPING),
            one_at_a_time: false,
        }
    }

    /// The front message is done with `code`.
    fn answer_front(&mut self, code: i32) {
        self.messages.pop_front();
        match &mut self.reply {
            Reply::One(_, answer) => *answer = code,
            Reply::Batch { codes, slots, .. } => {
                if let Some(slot) = slots.pop_front() {
                    codes[slot] = code;
                }
            }
        }
    }

    /// Every message is done: the publish returns.
    fn finish(self) {
        match self.reply {
            Reply::One(reply, code) => reply.send(code),
            Reply::Batch { codes, reply, .. } => reply.send(codes),
        }
    }

    /// The messages still held will not be queued: they are answered "stopping".
    fn stopping(mut self) {
        while !self.messages.is_empty() {
            self.answer_front(abi::ERR_STOPPING);
        }
        self.finish();
    }
}

/// One plugin's way into the queue; it outlives the plugin's runs (the rate carries over).
pub struct Outlet {
    name: String,
    /// An exec plugin writes into a pipe the agent reads one message at a time, so over its
    /// rate it is held back rather than dropped: lines it wrote while the queue was full are
    /// not lost when they come in a burst.
    paced: bool,
    max_message_size: usize,
    publisher: DurablePublisher,
    status: Arc<Mutex<PluginStatus>>,
    rate: TokenBucket,
    /// The message ids of its readings: one base, numbered on (a batch carries them as a run).
    ids: ReadingIds,
    /// Messages not queued yet, in order, with the answer their publish waits for: the queue is
    /// full (`reject-new`) or the disk is, or (exec plugins) the message waits for its rate.
    held: VecDeque<Held>,
    /// Why `held` is waiting for the queue, once logged.
    held_back: Option<String>,
    /// The front of `held` was counted in the queue's `held_back` (each message once).
    front_counted: bool,
    retry_at: Instant,
    /// Test builds only (feature `fault-injection`): messages acknowledged and not queued.
    injected: InjectedLoss,
}

impl Outlet {
    pub fn new(
        spec: &PluginSpec,
        publisher: DurablePublisher,
        status: Arc<Mutex<PluginStatus>>,
        max_message_size: usize,
    ) -> Outlet {
        Outlet {
            name: spec.name.clone(),
            paced: matches!(spec.kind, Kind::Exec { .. }),
            max_message_size,
            publisher,
            status,
            rate: TokenBucket::new(spec.limits.max_rate, spec.limits.burst),
            ids: ReadingIds::default(),
            held: VecDeque::new(),
            held_back: None,
            front_counted: false,
            retry_at: Instant::now(),
            injected: InjectedLoss::from_env(&spec.name),
        }
    }

    fn count(&self, f: impl FnOnce(&mut PluginStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// A new run starts: whatever the last one left unqueued was never acknowledged to it.
    pub fn reset(&mut self) {
        self.injected.new_run();
        self.held.clear();
        self.held_back = None;
        self.front_counted = false;
    }

    /// Answers every held publish with "stopping": the plugin is stopping and these were not
    /// queued.
    pub fn release(&mut self) {
        for held in self.held.drain(..) {
            held.stopping();
        }
    }

    /// Answers "stopping" the publishes held because the queue cannot take them now (full, or
    /// the disk; the plugin is stopping and will not wait for room); those waiting only for an
    /// exec plugin's rate stay held.
    pub fn release_held_back(&mut self) {
        if self.held_back.is_some() {
            self.release();
        }
    }

    /// The plugin has ended: what it is held back on for its rate (an exec plugin's line the
    /// agent read) is queued now; there is nothing left to pace.
    pub fn flush_unpaced(&mut self) {
        self.queue_held(false);
    }

    /// When the held messages are to be tried again; `None` when none are held.
    pub fn retry_at(&self) -> Option<Instant> {
        (!self.held.is_empty()).then_some(self.retry_at)
    }

    /// Takes a plugin's message; `reply` gets the code its publish returns.
    pub fn publish(&mut self, message: PluginMessage, reply: Answer<i32>) {
        match self.admit(message) {
            Ok(message) => self.hold(Held::one(message, reply)),
            Err(code) => reply.send(code),
        }
    }

    /// Takes a batch (ABI 1.3); `reply` gets each message's code, in order. Each message is
    /// checked alone; the accepted ones are queued together.
    pub fn publish_batch(&mut self, messages: Vec<PluginMessage>, reply: Answer<Vec<i32>>) {
        let mut codes = Vec::with_capacity(messages.len());
        let mut slots = VecDeque::new();
        let mut accepted = VecDeque::new();
        for (slot, message) in messages.into_iter().enumerate() {
            match self.admit(message) {
                Ok(message) => {
                    codes.push(abi::ERR_STOPPING);
                    slots.push_back(slot);
                    accepted.push_back(message);
                }
                Err(code) => codes.push(code),
            }
        }
        if accepted.is_empty() {
            reply.send(codes);
            return;
        }
        self.hold(Held {
            messages: accepted,
            reply: Reply::Batch {
                codes,
                slots,
                reply,
            },
            one_at_a_time: false,
        });
    }

    /// Queues `held` after those already waiting.
    fn hold(&mut self, held: Held) {
        self.held.push_back(held);
        if self.held.len() == 1 {
            self.flush();
        }
    }

    /// Checks a message against the plugin's limits; the message to queue, or the code its
    /// publish returns at once. Exec plugins are paced instead (see `flush`).
    fn admit(&mut self, message: PluginMessage) -> Result<TelemetryMessage, i32> {
        if !self.paced && !self.rate.take(Instant::now()) {
            self.count(|s| s.dropped += 1);
            return Err(abi::ERR_RATE_LIMITED);
        }
        let size = message.body.len()
            + message
                .properties
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>();
        if size > self.max_message_size {
            self.count(|s| s.dropped += 1);
            return Err(abi::ERR_TOO_LARGE);
        }
        let mut properties = message.properties;
        if !properties.iter().any(|(k, _)| k == "source") {
            properties.push(("source".into(), self.name.clone()));
        }
        Ok(TelemetryMessage {
            message_id: self.ids.next_id(),
            body: message.body.into(),
            content_type: message.content_type,
            content_encoding: message.content_encoding,
            creation_time: Some(message.creation_time.unwrap_or_else(now_millis_rfc3339)),
            properties,
        })
    }

    /// Queues held messages in order, answering each plugin publish once its message is on
    /// disk; stops at the first that has to wait and sets `retry_at`.
    pub fn flush(&mut self) {
        self.queue_held(self.paced);
    }

    /// `flush`, waiting for the plugin's rate when `paced`.
    fn queue_held(&mut self, paced: bool) {
        while let Some(front) = self.held.front() {
            let now = Instant::now();
            if paced {
                let wait = self.rate.wait_time(now);
                if !wait.is_zero() {
                    self.retry_at = now + wait;
                    return;
                }
            }
            let together = front.messages.len() > 1 && !front.one_at_a_time;
            let result = match together {
                true => self.queue_front_batch(),
                false => self.queue_front_message(),
            };
            let codes = match result {
                Ok(codes) => codes,
                Err(QueueError::TooLarge(size)) if together => {
                    // One of them is over the queue's record limit: each gets its own answer.
                    tracing::warn!(plugin = %self.name, size, "a batch is too large to queue together; queueing its messages one by one");
                    self.held.front_mut().expect("front exists").one_at_a_time = true;
                    continue;
                }
                Err(e) => {
                    self.hold_back(e.to_string());
                    self.retry_at = now + HELD_RETRY;
                    return;
                }
            };
            if paced {
                self.rate.take(now);
            }
            self.front_counted = false;
            let published = codes.iter().filter(|&&c| c == abi::OK).count() as u64;
            let dropped = codes.len() as u64 - published;
            // Counted before the plugin hears: what it was told is in the status it reads next.
            self.count(|s| {
                s.published += published;
                s.dropped += dropped;
            });
            let front = self.held.front_mut().expect("front exists");
            for code in codes {
                front.answer_front(code);
            }
            if front.messages.is_empty() {
                self.held.pop_front().expect("front exists").finish();
            }
            if self.held_back.take().is_some() {
                tracing::info!(plugin = %self.name, "the queue has room again; telemetry flows");
            }
        }
    }

    /// Queues the front message of the front publish alone: its code, or the queue's error
    /// when it has to wait.
    fn queue_front_message(&mut self) -> Result<Vec<i32>, QueueError> {
        let message = self.held[0]
            .messages
            .front()
            .expect("a held publish has messages");
        let queued = if self.injected.drops_next() {
            tracing::debug!(plugin = %self.name, message_id = %message.message_id, "fault injection: acknowledged, not queued");
            Ok(())
        } else {
            self.publisher.try_publish(message)
        };
        match queued {
            Ok(()) => {
                self.injected.acknowledged(1);
                Ok(vec![abi::OK])
            }
            Err(QueueError::TooLarge(size)) => {
                tracing::error!(plugin = %self.name, message_id = %message.message_id, size, "message too large to queue; dropped");
                Ok(vec![abi::ERR_TOO_LARGE])
            }
            Err(e) => Err(e),
        }
    }

    /// Queues every message of the front batch with one write (all or none).
    fn queue_front_batch(&mut self) -> Result<Vec<i32>, QueueError> {
        let messages = self.held[0].messages.make_contiguous();
        let count = messages.len();
        let queued = self.injected.queued_of(count);
        if queued < count {
            tracing::debug!(plugin = %self.name, count = count - queued, "fault injection: acknowledged, not queued");
        }
        if queued > 0 {
            self.publisher.try_publish_batch(&messages[..queued])?;
        }
        self.injected.acknowledged(count as u64);
        Ok(vec![abi::OK; count])
    }

    /// The queue refused the front message for now: counted once, logged once per reason.
    fn hold_back(&mut self, why: String) {
        if !self.front_counted {
            let waiting = match self.held.front() {
                Some(h) if !h.one_at_a_time => h.messages.len(),
                _ => 1,
            };
            for _ in 0..waiting {
                self.publisher.note_held_back();
            }
            self.front_counted = true;
        }
        if self.held_back.as_ref() != Some(&why) {
            tracing::warn!(plugin = %self.name, "telemetry held back: {why}");
            self.held_back = Some(why);
        }
    }
}

/// The test-only switch of feature `fault-injection`: `HUBAGENT_TEST_DROP_AFTER=<plugin>:<n>`
/// makes the outlet of `<plugin>` answer every publish after the `n`-th of a run with "accepted"
/// without queueing the message: the loss the tests' delivery checks must see (a lost tail is
/// invisible to a check that only looks for gaps). Without the feature the variable is never read
/// and this is inert.
#[derive(Debug, Default)]
struct InjectedLoss {
    #[cfg(feature = "fault-injection")]
    after: Option<u64>,
    #[cfg(feature = "fault-injection")]
    in_run: u64,
}

#[cfg(feature = "fault-injection")]
impl InjectedLoss {
    const VARIABLE: &str = "HUBAGENT_TEST_DROP_AFTER";

    fn from_env(plugin: &str) -> InjectedLoss {
        let setting = std::env::var(Self::VARIABLE).unwrap_or_default();
        let after = setting
            .rsplit_once(':')
            .filter(|(name, _)| *name == plugin)
            .map(|(_, n)| {
                n.parse::<u64>().unwrap_or_else(|_| {
                    panic!("{}={setting}: expected <plugin>:<count>", Self::VARIABLE)
                })
            });
        if let Some(n) = after {
            tracing::warn!(
                plugin,
                "fault injection ({}): every message after the {n}th of each run is acknowledged and not queued",
                Self::VARIABLE
            );
        }
        InjectedLoss { after, in_run: 0 }
    }

    fn new_run(&mut self) {
        self.in_run = 0;
    }

    fn drops_next(&self) -> bool {
        self.after.is_some_and(|n| self.in_run >= n)
    }

    /// How many of the next `count` acknowledged messages are really queued.
    fn queued_of(&self, count: usize) -> usize {
        match self.after {
            Some(n) => (n.saturating_sub(self.in_run) as usize).min(count),
            None => count,
        }
    }

    fn acknowledged(&mut self, count: u64) {
        self.in_run += count;
    }
}

#[cfg(not(feature = "fault-injection"))]
impl InjectedLoss {
    fn from_env(_plugin: &str) -> InjectedLoss {
        InjectedLoss {}
    }

    fn new_run(&mut self) {}

    fn drops_next(&self) -> bool {
        false
    }

    fn queued_of(&self, count: usize) -> usize {
        count
    }

    fn acknowledged(&mut self, _count: u64) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::{Queue, QueueSettings};

    fn reading(n: u8) -> PluginMessage {
        PluginMessage {
            body: vec![n],
            content_type: None,
            content_encoding: None,
            properties: vec![],
            creation_time: None,
        }
    }

    #[test]
    fn a_stopping_exec_plugins_line_waits_for_its_rate_and_is_queued_once_it_ended() {
        let dir = tempfile::tempdir().unwrap();
        let queue = Arc::new(Queue::open(dir.path(), QueueSettings::default()).unwrap().0);
        let table: toml::Table = toml::from_str(
            "name = \"e\"\nkind = \"exec\"\ncommand = [\"true\"]\nmax_rate = 0.001\nburst = 1\n",
        )
        .unwrap();
        let spec = PluginSpec::from_table(&table).unwrap();
        let status = Arc::new(Mutex::new(PluginStatus::default()));
        let mut outlet = Outlet::new(&spec, DurablePublisher::new(queue.clone()), status, 1024);
        // Answers are given as the outlet decides: no waiting here.
        let (first, mut first_answer) = Answer::channel();
        outlet.publish(reading(1), first);
        assert_eq!(
            first_answer.try_recv(),
            Ok(abi::OK),
            "the burst's one token"
        );
        let (second, mut second_answer) = Answer::channel();
        outlet.publish(reading(2), second);
        assert!(outlet.retry_at().is_some(), "held for the rate");
        // The plugin stops: a line held for its rate is not refused…
        outlet.release_held_back();
        assert!(second_answer.try_recv().is_err(), "still held");
        // …and once it has ended it is queued, not dropped.
        outlet.flush_unpaced();
        assert_eq!(
            second_answer.try_recv(),
            Ok(abi::OK),
            "queued after the end"
        );
        assert_eq!(queue.stats().pushed, 2);
    }

    #[test]
    fn token_bucket_allows_burst_then_rate() {
        let mut b = TokenBucket::new(10.0, 5.0);
        let t0 = Instant::now();
        assert_eq!((0..8).filter(|_| b.take(t0)).count(), 5);
        // 0.35 s later: 3.5 tokens, so 3 more.
        let t1 = t0 + Duration::from_millis(350);
        assert_eq!((0..8).filter(|_| b.take(t1)).count(), 3);
        // Long quiet: capped at the burst.
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!((0..100).filter(|_| b.take(t2)).count(), 5);
        // Empty: the next token is 0.1 s away, half of it after 50 ms.
        assert_eq!(b.wait_time(t2), Duration::from_millis(100));
        let t3 = t2 + Duration::from_millis(50);
        assert_eq!(b.wait_time(t3).as_millis(), 50);
        assert!(!b.take(t3));
        assert!(b.wait_time(t3 + Duration::from_millis(50)).is_zero());
    }
}
