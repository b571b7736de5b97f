//! How the store survives a restart: `state.json`, a snapshot of the whole [`Store`], and
//! `state.journal`, the changes made since, appended one line per change (a change is every row
//! one [`crate::state::Sim::mutate`] touched, so it replays whole or not at all). A change costs
//! the size of its rows, not of the store; when the journal has grown past the snapshot (and
//! [`COMPACT_MIN_BYTES`]) the snapshot is rewritten and the journal emptied, so replay stays
//! short and compaction costs O(1) per change on average.
//!
//! A journal line is `{fnv1a-64 of the JSON, 16 hex digits} {JSON}\n`. A crash in the middle of
//! an append leaves a last line without its newline or with a wrong checksum: it was never
//! synced, so never acknowledged, and is skipped with a warning naming file and line. A bad line
//! before the last is damage, not a crash: hubsim refuses to start rather than lose what follows.
//!
//! Durability: appends are synced by one thread ([`Syncer`]) that syncs everything written so far
//! at once, so many registrations in flight share one `fdatasync` (group commit). A caller
//! waits for the sync of its change before it answers the client (see `Sim::mutate` and
//! `Sim::synced`), as it waited for the atomic rewrite of `state.json` before.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use serde::{Deserialize, Serialize};

use crate::state::{
    Device, EnrollmentGroup, IndividualEnrollment, Registration, Store, Table, write_atomic,
};

pub const SNAPSHOT: &str = "state.json";
pub const JOURNAL: &str = "state.journal";
/// Below this the journal is never compacted: small stores rewrite their snapshot rarely.
pub const COMPACT_MIN_BYTES: u64 = 4 << 20;

/// The service keys and ID scope, journaled when they change (they do not, today, after start).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Meta {
    id_scope: String,
    hub_owner_key: String,
    dps_owner_key: String,
}

impl Meta {
    fn of(store: &Store) -> Self {
        Self {
            id_scope: store.id_scope.clone(),
            hub_owner_key: store.hub_owner_key.clone(),
            dps_owner_key: store.dps_owner_key.clone(),
        }
    }
}

/// One journal line as written: the rows one change touched (`None`: removed).
#[derive(Serialize)]
struct ChangeOut<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    meta: Option<&'a Meta>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    enrollments: Vec<(String, Option<&'a IndividualEnrollment>)>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    groups: Vec<(String, Option<&'a EnrollmentGroup>)>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    registrations: Vec<(String, Option<&'a Registration>)>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    devices: Vec<(String, Option<&'a Device>)>,
}

/// One journal line as read back.
#[derive(Deserialize)]
struct ChangeIn {
    #[serde(default)]
    meta: Option<Meta>,
    #[serde(default)]
    enrollments: Vec<(String, Option<IndividualEnrollment>)>,
    #[serde(default)]
    groups: Vec<(String, Option<EnrollmentGroup>)>,
    #[serde(default)]
    registrations: Vec<(String, Option<Registration>)>,
    #[serde(default)]
    devices: Vec<(String, Option<Device>)>,
}

impl ChangeIn {
    fn apply(self, store: &mut Store) {
        if let Some(meta) = self.meta {
            store.id_scope = meta.id_scope;
            store.hub_owner_key = meta.hub_owner_key;
            store.dps_owner_key = meta.dps_owner_key;
        }
        fn restore<T>(table: &mut Table<T>, rows: Vec<(String, Option<T>)>) {
            for (key, row) in rows {
                table.restore(key, row);
            }
        }
        restore(&mut store.enrollments, self.enrollments);
        restore(&mut store.groups, self.groups);
        restore(&mut store.registrations, self.registrations);
        restore(&mut store.devices, self.devices);
    }
}

