//! A network namespace whose only way out is a veth pair to the host: inside it, `localhost` and
//! `127.0.0.2` are its own loopback, where nothing listens, so hubsim (on the host's loopback) is
//! out of reach; only what listens on the host end of the pair (a proxy) can be reached. Needs
//! root (`ip netns`, `ip link`); deleted, with its veth pair, on drop.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

pub struct Netns {
    pub name: String,
    /// The host's end of the pair: what the namespace can reach.
    pub host_addr: Ipv4Addr,
    /// The namespace's end.
    pub inside_addr: Ipv4Addr,
}

/// Runs `ip` with `args`; the error names the command and says what it printed.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    match out.status.success() {
        true => Ok(()),
        false => Err(format!(
            "ip {}: {} {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

impl Netns {
    /// A new namespace, named and addressed after this process and a counter, so tests running in
    /// parallel (here or in another worktree) do not meet.
    pub fn create() -> Result<Netns, String> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let name = format!("hubagent-test-{pid}-{n}");
        // Interface names are at most 15 characters.
        let (host_if, inside_if) = (format!("ha{pid}x{n}h"), format!("ha{pid}x{n}n"));
        let subnet = [
            10,
            100 + (pid >> 8) as u8 % 100,
            pid as u8,
            (n % 64) as u8 * 4,
        ];
        let host_addr = Ipv4Addr::new(subnet[0], subnet[1], subnet[2], subnet[3] + 1);
        let inside_addr = Ipv4Addr::new(subnet[0], subnet[1], subnet[2], subnet[3] + 2);
        ip(&["netns", "add", &name])?;
        let netns = Netns {
            name,
            host_addr,
            inside_addr,
        };
        let (host_cidr, inside_cidr) = (format!("{host_addr}/30"), format!("{inside_addr}/30"));
        let ns = netns.name.as_str();
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &inside_if,
        ])?;
        ip(&["link", "set", &inside_if, "netns", ns])?;
        ip(&["addr", "add", &host_cidr, "dev", &host_if])?;
        ip(&["link", "set", &host_if, "up"])?;
        ip(&["-n", ns, "addr", "add", &inside_cidr, "dev", &inside_if])?;
        ip(&["-n", ns, "link", "set", &inside_if, "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        Ok(netns)
    }

    /// The namespace, or `None` where it cannot be made (not root, no `ip`): said on stderr, and
    /// a failure under `CI=true`, where every test must really run.
    pub fn create_or_skip(test: &str) -> Option<Netns> {
        match Netns::create() {
            Ok(netns) => Some(netns),
            Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
                panic!("{test} needs a network namespace (root, iproute2): {e}")
            }
            Err(e) => {
                eprintln!(
                    "SKIPPED {test}: no network namespace ({e}); CI=true makes this a failure"
                );
                None
            }
        }
    }

    /// `program` run inside the namespace.
    pub fn command(&self, program: &std::path::Path) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(program);
        command
    }

    /// Whether a TCP connection from inside the namespace to `host:port` succeeds.
    pub fn can_connect(&self, host: &str, port: u16) -> bool {
        self.command(std::path::Path::new("bash"))
            .args(["-c", &format!("exec 3<>/dev/tcp/{host}/{port}")])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Netns {
    /// Waits until `host:port` can be reached from inside (a fresh veth pair takes a moment to
    /// carry packets on a loaded machine); false after [`crate::WAIT`].
    pub fn wait_reachable(&self, host: &str, port: u16) -> bool {
        let deadline = std::time::Instant::now() + crate::WAIT;
        while !self.can_connect(host, port) {
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        true
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes the veth pair with it.
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("{e}");
        }
    }
}
