//! `hubagent demo`: a first look with no cloud. Starts hubsim (a local DPS + IoT Hub) in this
//! process, enrolls a gateway, writes a real configuration and key file, runs the real daemon
//! against it with the built-in simulated sensor, and narrates what the hub sees: the DPS
//! registration, the connection, every telemetry message, a desired-property change made by an
//! "operator" and the agent's acknowledgement, a built-in direct method, a method of the sensor
//! plugin, and a cloud-to-device message the plugin takes (completed at the hub only then).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hubsim::state::{
    Attestation, EnrollmentCommon, IndividualEnrollment, Status, Store, SymmetricKeyPair,
};
use serde_json::json;

use crate::args::DemoArgs;
use hubagent::daemon::{self, Command};

const REGISTRATION_ID: &str = "demo-gateway";
const PLUGIN: &str = "simulated-sensor";

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let (dir, _temp) = working_dir(&args)?;
    if std::env::var_os("RUST_LOG").is_none() {
        // The narration is the output; the agent's own log stays at warnings.
        hubagent::system::logging::init("warn", hubagent::config::LogFormat::Text);
    } else {
        hubagent::system::logging::init("info", hubagent::config::LogFormat::Text);
    }

    println!("hubagent demo: a local DPS + IoT Hub (hubsim) and the real agent, no cloud needed.");
    println!("Working directory: {}\n", dir.display());

    let running = hubsim::start(hubsim::Options::ephemeral(dir.join("hubsim"))).await?;
    let sim = running.sim.clone();
    println!(
        "[hubsim] DPS on localhost:{port}, IoT Hub {hub} on {hub}:{port} (MQTT over TLS), management API on https://localhost:{}",
        running.https_addr.port(),
        port = running.mqtt_addr.port(),
        hub = running.sim.config.hubs[0],
    );
    let config_path = enroll_and_configure(&dir, &running, args.interval)?;
    println!("[agent]  configuration {}", config_path.display());
    println!("[agent]  starting the daemon (the same code as `hubagent run`)\n");

    let config = hubagent::config::Config::load(&config_path, &|_| None)?;
    let socket = config.agent.control_socket.clone();
    let (commands, receiver) = tokio::sync::mpsc::unbounded_channel();
    let daemon_commands = commands.clone();
    let agent = tokio::spawn(async move {
        daemon::run_with(config, &config_path, daemon_commands, receiver).await
    });

    let mut narrator = Narrator::default();
    play_operator(&sim, &mut narrator, &args).await?;

    // Ask the running agent what it did, then stop it.
    let status = tokio::task::spawn_blocking(move || {
        hubagent::system::control::request(&socket, &hubagent::system::control::Request::Status)
    })
    .await?
    .ok();
    let _ = commands.send(Command::Shutdown);
    let _ = tokio::time::timeout(Duration::from_secs(10), agent).await;
    narrator.print_new(&sim);
    print_summary(status, narrator.unique_ids.len());
    running.shutdown();
    Ok(())
}

