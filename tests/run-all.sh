#!/usr/bin/env bash
# The whole test suite: Rust unit and integration tests (hubsim and hubagent over MQTT/TLS on
# loopback, the TPM back end against swtpm), then Azure's Python device SDK against hubsim.
# README's second command.
set -euo pipefail
cd "$(dirname "$0")/.."

bash tests/setup.sh

failed=()
echo "== build"
# The default build (what README's demo command builds) must not need libtss2; its own unit tests
# (e.g. `method = "tpm"` refused with a clear message) run on it first.
cargo build --workspace --all-targets --locked
echo "== agent unit tests, default build (no TPM support)"
cargo nextest run -p hubagent --locked --profile ci || failed+=("agent unit tests (default build)")

# Everything else runs with the TPM back end (feature `tpm`), whose tests start their own swtpm.
# This also rebuilds target/debug/hubagent with TPM support for the tests that run the binary.
tpm_features=(--features hubagent-tests/tpm)
cargo build --workspace --all-targets --locked "${tpm_features[@]}"
echo "== rust tests (cargo nextest, with the TPM tests against swtpm)"
cargo nextest run --workspace --locked --profile ci "${tpm_features[@]}" || failed+=("rust tests")

# The Rust plugin SDK's documentation examples (rustdoc): nextest does not run doctests. Their
# results (cargo test's "test result" line) count in the totals below.
echo "== plugin SDK documentation examples (cargo test --doc)"
cargo test --doc --locked -p hubagent-plugin-sdk 2>&1 | tee target/doctest.log
[ "${PIPESTATUS[0]}" -eq 0 ] || failed+=("plugin SDK doctests")

# The Python SDK can only dial ports 8883 and 443, so these run after the Rust tests, one hubsim at a time.
echo "== interop: Azure's Python device and service SDKs against hubsim (and the agent)"
HUBSIM_BIN="$PWD/target/debug/hubsim" HUBAGENT_BIN="$PWD/target/debug/hubagent" target/interop-venv/bin/python -m pytest -q -p no:cacheprovider \
    -W ignore::DeprecationWarning --junitxml=target/interop-junit.xml tests/interop \
    || failed+=("python interop tests")

# The system tests need root. Exit 77 means one could not run here (not root): counted as
# skipped, never as passed, and a failure in CI (CI=true, set by .ci/run), which runs as root and
# must run them.
skipped=()
system_part() { # name command...
    local status=0
    "${@:2}" || status=$?
    if [ "$status" -eq 77 ] && [ "${CI:-}" != "true" ]; then
        skipped+=("$1")
    elif [ "$status" -ne 0 ]; then
        failed+=("$1")
    fi
}
# The .deb installed into a real systemd (systemd-nspawn), driven with systemctl against hubsim.
echo "== system test: the .deb in systemd-nspawn"
system_part "deb system test" bash tests/system/deb-nspawn.sh
# The arm64 and armhf packages: built (in a cached Debian unstable root), lintian, compared with
# the amd64 package, and the packaged agent run under qemu user emulation against hubsim.
echo "== system test: the arm64 and armhf packages, under qemu"
system_part "cross-architecture test" bash tests/system/cross-smoke.sh

# A short fuzz run over the checked-in corpus (config, queue files, topics, SAS/twin input).
echo "== fuzz (FUZZ_SECONDS=${FUZZ_SECONDS:-10} per target)"
bash fuzz/run.sh || failed+=("fuzzing")

# Totals from both runners' JUnit reports (only reports written by this run count), so the run
# closes with one plain "N passed, N failed" line. nextest's report is the last nextest run's (the
# whole workspace with the TPM back end); the system tests and fuzzing count as one test each.
totals=$(python3 - "$(( $(date +%s) - SECONDS ))" target/nextest/ci/junit.xml target/interop-junit.xml target/doctest.log \
    -- "${failed[@]}" -- "${skipped[@]}" <<'PY'
import os, re, sys, xml.etree.ElementTree as ET
args = sys.argv[1:]
first, second = args.index("--"), len(args) - 1 - args[::-1].index("--")
started, reports = int(args[0]), args[1:first]
failed_parts, skipped_parts = args[first + 1:second], args[second + 1:]
whole_parts = ["deb system test", "cross-architecture test", "fuzzing"]  # no JUnit report: one test each
failed = sum(part in failed_parts for part in whole_parts)
skipped = sum(part in skipped_parts for part in whole_parts)
passed = len(whole_parts) - failed - skipped
for path in reports:
    if not os.path.exists(path) or os.path.getmtime(path) < started:
        continue
    if path.endswith(".log"):  # cargo test's summary: "test result: ok. 5 passed; 0 failed; 1 ignored; ..."
        for line in open(path):
            m = re.search(r"test result: \w+\. (\d+) passed; (\d+) failed; (\d+) ignored", line)
            if m:
                passed, failed, skipped = passed + int(m[1]), failed + int(m[2]), skipped + int(m[3])
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
if [ "${#skipped[@]}" -gt 0 ]; then
    echo "== SUMMARY: PASSED in ${SECONDS}s, but NOT RUN here: ${skipped[*]} (see its output above)"
else
    echo "== SUMMARY: ALL TESTS PASSED in ${SECONDS}s (Rust, Python interop, .deb system tests amd64/arm64/armhf, fuzzing)"
fi
echo "Tests: $totals"
