//! SAS tokens and twin documents as hubsim receives them from devices: refused with a reason or
//! accepted, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(token) = hubsim::auth::parse_sas(text) {
            let _ = hubsim::auth::verify_sas(&token, "AAAA", "hub/devices/d", 0);
        }
    }
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = serde_json::from_value::<hubagent::message::TelemetryMessage>(value);
    }
});