/// `--state-dir`, or a temporary directory that goes away with the returned guard.
fn working_dir(args: &DemoArgs) -> anyhow::Result<(PathBuf, Option<tempfile::TempDir>)> {
    let (dir, temp) = match &args.state_dir {
        Some(d) => (d.clone(), None),
        None => {
            let temp = tempfile::Builder::new()
                .prefix("hubagent-demo-")
                .tempdir()?;
            (temp.path().to_path_buf(), Some(temp))
        }
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok((dir, temp))
}

/// Enrolls the gateway in hubsim and writes its key file and the agent's configuration; returns
/// the configuration's path.
fn enroll_and_configure(
    dir: &Path,
    running: &hubsim::Running,
    interval: Duration,
) -> anyhow::Result<PathBuf> {
    let key = enroll(&running.sim)?;
    let key_file = dir.join("device.key");
    write_private(&key_file, &key)?;
    let scope = running.sim.read(|s| s.id_scope.clone());
    println!(
        "[hubsim] individual enrollment '{REGISTRATION_ID}' (symmetric key) in ID scope {scope}; key in {} (mode 0600)",
        key_file.display()
    );
    let config_path = dir.join("config.toml");
    std::fs::write(
        &config_path,
        demo_config(dir, &scope, &key_file, running, interval),
    )?;
    Ok(config_path)
}

/// Narrates until the time is up (or Ctrl-C) and plays the operator: once telemetry flows, a
/// desired-property change at 40 % of the time, the built-in `ping` at 60 %, the plugin's
/// method `<plugin>.read` at 70 % and a C2D message for the plugin at 80 %.
async fn play_operator(
    sim: &Arc<hubsim::Sim>,
    narrator: &mut Narrator,
    args: &DemoArgs,
) -> anyhow::Result<()> {
    let device_key = Store::device_key(&sim.config.hubs[0], REGISTRATION_ID);
    let start = tokio::time::Instant::now();
    let total = if args.duration.is_zero() {
        Duration::from_secs(u64::MAX / 4)
    } else {
        args.duration
    };
    let change_at = start + total.mul_f64(0.4);
    let ping_at = start + total.mul_f64(0.6);
    let read_at = start + total.mul_f64(0.7);
    let c2d_at = start + total.mul_f64(0.8);
    let (mut changed, mut pinged, mut read, mut sent) = (false, false, false, false);
    let mut ctrl_c = Box::pin(tokio::signal::ctrl_c());
    loop {
        narrator.print_new(sim);
        if tokio::time::Instant::now() >= start + total {
            return Ok(());
        }
        if !changed && tokio::time::Instant::now() >= change_at && narrator.telemetry > 0 {
            changed = true;
            narrator.watch_ack = Some(change_interval(sim, &device_key, args.interval / 2)?);
        }
        let now = tokio::time::Instant::now();
        if !pinged && now >= ping_at && narrator.telemetry > 0 {
            pinged = true;
            call_method(sim, &device_key, "ping", json!({"from": "demo operator"}));
        }
        if !read && now >= read_at && narrator.telemetry > 0 {
            read = true;
            call_method(sim, &device_key, &format!("{PLUGIN}.read"), json!(null));
        }
        if !sent && now >= c2d_at && narrator.telemetry > 0 {
            sent = true;
            send_c2d(sim, &device_key)?;
            narrator.watch_c2d = Some(C2D_ID.to_string());
        }
        tokio::select! {
            _ = sim.wait_until(Duration::from_millis(250), |_| false) => {}
            _ = &mut ctrl_c => return Ok(()),
        }
    }
}

/// The operator sets the sensor's interval in the desired properties; returns the desired
/// `$version` the agent's report should name.
fn change_interval(sim: &hubsim::Sim, device_key: &str, interval: Duration) -> anyhow::Result<u64> {
    let interval = humantime::format_duration(interval).to_string();
    let version = hubsim::twin::apply_desired_patch(
        sim,
        device_key,
        &json!({"plugins": {PLUGIN: {"interval": interval}}}),
    )?;
    println!(
        "[twin]   operator sets desired plugins.{PLUGIN}.interval = {interval} (desired $version {version})"
    );
    Ok(version)
}

/// The operator calls a direct method; the answer is printed when it comes.
fn call_method(sim: &Arc<hubsim::Sim>, device_key: &str, method: &str, payload: serde_json::Value) {
    let (sim, device_key, method) = (sim.clone(), device_key.to_string(), method.to_string());
    tokio::spawn(async move {
        match hubsim::twin::invoke_method(
            &sim,
            &device_key,
            &method,
            &payload,
            Duration::from_secs(30),
        )
        .await
        {
            Ok((status, payload)) => {
                println!("[method] operator calls '{method}' -> {status} {payload}")
            }
            Err(e) => println!("[method] operator calls '{method}' -> {e}"),
        }
    });
}

const C2D_ID: &str = "demo-c2d-1";

/// The operator sends the sensor plugin a cloud-to-device message (property `to` = its name).
fn send_c2d(sim: &hubsim::Sim, device_key: &str) -> anyhow::Result<()> {
    hubsim::twin::send_c2d(
        sim,
        device_key,
        hubsim::state::C2dMessage {
            body: "calibrate at 21.0 C".into(),
            properties: vec![
                ("$.mid".into(), C2D_ID.into()),
                ("to".into(), PLUGIN.into()),
            ],
        },
    )?;
    println!(
        "[c2d]    operator sends message {C2D_ID} (to={PLUGIN}); the hub holds it until the device completes it"
    );
    Ok(())
}

fn print_summary(status: Option<serde_json::Value>, received: usize) {
    println!();
    match status {
        Some(s) => println!(
            "Summary: when asked, the hub had acknowledged {} of the agent's messages ({} in flight); hubsim recorded {} distinct messages in all, none missing.",
            s["published"], s["queue_depth"], received
        ),
        None => println!("Summary: hubsim received {received} distinct messages."),
    }
    println!(
        "Next: `hubsim serve` runs the simulator on its own (docs/hubsim.md); README.md shows how to point an installed agent at it."
    );
}

fn enroll(sim: &hubsim::Sim) -> anyhow::Result<String> {
    let existing = sim.read(|s| {
        s.enrollments
            .get(REGISTRATION_ID)
            .and_then(|e| match &e.common.attestation {
                Attestation::SymmetricKey { symmetric_key } => {
                    Some(symmetric_key.primary_key.clone())
                }
                _ => None,
            })
    });
    if let Some(key) = existing {
        return Ok(key);
    }
    let key = hubsim::state::random_key();
    let enrollment = IndividualEnrollment {
        registration_id: REGISTRATION_ID.into(),
        device_id: None,
        common: EnrollmentCommon {
            attestation: Attestation::SymmetricKey {
                symmetric_key: SymmetricKeyPair {
                    primary_key: key.clone(),
                    secondary_key: hubsim::state::random_key(),
                },
            },
            iot_hub_host_name: None,
            iot_hubs: None,
            allocation_policy: Default::default(),
            provisioning_status: Status::Enabled,
            reprovision_policy: Default::default(),
            initial_twin: None,
            etag: None,
            created_date_time_utc: Some(hubsim::state::now_rfc3339()),
            last_updated_date_time_utc: None,
            certificate_issuance: None,
        },
    };
    sim.mutate(|s| s.enrollments.insert(REGISTRATION_ID.into(), enrollment))?;
    Ok(key)
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    writeln!(file, "{text}")?;
    Ok(())
}

fn demo_config(
    dir: &Path,
    scope: &str,
    key_file: &Path,
    running: &hubsim::Running,
    interval: Duration,
) -> String {
    format!(
        r#"# Written by `hubagent demo`: the agent talks to the hubsim started by the demo.
[agent]
state_dir = "{state}"
control_socket = "{socket}"

[provisioning]
source = "dps"
global_endpoint = "localhost"
id_scope = "{scope}"
registration_id = "{REGISTRATION_ID}"

[provisioning.attestation]
method = "symmetric_key"
key = {{ file = "{key}" }}

[hub]
port = {port}
trust_bundle = "{ca}"

[[plugin]]
name = "{PLUGIN}"
kind = "builtin"
builtin = "simulated-sensor"
interval = "{interval}"
"#,
        state = dir.join("agent-state").display(),
        socket = dir.join("control.sock").display(),
        key = key_file.display(),
        port = running.mqtt_addr.port(),
        ca = running.ca_pem_path.display(),
        interval = humantime::format_duration(interval),
    )
}

/// Prints what hubsim recorded since the last call.
#[derive(Default)]
struct Narrator {
    registrations: usize,
    connections: usize,
    telemetry: usize,
    unique_ids: std::collections::BTreeSet<String>,
    watch_ack: Option<u64>,
    /// A C2D message whose completion is still to be told.
    watch_c2d: Option<String>,
}

impl Narrator {
    fn print_new(&mut self, sim: &hubsim::Sim) {
        let records = sim.records.lock().unwrap();
        for r in records.registrations.iter().skip(self.registrations) {
            println!(
                "[dps]    registration '{}' over {}: {} -> hub {} device {}",
                r.registration_id,
                r.transport,
                r.outcome,
                r.assigned_hub.as_deref().unwrap_or("-"),
                r.device_id.as_deref().unwrap_or("-")
            );
        }
        self.registrations = records.registrations.len();
        for c in records.connections.iter().skip(self.connections) {
            println!(
                "[{}]    {} {}{}",
                c.service,
                c.client_id,
                c.event,
                c.reason
                    .as_deref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            );
        }
        self.connections = records.connections.len();
        let empty = Vec::new();
        let telemetry = records.telemetry.get(REGISTRATION_ID).unwrap_or(&empty);
        for t in telemetry.iter().skip(self.telemetry) {
            let id = t
                .system_properties
                .get("message-id")
                .cloned()
                .unwrap_or_default();
            println!(
                "[telemetry] #{:<3} {}  (source={}, message-id {}…)",
                self.telemetry + 1,
                t.body.as_deref().unwrap_or("<binary>"),
                t.properties
                    .get("source")
                    .map(String::as_str)
                    .unwrap_or("?"),
                id.chars().take(8).collect::<String>()
            );
            self.unique_ids.insert(id);
            self.telemetry += 1;
        }
        drop(records);
        if let Some(id) = &self.watch_c2d {
            let key = Store::device_key(&sim.config.hubs[0], REGISTRATION_ID);
            let done = sim
                .c2d_records(&key)
                .into_iter()
                .find(|r| &r.message_id == id && r.state == hubsim::state::C2dState::Completed);
            if let Some(r) = done {
                println!(
                    "[c2d]    message {id} completed by the agent once the plugin took it (delivered {} time(s))",
                    r.delivery_count
                );
                self.watch_c2d = None;
            }
        }
        if let Some(version) = self.watch_ack {
            let reported = sim.read(|s| {
                s.devices
                    .get(&Store::device_key(&sim.config.hubs[0], REGISTRATION_ID))
                    .and_then(|d| d.twin.reported.get("plugins").cloned())
            });
            if let Some(plugin) = reported.as_ref().and_then(|p| p.get(PLUGIN))
                && plugin["desiredVersion"].as_u64() == Some(version)
            {
                println!(
                    "[twin]   agent reports plugins.{PLUGIN}: status {}, interval {} (applied desired $version {version})",
                    plugin["status"].as_str().unwrap_or("?"),
                    plugin["settings"]["interval"].as_str().unwrap_or("?")
                );
                self.watch_ack = None;
            }
        }
    }
}
