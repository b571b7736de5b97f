#!/usr/bin/env bash
# Builds the Debian package (release, TPM support, no embedded demo, the shipped library plugins);
# prints its path last. Extra arguments go to cargo deb (e.g. --deb-version 0.2.0-1 for a test
# upgrade package).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-deb >/dev/null || cargo install --locked cargo-deb@3.8.0
# Built here, then packaged with --no-build: left to itself, cargo deb would build every library
# of the workspace (test plugins included) because the assets name the plugins' .so files.
# The features match [package.metadata.deb] in agent/Cargo.toml.
cargo build --release --locked -p hubagent --no-default-features --features tpm >&2
cargo build --release --locked -p hubagent-sysmetrics -p hubagent-simulated-sensor >&2
cargo deb -p hubagent --locked --no-build "$@" >&2
ls -t target/debian/hubagent_*.deb | head -1
