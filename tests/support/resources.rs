//! What a running agent holds, for the soak (`tests/it/soak.rs`): its whole process tree's
//! memory, file descriptors and threads, and the files and bytes of its state directory, sampled
//! from `/proc` and the file system while the scenario runs, and the growth check over the
//! samples (see [`growth`] for the criterion).

use std::fmt::Write as _;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// One reading of the agent's process tree and state directory.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Seconds since sampling began.
    pub seconds: f64,
    /// The scenario's cycle when it was taken.
    pub cycle: u32,
    /// Taken by the scenario at the end of a cycle, once everything it disturbed settled (hub
    /// connected, every plugin running, the queue drained): the moments fds, threads and queue
    /// files are compared at. The others are the periodic background readings.
    pub quiet: bool,
    /// Processes in the tree (the agent and its plugin processes).
    pub processes: u64,
    /// Sum of `VmRSS` over the tree.
    pub rss_kib: u64,
    /// Sum of the entries of `/proc/PID/fd` over the tree.
    pub fds: u64,
    /// Sum of `Threads` over the tree.
    pub threads: u64,
    /// Files in the queue directory (segments and the `acked` file).
    pub queue_files: u64,
    /// Disk space the state directory takes (allocated blocks, as `du` counts).
    pub state_kib: u64,
}

/// `pid` and every process descended from it, from the parent pids in `/proc/*/stat`.
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(child) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // The fields after the command name (in parentheses, which may hold spaces): state, ppid.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse().ok());
        if let Some(ppid) = ppid {
            parents.push((child, ppid));
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            parents
                .iter()
                .filter(|(_, p)| *p == parent)
                .map(|(c, _)| *c),
        );
        i += 1;
    }
    tree
}

/// A numeric field of `/proc/PID/status` (`VmRSS:`, `Threads:`); 0 when the process is gone.
fn status_field(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn fd_count(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0)
}

/// Files under `dir` (recursively) and the KiB of disk they take.
fn dir_usage(dir: &Path) -> (u64, u64) {
    let (mut files, mut bytes) = (0, 0);
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_dir() {
            let (f, b) = dir_usage(&entry.path());
            files += f;
            bytes += b * 1024;
        } else {
            files += 1;
            bytes += meta.blocks() * 512;
        }
    }
    (files, bytes / 1024)
}

/// Reads the process tree of `pid` and the state directory now.
pub fn sample(pid: u32, state_dir: &Path, seconds: f64, cycle: u32, quiet: bool) -> Sample {
    let tree = process_tree(pid);
    let sum = |f: &dyn Fn(u32) -> u64| tree.iter().map(|p| f(*p)).sum();
    Sample {
        seconds,
        cycle,
        quiet,
        processes: tree.len() as u64,
        rss_kib: sum(&|p| status_field(p, "VmRSS:")),
        fds: sum(&fd_count),
        threads: sum(&|p| status_field(p, "Threads:")),
        queue_files: dir_usage(&state_dir.join("queue")).0,
        state_kib: dir_usage(state_dir).1,
    }
}

