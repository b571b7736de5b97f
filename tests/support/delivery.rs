//! The loss check of every test that claims "nothing lost", counted from the producer's side.
//!
//! A producer numbers its messages 1, 2, 3, ... under a run id (the built-in sensor per process,
//! the test plugins per plugin process). Before every `kill -9` and every stop of an agent, the
//! test reads how many messages the agent acknowledged to the producer (accepted into its
//! durable queue: `published` in `hubagent plugins list`) and notes it in an [`Acknowledged`];
//! every number from 1 to that count must arrive. Checking only for gaps below the highest
//! number that arrived cannot see a lost tail: the last messages of a run.
//!
//! [`drain`] waits for them (failing with what is missing), [`Delivery`] counts produced, arrived,
//! lost and duplicated messages for the figures of docs/reliability.md.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::{AgentProcess, Numbered};

/// How many messages the agent had acknowledged to each run of one numbered producer, as read
/// before each kill and stop (the highest reading of a run counts).
#[derive(Debug, Clone, Default)]
pub struct Acknowledged {
    runs: BTreeMap<String, u64>,
}

impl Acknowledged {
    pub fn new() -> Acknowledged {
        Acknowledged::default()
    }

    /// The agent had acknowledged `count` messages of `run`: numbers 1..=count must arrive.
    pub fn note(&mut self, run: &str, count: u64) {
        let c = self.runs.entry(run.to_string()).or_insert(0);
        *c = (*c).max(count);
    }

    /// Reads and notes what the agent acknowledged so far to its built-in simulated sensor
    /// `plugin` (see [`sensor_acknowledged`]); returns the run and the count.
    pub async fn note_sensor(&mut self, agent: &AgentProcess, plugin: &str) -> (String, u64) {
        let (run, count) = sensor_acknowledged(agent, plugin).await;
        self.note(&run, count);
        (run, count)
    }

    /// The count of every run noted.
    pub fn runs(&self) -> &BTreeMap<String, u64> {
        &self.runs
    }

    /// How many messages the producer had acknowledged in all: the messages that must arrive.
    pub fn produced(&self) -> u64 {
        self.runs.values().sum()
    }

    /// The acknowledged messages `arrived` lacks, as `(run, n)`.
    pub fn missing(&self, arrived: &BTreeSet<(String, u64)>) -> Vec<(String, u64)> {
        self.runs
            .iter()
            .flat_map(|(run, count)| (1..=*count).map(move |n| (run.clone(), n)))
            .filter(|k| !arrived.contains(k))
            .collect()
    }
}

/// The run id of the built-in simulated sensor `plugin` in this agent process (from the line the
/// sensor logs when it starts) and how many of its readings the agent has acknowledged so far
/// (`published` in `hubagent plugins list`). Fails if the sensor restarted in this process (its
/// count would span two runs) or had a reading refused (a legitimate gap these tests never have).
pub async fn sensor_acknowledged(agent: &AgentProcess, plugin: &str) -> (String, u64) {
    let field = format!("plugin={plugin} ");
    let is_start = |l: &str| {
        let l = plain(l);
        l.contains("simulated sensor started") && l.contains(&field) && l.contains("run=")
    };
    agent
        .wait_log_line(&format!("the sensor {plugin} never started"), is_start)
        .await;
    let list = agent.plugins_list();
    let sensor = &list[plugin];
    assert_eq!(sensor["restarts"], 0, "{plugin} restarted: {sensor}");
    assert_eq!(
        sensor["dropped"], 0,
        "{plugin} had readings refused: {sensor}"
    );
    let count = sensor["published"]
        .as_u64()
        .unwrap_or_else(|| panic!("no published count for {plugin}: {list}"));
    let log = agent.log_text();
    let runs: Vec<String> = log
        .lines()
        .filter(|l| is_start(l))
        .filter_map(|l| {
            Some(
                plain(l)
                    .split("run=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .to_string(),
            )
        })
        .collect();
    assert_eq!(runs.len(), 1, "one run of {plugin} per process: {runs:?}");
    (runs[0].clone(), count)
}

/// A log line without its terminal colours (`ESC [ ... m`).
fn plain(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|c| *c == 'm');
        } else {
            out.push(c);
        }
    }
    out
}

/// `(run, n)` listed as ranges per run: `run a1b2: 41-60 (20), 63 (1)`.
pub fn describe(items: &[(String, u64)]) -> String {
    let mut per_run: BTreeMap<&str, BTreeSet<u64>> = BTreeMap::new();
    for (run, n) in items {
        per_run.entry(run).or_default().insert(*n);
    }
    let mut out = Vec::new();
    for (run, ns) in per_run {
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for n in ns {
            match ranges.last_mut() {
                Some((_, end)) if *end + 1 == n => *end = n,
                _ => ranges.push((n, n)),
            }
        }
        let text: Vec<String> = ranges
            .iter()
            .map(|(a, b)| {
                if a == b {
                    format!("{a}")
                } else {
                    format!("{a}-{b} ({})", b - a + 1)
                }
            })
            .collect();
        out.push(format!("run {run}: {}", text.join(", ")));
    }
    out.join("; ")
}

