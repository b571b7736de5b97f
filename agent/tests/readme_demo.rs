//! README's first command, `cargo run -p hubagent -- demo`, names no binary: with the helper
//! executables beside the agent in this package, cargo needs `default-run` to know which one to
//! run (without it the command stops at "could not determine which binary to run").

#[test]
fn cargo_run_of_the_package_runs_the_agent() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let manifest: toml::Table = std::fs::read_to_string(format!("{dir}/Cargo.toml"))
        .expect("the agent's Cargo.toml")
        .parse()
        .expect("Cargo.toml is TOML");
    let bins = manifest
        .get("bin")
        .and_then(toml::Value::as_array)
        .map_or(0, Vec::len);
    let default_run = manifest
        .get("package")
        .and_then(|package| package.get("default-run"))
        .and_then(toml::Value::as_str);
    assert!(
        bins <= 1 || default_run == Some("hubagent"),
        "agent/Cargo.toml has {bins} [[bin]] targets and default-run = {default_run:?}: \
         `cargo run -p hubagent -- demo` (README) needs default-run = \"hubagent\""
    );
    let readme = std::fs::read_to_string(format!("{dir}/../README.md")).expect("README.md");
    assert!(
        readme.contains("cargo run -p hubagent -- demo"),
        "README's demo command changed: check this test still guards it"
    );
}