/// Samples an agent in a background thread every `period` until [`Sampler::finish`]; the
/// scenario adds its quiet samples and says which cycle it is in.
pub struct Sampler {
    pid: u32,
    state_dir: PathBuf,
    started: Instant,
    cycle: Arc<AtomicU32>,
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    pub fn start(pid: u32, state_dir: &Path, period: Duration) -> Sampler {
        let started = Instant::now();
        let cycle = Arc::new(AtomicU32::new(0));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (cycle, samples, stop) = (cycle.clone(), samples.clone(), stop.clone());
            let state_dir = state_dir.to_path_buf();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let s = sample(
                        pid,
                        &state_dir,
                        started.elapsed().as_secs_f64(),
                        cycle.load(Ordering::Relaxed),
                        false,
                    );
                    samples.lock().unwrap().push(s);
                    // Short naps, so that finish() does not wait a whole period.
                    let next = Instant::now() + period;
                    while Instant::now() < next && !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            })
        };
        Sampler {
            pid,
            state_dir: state_dir.to_path_buf(),
            started,
            cycle,
            samples,
            stop,
            thread: Some(thread),
        }
    }

    pub fn set_cycle(&self, cycle: u32) {
        self.cycle.store(cycle, Ordering::Relaxed);
    }

    /// Takes a quiet sample now (the scenario has made sure things settled); returns it.
    pub fn quiet(&self) -> Sample {
        let s = sample(
            self.pid,
            &self.state_dir,
            self.started.elapsed().as_secs_f64(),
            self.cycle.load(Ordering::Relaxed),
            true,
        );
        self.samples.lock().unwrap().push(s.clone());
        s
    }

    /// Stops the background thread; every sample, in time order.
    pub fn finish(mut self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("the sampler thread panicked");
        }
        let mut samples = self.samples.lock().unwrap().clone();
        samples.sort_by(|a, b| a.seconds.total_cmp(&b.seconds));
        samples
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The samples as CSV, one line each.
pub fn csv(samples: &[Sample]) -> String {
    let mut out =
        String::from("seconds,cycle,quiet,processes,rss_kib,fds,threads,queue_files,state_kib\n");
    for s in samples {
        let _ = writeln!(
            out,
            "{:.2},{},{},{},{},{},{},{},{}",
            s.seconds,
            s.cycle,
            s.quiet,
            s.processes,
            s.rss_kib,
            s.fds,
            s.threads,
            s.queue_files,
            s.state_kib
        );
    }
    out
}

/// A resource the growth check watches.
pub struct Resource {
    pub name: &'static str,
    pub read: fn(&Sample) -> u64,
    /// How much the last third's peak may exceed the middle third's (noise, not a budget).
    pub tolerance: fn(u64) -> u64,
    /// Compared at quiet moments only (what must return to its baseline once the disturbance
    /// is over: fds, threads, queue files, disk); else over every sample of a complete tree
    /// (memory, whose peak each cycle reaches in its own disturbances).
    pub quiet_only: bool,
}

/// The growth check's verdict on one resource, with its figures.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub name: &'static str,
    pub start: u64,
    pub peak: u64,
    pub end: u64,
    pub middle_peak: u64,
    pub last_peak: u64,
    pub allowed: u64,
}

impl Verdict {
    pub fn grew(&self) -> bool {
        self.last_peak > self.allowed
    }

    pub fn figures(&self) -> Value {
        json!({
            "start": self.start, "peak": self.peak, "end": self.end,
            "middle_third_peak": self.middle_peak, "last_third_peak": self.last_peak,
            "allowed": self.allowed, "grew": self.grew(),
        })
    }
}

/// The growth check. The cycles after the first `warm_up` are cut into thirds; a resource grows
/// when its peak over the last third exceeds its peak over the middle third by more than its
/// tolerance. Peaks of thirds, not single readings, so that where a reading falls in a cycle
/// does not matter; the middle third, not the first, so that what fills up once (allocator
/// arenas, caches, the first segment of the queue) has settled before the comparison. A leak of
/// anything per reconnect, renewal, restart or reload adds up over a third of the cycles and
/// shows. Memory is read in every sample whose tree had its `processes` (a plugin restarting
/// shrinks the sum); the others at quiet moments only. `start` is the first reading after
/// warm-up, `end` the last quiet one.
pub fn growth(
    samples: &[Sample],
    warm_up: u32,
    processes: u64,
    resources: &[Resource],
) -> Result<Vec<Verdict>, String> {
    let last_cycle = samples.iter().map(|s| s.cycle).max().unwrap_or(0);
    let cycles = (last_cycle + 1).saturating_sub(warm_up);
    if cycles < 3 {
        return Err(format!(
            "{cycles} cycles after the warm-up of {warm_up}: too few to compare thirds"
        ));
    }
    let middle = warm_up + cycles / 3..warm_up + 2 * cycles / 3;
    let last = warm_up + 2 * cycles / 3..=last_cycle;
    let mut verdicts = Vec::new();
    for r in resources {
        let used: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.cycle >= warm_up)
            .filter(|s| {
                if r.quiet_only {
                    s.quiet
                } else {
                    s.processes == processes
                }
            })
            .collect();
        let peak_of = |f: &dyn Fn(u32) -> bool| {
            used.iter()
                .filter(|s| f(s.cycle))
                .map(|s| (r.read)(s))
                .max()
        };
        let (Some(middle_peak), Some(last_peak)) = (
            peak_of(&|c| middle.contains(&c)),
            peak_of(&|c| last.contains(&c)),
        ) else {
            return Err(format!("{}: no sample in the middle or last third", r.name));
        };
        let quiet: Vec<&&Sample> = used.iter().filter(|s| s.quiet).collect();
        verdicts.push(Verdict {
            name: r.name,
            start: used.first().map(|s| (r.read)(s)).unwrap_or(0),
            peak: used.iter().map(|s| (r.read)(s)).max().unwrap_or(0),
            end: quiet.last().map(|s| (r.read)(s)).unwrap_or(0),
            middle_peak,
            last_peak,
            allowed: middle_peak + (r.tolerance)(middle_peak),
        });
    }
    Ok(verdicts)
}

