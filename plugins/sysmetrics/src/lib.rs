//! The gateway's own health as telemetry (`libhubagent_sysmetrics.so`): CPU use, memory, disk
//! space, network bytes, load average and uptime, read from /proc and statvfs.
//!
//! Settings: `interval` (default "60s", at least "1s"), `disks` (mount points, default ["/"]),
//! `interfaces` (default: every interface but `lo`).

use std::thread::JoinHandle;
use std::time::Duration;

use hubagent_plugin_sdk::settings::{self, Control, SettingsError, Wake};
use hubagent_plugin_sdk::{Host, Level, Message, Plugin, StartError, export_plugin};
use serde::Deserialize;
use serde_json::{Map, Value, json};

/// The settings, read by the SDK's typed settings (`settings::parse`): a wrong key or type is
/// refused with its path (`settings.interval: …`) as the reason.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(with = "settings::duration", default = "a_minute")]
    pub interval: Duration,
    #[serde(default = "root_only")]
    pub disks: Vec<String>,
    #[serde(default)]
    pub interfaces: Option<Vec<String>>,
}

fn a_minute() -> Duration {
    Duration::from_secs(60)
}

fn root_only() -> Vec<String> {
    vec!["/".into()]
}

pub fn parse_settings(text: &str) -> Result<Settings, SettingsError> {
    let s: Settings = settings::parse(text)?;
    if s.interval < Duration::from_secs(1) {
        return Err(SettingsError::new(format!(
            "settings.interval: {} is below the 1s minimum",
            settings::format_duration(s.interval)
        )));
    }
    Ok(s)
}

/// CPU time counters from the first line of /proc/stat: (busy, total) jiffies.
pub fn cpu_times(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 4 {
        return None;
    }
    let total: u64 = v.iter().take(8).sum();
    let idle = v[3] + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// (total, available) bytes from /proc/meminfo.
pub fn memory(meminfo: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        meminfo
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    Some((field("MemTotal:")?, field("MemAvailable:")?))
}

/// Per interface: (rx bytes, tx bytes) from /proc/net/dev.
pub fn network(dev: &str) -> Vec<(String, u64, u64)> {
    dev.lines()
        .skip(2)
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let f: Vec<u64> = rest
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            Some((name.trim().to_string(), *f.first()?, *f.get(8)?))
        })
        .collect()
}

