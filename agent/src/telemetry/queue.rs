//! The durable store-and-forward queue between telemetry sources and the hub session.
//!
//! A message is written to disk before `push` returns, handed to the sender in order, and removed
//! only when the hub acknowledged it (`ack`). After a crash, a power loss (with `fsync = always`)
//! or a reboot, every message not yet acknowledged is sent again; the message id lets the cloud
//! side drop the duplicates of this at-least-once delivery.
//!
//! On disk: append-only segment files `{first_seq:016x}.seg` of records
//! `len u32 | crc32 u32 | seq u64 | enqueued_ms u64 | payload (JSON of the message)` (little
//! endian; the CRC covers seq, time and payload), and `acked`, the highest sequence number below
//! which everything was acknowledged, rewritten atomically at most every `ack_flush_interval`.
//! A damaged record is skipped with a warning naming the file and offset; the rest survives.
//! The memory held is an index entry per queued message (~48 bytes), not the messages.

use std::collections::{BTreeSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::Notify;

use crate::config::{FsyncPolicy, FullPolicy, QueueConfig};
use crate::message::TelemetryMessage;
use crate::util::fs::{is_transient, limit_hint, write_atomic};
use crate::util::time::{EARLIEST_TRUE_TIME, unix_millis};

const HEADER: usize = 4 + 4 + 8 + 8;
/// A record larger than this is a torn or corrupt length field, not a message.
const MAX_RECORD: usize = 1024 * 1024;
/// How soon a record that could not be read for want of a resource (file descriptors) is tried
/// again.
const READ_RETRY: Duration = Duration::from_millis(250);

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
    writer: Option<(u64, File)>,
    /// The segment last read from, kept open: the pump reads message after message from the
    /// same file, and opening it for each one was the hottest part of the agent's send path.
    reader: Option<(u64, File)>,
    /// The last read failed for want of a resource: the pump polls until it succeeds.
    read_stalled: bool,
    /// Writing `acked` failed and was logged; not yet written since.
    ack_write_failing: bool,
    dirty_since: Option<Instant>,
    stats: QueueStats,
}

pub struct Queue {
    inner: Mutex<Inner>,
    available: Notify,
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

fn checksum(seq: u64, enqueued_ms: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(&enqueued_ms.to_le_bytes());
    h.update(payload);
    h.finalize()
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
        let (inner, warnings) = loaded.into_inner(dir, settings);
        let queue = Queue {
            inner: Mutex::new(inner),
            available: Notify::new(),
        };
        Ok((queue, warnings))
    }

    /// Persists `message` (per the fsync policy) and returns its sequence number.
    pub fn push(&self, message: &TelemetryMessage) -> Result<u64, QueueError> {
        let payload = serde_json::to_vec(message).expect("messages serialize");
        if payload.len() > MAX_RECORD {
            return Err(QueueError::TooLarge(payload.len()));
        }
        let mut q = self.inner.lock().unwrap();
        q.expire();
        let record_len = (HEADER + payload.len()) as u64;
        while q.stats.bytes_on_disk + record_len > q.settings.max_bytes {
            if q.reclaim_idle_writer() {
                continue;
            }
            match q.settings.full_policy {
                FullPolicy::RejectNew => {
                    return Err(QueueError::Full {
                        bytes: q.stats.bytes_on_disk,
                        max: q.settings.max_bytes,
                    });
                }
                FullPolicy::DropOldest => {
                    if !q.drop_oldest_segment() {
                        break;
                    }
                }
            }
        }
        let seq = q.next_seq;
        let enqueued_ms = unix_millis();
        let mut record = Vec::with_capacity(HEADER + payload.len());
        record.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        record.extend_from_slice(&checksum(seq, enqueued_ms, &payload).to_le_bytes());
        record.extend_from_slice(&seq.to_le_bytes());
        record.extend_from_slice(&enqueued_ms.to_le_bytes());
        record.extend_from_slice(&payload);
        let (segment, offset) = q.append(seq, &record)?;
        q.next_seq += 1;
        q.entries.push_back(Entry {
            seq,
            segment,
            offset,
            len: record.len() as u32,
            enqueued: Instant::now(),
        });
        q.stats.pushed += 1;
        q.update_depth();
        drop(q);
        self.available.notify_one();
        Ok(seq)
    }

