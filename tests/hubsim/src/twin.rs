//! Twins, direct methods and C2D as the hub's service side sees them: JSON merge patches with
//! versions, pushing desired patches and C2D to the connected device, waiting for method answers.

use std::time::Duration;

use std::sync::atomic::{AtomicBool, Ordering};

use rumqttc::QoS;
use serde_json::{Value, json};
use tokio::sync::oneshot;

use crate::state::{
    C2dMessage, C2dState, ConnCommand, ConnHandle, JsonObject, MAX_C2D_DELIVERIES, MAX_C2D_QUEUE,
    Sim, Subscriptions,
};

#[derive(Debug, thiserror::Error)]
pub enum TwinError {
    #[error("device '{0}' not found")]
    NotFound(String),
    #[error("invalid twin patch: {0}")]
    BadPatch(String),
    #[error("twin section too large: {0}")]
    TooLarge(String),
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

/// IoT Hub's limits on twin documents (docs/hubsim.md, "Twin limits", says where they come
/// from). Sizes of keys and string values are UTF-8 bytes.
pub const MAX_SECTION_BYTES: usize = 32 * 1024;
pub const MAX_TAGS_BYTES: usize = 8 * 1024;
pub const MAX_KEY_BYTES: usize = 1024;
pub const MAX_STRING_BYTES: usize = 4096;
/// Integers must lie within ±2^52 (the hub's "safe" range).
pub const MIN_INTEGER: i64 = -4_503_599_627_370_496;
pub const MAX_INTEGER: i64 = 4_503_599_627_370_495;
/// Objects and arrays nest at most this many levels below the section (`desired`, `reported`,
/// `tags`): the section's own properties are level 1.
pub const MAX_DEPTH: usize = 10;

fn with_version(section: &JsonObject, version: u64) -> Value {
    let mut section = section.clone();
    section.insert("$version".into(), Value::from(version));
    Value::Object(section)
}

/// The twin as a device GET receives it: `{"desired": {…, "$version"}, "reported": {…, "$version"}}`.
/// `device_key` is `Store::device_key(hub, device_id)`.
pub fn device_twin_document(sim: &Sim, device_key: &str) -> Result<Value, TwinError> {
    sim.read(|s| {
        let device = s
            .devices
            .get(device_key)
            .ok_or_else(|| TwinError::NotFound(device_key.to_string()))?;
        Ok(json!({
            "desired": with_version(&device.twin.desired, device.twin.desired_version),
            "reported": with_version(&device.twin.reported, device.twin.reported_version),
        }))
    })
}

/// Rejects what IoT Hub rejects in a twin patch (keys, values, nesting), naming the offending
/// property by its dotted path. `section` (`desired`, `reported`, `tags`) starts the path.
pub fn validate_patch<'a>(patch: &'a Value, section: &str) -> Result<&'a JsonObject, TwinError> {
    let Value::Object(map) = patch else {
        return Err(TwinError::BadPatch(format!(
            "a {section} patch must be a JSON object, got {patch}"
        )));
    };
    for (key, child) in map {
        // `$version` sent along by devices and services is ignored, as the hub does.
        if key == "$version" {
            continue;
        }
        let here = format!("{section}.{key}");
        check_key(key, &here)?;
        check_value(child, &here, 1, false)?;
    }
    Ok(map)
}

fn check_key(key: &str, path: &str) -> Result<(), TwinError> {
    let bad = |why: String| {
        Err(TwinError::BadPatch(format!(
            "property name '{}': {why}",
            shorten(path)
        )))
    };
    if key.is_empty() {
        return bad("empty".into());
    }
    if key.len() > MAX_KEY_BYTES {
        return bad(format!(
            "{} bytes long; the hub allows at most {MAX_KEY_BYTES}",
            key.len()
        ));
    }
    if let Some(c) = key
        .chars()
        .find(|c| c.is_control() || matches!(c, '.' | '$' | ' '))
    {
        return bad(format!(
            "contains {:?}; the hub refuses control characters, '.', '$' and ' ' in names",
            c
        ));
    }
    Ok(())
}

