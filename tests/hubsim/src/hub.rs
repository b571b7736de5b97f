//! IoT Hub device-side topic handling, independent of the socket: what the hub does with each
//! PUBLISH and SUBSCRIBE of a connected device (telemetry, twin GET/PATCH, method answers, C2D
//! subscriptions). `mqtt` owns the connection and sends what these functions return.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use base64::Engine;
use bytes::Bytes;
use percent_encoding::percent_decode_str;
use rumqttc::QoS;
use serde_json::Value;

use crate::state::{Sim, Subscriptions, TelemetryRecord, now_rfc3339};
use crate::twin::{self, TwinError};
use crate::{batch, metering};

/// The largest device-to-cloud message the hub accepts: payload plus property bag.
pub const MAX_D2C_BYTES: usize = 256 * 1024;

/// The authenticated device on one connection.
#[derive(Debug, Clone)]
pub struct DeviceSession {
    pub hub: String,
    pub device_id: String,
    /// `Store::device_key(hub, device_id)`.
    pub device_key: String,
    /// "sas" or "x509", stamped on telemetry as the hub does.
    pub auth_type: &'static str,
    pub subscriptions: Arc<Subscriptions>,
}

/// What the connection should do in answer to a device packet.
#[derive(Debug, PartialEq)]
pub enum Reply {
    Publish {
        topic: String,
        payload: Bytes,
        qos: QoS,
    },
}

/// A protocol violation: the hub closes the connection (MQTT has no error replies).
#[derive(Debug, PartialEq)]
pub struct Close(pub String);

/// Grants or refuses each filter of a SUBSCRIBE; returns the granted QoS per filter (`None` =
/// refused) and whether queued C2D messages should now be flushed.
pub fn on_subscribe(
    session: &DeviceSession,
    filters: &[(String, QoS)],
) -> (Vec<Option<QoS>>, bool) {
    let c2d_filter = format!("devices/{}/messages/devicebound/#", session.device_id);
    let mut flush_c2d = false;
    let granted = filters
        .iter()
        .map(|(filter, qos)| {
            let flag = match filter.as_str() {
                "$iothub/twin/res/#" => Some(&session.subscriptions.twin_responses),
                "$iothub/twin/PATCH/properties/desired/#" => Some(&session.subscriptions.desired),
                "$iothub/methods/POST/#" => Some(&session.subscriptions.methods),
                f if f == c2d_filter => {
                    flush_c2d = true;
                    Some(&session.subscriptions.c2d)
                }
                _ => return None,
            };
            if let Some(flag) = flag {
                flag.store(true, Ordering::SeqCst);
            }
            // The hub grants at most QoS 1.
            Some(if *qos == QoS::AtMostOnce {
                QoS::AtMostOnce
            } else {
                QoS::AtLeastOnce
            })
        })
        .collect();
    (granted, flush_c2d)
}

pub fn on_unsubscribe(session: &DeviceSession, filters: &[String]) {
    for filter in filters {
        let flag = match filter.as_str() {
            "$iothub/twin/res/#" => &session.subscriptions.twin_responses,
            "$iothub/twin/PATCH/properties/desired/#" => &session.subscriptions.desired,
            "$iothub/methods/POST/#" => &session.subscriptions.methods,
            f if f.starts_with("devices/") && f.ends_with("/messages/devicebound/#") => {
                &session.subscriptions.c2d
            }
            _ => continue,
        };
        flag.store(false, Ordering::SeqCst);
    }
}

