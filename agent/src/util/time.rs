//! The clocks: wall-clock timestamps for the cloud and the logs, Unix seconds for SAS expiries,
//! and a watch that notices when the wall clock is stepped (NTP, an RTC corrected, settimeofday).

use std::time::Duration;

/// Now as RFC 3339 UTC (`2026-11-23T12:00:00.123Z`).
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// A Unix time in seconds as RFC 3339 UTC (`2026-11-23T12:00:00Z`).
pub fn unix_rfc3339(secs: u64) -> String {
    i64::try_from(secs)
        .ok()
        .and_then(|secs| time::OffsetDateTime::from_unix_timestamp(secs).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// Seconds since the Unix epoch (0 for a clock before 1970).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch (0 for a clock before 1970).
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Notices a step of the wall clock (settimeofday, NTP, an RTC corrected) by comparing it with
/// the monotonic clock.
pub struct ClockWatch {
    wall: std::time::SystemTime,
    mono: std::time::Instant,
}

impl ClockWatch {
    /// Steps smaller than this are drift or slewing, not a correction worth acting on.
    pub const STEP: Duration = Duration::from_secs(30);

    /// Starts watching from now.
    pub fn start() -> Self {
        ClockWatch {
            wall: std::time::SystemTime::now(),
            mono: std::time::Instant::now(),
        }
    }

    /// The step ("+3h 2s", "-2h") if the wall clock moved by more than `STEP` against the
    /// monotonic clock since `start`.
    pub fn stepped(&self) -> Option<String> {
        let mono = self.mono.elapsed();
        let (sign, step) = match std::time::SystemTime::now().duration_since(self.wall) {
            Ok(wall) if wall > mono => ("+", wall - mono),
            Ok(wall) => ("-", mono - wall),
            Err(e) => ("-", e.duration() + mono),
        };
        (step > Self::STEP).then(|| {
            let secs = Duration::from_secs(step.as_secs());
            format!("{sign}{}", humantime::format_duration(secs))
        })
    }
}

/// Sleeps until `at`; never wakes without one.
pub async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
