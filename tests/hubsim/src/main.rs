//! `hubsim`: run the simulator, issue device certificates, show where things are.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use hubsim::pki::{self, CertKind};

#[derive(Debug, Parser)]
#[command(
    name = "hubsim",
    version,
    about = "A local Azure IoT Hub Device Provisioning Service + IoT Hub for development and tests"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve DPS + IoT Hub (MQTT/TLS) and the HTTPS device and management APIs.
    Serve {
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Address DPS and the HTTPS APIs listen on (repeatable).
        #[arg(long, default_value = "127.0.0.1")]
        bind: Vec<IpAddr>,
        #[arg(long, default_value_t = 8883)]
        mqtt_port: u16,
        #[arg(long, default_value_t = 8443)]
        https_port: u16,
        /// A linked IoT hub, `NAME` or `NAME=ADDRESS` (repeatable; default `127.0.0.2`). Each hub
        /// is its own host on the MQTT port: a hub named by an IP listens there, another name on
        /// the address given or the one it resolves to.
        #[arg(long = "hub")]
        hubs: Vec<String>,
        /// The TLS server: `azure` (RSA certificate, TLS 1.2 only, as DPS and IoT Hub serve
        /// today) or `modern` (ECDSA certificate, TLS 1.3 and 1.2).
        #[arg(long, default_value = "azure")]
        tls: hubsim::pki::TlsProfile,
        /// ID scope of the DPS instance (kept in the state dir after the first start).
        /// Repeatable: the first is the instance's own, the others are served too, with the
        /// same enrollments (as if the device moved to another DPS instance).
        #[arg(long = "id-scope", default_value = "0ne00000001")]
        id_scopes: Vec<String>,
        /// Extra name (host or IP) for the server certificate (repeatable).
        #[arg(long = "san")]
        extra_sans: Vec<String>,
        /// `retry-after` seconds sent with DPS 202 answers.
        #[arg(long, default_value_t = 1)]
        retry_after: u64,
        /// Recorded telemetry kept per device for `/sim/telemetry` (0 = all); the count in
        /// `/sim/status` covers every message. For benchmarks sending millions.
        #[arg(long, default_value_t = 0)]
        telemetry_keep: usize,
    },
    /// Issue certificates for X.509 attestation tests.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Print a SAS token for the management API (for curl: `-H "Authorization: $(hubsim token)"`).
    Token {
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Which service policy signs it: `hub` (iothubowner) or `dps` (provisioningserviceowner).
        #[arg(long, default_value = "dps")]
        policy: String,
        /// Lifetime.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
    },
    /// Print the CA path, endpoints and connection strings of a state dir.
    Info {
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// A root CA (upload it as a DPS enrollment group's signing certificate).
    Root {
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        cn: String,
    },
    /// An intermediate CA signed by `--issuer` (a directory written by `certs root`).
    Intermediate {
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        cn: String,
        #[arg(long)]
        issuer: PathBuf,
    },
    /// A device certificate, CN = registration id; self-signed without `--issuer`.
    Device {
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        cn: String,
        #[arg(long)]
        issuer: Option<PathBuf>,
    },
}

