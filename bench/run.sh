#!/usr/bin/env bash
# The benchmark (issue #8; docs/benchmarks.md): builds the agent, hubsim, the benchmark tools and
# plugins in release mode, makes sure Azure's Python SDK is in target/interop-venv, then runs
# bench/run.py, which prints the table. Arguments go to run.py: --runs N, --quick, --write-doc,
# --keep, --throughput-only, --backlog-only, --backlog N, --hubsim-only (row 5 alone), --billing-only
# (row 6 alone: billed 4 KB blocks per 1,000 readings, alone, batched at 4 KB and 64 KiB, batched + gzip), --hubsim PATH
# (row 5 of another hubsim). Needs TCP port 8883 free on 127.0.0.1 (waits up to 10 minutes for it).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --quiet -p hubsim -p hubagent-bench -p hubagent-bench-plugin \
    -p hubagent-simulated-sensor -p hubagent-sysmetrics
# The agent as the Debian package has it (packaging/build-deb.sh): TPM support, without the
# demo's embedded hubsim, so rows 2c/2d measure what operators run. Built alone, and last, so
# that no other package's features are unified into it. Needs libtss2-dev (tests/setup.sh).
cargo build --release --quiet -p hubagent --no-default-features --features tpm
# How much of the daemon's code-order list (agent/build.rs) this build still has: a stale list
# raises rows 2c/2d by about 4 MiB (docs/benchmarks.md, "The daemon's code in the order it runs").
if [ "$(uname -m)" = x86_64 ]; then
    python3 bench/code_order.py --check agent/link-order-x86_64.txt >&2
fi

# The same venv as the test suite (tests/setup.sh), created here when missing so a clean clone
# needs nothing else.
venv=target/interop-venv
stamp="$venv/requirements.sha256"
wanted=$(sha256sum tests/interop/requirements.txt | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    echo "bench: creating $venv from tests/interop/requirements.txt" >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check -r tests/interop/requirements.txt
    echo "$wanted" > "$stamp"
fi

exec python3 bench/run.py "$@"
