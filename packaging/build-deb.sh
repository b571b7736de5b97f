#!/usr/bin/env bash
# Builds the Debian package (release, TPM support, no embedded demo, the shipped library plugins);
# prints its path last. Extra arguments go to cargo deb (e.g. --deb-version 0.2.0-1 for a test
# upgrade package). `build-deb.sh --releases` prints the releases the package is for and exits.
#
# One amd64 package serves Debian 12 (bookworm) and Debian 13 (trixie): the same binary runs on
# both, and its Depends name each TPM library by both releases' package names (docs/packaging.md,
# "Releases"). Build it on Debian 12, the older release: a binary linked there runs on both.
# tests/system/deb-nspawn.sh installs and runs it on each release below.
set -euo pipefail
releases="bookworm trixie"
if [ "${1:-}" = "--releases" ]; then
    echo "$releases"
    exit 0
fi
cd "$(dirname "$0")/.."
echo "build-deb: one package for Debian 12 and 13 ($releases), amd64" >&2
command -v cargo-deb >/dev/null || cargo install --locked cargo-deb@3.8.0
# Built here, then packaged with --no-build: left to itself, cargo deb would build every library
# of the workspace (test plugins included) because the assets name the plugins' .so files.
# The features match [package.metadata.deb] in agent/Cargo.toml.
cargo build --release --locked -p hubagent --no-default-features --features tpm >&2
cargo build --release --locked -p hubagent-sysmetrics -p hubagent-simulated-sensor >&2
cargo deb -p hubagent --locked --no-build "$@" >&2
deb="$(ls -t target/debian/hubagent_*.deb | head -1)"
# The Depends are written out in agent/Cargo.toml: check them against what this machine's
# dpkg-shlibdeps computes for the binary and plugins just built.
bash packaging/check-depends.sh "$deb" >&2
echo "$deb"
