//! `hubagent`: the daemon and its command-line tools. Each subcommand's work lives in the module
//! of its concern; this file parses arguments and maps outcomes onto exit codes.

mod args;
mod check;
#[cfg(feature = "demo")]
mod demo;
#[cfg(feature = "tpm")]
mod tpm;

use std::path::Path;
use std::process::ExitCode;

use clap::Parser;
use hubagent::config::Config;
use hubagent::system::control::{self, ControlError, Request};

use args::{Cli, Command, ConfigCommand, PluginsCommand, exit};

fn main() -> ExitCode {
    quiet_tss();
    let cli = Cli::parse();
    if matches!(cli.command, Command::Run | Command::PluginHost { .. }) {
        hubagent::system::hardening::protect_secrets_in_memory();
    }
    let code = match cli.command {
        Command::Run => run(&cli.config),
        Command::Demo(args) => demo(args),
        Command::Provision { force, json } => provision(&cli.config, force, json),
        Command::Reprovision => ask(&cli.config, Request::Reprovision, false),
        Command::Reload => ask(&cli.config, Request::Reload, false),
        Command::Status { json } => ask(&cli.config, Request::Status, json),
        Command::Check { json } => check(&cli.config, json),
        Command::Config(ConfigCommand::Check { file }) => {
            config_check(file.as_deref().unwrap_or(&cli.config))
        }
        Command::Plugins(PluginsCommand::List { json }) => {
            ask(&cli.config, Request::PluginsList, json)
        }
        Command::Plugins(PluginsCommand::Restart { name }) => {
            ask(&cli.config, Request::PluginRestart { name }, false)
        }
        Command::Tpm(command) => tpm(&cli.config, command),
        Command::PluginHost {
            path,
            allow_unsafe_paths,
            probe: true,
            ..
        } => hubagent::plugins::host::probe(&path, allow_unsafe_paths),
        Command::PluginHost {
            name,
            path,
            allow_unsafe_paths,
            sandbox,
            ..
        } => hubagent::plugins::host::run(&name, &path, allow_unsafe_paths, sandbox.as_deref()),
        Command::SandboxExec { sandbox, command } => sandbox_exec(&sandbox, &command),
    };
    ExitCode::from(code as u8)
}

/// `hubagent sandbox-exec`: confine, then become the exec plugin (same process, same pid, so
/// the supervisor's signals and limits reach the plugin). Returns only when that fails.
fn sandbox_exec(policy: &str, command: &[std::ffi::OsString]) -> i32 {
    use std::os::unix::process::CommandExt;
    let confined = hubagent::plugins::sandbox::Policy::from_argument(policy)
        .and_then(|policy| hubagent::plugins::sandbox::confine_self(&policy));
    if let Err(e) = confined {
        eprintln!("hubagent sandbox-exec: {e}");
        return exit::FAILURE;
    }
    let error = std::process::Command::new(&command[0])
        .args(&command[1..])
        .exec();
    eprintln!(
        "hubagent sandbox-exec: cannot execute {}: {error}",
        std::path::Path::new(&command[0]).display()
    );
    126
}

/// The TPM library (tpm2-tss) prints its own ERROR lines on stderr for conditions hubagent
/// reports itself in plainer words (an empty handle, a missing device). Unless the operator asked
/// for them with TSS2_LOG, keep them out of the journal.
fn quiet_tss() {
    #[cfg(feature = "tpm")]
    if std::env::var_os("TSS2_LOG").is_none() {
        // SAFETY: first thing in main, before any other thread exists.
        unsafe { std::env::set_var("TSS2_LOG", "all+NONE") };
    }
}

#[cfg(feature = "tpm")]
fn tpm(path: &Path, command: args::TpmCommand) -> i32 {
    tpm::run(path, command)
}