    /// Up to `max` messages not yet handed out, in order, without waiting.
    pub fn take_batch(&self, max: usize) -> Vec<(u64, TelemetryMessage)> {
        let mut q = self.inner.lock().unwrap();
        let mut out = Vec::new();
        while out.len() < max && q.handed_out < q.entries.len() {
            let entry = q.entries[q.handed_out];
            q.handed_out += 1;
            if q.acked_ahead.contains(&entry.seq) {
                continue;
            }
            match q.read(&entry) {
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
        }
    }
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

/// A record's header: `len u32 | crc32 u32 | seq u64 | enqueued_ms u64`.
struct RecordHeader {
    len: usize,
    crc: u32,
    seq: u64,
    enqueued_ms: u64,
}

impl RecordHeader {
    fn decode(bytes: &[u8]) -> RecordHeader {
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
        RecordHeader {
            len: u32_at(0) as usize,
            crc: u32_at(4),
            seq: u64_at(8),
            enqueued_ms: u64_at(16),
        }
    }
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
        while offset + HEADER <= bytes.len() {
            let header = RecordHeader::decode(&bytes[offset..offset + HEADER]);
            let end = offset + HEADER + header.len;
            if header.len > MAX_RECORD || end > bytes.len() {
                self.warnings.push(format!(
                    "{}: record at offset {offset} is cut short or has a corrupt length; the last {} bytes of this segment are given up",
                    path.display(),
                    bytes.len() - offset
                ));
                damaged += 1;
                offset = bytes.len();
                break;
            }
            let payload = &bytes[offset + HEADER..end];
            if checksum(header.seq, header.enqueued_ms, payload) != header.crc {
                self.warnings.push(format!(
                    "{}: record at offset {offset} fails its checksum and is skipped",
                    path.display()
                ));
                damaged += 1;
            } else {
                lost += self.unacknowledged_between(expected, header.seq);
                expected = expected.max(header.seq + 1);
                damaged = 0;
                self.max_seq = self.max_seq.max(header.seq);
                last_seq = last_seq.max(header.seq);
                if header.seq > self.acked {
                    live = true;
                    self.entries.push_back(Entry {
                        seq: header.seq,
                        segment: first_seq,
                        offset: offset as u64,
                        len: (HEADER + header.len) as u32,
                        enqueued: self.placed(header.enqueued_ms),
                    });
                }
            }
            offset = end;
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
            next_seq: max_seq + 1,
            segments,
            writer: None,
            reader: None,
            read_stalled: false,
            ack_write_failing: false,
            dirty_since: None,
            stats,
        };
        (inner, warnings)
    }
}

impl Inner {
    fn append(&mut self, seq: u64, record: &[u8]) -> Result<(u64, u64), QueueError> {
        let roll = match (&self.writer, self.segments.back()) {
            (Some((id, _)), Some(last)) => {
                last.first_seq != *id
                    || last.bytes >= self.settings.segment_bytes
                    || self.writer_changed()
            }
            _ => true,
        };
        if roll {
            let path = segment_path(&self.dir, seq);
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&path)
                .map_err(io_err(&path))?;
            self.writer = Some((seq, file));
            self.segments.push_back(Segment {
                first_seq: seq,
                last_seq: seq,
                bytes: 0,
            });
        }
        let (id, file) = self.writer.as_mut().expect("writer opened above");
        let id = *id;
        let path = segment_path(&self.dir, id);
        let segment = self.segments.back_mut().expect("segment pushed above");
        let offset = segment.bytes;
        if let Err(e) = file.write_all(record) {
            // A partial record would be skipped as torn at the next open; cut it off now so
            // later records stay readable.
            let _ = file.set_len(offset);
            let _ = file.seek(SeekFrom::End(0));
            return Err(io_err(&path)(e));
        }
        match self.settings.fsync {
            FsyncPolicy::Always => file.sync_data().map_err(io_err(&path))?,
            FsyncPolicy::Interval => {
                self.dirty_since.get_or_insert_with(Instant::now);
            }
            FsyncPolicy::Never => {}
        }
        segment.bytes += record.len() as u64;
        segment.last_seq = seq;
        self.stats.bytes_on_disk += record.len() as u64;
        Ok((id, offset))
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
        self.writer = None;
        true
    }

    fn read(&mut self, entry: &Entry) -> Result<TelemetryMessage, ReadError> {
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
        let mut buf = vec![0u8; entry.len as usize];
        file.read_exact_at(&mut buf, entry.offset).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                ReadError::Gone(format!(
                    "{}: the segment ends before the record at offset {} (cut short since it was written)",
                    path.display(),
                    entry.offset
                ))
            } else {
                failed(e)
            }
        })?;
        let header = RecordHeader::decode(&buf[..HEADER]);
        let payload = &buf[HEADER..];
        if header.seq != entry.seq
            || checksum(header.seq, header.enqueued_ms, payload) != header.crc
        {
            return Err(ReadError::Gone(format!(
                "{}: the record at offset {} changed since it was written",
                path.display(),
                entry.offset
            )));
        }
        serde_json::from_slice(payload)
            .map_err(|e| ReadError::Gone(format!("{}: {e}", path.display())))
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
        self.writer = None;
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
            self.writer = None;
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
        let dir = tempfile::tempdir().unwrap();
        {
            let (q, _) = Queue::open(dir.path(), small()).unwrap();
            for i in 0..60 {
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
        let left = numbers(&ids(&q.take_batch(100)));
        let lost = 60 - left.len() as u64;
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
        let missing: Vec<u64> = (0..60).filter(|i| !left.contains(i)).collect();
        assert_eq!(
            missing.last().unwrap() - missing[0] + 1,
            lost,
            "{missing:?}"
        );
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

    /// A record as `push` writes it, with a chosen wall-clock time.
    fn raw_record(seq: u64, enqueued_ms: u64, message: &TelemetryMessage) -> Vec<u8> {
        let payload = serde_json::to_vec(message).unwrap();
        let mut out = Vec::new();
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&checksum(seq, enqueued_ms, &payload).to_le_bytes());
        out.extend_from_slice(&seq.to_le_bytes());
        out.extend_from_slice(&enqueued_ms.to_le_bytes());
        out.extend_from_slice(&payload);
        out
    }

    #[test]
    fn ages_come_from_disk_once_then_from_the_monotonic_clock() {
        let dir = tempfile::tempdir().unwrap();
        let hour = 3_600_000;
        let mut seg = raw_record(1, unix_millis() - 2 * hour, &msg(1));
        // Written when the clock was a day ahead (then corrected): not expired, not kept forever.
        seg.extend(raw_record(2, unix_millis() + 24 * hour, &msg(2)));
        seg.extend(raw_record(3, unix_millis() - 1000, &msg(3)));
        // Written at 1970 (a board without an RTC), the clock set since: age unknown, kept.
        // (Without the explicit rule in `placed` it is kept too: an age beyond the uptime does
        // not fit an Instant. This pins the outcome, whichever way it comes about.)
        seg.extend(raw_record(4, 5_000, &msg(4)));
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
                0..=4 => {
                    let seq = q.push(&msg(n)).unwrap();
                    model.insert(seq, format!("m-{n}"));
                    n += 1;
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
}
