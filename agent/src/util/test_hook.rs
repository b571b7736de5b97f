//! Test-only crash points (feature `fault-injection`, which only the test suite's build of the
//! binary has): `HUBAGENT_TEST_ABORT_AT=<point>` makes the agent abort (SIGABRT: no destructors,
//! no flushing, as with kill -9) when it reaches the named point, so tests can crash a renewal at
//! an exact step (tests/it/renewal.rs). Without the feature the call compiles to nothing.

/// Aborts the process when `HUBAGENT_TEST_ABORT_AT` names `point` (feature `fault-injection`).
pub fn abort_at(point: &str) {
    #[cfg(feature = "fault-injection")]
    if std::env::var("HUBAGENT_TEST_ABORT_AT").is_ok_and(|p| p == point) {
        eprintln!("HUBAGENT_TEST_ABORT_AT={point}: aborting (test hook)");
        std::process::abort();
    }
    #[cfg(not(feature = "fault-injection"))]
    let _ = point;
}
