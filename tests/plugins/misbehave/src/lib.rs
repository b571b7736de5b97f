//! A plugin that misbehaves on request, for the supervisor's tests. Settings:
//! `mode` = "ok" (publish `{"n", "tag", "mode"}` every `interval`), "segfault" (crash after the
//! first message), "panic" (panic in start), "worker-panic" (a worker panics after the first
//! message), "hang" (start never returns), "freeze" (the whole process stops after the first
//! message), "flood" (publish as fast as possible from 4 threads), "hog" (allocate until the
//! memory limit ends it), "batch" (publish `batch` messages, default 8, with one
//! `publish_batch` every `interval`), "odd-batch" (one `publish_batch` of 25 messages at start,
//! of which n = 3 is invalid (a property with an empty name) and n = 5 over 256 KiB, then
//! nothing); `tag` (echoed in messages); `reject` (apply_settings refuses with this
//! reason); `record` (a file: after each publish returns, the plugin appends `<run> <n> <result>`,
//! where `run` identifies this plugin process and is also in every message's body and `run`
//! property, so a test knows exactly which messages the agent acknowledged). "probe" (for the
//! sandbox's tests) tries, every `interval`, what the settings list: `read` (files or
//! directories), `write` (files to create or append to), `connect` (UNIX socket paths), `tcp`
//! ("host:port"), and prints `probe {"read": {path: "ok" | "EACCES" | …}, …}` on stderr, which
//! the agent logs.
//!
//! Methods (ABI 1.1): `echo` answers 200 `{"echo": payload, "tag", "run"}`; `status` answers
//! with the status and payload its payload names (`{"status": 418, "payload": …}`); `slow`
//! sleeps `payload.ms` before answering; `crash` crashes the plugin mid-call.
//! C2D: it takes messages whose property `to` is `misbehave`. Settings: `c2d_record` (a file:
//! each message offered is appended as `<messageId> offered`, and once taken as `<messageId>
//! taken <body>`), `c2d_gate` (a file: a message is taken only once this file exists; until
//! then the call waits), `c2d_refuse` (true: every message is refused).

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use hubagent_plugin_sdk::{
    C2dMessage, Host, Level, Message, MethodAnswer, Plugin, PublishError, StartError, StopSignal,
    export_plugin, parse_duration,
};
use serde_json::{Value, json};

#[derive(Clone)]
struct Settings {
    mode: String,
    tag: String,
    interval: Duration,
    record: Option<String>,
    batch: usize,
    c2d_record: Option<String>,
    c2d_gate: Option<String>,
    c2d_refuse: bool,
}

fn parse(text: &str) -> Result<(Settings, Option<String>), String> {
    let v: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let s = Settings {
        mode: v["mode"].as_str().unwrap_or("ok").to_string(),
        tag: v["tag"].as_str().unwrap_or("").to_string(),
        interval: parse_duration(v["interval"].as_str().unwrap_or("100ms"))?,
        record: v["record"].as_str().map(str::to_string),
        batch: v["batch"].as_u64().unwrap_or(8) as usize,
        c2d_record: v["c2d_record"].as_str().map(str::to_string),
        c2d_gate: v["c2d_gate"].as_str().map(str::to_string),
        c2d_refuse: v["c2d_refuse"].as_bool().unwrap_or(false),
    };
    Ok((s, v["reject"].as_str().map(str::to_string)))
}

struct Misbehave {
    run: String,
    settings: Arc<Mutex<Settings>>,
    stop: StopSignal,
    workers: Vec<JoinHandle<()>>,
}

fn numbered_message(s: &Settings, run: &str, n: u64) -> Message {
    Message::json(json!({"n": n, "tag": s.tag, "mode": s.mode, "run": run}).to_string())
        .property("test", "misbehave")
        .property("run", run)
}

/// Appends `<run> <n> <outcome>` to the record file, if the settings name one.
fn record(s: &Settings, run: &str, n: u64, result: &Result<(), PublishError>) {
    if let Some(path) = &s.record {
        use std::io::Write;
        let outcome = match result {
            Ok(()) => "ok".to_string(),
            Err(e) => format!("{e:?}"),
        };
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("the record file opens");
        // One write per line: lines from several plugin processes never interleave.
        file.write_all(format!("{run} {n} {outcome}\n").as_bytes())
            .expect("the record file is writable");
    }
}