#[cfg(not(feature = "tpm"))]
fn tpm(_: &Path, _: args::TpmCommand) -> i32 {
    eprintln!("hubagent: this build has no TPM support (built without the `tpm` feature)");
    exit::FAILURE
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn load(path: &Path) -> Result<Config, i32> {
    Config::load(path, &|k| std::env::var(k).ok()).map_err(|e| {
        eprintln!("hubagent: {e}");
        exit::CONFIG
    })
}

fn run(path: &Path) -> i32 {
    let config = match Config::load(path, &|k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(e) => {
            // stderr reaches the journal (`systemctl status` shows the line); the status text
            // says the same where systemd still attributes it to the unit.
            eprintln!("hubagent: {e}");
            hubagent::system::systemd::status(&format!("invalid configuration: {e}"));
            return exit::CONFIG;
        }
    };
    hubagent::system::logging::init(&config.agent.log_level, config.agent.log_format);
    match runtime().block_on(hubagent::daemon::run(path)) {
        Ok(()) => exit::OK,
        Err(hubagent::daemon::DaemonError::Config(e)) => {
            tracing::error!("{e}");
            hubagent::system::systemd::status(&format!("invalid configuration: {e}"));
            exit::CONFIG
        }
        Err(e) => {
            tracing::error!("{e}");
            hubagent::system::systemd::status(&e.to_string());
            exit::FAILURE
        }
    }
}

#[cfg(feature = "demo")]
fn demo(args: args::DemoArgs) -> i32 {
    match runtime().block_on(demo::run(args)) {
        Ok(()) => exit::OK,
        Err(e) => {
            eprintln!("hubagent demo: {e:#}");
            exit::FAILURE
        }
    }
}

#[cfg(not(feature = "demo"))]
fn demo(_: args::DemoArgs) -> i32 {
    eprintln!("hubagent: this build has no demo (built without the `demo` feature)");
    exit::FAILURE
}

fn config_check(path: &Path) -> i32 {
    match load(path) {
        Ok(config) => {
            println!("{}: OK ({})", path.display(), config.summary());
            let agent = std::env::current_exe().unwrap_or_else(|_| "hubagent".into());
            let mut broken = 0;
            for spec in &config.plugins {
                let allow_unsafe = config.agent.allow_unsafe_plugin_paths;
                match hubagent::plugins::preflight::check(spec, allow_unsafe, &agent) {
                    Ok(found) => println!("plugin {}: OK ({found})", spec.name),
                    Err(problem) => {
                        broken += 1;
                        println!("plugin {}: CANNOT START: {problem}", spec.name);
                    }
                }
            }
            for spec in &config.plugins {
                let in_process =
                    matches!(spec.kind, hubagent::config::plugin::Kind::Library { .. })
                        && !spec.confinable();
                if in_process {
                    println!(
                        "note: plugin {} (isolation = \"in-process\") runs inside the agent, with its access to keys and state: the plugin sandbox cannot confine it (docs/security.md)",
                        spec.name
                    );
                }
            }
            if broken > 0 {
                eprintln!("{broken} plugin(s) cannot start as configured (see above)");
                return exit::FAILURE;
            }
            exit::OK
        }
        Err(code) => code,
    }
}

/// The control socket named by the configuration. When the file is invalid (the very moment an
/// operator runs `hubagent reload` to find out), its `[agent] control_socket` is still honoured.
fn control_socket(path: &Path) -> std::path::PathBuf {
    if let Ok(config) = Config::load(path, &|k| std::env::var(k).ok()) {
        return config.agent.control_socket;
    }
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let from_table = text.parse::<toml::Table>().ok().and_then(|t| {
        t.get("agent")?
            .get("control_socket")?
            .as_str()
            .map(std::path::PathBuf::from)
    });
    // A file with a syntax error elsewhere: look for the line itself.
    let from_line = || {
        text.lines().find_map(|line| {
            let (key, value) = line.split_once('=')?;
            (key.trim() == "control_socket")
                .then(|| std::path::PathBuf::from(value.trim().trim_matches('"')))
        })
    };
    from_table
        .or_else(from_line)
        .unwrap_or_else(|| hubagent::config::AgentSettings::default().control_socket)
}

fn ask(path: &Path, request: Request, json: bool) -> i32 {
    let socket = control_socket(path);
    match control::request(&socket, &request) {
        Ok(answer) => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&answer).unwrap_or_default()
                );
            } else {
                print_human(&request, &answer);
            }
            exit::OK
        }
        Err(e @ ControlError::Unreachable { .. }) => {
            eprintln!("hubagent: {e}");
            exit::UNAVAILABLE
        }
        Err(e) => {
            eprintln!("hubagent: {e}");
            exit::FAILURE
        }
    }
}

