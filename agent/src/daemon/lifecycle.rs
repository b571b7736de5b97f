//! The daemon's lifecycle as a state machine: which phase comes next after what happened. No I/O
//! here (in the spirit of rumqttc's `MqttState`): the loop in `daemon/mod.rs` does the work of a
//! phase, tells the machine what came of it, and is told what to do next. The provisioning rules
//! it encodes are in docs/design.md ("Provisioning rules") and docs/architecture.md.

use std::time::Duration;

use crate::util::backoff::Backoff;

/// How long a credential that cannot be loaded (missing file, bad key) waits before the next
/// try: an operator fixes it, or reloads.
pub const CREDENTIAL_RETRY: Duration = Duration::from_secs(60);
/// The least wait after a DPS refusal that is not transient (wrong key, unknown enrollment): an
/// operator may fix the enrollment without touching the gateway, but DPS must not be hammered.
pub const DPS_REFUSAL_RETRY: Duration = Duration::from_secs(60);

/// How long a wait for an unset clock lasts before the clock is looked at again. The wait ends
/// within a second of the clock being set (`daemon/mod.rs`, `wait_for_command`); this only bounds
/// how long a clock set without a step (slewed, which NTP does not do over years) goes unseen.
pub const CLOCK_RECHECK: Duration = Duration::from_secs(60);

/// Where the daemon stands.
#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    /// Load the identity, then take the cached assignment or go to `Register`.
    Start,
    /// Register with DPS (a first registration, a stale cache, or a forced one).
    Register,
    /// A hub session with the assignment is running (connected or reconnecting).
    Session,
    /// Wait `delay` (a command or a step of the wall clock may cut it short), then `then`.
    Wait { delay: Duration, then: Box<Phase> },
    /// Shut down.
    Stopped,
}

/// What happened; the loop reports it with [`Lifecycle::on`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// `Start`: the registration id, credential or TLS configuration could not be loaded.
    IdentityFailed,
    /// `Start`: the cached assignment fits.
    CacheFits,
    /// `Start`: the cache is missing or stale, or a fresh registration is due.
    RegistrationNeeded,
    /// `Register`: DPS assigned the device.
    Registered,
    /// `Register`: the attempt failed; `transient` for network trouble and throttling.
    RegistrationFailed { transient: bool },
    /// `Register` or `Session`, before any attempt (at the start of either, or when a running
    /// session was to reconnect): the wall clock reads a time before this build was made (1970
    /// on a board without an RTC, or a clock fallen back), so no certificate or token can work.
    ClockUnset,
    /// `Session`: the hub accepted the connection.
    Connected,
    /// `Session`: the hub refused the credentials.
    Unauthorized,
    /// `Session`: the session task ended on its own.
    SessionEnded,
    /// The wait is over (its time passed, or the wall clock stepped).
    WaitOver,
    /// `hubagent reprovision`, the `reprovision` direct method.
    Reprovision,
    /// A new configuration was loaded (the loop has already replaced it).
    Reload,
    /// SIGTERM, SIGINT, or the last command sender is gone.
    Shutdown,
}

/// The phase plus what carries over between phases: whether the next provisioning must go to
/// DPS, and the backoffs of the two retry loops.
pub struct Lifecycle {
    phase: Phase,
    force_registration: bool,
    registration_backoff: Backoff,
    unauthorized_backoff: Backoff,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle {
            phase: Phase::Start,
            force_registration: false,
            registration_backoff: Backoff::new(Duration::from_secs(2), Duration::from_secs(300)),
            unauthorized_backoff: Backoff::new(Duration::from_secs(5), Duration::from_secs(300)),
        }
    }
}

impl Lifecycle {
    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    /// Whether `Start` must register with DPS even when the cache fits: after the hub refused
    /// the credentials or a reprovisioning was asked for.
    pub fn registration_forced(&self) -> bool {
        self.force_registration
    }

