//! The daemon's conversation with systemd (`Type=notify`): readiness, status text, reload and
//! stop notifications, watchdog pings. All calls are no-ops when not started by systemd.

use std::time::Duration;

use sd_notify::NotifyState;

/// READY=1 plus a status line; sent once state is loaded, before any network activity, so that a
/// gateway without connectivity still starts.
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn status(status: &str) {
    notify(&[NotifyState::Status(status)]);
}

/// RELOADING=1 with the monotonic timestamp systemd ≥ 253 expects; READY=1 follows after the reload.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now]),
        Err(_) => notify(&[NotifyState::Reloading]),
    }
}

pub fn stopping() {
    notify(&[NotifyState::Stopping]);
}

/// The interval at which to ping the watchdog (half of `WatchdogSec=`), if enabled.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|timeout| timeout / 2)
}

pub fn watchdog_ping() {
    notify(&[NotifyState::Watchdog]);
}

fn notify(states: &[NotifyState]) {
    if let Err(error) = sd_notify::notify(states) {
        tracing::debug!(%error, "sd_notify failed");
    }
}