fn publish_one(host: &Host, s: &Settings, run: &str, n: u64) -> Result<(), PublishError> {
    let result = host.publish(&numbered_message(s, run, n));
    record(s, run, n, &result);
    result
}

/// Publishes messages `first..` with one `publish_batch` and records each outcome; "odd-batch"
/// spoils n = 3 (invalid) and n = 5 (too large). `Err(Stopping)` if any was refused so.
fn publish_batch(
    host: &Host,
    s: &Settings,
    run: &str,
    first: u64,
    count: usize,
) -> Result<(), PublishError> {
    let numbers: Vec<u64> = (first..first + count as u64).collect();
    let messages: Vec<Message> = numbers
        .iter()
        .map(|&n| {
            let message = numbered_message(s, run, n);
            match (s.mode.as_str(), n) {
                ("odd-batch", 3) => message.property("", "a property needs a name"),
                ("odd-batch", 5) => message.property("pad", "x".repeat(300 * 1024)),
                _ => message,
            }
        })
        .collect();
    let outcomes = host.publish_batch(&messages);
    for (n, result) in numbers.iter().zip(&outcomes) {
        record(s, run, *n, result);
    }
    match outcomes.contains(&Err(PublishError::Stopping)) {
        true => Err(PublishError::Stopping),
        false => Ok(()),
    }
}

/// "ok", or the errno's name the way C and Python spell it.
fn outcome(result: std::io::Result<()>) -> String {
    match result {
        Ok(()) => "ok".into(),
        Err(e) => match e.raw_os_error() {
            Some(libc::EACCES) => "EACCES".into(),
            Some(libc::EPERM) => "EPERM".into(),
            Some(libc::ENOENT) => "ENOENT".into(),
            Some(libc::ECONNREFUSED) => "ECONNREFUSED".into(),
            Some(n) => format!("errno {n}"),
            None => e.to_string(),
        },
    }
}

/// One round of the "probe" mode, as the JSON it prints.
fn probe(settings: &Value) -> Value {
    use std::io::{Read, Write};
    let list = |key: &str| -> Vec<String> {
        settings[key]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut out = serde_json::Map::new();
    let mut section = |key: &str, try_one: &dyn Fn(&str) -> std::io::Result<()>| {
        let results: serde_json::Map<String, Value> = list(key)
            .into_iter()
            .map(|target| {
                let result = outcome(try_one(&target));
                (target, Value::String(result))
            })
            .collect();
        out.insert(key.to_string(), Value::Object(results));
    };
    section("read", &|path| {
        // stat is not confined: it says which of the two reads to try.
        if std::path::Path::new(path).is_dir() {
            std::fs::read_dir(path).map(|_| ())
        } else {
            std::fs::File::open(path).and_then(|mut f| f.read(&mut [0u8; 1]).map(|_| ()))
        }
    });
    section("write", &|path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(b"probe\n"))
    });
    section("connect", &|path| {
        std::os::unix::net::UnixStream::connect(path).map(|_| ())
    });
    section("tcp", &|address| {
        std::net::TcpStream::connect(address).map(|_| ())
    });
    Value::Object(out)
}