/// Handles one device PUBLISH (QoS 0 or 1; QoS 2 is refused by the caller).
pub fn on_publish(
    sim: &Sim,
    session: &DeviceSession,
    topic: &str,
    payload: &Bytes,
    retain: bool,
) -> Result<Vec<Reply>, Close> {
    let events_prefix = format!("devices/{}/messages/events", session.device_id);
    if let Some(rest) = topic.strip_prefix(&events_prefix) {
        let bag = match rest {
            "" => "",
            r if r.starts_with('/') => &r[1..],
            _ => return Err(Close(format!("unknown topic '{topic}'"))),
        };
        record_telemetry(sim, session, bag, payload, retain)?;
        return Ok(vec![]);
    }
    if topic.starts_with("devices/") && topic.contains("/messages/events") {
        return Err(Close(format!(
            "topic '{topic}' names another device than the connected '{}'",
            session.device_id
        )));
    }
    let twin_request = if let Some(query) = topic.strip_prefix("$iothub/twin/GET/?") {
        let rid = query_param(query, "$rid").unwrap_or_default();
        Some(throttled(sim, &rid).unwrap_or_else(|| twin_get(sim, session, &rid)))
    } else if let Some(query) = topic.strip_prefix("$iothub/twin/PATCH/properties/reported/?") {
        let rid = query_param(query, "$rid").unwrap_or_default();
        Some(
            throttled(sim, &rid)
                .unwrap_or_else(|| twin_reported_patch(sim, session, &rid, payload)),
        )
    } else {
        None
    };
    if let Some(reply) = twin_request {
        // As on the hub, the answer goes to `$iothub/twin/res/#` subscribers only: a device that
        // did not subscribe gets none (the request itself is still carried out).
        if session.subscriptions.twin_responses.load(Ordering::SeqCst) {
            return Ok(vec![reply]);
        }
        return Ok(vec![]);
    }
    if let Some(rest) = topic.strip_prefix("$iothub/methods/res/") {
        let (status, query) = rest
            .split_once("/?")
            .ok_or_else(|| Close(format!("malformed method response topic '{topic}'")))?;
        let status: u16 = status
            .parse()
            .map_err(|_| Close(format!("method response status '{status}' is not a number")))?;
        let rid = query_param(query, "$rid")
            .ok_or_else(|| Close(format!("method response topic '{topic}' has no $rid")))?;
        let body = if payload.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            serde_json::from_slice(payload)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(payload).into_owned()))
        };
        twin::complete_method(sim, &rid, status, body);
        return Ok(vec![]);
    }
    Err(Close(format!("unknown topic '{topic}'")))
}

/// The twin throttle fault (`POST /sim/faults {"twinThrottle": N}`): the next N twin requests are
/// answered 429 and not carried out, as the hub does when a device exceeds its twin quota.
fn throttled(sim: &Sim, rid: &str) -> Option<Reply> {
    let mut faults = sim.faults.lock().unwrap();
    if faults.twin_throttle == 0 {
        return None;
    }
    faults.twin_throttle -= 1;
    let body = crate::dps::error_body(
        429001,
        "ThrottlingException: twin operations are being throttled for this device.",
    );
    Some(twin_response(429, rid, None, body.to_string().into()))
}

fn twin_get(sim: &Sim, session: &DeviceSession, rid: &str) -> Reply {
    match twin::device_twin_document(sim, &session.device_key) {
        Ok(doc) => twin_response(200, rid, None, doc.to_string().into()),
        Err(e) => twin_error(&e, rid),
    }
}

fn twin_reported_patch(sim: &Sim, session: &DeviceSession, rid: &str, payload: &Bytes) -> Reply {
    let patch: Value = match serde_json::from_slice(payload) {
        Ok(v) => v,
        Err(e) => {
            let body = crate::dps::error_body(400004, &format!("reported patch is not JSON: {e}"));
            return twin_response(400, rid, None, body.to_string().into());
        }
    };
    match twin::apply_reported_patch(sim, &session.device_key, &patch) {
        Ok(version) => twin_response(204, rid, Some(version), Bytes::new()),
        Err(e) => twin_error(&e, rid),
    }
}

fn twin_error(e: &TwinError, rid: &str) -> Reply {
    let (status, code) = match e {
        TwinError::NotFound(_) => (404, 404001),
        TwinError::BadPatch(_) => (400, 400004),
        TwinError::TooLarge(_) => (413, 413001),
        TwinError::Persist(_) => (500, 500001),
    };
    let body = crate::dps::error_body(code, &e.to_string());
    twin_response(status, rid, None, body.to_string().into())
}

fn twin_response(status: u16, rid: &str, version: Option<u64>, payload: Bytes) -> Reply {
    let mut topic = format!("$iothub/twin/res/{status}/?$rid={rid}");
    if let Some(v) = version {
        topic.push_str(&format!("&$version={v}"));
    }
    Reply::Publish {
        topic,
        payload,
        qos: QoS::AtMostOnce,
    }
}

