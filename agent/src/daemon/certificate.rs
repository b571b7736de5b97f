//! The identity certificate over time: where it stands against its validity period, told to the
//! operator when it changes (the log), and always visible (`hubagent status`, the twin). Checked at
//! every start, hourly while the daemon runs (days left) and at the moment its state changes, so a
//! gateway left alone for months warns as soon as its certificate enters the warning lead time
//! (`expiry_warning`) and says so again when it expires.

use std::time::Duration;

use serde_json::{Value, json};

use super::Daemon;
use super::status::CertificateStatus;
use crate::identity::x509::{Expiry, Validity};
use crate::util::time::unix_now;

/// How often a running daemon looks at the certificate again at the latest.
const CERTIFICATE_CHECK_EVERY: Duration = Duration::from_secs(3600);

/// What was last said about the certificate, so each state (and each day of the warning period)
/// is logged once, not every hour.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct LastSaid(Option<(&'static str, i64)>);

impl LastSaid {
    /// A valid certificate is worth one line; an expiring one a line a day.
    fn of(expiry: Expiry) -> LastSaid {
        match expiry {
            Expiry::Expiring { days_left } => LastSaid(Some((expiry.name(), days_left))),
            _ => LastSaid(Some((expiry.name(), 0))),
        }
    }
}

impl Daemon {
    /// An issued generation has connected to the hub: it becomes `current` and the older ones
    /// are removed (until now they were kept, in case the new one did not work).
    pub(super) fn issued_generation_connected(&mut self) {
        let Some(issued) = self.identity.as_ref().and_then(|i| i.issued.as_ref()) else {
            return;
        };
        let number = issued.generation.number;
        let store = crate::identity::issued::Store::new(&self.config.agent.state_dir);
        if store.current() != Some(number) {
            crate::util::test_hook::abort_at("issued-connected");
            match store.promote(number) {
                Ok(()) => tracing::info!(
                    generation = number,
                    "the issued certificate connected to the hub; it is now the current one and the older ones are removed"
                ),
                Err(e) => tracing::error!(
                    "cannot record issued certificate generation {number} as current: {e}"
                ),
            }
        }
        // After the files: whoever sees the generation in the status finds it current on disk.
        self.status.update(|s| s.issued_generation = Some(number));
    }

    /// Re-reads where the identity certificate stands; logs when that changed; updates status.
    /// Returns when to look again: in an hour, or sooner when the state changes before then.
    pub(super) fn check_certificate(&mut self) -> Duration {
        let (Some(identity), Some(lead)) =
            (&self.identity, self.config.certificate_expiry_warning())
        else {
            self.status.update(|s| s.certificate = None);
            return CERTIFICATE_CHECK_EVERY;
        };
        let Some(validity) = identity.hub_credential().0.certificate_validity() else {
            return CERTIFICATE_CHECK_EVERY;
        };
        // An issued certificate renews itself: it is 'expiring' once its renewal is overdue.
        let lead = match (
            &identity.issued,
            &self.config.provisioning.issued_certificate,
        ) {
            (Some(issued), Some(wanted)) => Duration::from_secs(
                u64::try_from(validity.not_after - issued.generation.renew_time(wanted.renew_at))
                    .unwrap_or(0),
            ),
            _ => lead,
        };
        let now = i64::try_from(unix_now()).unwrap_or(i64::MAX);
        let next = validity
            .next_change(now, lead)
            .and_then(|at| u64::try_from(at - now).ok())
            .map_or(CERTIFICATE_CHECK_EVERY, |secs| {
                CERTIFICATE_CHECK_EVERY.min(Duration::from_secs(secs))
            });
        let expiry = validity.at(now, lead);
        if self.certificate_said != LastSaid::of(expiry) {
            log_expiry(&validity, expiry);
            self.certificate_said = LastSaid::of(expiry);
        }
        let status = certificate_status(&validity, expiry, now);
        self.status.update(|s| s.certificate = Some(status));
        next
    }
}

fn certificate_status(validity: &Validity, expiry: Expiry, now: i64) -> CertificateStatus {
    CertificateStatus {
        not_before: validity.not_before_rfc3339(),
        not_after: validity.not_after_rfc3339(),
        days_left: (validity.not_after - now).div_euclid(86_400),
        expiry: expiry.name(),
    }
}

fn log_expiry(validity: &Validity, expiry: Expiry) {
    let state = validity.describe(expiry);
    match expiry {
        Expiry::Valid { .. } => tracing::info!("the identity certificate {state}"),
        Expiry::Expiring { .. } => tracing::warn!(
            "the identity certificate {state}: renew it before then, or the hub will refuse the device"
        ),
        Expiry::Expired => {
            tracing::error!("the identity certificate {state}; install a renewed certificate")
        }
        Expiry::NotYetValid => tracing::error!("the identity certificate {state}"),
    }
}

/// `reported.agent.identity`: the certificate's end and state, and which key is in use when a
/// secondary is configured; nothing for a credential without either.
pub(super) fn identity_reported(
    certificate: Option<&CertificateStatus>,
    key: Option<&'static str>,
    issued_generation: Option<u64>,
) -> Option<Value> {
    let mut identity = serde_json::Map::new();
    if let Some(generation) = issued_generation {
        identity.insert("issuedGeneration".into(), json!(generation));
    }
    if let Some(c) = certificate {
        identity.insert("certificateNotAfter".into(), json!(c.not_after));
        identity.insert("daysLeft".into(), json!(c.days_left));
        identity.insert("expiry".into(), json!(c.expiry));
    }
    if let Some(key) = key {
        identity.insert("key".into(), json!(key));
    }
    (!identity.is_empty()).then_some(Value::Object(identity))
}