fn arrived_keys(messages: &[Numbered]) -> BTreeSet<(String, u64)> {
    messages.iter().map(Numbered::key).collect()
}

/// Waits until every message `acked` counts has arrived (`messages` reads what did). Fails with
/// what is missing when `timeout` passes, or as soon as `agent`'s queue is empty while something
/// is missing: an acknowledged message that is neither queued nor in hubsim is lost. (The queue
/// depth is read first: hubsim records a message before its PUBACK, so once the depth was 0
/// everything acknowledged before is in the records read after.)
pub async fn drain(
    agent: &AgentProcess,
    acked: &Acknowledged,
    messages: impl Fn() -> Vec<Numbered>,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let empty = agent.status()["queue_depth"].as_u64() == Some(0);
        let missing = acked.missing(&arrived_keys(&messages()));
        if missing.is_empty() {
            return Ok(());
        }
        let why = if empty {
            "the agent's queue is empty"
        } else if Instant::now() > deadline {
            "the drain timed out"
        } else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        return Err(format!(
            "{why} after {:.1} s and {} of {} acknowledged messages did not arrive: {}",
            (timeout - deadline.saturating_duration_since(Instant::now())).as_secs_f64(),
            missing.len(),
            acked.produced(),
            describe(&missing)
        ));
    }
}

/// One numbered producer's delivery, counted from the producer's side.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The messages the agent acknowledged to the producer: the counts read before each kill
    /// and stop.
    pub produced: u64,
    /// How many of those arrived (distinct).
    pub arrived: u64,
    /// Per run, the numbers missing from 1 up to the greater of its count and the highest that
    /// arrived (a number below one that arrived was acknowledged too: a producer numbers its
    /// next message only once the last one is answered).
    pub lost: Vec<(String, u64)>,
    /// Distinct messages numbered above their run's count that arrived: acknowledged between the
    /// last reading and the kill or stop.
    pub after_reading: u64,
    /// Messages of runs no reading accounts for (a run the test did not see start).
    pub unaccounted: Vec<(String, u64)>,
    /// The records hubsim holds of the producer.
    pub records: usize,
    /// Records of a message that had arrived before (at-least-once delivery).
    pub duplicates: usize,
    /// Messages that arrived under more than one message id (a redelivery keeps its id).
    pub reissued: Vec<(String, u64)>,
}

impl Delivery {
    /// Counts `messages` (every record of the producer hubsim received) against `acked`.
    pub fn of(acked: &Acknowledged, messages: &[Numbered]) -> Delivery {
        let mut ids: BTreeMap<(String, u64), BTreeSet<&str>> = BTreeMap::new();
        for m in messages {
            ids.entry(m.key())
                .or_default()
                .insert(m.message_id.as_str());
        }
        let mut highest: BTreeMap<&str, u64> = BTreeMap::new();
        for (run, n) in ids.keys() {
            let h = highest.entry(run.as_str()).or_insert(0);
            *h = (*h).max(*n);
        }
        let mut lost = Vec::new();
        let mut arrived = 0;
        let mut after_reading = 0;
        let mut unaccounted = Vec::new();
        for (run, count) in acked.runs() {
            let top = highest.get(run.as_str()).copied().unwrap_or(0).max(*count);
            for n in 1..=top {
                let key = (run.clone(), n);
                match (ids.contains_key(&key), n <= *count) {
                    (true, true) => arrived += 1,
                    (true, false) => after_reading += 1,
                    (false, _) => lost.push(key),
                }
            }
        }
        for key in ids.keys() {
            if !acked.runs().contains_key(&key.0) {
                unaccounted.push(key.clone());
            }
        }
        let reissued = ids
            .iter()
            .filter(|(_, i)| i.len() > 1)
            .map(|(k, _)| k.clone())
            .collect();
        Delivery {
            produced: acked.produced(),
            arrived,
            lost,
            after_reading,
            unaccounted,
            records: messages.len(),
            duplicates: messages.len() - ids.len(),
            reissued,
        }
    }

    /// What is wrong, if anything: lost messages, messages nobody produced, reissued ones.
    pub fn problems(&self) -> Option<String> {
        let mut out = Vec::new();
        if !self.lost.is_empty() {
            out.push(format!(
                "{} of {} acknowledged messages lost: {}",
                self.lost.len(),
                self.produced,
                describe(&self.lost)
            ));
        }
        if !self.unaccounted.is_empty() {
            out.push(format!(
                "{} messages of runs no reading accounts for: {}",
                self.unaccounted.len(),
                describe(&self.unaccounted)
            ));
        }
        if !self.reissued.is_empty() {
            out.push(format!(
                "messages sent under several ids: {}",
                describe(&self.reissued)
            ));
        }
        (!out.is_empty()).then(|| out.join("\n"))
    }