/// System properties as the device encodes them (`$.mid`) and as the hub names them on the
/// service side.
const SYSTEM_PROPERTIES: &[(&str, &str)] = &[
    ("$.mid", "message-id"),
    ("$.cid", "correlation-id"),
    ("$.uid", "user-id"),
    ("$.ct", "content-type"),
    ("$.ce", "content-encoding"),
    ("$.ctime", "creation-time"),
    ("$.exp", "absolute-expiry-time"),
    ("$.on", "output-name"),
    ("$.ifid", "interface-id"),
    ("$.sub", "component-name"),
    ("$.diagid", "diagnostic-id"),
    ("$.diagctx", "diagnostic-context"),
];

/// Splits a property bag (`k=v&k2&k3=`) into decoded (key, value) pairs.
pub fn parse_property_bag(bag: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for part in bag.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        let decode = |s: &str| {
            percent_decode_str(&s.replace('+', " "))
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| format!("property '{s}' is not UTF-8 after percent-decoding"))
        };
        out.push((decode(k)?, decode(v)?));
    }
    Ok(out)
}

fn record_telemetry(
    sim: &Sim,
    session: &DeviceSession,
    bag: &str,
    payload: &Bytes,
    retain: bool,
) -> Result<(), Close> {
    let size = payload.len() + bag.len();
    if size > MAX_D2C_BYTES {
        return Err(Close(format!(
            "message of {size} bytes exceeds the hub's limit of {MAX_D2C_BYTES} bytes"
        )));
    }
    let pairs = parse_property_bag(bag).map_err(Close)?;
    let mut properties = BTreeMap::new();
    let mut system_properties = BTreeMap::new();
    for (key, value) in pairs {
        match SYSTEM_PROPERTIES.iter().find(|(wire, _)| *wire == key) {
            Some((_, name)) => {
                system_properties.insert(name.to_string(), value);
            }
            None if key.starts_with("$.") => {
                return Err(Close(format!("unknown system property '{key}'")));
            }
            None => {
                properties.insert(key, value);
            }
        }
    }
    // Metered before the hub stamps its own properties (docs/hubsim.md, "Metering").
    let blocks = metering::billed_blocks(metering::metered_size(
        payload.len(),
        system_properties.values().map(String::as_str),
        properties.iter().map(|(k, v)| (k.as_str(), v.as_str())),
    ));
    if retain {
        properties.insert("mqtt-retain".into(), "true".into());
    }
    let enqueued = now_rfc3339();
    let mut stamped = BTreeMap::new();
    stamped.insert(
        "iothub-connection-device-id".to_string(),
        session.device_id.clone(),
    );
    stamped.insert(
        "iothub-connection-auth-method".into(),
        format!(
            r#"{{"scope":"device","type":"{}","issuer":"iothub"}}"#,
            session.auth_type
        ),
    );
    stamped.insert("iothub-enqueuedtime".into(), enqueued.clone());
    let records = if properties.contains_key(batch::BATCH_PROPERTY) {
        batch_records(
            session,
            payload,
            properties,
            system_properties,
            &stamped,
            &enqueued,
        )
    } else {
        system_properties.extend(stamped);
        vec![TelemetryRecord {
            body: std::str::from_utf8(payload).ok().map(str::to_owned),
            body_base64: base64::engine::general_purpose::STANDARD.encode(payload),
            properties,
            system_properties,
            enqueued_time: enqueued,
            batch_message_id: None,
            batch_error: None,
        }]
    };
    sim.record(|r| {
        let device = &session.device_id;
        *r.telemetry_received.entry(device.clone()).or_default() += 1;
        *r.readings_received.entry(device.clone()).or_default() += records.len() as u64;
        *r.billed_blocks.entry(device.clone()).or_default() += blocks;
        let keep = r.telemetry_keep;
        let list = r.telemetry.entry(device.clone()).or_default();
        list.extend(records);
        // Trim in halves so the cost per message stays constant.
        if keep > 0 && list.len() >= 2 * keep {
            list.drain(..list.len() - keep);
        }
    });
    Ok(())
}

