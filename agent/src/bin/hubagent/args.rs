//! The command-line face of hubagent: argument parsing and the exit codes that scripts and
//! systemd rely on. Each subcommand's work lives in the module of its concern.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Exit codes (sysexits.h where one fits), documented in README.
pub mod exit {
    pub const OK: i32 = 0;
    /// A check failed, provisioning failed, or the daemon refused a request.
    pub const FAILURE: i32 = 1;
    /// The daemon is not running / not reachable (EX_UNAVAILABLE).
    pub const UNAVAILABLE: i32 = 69;
    /// Configuration is invalid (EX_CONFIG); the message names file, line and key.
    pub const CONFIG: i32 = 78;
    /// What each code means, for hubagent(1) (README's "Operate" says the same).
    pub const MEANINGS: [(i32, &str); 4] = [
        (OK, "success"),
        (
            FAILURE,
            "a check failed, provisioning failed, or the daemon refused a request",
        ),
        (UNAVAILABLE, "the daemon is not running or not reachable"),
        (
            CONFIG,
            "the configuration is invalid; the message names the file, line and key",
        ),
    ];
}

pub const DEFAULT_CONFIG: &str = "/etc/hubagent/config.toml";

#[derive(Debug, Parser)]
#[command(
    name = "hubagent",
    version,
    about = "Edge agent for Azure IoT Hub: DPS provisioning, cached assignment, durable telemetry"
)]
pub struct Cli {
    /// Main configuration file; drop-ins are read from `config.d/*.toml` beside it.
    #[arg(long, short = 'c', global = true, env = "HUBAGENT_CONFIG", default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon (what hubagent.service starts).
    Run,
    /// Start a local simulated DPS + IoT Hub, provision against it and stream telemetry: no cloud needed.
    Demo(DemoArgs),
    /// Register with DPS now and print the assignment (uses the cached assignment unless --force).
    Provision {
        /// Register even when a valid cached assignment exists.
        #[arg(long)]
        force: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Ask the running daemon to register with DPS again.
    Reprovision,
    /// Ask the running daemon to re-read its configuration (what `systemctl reload` runs); it
    /// reprovisions when the provisioning settings changed. Fails, naming the error, when the new
    /// configuration is invalid; the daemon then keeps the old one.
    Reload,
    /// Show what the running daemon is doing.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Diagnose configuration, keys, clock, connectivity and cache (non-zero exit on failure).
    Check {
        #[arg(long)]
        json: bool,
    },
    /// Configuration tools.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Plugin tools.
    #[command(subcommand)]
    Plugins(PluginsCommand),
    /// Internal: runs one library plugin in this process, speaking the plugin protocol on
    /// stdin/stdout. The daemon starts `hubagent-plugin-host` instead (plugins/host_program.rs);
    /// this stays for trying a host by hand (`--probe`), with the same code.
    #[command(hide = true)]
    PluginHost {
        /// The plugin's name in the configuration (for messages).
        #[arg(long)]
        name: String,
        /// The shared library to load.
        #[arg(long)]
        path: PathBuf,
        /// Skip the ownership/permission check of `path` (ignored when running as root).
        #[arg(long)]
        allow_unsafe_paths: bool,
        /// The sandbox policy (JSON) to confine this process to before the library loads.
        #[arg(long)]
        sandbox: Option<String>,
        /// Only load the library and print what it exports (`config check`), then exit.
        #[arg(long)]
        probe: bool,
    },
    /// Internal: confines this process to a sandbox policy, then executes an exec plugin in its
    /// place (started by the daemon's supervisor; see docs/security.md).
    #[command(hide = true)]
    SandboxExec {
        /// The sandbox policy (JSON).
        #[arg(long)]
        sandbox: String,
        /// The program and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<std::ffi::OsString>,
    },
    /// TPM tools (builds with the `tpm` feature): import a device key, show the endorsement key.
    #[command(subcommand)]
    Tpm(TpmCommand),
    /// Internal: writes the man pages (`man1/`) and the bash, zsh and fish completions
    /// (`completions/`) made from this command-line definition into a directory (used by
    /// packaging/man/manuals.sh when the package is built).
    #[command(hide = true)]
    Manuals {
        /// The directory to write into (created if missing).
        out: PathBuf,
    },
}

/// Where the TPM is and which handle holds the key: flags, else the configuration's
/// `[provisioning.attestation]` (method = "tpm"), else the defaults.
#[derive(Debug, Args)]
pub struct TpmTarget {
    /// TCTI of the TPM (default: the configuration's, else device:/dev/tpmrm0).
    #[arg(long)]
    pub tcti: Option<String>,
    /// Persistent handle of the device key (default: the configuration's, else 0x81000100).
    #[arg(long)]
    pub handle: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum TpmCommand {
    /// Read a base64 DPS/IoT Hub symmetric key from stdin and import it into the TPM as a
    /// persistent HMAC key (for `key_source = "imported"`). Nothing is written to disk.
    ImportKey {
        #[command(flatten)]
        target: TpmTarget,
        /// The key on stdin is an enrollment group key: derive this registration id's device key
        /// from it first and import that.
        #[arg(long, value_name = "ID")]
        group_registration_id: Option<String>,
        /// Replace whatever the handle holds, even if it is not an HMAC key.
        #[arg(long)]
        force: bool,
    },
    /// Print the endorsement key (base64 TPM2B_PUBLIC, what a DPS TPM enrollment needs), the
    /// storage root key and the registration id Azure derives from the endorsement key.
    ShowEk {
        #[arg(long)]
        tcti: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a configuration file (and its config.d drop-ins) and print the effective settings.
    Check {
        /// The file to check (default: --config).
        file: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum PluginsCommand {
    /// List the plugins the running daemon has loaded.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Stops one plugin and starts it afresh (its failures and quarantine forgotten), without
    /// touching the hub session or the other plugins. Also after rebuilding it.
    Restart {
        /// The plugin's name in the configuration.
        name: String,
    },
    /// Runs one plugin alone (no hub, no configuration): prints what it publishes, logs and
    /// reports; stdin takes settings (a JSON object a line), `method NAME [JSON]`,
    /// `c2d [PROPERTIES] BODY` and `stop`. Exit 0 once stopped (stop, end of input, Ctrl-C),
    /// 1 when it cannot start or fails.
    Try(TryArgs),
    /// Writes a new plugin from a template (Rust, C or Python) that runs under `plugins try`
    /// as it is.
    New(NewArgs),
}

#[derive(Debug, Args)]
pub struct TryArgs {
    /// Its settings at start (a JSON object), what `[plugin.settings]` would hold.
    #[arg(long, default_value = "{}")]
    pub settings: String,
    /// Its name (default: from the file name).
    #[arg(long)]
    pub name: Option<String>,
    /// `library` or `exec` (default: library for a `.so` file, else exec).
    #[arg(long)]
    pub kind: Option<String>,
    /// Run it without the plugin sandbox.
    #[arg(long)]
    pub no_sandbox: bool,
    /// What the sandbox lets it read, as `allow_read` would (repeatable).
    #[arg(long, value_name = "PATH")]
    pub allow_read: Vec<PathBuf>,
    /// What the sandbox lets it write, as `allow_write` would (repeatable).
    #[arg(long, value_name = "PATH")]
    pub allow_write: Vec<PathBuf>,
    /// The library (`path/libname.so`), or the program and its arguments (after `--` when
    /// they start with `-`: `-- python3 sensor.py -v`).
    #[arg(required = true, num_args = 1..)]
    pub target: Vec<String>,
}

#[derive(Debug, Args)]
pub struct NewArgs {
    /// The plugin's name (letters, digits, '-' and '_'); also its directory's.
    pub name: String,
    /// rust, c or python.
    #[arg(long)]
    pub lang: String,
    /// Where to make its directory (default: the current directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Rust: the path of hubagent's plugin SDK (`plugins/sdk` of a hubagent checkout; default:
    /// the checkout this hubagent was built from, if it is still there).
    #[arg(long)]
    pub sdk: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How long to stream telemetry before stopping (0 = until Ctrl-C).
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub duration: std::time::Duration,
    /// Seconds between simulated sensor readings.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub interval: std::time::Duration,
    /// Keep hubsim's state here instead of a temporary directory.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn provision_force_parses() {
        let cli =
            Cli::try_parse_from(["hubagent", "-c", "/tmp/x.toml", "provision", "--force"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Provision {
                force: true,
                json: false
            }
        ));
        assert_eq!(cli.config, PathBuf::from("/tmp/x.toml"));
    }

    #[test]
    fn plugins_try_takes_options_around_the_library_and_a_command_after_dashes() {
        let parse = |args: &[&str]| {
            let Command::Plugins(PluginsCommand::Try(t)) =
                Cli::try_parse_from(args).unwrap().command
            else {
                panic!("not plugins try")
            };
            t
        };
        let t = parse(&["hubagent", "plugins", "try", "lib.so", "--settings", "{}"]);
        assert_eq!(
            (t.target, t.settings),
            (vec!["lib.so".to_string()], "{}".to_string())
        );
        let t = parse(&[
            "hubagent",
            "plugins",
            "try",
            "--no-sandbox",
            "--",
            "python3",
            "s.py",
            "-v",
        ]);
        assert_eq!(t.target, ["python3", "s.py", "-v"]);
        assert!(t.no_sandbox);
    }

    #[test]
    fn tpm_import_key_parses() {
        let cli = Cli::try_parse_from([
            "hubagent",
            "tpm",
            "import-key",
            "--handle",
            "0x81000101",
            "--group-registration-id",
            "gw-7",
        ])
        .unwrap();
        let Command::Tpm(TpmCommand::ImportKey {
            target,
            group_registration_id,
            force,
        }) = cli.command
        else {
            panic!("{:?}", cli.command)
        };
        assert_eq!(target.handle.as_deref(), Some("0x81000101"));
        assert_eq!(group_registration_id.as_deref(), Some("gw-7"));
        assert!(!force);
    }
}