/// `depth` is the level of the property holding `value` (1 = a property of the section).
fn check_value(value: &Value, path: &str, depth: usize, in_array: bool) -> Result<(), TwinError> {
    let bad = |why: String| Err(TwinError::BadPatch(format!("'{}' {why}", shorten(path))));
    match value {
        Value::Object(_) | Value::Array(_) if depth > MAX_DEPTH => bad(format!(
            "nests deeper than the hub's {MAX_DEPTH} levels (it is at level {depth})"
        )),
        Value::Object(map) => {
            for (key, child) in map {
                let here = format!("{path}.{key}");
                check_key(key, &here)?;
                check_value(child, &here, depth + 1, in_array)?;
            }
            Ok(())
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let here = format!("{path}[{i}]");
                if item.is_null() {
                    return Err(TwinError::BadPatch(format!(
                        "'{}' is null: the hub refuses null in arrays",
                        shorten(&here)
                    )));
                }
                check_value(item, &here, depth + 1, true)?;
            }
            Ok(())
        }
        Value::Null if in_array => bad("is null: the hub refuses null inside arrays".into()),
        Value::String(text) if text.len() > MAX_STRING_BYTES => bad(format!(
            "is a string of {} bytes; the hub allows at most {MAX_STRING_BYTES}",
            text.len()
        )),
        Value::Number(n) if n.is_i64() || n.is_u64() => {
            let in_range = n
                .as_i64()
                .is_some_and(|i| (MIN_INTEGER..=MAX_INTEGER).contains(&i));
            if in_range {
                Ok(())
            } else {
                bad(format!(
                    "is {n}, outside the hub's integer range {MIN_INTEGER}..={MAX_INTEGER}"
                ))
            }
        }
        _ => Ok(()),
    }
}

/// Paths can hold 1 KB keys: errors show their start.
fn shorten(path: &str) -> String {
    if path.len() <= 120 {
        return path.to_string();
    }
    let mut end = 100;
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &path[..end], path.len())
}

/// A section's size as the hub counts it: for each property, the length of its name plus its
/// value's: strings count their characters except control characters, numbers 8, booleans 4,
/// objects (and arrays) the sum of what they hold. `$version` and `$metadata` are not counted.
pub fn section_size(section: &JsonObject) -> usize {
    fn text(s: &str) -> usize {
        s.chars().filter(|c| !c.is_control()).count()
    }
    fn value(v: &Value) -> usize {
        match v {
            Value::String(s) => text(s),
            Value::Number(_) => 8,
            Value::Bool(_) => 4,
            Value::Null => 0,
            Value::Array(items) => items.iter().map(value).sum(),
            Value::Object(map) => section_size(map),
        }
    }
    section
        .iter()
        .filter(|(k, _)| !k.starts_with('$'))
        .map(|(k, v)| text(k) + value(v))
        .sum()
}

/// RFC 7386 JSON merge patch: objects merge, `null` deletes, anything else replaces.
fn merge(target: &mut JsonObject, patch: &JsonObject) {
    for (key, value) in patch {
        if key == "$version" {
            continue;
        }
        match value {
            Value::Null => {
                target.remove(key);
            }
            Value::Object(child) => {
                let entry = target
                    .entry(key.clone())
                    .or_insert_with(|| Value::Object(JsonObject::new()));
                if !entry.is_object() {
                    *entry = Value::Object(JsonObject::new());
                }
                if let Value::Object(t) = entry {
                    merge(t, child);
                }
            }
            other => {
                target.insert(key.clone(), other.clone());
            }
        }
    }
}

enum Section {
    Desired,
    Reported,
}

fn apply(sim: &Sim, device_key: &str, patch: &Value, section: Section) -> Result<u64, TwinError> {
    let name = match section {
        Section::Desired => "desired",
        Section::Reported => "reported",
    };
    let patch = validate_patch(patch, name)?;
    sim.mutate(|s| {
        let device = s
            .devices
            .get_mut(device_key)
            .ok_or_else(|| TwinError::NotFound(device_key.to_string()))?;
        let (target, version) = match section {
            Section::Desired => (&mut device.twin.desired, &mut device.twin.desired_version),
            Section::Reported => (&mut device.twin.reported, &mut device.twin.reported_version),
        };
        let mut updated = target.clone();
        merge(&mut updated, patch);
        let size = section_size(&updated);
        if size > MAX_SECTION_BYTES {
            return Err(TwinError::TooLarge(format!(
                "{name} would be {size} bytes as the hub counts them; the hub allows at most {MAX_SECTION_BYTES}"
            )));
        }
        *target = updated;
        *version += 1;
        device.etag = uuid::Uuid::new_v4().to_string();
        Ok(*version)
    })?
}