impl Plugin for Misbehave {
    fn start(host: Host, settings: &str) -> Result<Self, StartError> {
        let (s, reject) = parse(settings).map_err(StartError::Rejected)?;
        if let Some(reason) = reject {
            return Err(StartError::Rejected(reason));
        }
        match s.mode.as_str() {
            "panic" => panic!("the misbehave plugin panics in start, as asked"),
            "hang" => loop {
                std::thread::sleep(Duration::from_secs(3600));
            },
            "probe" => {
                let raw: Value = serde_json::from_str(settings).unwrap_or_default();
                let stop = StopSignal::new();
                let signal = stop.clone();
                let interval = s.interval;
                let worker = host.spawn("probe", move || {
                    loop {
                        eprintln!("probe {}", probe(&raw));
                        if signal.wait(interval) {
                            return;
                        }
                    }
                });
                return Ok(Misbehave {
                    run: format!("probe-{}", std::process::id()),
                    settings: Arc::new(Mutex::new(s)),
                    stop,
                    workers: vec![worker],
                });
            }
            _ => {}
        }
        if s.mode.contains("batch") {
            let offered = host.batch_offered();
            host.log(Level::Info, &format!("publish_batch offered: {offered}"));
        }
        let stop = StopSignal::new();
        let settings = Arc::new(Mutex::new(s.clone()));
        let threads = if s.mode == "flood" { 4 } else { 1 };
        let run = format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
        );
        let mut workers = Vec::new();
        for _ in 0..threads {
            let (signal, current, run) = (stop.clone(), settings.clone(), run.clone());
            workers.push(host.spawn("misbehave", move || {
                let mut n = 0u64;
                loop {
                    let s = current.lock().unwrap().clone();
                    if s.mode != "flood" && signal.wait(s.interval) {
                        return;
                    }
                    if signal.is_stopped() {
                        return;
                    }
                    n += 1;
                    if s.mode == "hog" {
                        let mut hoard: Vec<Vec<u8>> = Vec::new();
                        loop {
                            hoard.push(vec![1u8; 16 * 1024 * 1024]);
                        }
                    }
                    let published = match s.mode.as_str() {
                        "batch" => {
                            let first = n;
                            n += s.batch as u64 - 1;
                            publish_batch(&host, &s, &run, first, s.batch)
                        }
                        "odd-batch" if n == 1 => publish_batch(&host, &s, &run, 1, 25),
                        "odd-batch" => continue,
                        _ => publish_one(&host, &s, &run, n),
                    };
                    if let Err(PublishError::Stopping) = published {
                        return;
                    }
                    match s.mode.as_str() {
                        // SAFETY: not safe at all: this plugin crashes on purpose.
                        "segfault" => unsafe {
                            std::ptr::null_mut::<u8>().write_volatile(1);
                        },
                        "worker-panic" => panic!("worker panics after message {n}, as asked"),
                        // SAFETY: stops this process, as asked.
                        "freeze" => unsafe {
                            libc::raise(libc::SIGSTOP);
                        },
                        _ => {}
                    }
                }
            }));
        }
        Ok(Misbehave {
            run,
            settings,
            stop,
            workers,
        })
    }

    fn apply_settings(&mut self, settings: &str) -> Result<(), String> {
        let (s, reject) = parse(settings)?;
        if let Some(reason) = reject {
            return Err(reason);
        }
        *self.settings.lock().unwrap() = s;
        Ok(())
    }

    fn invoke_method(&mut self, method: &str, payload: &str) -> MethodAnswer {
        let payload: Value = serde_json::from_str(payload).unwrap_or(Value::Null);
        let tag = self.settings.lock().unwrap().tag.clone();
        match method {
            "echo" => {
                MethodAnswer::ok(json!({"echo": payload, "tag": tag, "run": self.run}).to_string())
            }
            "status" => MethodAnswer::new(
                payload["status"].as_u64().unwrap_or(200) as u16,
                payload["payload"].to_string(),
            ),
            "slow" => {
                std::thread::sleep(Duration::from_millis(payload["ms"].as_u64().unwrap_or(0)));
                MethodAnswer::ok(json!({"slept": payload["ms"]}).to_string())
            }
            // SAFETY: not safe at all: this plugin crashes on purpose, mid-call.
            "crash" => unsafe {
                std::ptr::null_mut::<u8>().write_volatile(1);
                MethodAnswer::ok("null")
            },
            other => MethodAnswer::new(404, json!({"unknown": other}).to_string()),
        }
    }

    fn receive_c2d(&mut self, message: &C2dMessage) -> Result<(), String> {
        let s = self.settings.lock().unwrap().clone();
        let record = |line: String| -> Result<(), String> {
            let Some(path) = &s.c2d_record else {
                return Ok(());
            };
            use std::io::Write;
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .and_then(|mut f| f.write_all(format!("{line}\n").as_bytes()))
                .map_err(|e| e.to_string())
        };
        record(format!("{} offered", message.message_id))?;
        if s.c2d_refuse {
            return Err("refusing C2D messages, as asked".into());
        }
        if let Some(gate) = &s.c2d_gate {
            while !std::path::Path::new(gate).exists() {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        record(format!(
            "{} taken {}",
            message.message_id,
            String::from_utf8_lossy(&message.body)
        ))
    }

    fn stop(mut self) {
        self.stop.stop();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

export_plugin!(
    Misbehave,
    name = "misbehave",
    version = "0.0.1",
    methods = ["echo", "status", "slow", "crash"],
    c2d_filter = r#"{"to":"misbehave"}"#,
);
