//! A real HTTP proxy on loopback: Debian's tinyproxy, started by the test in the foreground with
//! its own configuration and log, so a test can see which tunnels (CONNECT) went through it.

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A TCP port no one listens on now.
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// How a [`Tinyproxy`] is set up.
pub struct ProxySettings {
    /// The address it listens on.
    pub listen: Ipv4Addr,
    /// Who may use it (`Allow`: an address or a network).
    pub allow: String,
    /// It demands this user and password (HTTP 401/407 otherwise).
    pub basic_auth: Option<(String, String)>,
    /// CONNECT only to these ports (403 otherwise), as corporate proxies allow only 443; empty:
    /// every port.
    pub connect_ports: Vec<u16>,
}

impl Default for ProxySettings {
    fn default() -> Self {
        ProxySettings {
            listen: Ipv4Addr::LOCALHOST,
            allow: "127.0.0.1".into(),
            basic_auth: None,
            connect_ports: Vec::new(),
        }
    }
}

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
        Tinyproxy::start_on(dir, free_port(), basic_auth)
    }

    /// Starts tinyproxy on `port` (again after [`Tinyproxy::kill`], for a restart).
    pub fn start_on(dir: &Path, port: u16, basic_auth: Option<(&str, &str)>) -> Tinyproxy {
        let settings = ProxySettings {
            basic_auth: basic_auth.map(|(u, p)| (u.to_string(), p.to_string())),
            ..ProxySettings::default()
        };
        Tinyproxy::start_with(dir, port, &settings)
    }

    /// Starts tinyproxy on `settings.listen`:`port`.
    pub fn start_with(dir: &Path, port: u16, settings: &ProxySettings) -> Tinyproxy {
        std::fs::create_dir_all(dir).unwrap();
        let log = dir.join("tinyproxy.log");
        let conf = dir.join("tinyproxy.conf");
        let auth = settings
            .basic_auth
            .as_ref()
            .map(|(user, password)| format!("BasicAuth {user} {password}\n"))
            .unwrap_or_default();
        // Without ConnectPort lines CONNECT is allowed to every port (hubsim's are random).
        let ports: String = settings
            .connect_ports
            .iter()
            .map(|p| format!("ConnectPort {p}\n"))
            .collect();
        std::fs::write(
            &conf,
            format!(
                "Port {port}\nListen {}\nTimeout 600\nLogFile \"{}\"\nLogLevel Connect\nMaxClients 100\nAllow {}\n{auth}{ports}",
                settings.listen,
                log.display(),
                settings.allow
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
        while TcpStream::connect((settings.listen, port)).is_err() {
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
