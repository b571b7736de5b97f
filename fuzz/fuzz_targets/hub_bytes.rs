//! The bytes a hub sends once the connection is up, taken as the agent's session takes them:
//! rumqttc's event loop cuts the stream into packets (`Packet::read` with the agent's incoming
//! size limit), its client state pairs acknowledgements with what was sent
//! (`MqttState::handle_incoming_packet`, whose error ends the connection), and each publish goes
//! to the agent's topic classification (`hub::topics`). The first input byte says how many
//! telemetry messages were in flight when the bytes arrived.
//!
//! Beyond "no panic": a packet never exceeds the limit, and a PUBACK completes a message only if
//! that message was sent and not yet acknowledged (a PUBACK for anything else ends the
//! connection), so the queue never lets go of a message the hub did not take.
#![no_main]
use std::collections::BTreeSet;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use rumqttc::{MqttState, Packet, Publish, QoS, Request};

/// The agent's incoming limit on the hub session (hub/session.rs: 512 KiB).
const MAX_INCOMING: usize = 512 * 1024;
/// The agent's default `[hub] inflight` (config/mod.rs).
const INFLIGHT: u16 = 32;

fuzz_target!(|data: &[u8]| {
    let Some((&in_flight, stream)) = data.split_first() else {
        return;
    };
    // Manual acks, as the session sets them (a C2D message is acknowledged only once taken).
    let mut state = MqttState::new(INFLIGHT, true);
    let mut unacked = BTreeSet::new();
    for n in 0..u16::from(in_flight) % (INFLIGHT + 1) {
        let publish = Publish::new(
            "devices/gw-1/messages/events/",
            QoS::AtLeastOnce,
            n.to_le_bytes().to_vec(),
        );
        match state.handle_outgoing_packet(Request::Publish(publish)) {
            Ok(Some(Packet::Publish(sent))) => assert!(unacked.insert(sent.pkid)),
            other => panic!("a telemetry publish within the inflight limit: {other:?}"),
        }
    }

    let mut buffer = BytesMut::from(stream);
    loop {
        let before = buffer.len();
        // Any error ends the connection: more bytes needed (the stream ended), or a bad packet.
        let Ok(packet) = Packet::read(&mut buffer, MAX_INCOMING) else {
            return;
        };
        assert!(
            before - buffer.len() <= MAX_INCOMING + 5,
            "a packet above the limit"
        );
        let acknowledged = match &packet {
            Packet::PubAck(ack) => Some(ack.pkid),
            _ => None,
        };
        // A PUBREC (QoS 2's first answer) for a QoS 1 message: rumqttc takes the message out of
        // its in-flight state, the agent does not complete it (it completes on PUBACK only), so
        // it is sent again on the next connection. Not in flight any more for what follows.
        let received = match &packet {
            Packet::PubRec(rec) => Some(rec.pkid),
            _ => None,
        };
        if let Packet::Publish(publish) = &packet {
            let _ = hubagent::hub::topics::classify("gw-1", &publish.topic);
            let _ = serde_json::from_slice::<serde_json::Value>(&publish.payload);
        }
        let in_flight_before = state.inflight();
        let handled = state.handle_incoming_packet(packet);
        if let Some(pkid) = acknowledged {
            match handled {
                Ok(_) => {
                    assert!(
                        unacked.remove(&pkid),
                        "a PUBACK for {pkid} completed a message that was not in flight"
                    );
                    assert_eq!(state.inflight(), in_flight_before - 1);
                }
                Err(_) => assert!(
                    !unacked.contains(&pkid),
                    "the PUBACK of in-flight message {pkid} was refused"
                ),
            }
        }
        if let (Some(pkid), Ok(_)) = (received, &handled) {
            unacked.remove(&pkid);
        }
        if handled.is_err() {
            return;
        }
    }
});
