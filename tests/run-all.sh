#!/usr/bin/env bash
# The whole test suite: Rust unit and integration tests (hubsim and hubagent over MQTT/TLS on
# loopback), then Azure's Python device SDK against hubsim. README's second command.
set -euo pipefail
cd "$(dirname "$0")/.."

bash tests/setup.sh

echo "== build"
cargo build --workspace --all-targets --locked

failed=()
echo "== rust tests (cargo nextest)"
cargo nextest run --workspace --locked --profile ci || failed+=("rust tests")

# The Python SDK can only dial port 8883, so these run after the Rust tests, one hubsim at a time.
echo "== interop: Azure's Python device SDK against hubsim"
HUBSIM_BIN="$PWD/target/debug/hubsim" target/interop-venv/bin/python -m pytest -q -p no:cacheprovider \
    -W ignore::DeprecationWarning tests/interop || failed+=("python interop tests")

echo
if [ "${#failed[@]}" -gt 0 ]; then
    echo "== SUMMARY: FAILED after ${SECONDS}s: ${failed[*]} (details above each part's own summary)"
    exit 1
fi
echo "== SUMMARY: ALL TESTS PASSED in ${SECONDS}s (Rust tests and the Python interop suite)"
