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
    -W ignore::DeprecationWarning --junitxml=target/interop-junit.xml tests/interop \
    || failed+=("python interop tests")

# Totals from both runners' JUnit reports (only reports written by this run count), so the run
# closes with one plain "N passed, N failed" line covering the whole suite.
totals=$(python3 - "$(( $(date +%s) - SECONDS ))" target/nextest/ci/junit.xml target/interop-junit.xml <<'PY'
import os, sys, xml.etree.ElementTree as ET
started, reports = int(sys.argv[1]), sys.argv[2:]
passed = failed = skipped = 0
for path in reports:
    if not os.path.exists(path) or os.path.getmtime(path) < started:
        continue
    for case in ET.parse(path).iter("testcase"):
        tags = {child.tag for child in case}
        if tags & {"failure", "error"}:
            failed += 1
        elif "skipped" in tags:
            skipped += 1
        else:
            passed += 1
print(f"{passed} passed, {failed} failed" + (f", {skipped} skipped" if skipped else ""))
PY
) || totals="(the JUnit reports could not be read)"

echo
if [ "${#failed[@]}" -gt 0 ]; then
    echo "== SUMMARY: FAILED after ${SECONDS}s: ${failed[*]} (details above each part's own summary)"
    echo "Tests: $totals"
    exit 1
fi
echo "== SUMMARY: ALL TESTS PASSED in ${SECONDS}s (Rust tests and the Python interop suite)"
echo "Tests: $totals"
