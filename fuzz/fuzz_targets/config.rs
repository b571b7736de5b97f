//! Any bytes as /etc/hubagent/config.toml: an error naming the problem, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, data).unwrap();
    if let Ok(config) = hubagent::config::Config::load(&path, &|_| None) {
        let _ = config.provisioning_fingerprint();
    }
});
