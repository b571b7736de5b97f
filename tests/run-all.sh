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

# The Python SDK can only dial port 8883, so these run after the Rust tests, one hubsim at a time.
echo "== interop: Azure's Python device SDK against hubsim"
HUBSIM_BIN="$PWD/target/debug/hubsim" target/interop-venv/bin/python -m pytest -q -p no:cacheprovider \
    -W ignore::DeprecationWarning tests/interop || failed+=("python interop tests")

# The .deb installed into a real systemd (systemd-nspawn), driven with systemctl against hubsim.
echo "== system test: the .deb in systemd-nspawn"
bash tests/system/deb-nspawn.sh || failed+=("deb system test")

# A short fuzz run over the checked-in corpus (config, queue files, topics, SAS/twin input).
echo "== fuzz (FUZZ_SECONDS=${FUZZ_SECONDS:-15} per target)"
bash fuzz/run.sh || failed+=("fuzzing")

if [ "${#failed[@]}" -gt 0 ]; then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "ALL TESTS PASSED"