    /// Moves to the next phase and returns it. An event that does not apply to the current phase
    /// leaves it unchanged.
    pub fn on(&mut self, event: Event) -> &Phase {
        if let Some(next) = self.next(event) {
            self.phase = next;
        }
        &self.phase
    }

    fn next(&mut self, event: Event) -> Option<Phase> {
        use Event::*;
        match (&self.phase, event) {
            (Phase::Stopped, _) => None,
            (_, Shutdown) => Some(Phase::Stopped),
            // The new configuration may change everything below the session: start over.
            (_, Reload) => Some(Phase::Start),

            (Phase::Start, IdentityFailed) => Some(wait(CREDENTIAL_RETRY, Phase::Start)),
            (Phase::Start, CacheFits) => {
                self.force_registration = false;
                Some(Phase::Session)
            }
            (Phase::Start, RegistrationNeeded) => {
                self.registration_backoff.reset();
                Some(Phase::Register)
            }

            // No attempt with a clock that cannot be true: wait for it, then the same phase.
            (Phase::Register, ClockUnset) => Some(wait(CLOCK_RECHECK, Phase::Register)),
            (Phase::Session, ClockUnset) => Some(wait(CLOCK_RECHECK, Phase::Session)),

            (Phase::Register, Registered) => {
                self.force_registration = false;
                Some(Phase::Session)
            }
            (Phase::Register, RegistrationFailed { transient }) => {
                let delay = self.registration_backoff.next_delay();
                let delay = if transient {
                    delay
                } else {
                    delay.max(DPS_REFUSAL_RETRY)
                };
                Some(wait(delay, Phase::Register))
            }

            (Phase::Session, Connected) => {
                self.unauthorized_backoff.reset();
                None
            }
            (Phase::Session, Unauthorized) => {
                self.force_registration = true;
                Some(wait(self.unauthorized_backoff.next_delay(), Phase::Start))
            }
            (Phase::Session, SessionEnded) => Some(Phase::Start),
            (Phase::Session, Reprovision) => {
                self.force_registration = true;
                Some(Phase::Start)
            }

            // A reprovisioning request during a retry wait just ends the wait: the next
            // registration is a fresh one anyway.
            (Phase::Wait { then, .. }, WaitOver | Reprovision) => Some((**then).clone()),
            _ => None,
        }
    }
}

