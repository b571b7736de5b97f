//! The clocks: wall-clock timestamps for the cloud and the logs, Unix seconds for SAS expiries,
//! a watch that notices when the wall clock is stepped (NTP, an RTC corrected, settimeofday), and
//! whether the wall clock can be true at all (a board without an RTC boots at 1970).

use std::time::{Duration, SystemTime};

/// 2026-12-01T00:00:00Z in Unix seconds: no build of this source can have been made earlier (the
/// line was written on that day), so a clock that reads earlier is wrong for certain. A fixed
/// floor rather than the build's own time keeps builds reproducible; moving it forward now and
/// then only narrows the gap it cannot see (a clock wrong by less is left to the hub's and DPS's
/// refusals, which name the clock too).
pub const EARLIEST_TRUE_TIME: u64 = 1_796_083_200;

/// Why the wall clock cannot be true, or None: `now` before [`EARLIEST_TRUE_TIME`]. With such a
/// clock every TLS certificate is "not yet valid" and every SAS token is signed expired, so no
/// connection attempt can succeed until it is set.
pub fn clock_problem(now: SystemTime) -> Option<String> {
    let secs = match now.duration_since(std::time::UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_secs()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_secs())
            .map(|s| -s)
            .unwrap_or(i64::MIN),
    };
    if secs >= EARLIEST_TRUE_TIME as i64 {
        return None;
    }
    let reads = time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{secs} s from 1970"));
    let built = unix_rfc3339(EARLIEST_TRUE_TIME);
    let built = built.split('T').next().unwrap_or_default();
    Some(format!(
        "the system clock reads {reads}, before this build of hubagent was made ({built}): TLS \
         certificates look not yet valid and SAS tokens expired; waiting for the clock to be set \
         (NTP, systemd-timesyncd)"
    ))
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clock_before_this_build_is_named_with_what_it_reads() {
        assert_eq!(unix_rfc3339(EARLIEST_TRUE_TIME), "2026-12-01T00:00:00Z");
        let boot = std::time::UNIX_EPOCH + Duration::from_secs(5);
        assert_eq!(
            clock_problem(boot).as_deref(),
            Some(
                "the system clock reads 1970-01-01T00:00:05Z, before this build of hubagent was \
                 made (2026-12-01): TLS certificates look not yet valid and SAS tokens expired; \
                 waiting for the clock to be set (NTP, systemd-timesyncd)"
            )
        );
        let before_1970 = std::time::UNIX_EPOCH - Duration::from_secs(3600);
        assert!(
            clock_problem(before_1970).is_some_and(|p| p.contains("1969-12-31T23:00:00Z")),
            "{:?}",
            clock_problem(before_1970)
        );
        let floor = std::time::UNIX_EPOCH + Duration::from_secs(EARLIEST_TRUE_TIME);
        assert!(clock_problem(floor - Duration::from_secs(1)).is_some());
        assert_eq!(clock_problem(floor), None);
        assert_eq!(
            clock_problem(SystemTime::now()),
            None,
            "this machine's clock"
        );
    }
}
