//! A real HTTP proxy on loopback: Debian's tinyproxy, started by the test in the foreground with
//! its own configuration and log, so a test can see which tunnels (CONNECT) went through it.

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Tinyproxy {
    child: Child,
    pub port: u16,
    log: PathBuf,
    conf: PathBuf,
}

impl Tinyproxy {
    /// Starts tinyproxy on a free loopback port; with `basic_auth`, it demands that user and
    /// password (HTTP 407 otherwise).
    pub fn start(dir: &Path, basic_auth: Option<(&str, &str)>) -> Tinyproxy {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Tinyproxy::start_on(dir, port, basic_auth)
    }

    /// Starts tinyproxy on `port` (again after [`Tinyproxy::kill`], for a restart).
    pub fn start_on(dir: &Path, port: u16, basic_auth: Option<(&str, &str)>) -> Tinyproxy {
        std::fs::create_dir_all(dir).unwrap();
        let log = dir.join("tinyproxy.log");
        let conf = dir.join("tinyproxy.conf");
        let auth = basic_auth
            .map(|(user, password)| format!("BasicAuth {user} {password}\n"))
            .unwrap_or_default();
        // No ConnectPort line: CONNECT is allowed to every port (hubsim's are random).
        std::fs::write(
            &conf,
            format!(
                "Port {port}\nListen 127.0.0.1\nTimeout 600\nLogFile \"{}\"\nLogLevel Connect\nMaxClients 100\nAllow 127.0.0.1\n{auth}",
                log.display()
            ),
        )
        .unwrap();
        let child = Command::new("tinyproxy")
            .args(["-d", "-c"])
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tinyproxy (Debian package tinyproxy; tests/setup.sh installs it)");
        let deadline = Instant::now() + crate::WAIT;
        while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "tinyproxy did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Tinyproxy {
            child,
            port,
            log,
            conf,
        }
    }

    /// The tunnels it opened: the `host:port` of each CONNECT it logged.
    pub fn tunnels(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            // "CONNECT   <date> [pid]: Request (file descriptor 5): CONNECT host:port HTTP/1.1"
            .filter_map(|line| line.split_once("): CONNECT ").map(|(_, rest)| rest))
            .filter_map(|rest| rest.split_whitespace().next())
            .map(str::to_string)
            .collect()
    }

    /// Kills it (SIGKILL): every tunnel through it breaks at once.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Its configuration file (for a test that starts it again).
    pub fn conf(&self) -> &Path {
        &self.conf
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        self.kill();
    }
}
