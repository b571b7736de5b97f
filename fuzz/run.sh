#!/usr/bin/env bash
# A short fuzz run of every target over the checked-in seed corpus (fuzz/corpus/<target>).
# cargo-fuzz needs nightly flags; RUSTC_BOOTSTRAP lets the stable toolchain accept them, and
# `-s none` skips sanitizers (not shipped with the stable toolchain). New inputs go to a scratch
# corpus; a crash leaves its input in fuzz/artifacts/<target>/ and fails the run: add it to the
# seeds and fix the code (it becomes a regression input for every later run).
set -euo pipefail
cd "$(dirname "$0")"
seconds="${FUZZ_SECONDS:-15}"
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz@0.13.2
export RUSTC_BOOTSTRAP=1
# With the TPM back end (libtss2 from tests/setup.sh), so the activation-blob target builds too.
features=(--features tpm)
cargo fuzz build -s none "${features[@]}"
for target in $(cargo fuzz list); do
    scratch="$(mktemp -d)"
    echo "== fuzz $target (${seconds}s)"
    cargo fuzz run -s none "${features[@]}" "$target" "$scratch" "corpus/$target" -- -max_total_time="$seconds" 2>&1 \
        | grep -E "^(Done|INFO: seed corpus)|panicked|SUMMARY|ERROR" || true
    rm -rf "$scratch"
    if [ -n "$(ls -A "artifacts/$target" 2>/dev/null)" ]; then
        echo "FUZZ FAILURE in $target: see fuzz/artifacts/$target"
        exit 1
    fi
done
