//! A software TPM (swtpm) for one test: socket mode on free loopback ports, state in its own
//! temporary directory, stopped (gracefully, then killed) when dropped.

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Swtpm {
    child: Option<Child>,
    state_dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    pub port: u16,
    pub ctrl_port: u16,
}

/// Two consecutive free ports: the TSS's swtpm TCTI expects the control channel on port + 1.
fn free_ports() -> (u16, u16) {
    loop {
        let a = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = a.local_addr().unwrap().port();
        if port < u16::MAX && TcpListener::bind((Ipv4Addr::LOCALHOST, port + 1)).is_ok() {
            return (port, port + 1);
        }
    }
}

impl Swtpm {
    /// A fresh TPM (new state: new EK, empty NV).
    pub fn start() -> Swtpm {
        let tmp = tempfile::tempdir().unwrap();
        let mut tpm = Swtpm::start_in(tmp.path());
        tpm._tmp = Some(tmp);
        tpm
    }

    /// A TPM whose state lives in `state_dir` (kept across [`Swtpm::restart`]).
    pub fn start_in(state_dir: &Path) -> Swtpm {
        let mut tpm = Swtpm {
            child: None,
            state_dir: state_dir.to_path_buf(),
            _tmp: None,
            port: 0,
            ctrl_port: 0,
        };
        tpm.launch();
        tpm
    }

    fn launch(&mut self) {
        let mut last_error = String::new();
        // Another process may grab a port between probing and swtpm binding it: try again.
        for _ in 0..5 {
            let (port, ctrl_port) = free_ports();
            let mut child = Command::new("swtpm")
                .arg("socket")
                .arg("--tpm2")
                .args([
                    "--server",
                    &format!("type=tcp,port={port},bindaddr=127.0.0.1"),
                ])
                .args([
                    "--ctrl",
                    &format!("type=tcp,port={ctrl_port},bindaddr=127.0.0.1"),
                ])
                .args(["--tpmstate", &format!("dir={}", self.state_dir.display())])
                .args(["--flags", "startup-clear"])
                .args([
                    "--log",
                    &format!("file={}/swtpm.log,level=1", self.state_dir.display()),
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("swtpm is installed (tests/setup.sh installs it)");
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Some(status) = child.try_wait().unwrap() {
                    let mut stderr = String::new();
                    if let Some(mut e) = child.stderr.take() {
                        use std::io::Read;
                        let _ = e.read_to_string(&mut stderr);
                    }
                    last_error = format!("swtpm exited with {status}: {stderr}");
                    break;
                }
                // Both sockets: swtpm opens the TPM's after the control channel's.
                let listening = |p: u16| TcpStream::connect((Ipv4Addr::LOCALHOST, p)).is_ok();
                if listening(ctrl_port) && listening(port) {
                    self.child = Some(child);
                    self.port = port;
                    self.ctrl_port = ctrl_port;
                    return;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_error = "swtpm did not listen within 10 s".into();
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        panic!("cannot start swtpm: {last_error}");
    }

    /// `swtpm:host=127.0.0.1,port=N`
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Power cycle: stop, then start again on the same state (persistent objects survive).
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    /// Graceful shutdown (`swtpm_ioctl -s`, which saves the state), then kill if it lingers.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("swtpm_ioctl")
            .args(["--tcp", &format!("127.0.0.1:{}", self.ctrl_port), "-s"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = child.wait();
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        self.stop();
    }
}
