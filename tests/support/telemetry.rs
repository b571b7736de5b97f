//! The telemetry hubsim received, as the tests read it: counts, bodies per source, and
//! [`numbered`], the one accessor for the numbered messages that delivery checks count (the
//! built-in sensor's `seq`, the misbehave plugin's `n`, the outage test's exec plugin's `seq`).

use std::collections::{BTreeMap, BTreeSet};

use hubsim::Sim;
use hubsim::state::TelemetryRecord;
use serde_json::Value;

/// Runs `read` over the records of `device` (empty when it sent nothing).
fn with_records<T>(sim: &Sim, device: &str, read: impl FnOnce(&[TelemetryRecord]) -> T) -> T {
    let records = sim.records.lock().unwrap();
    read(
        records
            .telemetry
            .get(device)
            .map(Vec::as_slice)
            .unwrap_or(&[]),
    )
}

/// The records of `device`'s telemetry (empty when it sent nothing).
pub fn records(sim: &Sim, device: &str) -> Vec<TelemetryRecord> {
    with_records(sim, device, <[_]>::to_vec)
}

/// How many messages hubsim recorded from `device`.
pub fn telemetry_count(sim: &Sim, device: &str) -> usize {
    with_records(sim, device, <[_]>::len)
}

/// The message ids of `device`'s records, in arrival order (redeliveries included).
pub fn message_ids(sim: &Sim, device: &str) -> Vec<String> {
    with_records(sim, device, |records| {
        records
            .iter()
            .map(|r| r.system_properties["message-id"].clone())
            .collect()
    })
}

fn from_source(record: &TelemetryRecord, source: Option<&str>) -> bool {
    source.is_none_or(|s| record.properties.get("source").map(String::as_str) == Some(s))
}

fn json_body(record: &TelemetryRecord) -> Option<Value> {
    serde_json::from_str(record.body.as_deref()?).ok()
}

/// The JSON bodies of the telemetry a plugin (`source` property) sent.
pub fn bodies_from(sim: &Sim, device: &str, source: &str) -> Vec<Value> {
    with_records(sim, device, |records| {
        records
            .iter()
            .filter(|r| from_source(r, Some(source)))
            .filter_map(json_body)
            .collect()
    })
}

/// A numbered message hubsim received: the producing process's run id (its `run` property), its
/// number in that run, and its message id (a redelivery repeats it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Numbered {
    pub run: String,
    pub n: u64,
    pub message_id: String,
}

impl Numbered {
    /// `(run, n)`: which message it is, whatever its delivery.
    pub fn key(&self) -> (String, u64) {
        (self.run.clone(), self.n)
    }
}

/// Every message of `device` from `source` (None: from any source), in arrival order, with its
/// number read from the body field `key`. Every message these tests count is numbered, so one
/// that is not fails the test.
pub fn numbered(sim: &Sim, device: &str, source: Option<&str>, key: &str) -> Vec<Numbered> {
    with_records(sim, device, |records| {
        records
            .iter()
            .filter(|r| from_source(r, source))
            .map(|r| {
                let n = json_body(r).and_then(|b| b[key].as_u64());
                match (r.properties.get("run"), n) {
                    (Some(run), Some(n)) => Numbered {
                        run: run.clone(),
                        n,
                        message_id: r.system_properties["message-id"].clone(),
                    },
                    _ => panic!("a message without a run and a number {key:?}: {r:?}"),
                }
            })
            .collect()
    })
}

/// The distinct numbers that arrived, sorted, per run.
pub fn runs(messages: &[Numbered]) -> BTreeMap<String, Vec<u64>> {
    let mut runs: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    for m in messages {
        runs.entry(m.run.clone()).or_default().insert(m.n);
    }
    runs.into_iter()
        .map(|(run, ns)| (run, ns.into_iter().collect()))
        .collect()
}

/// The numbers missing between 1 and the highest in `ns` (sorted).
pub fn gaps(ns: &[u64]) -> Vec<u64> {
    let have: BTreeSet<u64> = ns.iter().copied().collect();
    (1..=ns.last().copied().unwrap_or(0))
        .filter(|n| !have.contains(n))
        .collect()
}

/// Fails unless `seqs` (sorted) is 1..=N for some N > 0: nothing lost.
pub fn assert_contiguous(seqs: &[u64], what: &str) {
    assert!(!seqs.is_empty(), "{what}: nothing arrived");
    let missing = gaps(seqs);
    assert!(
        missing.is_empty(),
        "{what}: lost sequence numbers {missing:?}"
    );
}