/// Applies a device's reported-properties merge patch; returns the new reported `$version`.
pub fn apply_reported_patch(sim: &Sim, device_key: &str, patch: &Value) -> Result<u64, TwinError> {
    apply(sim, device_key, patch, Section::Reported)
}

/// Applies a service desired-properties merge patch, pushes it to the connected device, returns the new desired `$version`.
pub fn apply_desired_patch(sim: &Sim, device_key: &str, patch: &Value) -> Result<u64, TwinError> {
    let version = apply(sim, device_key, patch, Section::Desired)?;
    let mut pushed = patch.as_object().cloned().unwrap_or_default();
    pushed.insert("$version".into(), Value::from(version));
    if let Some(conn) = subscribed(sim, device_key, |s| &s.desired) {
        let _ = conn.tx.send(ConnCommand::Publish {
            topic: format!("$iothub/twin/PATCH/properties/desired/?$version={version}"),
            payload: Value::Object(pushed).to_string().into(),
            qos: QoS::AtMostOnce,
        });
    }
    Ok(version)
}

/// The live connection of a device, if it subscribed to what `flag` selects.
fn subscribed(
    sim: &Sim,
    device_key: &str,
    flag: impl Fn(&Subscriptions) -> &AtomicBool,
) -> Option<ConnHandle> {
    let live = sim.live.lock().unwrap();
    let conn = live.connections.get(device_key)?;
    flag(&conn.subscriptions)
        .load(Ordering::SeqCst)
        .then(|| conn.clone())
}

/// Sends a direct method to the connected device and waits for its answer.
pub async fn invoke_method(
    sim: &Sim,
    device_key: &str,
    method: &str,
    payload: &Value,
    timeout: Duration,
) -> Result<(u16, Value), MethodError> {
    let conn = subscribed(sim, device_key, |s| &s.methods)
        .ok_or_else(|| MethodError::NotConnected(device_key.to_string()))?;
    let rid = format!("{:x}", rand::random::<u64>());
    let (tx, rx) = oneshot::channel();
    sim.live
        .lock()
        .unwrap()
        .pending_methods
        .insert(rid.clone(), tx);
    let sent = conn.tx.send(ConnCommand::Publish {
        topic: format!("$iothub/methods/POST/{method}/?$rid={rid}"),
        payload: payload.to_string().into(),
        qos: QoS::AtMostOnce,
    });
    if sent.is_err() {
        sim.live.lock().unwrap().pending_methods.remove(&rid);
        return Err(MethodError::NotConnected(device_key.to_string()));
    }
    match tokio::time::timeout(timeout, rx).await {
        Ok(Ok(answer)) => Ok(answer),
        _ => {
            sim.live.lock().unwrap().pending_methods.remove(&rid);
            Err(MethodError::Timeout)
        }
    }
}

/// Called by the MQTT side when a device answers `$iothub/methods/res/{status}/?$rid={rid}`.
pub fn complete_method(sim: &Sim, rid: &str, status: u16, payload: Value) {
    if let Some(waiter) = sim.live.lock().unwrap().pending_methods.remove(rid) {
        let _ = waiter.send((status, payload));
    }
}

/// Queues a C2D message (≤ 50 pending) and delivers it now if the device is subscribed/connected.
pub fn send_c2d(sim: &Sim, device_key: &str, message: C2dMessage) -> Result<(), TwinError> {
    if !sim.read(|s| s.devices.contains_key(device_key)) {
        return Err(TwinError::NotFound(device_key.to_string()));
    }
    {
        let mut live = sim.live.lock().unwrap();
        let queue = live.c2d_queues.entry(device_key.to_string()).or_default();
        if queue.len() >= MAX_C2D_QUEUE {
            return Err(TwinError::BadPatch(format!(
                "device '{device_key}' already has {MAX_C2D_QUEUE} C2D messages pending"
            )));
        }
        sim.record_c2d_sent(device_key, &message);
        queue.push_back(message);
    }
    flush_c2d(sim, device_key);
    Ok(())
}

