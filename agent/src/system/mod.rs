//! The operating system around the agent: logging (journal, text, JSON), systemd notifications,
//! process hardening and the local control socket. No knowledge of provisioning or telemetry.

pub mod control;
pub mod hardening;
pub mod helper_program;
pub mod journal;
pub mod logging;
pub mod recent_logs;
pub mod start_up_memory;
pub mod systemd;