/// FNV-1a, 64 bits: enough to tell a torn or damaged line from a whole one.
fn checksum(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash = (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

fn encode_line(json: &[u8]) -> Vec<u8> {
    let mut line = Vec::with_capacity(json.len() + 18);
    line.extend_from_slice(format!("{:016x} ", checksum(json)).as_bytes());
    line.extend_from_slice(json);
    line.push(b'\n');
    line
}

/// The change a journal line holds, or why it is not a whole line.
fn decode_line(line: &[u8]) -> Result<ChangeIn, String> {
    let (sum, json) = match line.split_first_chunk::<16>() {
        Some((sum, rest)) if rest.first() == Some(&b' ') => (sum, &rest[1..]),
        _ => return Err("no checksum".into()),
    };
    let sum = std::str::from_utf8(sum)
        .ok()
        .and_then(|s| u64::from_str_radix(s, 16).ok())
        .ok_or("the checksum is not 16 hex digits")?;
    if sum != checksum(json) {
        return Err("its checksum does not match".into());
    }
    serde_json::from_slice(json).map_err(|e| format!("not a change: {e}"))
}

/// The snapshot and journal of one state dir, owned by the store's lock so lines are appended
/// in the order the changes were made.
pub struct Persistence {
    dir: PathBuf,
    journal: File,
    journal_bytes: u64,
    snapshot_bytes: u64,
    /// The journal is compacted once it is larger than this and than the snapshot.
    compact_min_bytes: u64,
    meta: Meta,
    /// Lines appended since start; the syncer reports how many of them are on disk.
    written: u64,
    syncer: Arc<Syncer>,
}

impl Persistence {
    /// Loads the snapshot (an old hubsim's `state.json` is the same file) or `fresh()`, replays
    /// the journal over it, then compacts: hubsim starts with everything in `state.json`.
    pub fn open(dir: &Path, fresh: impl FnOnce() -> Store) -> anyhow::Result<(Store, Self)> {
        std::fs::create_dir_all(dir)?;
        let snapshot = dir.join(SNAPSHOT);
        let mut store = if snapshot.exists() {
            let text = std::fs::read_to_string(&snapshot)?;
            serde_json::from_str(&text).map_err(|e| {
                anyhow::anyhow!("{}: not a hubsim state file: {e}", snapshot.display())
            })?
        } else {
            fresh()
        };
        let journal_path = dir.join(JOURNAL);
        if journal_path.exists() {
            replay(&journal_path, &mut store)?;
        }
        let journal = File::options()
            .create(true)
            .append(true)
            .open(&journal_path)?;
        let syncer = Syncer::start(journal.try_clone()?);
        let mut persistence = Self {
            dir: dir.to_path_buf(),
            journal,
            journal_bytes: 0,
            snapshot_bytes: 0,
            compact_min_bytes: COMPACT_MIN_BYTES,
            meta: Meta::of(&store),
            written: 0,
            syncer,
        };
        persistence.compact(&store)?;
        Ok((store, persistence))
    }

    /// Appends the rows changed since the last call as one line; compacts when the journal has
    /// grown past the snapshot. Returns the line's number, for [`Syncer::wait`]; 0 when nothing
    /// changed (nothing to wait for).
    pub fn append(&mut self, store: &mut Store) -> anyhow::Result<u64> {
        let meta = Meta::of(store);
        let meta_changed = meta != self.meta;
        let change = ChangeOut {
            meta: meta_changed.then_some(&meta),
            enrollments: store.enrollments.take_changes(),
            groups: store.groups.take_changes(),
            registrations: store.registrations.take_changes(),
            devices: store.devices.take_changes(),
        };
        if change.meta.is_none()
            && change.enrollments.is_empty()
            && change.groups.is_empty()
            && change.registrations.is_empty()
            && change.devices.is_empty()
        {
            return Ok(0);
        }
        let line = encode_line(&serde_json::to_vec(&change)?);
        drop(change);
        self.meta = meta;
        self.journal.write_all(&line).map_err(|e| {
            anyhow::anyhow!("{}: cannot append: {e}", self.dir.join(JOURNAL).display())
        })?;
        self.journal_bytes += line.len() as u64;
        self.written += 1;
        self.syncer.written(self.written);
        if self.journal_bytes > self.compact_min_bytes.max(self.snapshot_bytes) {
            self.compact(store)?;
        }
        Ok(self.written)
    }

    /// Rewrites the snapshot atomically (synced, and its directory too, so the rename is on
    /// disk before the journal it replaces is emptied), then empties the journal.
    fn compact(&mut self, store: &Store) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec_pretty(store)?;
        write_atomic(&self.dir.join(SNAPSHOT), &bytes)?;
        File::open(&self.dir)?.sync_all()?;
        self.journal.set_len(0)?;
        self.journal.sync_all()?;
        self.snapshot_bytes = bytes.len() as u64;
        self.journal_bytes = 0;
        self.syncer.synced(self.written);
        Ok(())
    }

    pub fn syncer(&self) -> &Arc<Syncer> {
        &self.syncer
    }
}

impl Drop for Persistence {
    fn drop(&mut self) {
        self.syncer.stop();
    }
}

/// Replays every whole line of `path` over `store`; a torn last line is skipped with a warning.
fn replay(path: &Path, store: &mut Store) -> anyhow::Result<()> {
    let bytes = std::fs::read(path)?;
    let mut lines: Vec<&[u8]> = bytes.split_inclusive(|b| *b == b'\n').collect();
    let count = lines.len();
    for (n, line) in lines.drain(..).enumerate() {
        let number = n + 1;
        let whole = line.strip_suffix(b"\n");
        let decoded = whole
            .ok_or_else(|| "it has no end of line".to_string())
            .and_then(decode_line);
        match decoded {
            Ok(change) => change.apply(store),
            Err(why) if number == count => {
                tracing::warn!(
                    "{} line {number}: skipped ({why}): the last change was cut short by a \
                     crash before it was synced, so no client was answered for it",
                    path.display()
                );
            }
            Err(why) => anyhow::bail!(
                "{} line {number} of {count}: {why}; the journal is damaged before its end, \
                 so hubsim does not start (replaying around it would lose or misorder \
                 changes); move the file aside to start from state.json alone",
                path.display()
            ),
        }
    }
    Ok(())
}

/// Syncs the journal on its own thread, everything written at once (group commit), and lets
/// writers wait for their line: blocking ([`Syncer::wait`]) or async ([`Syncer::wait_async`]).
pub struct Syncer {
    progress: Mutex<Progress>,
    wake: Condvar,
    synced_tx: tokio::sync::watch::Sender<Progress>,
}

#[derive(Debug, Clone, Default)]
struct Progress {
    written: u64,
    synced: u64,
    /// A failed sync: nothing written after it can be promised.
    failed: Option<String>,
    stop: bool,
}

impl Syncer {
    fn start(file: File) -> Arc<Self> {
        let syncer = Arc::new(Self {
            progress: Mutex::default(),
            wake: Condvar::new(),
            synced_tx: tokio::sync::watch::Sender::new(Progress::default()),
        });
        let worker = syncer.clone();
        std::thread::Builder::new()
            .name("hubsim-journal-sync".into())
            .spawn(move || worker.run(file))
            .expect("spawn the journal sync thread");
        syncer
    }

    fn run(&self, file: File) {
        loop {
            let target = {
                let mut p = self.progress.lock().unwrap();
                while p.written <= p.synced && !p.stop {
                    p = self.wake.wait(p).unwrap();
                }
                if p.stop {
                    return;
                }
                p.written
            };
            let outcome = file.sync_data();
            let mut p = self.progress.lock().unwrap();
            match outcome {
                Ok(()) => p.synced = p.synced.max(target),
                Err(e) => {
                    p.failed = Some(format!("{JOURNAL}: cannot sync: {e}"));
                    p.stop = true;
                }
            }
            self.publish(&p);
        }
    }

    fn publish(&self, p: &Progress) {
        self.wake.notify_all();
        self.synced_tx.send_replace(p.clone());
    }

    fn written(&self, line: u64) {
        let mut p = self.progress.lock().unwrap();
        p.written = p.written.max(line);
        self.wake.notify_all();
    }

    /// Everything up to `line` is on disk another way (compaction synced the snapshot).
    fn synced(&self, line: u64) {
        let mut p = self.progress.lock().unwrap();
        p.written = p.written.max(line);
        p.synced = p.synced.max(line);
        self.publish(&p);
    }

    fn stop(&self) {
        let mut p = self.progress.lock().unwrap();
        p.stop = true;
        self.publish(&p);
    }

    /// The last line appended so far.
    pub fn last_written(&self) -> u64 {
        self.progress.lock().unwrap().written
    }

    /// Blocks until line `line` is synced.
    pub fn wait(&self, line: u64) -> anyhow::Result<()> {
        let mut p = self.progress.lock().unwrap();
        loop {
            if p.synced >= line {
                return Ok(());
            }
            if let Some(e) = &p.failed {
                anyhow::bail!("{e}");
            }
            if p.stop {
                anyhow::bail!("{JOURNAL}: hubsim is stopping");
            }
            p = self.wake.wait(p).unwrap();
        }
    }

    /// Waits, without blocking the runtime, until line `line` is synced.
    pub async fn wait_async(&self, line: u64) -> anyhow::Result<()> {
        let mut rx = self.synced_tx.subscribe();
        let p = rx
            .wait_for(|p| p.synced >= line || p.failed.is_some() || p.stop)
            .await
            .map_err(|_| anyhow::anyhow!("{JOURNAL}: hubsim is stopping"))?
            .clone();
        match (p.synced >= line, p.failed) {
            (true, _) => Ok(()),
            (false, Some(e)) => anyhow::bail!("{e}"),
            (false, None) => anyhow::bail!("{JOURNAL}: hubsim is stopping"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fresh() -> Store {
        Store {
            id_scope: "0ne00000001".into(),
            hub_owner_key: "hub-key".into(),
            dps_owner_key: "dps-key".into(),
            ..Store::default()
        }
    }

    fn registration(hub: &str) -> Registration {
        Registration {
            state: json!({"status": "assigned", "assignedHub": hub}),
            assigned_hub: Some(hub.into()),
            device_id: Some("dev".into()),
        }
    }

    fn hubs(store: &Store) -> Vec<(String, String)> {
        store
            .registrations
            .iter()
            .map(|(k, r)| (k.clone(), r.assigned_hub.clone().unwrap()))
            .collect()
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    /// Opens `dir`, makes changes through `change` and returns without compacting (as after a
    /// kill -9: the journal holds the changes, the snapshot does not).
    fn journal_changes(dir: &Path, change: impl FnOnce(&mut Store, &mut Persistence)) {
        let (mut store, mut persistence) = Persistence::open(dir, fresh).unwrap();
        change(&mut store, &mut persistence);
    }

    fn journal_len(dir: &Path) -> u64 {
        std::fs::metadata(dir.join(JOURNAL)).unwrap().len()
    }

    #[test]
    fn a_restart_replays_inserts_changes_and_removals_in_order() {
        let dir = tempfile::tempdir().unwrap();
        journal_changes(dir.path(), |store, p| {
            store
                .registrations
                .insert("a".into(), registration("hub-1"));
            store
                .registrations
                .insert("b".into(), registration("hub-1"));
            assert_eq!(p.append(store).unwrap(), 1);
            store.registrations.get_mut("a").unwrap().assigned_hub = Some("hub-2".into());
            store.registrations.remove("b");
            store
                .registrations
                .insert("c".into(), registration("hub-3"));
            store.hub_owner_key = "rolled".into();
            assert_eq!(p.append(store).unwrap(), 2);
            assert_eq!(p.append(store).unwrap(), 0, "nothing changed: no line");
        });
        assert!(
            journal_len(dir.path()) > 0,
            "the changes are in the journal"
        );
        let (store, _p) = Persistence::open(dir.path(), fresh).unwrap();
        assert_eq!(hubs(&store), pairs(&[("a", "hub-2"), ("c", "hub-3")]));
        assert_eq!(store.hub_owner_key, "rolled");
        assert_eq!(store.dps_owner_key, "dps-key");
        // Opening compacted: the snapshot holds everything, the journal is empty.
        assert_eq!(journal_len(dir.path()), 0);
        let snapshot: Store =
            serde_json::from_slice(&std::fs::read(dir.path().join(SNAPSHOT)).unwrap()).unwrap();
        assert_eq!(hubs(&snapshot), hubs(&store));
    }

    #[test]
    fn a_torn_last_line_is_skipped_and_the_whole_ones_are_kept() {
        type Tear = fn(&mut Vec<u8>);
        let tears: [(Tear, &str); 2] = [
            (|line| line.truncate(line.len() / 2), "cut in half"),
            (
                |line| {
                    let at = line.len() - 5;
                    line[at] ^= 0x20;
                },
                "a byte changed, newline kept",
            ),
        ];
        for (tear, why) in tears {
            let dir = tempfile::tempdir().unwrap();
            journal_changes(dir.path(), |store, p| {
                store
                    .registrations
                    .insert("kept".into(), registration("hub-1"));
                p.append(store).unwrap();
            });
            let mut torn = encode_line(br#"{"registrations":[["lost",null]]}"#);
            tear(&mut torn);
            let mut file = File::options()
                .append(true)
                .open(dir.path().join(JOURNAL))
                .unwrap();
            file.write_all(&torn).unwrap();
            let (store, _p) = Persistence::open(dir.path(), fresh)
                .unwrap_or_else(|e| panic!("{why}: a torn tail must not stop hubsim: {e:#}"));
            assert_eq!(hubs(&store), pairs(&[("kept", "hub-1")]), "{why}");
            assert_eq!(journal_len(dir.path()), 0, "{why}: compacted at start");
        }
    }

    #[test]
    fn a_damaged_line_before_the_last_stops_the_start_naming_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        journal_changes(dir.path(), |store, p| {
            for id in ["a", "b", "c"] {
                store.registrations.insert(id.into(), registration("hub-1"));
                p.append(store).unwrap();
            }
        });
        let path = dir.path().join(JOURNAL);
        let mut bytes = std::fs::read(&path).unwrap();
        let second = bytes.iter().position(|b| *b == b'\n').unwrap() + 20;
        bytes[second] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        let error = Persistence::open(dir.path(), fresh)
            .err()
            .expect("a damaged journal must stop the start");
        let text = format!("{error:#}");
        assert!(
            text.contains(&format!("{} line 2 of 3", path.display())),
            "{text}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "nothing was dropped");
    }

    #[test]
    fn the_journal_is_compacted_into_the_snapshot_once_it_outgrows_it() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, mut p) = Persistence::open(dir.path(), fresh).unwrap();
        p.compact_min_bytes = 2_000;
        let mut compacted_at = None;
        for n in 0..40 {
            store
                .registrations
                .insert(format!("dev-{n:02}"), registration("hub-1"));
            p.append(&mut store).unwrap();
            if journal_len(dir.path()) == 0 {
                compacted_at.get_or_insert(n);
            }
        }
        let compacted_at = compacted_at.expect("the journal was never compacted");
        assert!(
            compacted_at > 3,
            "compacted too early, at change {compacted_at}"
        );
        let snapshot: Store =
            serde_json::from_slice(&std::fs::read(dir.path().join(SNAPSHOT)).unwrap()).unwrap();
        assert!(snapshot.registrations.len() > compacted_at);
        assert!(journal_len(dir.path()) < 2_000 + 200);
        // Snapshot + journal replay to the same store.
        drop(p);
        let (reopened, _p) = Persistence::open(dir.path(), fresh).unwrap();
        assert_eq!(hubs(&reopened), hubs(&store));
        assert_eq!(reopened.registrations.len(), 40);
    }

    #[test]
    fn a_state_dir_of_the_old_format_loads() {
        // What a hubsim before the journal wrote: `state.json` alone, pretty-printed.
        let dir = tempfile::tempdir().unwrap();
        let old = json!({
            "id_scope": "0ne000000AB",
            "hub_owner_key": "old-hub-key",
            "dps_owner_key": "old-dps-key",
            "enrollments": {},
            "groups": {},
            "registrations": {
                "dev-old": {
                    "state": {"status": "assigned"},
                    "assigned_hub": "hub-old",
                    "device_id": "dev-old"
                }
            },
            "devices": {}
        });
        std::fs::write(
            dir.path().join("state.json"),
            serde_json::to_vec_pretty(&old).unwrap(),
        )
        .unwrap();
        let (mut store, mut p) = Persistence::open(dir.path(), fresh).unwrap();
        assert_eq!(store.id_scope, "0ne000000AB");
        assert_eq!(store.hub_owner_key, "old-hub-key");
        assert_eq!(hubs(&store), pairs(&[("dev-old", "hub-old")]));
        // And it goes on from there with a journal.
        store
            .registrations
            .insert("dev-new".into(), registration("hub-new"));
        p.append(&mut store).unwrap();
        drop(p);
        let (store, _p) = Persistence::open(dir.path(), fresh).unwrap();
        assert_eq!(
            hubs(&store),
            pairs(&[("dev-new", "hub-new"), ("dev-old", "hub-old")])
        );
    }

    #[test]
    fn a_waiter_returns_once_its_line_is_synced() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, mut p) = Persistence::open(dir.path(), fresh).unwrap();
        let syncer = p.syncer().clone();
        let mut last = 0;
        for n in 0..5 {
            store
                .registrations
                .insert(format!("d{n}"), registration("h"));
            last = p.append(&mut store).unwrap();
        }
        assert_eq!(syncer.last_written(), last);
        syncer.wait(last).unwrap();
        assert!(syncer.progress.lock().unwrap().synced >= last);
        drop(p);
        assert!(
            syncer.wait(last + 1).is_err(),
            "a line never written is never reported synced"
        );
    }
}