    /// Fails with [`Delivery::problems`].
    pub fn assert_nothing_lost(&self, what: &str) {
        if let Some(problems) = self.problems() {
            panic!("{what}: {problems}");
        }
    }

    /// The figures docs/reliability.md shows: produced, arrived (distinct, of those produced),
    /// duplicates, lost, and the arrivals after the last reading.
    pub fn figures(&self) -> Value {
        json!({
            "produced": self.produced,
            "arrived_distinct": self.arrived,
            "duplicates": self.duplicates,
            "lost": self.lost.len(),
            "arrived_after_reading": self.after_reading,
        })
    }
}

/// An exec plugin for loss checks (settings: `record`, `interval` in seconds, optional `crash`):
/// numbers its messages under a run id (its pid and start time) and appends `<run> <seq>` to the
/// record file before it writes the message line. The agent reads the next line only once the
/// previous message is queued, so what it wrote may be more than what the agent acknowledged
/// when the agent is killed (lines still in the pipe), never less. When the `crash` file exists,
/// it deletes it and exits with status 3 after a whole line: every line a run that crashed wrote
/// was read by the agent (it reads the plugin's stdout to its end).
pub const NUMBERED_EXEC_PLUGIN: &str = r#"import json, os, sys, threading, time
settings = json.loads(sys.stdin.readline())
# EOF on stdin means stop.
threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()
run = "%d-%d" % (os.getpid(), time.time_ns())
record = open(settings["record"], "a")
crash = settings.get("crash")
seq = 0
while True:
    seq += 1
    record.write("%s %d\n" % (run, seq))
    record.flush()
    sys.stdout.write(json.dumps({"body": {"seq": seq, "run": run}, "properties": {"run": run}}) + "\n")
    sys.stdout.flush()
    if crash and os.path.exists(crash):
        os.remove(crash)
        os._exit(3)
    time.sleep(settings["interval"])
"#;

/// The record of [`NUMBERED_EXEC_PLUGIN`]: the highest sequence number each run wrote.
pub fn numbered_exec_record(path: &std::path::Path) -> BTreeMap<String, u64> {
    let mut runs = BTreeMap::new();
    for line in std::fs::read_to_string(path).unwrap_or_default().lines() {
        if let Some((run, seq)) = line.split_once(' ')
            && let Ok(seq) = seq.parse::<u64>()
        {
            let e = runs.entry(run.to_string()).or_insert(0);
            *e = seq.max(*e);
        }
    }
    runs
}

/// The record the `misbehave` test plugin keeps in its publishing modes: what the agent answered
/// each message (`ok` or the error), by `(run, n)`, from its `<run> <n> <answer>` lines.
pub fn publish_answers(path: &std::path::Path) -> BTreeMap<(String, u64), String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut parts = l.split(' ');
            let run = parts.next()?.to_string();
            let n = parts.next()?.parse().ok()?;
            Some(((run, n), parts.next()?.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(run: &str, n: u64, id: &str) -> Numbered {
        Numbered {
            run: run.into(),
            n,
            message_id: id.into(),
        }
    }

    #[test]
    fn colours_are_stripped() {
        assert_eq!(
            plain("\u{1b}[3mplugin\u{1b}[0m\u{1b}[2m=\u{1b}[0msensor run=ab"),
            "plugin=sensor run=ab"
        );
    }

    #[test]
    fn a_lost_tail_is_lost() {
        let mut acked = Acknowledged::new();
        acked.note("a", 5);
        acked.note("a", 4);
        let got: Vec<_> = (1..=3).map(|n| m("a", n, &n.to_string())).collect();
        let d = Delivery::of(&acked, &got);
        assert_eq!(d.produced, 5);
        assert_eq!(d.arrived, 3);
        assert_eq!(d.lost, [("a".into(), 4), ("a".into(), 5)]);
        assert_eq!(describe(&d.lost), "run a: 4-5 (2)");
        assert!(
            d.problems()
                .unwrap()
                .contains("2 of 5 acknowledged messages lost")
        );
    }

    #[test]
    fn arrivals_after_the_reading_count_apart_and_gaps_below_them_are_lost() {
        let mut acked = Acknowledged::new();
        acked.note("a", 2);
        let got = [
            m("a", 1, "x"),
            m("a", 2, "y"),
            m("a", 2, "y"),
            m("a", 4, "z"),
        ];
        let d = Delivery::of(&acked, &got);
        assert_eq!((d.arrived, d.after_reading, d.duplicates), (2, 1, 1));
        assert_eq!(d.lost, [("a".into(), 3)]);
    }

    #[test]
    fn strangers_and_new_ids_are_problems() {
        let mut acked = Acknowledged::new();
        acked.note("a", 1);
        let d = Delivery::of(&acked, &[m("a", 1, "x"), m("a", 1, "y"), m("b", 1, "z")]);
        assert!(d.lost.is_empty());
        assert_eq!(d.unaccounted, [("b".into(), 1)]);
        assert_eq!(d.reissued, [("a".into(), 1)]);
        assert_eq!(d.problems().unwrap().lines().count(), 2);
    }
}
