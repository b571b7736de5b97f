#!/usr/bin/env bash
# Builds the Debian package (release, TPM support, no embedded demo, the shipped library plugins);
# prints its path last. Extra arguments go to cargo deb (e.g. --deb-version 0.2.0-1 for a test
# upgrade package).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-deb >/dev/null || cargo install --locked cargo-deb@3.8.0
# The library plugins installed in /usr/lib/hubagent/plugins: cargo deb builds only the agent's
# package, so these are built first (the assets in agent/Cargo.toml name their .so files).
cargo build --release --locked -p hubagent-sysmetrics -p hubagent-simulated-sensor >&2
cargo deb -p hubagent --locked "$@" >&2
ls -t target/debian/hubagent_*.deb | head -1
