//! A library plugin for the benchmark (`libhubagent_bench_plugin.so`): publishes bursts of
//! `count` JSON messages of exactly `size` bytes, as fast as the agent's queue takes them.
//! Settings: `count` (default 0), `size` (default 256, at least 64), `run` (any value; a burst
//! starts at `start` and whenever `run` changes, so the benchmark triggers one through the twin),
//! `batch` (default 64; 1 = one `publish` per message): messages per `publish_batch` when the
//! agent offers it (ABI 1.3), else one `publish` each.

use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;
use std::time::Duration;

use hubagent_plugin_sdk::{
    Host, Level, Message, Plugin, PublishError, StartError, StopSignal, export_plugin,
};
use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
struct Burst {
    count: u64,
    size: usize,
    run: Value,
    batch: usize,
}

fn parse_settings(text: &str) -> Result<Burst, String> {
    let value: Value = serde_json::from_str(text).map_err(|e| format!("settings: {e}"))?;
    let obj = value.as_object().ok_or("settings must be an object")?;
    let mut burst = Burst {
        count: 0,
        size: 256,
        run: Value::Null,
        batch: 64,
    };
    for (key, v) in obj {
        match key.as_str() {
            "count" => burst.count = v.as_u64().ok_or("count must be a whole number")?,
            "size" => {
                let size = v.as_u64().ok_or("size must be a whole number of bytes")?;
                if !(64..=256 * 1024).contains(&size) {
                    return Err(format!("size {size} is outside 64..=262144"));
                }
                burst.size = size as usize;
            }
            "run" => burst.run = v.clone(),
            "batch" => {
                let batch = v.as_u64().ok_or("batch must be a whole number")?;
                if !(1..=1024).contains(&batch) {
                    return Err(format!("batch {batch} is outside 1..=1024"));
                }
                burst.batch = batch as usize;
            }
            other => {
                return Err(format!(
                    "unknown setting '{other}' (known: count, size, run, batch)"
                ));
            }
        }
    }
    Ok(burst)
}

/// `{"seq":N,"pad":"xxx…"}` padded to exactly `size` bytes: the body every publisher of the
/// benchmark sends (the bare publisher calls this too).
pub fn body(seq: u64, size: usize) -> String {
    let head = format!("{{\"seq\":{seq},\"pad\":\"");
    let pad = size.saturating_sub(head.len() + 2);
    let mut text = String::with_capacity(size);
    text.push_str(&head);
    text.extend(std::iter::repeat_n('x', pad));
    text.push_str("\"}");
    text
}

struct Bench {
    current: Burst,
    bursts: Sender<Burst>,
    stop: StopSignal,
    worker: Option<JoinHandle<()>>,
}

fn work(host: Host, bursts: Receiver<Burst>, stop: StopSignal) {
    let mut seq: u64 = 0;
    loop {
        let burst = match bursts.recv_timeout(Duration::from_millis(200)) {
            Ok(b) => b,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) if !stop.is_stopped() => continue,
            Err(_) => return,
        };
        let batch = if host.batch_offered() { burst.batch } else { 1 };
        let mut left = burst.count;
        while left > 0 {
            if stop.is_stopped() {
                return;
            }
            let n = left.min(batch as u64);
            left -= n;
            let messages: Vec<Message> = (0..n)
                .map(|_| {
                    seq += 1;
                    Message::json(body(seq, burst.size))
                })
                .collect();
            let first = seq + 1 - n;
            let outcomes = match batch {
                1 => vec![host.publish(&messages[0])],
                _ => host.publish_batch(&messages),
            };
            for (i, outcome) in outcomes.into_iter().enumerate() {
                match outcome {
                    Ok(()) => {}
                    Err(PublishError::Stopping) => return,
                    Err(e) => host.log(
                        Level::Warn,
                        &format!("message {} not published: {e}", first + i as u64),
                    ),
                }
            }
        }
        host.log(Level::Info, &format!("burst of {} published", burst.count));
    }
}

impl Plugin for Bench {
    fn start(host: Host, settings: &str) -> Result<Self, StartError> {
        let current = parse_settings(settings).map_err(StartError::Rejected)?;
        let (bursts, receiver) = channel();
        let stop = StopSignal::new();
        let signal = stop.clone();
        let worker = host.spawn("bench", move || work(host, receiver, signal));
        if current.count > 0 {
            let _ = bursts.send(current.clone());
        }
        Ok(Bench {
            current,
            bursts,
            stop,
            worker: Some(worker),
        })
    }

    fn apply_settings(&mut self, settings: &str) -> Result<(), String> {
        let next = parse_settings(settings)?;
        if next.run != self.current.run && next.count > 0 {
            self.bursts
                .send(next.clone())
                .map_err(|_| "the publishing thread has ended".to_string())?;
        }
        self.current = next;
        Ok(())
    }

    fn stop(mut self) {
        self.stop.stop();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

export_plugin!(Bench, name = "bench", version = env!("CARGO_PKG_VERSION"));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_have_the_asked_size_and_are_json() {
        for (seq, size) in [(1, 64), (123_456, 256), (7, 1000)] {
            let text = body(seq, size);
            assert_eq!(text.len(), size);
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["seq"], seq);
        }
    }

    #[test]
    fn settings_are_checked() {
        assert_eq!(parse_settings("{}").unwrap().count, 0);
        assert!(
            parse_settings(r#"{"size": 10}"#)
                .unwrap_err()
                .contains("64..=")
        );
        assert!(
            parse_settings(r#"{"rate": 1}"#)
                .unwrap_err()
                .contains("unknown setting 'rate'")
        );
    }
}