fn disk(path: &str) -> Option<(u64, u64)> {
    let c = std::ffi::CString::new(path).ok()?;
    // SAFETY: statvfs fills the zeroed struct; `c` is a valid NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let size = st.f_frsize as u64;
    Some((st.f_blocks as u64 * size, st.f_bavail as u64 * size))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// One sample; `previous_cpu` turns the cumulative counters into a percentage.
pub fn sample(settings: &Settings, previous_cpu: &mut Option<(u64, u64)>) -> Value {
    let mut out = Map::new();
    if let Some((busy, total)) = cpu_times(&read("/proc/stat")) {
        if let Some((pb, pt)) = *previous_cpu
            && total > pt
        {
            let pct = (busy.saturating_sub(pb)) as f64 * 100.0 / (total - pt) as f64;
            out.insert("cpuPercent".into(), json!((pct * 10.0).round() / 10.0));
        }
        *previous_cpu = Some((busy, total));
    }
    if let Some((total, available)) = memory(&read("/proc/meminfo")) {
        out.insert(
            "memory".into(),
            json!({"totalBytes": total, "availableBytes": available,
                   "usedPercent": ((total - available) as f64 * 1000.0 / total.max(1) as f64).round() / 10.0}),
        );
    }
    let mut disks = Map::new();
    for path in &settings.disks {
        if let Some((total, free)) = disk(path) {
            disks.insert(
                path.clone(),
                json!({"totalBytes": total, "freeBytes": free}),
            );
        }
    }
    out.insert("disks".into(), Value::Object(disks));
    let mut nets = Map::new();
    for (name, rx, tx) in network(&read("/proc/net/dev")) {
        let wanted = match &settings.interfaces {
            Some(list) => list.contains(&name),
            None => name != "lo",
        };
        if wanted {
            nets.insert(name, json!({"rxBytes": rx, "txBytes": tx}));
        }
    }
    out.insert("network".into(), Value::Object(nets));
    let load: Vec<f64> = read("/proc/loadavg")
        .split_whitespace()
        .take(3)
        .filter_map(|x| x.parse().ok())
        .collect();
    if load.len() == 3 {
        out.insert(
            "load".into(),
            json!({"1m": load[0], "5m": load[1], "15m": load[2]}),
        );
    }
    if let Some(up) = read("/proc/uptime")
        .split_whitespace()
        .next()
        .and_then(|x| x.parse::<f64>().ok())
    {
        out.insert("uptimeSeconds".into(), json!(up.round() as u64));
    }
    Value::Object(out)
}

struct SysMetrics {
    control: Control<Settings>,
    worker: Option<JoinHandle<()>>,
}

impl Plugin for SysMetrics {
    fn start(host: Host, settings: &str) -> Result<Self, StartError> {
        let control = Control::new(parse_settings(settings)?);
        let mut watch = control.watch();
        let worker = host.spawn("sysmetrics", move || {
            let mut cpu = None;
            let mut s = watch.settings();
            // A first sample right away primes the CPU counters.
            let _ = sample(&s, &mut cpu);
            loop {
                match watch.wait(s.interval) {
                    Wake::Stopped => return,
                    // A new interval counts from now, not from the end of the old one.
                    Wake::Settings(new) => {
                        s = new;
                        continue;
                    }
                    Wake::Elapsed => {}
                }
                let body = sample(&s, &mut cpu);
                match host.publish(&Message::json(body.to_string()).property("kind", "sysmetrics"))
                {
                    Ok(()) => {}
                    Err(hubagent_plugin_sdk::PublishError::Stopping) => return,
                    Err(e) => host.log(Level::Warn, &format!("sample not published: {e}")),
                }
            }
        });
        Ok(SysMetrics {
            control,
            worker: Some(worker),
        })
    }

    fn apply_settings(&mut self, settings: &str) -> Result<(), String> {
        self.control.update(parse_settings(settings)?);
        Ok(())
    }

    fn stop(mut self) {
        self.control.stop();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

export_plugin!(
    SysMetrics,
    name = "sysmetrics",
    version = env!("CARGO_PKG_VERSION")
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_parse() {
        assert_eq!(
            cpu_times("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4\n"),
            Some((150, 1000))
        );
        assert_eq!(
            memory("MemTotal:       2048 kB\nMemFree: 1 kB\nMemAvailable:   1024 kB\n"),
            Some((2048 * 1024, 1024 * 1024))
        );
        let dev = "Inter-|   Receive\n face |bytes\n    lo: 10 1 0 0 0 0 0 0 20 2 0 0 0 0 0 0\n  eth0: 300 3 0 0 0 0 0 0 400 4 0 0 0 0 0 0\n";
        assert_eq!(
            network(dev),
            vec![("lo".into(), 10, 20), ("eth0".into(), 300, 400)]
        );
    }

    #[test]
    fn settings_are_checked() {
        assert_eq!(
            parse_settings("{}").unwrap().interval,
            Duration::from_secs(60)
        );
        assert_eq!(
            parse_settings(r#"{"interval": "10ms"}"#)
                .unwrap_err()
                .to_string(),
            "settings.interval: 10ms is below the 1s minimum"
        );
        assert!(
            parse_settings(r#"{"color": 1}"#)
                .unwrap_err()
                .to_string()
                .contains("unknown field `color`")
        );
        let s = parse_settings(r#"{"disks": ["/", "/var"], "interval": "5s"}"#).unwrap();
        assert_eq!(s.disks, vec!["/", "/var"]);
    }

    #[test]
    fn a_live_sample_has_every_section() {
        let s = parse_settings("{}").unwrap();
        let mut cpu = None;
        let _ = sample(&s, &mut cpu);
        let v = sample(&s, &mut cpu);
        for key in ["memory", "disks", "network", "load", "uptimeSeconds"] {
            assert!(v.get(key).is_some(), "{key} missing in {v}");
        }
        assert!(v["disks"]["/"]["totalBytes"].as_u64().unwrap() > 0);
    }
}

#[cfg(test)]
mod host_tests;
