//! `hubagent plugins try` and `hubagent plugins new` (issue #22): each example and shipped plugin
//! runs alone, with no hub and no configuration, publishing what the test reads on stdout and
//! following settings typed on stdin; each template builds as it is (the Rust one with cargo
//! offline, inside this checkout without joining its workspace; the C one with make and cc;
//! Python as it is) and runs the same way.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Instant;

use hubagent_tests::*;
use serde_json::Value;

/// A running `hubagent plugins try`: its stdout read line by line as it comes.
struct Trial {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Trial {
    fn start(args: &[&str]) -> Trial {
        Trial::start_in(args, None)
    }

    fn start_in(args: &[&str], dir: Option<&Path>) -> Trial {
        let mut command = Command::new(hubagent_bin());
        command
            .arg("plugins")
            .arg("try")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, as at a terminal: Ctrl-C goes to the whole group.
            .process_group(0);
        if let Some(dir) = dir {
            command.current_dir(dir);
        }
        let mut child = command.spawn().expect("hubagent plugins try starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Trial {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a line that `wanted` accepts (after those already taken) and returns it.
    fn wait_line(&mut self, what: &str, wanted: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + LONG_WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if wanted(&line) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no {what} from plugins try; it printed:\n{}\nstderr:\n{}",
                    self.seen.join("\n"),
                    self.stderr_so_far()
                ),
            }
        }
    }

    /// The next published message whose body `wanted` accepts: (body, properties).
    fn wait_message(&mut self, what: &str, wanted: impl Fn(&Value) -> bool) -> (Value, Value) {
        let line = self.wait_line(what, |l| {
            l.strip_prefix("message ")
                .and_then(|m| serde_json::from_str::<Value>(m).ok())
                .is_some_and(|m| wanted(&m["body"]))
        });
        let m: Value = serde_json::from_str(line.strip_prefix("message ").unwrap()).unwrap();
        (m["body"].clone(), m["properties"].clone())
    }

    fn send(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    fn stderr_so_far(&mut self) -> String {
        // Only once it has exited: reading a live pipe to its end would block.
        match self.child.try_wait() {
            Ok(Some(_)) => {
                let mut text = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut text);
                }
                text
            }
            _ => "(still running)".into(),
        }
    }

    /// Closes stdin (end of input) and waits for the exit; (status, the rest of stdout).
    fn finish(mut self) -> (ExitStatus, Vec<String>) {
        drop(self.child.stdin.take());
        self.wait_exit()
    }

    fn wait_exit(mut self) -> (ExitStatus, Vec<String>) {
        // Bounded: a trial that does not end is a failure, not a hung test.
        let deadline = Instant::now() + LONG_WAIT;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "plugins try did not exit; it printed:\n{}",
                self.seen.join("\n")
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        // The rest of stdout, to its end (the reader thread ends at EOF).
        while let Ok(line) = self.lines.recv_timeout(LONG_WAIT) {
            self.seen.push(line);
        }
        let mut stderr = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
        }
        self.seen.push(format!("(stderr) {stderr}"));
        (status, std::mem::take(&mut self.seen))
    }
}

