//! A plugin's messages on their way into the durable queue: the rate and size limits, the
//! `source` property, and the messages held back, in order, while the queue cannot take them.
//! A plugin's publish is answered only once its message is on disk (or refused).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hubagent_plugin_sdk::abi;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::PluginStatus;
use super::library::PluginMessage;
use crate::config::plugin::{Kind, PluginSpec};
use crate::message::TelemetryMessage;
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
    /// Messages not queued yet, in order, with the answer their publish waits for: the queue is
    /// full (`reject-new`) or the disk is, or (exec plugins) the message waits for its rate.
    held: VecDeque<(TelemetryMessage, oneshot::Sender<i32>)>,
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
        for (_, reply) in self.held.drain(..) {
            let _ = reply.send(abi::ERR_STOPPING);
        }
    }

    /// When the held messages are to be tried again; `None` when none are held.
    pub fn retry_at(&self) -> Option<Instant> {
        (!self.held.is_empty()).then_some(self.retry_at)
    }

    /// Takes a plugin's message; `reply` gets the code its publish returns.
    pub fn publish(&mut self, message: PluginMessage, reply: oneshot::Sender<i32>) {
        match self.admit(message) {
            Ok(message) => {
                self.held.push_back((message, reply));
                if self.held.len() == 1 {
                    self.flush();
                }
            }
            Err(code) => {
                let _ = reply.send(code);
            }
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
            message_id: uuid::Uuid::new_v4().to_string(),
            body: message.body.into(),
            content_type: message.content_type,
            content_encoding: message.content_encoding,
            creation_time: Some(
                message
                    .creation_time
                    .unwrap_or_else(crate::util::time::now_rfc3339),
            ),
            properties,
        })
    }

    /// Queues held messages in order, answering each plugin publish once its message is on
    /// disk; stops at the first that has to wait and sets `retry_at`.
    pub fn flush(&mut self) {
        while let Some((message, _)) = self.held.front() {
            let now = Instant::now();
            if self.paced {
                let wait = self.rate.wait_time(now);
                if !wait.is_zero() {
                    self.retry_at = now + wait;
                    return;
                }
            }
            let queued = if self.injected.drops_next() {
                tracing::debug!(plugin = %self.name, message_id = %message.message_id, "fault injection: acknowledged, not queued");
                Ok(())
            } else {
                self.publisher.try_publish(message)
            };
            let code = match queued {
                Ok(()) => {
                    self.injected.acknowledged();
                    abi::OK
                }
                Err(QueueError::TooLarge(size)) => {
                    tracing::error!(plugin = %self.name, message_id = %message.message_id, size, "message too large to queue; dropped");
                    abi::ERR_TOO_LARGE
                }
                Err(e) => {
                    self.hold_back(e.to_string());
                    self.retry_at = now + HELD_RETRY;
                    return;
                }
            };
            if self.paced {
                self.rate.take(now);
            }
            let (_, reply) = self.held.pop_front().expect("front exists");
            self.front_counted = false;
            let _ = reply.send(code);
            if code == abi::OK {
                self.count(|s| s.published += 1);
            } else {
                self.count(|s| s.dropped += 1);
            }
            if self.held_back.take().is_some() {
                tracing::info!(plugin = %self.name, "the queue has room again; telemetry flows");
            }
        }
    }

    /// The queue refused the front message for now: counted once, logged once per reason.
    fn hold_back(&mut self, why: String) {
        if !self.front_counted {
            self.publisher.note_held_back();
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

    fn acknowledged(&mut self) {
        self.in_run += 1;
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

    fn acknowledged(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

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
