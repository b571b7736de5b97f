//! `hubagent config check` as an operator runs it: the real binary on real files, checking the
//! exit code (78 = EX_CONFIG) and that every error names the file, the line and the key.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const GOOD: &str = r#"[provisioning]
source = "dps"
global_endpoint = "global.azure-devices-provisioning.net"
id_scope = "0ne00000001"
registration_id = "gw-1"

[provisioning.attestation]
method = "symmetric_key"
key = { file = "/etc/hubagent/device.key" }

[hub]
sas_ttl = "2h"
"#;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs `hubagent config check FILE` with a clean quickstart environment plus `env`.
fn check(file: &Path, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hubagent"));
    cmd.args(["config", "check"]).arg(file);
    for var in [
        "PROVISIONING_HOST",
        "PROVISIONING_IDSCOPE",
        "PROVISIONING_REGISTRATION_ID",
        "PROVISIONING_SYMMETRIC_KEY",
        "HUBAGENT_CONFIG",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("hubagent runs")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_good_file_is_ok_with_a_summary() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "config.toml", GOOD);
    let out = check(&path, &[]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = stdout(&out);
    assert!(
        text.starts_with(&format!("{}: OK", path.display())),
        "{text}"
    );
    assert!(text.contains("0ne00000001"), "{text}");
    assert!(text.contains("gw-1"), "{text}");
    assert_eq!(text.lines().count(), 1, "one line: {text}");
}

#[test]
fn an_unknown_key_exits_78_naming_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let text = GOOD.replace("sas_ttl = \"2h\"", "sas_ttl = \"2h\"\nsas_tll = \"1h\"");
    let path = write(dir.path(), "config.toml", &text);
    let out = check(&path, &[]);
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    let err = stderr(&out);
    assert!(err.contains("config.toml:13:"), "file and line: {err}");
    assert!(err.contains("hub.sas_tll"), "the key with its table: {err}");
}

#[test]
fn an_unknown_key_inside_the_attestation_points_at_its_own_line() {
    let dir = tempfile::tempdir().unwrap();
    let text = GOOD.replace(
        "key = { file = \"/etc/hubagent/device.key\" }",
        "key = { file = \"/etc/hubagent/device.key\" }\nkey_file = \"/x\"",
    );
    let path = write(dir.path(), "config.toml", &text);
    let out = check(&path, &[]);
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    let err = stderr(&out);
    assert!(err.contains("config.toml:10:"), "{err}");
    assert!(err.contains("provisioning.attestation.key_file"), "{err}");
}

#[test]
fn a_misspelt_key_source_says_what_to_write() {
    let dir = tempfile::tempdir().unwrap();
    let text = GOOD.replace("{ file = ", "{ path = ");
    let path = write(dir.path(), "config.toml", &text);
    let out = check(&path, &[]);
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    let err = stderr(&out);
    assert!(err.contains("config.toml:9:"), "{err}");
    assert!(err.contains("provisioning.attestation.key"), "{err}");
    assert!(err.contains("file = "), "says what to write: {err}");
}

#[test]
fn a_bad_duration_names_the_value_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "config.toml",
        &GOOD.replace("\"2h\"", "\"two hours\""),
    );
    let out = check(&path, &[]);
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    let err = stderr(&out);
    assert!(err.contains("config.toml:12:"), "{err}");
    assert!(err.contains("hub.sas_ttl"), "{err}");
    assert!(err.contains("'two hours' is not a duration"), "{err}");
}

#[test]
fn a_semantic_error_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "config.toml",
        &GOOD.replace("id_scope = \"0ne00000001\"\n", ""),
    );
    let out = check(&path, &[]);
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    let err = stderr(&out);
    assert!(err.contains("config.toml"), "{err}");
    assert!(
        err.contains("provisioning.id_scope") && err.contains("source = \"dps\""),
        "{err}"
    );
}

