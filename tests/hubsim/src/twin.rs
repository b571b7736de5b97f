//! Twins, direct methods and C2D as the hub's service side sees them: JSON merge patches with
//! versions, pushing desired patches and C2D to the connected device, waiting for method answers.
//! OWNER: hubsim-http helper. The MQTT side (hubsim-mqtt helper) calls the functions below.

use std::time::Duration;

use serde_json::Value;

use crate::state::{C2dMessage, Sim};

#[derive(Debug, thiserror::Error)]
pub enum TwinError {
    #[error("device '{0}' not found")]
    NotFound(String),
    #[error("invalid twin patch: {0}")]
    BadPatch(String),
    #[error("twin section exceeds 32 KiB")]
    TooLarge,
    #[error(transparent)]
    Persist(#[from] anyhow::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum MethodError {
    #[error("device '{0}' is not online")]
    NotConnected(String),
    #[error("timed out waiting for the device to answer")]
    Timeout,
}

/// The twin as a device GET receives it: `{"desired": {…, "$version"}, "reported": {…, "$version"}}`.
/// `device_key` is `Store::device_key(hub, device_id)`.
pub fn device_twin_document(_sim: &Sim, _device_key: &str) -> Result<Value, TwinError> {
    todo!("hubsim-http helper")
}

/// Applies a device's reported-properties merge patch; returns the new reported `$version`.
pub fn apply_reported_patch(
    _sim: &Sim,
    _device_key: &str,
    _patch: &Value,
) -> Result<u64, TwinError> {
    todo!("hubsim-http helper")
}

/// Applies a service desired-properties merge patch, pushes it to the connected device, returns the new desired `$version`.
pub fn apply_desired_patch(
    _sim: &Sim,
    _device_key: &str,
    _patch: &Value,
) -> Result<u64, TwinError> {
    todo!("hubsim-http helper")
}

/// Sends a direct method to the connected device and waits for its answer.
pub async fn invoke_method(
    _sim: &Sim,
    _device_key: &str,
    _method: &str,
    _payload: &Value,
    _timeout: Duration,
) -> Result<(u16, Value), MethodError> {
    todo!("hubsim-http helper")
}

/// Called by the MQTT side when a device answers `$iothub/methods/res/{status}/?$rid={rid}`.
pub fn complete_method(_sim: &Sim, _rid: &str, _status: u16, _payload: Value) {
    todo!("hubsim-http helper")
}

/// Queues a C2D message (≤ 50 pending) and delivers it now if the device is subscribed/connected.
pub fn send_c2d(_sim: &Sim, _device_key: &str, _message: C2dMessage) -> Result<(), TwinError> {
    todo!("hubsim-http helper")
}

/// Delivers the C2D messages queued for a device that is connected and subscribed to C2D.
/// Called by the MQTT side when the device subscribes to `devices/{id}/messages/devicebound/#`.
pub fn flush_c2d(_sim: &Sim, _device_key: &str) {
    todo!("hubsim-http helper")
}