fn print_human(request: &Request, answer: &serde_json::Value) {
    match request {
        Request::Status => {
            let field = |k: &str| match &answer[k] {
                serde_json::Value::Null => "-".to_string(),
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            println!("hubagent {} (pid {})", field("version"), field("pid"));
            println!("  provisioning:    {}", field("provisioning"));
            println!("  registration id: {}", field("registration_id"));
            println!("  hub:             {}", field("hub"));
            println!("  device id:       {}", field("device_id"));
            println!("  provisioned at:  {}", field("provisioned_at"));
            println!("  connection:      {}", field("connection"));
            if answer["route"].is_string() {
                println!("  route:           {}", field("route"));
            }
            let memory = &answer["route_memory"];
            if memory.is_object() {
                let first = memory["first"].as_str().unwrap_or("?");
                let learned = memory["learned_at"].as_str().unwrap_or("?");
                match memory["direct_again_at"].as_str() {
                    Some(again) => println!(
                        "  auto route:      {first} first (worked at {learned}; MQTT over TLS first again from {again})"
                    ),
                    None => println!("  auto route:      {first} first (worked at {learned})"),
                }
            }
            println!("  published:       {}", field("published"));
            println!("  queued:          {}", field("queue_depth"));
            println!("  desired version: {}", field("desired_version"));
            if let Some(generation) = answer["issued_generation"].as_u64() {
                println!("  issued cert:     generation {generation} (issued by DPS)");
            }
            let certificate = &answer["certificate"];
            if certificate.is_object() {
                println!(
                    "  certificate:     {} until {} ({} days)",
                    certificate["expiry"].as_str().unwrap_or("?"),
                    certificate["not_after"].as_str().unwrap_or("?"),
                    certificate["days_left"]
                );
            }
            if answer["last_error"].is_string() {
                println!("  last error:      {}", field("last_error"));
            }
        }
        Request::PluginsList => {
            let Some(plugins) = answer.as_object() else {
                println!("no plugins");
                return;
            };
            if plugins.is_empty() {
                println!("no plugins configured");
            }
            println!(
                "{:<20} {:<8} {:<18} {:<5} {:>9} {:>8} {:>8}  SOURCE",
                "NAME", "KIND", "STATE", "ABI", "PUBLISHED", "DROPPED", "RESTARTS"
            );
            for (name, p) in plugins {
                let source = match p["kind"].as_str() {
                    Some("library") => format!(
                        "{} ({})",
                        p["path"].as_str().unwrap_or("?"),
                        p["isolation"].as_str().unwrap_or("?")
                    ),
                    Some("exec") => p["command"]
                        .as_array()
                        .map(|c| {
                            c.iter()
                                .filter_map(|a| a.as_str())
                                .collect::<Vec<_>>()
                                .join(" ")
                        })
                        .unwrap_or_default(),
                    _ => format!("builtin {}", p["builtin"].as_str().unwrap_or("?")),
                };
                println!(
                    "{:<20} {:<8} {:<18} {:<5} {:>9} {:>8} {:>8}  {source}",
                    name,
                    p["kind"].as_str().unwrap_or("?"),
                    p["status"].as_str().unwrap_or("?"),
                    p["abi"].as_str().unwrap_or("-"),
                    p["published"].as_u64().unwrap_or(0),
                    p["dropped"].as_u64().unwrap_or(0),
                    p["restarts"].as_u64().unwrap_or(0),
                );
                println!("{:<20} sandbox: {}", "", describe_sandbox(&p["sandbox"]));
                if let Some(e) = p["error"].as_str() {
                    println!("{:<20} error: {e}", "");
                }
            }
        }
        Request::Reprovision => {
            println!("reprovisioning requested; `hubagent status` shows progress")
        }
        Request::Reload => println!("configuration reloaded"),
        Request::PluginRestart { name } => {
            println!("plugin {name} restarting; `hubagent plugins list` shows it")
        }
    }
}

/// One line for `plugins list`: how a plugin is confined and what it was allowed beyond the
/// default (the JSON of `plugins::sandbox::Confinement::describe`).
fn describe_sandbox(sandbox: &serde_json::Value) -> String {
    if sandbox["confined"] != true {
        return sandbox["why"]
            .as_str()
            .unwrap_or("not started yet")
            .to_string();
    }
    let paths = |key: &str| -> String {
        let list: Vec<&str> = sandbox[key]
            .as_array()
            .map(|a| a.iter().filter_map(|p| p.as_str()).collect())
            .unwrap_or_default();
        if list.is_empty() {
            "-".into()
        } else {
            list.join(",")
        }
    };
    let mut line = format!(
        "{}; read {}; write {}; devices {}; network {}; unix sockets {}",
        sandbox["kernel"].as_str().unwrap_or("?"),
        paths("read"),
        paths("write"),
        paths("devices"),
        if sandbox["network"] == true {
            "yes"
        } else {
            "no"
        },
        if sandbox["unixSockets"] == true {
            "yes"
        } else {
            "no"
        },
    );
    if let Some(dir) = sandbox["privateDir"].as_str() {
        line.push_str(&format!("; private dir {dir}"));
    }
    if let Some(missing) = sandbox["notEnforced"].as_array().filter(|m| !m.is_empty()) {
        line.push_str(&format!("; NOT ENFORCED here: {missing:?}"));
    }
    line
}

fn provision(path: &Path, force: bool, json: bool) -> i32 {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    hubagent::system::logging::init("warn", hubagent::config::LogFormat::Text);
    match runtime().block_on(hubagent::provisioning::provision_once(&config, force)) {
        Ok((cache, fresh)) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "hub": cache.hub, "deviceId": cache.device_id,
                        "provisionedAt": cache.provisioned_at, "fromCache": !fresh,
                        "registrationState": cache.registration,
                    })
                );
            } else {
                println!(
                    "{} {} as device '{}' ({})",
                    if fresh {
                        "assigned to"
                    } else {
                        "cached assignment:"
                    },
                    cache.hub,
                    cache.device_id,
                    cache.provisioned_at
                );
            }
            exit::OK
        }
        Err(e) => {
            eprintln!("hubagent: provisioning failed: {e}");
            exit::FAILURE
        }
    }
}

fn check(path: &Path, json: bool) -> i32 {
    let report = runtime().block_on(check::run(path));
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        for c in &report.checks {
            println!("[{}] {:<28} {}", c.result.to_uppercase(), c.id, c.detail);
        }
    }
    if report.checks.iter().any(|c| c.result == "fail") {
        exit::FAILURE
    } else {
        exit::OK
    }
}
