//! MQTT topics and property bags from the hub, and DPS response topics: parsed or refused,
//! never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(topic) = std::str::from_utf8(data) {
        let _ = hubagent::hub::topics::classify("device-1", topic);
        let _ = hubagent::hub::topics::parse_property_bag(topic);
        let _ = hubagent::provisioning::dps::parse_response_topic(topic);
        let _ = hubsim::hub::parse_property_bag(topic);
        let _ = hubsim::hub::query_param(topic, "$rid");
    }
});
