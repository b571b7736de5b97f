//! Renewing an issued certificate (`[provisioning.issued_certificate]`) while the hub session
//! runs on the current one: at `renew_at` of its lifetime, or on `hubagent reprovision`, one DPS
//! registration with a new key's CSR runs beside the session. Success stores the new generation
//! and the daemon starts over with it (the old generation stays on disk until the new one has
//! connected); failure keeps the current certificate in use and tries again with backoff.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::Config;
use crate::mqtt::AutoRoute;
use crate::provisioning::{self, Assignment, DeviceIdentity, dps::DpsError};
use crate::util::backoff::Backoff;
use crate::util::time::unix_now;

type Attempt = JoinHandle<Result<(Assignment, DeviceIdentity), DpsError>>;

/// The renewal schedule of one session.
pub(super) struct Renewal {
    /// When the next attempt starts; `None` without an issued certificate.
    due: Option<Instant>,
    attempt: Option<Attempt>,
    backoff: Backoff,
}

impl Renewal {
    /// The schedule for the issued generation `identity` presents (none without one).
    pub(super) fn new(config: &Config, identity: &DeviceIdentity) -> Renewal {
        let due = match (&config.provisioning.issued_certificate, &identity.issued) {
            (Some(wanted), Some(issued)) => {
                let at = issued.generation.renew_time(wanted.renew_at);
                let now = i64::try_from(unix_now()).unwrap_or(i64::MAX);
                let wait = u64::try_from(at - now).unwrap_or(0);
                Some(Instant::now() + Duration::from_secs(wait))
            }
            _ => None,
        };
        Renewal {
            due,
            attempt: None,
            backoff: Backoff::new(Duration::from_secs(2), Duration::from_secs(300)),
        }
    }

    /// Whether this session renews an issued certificate (else `reprovision` ends the session).
    pub(super) fn applies(&self) -> bool {
        self.due.is_some()
    }

    /// Starts an attempt now (`hubagent reprovision`), unless one is running.
    pub(super) fn now(&mut self) {
        if self.due.is_some() && self.attempt.is_none() {
            self.due = Some(Instant::now());
        }
    }

    /// Resolves when an attempt is due (never while one runs or without an issued certificate).
    pub(super) fn due(&self) -> impl Future<Output = ()> + 'static {
        let at = self.due.filter(|_| self.attempt.is_none());
        async move {
            match at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        }
    }

    /// Starts the registration with a new CSR beside the session.
    pub(super) fn start(
        &mut self,
        config: &Config,
        identity: &DeviceIdentity,
        auto: Option<Arc<AutoRoute>>,
    ) {
        let config = config.clone();
        let mut identity = identity.clone();
        tracing::info!("renewing the issued certificate through DPS");
        self.attempt = Some(tokio::spawn(async move {
            let assignment =
                provisioning::register_once(&config, &mut identity, auto.as_deref()).await?;
            Ok((assignment, identity))
        }));
    }

    /// Resolves with the outcome of the running attempt.
    pub(super) async fn finished(&mut self) -> Result<(Assignment, DeviceIdentity), DpsError> {
        let Some(attempt) = self.attempt.as_mut() else {
            return std::future::pending().await;
        };
        let outcome = attempt
            .await
            .unwrap_or_else(|e| Err(DpsError::Protocol(format!("the renewal task failed: {e}"))));
        self.attempt = None;
        outcome
    }

    /// After a failed attempt: when to try again (the current certificate stays in use).
    pub(super) fn failed(&mut self) -> Duration {
        let delay = self.backoff.next_delay();
        self.due = Some(Instant::now() + delay);
        delay
    }
}

impl Drop for Renewal {
    /// A session that ends abandons its attempt: the next start decides afresh.
    fn drop(&mut self) {
        if let Some(attempt) = self.attempt.take() {
            attempt.abort();
        }
    }
}