fn default_state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME") {
        return PathBuf::from(dir).join("hubsim");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    PathBuf::from(home).join(".local/state/hubsim")
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HUBSIM_LOG")
                .unwrap_or_else(|_| "hubsim=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hubsim: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve {
            state_dir,
            bind,
            mqtt_port,
            https_port,
            hubs,
            tls,
            id_scopes,
            extra_sans,
            retry_after,
            telemetry_keep,
        } => {
            let mut hub_names = Vec::new();
            let mut hub_addresses = Vec::new();
            for hub in hubs {
                match hub.split_once('=') {
                    Some((name, address)) => {
                        let ip: IpAddr = address.parse().with_context(|| {
                            format!("--hub {hub}: '{address}' is not an IP address")
                        })?;
                        hub_addresses.push((name.to_string(), ip));
                        hub_names.push(name.to_string());
                    }
                    None => hub_names.push(hub),
                }
            }
            if hub_names.is_empty() {
                hub_names.push(hubsim::DEFAULT_HUB.into());
            }
            let mut id_scopes = id_scopes.into_iter();
            let id_scope = id_scopes.next().unwrap_or_else(|| "0ne00000001".into());
            let options = hubsim::Options {
                state_dir: state_dir.unwrap_or_else(default_state_dir),
                bind,
                mqtt_port,
                https_port,
                hubs: hub_names,
                hub_addresses,
                tls,
                id_scope,
                extra_id_scopes: id_scopes.collect(),
                extra_sans,
                retry_after_secs: retry_after,
                telemetry_keep,
            };
            serve(options)
        }
        Command::Certs(certs) => {
            let (kind, out, cn, issuer) = match certs {
                CertsCommand::Root { out, cn } => (CertKind::Root, out, cn, None),
                CertsCommand::Intermediate { out, cn, issuer } => {
                    (CertKind::Intermediate, out, cn, Some(issuer))
                }
                CertsCommand::Device { out, cn, issuer } => (CertKind::Device, out, cn, issuer),
            };
            if cn.chars().count() > hubsim::state::MAX_CN_LEN {
                anyhow::bail!(
                    "--cn '{cn}' is {} characters long: X.509 common names are at most {}",
                    cn.chars().count(),
                    hubsim::state::MAX_CN_LEN
                );
            }
            if matches!(kind, CertKind::Device)
                && let Err(why) = hubsim::state::check_registration_id(&cn)
            {
                anyhow::bail!(
                    "--cn '{cn}' cannot be a DPS registration id (the device certificate's CN is one): {why}"
                );
            }
            let issued = pki::issue(kind, &cn, &out, issuer.as_deref())?;
            println!("certificate: {}", issued.cert_path.display());
            println!("private key: {}", issued.key_path.display());
            println!("sha1 thumbprint: {}", issued.sha1_thumbprint);
            println!("sha256 thumbprint: {}", issued.sha256_thumbprint);
            Ok(())
        }
        Command::Info { state_dir } => info(&state_dir.unwrap_or_else(default_state_dir)),
        Command::Token {
            state_dir,
            policy,
            ttl,
        } => {
            let dir = state_dir.unwrap_or_else(default_state_dir);
            let path = dir.join("connection-strings.txt");
            let text = std::fs::read_to_string(&path).with_context(|| {
                format!("{}: not found; start `hubsim serve` first", path.display())
            })?;
            let wanted = match policy.as_str() {
                "hub" => "iothubowner",
                "dps" => "provisioningserviceowner",
                other => anyhow::bail!("unknown policy '{other}': use hub or dps"),
            };
            let line = text
                .lines()
                .find(|l| l.contains(&format!("SharedAccessKeyName={wanted};")))
                .with_context(|| format!("{}: no {wanted} connection string", path.display()))?;
            let field = |name: &str| {
                line.split(';')
                    .find_map(|p| p.strip_prefix(name))
                    .map(str::to_string)
                    .with_context(|| {
                        format!("{}: connection string without {name}", path.display())
                    })
            };
            let expiry = hubsim::auth::unix_now() + ttl.as_secs();
            let token = hubsim::auth::make_sas(
                &field("SharedAccessKey=")?,
                &field("HostName=")?,
                expiry,
                Some(wanted),
            )?;
            println!("{token}");
            Ok(())
        }
    }
}

fn serve(options: hubsim::Options) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let state_dir = options.state_dir.clone();
        let running = hubsim::start(options).await?;
        info(&state_dir)?;
        eprintln!("hubsim: ready (Ctrl-C to stop)");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        running.shutdown();
        Ok(())
    })
}

fn info(state_dir: &Path) -> anyhow::Result<()> {
    let endpoints = state_dir.join("endpoints.json");
    let text = std::fs::read_to_string(&endpoints).with_context(|| {
        format!(
            "{}: not found; start `hubsim serve --state-dir {}` first",
            endpoints.display(),
            state_dir.display()
        )
    })?;
    let endpoints: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", endpoints.display()))?;
    println!("state dir:     {}", state_dir.display());
    println!("CA:            {}", endpoints["ca"].as_str().unwrap_or(""));
    println!(
        "MQTT (DPS):    {}",
        endpoints["mqtt"].as_str().unwrap_or("")
    );
    if let Some(hubs) = endpoints["hubAddresses"].as_object() {
        for (hub, addr) in hubs {
            println!("MQTT (hub):    {addr} ({hub})");
        }
    }
    println!("TLS:           {}", endpoints["tls"].as_str().unwrap_or(""));
    println!(
        "HTTPS:         {}",
        endpoints["https"].as_str().unwrap_or("")
    );
    println!(
        "ID scope:      {}",
        endpoints["idScope"].as_str().unwrap_or("")
    );
    if let Some(extra) = endpoints["extraIdScopes"]
        .as_array()
        .filter(|a| !a.is_empty())
    {
        let extra: Vec<&str> = extra.iter().filter_map(|s| s.as_str()).collect();
        println!("more ID scopes: {}", extra.join(", "));
    }
    println!("hubs:          {}", endpoints["hubs"]);
    println!(
        "connection strings: {}",
        state_dir.join("connection-strings.txt").display()
    );
    Ok(())
}
