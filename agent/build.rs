//! Link options of the agent's executables (`hubagent`, `hubagent-plugin-host`, `hubagent-tpm`), not of its
//! library, tests or the plugins.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    let arch = var("CARGO_CFG_TARGET_ARCH");
    if var("CARGO_CFG_TARGET_OS") == "linux"
        && var("CARGO_CFG_TARGET_ENV") == "gnu"
        && matches!(arch.as_str(), "x86_64" | "aarch64")
    {
        // Packed relative relocations (DT_RELR): the position-independent executables' relative
        // relocations take a few KiB instead of hundreds, which the dynamic loader reads and
        // applies in every process at start (docs/benchmarks.md, "Where the memory goes"). Needs
        // glibc >= 2.36 where the binaries run (the package's Depends say so); a linker without
        // the option warns and ignores it. Not on armhf, whose GNU ld support was not checked.
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
