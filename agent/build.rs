//! Link options of the agent's executables (`hubagent`, `hubagent-plugin-host`, `hubagent-tpm`), not of its
//! library, tests or the plugins.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    for (_, list) in ORDER_FILES {
        println!("cargo:rerun-if-changed={list}");
    }
    println!("cargo:rerun-if-env-changed=RUSTC_LINKER");
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
    if arch == "x86_64" && var("PROFILE") == "release" && links_with_rust_lld(&var("RUSTC")) {
        // The functions the daemon and the plugin host run, next to each other
        // (bench/code_order.py wrote the lists; docs/benchmarks.md, "The daemon's code in the
        // order it runs"): the kernel maps 64 KiB around each code page a process touches, so
        // scattered functions kept 7 MiB of the daemon's code resident, these together about 3
        // (a host: 0.6 MiB, about 0.2). The names carry the toolchain's and the dependencies'
        // hashes: the linker skips a name it does not find (a stale list costs that gain,
        // nothing else), and `bench/code_order.py --check` says how much still matches. lld
        // only (GNU ld has no such option).
        for (bin, list) in ORDER_FILES {
            let order = format!("{}/{list}", var("CARGO_MANIFEST_DIR"));
            println!("cargo:rustc-link-arg-bin={bin}=-Wl,--symbol-ordering-file={order}");
            println!("cargo:rustc-link-arg-bin={bin}=-Wl,--no-warn-symbol-ordering");
        }
    }
}

/// Each executable whose code is ordered, and its list of the functions it runs.
const ORDER_FILES: [(&str, &str); 2] = [
    ("hubagent", "link-order-x86_64.txt"),
    ("hubagent-plugin-host", "link-order-plugin-host-x86_64.txt"),
];

/// Whether rustc links this x86-64 Linux target with its own lld: its default from Rust 1.90,
/// unless a linker is configured for the target (cargo then sets `RUSTC_LINKER`) or RUSTFLAGS
/// choose the linker.
fn links_with_rust_lld(rustc: &str) -> bool {
    if std::env::var_os("RUSTC_LINKER").is_some()
        || std::env::var("CARGO_ENCODED_RUSTFLAGS").is_ok_and(|flags| flags.contains("link"))
    {
        return false;
    }
    let version = Command::new(rustc)
        .arg("-V")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default();
    // "rustc 1.95.0 (59807616e 2026-04-14)"
    let mut numbers = version
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .split('.')
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let (major, minor) = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    (major, minor) >= (1, 90)
}