#[test]
fn a_dropin_overrides_the_scope_and_its_errors_name_the_dropin() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "config.toml", GOOD);
    write(
        dir.path(),
        "config.d/50-site.toml",
        "[provisioning]\nid_scope = \"0ne0000SITE\"\n",
    );
    // Not a .toml file: ignored (editor backups, disabled drop-ins).
    write(
        dir.path(),
        "config.d/60-off.toml.disabled",
        "[provisioning]\nid_scope = \"0ne00000OFF\"\n",
    );
    let out = check(&path, &[]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(stdout(&out).contains("0ne0000SITE"), "{}", stdout(&out));

    // Lexical order: a later drop-in wins over an earlier one.
    write(
        dir.path(),
        "config.d/70-later.toml",
        "[provisioning]\nid_scope = \"0ne000LATER\"\n",
    );
    let out = check(&path, &[]);
    assert!(stdout(&out).contains("0ne000LATER"), "{}", stdout(&out));

    write(
        dir.path(),
        "config.d/80-bad.toml",
        "\n[hub]\nkeep_alive = 60\n",
    );
    let out = check(&path, &[]);
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    let err = stderr(&out);
    assert!(err.contains("80-bad.toml:3:"), "{err}");
    assert!(err.contains("hub.keep_alive"), "{err}");
}

#[test]
fn quickstart_environment_variables_override_the_file() {
    let dir = tempfile::tempdir().unwrap();
    // The installed default: empty scope and registration id fail until filled in...
    let path = write(
        dir.path(),
        "config.toml",
        &GOOD
            .replace("\"0ne00000001\"", "\"\"")
            .replace("\"gw-1\"", "\"\""),
    );
    let out = check(&path, &[]);
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    // ...or until the quickstart variables supply them.
    let out = check(
        &path,
        &[
            ("PROVISIONING_IDSCOPE", "0ne0000ENV1"),
            ("PROVISIONING_REGISTRATION_ID", "env-device"),
            ("PROVISIONING_SYMMETRIC_KEY", "c2VjcmV0LWtleS0xMjM0NTY3ODkw"),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = stdout(&out);
    assert!(
        text.contains("0ne0000ENV1") && text.contains("env-device"),
        "{text}"
    );
    assert!(
        !text.contains("c2VjcmV0LWtleS0xMjM0NTY3ODkw"),
        "the key never appears: {text}"
    );
}

#[test]
fn a_syntax_error_names_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "config.toml",
        &GOOD.replace("sas_ttl = \"2h\"", "sas_ttl = \"2h"),
    );
    let out = check(&path, &[]);
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    assert!(stderr(&out).contains("config.toml:12:"), "{}", stderr(&out));
}

#[test]
fn a_missing_file_exits_78_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = check(&dir.path().join("nope.toml"), &[]);
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    assert!(stderr(&out).contains("nope.toml"), "{}", stderr(&out));
}

/// The files shipped in `config/`: every example passes as is; the installed default fails,
/// naming `provisioning.id_scope`, until the operator fills it in.
#[test]
fn shipped_configuration_files() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
    let mut examples = 0;
    for entry in std::fs::read_dir(root.join("examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let out = check(&path, &[]);
            assert_eq!(out.status.code(), Some(0), "{}: {out:?}", path.display());
            examples += 1;
        }
    }
    assert!(examples >= 4, "examples found: {examples}");

    let out = check(&root.join("config.toml"), &[]);
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    assert!(
        stderr(&out).contains("provisioning.id_scope"),
        "{}",
        stderr(&out)
    );
    // Filling in the scope and registration id is all it takes.
    let dir = tempfile::tempdir().unwrap();
    let filled = std::fs::read_to_string(root.join("config.toml"))
        .unwrap()
        .replace("id_scope = \"\"", "id_scope = \"0ne00000001\"")
        .replace("registration_id = \"\"", "registration_id = \"gw-1\"");
    let out = check(&write(dir.path(), "config.toml", &filled), &[]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}