/// A hubagent batch, recorded as its readings (what a consumer that splits it sees); one it
/// cannot split is recorded whole, with the reason in `batchError`.
fn batch_records(
    session: &DeviceSession,
    payload: &Bytes,
    properties: BTreeMap<String, String>,
    mut system_properties: BTreeMap<String, String>,
    stamped: &BTreeMap<String, String>,
    enqueued: &str,
) -> Vec<TelemetryRecord> {
    let batch_id = system_properties.get("message-id").cloned();
    let encoding = system_properties
        .get("content-encoding")
        .map(String::as_str);
    match batch::split(payload, encoding, &properties) {
        Ok(readings) => readings
            .into_iter()
            .map(|reading| {
                let mut system = stamped.clone();
                system.insert("message-id".into(), reading.message_id);
                for (name, value) in [
                    ("creation-time", reading.creation_time),
                    ("content-type", reading.content_type),
                    ("content-encoding", reading.content_encoding),
                ] {
                    if let Some(value) = value {
                        system.insert(name.into(), value);
                    }
                }
                TelemetryRecord {
                    body: String::from_utf8(reading.body.clone()).ok(),
                    body_base64: base64::engine::general_purpose::STANDARD.encode(&reading.body),
                    properties: reading.properties,
                    system_properties: system,
                    enqueued_time: enqueued.to_owned(),
                    batch_message_id: batch_id.clone(),
                    batch_error: None,
                }
            })
            .collect(),
        Err(e) => {
            tracing::warn!(device = %session.device_id, "a batch that does not split: {e}");
            system_properties.extend(stamped.clone());
            vec![TelemetryRecord {
                body: std::str::from_utf8(payload).ok().map(str::to_owned),
                body_base64: base64::engine::general_purpose::STANDARD.encode(payload),
                properties,
                system_properties,
                enqueued_time: enqueued.to_owned(),
                batch_message_id: batch_id,
                batch_error: Some(e),
            }]
        }
    }
}

/// Finds `name` in a `k=v&…` query and returns its raw (still encoded) value.
pub fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|part| {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        (k == name).then(|| v.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn property_bag_decodes_encoded_system_keys_and_values() {
        let pairs =
            parse_property_bag("%24.mid=m-1&%24.ct=application%2Fjson&alert=high%20temp&flag")
                .unwrap();
        assert_eq!(
            pairs,
            vec![
                ("$.mid".to_string(), "m-1".to_string()),
                ("$.ct".to_string(), "application/json".to_string()),
                ("alert".to_string(), "high temp".to_string()),
                ("flag".to_string(), String::new()),
            ]
        );
    }

    #[test]
    fn query_param_keeps_rid_verbatim() {
        assert_eq!(
            query_param("$rid=a%2Db&$version=3", "$rid").as_deref(),
            Some("a%2Db")
        );
        assert_eq!(query_param("$rid=1", "operationId"), None);
    }

    #[test]
    fn subscribe_sets_flags_and_refuses_foreign_filters() {
        let session = DeviceSession {
            hub: "localhost".into(),
            device_id: "dev".into(),
            device_key: "localhost/dev".into(),
            auth_type: "sas",
            subscriptions: Arc::default(),
        };
        let (granted, flush) = on_subscribe(
            &session,
            &[
                ("$iothub/methods/POST/#".into(), QoS::AtLeastOnce),
                (
                    "devices/other/messages/devicebound/#".into(),
                    QoS::AtLeastOnce,
                ),
                (
                    "devices/dev/messages/devicebound/#".into(),
                    QoS::ExactlyOnce,
                ),
            ],
        );
        assert_eq!(
            granted,
            vec![Some(QoS::AtLeastOnce), None, Some(QoS::AtLeastOnce)]
        );
        assert!(flush);
        assert!(session.subscriptions.methods.load(Ordering::SeqCst));
        assert!(!session.subscriptions.desired.load(Ordering::SeqCst));
        assert!(!session.subscriptions.twin_responses.load(Ordering::SeqCst));
    }
}
