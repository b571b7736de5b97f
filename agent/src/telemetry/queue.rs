//! The durable store-and-forward queue between telemetry sources and the hub session.
//!
//! A message is written to disk before `push` returns, handed to the sender in order, and removed
//! only when the hub acknowledged it (`ack`). After a crash, a power loss (with `fsync = always`)
//! or a reboot, every message not yet acknowledged is sent again; the message id lets the cloud
//! side drop the duplicates of this at-least-once delivery.
//!
//! On disk: append-only segment files `{first_seq:016x}.seg` of records (`record`: a compact
//! binary record since issue 18; the JSON records of older agents are still read), and `acked`,
//! the highest sequence number below which everything was acknowledged, rewritten atomically at
//! most every `ack_flush_interval`. A damaged record is skipped with a warning naming the file and
//! offset; the rest survives. The memory held is an index entry per queued message (~48 bytes),
//! not the messages, and up to 64 KiB of records read ahead of the pump (`ReadAhead`).
//!
//! With `fsync = always`, pushes share their syncs (group commit): a pusher whose record is not
//! yet on disk either syncs everything written so far, for every pusher waiting (the leader), or
//! waits for the sync under way and then checks whether it covered its record.

use std::collections::{BTreeSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::Notify;

use super::record::{self, Frame, MAX_MESSAGE, RecordHeader};
use crate::config::{FsyncPolicy, FullPolicy, QueueConfig};
use crate::message::TelemetryMessage;
use crate::util::fs::{is_transient, limit_hint, write_atomic};
use crate::util::time::{EARLIEST_TRUE_TIME, unix_millis};

// The tests below were written for the JSON record; its header length under its old name.
#[cfg(test)]
use record::JSON_HEADER as HEADER;

/// How soon a record that could not be read for want of a resource (file descriptors) is tried
/// again.
const READ_RETRY: Duration = Duration::from_millis(250);

/// The most bytes of consecutive records one read takes ahead of the pump (`ReadAhead`).
const READ_AHEAD_BYTES: u64 = 64 * 1024;

/// Why a queued record could not be read.
enum ReadError {
    /// Not now (a limit reached): the record stays queued.
    NotNow(String),
    /// Not any more: the file lost or changed it.
    Gone(String),
}

#[derive(Debug, Clone)]
pub struct QueueSettings {
    pub fsync: FsyncPolicy,
    pub fsync_interval: Duration,
    pub max_bytes: u64,
    pub max_age: Duration,
    pub full_policy: FullPolicy,
    pub segment_bytes: u64,
    pub ack_flush_interval: Duration,
}

impl Default for QueueSettings {
    fn default() -> Self {
        QueueSettings {
            fsync: FsyncPolicy::Interval,
            fsync_interval: Duration::from_secs(1),
            max_bytes: 256 * 1024 * 1024,
            max_age: Duration::from_secs(7 * 24 * 3600),
            full_policy: FullPolicy::DropOldest,
            segment_bytes: 4 * 1024 * 1024,
            ack_flush_interval: Duration::from_millis(200),
        }
    }
}

impl QueueSettings {
    /// The settings `[queue]` asks for.
    pub fn from_config(config: &QueueConfig) -> Self {
        QueueSettings {
            fsync: config.fsync,
            fsync_interval: config.fsync_interval,
            max_bytes: config.max_bytes,
            max_age: config.max_age,
            full_policy: config.full_policy,
            // drop-oldest frees one segment at a time: segments of a 16th of the bound (at
            // most 4 MiB, at least 4 KiB) keep a full queue at least 15/16 used.
            segment_bytes: (config.max_bytes / 16).clamp(4 * 1024, 4 * 1024 * 1024),
            ..Default::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("{path}: {source}{}", limit_hint(.source))]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: the disk is full; the message was not queued")]
    DiskFull { path: PathBuf },
    #[error("the queue is full ({bytes} bytes of {max} allowed) and full_policy = \"reject-new\"")]
    Full { bytes: u64, max: u64 },
    #[error("message of {0} bytes is too large to queue")]
    TooLarge(usize),
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct QueueStats {
    pub depth: u64,
    pub bytes_on_disk: u64,
    pub pushed: u64,
    pub delivered: u64,
    pub dropped_full: u64,
    pub dropped_expired: u64,
    pub dropped_corrupt: u64,
    /// Messages whose source had to wait for room (full disk, or a full queue with
    /// `full_policy = "reject-new"`); none of them is lost.
    pub held_back: u64,
    /// fdatasync calls on segment files: with `fsync = "always"`, pushes made at the same time
    /// share one (group commit), so this grows slower than `pushed`.
    pub syncs: u64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    seq: u64,
    segment: u64,
    offset: u64,
    len: u32,
    /// On the monotonic clock, so that a wall-clock step (NTP, a wrong RTC corrected) neither
    /// expires queued messages early nor keeps them forever. Records loaded from disk are placed
    /// by their wall-clock age at load time: the only clock that survives a reboot.
    enqueued: Instant,
}

#[derive(Debug)]
struct Segment {
    first_seq: u64,
    last_seq: u64,
    bytes: u64,
}

/// Consecutive records of one segment read with one system call. The records of a push lie one
/// after the other on disk and the pump sends them one after the other: read one at a time they
/// cost a `pread` each, as many as the messages themselves (docs/benchmarks.md).
struct ReadAhead {
    segment: u64,
    /// Where `bytes` start in the segment.
    offset: u64,
    bytes: Vec<u8>,
}

impl ReadAhead {
    /// `entry`'s record when these bytes hold all of it.
    fn record(&self, entry: &Entry) -> Option<&[u8]> {
        if entry.segment != self.segment || entry.offset < self.offset {
            return None;
        }
        let start = usize::try_from(entry.offset - self.offset).ok()?;
        self.bytes
            .get(start..start.checked_add(entry.len as usize)?)
    }

    /// True when `entry` is the last record these bytes hold.
    fn ends_with(&self, entry: &Entry) -> bool {
        entry.segment == self.segment
            && entry.offset + u64::from(entry.len) == self.offset + self.bytes.len() as u64
    }
}

struct Inner {
    dir: PathBuf,
    settings: QueueSettings,
    /// Every queued, unacknowledged message, in order.
    entries: VecDeque<Entry>,
    /// How many of `entries` (from the front) were handed out.
    handed_out: usize,
    /// Acknowledged out of order, waiting for the gap below them to close.
    acked_ahead: BTreeSet<u64>,
    /// The ack state changed since it was last written.
    ack_dirty: bool,
    /// Everything ≤ this is acknowledged.
    acked: u64,
    acked_written: u64,
    acked_written_at: Instant,
    next_seq: u64,
    segments: VecDeque<Segment>,
    /// The segment being written; shared so that a group commit's leader syncs it unlocked.
    writer: Option<(u64, Arc<File>)>,
    /// The segment last read from, kept open: the pump reads message after message from the
    /// same file, and opening it for each one was the hottest part of the agent's send path.
    reader: Option<(u64, File)>,
    /// Records read from `reader` and not yet handed out.
    read_ahead: Option<ReadAhead>,
    /// Tests only: reads of segment files for `read_ahead`.
    #[cfg(test)]
    span_reads: u64,
    /// The last read failed for want of a resource: the pump polls until it succeeds.
    read_stalled: bool,
    /// Writing `acked` failed and was logged; not yet written since.
    ack_write_failing: bool,
    dirty_since: Option<Instant>,
    durability: Durability,
    stats: QueueStats,
}

/// Where the write stream stands, for `fsync = "always"`: positions are bytes appended since
/// the queue was opened, over all segments.
#[derive(Default)]
struct Durability {
    written: u64,
    /// Everything up to here is synced, or gone (a segment deleted: dropped or acknowledged).
    synced: u64,
    /// A pusher is syncing for all (group commit's leader); the others wait on `sync_done`.
    leader: bool,
    /// The last sync that failed: pushes up to `through` not yet answered fail.
    failure: Option<SyncFailure>,
}

struct SyncFailure {
    through: u64,
    path: PathBuf,
    kind: std::io::ErrorKind,
    text: String,
}

impl SyncFailure {
    fn error(&self) -> QueueError {
        QueueError::Io {
            path: self.path.clone(),
            source: std::io::Error::new(self.kind, self.text.clone()),
        }
    }
}

pub struct Queue {
    inner: Mutex<Inner>,
    /// `fsync = "always"`: a push returns only after its sync.
    syncs_each_push: bool,
    /// Signalled when a group commit's sync ends.
    sync_done: Condvar,
    available: Notify,
    /// Tests only: holds a group commit's leader before it takes what to sync.
    #[cfg(test)]
    pub(super) leader_gate: test_gate::Gate,
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> QueueError + '_ {
    move |source| {
        if source.raw_os_error() == Some(28) {
            QueueError::DiskFull {
                path: path.to_path_buf(),
            }
        } else {
            QueueError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{first_seq:016x}.seg"))
}

impl Queue {
    /// Opens (or creates, 0700) the queue directory and rebuilds the index from the segments.
    /// Returns warnings about damaged records for the daemon to log.
    pub fn open(dir: &Path, settings: QueueSettings) -> Result<(Queue, Vec<String>), QueueError> {
        if !dir.exists() {
            create_private_dir(dir)?;
        }
        let (acked, acked_ahead, acked_warning) = read_acked(&dir.join("acked"));
        let files = segment_files(dir)?;
        let mut loaded = Loaded::new(acked, acked_ahead);
        loaded.warnings.extend(acked_warning);
        for (i, (first_seq, path)) in files.iter().enumerate() {
            // The next segment starts where this one ended: its name bounds this one's records.
            let next_first = files.get(i + 1).map(|(next, _)| *next);
            loaded.load_segment(*first_seq, path, next_first)?;
        }
        let syncs_each_push = settings.fsync == FsyncPolicy::Always;
        let (inner, warnings) = loaded.into_inner(dir, settings);
        let queue = Queue {
            inner: Mutex::new(inner),
            syncs_each_push,
            sync_done: Condvar::new(),
            available: Notify::new(),
            #[cfg(test)]
            leader_gate: Default::default(),
        };
        Ok((queue, warnings))
    }

    /// True with `fsync = "always"`: each push waits for a sync of the disk.
    pub fn syncs_each_push(&self) -> bool {
        self.syncs_each_push
    }

    /// Persists `message` (per the fsync policy) and returns its sequence number.
    pub fn push(&self, message: &TelemetryMessage) -> Result<u64, QueueError> {
        let seqs = self.push_batch(std::slice::from_ref(message))?;
        Ok(seqs[0])
    }

    /// Persists `messages` in one write (and with `fsync = "always"` one sync, shared with
    /// concurrent pushes) and returns their sequence numbers, in order. All or none are queued:
    /// a full queue that rejects new messages, a full disk or one message too large refuses the
    /// whole batch.
    pub fn push_batch(&self, messages: &[TelemetryMessage]) -> Result<Vec<u64>, QueueError> {
        // Encoded before taking the lock; only the sequence numbers wait for it.
        let encoded = messages
            .iter()
            .map(|m| {
                let bytes = record::encode_message(m);
                match bytes.len() > MAX_MESSAGE {
                    true => Err(QueueError::TooLarge(bytes.len())),
                    false => Ok(bytes),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        if encoded.is_empty() {
            return Ok(Vec::new());
        }
        let mut q = self.inner.lock().unwrap();
        q.expire();
        let first_seq = q.next_seq;
        let enqueued_ms = unix_millis();
        let mut records = Vec::with_capacity(encoded.iter().map(|m| m.len() + 32).sum());
        let mut ends = Vec::with_capacity(encoded.len());
        for (seq, message) in (first_seq..).zip(&encoded) {
            record::put_compact_record(&mut records, seq, enqueued_ms, message);
            ends.push(records.len() as u64);
        }
        q.make_room(records.len() as u64)?;
        let last_seq = first_seq + encoded.len() as u64 - 1;
        let (segment, offset) = q.append(first_seq, last_seq, &records)?;
        let enqueued = Instant::now();
        let mut start = 0;
        for (seq, end) in (first_seq..).zip(ends) {
            q.entries.push_back(Entry {
                seq,
                segment,
                offset: offset + start,
                len: (end - start) as u32,
                enqueued,
            });
            start = end;
        }
        q.next_seq = last_seq + 1;
        q.stats.pushed += encoded.len() as u64;
        q.update_depth();
        let through = q.durability.written;
        let always = q.settings.fsync == FsyncPolicy::Always;
        // Sendable now: a message may reach the hub before its sync ends, which costs nothing
        // (its source is answered only after the sync).
        self.available.notify_one();
        if always {
            self.wait_synced(q, through)?;
        }
        Ok((first_seq..=last_seq).collect())
    }

    /// Returns once everything up to `through` is on disk: syncs itself, for every pusher
    /// waiting, unless a sync is under way (then it waits for that one and looks again).
    fn wait_synced<'a>(
        &'a self,
        mut q: MutexGuard<'a, Inner>,
        through: u64,
    ) -> Result<(), QueueError> {
        loop {
            // A failure first: a later sync of another segment does not cover this one's loss.
            if let Some(failure) = &q.durability.failure
                && failure.through >= through
            {
                return Err(failure.error());
            }
            if q.durability.synced >= through {
                return Ok(());
            }
            if q.durability.leader {
                q = self.sync_done.wait(q).unwrap();
                continue;
            }
            q.durability.leader = true;
            #[cfg(test)]
            {
                drop(q);
                self.leader_gate.pass();
                q = self.inner.lock().unwrap();
            }
            let target = q.durability.written;
            // No writer means the last one was retired, which settles its bytes: nothing to do.
            let writer = q.writer.clone();
            let result = match &writer {
                Some((_, file)) => {
                    drop(q);
                    let result = file.sync_data();
                    q = self.inner.lock().unwrap();
                    q.stats.syncs += 1;
                    result
                }
                None => Ok(()),
            };
            q.durability.leader = false;
            match result {
                Ok(()) => q.durability.synced = q.durability.synced.max(target),
                Err(e) => {
                    let id = writer.map(|(id, _)| id).unwrap_or_default();
                    q.durability.failure = Some(SyncFailure {
                        through: target,
                        path: segment_path(&q.dir, id),
                        kind: e.kind(),
                        text: e.to_string(),
                    });
                }
            }
            self.sync_done.notify_all();
        }
    }

    /// Up to `max` messages not yet handed out, in order, without waiting.
    pub fn take_batch(&self, max: usize) -> Vec<(u64, TelemetryMessage)> {
        let mut q = self.inner.lock().unwrap();
        let mut out = Vec::new();
        while out.len() < max && q.handed_out < q.entries.len() {
            let index = q.handed_out;
            let entry = q.entries[index];
            q.handed_out += 1;
            if q.acked_ahead.contains(&entry.seq) {
                continue;
            }
            match q.read(index) {
                Ok(message) => out.push((entry.seq, message)),
                Err(ReadError::NotNow(e)) => {
                    // The record is fine, the agent is short of something (file descriptors):
                    // it stays queued and is read again at the next try.
                    q.handed_out -= 1;
                    if !std::mem::replace(&mut q.read_stalled, true) {
                        tracing::error!(
                            "cannot read queued message {} now, retrying: {e}",
                            entry.seq
                        );
                    }
                    break;
                }
                Err(ReadError::Gone(e)) => {
                    // The record went away or changed under the agent (a segment cut short or
                    // overwritten): count it and move on.
                    tracing::error!(
                        "queued message {} is unreadable and dropped (counted in dropped_corrupt): {e}",
                        entry.seq
                    );
                    q.stats.dropped_corrupt += 1;
                    q.mark_acked(entry.seq);
                }
            }
            if std::mem::take(&mut q.read_stalled) {
                tracing::info!("queued messages can be read again");
            }
        }
        out
    }

    /// Waits for the next message not yet handed out.
    pub async fn next(&self) -> (u64, TelemetryMessage) {
        loop {
            let notified = self.available.notified();
            if let Some(m) = self.take_batch(1).pop() {
                return m;
            }
            if self.inner.lock().unwrap().read_stalled {
                // Nothing will notify: look again shortly.
                let _ = tokio::time::timeout(READ_RETRY, notified).await;
            } else {
                notified.await;
            }
        }
    }

    /// The hub acknowledged `seq`: it will not be sent again.
    pub fn ack(&self, seq: u64) {
        let mut q = self.inner.lock().unwrap();
        q.stats.delivered += 1;
        q.mark_acked(seq);
        q.flush_acked(false);
    }

    /// A source's message had to wait for room; counted once per message.
    pub fn note_held_back(&self) {
        self.inner.lock().unwrap().stats.held_back += 1;
    }

    /// After a connection loss: hand out again, in order, everything not acknowledged.
    pub fn requeue_unacked(&self) {
        let mut q = self.inner.lock().unwrap();
        q.handed_out = 0;
        drop(q);
        self.available.notify_waiters();
    }

    /// Periodic work: fsync for the `interval` policy, expiry, persisting the ack cursor.
    pub fn tick(&self) {
        let mut q = self.inner.lock().unwrap();
        q.expire();
        q.flush_acked(false);
        if let Some(since) = q.dirty_since
            && since.elapsed() >= q.settings.fsync_interval
            && let Some((_, file)) = &q.writer
        {
            let _ = file.sync_data();
            q.dirty_since = None;
            q.stats.syncs += 1;
        }
    }

    pub fn stats(&self) -> QueueStats {
        self.inner.lock().unwrap().stats.clone()
    }

    /// Writes the ack cursor and syncs the open segment.
    pub fn close(&self) {
        let mut q = self.inner.lock().unwrap();
        q.flush_acked(true);
        if let Some((_, file)) = &q.writer {
            let _ = file.sync_data();
            q.stats.syncs += 1;
        }
    }
}

/// The message in `record` (`entry`'s bytes as read from its segment in `dir`), checked against
/// its checksum and its sequence number. The segment's path is made only for an error: this runs
/// for every message sent.
fn decode_record(dir: &Path, entry: &Entry, record: &[u8]) -> Result<TelemetryMessage, ReadError> {
    let path = || segment_path(dir, entry.segment);
    let intact = record::frame(record) == Frame::Whole { len: record.len() };
    let header = RecordHeader::parse(record)
        .ok()
        .filter(|header| intact && header.seq == entry.seq);
    let Some(header) = header else {
        return Err(ReadError::Gone(format!(
            "{}: the record at offset {} changed since it was written",
            path().display(),
            entry.offset
        )));
    };
    header.message(record).map_err(|e| {
        ReadError::Gone(format!(
            "{}: record at offset {} cannot be decoded: {e}",
            path().display(),
            entry.offset
        ))
    })
}

fn create_private_dir(dir: &Path) -> Result<(), QueueError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io_err(dir))
}

/// The `acked` file: the contiguous cursor on the first line, the sequence numbers acknowledged
/// out of order above it on the second, each line ended by a newline. A missing file
/// acknowledges nothing. A damaged one (cut short by a power cut) keeps only what is whole: a
/// line without its newline may be a number cut short, which could name a message never
/// acknowledged; taking less means sending some messages twice, never losing one. The warning
/// says what was done.
fn read_acked(path: &Path) -> (u64, BTreeSet<u64>, Option<String>) {
    let text = match std::fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (0, BTreeSet::new(), None),
        Err(e) => {
            let warning = format!(
                "{}: {e}; every message still queued on disk will be sent (some perhaps again)",
                path.display()
            );
            return (0, BTreeSet::new(), Some(warning));
        }
    };
    let whole: Vec<&str> = text.split_inclusive('\n').collect();
    let line = |i: usize| whole.get(i).and_then(|l| l.strip_suffix('\n'));
    let acked = line(0).and_then(|t| t.trim().parse::<u64>().ok());
    let ahead: Option<BTreeSet<u64>> = line(1).and_then(|t| {
        t.split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| s.trim().parse().ok())
            .collect()
    });
    match (acked, ahead) {
        (Some(acked), Some(ahead)) if whole.len() == 2 => (acked, ahead, None),
        (Some(acked), _) => {
            let warning = format!(
                "{}: damaged after its first line (cut short?): only the position {acked} is kept; messages acknowledged out of order above it will be sent again",
                path.display()
            );
            (acked, BTreeSet::new(), Some(warning))
        }
        (None, _) => {
            let warning = format!(
                "{}: damaged ({} bytes; cut short?): every message still queued on disk will be sent, some perhaps again",
                path.display(),
                text.len()
            );
            (0, BTreeSet::new(), Some(warning))
        }
    }
}

/// The segment files in `dir`, by first sequence number.
fn segment_files(dir: &Path) -> Result<Vec<(u64, PathBuf)>, QueueError> {
    let mut names: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let stem = p.file_name()?.to_str()?.strip_suffix(".seg")?;
            u64::from_str_radix(stem, 16).ok().map(|n| (n, p))
        })
        .collect();
    names.sort();
    Ok(names)
}

/// The index being rebuilt from the segments at open.
struct Loaded {
    acked: u64,
    /// From the `acked` file: acknowledged out of order, so not lost if missing.
    acked_ahead: BTreeSet<u64>,
    entries: VecDeque<Entry>,
    segments: VecDeque<Segment>,
    max_seq: u64,
    stats: QueueStats,
    warnings: Vec<String>,
    /// Now on both clocks: a loaded record is placed on the monotonic clock by its wall-clock age.
    wall_now: u64,
    mono_now: Instant,
}

impl Loaded {
    fn new(acked: u64, acked_ahead: BTreeSet<u64>) -> Loaded {
        Loaded {
            acked,
            acked_ahead,
            entries: VecDeque::new(),
            segments: VecDeque::new(),
            max_seq: acked,
            stats: QueueStats::default(),
            warnings: Vec::new(),
            wall_now: unix_millis(),
            mono_now: Instant::now(),
        }
    }

    fn placed(&self, enqueued_ms: u64) -> Instant {
        // A record "from the future" (the clock went back since) counts as just enqueued; so
        // does one written by a clock that could not be true (1970 on a board without an RTC):
        // its age is unknown. Said here rather than left to `checked_sub` below, which today
        // gives None for an age beyond the uptime (decades) and so keeps it too, by accident.
        if enqueued_ms < EARLIEST_TRUE_TIME * 1000 {
            return self.mono_now;
        }
        let age = Duration::from_millis(self.wall_now.saturating_sub(enqueued_ms));
        self.mono_now.checked_sub(age).unwrap_or(self.mono_now)
    }

    /// Indexes one segment's unacknowledged records, skipping damaged ones with a warning. A
    /// segment with nothing unacknowledged left is deleted.
    ///
    /// What was lost is counted by sequence number: a segment holds consecutive numbers from the
    /// one in its name up to the next segment's first, so every number in that range that is
    /// neither on disk nor acknowledged was a message the damage took (a record cut short by a
    /// power cut, the records after it, a record whose checksum fails). The newest segment has
    /// no next one: there only the damaged records seen count, since records wholly past a cut
    /// leave no trace.
    fn load_segment(
        &mut self,
        first_seq: u64,
        path: &Path,
        next_first: Option<u64>,
    ) -> Result<(), QueueError> {
        let mut bytes = Vec::new();
        File::open(path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(io_err(path))?;
        let mut offset = 0usize;
        let mut last_seq = first_seq;
        let mut live = false;
        // The sequence number the next record should carry, and the damaged records since the
        // last whole one.
        let mut expected = first_seq;
        let mut damaged = 0u64;
        let mut lost = 0u64;
        while offset < bytes.len() {
            let len = match record::frame(&bytes[offset..]) {
                Frame::TornHeader => break,
                Frame::Unframeable => {
                    self.warnings.push(format!(
                        "{}: record at offset {offset} is cut short or has a corrupt length; the last {} bytes of this segment are given up",
                        path.display(),
                        bytes.len() - offset
                    ));
                    damaged += 1;
                    offset = bytes.len();
                    break;
                }
                Frame::BadChecksum { len } => {
                    self.warnings.push(format!(
                        "{}: record at offset {offset} fails its checksum and is skipped",
                        path.display()
                    ));
                    damaged += 1;
                    offset += len;
                    continue;
                }
                Frame::Whole { len } => len,
            };
            let record = &bytes[offset..offset + len];
            match RecordHeader::parse(record) {
                // Its sequence number unknown: counted with the range it leaves out.
                Err(e) => {
                    self.undecodable(path, offset, &e);
                    damaged += 1;
                }
                Ok(header) => {
                    lost += self.unacknowledged_between(expected, header.seq);
                    expected = expected.max(header.seq + 1);
                    damaged = 0;
                    // Taken even from an undecodable message: a new one must not reuse it.
                    self.max_seq = self.max_seq.max(header.seq);
                    last_seq = last_seq.max(header.seq);
                    // Decoded now (when still needed), so that what is kept is readable later.
                    if header.seq > self.acked {
                        match header.message(record) {
                            // Told and counted here: the range count below is for what left
                            // no readable record.
                            Err(e) => {
                                self.undecodable(path, offset, &e);
                                self.stats.dropped_corrupt +=
                                    self.unacknowledged_between(header.seq, header.seq + 1);
                            }
                            Ok(_) => {
                                live = true;
                                self.entries.push_back(Entry {
                                    seq: header.seq,
                                    segment: first_seq,
                                    offset: offset as u64,
                                    len: len as u32,
                                    enqueued: self.placed(header.enqueued_ms),
                                });
                            }
                        }
                    }
                }
            }
            offset += len;
        }
        if offset < bytes.len() {
            self.warnings.push(format!(
                "{}: {} trailing bytes (a torn write) are ignored",
                path.display(),
                bytes.len() - offset
            ));
            damaged += 1;
        }
        let end = next_first.unwrap_or(expected + damaged).max(expected);
        lost += self.unacknowledged_between(expected, end);
        if lost > 0 {
            let bound = match next_first {
                Some(_) => "",
                None => " at least (the newest segment: records wholly past a cut leave no trace)",
            };
            self.warnings.push(format!(
                "{}: {lost} queued messages{bound} are lost with the damage; counted in dropped_corrupt",
                path.display(),
            ));
            self.stats.dropped_corrupt += lost;
        }
        if live {
            self.segments.push_back(Segment {
                first_seq,
                last_seq,
                bytes: bytes.len() as u64,
            });
        } else {
            // Fully acknowledged: nothing in it is needed any more.
            let _ = std::fs::remove_file(path);
        }
        Ok(())
    }

    fn undecodable(&mut self, path: &Path, offset: usize, error: &record::RecordError) {
        self.warnings.push(format!(
            "{}: record at offset {offset} cannot be decoded ({error}) and is skipped",
            path.display()
        ));
    }

    /// How many sequence numbers in `from..to` were neither acknowledged in order nor out of
    /// order: messages that should be on disk.
    fn unacknowledged_between(&self, from: u64, to: u64) -> u64 {
        let from = from.max(self.acked + 1);
        if from >= to {
            return 0;
        }
        (to - from) - self.acked_ahead.range(from..to).count() as u64
    }

    /// The queue's state over what was loaded, and the warnings.
    fn into_inner(self, dir: &Path, settings: QueueSettings) -> (Inner, Vec<String>) {
        let Loaded {
            acked,
            acked_ahead,
            entries,
            segments,
            max_seq,
            mut stats,
            warnings,
            ..
        } = self;
        // Out-of-order acknowledgements apply only to messages still on disk.
        let acked_ahead: BTreeSet<u64> = acked_ahead
            .into_iter()
            .filter(|seq| entries.iter().any(|e: &Entry| e.seq == *seq))
            .collect();
        stats.depth = (entries.len() - acked_ahead.len()) as u64;
        stats.bytes_on_disk = segments.iter().map(|s| s.bytes).sum();
        let inner = Inner {
            dir: dir.to_path_buf(),
            settings,
            entries,
            handed_out: 0,
            acked_ahead,
            ack_dirty: false,
            acked,
            acked_written: acked,
            acked_written_at: Instant::now(),
            // Saturating: a damaged `acked` file may say anything.
            next_seq: max_seq.saturating_add(1),
            segments,
            writer: None,
            reader: None,
            read_ahead: None,
            #[cfg(test)]
            span_reads: 0,
            read_stalled: false,
            ack_write_failing: false,
            dirty_since: None,
            durability: Durability::default(),
            stats,
        };
        (inner, warnings)
    }
}

impl Inner {
    /// Makes room for `len` more bytes within `max_bytes`, as `full_policy` says.
    fn make_room(&mut self, len: u64) -> Result<(), QueueError> {
        while self.stats.bytes_on_disk + len > self.settings.max_bytes {
            if self.reclaim_idle_writer() {
                continue;
            }
            match self.settings.full_policy {
                FullPolicy::RejectNew => {
                    return Err(QueueError::Full {
                        bytes: self.stats.bytes_on_disk,
                        max: self.settings.max_bytes,
                    });
                }
                FullPolicy::DropOldest => {
                    if !self.drop_oldest_segment() {
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes `records` (sequence numbers `first_seq..=last_seq`) with one write to the segment
    /// being written, rolling to a new segment first when it is full; their segment and offset.
    fn append(
        &mut self,
        first_seq: u64,
        last_seq: u64,
        records: &[u8],
    ) -> Result<(u64, u64), QueueError> {
        let roll = match (&self.writer, self.segments.back()) {
            (Some((id, _)), Some(last)) => {
                last.first_seq != *id
                    || last.bytes >= self.settings.segment_bytes
                    || self.writer_changed()
            }
            _ => true,
        };
        if roll {
            let path = segment_path(&self.dir, first_seq);
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&path)
                .map_err(io_err(&path))?;
            if self.settings.fsync == FsyncPolicy::Always {
                // The new file's name must survive a power loss as its records will.
                File::open(&self.dir)
                    .and_then(|dir| dir.sync_all())
                    .map_err(io_err(&self.dir))?;
            }
            self.retire_writer(true);
            self.writer = Some((first_seq, Arc::new(file)));
            self.segments.push_back(Segment {
                first_seq,
                last_seq: first_seq,
                bytes: 0,
            });
        }
        let (id, file) = self.writer.as_ref().expect("writer opened above");
        let id = *id;
        let segment = self.segments.back_mut().expect("segment pushed above");
        let offset = segment.bytes;
        if let Err(e) = (&**file).write_all(records) {
            // A partial record would be skipped as torn at the next open; cut it off now so
            // later records stay readable.
            let _ = file.set_len(offset);
            let _ = (&**file).seek(SeekFrom::End(0));
            return Err(io_err(&segment_path(&self.dir, id))(e));
        }
        if self.settings.fsync == FsyncPolicy::Interval {
            self.dirty_since.get_or_insert_with(Instant::now);
        }
        segment.bytes += records.len() as u64;
        segment.last_seq = last_seq;
        self.stats.bytes_on_disk += records.len() as u64;
        self.durability.written += records.len() as u64;
        Ok((id, offset))
    }

    /// Takes the segment being written out of use. With `fsync = "always"` a segment that stays
    /// (`keep`) is synced first, so that no pusher's record is left in a file nobody syncs; one
    /// being deleted holds nothing a pusher still waits for (its messages are dropped or
    /// acknowledged).
    fn retire_writer(&mut self, keep: bool) {
        let Some((id, file)) = self.writer.take() else {
            return;
        };
        let durability = &mut self.durability;
        if keep
            && self.settings.fsync == FsyncPolicy::Always
            && durability.synced < durability.written
        {
            self.stats.syncs += 1;
            if let Err(e) = file.sync_data() {
                durability.failure = Some(SyncFailure {
                    through: durability.written,
                    path: segment_path(&self.dir, id),
                    kind: e.kind(),
                    text: e.to_string(),
                });
                return;
            }
        }
        durability.synced = durability.written;
    }

    /// True when the segment being written is no longer as long as what the agent wrote to it
    /// (cut short by a power cut of its file system, or by another process): appending to it
    /// would put records where the index does not expect them, so the next one starts a new
    /// segment. What was cut off is found, counted and logged as its messages are read.
    fn writer_changed(&mut self) -> bool {
        let (Some((id, file)), Some(last)) = (&self.writer, self.segments.back()) else {
            return false;
        };
        let Ok(meta) = file.metadata() else {
            return false;
        };
        if meta.len() == last.bytes {
            return false;
        }
        tracing::error!(
            "{}: {} bytes long where the agent wrote {}: cut short under the agent; queueing goes on in a new segment",
            segment_path(&self.dir, *id).display(),
            meta.len(),
            last.bytes
        );
        self.retire_writer(false);
        true
    }

    /// The message of `entries[index]`, read back with its checksum: a record cut off or
    /// overwritten since it was written is gone, not sent as something else. Read together with
    /// the consecutive records after it (`ReadAhead`), which the next calls then take from
    /// memory.
    fn read(&mut self, index: usize) -> Result<TelemetryMessage, ReadError> {
        let entry = self.entries[index];
        if self
            .read_ahead
            .as_ref()
            .and_then(|ahead| ahead.record(&entry))
            .is_none()
        {
            let span = self.consecutive_bytes_from(index);
            self.read_ahead = Some(self.read_span(&entry, span)?);
        }
        let ahead = self.read_ahead.as_ref().expect("read above");
        let buf = ahead
            .record(&entry)
            .expect("the span read holds the record");
        let message = decode_record(&self.dir, &entry, buf);
        if ahead.ends_with(&entry) {
            // All handed out: the memory goes back until the next read.
            self.read_ahead = None;
        }
        message
    }

    /// How many bytes the records from `entries[index]` on fill that lie one after the other in
    /// its segment, up to `READ_AHEAD_BYTES` (or the one record, when larger).
    fn consecutive_bytes_from(&self, index: usize) -> u64 {
        let first = self.entries[index];
        let mut end = first.offset + u64::from(first.len);
        for next in self.entries.range(index + 1..) {
            let next_end = next.offset + u64::from(next.len);
            if next.segment != first.segment
                || next.offset != end
                || next_end - first.offset > READ_AHEAD_BYTES
            {
                break;
            }
            end = next_end;
        }
        end - first.offset
    }

    /// Reads `span` bytes of `entry`'s segment from its record on, or as many as the segment
    /// still has, as long as they hold the whole record.
    fn read_span(&mut self, entry: &Entry, span: u64) -> Result<ReadAhead, ReadError> {
        let path = segment_path(&self.dir, entry.segment);
        let failed = |e: std::io::Error| {
            let text = format!("{}: {e}{}", path.display(), limit_hint(&e));
            match is_transient(&e) {
                true => ReadError::NotNow(text),
                false => ReadError::Gone(text),
            }
        };
        let file = match &self.reader {
            Some((id, file)) if *id == entry.segment => file,
            _ => {
                let file = File::open(&path).map_err(failed)?;
                &self.reader.insert((entry.segment, file)).1
            }
        };
        #[cfg(test)]
        {
            self.span_reads += 1;
        }
        let mut bytes = vec![0u8; span as usize];
        let mut filled = 0;
        while filled < bytes.len() {
            match file.read_at(&mut bytes[filled..], entry.offset + filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(failed(e)),
            }
        }
        if filled < entry.len as usize {
            return Err(ReadError::Gone(format!(
                "{}: the segment ends before the record at offset {} (cut short since it was written)",
                path.display(),
                entry.offset
            )));
        }
        bytes.truncate(filled);
        Ok(ReadAhead {
            segment: entry.segment,
            offset: entry.offset,
            bytes,
        })
    }

    fn update_depth(&mut self) {
        self.stats.depth = (self.entries.len() - self.acked_ahead.len()) as u64;
    }

    fn mark_acked(&mut self, seq: u64) {
        if seq <= self.acked {
            return;
        }
        self.ack_dirty = true;
        self.acked_ahead.insert(seq);
        // Advance over the contiguous acknowledged prefix of the queue.
        while let Some(front) = self.entries.front().copied() {
            if !self.acked_ahead.remove(&front.seq) {
                break;
            }
            self.entries.pop_front();
            self.handed_out = self.handed_out.saturating_sub(1);
            self.acked = front.seq;
        }
        if self.entries.is_empty() {
            self.acked = self.acked.max(self.next_seq.saturating_sub(1));
            self.acked_ahead.clear();
        } else if let Some(front) = self.entries.front() {
            self.acked = self.acked.max(front.seq - 1);
        }
        self.update_depth();
        self.delete_finished_segments();
    }

    fn delete_finished_segments(&mut self) {
        while let Some(first) = self.segments.front() {
            let is_writer = self
                .writer
                .as_ref()
                .is_some_and(|(id, _)| *id == first.first_seq);
            // The segment being written stays even when all of it is acknowledged: a queue
            // drained as fast as it fills would otherwise create and delete a file per message.
            // It goes when it is rolled, when its space is needed (`reclaim_idle_writer`) or at
            // the next start.
            if first.last_seq > self.acked || is_writer {
                break;
            }
            let done = self.segments.pop_front().expect("front exists");
            self.remove_segment(&done);
        }
    }

    fn remove_segment(&mut self, done: &Segment) {
        self.stats.bytes_on_disk = self.stats.bytes_on_disk.saturating_sub(done.bytes);
        if self
            .reader
            .as_ref()
            .is_some_and(|(id, _)| *id == done.first_seq)
        {
            self.reader = None;
        }
        if self
            .read_ahead
            .as_ref()
            .is_some_and(|ahead| ahead.segment == done.first_seq)
        {
            self.read_ahead = None;
        }
        let _ = std::fs::remove_file(segment_path(&self.dir, done.first_seq));
    }

    /// Deletes the segment being written when every message in it is acknowledged, to make
    /// room in a full queue. False when there is no such segment.
    fn reclaim_idle_writer(&mut self) -> bool {
        let idle = self.entries.is_empty()
            && self.segments.len() == 1
            && self.segments[0].last_seq <= self.acked
            && self.writer.is_some();
        if !idle {
            return false;
        }
        self.retire_writer(false);
        let done = self.segments.pop_front().expect("checked");
        self.remove_segment(&done);
        true
    }

    /// Drops the oldest segment's messages (full queue). False when nothing can be dropped.
    fn drop_oldest_segment(&mut self) -> bool {
        let Some(oldest) = self.segments.front() else {
            return false;
        };
        let last = oldest.last_seq;
        let mut dropped = 0;
        while self.entries.front().is_some_and(|e| e.seq <= last) {
            let e = self.entries.pop_front().expect("checked");
            self.handed_out = self.handed_out.saturating_sub(1);
            if !self.acked_ahead.remove(&e.seq) {
                dropped += 1;
            }
        }
        self.stats.dropped_full += dropped;
        self.acked = self.acked.max(last);
        self.ack_dirty = true;
        self.update_depth();
        let before = self.segments.len();
        // The writer segment may be the oldest: close it so the next push starts a fresh one.
        if self
            .writer
            .as_ref()
            .is_some_and(|(id, _)| Some(*id) == self.segments.front().map(|s| s.first_seq))
        {
            self.retire_writer(false);
        }
        let done = self.segments.pop_front().expect("checked");
        self.remove_segment(&done);
        if dropped > 0 {
            tracing::warn!(dropped, "queue full: oldest messages dropped");
        }
        self.flush_acked(true);
        before != self.segments.len()
    }

    /// Drops messages older than `max_age` from the front.
    fn expire(&mut self) {
        let mut expired = 0;
        while let Some(front) = self.entries.front() {
            if front.enqueued.elapsed() <= self.settings.max_age {
                break;
            }
            let seq = front.seq;
            self.entries.pop_front();
            self.handed_out = self.handed_out.saturating_sub(1);
            if !self.acked_ahead.remove(&seq) {
                expired += 1;
            }
            self.acked = self.acked.max(seq);
            self.ack_dirty = true;
        }
        if expired > 0 {
            tracing::warn!(expired, "queued messages older than max_age dropped");
            self.stats.dropped_expired += expired;
            self.update_depth();
            self.delete_finished_segments();
            self.flush_acked(true);
        }
    }

    fn flush_acked(&mut self, now: bool) {
        if !self.ack_dirty && self.acked == self.acked_written {
            return;
        }
        if !now && self.acked_written_at.elapsed() < self.settings.ack_flush_interval {
            return;
        }
        let path = self.dir.join("acked");
        let ahead: Vec<String> = self.acked_ahead.iter().map(u64::to_string).collect();
        let text = format!("{}\n{}\n", self.acked, ahead.join(","));
        match write_atomic(&path, text.as_bytes()) {
            Ok(()) => {
                self.ack_dirty = false;
                self.acked_written = self.acked;
                self.acked_written_at = Instant::now();
                if std::mem::take(&mut self.ack_write_failing) {
                    tracing::info!("the queue position is persisted again");
                }
            }
            Err(e) => {
                // Retried after the interval, not on every acknowledgement, and logged once
                // until it works again (a full disk or a read-only one would otherwise log an
                // error five times a second). Until then a restart sends these messages again.
                self.acked_written_at = Instant::now();
                if !std::mem::replace(&mut self.ack_write_failing, true) {
                    tracing::error!(
                        "cannot persist the queue position: {e}; messages acknowledged since may be sent again after a restart"
                    );
                }
            }
        }
    }
}

/// A gate a group commit's leader passes before it takes what to sync: a test closes it to have
/// several pushers wait for one sync, without timing.
#[cfg(test)]
pub(super) mod test_gate {
    use std::sync::{Condvar, Mutex};

    #[derive(Default)]
    pub struct Gate {
        closed: Mutex<bool>,
        opened: Condvar,
    }

    impl Gate {
        pub fn set_closed(&self, closed: bool) {
            *self.closed.lock().unwrap() = closed;
            self.opened.notify_all();
        }

        pub fn pass(&self) {
            let closed = self.closed.lock().unwrap();
            drop(self.opened.wait_while(closed, |closed| *closed).unwrap());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(i: u64) -> TelemetryMessage {
        TelemetryMessage {
            message_id: format!("m-{i}"),
            body: format!("{{\"i\":{i}}}").into(),
            content_type: Some("application/json".into()),
            content_encoding: None,
            creation_time: None,
            properties: vec![],
        }
    }

    fn ids(batch: &[(u64, TelemetryMessage)]) -> Vec<String> {
        batch.iter().map(|(_, m)| m.message_id.clone()).collect()
    }

    fn small() -> QueueSettings {
        QueueSettings {
            segment_bytes: 1024,
            ack_flush_interval: Duration::ZERO,
            ..QueueSettings::default()
        }
    }

    #[test]
    fn order_ack_and_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (q, warnings) = Queue::open(dir.path(), small()).unwrap();
        assert!(warnings.is_empty());
        for i in 0..50 {
            q.push(&msg(i)).unwrap();
        }
        let batch = q.take_batch(20);
        assert_eq!(
            ids(&batch),
            (0..20).map(|i| format!("m-{i}")).collect::<Vec<_>>()
        );
        // Out of order acks: 1..20 acked except 5.
        for (seq, _) in &batch {
            if *seq != 6 {
                q.ack(*seq);
            }
        }
        assert_eq!(q.stats().depth, 31);
        q.close();
        drop(q);
        // Restart: message 5 (seq 6) and 20..49 come back, in order; acked ones do not.
        let (q, _) = Queue::open(dir.path(), small()).unwrap();
        let again = q.take_batch(100);
        let mut expected = vec!["m-5".to_string()];
        expected.extend((20..50).map(|i| format!("m-{i}")));
        assert_eq!(ids(&again), expected);
        for (seq, _) in &again {
            q.ack(*seq);
        }
        assert_eq!(q.stats().depth, 0);
        let segments = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "seg")
            })
            .count();
        assert!(
            segments <= 1,
            "acknowledged segments are deleted ({segments} left)"
        );
    }

    fn segment_files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".seg"))
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_queue_drained_as_it_fills_keeps_writing_one_file() {
        let dir = tempfile::tempdir().unwrap();
        let settings = QueueSettings {
            segment_bytes: 1 << 20,
            ..small()
        };
        let (q, _) = Queue::open(dir.path(), settings).unwrap();
        for i in 0..100 {
            let seq = q.push(&msg(i)).unwrap();
            let batch = q.take_batch(10);
            assert_eq!(ids(&batch), vec![format!("m-{i}")]);
            q.ack(seq);
            assert_eq!(segment_files(dir.path()), vec!["0000000000000001.seg"]);
        }
        assert_eq!(q.stats().depth, 0);
        q.close();
        drop(q);
        // Nothing in it is needed after a restart: it is deleted then.
        let (q, _) = Queue::open(dir.path(), small()).unwrap();
        assert!(segment_files(dir.path()).is_empty());
        assert!(q.take_batch(10).is_empty());
    }

    #[test]
    fn an_acknowledged_segment_makes_room_in_a_full_queue_that_rejects_new() {
        let dir = tempfile::tempdir().unwrap();
        // The segment being written never rolls, so only reclaiming it makes room.
        let settings = QueueSettings {
            full_policy: FullPolicy::RejectNew,
            max_bytes: 4096,
            segment_bytes: 1 << 20,
            ..small()
        };
        let (q, _) = Queue::open(dir.path(), settings).unwrap();
        // Ten times the queue's size goes through it; each message is acknowledged at once.
        for i in 0..400 {
            let seq = q.push(&msg(i)).unwrap_or_else(|e| panic!("push {i}: {e}"));
            assert_eq!(q.take_batch(1).len(), 1);
            q.ack(seq);
            assert!(q.stats().bytes_on_disk <= 4096);
        }
        assert_eq!(q.stats().delivered, 400);
    }

    #[test]
    fn a_crash_without_close_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (q, _) = Queue::open(
                dir.path(),
                QueueSettings {
                    fsync: FsyncPolicy::Never,
                    ..small()
                },
            )
            .unwrap();
            for i in 0..30 {
                q.push(&msg(i)).unwrap();
            }
            let batch = q.take_batch(10);
            for (seq, _) in &batch {
                q.ack(*seq);
            }
            // No close(): the ack cursor may lag, never the messages.
        }
        let (q, _) = Queue::open(dir.path(), small()).unwrap();
        let left = ids(&q.take_batch(100));
        for i in 10..30 {
            assert!(left.contains(&format!("m-{i}")), "m-{i} lost");
        }
    }

    #[test]
    fn torn_tails_and_flipped_bytes_are_skipped_with_warnings() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (q, _) = Queue::open(
                dir.path(),
                QueueSettings {
                    segment_bytes: 1 << 20,
                    ..small()
                },
            )
            .unwrap();
            for i in 0..10 {
                q.push(&msg(i)).unwrap();
            }
            q.close();
        }
        let seg = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|x| x == "seg"))
            .unwrap();
        let mut bytes = std::fs::read(&seg).unwrap();
        // Flip a payload byte of the 3rd record and cut the last record in half.
        let record = bytes.len() / 10;
        bytes[2 * record + HEADER + 2] ^= 0xff;
        bytes.truncate(bytes.len() - record / 2);
        std::fs::write(&seg, &bytes).unwrap();
        let (q, warnings) = Queue::open(dir.path(), small()).unwrap();
        assert_eq!(warnings.len(), 3, "{warnings:?}");
        assert!(
            warnings
                .iter()
                .any(|w| w.contains("2 queued messages at least") && w.contains(".seg")),
            "{warnings:?}"
        );
        assert!(
            warnings
                .iter()
                .any(|w| w.contains("checksum") && w.contains(".seg"))
        );
        assert!(warnings.iter().any(|w| w.contains("cut short")));
        let left = ids(&q.take_batch(100));
        assert_eq!(left.len(), 8);
        assert!(!left.contains(&"m-2".to_string()) && !left.contains(&"m-9".to_string()));
        assert_eq!(q.stats().dropped_corrupt, 2);
        // Junk in the directory does not stop the queue.
        std::fs::write(dir.path().join("0000000000000099.seg"), b"garbage").unwrap();
        assert!(Queue::open(dir.path(), small()).is_ok());
    }

    /// The segment files, oldest first, with their sizes.
    fn segments_on_disk(dir: &Path) -> Vec<(PathBuf, u64)> {
        super::segment_files(dir)
            .unwrap()
            .into_iter()
            .map(|(_, p)| {
                let len = std::fs::metadata(&p).unwrap().len();
                (p, len)
            })
            .collect()
    }

    /// Cuts `path` to `len` bytes, as a power cut of its file system would.
    fn cut(path: &Path, len: u64) {
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .unwrap()
            .set_len(len)
            .unwrap();
    }

    /// The message numbers `ids` names.
    fn numbers(ids: &[String]) -> BTreeSet<u64> {
        ids.iter()
            .map(|id| id.strip_prefix("m-").unwrap().parse().unwrap())
            .collect()
    }

    #[test]
    fn segments_cut_short_before_a_start_count_exactly_the_messages_they_held() {
        // Enough compact records for at least four segments of `small()`.
        const N: u64 = 200;
        let dir = tempfile::tempdir().unwrap();
        {
            let (q, _) = Queue::open(dir.path(), small()).unwrap();
            for i in 0..N {
                q.push(&msg(i)).unwrap();
            }
            q.close();
        }
        let segments = segments_on_disk(dir.path());
        assert!(segments.len() >= 4, "{segments:?}");
        // One segment cut mid-record, another to nothing; the newest stays whole.
        cut(&segments[1].0, segments[1].1 / 2 + 3);
        cut(&segments[2].0, 0);
        let (q, warnings) = Queue::open(dir.path(), small()).unwrap();
        let left = numbers(&ids(&q.take_batch(N as usize)));
        let lost = N - left.len() as u64;
        assert!(lost > 0);
        assert_eq!(q.stats().dropped_corrupt, lost, "{warnings:?}");
        for damaged in [&segments[1].0, &segments[2].0] {
            let name = damaged.file_name().unwrap().to_string_lossy().into_owned();
            assert!(
                warnings
                    .iter()
                    .any(|w| w.contains(&name) && w.contains("counted in dropped_corrupt")),
                "{name}: {warnings:?}"
            );
        }
        // What was lost is one stretch: the cut segment's tail and all of the emptied one.
        let missing: Vec<u64> = (0..N).filter(|i| !left.contains(i)).collect();
        assert_eq!(
            missing.last().unwrap() - missing[0] + 1,
            lost,
            "{missing:?}"
        );
    }

    #[test]
    fn records_queued_together_are_read_back_together_up_to_the_read_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let (q, _) = Queue::open(dir.path(), QueueSettings::default()).unwrap();
        let reading = |i: u64| TelemetryMessage {
            body: vec![b'x'; 1000].into(),
            ..msg(i)
        };
        // Two pushes, 300 records of about 1 KiB each, one after the other in one segment, and
        // one of them acknowledged before it was sent (read with its neighbours, not handed out).
        q.push_batch(&(0..100).map(reading).collect::<Vec<_>>())
            .unwrap();
        q.push_batch(&(100..300).map(reading).collect::<Vec<_>>())
            .unwrap();
        q.ack(151);
        let (len, per_read) = {
            let inner = q.inner.lock().unwrap();
            let len = u64::from(inner.entries[0].len);
            (len, READ_AHEAD_BYTES / len)
        };
        assert!(len > 1000 && per_read > 1, "records of {len} bytes");
        // Taken one at a time, as the pump takes them.
        let mut taken = Vec::new();
        while let Some(next) = q.take_batch(1).pop() {
            taken.push(next);
        }
        let expected: Vec<String> = (0..300)
            .filter(|i| *i != 150)
            .map(|i| format!("m-{i}"))
            .collect();
        assert_eq!(ids(&taken), expected);
        assert!(taken.iter().all(|(_, m)| m.body == reading(0).body));
        // Whole reads of `per_read` records each (none starts at the acknowledged one).
        assert_ne!(150 % per_read, 0);
        let reads = 300u64.div_ceil(per_read);
        let inner = q.inner.lock().unwrap();
        assert_eq!(inner.span_reads, reads);
        assert!(inner.read_ahead.is_none(), "all handed out: nothing kept");
    }

    #[test]
    fn segments_cut_short_under_the_running_queue_lose_only_their_records() {
        let dir = tempfile::tempdir().unwrap();
        let (q, _) = Queue::open(dir.path(), small()).unwrap();
        for i in 0..60 {
            q.push(&msg(i)).unwrap();
        }
        let segments = segments_on_disk(dir.path());
        // A middle segment cut mid-record, and the one being written cut to nothing.
        cut(&segments[1].0, segments[1].1 / 2 + 3);
        cut(&segments.last().unwrap().0, 0);
        // Queueing goes on, in a new segment: none of these may be lost.
        for i in 60..80 {
            q.push(&msg(i)).unwrap();
        }
        let left = numbers(&ids(&q.take_batch(100)));
        for i in 60..80 {
            assert!(
                left.contains(&i),
                "m-{i} was queued after the cut and is lost"
            );
        }
        let lost = 80 - left.len() as u64;
        assert!(lost > 0);
        assert_eq!(q.stats().dropped_corrupt, lost);
        assert_eq!(q.stats().depth, left.len() as u64);
        q.close();
        drop(q);
        // Counted once: a restart finds the same losses acknowledged, not lost again.
        let (q, warnings) = Queue::open(dir.path(), small()).unwrap();
        assert_eq!(q.stats().dropped_corrupt, 0, "{warnings:?}");
        assert_eq!(numbers(&ids(&q.take_batch(100))), left);
    }

    #[test]
    fn an_acked_file_cut_short_keeps_only_what_is_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acked");
        let read = |text: &str| {
            std::fs::write(&path, text).unwrap();
            read_acked(&path)
        };
        assert_eq!(read("12\n15,17\n"), (12, [15, 17].into(), None));
        assert_eq!(read("12\n\n"), (12, BTreeSet::new(), None));
        // "17" cut to "1" could name a message never acknowledged: the second line goes.
        let (acked, ahead, warning) = read("12\n15,1");
        assert_eq!((acked, ahead), (12, BTreeSet::new()));
        assert!(
            warning
                .unwrap()
                .contains("acked: damaged after its first line")
        );
        // "1234" cut to "12": a lower position only sends messages again.
        let (acked, _, warning) = read("12");
        assert_eq!(acked, 0);
        assert!(warning.unwrap().contains("every message still queued"));
        let (acked, _, warning) = read("");
        assert_eq!(acked, 0);
        assert!(warning.is_some());
    }

    #[test]
    fn full_policies() {
        let dir = tempfile::tempdir().unwrap();
        let settings = QueueSettings {
            max_bytes: 4096,
            full_policy: FullPolicy::RejectNew,
            ..small()
        };
        let (q, _) = Queue::open(dir.path(), settings).unwrap();
        let mut accepted = 0;
        let err = loop {
            match q.push(&msg(accepted)) {
                Ok(_) => accepted += 1,
                Err(e) => break e,
            }
        };
        assert!(matches!(err, QueueError::Full { .. }), "{err}");
        assert!(accepted > 10);

        let dir = tempfile::tempdir().unwrap();
        let settings = QueueSettings {
            max_bytes: 4096,
            full_policy: FullPolicy::DropOldest,
            ..small()
        };
        let (q, _) = Queue::open(dir.path(), settings).unwrap();
        for i in 0..500 {
            q.push(&msg(i)).unwrap();
        }
        let stats = q.stats();
        assert!(stats.dropped_full > 0);
        assert!(stats.bytes_on_disk <= 4096);
        let left = ids(&q.take_batch(1000));
        assert_eq!(left.last().unwrap(), "m-499", "the newest are kept");
        assert_eq!(left.len() as u64 + stats.dropped_full, 500);
    }

    #[test]
    fn ages_come_from_disk_once_then_from_the_monotonic_clock() {
        let dir = tempfile::tempdir().unwrap();
        let hour = 3_600_000;
        let mut seg = record::json::record(1, unix_millis() - 2 * hour, &msg(1));
        // Written when the clock was a day ahead (then corrected): not expired, not kept forever.
        seg.extend(record::json::record(2, unix_millis() + 24 * hour, &msg(2)));
        seg.extend(record::json::record(3, unix_millis() - 1000, &msg(3)));
        // Written at 1970 (a board without an RTC), the clock set since: age unknown, kept.
        // (Without the explicit rule in `placed` it is kept too: an age beyond the uptime does
        // not fit an Instant. This pins the outcome, whichever way it comes about.)
        seg.extend(record::json::record(4, 5_000, &msg(4)));
        std::fs::write(dir.path().join(format!("{:016x}.seg", 1)), seg).unwrap();
        let (q, warnings) = Queue::open(
            dir.path(),
            QueueSettings {
                max_age: Duration::from_secs(3600),
                ..small()
            },
        )
        .unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        q.tick();
        assert_eq!(q.stats().dropped_expired, 1);
        assert_eq!(ids(&q.take_batch(10)), ["m-2", "m-3", "m-4"]);
    }

    #[test]
    fn expired_messages_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (q, _) = Queue::open(
            dir.path(),
            QueueSettings {
                max_age: Duration::ZERO,
                ..small()
            },
        )
        .unwrap();
        q.push(&msg(1)).unwrap();
        // max_age zero: anything enqueued before now is too old at the next check.
        std::thread::sleep(Duration::from_millis(2));
        q.tick();
        assert_eq!(q.stats().dropped_expired, 1);
        assert!(q.take_batch(10).is_empty());
    }

    #[test]
    fn requeue_hands_out_exactly_the_unacked_again() {
        let dir = tempfile::tempdir().unwrap();
        let (q, _) = Queue::open(dir.path(), small()).unwrap();
        for i in 0..10 {
            q.push(&msg(i)).unwrap();
        }
        let batch = q.take_batch(10);
        q.ack(batch[0].0);
        q.ack(batch[3].0);
        q.requeue_unacked();
        let again = ids(&q.take_batch(10));
        assert_eq!(
            again,
            ["m-1", "m-2", "m-4", "m-5", "m-6", "m-7", "m-8", "m-9"]
        );
    }

    #[test]
    fn random_operations_match_a_model() {
        let dir = tempfile::tempdir().unwrap();
        let settings = QueueSettings {
            segment_bytes: 2048,
            ..small()
        };
        let (mut q, _) = Queue::open(dir.path(), settings.clone()).unwrap();
        let mut model: std::collections::BTreeMap<u64, String> = Default::default();
        let mut handed: Vec<u64> = vec![];
        let mut n = 0u64;
        for step in 0..10_000u32 {
            let op = rand::random::<u8>() % 10;
            match op {
                0..=3 => {
                    let seq = q.push(&msg(n)).unwrap();
                    model.insert(seq, format!("m-{n}"));
                    n += 1;
                }
                4 => {
                    // Batches of 0 to 5 messages.
                    let batch: Vec<_> = (n..n + rand::random::<u64>() % 6).map(msg).collect();
                    let seqs = q.push_batch(&batch).unwrap();
                    assert_eq!(seqs.len(), batch.len(), "step {step}");
                    for (seq, m) in seqs.into_iter().zip(&batch) {
                        model.insert(seq, m.message_id.clone());
                    }
                    n += batch.len() as u64;
                }
                5..=6 => {
                    for (seq, m) in q.take_batch(3) {
                        assert_eq!(model.get(&seq), Some(&m.message_id), "step {step}");
                        handed.push(seq);
                    }
                }
                7..=8 => {
                    if !handed.is_empty() {
                        let seq = handed.swap_remove(rand::random::<u32>() as usize % handed.len());
                        q.ack(seq);
                        model.remove(&seq);
                    }
                }
                _ => {
                    q.close();
                    drop(q);
                    q = Queue::open(dir.path(), settings.clone()).unwrap().0;
                    handed.clear();
                }
            }
            assert_eq!(q.stats().depth, model.len() as u64, "step {step} op {op}");
        }
        q.requeue_unacked();
        let all: Vec<String> = q
            .take_batch(usize::MAX)
            .into_iter()
            .map(|(_, m)| m.message_id)
            .collect();
        assert_eq!(all, model.values().cloned().collect::<Vec<_>>());
    }

    #[test]
    fn json_records_of_older_agents_are_read_with_compact_ones() {
        let dir = tempfile::tempdir().unwrap();
        let now = unix_millis();
        let binary = TelemetryMessage {
            body: bytes::Bytes::from_static(b"\x00\xffraw"),
            content_encoding: Some("utf-8".into()),
            creation_time: Some("2026-12-06T21:58:28.5Z".into()),
            properties: vec![("source".into(), "old".into())],
            ..msg(2)
        };
        // A segment from an older agent, with a damaged record in it.
        let old = [
            record::json::record(1, now, &msg(1)),
            record::json::record(2, now, &binary),
            record::json::record(3, now, &msg(3)),
        ];
        let damaged_at = old[0].len() + old[1].len();
        let mut segment = old.concat();
        segment[damaged_at + HEADER + 1] ^= 0x01;
        std::fs::write(dir.path().join(format!("{:016x}.seg", 1)), segment).unwrap();
        // One with both kinds of record (no agent writes that; the reader takes it record by
        // record all the same).
        let binary_5 = TelemetryMessage {
            message_id: "m-5".into(),
            ..binary.clone()
        };
        let mut mixed = record::json::record(4, now, &msg(4));
        record::put_compact_record(&mut mixed, 5, now, &record::encode_message(&binary_5));
        mixed.extend(record::json::record(6, now, &msg(6)));
        std::fs::write(dir.path().join(format!("{:016x}.seg", 4)), mixed).unwrap();

        let (q, warnings) = Queue::open(dir.path(), small()).unwrap();
        let segment = dir.path().join("0000000000000001.seg");
        assert_eq!(
            warnings,
            [
                format!(
                    "{}: record at offset {damaged_at} fails its checksum and is skipped",
                    segment.display()
                ),
                format!(
                    "{}: 1 queued messages are lost with the damage; counted in dropped_corrupt",
                    segment.display()
                )
            ]
        );
        assert_eq!(q.stats().dropped_corrupt, 1);
        // After the upgrade: compact records, in a segment of their own.
        q.push(&msg(7)).unwrap();
        let back: Vec<_> = q.take_batch(100).into_iter().map(|(_, m)| m).collect();
        assert_eq!(back, [msg(1), binary, msg(4), binary_5, msg(6), msg(7)]);
        // And again after a restart, with some of them acknowledged.
        q.ack(1);
        q.ack(6);
        q.close();
        drop(q);
        let (q, warnings) = Queue::open(dir.path(), small()).unwrap();
        assert_eq!(
            warnings.len(),
            2,
            "the damaged record is reported again, with its loss"
        );
        assert_eq!(ids(&q.take_batch(100)), ["m-2", "m-4", "m-5", "m-7"]);
    }

    #[test]
    fn a_record_that_cannot_be_decoded_is_skipped_with_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        let now = unix_millis();
        let mut segment = Vec::new();
        record::put_compact_record(&mut segment, 1, now, &record::encode_message(&msg(1)));
        let bad_at = segment.len();
        // Its checksum holds, but its flags are from no known format.
        record::put_compact_record(&mut segment, 2, now, &[0x80, 0, 0]);
        record::put_compact_record(&mut segment, 3, now, &record::encode_message(&msg(3)));
        std::fs::write(dir.path().join(format!("{:016x}.seg", 1)), segment).unwrap();
        let (q, warnings) = Queue::open(dir.path(), small()).unwrap();
        assert_eq!(
            warnings,
            [format!(
                "{}: record at offset {bad_at} cannot be decoded (unknown flags 0x80) and is skipped",
                dir.path().join("0000000000000001.seg").display()
            )]
        );
        assert_eq!(q.stats().dropped_corrupt, 1);
        assert_eq!(q.stats().depth, 2);
        assert_eq!(ids(&q.take_batch(10)), ["m-1", "m-3"]);
        // Its sequence number is not given to a new message.
        assert_eq!(q.push(&msg(4)).unwrap(), 4);
    }

    fn always() -> QueueSettings {
        QueueSettings {
            fsync: FsyncPolicy::Always,
            ..small()
        }
    }

    #[test]
    fn pushes_at_the_same_time_share_one_sync() {
        let dir = tempfile::tempdir().unwrap();
        let (q, _) = Queue::open(dir.path(), always()).unwrap();
        let q = Arc::new(q);
        // The first pusher to need a sync leads it; hold it until all four records are written.
        q.leader_gate.set_closed(true);
        let pushers: Vec<_> = (0..4)
            .map(|i| {
                let q = q.clone();
                std::thread::spawn(move || q.push(&msg(i)).unwrap())
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        while q.stats().pushed < 4 {
            assert!(Instant::now() < deadline, "the four pushes did not write");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(q.stats().syncs, 0, "no push returns before its sync");
        assert!(pushers.iter().all(|p| !p.is_finished()));
        q.leader_gate.set_closed(false);
        let mut seqs: Vec<u64> = pushers.into_iter().map(|p| p.join().unwrap()).collect();
        seqs.sort();
        assert_eq!(seqs, [1, 2, 3, 4]);
        assert_eq!(q.stats().syncs, 1, "one sync for the four");
        // Each push alone syncs for itself.
        q.push(&msg(4)).unwrap();
        assert_eq!(q.stats().syncs, 2);
        // On disk after a crash (no close): reopened, all five are there.
        drop(q);
        let (q, warnings) = Queue::open(dir.path(), always()).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        let mut back = ids(&q.take_batch(10));
        back.sort();
        assert_eq!(back, ["m-0", "m-1", "m-2", "m-3", "m-4"]);
    }

    #[test]
    fn a_batch_is_queued_with_one_sync_and_survives_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let (q, _) = Queue::open(dir.path(), always()).unwrap();
        let batch: Vec<_> = (0..10).map(msg).collect();
        assert_eq!(q.push_batch(&batch).unwrap(), (1..=10).collect::<Vec<_>>());
        assert_eq!(q.stats().syncs, 1);
        assert_eq!(q.stats().pushed, 10);
        assert_eq!(q.push_batch(&batch[..3]).unwrap(), [11, 12, 13]);
        assert_eq!(q.stats().syncs, 2);
        assert!(q.push_batch(&[]).unwrap().is_empty());
        assert_eq!(q.stats().syncs, 2, "nothing to sync");
        drop(q);
        let (q, _) = Queue::open(dir.path(), always()).unwrap();
        let back: Vec<_> = q.take_batch(100).into_iter().collect();
        assert_eq!(
            back.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
            (1..=13).collect::<Vec<_>>()
        );
        let messages: Vec<_> = back.into_iter().map(|(_, m)| m).collect();
        assert_eq!(messages[..10], batch[..]);
        assert_eq!(messages[10..], batch[..3]);
    }

    #[test]
    fn a_batch_is_queued_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let (q, _) = Queue::open(dir.path(), small()).unwrap();
        q.push(&msg(0)).unwrap();
        let one = q.stats().bytes_on_disk;
        q.close();
        drop(q);
        // Room for one more message of the same size, not for two.
        let settings = QueueSettings {
            max_bytes: 2 * one,
            full_policy: FullPolicy::RejectNew,
            ..small()
        };
        let (q, _) = Queue::open(dir.path(), settings).unwrap();
        let err = q.push_batch(&[msg(1), msg(2)]).unwrap_err();
        assert!(matches!(err, QueueError::Full { .. }), "{err}");
        assert_eq!(q.stats().pushed, 0);
        q.push(&msg(1)).unwrap();
        assert_eq!(ids(&q.take_batch(10)), ["m-0", "m-1"]);
        // One message too large refuses the batch too.
        let dir = tempfile::tempdir().unwrap();
        let (q, _) = Queue::open(dir.path(), small()).unwrap();
        let huge = TelemetryMessage {
            body: vec![0; 2 * 1024 * 1024].into(),
            ..msg(1)
        };
        let err = q.push_batch(&[msg(0), huge]).unwrap_err();
        assert!(matches!(err, QueueError::TooLarge(_)), "{err}");
        assert_eq!(q.stats().pushed, 0);
        assert!(q.take_batch(10).is_empty());
    }
}
