//! `hubagent manuals DIR` (hidden): the man pages of the command line, `hubagent(1)` and one page
//! per subcommand (`hubagent-status(1)`, `hubagent-config-check(1)`, ...), and the bash, zsh and
//! fish completions, all made from the clap definition in args.rs that also makes `--help`, so
//! they cannot drift apart. packaging/man/manuals.sh runs it with a binary of the build machine
//! (the pages are the same for every architecture) and adds `hubagent.toml(5)`.

use std::io::Write;
use std::path::Path;

use clap::CommandFactory;
use clap_complete::Shell;

use crate::args::{Cli, exit};

/// Writes `DIR/man1/*.1` and `DIR/completions/{bash/hubagent, zsh/_hubagent, fish/hubagent.fish}`.
pub fn write(out: &Path) -> i32 {
    match write_all(out) {
        Ok(()) => exit::OK,
        Err(e) => {
            eprintln!("hubagent manuals: cannot write into {}: {e}", out.display());
            exit::FAILURE
        }
    }
}

fn write_all(out: &Path) -> std::io::Result<()> {
    let mut cli = command();
    let man1 = out.join("man1");
    std::fs::create_dir_all(&man1)?;
    // Gives every subcommand its full name (hubagent-config-check), which names its page.
    cli.build();
    pages(&cli, &man1, None)?;
    // Completions offer what the pages show: clap_complete would also offer hidden subcommands.
    let mut cli = visible_only(&command());
    for (shell, file) in [
        (Shell::Bash, "bash/hubagent"),
        (Shell::Zsh, "zsh/_hubagent"),
        (Shell::Fish, "fish/hubagent.fish"),
    ] {
        let path = out.join("completions").join(file);
        std::fs::create_dir_all(path.parent().expect("a file in a directory"))?;
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut cli, "hubagent", &mut script);
        std::fs::write(path, script)?;
    }
    Ok(())
}

/// The command line as this build has it: subcommands it lacks (the demo in the package, which
/// is built without it) are left out of the pages and completions, as is clap's `help`
/// subcommand (`--help` is on every page).
fn command() -> clap::Command {
    let mut cli = Cli::command().disable_help_subcommand(true);
    if !cfg!(feature = "demo") {
        cli = cli.mut_subcommand("demo", |c| c.hide(true));
    }
    if !cfg!(feature = "tpm") {
        cli = cli.mut_subcommand("tpm", |c| c.hide(true));
    }
    cli
}

/// `cli` without its hidden subcommands (the internal ones, and those this build lacks).
fn visible_only(cli: &clap::Command) -> clap::Command {
    let mut visible = clap::Command::new("hubagent")
        .version(env!("CARGO_PKG_VERSION"))
        .about(cli.get_about().cloned().unwrap_or_default())
        .disable_help_subcommand(true);
    for arg in cli.get_arguments() {
        visible = visible.arg(arg.clone());
    }
    for sub in cli.get_subcommands().filter(|s| !s.is_hide_set()) {
        visible = visible.subcommand(sub.clone());
    }
    visible
}

/// The page of `cmd` and, recursively, of its visible subcommands; `parent` is the page one
/// level up (none for hubagent(1)).
fn pages(cmd: &clap::Command, dir: &Path, parent: Option<&str>) -> std::io::Result<()> {
    let name = cmd.get_display_name().unwrap_or(cmd.get_name());
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        pages(sub, dir, Some(name))?;
    }
    let man = clap_mangen::Man::new(cmd.clone())
        .source(format!("hubagent {}", env!("CARGO_PKG_VERSION")))
        .manual("hubagent manual");
    let mut page = Vec::new();
    man.render(&mut page)?;
    if parent.is_none() {
        page.write_all(exit_status().as_bytes())?;
        page.write_all(FILES_AND_ENVIRONMENT.as_bytes())?;
    }
    page.write_all(see_also(parent).as_bytes())?;
    std::fs::write(dir.join(man.get_filename()), page)
}

fn exit_status() -> String {
    let mut roff = String::from(".SH \"EXIT STATUS\"\n");
    for (code, meaning) in exit::MEANINGS {
        roff.push_str(&format!(".TP\n\\fB{code}\\fR\n{meaning}\n"));
    }
    roff
}

