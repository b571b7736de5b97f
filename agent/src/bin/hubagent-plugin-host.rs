//! `hubagent-plugin-host`: one library plugin in its own process, started by the daemon
//! (plugins/hosted.rs, through plugins/host_program.rs) with the plugin protocol on stdin/stdout.
//! Its own executable, so that a host maps the code it runs (library loading, the frame protocol,
//! the sandbox) and not the whole agent's: no runtime, TLS, MQTT or command-line parser is
//! linked in (docs/benchmarks.md, "Where the memory goes").
//!
//!     hubagent-plugin-host --build B --name N --path P [--allow-unsafe-paths] [--sandbox POLICY]
//!     hubagent-plugin-host --build B --probe --path P [--allow-unsafe-paths]
//!
//! `--build` is the daemon's [`host_program::BUILD`]; a host of another build refuses to run.

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use hubagent::plugins::host_program::{self, BUILD};
use hubagent::plugins::protocol::{self, Up};

#[derive(Debug, Default, PartialEq)]
struct Arguments {
    build: String,
    name: String,
    path: PathBuf,
    allow_unsafe_paths: bool,
    sandbox: Option<String>,
    probe: bool,
}

impl Arguments {
    fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Arguments, String> {
        let mut parsed = Arguments::default();
        let mut path = None;
        let mut args = args.into_iter();
        let value = |flag: &str, args: &mut dyn Iterator<Item = OsString>| {
            args.next()
                .and_then(|v| v.into_string().ok())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        while let Some(arg) = args.next() {
            match arg.to_str() {
                Some("--build") => parsed.build = value("--build", &mut args)?,
                Some("--name") => parsed.name = value("--name", &mut args)?,
                Some("--path") => {
                    path = Some(PathBuf::from(
                        args.next().ok_or("--path needs a value".to_string())?,
                    ))
                }
                Some("--sandbox") => parsed.sandbox = Some(value("--sandbox", &mut args)?),
                Some("--allow-unsafe-paths") => parsed.allow_unsafe_paths = true,
                Some("--probe") => parsed.probe = true,
                _ => return Err(format!("unknown argument {}", arg.to_string_lossy())),
            }
        }
        parsed.path = path.ok_or("--path is required")?;
        if parsed.build.is_empty() {
            return Err("--build is required".into());
        }
        Ok(parsed)
    }
}

const USAGE: &str = "usage: hubagent-plugin-host --build B (--name N | --probe) --path LIBRARY \
                     [--allow-unsafe-paths] [--sandbox POLICY]\n(started by `hubagent run`; by \
                     hand, use `hubagent plugin-host`)";

fn main() -> ExitCode {
    // Started through /proc/self/fd/N, the kernel names the process "N": give it the name an
    // exec by path would (the file name cut to 15 bytes), for ps, top and the journal.
    // SAFETY: PR_SET_NAME reads a NUL-terminated string; failure only leaves the name.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"hubagent-plugin".as_ptr()) };
    let args = match Arguments::parse(std::env::args_os().skip(1)) {
        Ok(args) => args,
        Err(error) => {
            eprintln!("hubagent-plugin-host: {error}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if args.build != BUILD {
        let error = format!(
            "the plugin host {} is build {BUILD}, the agent that started it is build {}: a host \
             of another build may not speak the agent's protocol (reinstall the hubagent \
             package, or restart the agent after an upgrade)",
            std::env::current_exe()
                .unwrap_or_else(|_| host_program::FILE_NAME.into())
                .display(),
            args.build
        );
        eprintln!("hubagent-plugin-host {}: {error}", args.name);
        // The daemon reads frames on stdout: a fatal frame is what it reports as the reason.
        if !args.probe {
            let _ = std::io::stdout().write_all(&protocol::encode(&Up::Fatal { error }));
        }
        return ExitCode::from(2);
    }
    if args.probe {
        let code = hubagent::plugins::host::probe(&args.path, args.allow_unsafe_paths);
        return ExitCode::from(code as u8);
    }
    hubagent::system::hardening::protect_secrets_in_memory();
    let code = hubagent::plugins::host::run(
        &args.name,
        &args.path,
        args.allow_unsafe_paths,
        args.sandbox.as_deref(),
    );
    ExitCode::from(code as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Arguments, String> {
        Arguments::parse(args.iter().map(OsString::from))
    }

    #[test]
    fn reads_the_daemons_arguments() {
        assert_eq!(
            parse(&[
                "--build",
                "1.2.3",
                "--name",
                "sensor",
                "--path",
                "/l.so",
                "--allow-unsafe-paths",
                "--sandbox",
                "{}",
            ]),
            Ok(Arguments {
                build: "1.2.3".into(),
                name: "sensor".into(),
                path: "/l.so".into(),
                allow_unsafe_paths: true,
                sandbox: Some("{}".into()),
                probe: false,
            })
        );
        assert!(parse(&["--build", "1", "--probe", "--path", "/l.so"]).is_ok_and(|a| a.probe));
    }

    #[test]
    fn refuses_what_the_daemon_does_not_write() {
        assert!(
            parse(&["--name", "s", "--path", "/l.so"]).is_err(),
            "no build"
        );
        assert!(parse(&["--build", "1", "--name", "s"]).is_err(), "no path");
        assert!(parse(&["--build", "1", "--path", "/l.so", "--x"]).is_err());
        assert!(parse(&["--build", "1", "--path"]).is_err());
    }
}