fn wait(delay: Duration, then: Phase) -> Phase {
    Phase::Wait {
        delay,
        then: Box::new(then),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delay_of(phase: &Phase) -> Duration {
        match phase {
            Phase::Wait { delay, .. } => *delay,
            other => panic!("not waiting: {other:?}"),
        }
    }

    #[test]
    fn a_fitting_cache_goes_straight_to_the_session() {
        let mut life = Lifecycle::default();
        assert_eq!(life.phase(), &Phase::Start);
        assert_eq!(life.on(Event::CacheFits), &Phase::Session);
        assert!(!life.registration_forced());
    }

    #[test]
    fn registration_failures_are_retried_with_backoff_and_refusals_slowly() {
        let mut life = Lifecycle::default();
        life.on(Event::RegistrationNeeded);
        let first = delay_of(life.on(Event::RegistrationFailed { transient: true }));
        assert!(first <= Duration::from_secs(2), "{first:?}");
        assert_eq!(life.on(Event::WaitOver), &Phase::Register);
        let refused = delay_of(life.on(Event::RegistrationFailed { transient: false }));
        assert!(refused >= DPS_REFUSAL_RETRY, "{refused:?}");
        assert_eq!(life.on(Event::WaitOver), &Phase::Register);
        assert_eq!(life.on(Event::Registered), &Phase::Session);
    }

    #[test]
    fn a_new_provisioning_pass_starts_its_backoff_afresh() {
        let mut life = Lifecycle::default();
        life.on(Event::RegistrationNeeded);
        for _ in 0..6 {
            life.on(Event::RegistrationFailed { transient: true });
            life.on(Event::WaitOver);
        }
        life.on(Event::Reload);
        life.on(Event::RegistrationNeeded);
        let delay = delay_of(life.on(Event::RegistrationFailed { transient: true }));
        assert!(delay <= Duration::from_secs(2), "{delay:?}");
    }

    #[test]
    fn a_refused_credential_forces_a_registration_after_a_growing_wait() {
        let mut life = Lifecycle::default();
        life.on(Event::CacheFits);
        let first = delay_of(life.on(Event::Unauthorized));
        assert!(first <= Duration::from_secs(5), "{first:?}");
        assert!(life.registration_forced());
        assert_eq!(life.on(Event::WaitOver), &Phase::Start);
        life.on(Event::RegistrationNeeded);
        life.on(Event::Registered);
        assert!(
            !life.registration_forced(),
            "a registration clears the force"
        );
        let second = delay_of(life.on(Event::Unauthorized));
        assert!(second >= Duration::from_millis(5000), "grows: {second:?}");
        life.on(Event::WaitOver);
        life.on(Event::CacheFits);
        life.on(Event::Connected);
        let after_connect = delay_of(life.on(Event::Unauthorized));
        assert!(
            after_connect <= Duration::from_secs(5),
            "a connection resets it: {after_connect:?}"
        );
    }

    #[test]
    fn reprovision_forces_dps_from_a_session_and_ends_a_wait() {
        let mut life = Lifecycle::default();
        life.on(Event::CacheFits);
        assert_eq!(life.on(Event::Reprovision), &Phase::Start);
        assert!(life.registration_forced());

        let mut life = Lifecycle::default();
        life.on(Event::IdentityFailed);
        assert_eq!(delay_of(life.phase()), CREDENTIAL_RETRY);
        assert_eq!(life.on(Event::Reprovision), &Phase::Start);
        assert!(!life.registration_forced());
    }

    #[test]
    fn an_unset_clock_waits_then_tries_the_same_phase_without_spending_backoff() {
        let mut life = Lifecycle::default();
        life.on(Event::RegistrationNeeded);
        assert_eq!(delay_of(life.on(Event::ClockUnset)), CLOCK_RECHECK);
        assert_eq!(life.on(Event::WaitOver), &Phase::Register);
        // The registration backoff is untouched: the first failure after the clock is set
        // waits as little as a first failure.
        let first = delay_of(life.on(Event::RegistrationFailed { transient: true }));
        assert!(first <= Duration::from_secs(2), "{first:?}");

        let mut life = Lifecycle::default();
        life.on(Event::CacheFits);
        assert_eq!(delay_of(life.on(Event::ClockUnset)), CLOCK_RECHECK);
        assert_eq!(life.on(Event::WaitOver), &Phase::Session);
        assert!(!life.registration_forced());
        // Not from Start: the identity is loaded whatever the clock.
        let mut life = Lifecycle::default();
        assert_eq!(life.on(Event::ClockUnset), &Phase::Start);
    }

    #[test]
    fn reload_starts_over_and_shutdown_ends_everything() {
        let mut life = Lifecycle::default();
        life.on(Event::RegistrationNeeded);
        life.on(Event::RegistrationFailed { transient: true });
        assert_eq!(life.on(Event::Reload), &Phase::Start);
        life.on(Event::CacheFits);
        assert_eq!(life.on(Event::Reload), &Phase::Start);
        assert_eq!(life.on(Event::Shutdown), &Phase::Stopped);
        assert_eq!(
            life.on(Event::Reload),
            &Phase::Stopped,
            "nothing leaves Stopped"
        );
    }

    #[test]
    fn a_session_that_ends_starts_over_and_events_out_of_place_change_nothing() {
        let mut life = Lifecycle::default();
        assert_eq!(life.on(Event::Connected), &Phase::Start);
        assert_eq!(life.on(Event::WaitOver), &Phase::Start);
        life.on(Event::CacheFits);
        assert_eq!(life.on(Event::Registered), &Phase::Session);
        assert_eq!(life.on(Event::SessionEnded), &Phase::Start);
        assert!(!life.registration_forced());
    }
}