/// Delivers the C2D messages queued for a device that is connected and subscribed to C2D.
/// Called by the MQTT side when the device subscribes to `devices/{id}/messages/devicebound/#`,
/// and when a connection ends with messages the device did not acknowledge ([`requeue_c2d`]).
/// The connection keeps each message until the device's PUBACK (at-least-once, as on the hub).
pub fn flush_c2d(sim: &Sim, device_key: &str) {
    let Some(conn) = subscribed(sim, device_key, |s| &s.c2d) else {
        return;
    };
    let pending: Vec<C2dMessage> = sim
        .live
        .lock()
        .unwrap()
        .c2d_queues
        .get_mut(device_key)
        .map(|q| q.drain(..).collect())
        .unwrap_or_default();
    let mut pending = pending.into_iter();
    for message in pending.by_ref() {
        if let Err(unsent) = conn.tx.send(ConnCommand::DeliverC2d(message)) {
            // The connection is closing: the message (and the rest) wait for the next one.
            let ConnCommand::DeliverC2d(message) = unsent.0 else {
                unreachable!()
            };
            requeue_c2d(
                sim,
                device_key,
                std::iter::once(message).chain(pending).collect(),
            );
            return;
        }
    }
}

/// Puts messages a connection delivered but the device never acknowledged back at the head of
/// its queue, oldest first, and delivers them to the device's current connection if it has one
/// (a newer connection may already have subscribed): the hub redelivers what was not completed.
/// A message delivered [`MAX_C2D_DELIVERIES`] times is dead-lettered instead, as on the hub.
pub fn requeue_c2d(sim: &Sim, device_key: &str, messages: Vec<C2dMessage>) {
    if messages.is_empty() {
        return;
    }
    {
        let mut live = sim.live.lock().unwrap();
        let queue = live.c2d_queues.entry(device_key.to_string()).or_default();
        for message in messages.into_iter().rev() {
            if sim.c2d_deliveries(device_key, message.message_id()) >= MAX_C2D_DELIVERIES {
                sim.record_c2d(device_key, &message, C2dState::DeadLettered);
                continue;
            }
            sim.record_c2d(device_key, &message, C2dState::Enqueued);
            queue.push_front(message);
        }
    }
    flush_c2d(sim, device_key);
}

/// The topic a C2D message is published on: `devices/{id}/messages/devicebound/{property bag}`,
/// with `$.to` added as the hub adds it.
pub fn c2d_topic(device_id: &str, message: &C2dMessage) -> String {
    let mut bag: Vec<(String, String)> = message.properties.clone();
    if !bag.iter().any(|(k, _)| k == "$.to") {
        bag.push((
            "$.to".into(),
            format!("/devices/{device_id}/messages/deviceBound"),
        ));
    }
    let bag = bag
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect::<Vec<_>>()
        .join("&");
    format!("devices/{device_id}/messages/devicebound/{bag}")
}

