#!/usr/bin/env bash
# A short fuzz run of every target over the checked-in seed corpus (fuzz/corpus/<target>).
# cargo-fuzz needs nightly flags; RUSTC_BOOTSTRAP lets the stable toolchain accept them, and
# `-s none` skips sanitizers (not shipped with the stable toolchain). New inputs go to a scratch
# corpus; a crash leaves its input in fuzz/artifacts/<target>/ and fails the run: add it to the
# seeds and fix the code (it becomes a regression input for every later run).
#
# The run fails when a fuzzer exits non-zero, when a target did not report its final "Done" line,
# and when the targets cargo-fuzz lists are not exactly the files in fuzz_targets/ (a target
# missing from Cargo.toml would otherwise never run).
set -euo pipefail
cd "$(dirname "$0")"
seconds="${FUZZ_SECONDS:-10}"
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz@0.13.2
export RUSTC_BOOTSTRAP=1
# With the TPM back end (libtss2 from tests/setup.sh), so the activation-blob target builds too.
features=(--features tpm)
cargo fuzz build -s none "${features[@]}"

listed=$(cargo fuzz list | sort)
files=$(find fuzz_targets -name '*.rs' -printf '%f\n' | sed 's/\.rs$//' | sort)
if [ -z "$files" ] || [ "$listed" != "$files" ]; then
    echo "FUZZ FAILURE: the targets cargo-fuzz lists are not the files in fuzz/fuzz_targets"
    diff <(echo "$listed") <(echo "$files") || true
    exit 1
fi

ran=0
for target in $listed; do
    scratch="$(mktemp -d)"
    log="$(mktemp)"
    echo "== fuzz $target (${seconds}s)"
    status=0
    cargo fuzz run -s none "${features[@]}" "$target" "$scratch" "corpus/$target" \
        -- -max_total_time="$seconds" >"$log" 2>&1 || status=$?
    grep -E "^(Done|INFO: seed corpus)|panicked|SUMMARY|ERROR" "$log" || true
    rm -rf "$scratch"
    if [ "$status" -ne 0 ] || ! grep -q "^Done " "$log"; then
        echo "FUZZ FAILURE in $target: exit status $status; the last lines of its output:"
        tail -20 "$log"
        [ -n "$(ls -A "artifacts/$target" 2>/dev/null)" ] && echo "its input is in fuzz/artifacts/$target"
        rm -f "$log"
        exit 1
    fi
    rm -f "$log"
    ran=$((ran + 1))
done
echo "fuzz: all $ran targets ran for ${seconds}s each without a failure"
