//! Capped exponential backoff with jitter: how every retry loop of the agent (DPS registration,
//! hub reconnects, a refused credential) spaces its attempts.

use std::time::Duration;

/// Capped exponential backoff with full jitter.
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            attempt: 0,
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        self.next_delay_within(self.max)
    }

    /// The next delay as [`Backoff::next_delay`], but grown to at most `cap` (and the backoff's
    /// own maximum) before the jitter: a kind of failure that deserves a shorter cap keeps its
    /// jitter rather than becoming a fixed interval. The step counts as a step of this backoff.
    pub fn next_delay_within(&mut self, cap: Duration) -> Duration {
        let exp = self
            .initial
            .saturating_mul(2u32.saturating_pow(self.attempt.min(16)))
            .min(self.max)
            .min(cap);
        self.attempt += 1;
        // Half fixed, half random: spreads a fleet reconnecting after an outage.
        let half = exp / 2;
        half + half.mul_f64(rand::random::<f64>())
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
        let delays: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(500) && delays[0] <= Duration::from_secs(1));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(10)));
        assert!(
            delays[7] >= Duration::from_secs(5),
            "capped at 10 s, at least half of it"
        );
        b.reset();
        assert!(b.next_delay() <= Duration::from_secs(1));
    }

    #[test]
    fn a_shorter_cap_keeps_the_jitter_and_the_growth_goes_on_beneath_it() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(300));
        let capped: Vec<Duration> = (0..12)
            .map(|_| b.next_delay_within(Duration::from_secs(8)))
            .collect();
        assert!(
            capped.iter().all(|d| *d <= Duration::from_secs(8)),
            "{capped:?}"
        );
        let late = &capped[4..];
        assert!(
            late.iter().all(|d| *d >= Duration::from_secs(4)),
            "at the cap, half of it at least: {capped:?}"
        );
        assert!(late.iter().any(|d| *d != late[0]), "no jitter: {capped:?}");
        // The steps counted: without the cap, the next delay is the grown one.
        assert!(b.next_delay() >= Duration::from_secs(150));
    }
}