impl Drop for Trial {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn stopped_cleanly(status: ExitStatus, lines: &[String]) {
    assert!(status.success(), "{status}\n{}", lines.join("\n"));
    assert!(lines.iter().any(|l| l == "stopped"), "{}", lines.join("\n"));
}

#[test]
fn the_shipped_simulated_sensor_publishes_and_follows_typed_settings() {
    let library = built_library("hubagent_simulated_sensor");
    let mut trial = Trial::start(&[
        "--settings",
        r#"{"interval": "50ms"}"#,
        library.to_str().unwrap(),
    ]);
    trial.wait_line("the preflight's verdict", |l| {
        l.starts_with("plugin hubagent_simulated_sensor: OK (library ABI 1.")
    });
    trial.wait_line("the sandbox line", |l| l.starts_with("sandbox: "));
    let (first, _) = trial.wait_message("a reading", |b| b["seq"].is_u64());
    assert!(first["temperature"].is_number(), "{first}");
    trial.send(r#"{"interval": "1ms"}"#);
    let refused = trial.wait_line("the refusal", |l| l.starts_with("settings rejected"));
    assert!(refused.contains("below the 50ms minimum"), "{refused}");
    trial.send(r#"{"interval": "60ms"}"#);
    trial.wait_line("the acceptance", |l| {
        l == r#"settings applied: {"interval":"60ms"}"#
    });
    trial.wait_message("a reading after the change", |b| b["seq"].is_u64());
    let (status, lines) = trial.finish();
    stopped_cleanly(status, &lines);
}

#[test]
fn the_shipped_sysmetrics_publishes_and_follows_typed_settings() {
    let library = built_library("hubagent_sysmetrics");
    let mut trial = Trial::start(&[
        "--name",
        "sysmetrics",
        "--settings",
        r#"{"interval": "1s", "disks": ["/"]}"#,
        library.to_str().unwrap(),
    ]);
    let (sample, properties) = trial.wait_message("a sample", |b| b["disks"].is_object());
    assert_eq!(properties["kind"], "sysmetrics", "{properties}");
    assert!(sample["disks"].get("/proc").is_none(), "{sample}");
    trial.send(r#"{"disks": ["/", "/proc"]}"#);
    trial.wait_line("the acceptance", |l| l.starts_with("settings applied: "));
    trial.wait_message("a sample with the new disk", |b| {
        b["disks"].get("/proc").is_some()
    });
    trial.send("stop");
    let (status, lines) = trial.wait_exit();
    stopped_cleanly(status, &lines);
}

#[test]
fn the_c_example_publishes_answers_methods_and_c2d_and_stops_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let root = repo_root();
    let library = build_c_plugin(
        dir.path(),
        &root.join("plugins/examples/c-counter/counter.c"),
        "libc_counter.so",
        &root.join("plugins/sdk/include"),
    );
    let mut trial = Trial::start(&["--name", "counter", library.to_str().unwrap()]);
    trial.wait_line("the declarations", |l| {
        l == r#"declared: methods [get, reset], c2d filter {"to":"counter"}"#
    });
    trial.wait_line("the plugin's own log", |l| {
        l == "log info: c-counter started"
    });
    let (first, properties) = trial.wait_message("a count", |b| b["count"].is_i64());
    assert_eq!(first["step"], 1, "{first}");
    assert_eq!(properties["example"], "c-counter", "{properties}");
    trial.send(r#"{"step": 0}"#);
    let refused = trial.wait_line("the refusal", |l| l.starts_with("settings rejected"));
    assert!(refused.contains("step must not be 0"), "{refused}");
    trial.send(r#"{"step": 5}"#);
    trial.wait_line("the acceptance", |l| l.starts_with("settings applied"));
    trial.wait_message("a count by the new step", |b| b["step"] == 5);
    trial.send("method reset 100");
    trial.wait_line("the method's answer", |l| {
        l.starts_with("method reset: 200 ")
    });
    trial.send("method get");
    let answer = trial.wait_line("get's answer", |l| l.starts_with("method get: 200 "));
    let count: Value = serde_json::from_str(answer.trim_start_matches("method get: 200 ")).unwrap();
    assert!(count["count"].as_i64() >= Some(100), "{answer}");
    trial.send("method nope");
    trial.wait_line("a 404 for an undeclared method", |l| {
        l.starts_with("method nope: 404")
    });
    trial.send(r#"c2d {"to": "counter"} 23"#);
    trial.wait_line("the C2D message taken", |l| {
        l == "c2d try-3: taken (the hub would complete it)"
    });
    trial.send(r#"c2d {"to": "counter"} not-a-number"#);
    trial.wait_line("the C2D message refused", |l| {
        l.starts_with("c2d try-4: refused: ")
    });
    // Ctrl-C at a terminal: SIGINT to the whole process group, the plugin host included.
    // SAFETY: kill has no memory preconditions; the group is the trial's own.
    unsafe { libc::kill(-(trial.child.id() as i32), libc::SIGINT) };
    let (status, lines) = trial.wait_exit();
    stopped_cleanly(status, &lines);
    assert!(
        !lines.iter().any(|l| l.starts_with("ended:")),
        "{}",
        lines.join("\n")
    );
}

#[test]
fn the_python_example_publishes_and_follows_typed_settings() {
    let script = repo_root().join("plugins/examples/python-exec/sensor.py");
    let mut trial = Trial::start(&[
        "--settings",
        r#"{"room": "lab"}"#,
        "--",
        // Debian's: the sandbox lets it read /usr, not a pyenv shim under /root.
        "/usr/bin/python3",
        script.to_str().unwrap(),
    ]);
    trial.wait_line("the exec kind", |l| {
        l == "plugin sensor: OK (exec /usr/bin/python3)"
    });
    trial.wait_message("a reading from the lab", |b| b["room"] == "lab");
    trial.send(r#"{"room": "kitchen"}"#);
    trial.wait_message("a reading from the kitchen", |b| b["room"] == "kitchen");
    trial.send("method read");
    trial.wait_line("read's answer", |l| l.starts_with("method read: 200 "));
    let (status, lines) = trial.finish();
    stopped_cleanly(status, &lines);
}

#[test]
fn a_plugin_that_cannot_start_fails_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("libnothing.so");
    let trial = Trial::start(&[missing.to_str().unwrap()]);
    let (status, lines) = trial.finish();
    assert_eq!(status.code(), Some(1), "{}", lines.join("\n"));
    let stderr = lines.last().unwrap();
    assert!(
        stderr.contains("cannot start: ") && stderr.contains("libnothing.so"),
        "{stderr}"
    );

    // Settings its start refuses: exit 1 with the plugin's reason.
    let library = built_library("hubagent_simulated_sensor");
    let trial = Trial::start(&[
        "--settings",
        r#"{"interval": "soon"}"#,
        library.to_str().unwrap(),
    ]);
    let (status, lines) = trial.finish();
    assert_eq!(status.code(), Some(1), "{}", lines.join("\n"));
    let stderr = lines.last().unwrap();
    assert!(
        stderr.contains("start rejected the settings: ") && stderr.contains("soon"),
        "{stderr}"
    );
}

/// `hubagent plugins new NAME --lang LANG --dir DIR`; the plugin's directory.
fn new_plugin(name: &str, lang: &str, dir: &Path) -> PathBuf {
    let out = Command::new(hubagent_bin())
        .args(["plugins", "new", name, "--lang", lang, "--dir"])
        .arg(dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(text.contains("hubagent plugins try"), "{text}");
    dir.join(name)
}

/// The template's counter, tried: counts by the step it was started with, then by the step typed
/// on stdin; `get` answers.
fn try_a_counter_template(mut trial: Trial) {
    trial.wait_line("the plugin's own log or the first message", |l| {
        l.starts_with("running with settings")
    });
    let (first, _) = trial.wait_message("a count", |b| b["count"].is_i64());
    assert_eq!(first["count"].as_i64().unwrap() % 2, 0, "{first}");
    trial.send(r#"{"step": 1000}"#);
    trial.wait_line("the settings sent", |l| l.starts_with("settings sent"));
    // Two counts in a row 1000 apart: the new step (2 by 2, the count passes 1000 too).
    let last = std::cell::Cell::new(i64::MIN);
    trial.wait_message("a count by the new step", |b| {
        let count = b["count"].as_i64().unwrap_or(0);
        count.wrapping_sub(last.replace(count)) == 1000
    });
    trial.send(r#"{"step": 0}"#);
    let refused = trial.wait_line("the refusal", |l| l.starts_with("settings rejected"));
    assert!(refused.contains("step must not be 0"), "{refused}");
    trial.send("method get");
    trial.wait_line("get's answer", |l| {
        l.starts_with("method get: 200 {\"count\":")
    });
    let (status, lines) = trial.finish();
    stopped_cleanly(status, &lines);
}

const TEMPLATE_SETTINGS: &str = r#"{"interval": "20ms", "step": 2}"#;

#[test]
fn the_rust_template_builds_offline_inside_the_checkout_and_runs() {
    // Inside this checkout (its target directory, which git ignores): with no [workspace] of
    // its own, cargo would take the new crate for a member of hubagent's workspace and refuse.
    let root = repo_root();
    let parent = root.join("target/plugin-template-test");
    std::fs::create_dir_all(&parent).unwrap();
    let dir = tempfile::tempdir_in(&parent).unwrap();
    let plugin = new_plugin("my-rust-meter", "rust", dir.path());
    let manifest = std::fs::read_to_string(plugin.join("Cargo.toml")).unwrap();
    let sdk = root.join("plugins/sdk").canonicalize().unwrap();
    assert!(
        manifest.contains(&format!("path = \"{}\"", sdk.display())),
        "{manifest}"
    );
    // One target directory for every run: the dependencies build once.
    let target = root.join("target/plugin-template");
    for args in [&["test", "--offline"][..], &["build", "--offline"][..]] {
        let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(args)
            .current_dir(&plugin)
            .env("CARGO_TARGET_DIR", &target)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cargo {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let library = target.join("debug/libmy_rust_meter.so");
    let trial = Trial::start(&["--settings", TEMPLATE_SETTINGS, library.to_str().unwrap()]);
    try_a_counter_template(trial);
}

#[test]
fn the_c_template_builds_with_make_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = new_plugin("my-c-meter", "c", dir.path());
    let out = Command::new("make").current_dir(&plugin).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let trial = Trial::start_in(
        &["--settings", TEMPLATE_SETTINGS, "./libmy_c_meter.so"],
        Some(&plugin),
    );
    try_a_counter_template(trial);
}

#[test]
fn the_python_template_runs_as_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = new_plugin("my-py-meter", "python", dir.path());
    let trial = Trial::start_in(
        &[
            "--settings",
            TEMPLATE_SETTINGS,
            "--",
            "/usr/bin/python3",
            "my_py_meter.py",
        ],
        Some(&plugin),
    );
    try_a_counter_template(trial);
}

/// A plugin that fails while running ends the trial as it would be restarted by the daemon:
/// the reason on stdout and stderr, exit 1.
#[test]
fn a_plugin_that_crashes_panics_or_hangs_fails_the_trial() {
    let library = built_library("hubagent_test_misbehave");
    let cases = [
        (
            r#"{"mode": "segfault", "interval": "10ms"}"#,
            "ended: the plugin process killed by SIGSEGV",
            "the plugin ended: the plugin process killed by SIGSEGV",
        ),
        (
            r#"{"mode": "worker-panic", "interval": "10ms"}"#,
            "health failed: ",
            "the plugin reported itself failed (the daemon would restart it): ",
        ),
        (
            r#"{"mode": "hang"}"#,
            "sandbox: ",
            "hung: start did not return within 10s",
        ),
    ];
    for (settings, printed, reason) in cases {
        let mut trial = Trial::start(&["--settings", settings, library.to_str().unwrap()]);
        trial.wait_line(printed, |l| l.starts_with(printed));
        let (status, lines) = trial.wait_exit();
        assert_eq!(status.code(), Some(1), "{settings}\n{}", lines.join("\n"));
        let stderr = lines.last().unwrap();
        assert!(stderr.contains(reason), "{settings}: {stderr}");
        assert!(
            !lines.iter().any(|l| l == "stopped"),
            "{}",
            lines.join("\n")
        );
    }
}

/// The tried plugin is confined as the daemon would confine it: a file outside the system
/// directories is out of reach until `--allow-read` names it, and `--no-sandbox` lifts it all.
#[test]
fn the_tried_plugin_is_sandboxed_as_the_daemon_would_sandbox_it() {
    let library = built_library("hubagent_test_misbehave");
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("data.txt");
    std::fs::write(&secret, "x").unwrap();
    let settings =
        serde_json::json!({"mode": "probe", "interval": "50ms", "read": [secret]}).to_string();
    let probe = |extra: &[&str]| {
        let mut args = vec!["--settings", settings.as_str()];
        args.extend_from_slice(extra);
        args.push(library.to_str().unwrap());
        let mut trial = Trial::start(&args);
        let sandbox = trial.wait_line("the sandbox line", |l| l.starts_with("sandbox: "));
        let line = trial.wait_line("a probe", |l| l.starts_with("log info: probe "));
        let (status, lines) = trial.finish();
        stopped_cleanly(status, &lines);
        let result: Value =
            serde_json::from_str(line.trim_start_matches("log info: probe ")).unwrap();
        (sandbox, result["read"][secret.to_str().unwrap()].clone())
    };
    let (sandbox, confined) = probe(&[]);
    assert!(sandbox.contains("as the daemon confines it"), "{sandbox}");
    assert_eq!(confined, "EACCES", "{sandbox}");
    let allow = format!("--allow-read={}", dir.path().display());
    let (_, allowed) = probe(&[allow.as_str()]);
    assert_eq!(allowed, "ok");
    let (sandbox, unconfined) = probe(&["--no-sandbox"]);
    assert_eq!(sandbox, "sandbox: off (--no-sandbox)");
    assert_eq!(unconfined, "ok");
}
