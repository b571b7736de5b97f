//! hubagent: a Linux edge agent for Azure IoT Hub. The `hubagent` command (src/bin/hubagent/) is
//! this library's face: argument parsing, `check`, `demo` and the `tpm` tools live there.
//!
//! # Layers
//!
//! Data flows config → identity → provisioning → hub ← telemetry ← plugins, and the daemon wires
//! them together. A module uses only modules of lower layers, never one of its own layer or above
//! (`tests/layers.rs` reads this table and fails on a `use` that crosses upwards).
//! docs/architecture.md tells how a message and a desired patch travel through them.
//!
//! | layer | modules | what they own |
//! |---|---|---|
//! | 8 | `daemon` | the lifecycle state machine and the loop that drives it; the status the control socket answers |
//! | 7 | `plugins` | telemetry sources: the supervisor, one file per kind (library host, exec, builtin), the plugin-host process |
//! | 6 | `telemetry` | the durable queue, the publisher sources write into, the pump that feeds the hub session |
//! | 5 | `hub` | the IoT Hub MQTT session (SAS renewal, reconnects, twin, methods, C2D) and its topics |
//! | 4 | `provisioning` | which hub the device belongs to: DPS over MQTT and HTTPS, the cached assignment, `resolve` |
//! | 3 | `identity`, `mqtt` | keys, SAS, X.509, the TPM signer, the credential and its TLS; one MQTT connection's plumbing and `auto`'s route memory |
//! | 2 | `state`, `system` | the state directory's files; logging, systemd, hardening, the control socket |
//! | 1 | `config` | the configuration, parsed once into typed values (plugins, DPS endpoint, queue) |
//! | 0 | `util`, `message` | time, backoff, atomic files, JSON merge and diff, encodings; the telemetry message |

pub mod config;
pub mod daemon;
pub mod hub;
pub mod identity;
pub mod message;
pub mod mqtt;
pub mod plugins;
pub mod provisioning;
pub mod state;
pub mod system;
pub mod telemetry;
pub mod util;
