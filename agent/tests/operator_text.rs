//! Operators never see Rust Debug text (`pid=Some(28100)`, `Credential::X509(..)`, `NotAuthorized`):
//! the agent's non-test code formats nothing with `{:?}` and logs no field with `?` (tracing's
//! Debug) at the levels an operator reads (error, warn, info). `debug!` and `trace!` may.
//! Reads every source file of the agent (the library and the `hubagent` binary), production code
//! only (up to `#[cfg(test)]`).

use std::path::{Path, PathBuf};

/// Where Debug text is fine, and why.
const ALLOWED: &[(&str, &str)] = &[
    // The identity fingerprint (which configuration provisioned the device): hashed, compared
    // with the state file, never shown. Changing it would make every gateway reprovision.
    ("src/config/mod.rs", "key_source={key_source:?}"),
    ("src/config/mod.rs", "\"source={:?}"),
    // tracing's field visitor: `record_debug` is how every field arrives, Display ones included.
    ("src/system/recent_logs.rs", "{value:?}"),
    // clap's own dispatch: unreachable, a bug if it ever shows.
    ("src/bin/hubagent/args.rs", "panic!(\"{:?}\", cli.command)"),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The lines of `code` that format with Debug for an operator.
fn debug_text(code: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    // Inside a tracing macro at an operator's level, from its line to the `);` that ends it.
    let mut in_operator_macro = false;
    for (n, line) in code.lines().enumerate() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("//") {
            continue;
        }
        for level in ["error!(", "warn!(", "info!("] {
            if line.contains(&format!("tracing::{level}")) {
                in_operator_macro = true;
            }
        }
        let debug_field = in_operator_macro
            && (trimmed.starts_with('?')
                || line.contains("= ?")
                || line.contains(", ?")
                || line.contains("(?"));
        if line.contains(":?}") || line.contains(":#?}") || debug_field {
            found.push((n + 1, line.trim().to_string()));
        }
        if in_operator_macro && line.contains(");") {
            in_operator_macro = false;
        }
    }
    found
}

#[test]
fn no_debug_text_reaches_operators() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    assert!(
        files.len() > 50,
        "{} files: not the agent's sources?",
        files.len()
    );
    let mut offences = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap();
        let relative = file
            .strip_prefix(root)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        for (line, found) in debug_text(code) {
            let allowed = ALLOWED
                .iter()
                .any(|(f, what)| *f == relative && found.contains(what));
            if !allowed {
                offences.push(format!("{relative}:{line}: {found}"));
            }
        }
    }
    assert!(
        offences.is_empty(),
        "Debug text an operator would read (write a Display, a name or humantime instead):\n{}",
        offences.join("\n")
    );
}

#[test]
fn the_scan_sees_each_form() {
    let code = "tracing::warn!(plugin = %n, ?delay, \"x\");\nlet a = format!(\"{pid:?}\");\ntracing::info!(\n    state = ?state,\n    \"y\"\n);\ntracing::debug!(?fine, \"z\");\n";
    let lines: Vec<usize> = debug_text(code).into_iter().map(|(n, _)| n).collect();
    assert_eq!(lines, vec![1, 2, 4]);
}