const FILES_AND_ENVIRONMENT: &str = r#".SH FILES
.TP
\fI/etc/hubagent/config.toml\fR, \fI/etc/hubagent/config.d/*.toml\fR
the configuration and its drop\-ins, see \fBhubagent.toml\fR(5)
.TP
\fI/var/lib/hubagent\fR
the cached assignment, twin, queue and route (the default \fBstate_dir\fR)
.TP
\fI/run/hubagent/control.sock\fR
where \fBstatus\fR, \fBreload\fR, \fBreprovision\fR and \fBplugins\fR reach the daemon
.TP
\fI/usr/share/doc/hubagent\fR
the full documentation (README.md, configuration.md, plugins.md, ...)
.SH ENVIRONMENT
.TP
\fBHUBAGENT_CONFIG\fR
the configuration file, as \fB\-\-config\fR
.TP
\fBPROVISIONING_HOST\fR, \fBPROVISIONING_IDSCOPE\fR, \fBPROVISIONING_REGISTRATION_ID\fR, \fBPROVISIONING_SYMMETRIC_KEY\fR
Azure's quickstart variables, overriding the configuration (see \fBhubagent.toml\fR(5))
.TP
\fBRUST_LOG\fR
overrides \fBlog_level\fR
"#;

fn see_also(parent: Option<&str>) -> String {
    let mut refs = Vec::new();
    if let Some(parent) = parent {
        refs.push(format!("\\fB{}\\fR(1)", parent.replace('-', "\\-")));
    }
    refs.push("\\fBhubagent.toml\\fR(5)".into());
    refs.push("\\fBsystemctl\\fR(1)".into());
    refs.push("\\fBjournalctl\\fR(1)".into());
    format!(".SH \"SEE ALSO\"\n{}\n", refs.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_page_per_visible_subcommand_and_three_completions() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(write(dir.path()), exit::OK);
        let mut names: Vec<String> = std::fs::read_dir(dir.path().join("man1"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        for page in [
            "hubagent.1",
            "hubagent-status.1",
            "hubagent-check.1",
            "hubagent-config.1",
            "hubagent-config-check.1",
            "hubagent-plugins-list.1",
            "hubagent-plugins-restart.1",
            "hubagent-reload.1",
        ] {
            assert!(
                names.iter().any(|n| n == page),
                "{page} missing from {names:?}"
            );
        }
        // Internal subcommands have no page.
        for internal in ["plugin-host", "sandbox-exec", "manuals", "help"] {
            assert!(
                !names.iter().any(|n| n.contains(internal)),
                "{internal} has a page: {names:?}"
            );
        }
        let top = std::fs::read_to_string(dir.path().join("man1/hubagent.1")).unwrap();
        assert!(top.contains(".SH \"EXIT STATUS\""), "{top}");
        assert!(top.contains("hubagent\\-plugins(1)"), "{top}");
        let check =
            std::fs::read_to_string(dir.path().join("man1/hubagent-config-check.1")).unwrap();
        assert!(check.contains("\\fBhubagent\\-config\\fR(1)"), "{check}");
        let show_ek = std::fs::read_to_string(dir.path().join("man1/hubagent-tpm-show-ek.1"));
        if cfg!(feature = "tpm") {
            assert!(show_ek.unwrap().contains("\\fBhubagent\\-tpm\\fR(1)"));
        } else {
            assert!(
                show_ek.is_err(),
                "no TPM pages in a build without TPM support"
            );
        }

        let bash = std::fs::read_to_string(dir.path().join("completions/bash/hubagent")).unwrap();
        let zsh = std::fs::read_to_string(dir.path().join("completions/zsh/_hubagent")).unwrap();
        assert!(zsh.starts_with("#compdef hubagent"), "{zsh}");
        let fish =
            std::fs::read_to_string(dir.path().join("completions/fish/hubagent.fish")).unwrap();
        assert!(fish.contains("complete -c hubagent"), "{fish}");
        assert!(bash.contains("complete -F _hubagent"), "{bash}");
        assert!(bash.contains("plugins"));
        for internal in ["sandbox-exec", "plugin-host", "manuals"] {
            for script in [&bash, &zsh, &fish] {
                assert!(
                    !script.contains(internal),
                    "{internal} is offered:\n{script}"
                );
            }
        }
    }
}