fn encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC)
        .to_string()
        .replace("%2D", "-")
        .replace("%5F", "_")
        .replace("%2E", ".")
        .replace("%7E", "~")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{SimConfig, Store};

    fn sim_with_device(dir: &std::path::Path) -> (Sim, String) {
        let sim = Sim::open(
            SimConfig {
                state_dir: dir.into(),
                hubs: vec!["localhost".into()],
                retry_after_secs: 0,
                mqtt_port: 0,
                https_port: 0,
                extra_id_scopes: vec![],
            },
            "0ne00000001",
        )
        .unwrap();
        let key = Store::device_key("localhost", "d1");
        sim.mutate(|s| {
            s.devices.insert(
                key.clone(),
                crate::state::Device {
                    device_id: "d1".into(),
                    hub: "localhost".into(),
                    authentication: crate::state::DeviceAuthentication {
                        kind: "sas".into(),
                        symmetric_key: None,
                        x509_thumbprint: None,
                    },
                    status: crate::state::Status::Enabled,
                    generation_id: "g".into(),
                    etag: "e".into(),
                    twin: Default::default(),
                    ca_group: None,
                    model_id: None,
                },
            )
        })
        .unwrap();
        (sim, key)
    }

    #[test]
    fn reported_patches_merge_and_bump_the_version() {
        let dir = tempfile::tempdir().unwrap();
        let (sim, key) = sim_with_device(dir.path());
        assert_eq!(
            apply_reported_patch(&sim, &key, &json!({"a": {"b": 1, "c": 2}})).unwrap(),
            1
        );
        assert_eq!(
            apply_reported_patch(&sim, &key, &json!({"a": {"b": null}, "d": true})).unwrap(),
            2
        );
        let doc = device_twin_document(&sim, &key).unwrap();
        assert_eq!(
            doc["reported"],
            json!({"a": {"c": 2}, "d": true, "$version": 2})
        );
    }

    #[test]
    fn junk_patches_are_refused_and_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (sim, key) = sim_with_device(dir.path());
        for (patch, needle) in [
            (json!([1, 2]), "JSON object"),
            (json!({"$bad": 1}), "$bad"),
            (json!({"ok": {"has.dot": 1}}), "ok.has.dot"),
            (json!({"big": "x".repeat(40 * 1024)}), "4096"),
        ] {
            let err = apply_desired_patch(&sim, &key, &patch)
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{patch}: {err}");
        }
        assert_eq!(
            device_twin_document(&sim, &key).unwrap()["desired"]["$version"],
            0
        );
    }

    #[tokio::test]
    async fn desired_patch_is_pushed_only_to_a_subscribed_device_and_methods_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let (sim, key) = sim_with_device(dir.path());
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let subs = std::sync::Arc::new(Subscriptions::default());
        sim.live.lock().unwrap().connections.insert(
            key.clone(),
            ConnHandle {
                conn_id: 1,
                tx,
                subscriptions: subs.clone(),
            },
        );
        apply_desired_patch(&sim, &key, &json!({"x": 1})).unwrap();
        assert!(rx.try_recv().is_err(), "not subscribed yet");
        subs.desired.store(true, Ordering::SeqCst);
        let v = apply_desired_patch(&sim, &key, &json!({"x": 2})).unwrap();
        let Some(ConnCommand::Publish { topic, .. }) = rx.recv().await else {
            panic!()
        };
        assert_eq!(
            topic,
            format!("$iothub/twin/PATCH/properties/desired/?$version={v}")
        );

        assert!(matches!(
            invoke_method(&sim, &key, "m", &json!(null), Duration::from_millis(10)).await,
            Err(MethodError::NotConnected(_))
        ));
        subs.methods.store(true, Ordering::SeqCst);
        let args = json!({"delay": 1});
        let call = invoke_method(&sim, &key, "reboot", &args, Duration::from_secs(5));
        let answer = async {
            let Some(ConnCommand::Publish { topic, .. }) = rx.recv().await else {
                panic!()
            };
            let rid = topic.rsplit("$rid=").next().unwrap().to_string();
            complete_method(&sim, &rid, 200, json!({"ok": true}));
        };
        let (result, ()) = tokio::join!(call, answer);
        assert_eq!(result.unwrap(), (200, json!({"ok": true})));
        assert!(matches!(
            invoke_method(&sim, &key, "slow", &json!(null), Duration::from_millis(50)).await,
            Err(MethodError::Timeout)
        ));
    }

    #[tokio::test]
    async fn c2d_waits_for_the_subscription() {
        let dir = tempfile::tempdir().unwrap();
        let (sim, key) = sim_with_device(dir.path());
        send_c2d(
            &sim,
            &key,
            C2dMessage {
                body: "hi".into(),
                properties: vec![("$.mid".into(), "c-1".into())],
            },
        )
        .unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let subs = std::sync::Arc::new(Subscriptions::default());
        sim.live.lock().unwrap().connections.insert(
            key.clone(),
            ConnHandle {
                conn_id: 1,
                tx,
                subscriptions: subs.clone(),
            },
        );
        flush_c2d(&sim, &key);
        assert!(rx.try_recv().is_err());
        subs.c2d.store(true, Ordering::SeqCst);
        flush_c2d(&sim, &key);
        let Some(ConnCommand::DeliverC2d(message)) = rx.recv().await else {
            panic!()
        };
        let topic = c2d_topic("d1", &message);
        assert!(
            topic.starts_with("devices/d1/messages/devicebound/%24.mid=c-1&%24.to="),
            "{topic}"
        );
        assert_eq!(&message.body[..], b"hi");
        // Not acknowledged when its connection ended: back at the head of the queue, and sent
        // again as soon as the device is subscribed.
        subs.c2d.store(false, Ordering::SeqCst);
        requeue_c2d(&sim, &key, vec![message]);
        assert!(rx.try_recv().is_err());
        subs.c2d.store(true, Ordering::SeqCst);
        flush_c2d(&sim, &key);
        let Some(ConnCommand::DeliverC2d(again)) = rx.recv().await else {
            panic!()
        };
        assert_eq!(&again.body[..], b"hi");
    }
}
