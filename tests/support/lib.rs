//! The one support library of the integration tests: the agent's (`tests/it`) and hubsim's own
//! (`tests/hubsim-it`). One module per concern; everything is re-exported here, so a test file
//! says `use hubagent_tests::*;`.
//!
//! - [`sim`]: a hubsim on loopback, enrollments (one [`Enrollment`] builder for every kind), what
//!   hubsim recorded about registrations and connections, reported properties;
//! - [`agent`]: agent configuration files, the real `hubagent` binary as a process, its status
//!   and plugin list through the control socket;
//! - [`telemetry`]: the telemetry hubsim received, with one accessor for numbered messages;
//! - [`delivery`]: the loss check: what the agent acknowledged to a numbered producer before each
//!   kill and stop against what arrived, and the delivery figures;
//! - [`faults`]: dropping connections, outages, and the figures fault scenarios record;
//! - [`hostile`]: a hub that speaks MQTT badly, one behaviour at a time;
//! - [`mqtt`]: raw rumqttc clients, SAS tokens and HTTPS clients for hubsim's own tests;
//! - [`proxy`]: a real HTTP proxy (tinyproxy) on loopback, and the tunnels it opened;
//! - [`resources`]: an agent's process tree and state directory sampled over time (memory, fds,
//!   threads, queue files, disk), and the soak's growth check;
//! - [`swtpm`]: a software TPM per test.

use std::time::Duration;

pub mod agent;
pub mod delivery;
pub mod faults;
pub mod hostile;
pub mod mqtt;
pub mod netns;
pub mod proxy;
pub mod resources;
pub mod sim;
pub mod swtpm;
pub mod telemetry;

pub use agent::*;
pub use delivery::*;
pub use faults::*;
pub use mqtt::*;
pub use proxy::*;
pub use sim::*;
pub use telemetry::*;

/// How long a test waits for what a healthy run does within a few seconds (a connection, a
/// registration, the first messages, an answer): generous, because CI shares two cores between
/// the agent, hubsim and other tests. Reaching it means the awaited thing is not coming.
/// Debian's Python (package python3, which tests/setup.sh installs): what a gateway's exec
/// plugins run with, and an interpreter the plugin sandbox lets them execute (it is under /usr).
pub const PYTHON: &str = "/usr/bin/python3";

pub const WAIT: Duration = Duration::from_secs(30);

/// For what first waits out a retry: the agent's reconnect backoff after an outage, a refused
/// registration, a plugin's restarts before quarantine, a backlog of minutes being sent.
pub const LONG_WAIT: Duration = Duration::from_secs(60);
