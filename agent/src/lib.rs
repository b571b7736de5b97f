//! hubagent: a Linux edge agent for Azure IoT Hub.
//!
//! Data flows one way: `config` → `keys` → `provisioning` → `hub` ← `queue` ← `plugins`;
//! `daemon` wires them and talks to systemd; `cli` is the command-line face.

pub mod check;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
#[cfg(feature = "demo")]
pub mod demo;
pub mod hardening;
pub mod hub;
pub mod keys;
pub mod logging;
pub mod mqtt;
pub mod plugins;
pub mod provisioning;
pub mod queue;
pub mod state;
pub mod systemd;
pub mod tls;
#[cfg(feature = "tpm")]
pub mod tpm;