/// The verdicts as a table (Markdown, as docs/reliability.md shows it).
pub fn table(verdicts: &[Verdict]) -> String {
    let mut out = String::from(
        "| resource | start | peak | end | middle third peak | last third peak | allowed | grew |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for v in verdicts {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            v.name,
            v.start,
            v.peak,
            v.end,
            v.middle_peak,
            v.last_peak,
            v.allowed,
            if v.grew() { "YES" } else { "no" }
        );
    }
    out
}

/// Fails the soak `name` if any resource grew after `warm_up` (named in the message, e.g. "after
/// warm-up"), listing each with its peaks; prints the table of all first.
pub fn assert_none_grew(
    name: &str,
    verdicts: Result<Vec<Verdict>, String>,
    warm_up: &str,
    samples_csv: &Path,
) {
    let verdicts = verdicts.unwrap_or_else(|e| panic!("{name}: {e}"));
    println!("{}", table(&verdicts));
    let grew: Vec<String> = verdicts
        .iter()
        .filter(|v| v.grew())
        .map(|v| {
            format!(
                "{}: peak {} in the last third, {} in the middle third (allowed {})",
                v.name, v.last_peak, v.middle_peak, v.allowed
            )
        })
        .collect();
    assert!(
        grew.is_empty(),
        "{name}: resources grew {warm_up} (samples in {}):\n{}",
        samples_csv.display(),
        grew.join("\n")
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(cycle: u32, quiet: bool, fds: u64) -> Sample {
        Sample {
            seconds: cycle as f64,
            cycle,
            quiet,
            processes: 3,
            rss_kib: 1000,
            fds,
            threads: 10,
            queue_files: 2,
            state_kib: 8,
        }
    }

    const FDS: Resource = Resource {
        name: "fds",
        read: |s| s.fds,
        tolerance: |_| 2,
        quiet_only: true,
    };

    #[test]
    fn a_leak_per_cycle_grows_and_noise_does_not() {
        let leak: Vec<Sample> = (0..7).map(|c| s(c, true, 40 + 3 * c as u64)).collect();
        let v = growth(&leak, 1, 3, &[FDS]).unwrap();
        assert!(v[0].grew(), "{v:?}");
        // Busy moments (not quiet) may hold more; quiet ones return to the baseline.
        let mut noisy: Vec<Sample> = (0..7).map(|c| s(c, true, 40 + (c as u64 % 2))).collect();
        noisy.extend((0..7).map(|c| s(c, false, 90)));
        let v = growth(&noisy, 1, 3, &[FDS]).unwrap();
        assert!(!v[0].grew(), "{v:?}");
        assert_eq!((v[0].start, v[0].end), (41, 40));
    }

    #[test]
    fn too_few_cycles_is_an_error() {
        let few: Vec<Sample> = (0..3).map(|c| s(c, true, 40)).collect();
        assert!(growth(&few, 1, 3, &[FDS]).is_err());
    }

    #[test]
    fn the_tree_of_this_process_holds_this_process() {
        let me = std::process::id();
        let sample = sample(me, Path::new("/nonexistent"), 0.0, 0, true);
        assert!(process_tree(me).contains(&me));
        assert!(sample.rss_kib > 0 && sample.fds > 0 && sample.threads > 0);
        assert_eq!((sample.queue_files, sample.state_kib), (0, 0));
    }
}
