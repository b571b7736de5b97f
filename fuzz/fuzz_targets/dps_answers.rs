//! DPS answers as the agent receives them over MQTT: the first line is the response topic
//! (`$dps/registrations/res/{status}/?$rid=…&retry-after=…`), the rest the JSON payload. Each is
//! turned into a step (assigned, poll, retry) or refused with an error, never a panic; the waits
//! it asks for stay within the agent's cap whatever DPS says.
#![no_main]
use std::time::Duration;

use hubagent::provisioning::dps::{Step, read_answer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (topic, payload) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b""[..]),
    };
    let Ok(topic) = std::str::from_utf8(topic) else {
        return;
    };
    // First answer, and one after many retries (where throttling becomes an error).
    for retries in [0, 10] {
        match read_answer(topic, payload, retries) {
            Ok(Step::Assigned(a)) => {
                let _ = (a.assigned_hub.len(), a.device_id.len());
            }
            Ok(Step::Poll { after, .. }) | Ok(Step::Retry { after }) => {
                assert!(after <= Duration::from_secs(60), "{after:?} for {topic}");
            }
            Err(e) => {
                let _ = e.to_string();
                let _ = e.is_transient();
            }
        }
    }
});
