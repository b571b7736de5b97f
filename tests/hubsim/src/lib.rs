//! hubsim: a faithful local Azure IoT Hub Device Provisioning Service + IoT Hub.
//!
//! One process (or one in-process instance, for tests and `hubagent demo`) that serves devices over
//! MQTT 3.1.1/TLS (DPS and hub on one port, told apart by the CONNECT username), DPS over HTTPS, and
//! a management API shaped like Azure's service REST APIs. See `docs/hubsim.md`.
//!
//! Modules, one concern each:
//! - [`state`]: the data model, persistence, live connections, records, fault switches.
//! - [`pki`]: the development CA, server certificate and `hubsim certs`.
//! - [`auth`]: SAS token parsing/verification, derived keys, client certificate checks.
//! - [`dps`]: provisioning logic (enrollment match, allocation, operations), transport-independent.
//! - [`hub`]: IoT Hub device-side logic (telemetry, twin, methods, C2D), transport-independent.
//! - [`mqtt`]: the MQTT/TLS listener that carries DPS and hub traffic.
//! - [`http`]: the HTTPS listener: DPS device API, management API, sim-only endpoints.

pub mod state;

pub use state::Sim;
pub mod auth;
pub mod http;
pub mod twin;
