#!/usr/bin/env bash
# Builds the Debian package (release, TPM support, no embedded demo); prints its path last.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-deb >/dev/null || cargo install --locked cargo-deb@3.8.0
cargo deb -p hubagent --locked >&2
ls -t target/debian/hubagent_*.deb | head -1
