//! `hubagent`: the daemon and its command-line tools. Each subcommand's work lives in the module
//! of its concern; this file parses arguments and maps outcomes onto exit codes.

mod args;
mod check;
#[cfg(feature = "demo")]
mod demo;
mod human;
mod manuals;
#[cfg(feature = "tpm")]
mod tpm;

use std::path::Path;
use std::process::ExitCode;

use clap::Parser;
use hubagent::config::Config;
use hubagent::system::control::{self, ControlError, Request};

use args::{Cli, Command, ConfigCommand, PluginsCommand, exit};

fn main() -> ExitCode {
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
        Command::Plugins(PluginsCommand::Try(args)) => plugins_try(args),
        Command::Plugins(PluginsCommand::New(args)) => plugins_new(args),
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
        Command::Manuals { out } => manuals::write(&out),
    };
    ExitCode::from(code as u8)
}

/// `hubagent plugins try`: the trial's own lines on stdout, the agent's log (and what the
/// plugin writes to stderr, as the daemon logs it) on stderr.
fn plugins_try(args: args::TryArgs) -> i32 {
    use hubagent::plugins::trial::{self, Ending, Trial};
    let settings = match serde_json::from_str::<serde_json::Value>(&args.settings) {
        Ok(serde_json::Value::Object(m)) => m,
        Ok(_) => {
            eprintln!("hubagent plugins try: --settings must be a JSON object");
            return exit::FAILURE;
        }
        Err(e) => {
            eprintln!("hubagent plugins try: --settings is not JSON: {e}");
            return exit::FAILURE;
        }
    };
    let sandbox = hubagent::config::plugin::SandboxSettings {
        allow_read: args.allow_read,
        allow_write: args.allow_write,
        ..Default::default()
    };
    let mut trial = match Trial::new(
        &args.target,
        args.kind.as_deref(),
        args.name.as_deref(),
        settings,
        &sandbox,
    ) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("hubagent plugins try: {e}");
            return exit::FAILURE;
        }
    };
    trial.sandbox = !args.no_sandbox;
    hubagent::system::logging::init("info", hubagent::config::LogFormat::Text);
    let agent = std::env::current_exe().unwrap_or_else(|_| "hubagent".into());
    let input = trial::stdin_lines();
    match runtime().block_on(trial::run(trial, &agent, input)) {
        Ending::Stopped => exit::OK,
        Ending::Failed(why) => {
            eprintln!("hubagent plugins try: {why}");
            exit::FAILURE
        }
    }
}

/// `hubagent plugins new`: writes the template and says how to build and try it.
fn plugins_new(args: args::NewArgs) -> i32 {
    use hubagent::plugins::template::{self, Lang};
    let made = Lang::parse(&args.lang).and_then(|lang| {
        let dir = args.dir.unwrap_or_else(|| ".".into());
        template::create(&args.name, lang, &dir, args.sdk.as_deref())
    });
    match made {
        Ok(made) => {
            println!("made {}; build and try it:", made.dir.display());
            for step in &made.next {
                println!("  {step}");
            }
            exit::OK
        }
        Err(e) => {
            eprintln!("hubagent plugins new: {e}");
            exit::FAILURE
        }
    }
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

#[cfg(feature = "tpm")]
fn tpm(path: &Path, command: args::TpmCommand) -> i32 {
    tpm::run(path, command)
}

#[cfg(not(feature = "tpm"))]
fn tpm(_: &Path, _: args::TpmCommand) -> i32 {
    eprintln!("hubagent: this build has no TPM support (built without the `tpm` feature)");
    exit::FAILURE
}

/// One worker thread: the daemon's tasks hand telemetry to one another (a plugin's outlet, the
/// queue, the pump, the hub session); on one thread they do so without waking another one or
/// contending for the queue's lock, which took a sixth of the agent's CPU per message
/// (docs/benchmarks.md, "One worker thread, and what a batch costs"). Blocking work does not
/// stall it: DPS over HTTPS and key generation run on tokio's blocking threads, and a push that
/// waits for its sync (`fsync = "always"`) hands the worker over (telemetry/publisher.rs).
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
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
                    Ok(found) => println!("plugin {}: {}", spec.name, found.line()),
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
        Request::Status => print!("{}", human::status(answer)),
        Request::PluginsList => print!("{}", human::plugins(answer)),
        Request::Reprovision => {
            println!("reprovisioning requested; `hubagent status` shows progress")
        }
        Request::Reload => println!("configuration reloaded"),
        Request::PluginRestart { name } => {
            println!("plugin {name} restarting; `hubagent plugins list` shows it")
        }
    }
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
