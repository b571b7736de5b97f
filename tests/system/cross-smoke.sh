#!/usr/bin/env bash
# System test for the ARM packages (issue 26): builds the amd64, arm64 and armhf packages
# (packaging/build-deb.sh --arch), runs lintian on each cross-built one (Debian unstable's, in the
# cross root), compares each with the amd64 one (packaging/compare-debs.sh), then runs the
# packaged ARM agent under qemu user emulation against a native hubsim on loopback.
#
# What runs under emulation (docs/packaging.md, "Testing under emulation"): the agent binary and
# the shipped library plugin from the package (dpkg-deb -x), started as
# `qemu-aarch64 -L <cross root> hubagent ...` (this machine has no binfmt_misc, so the emulator is
# named explicitly; -L makes the root's arm64/armhf libraries the agent's). Per architecture:
#   --version, `config check` (0 on a good file, 78 naming the key on a bad one), then the agent
#   provisions through DPS with an enrollment group's key, publishes from the packaged simulated
#   sensor loaded in-process (isolation = "in-process": the default process isolation executes
#   the ARM plugin host, which only binfmt_misc could start) and from an exec plugin (a bash script
#   run natively, numbering its lines under its own run id), follows a desired-property change
#   of the exec plugin (new settings in its messages and in the reported properties), and is
#   killed with kill -9 while hubsim refuses connections, its queue holding acknowledged messages
#   hubsim has not got; restarted, it delivers every message it had acknowledged to each producer
#   (`published` in `plugins list`, read just before the kill), without a new DPS registration.
#   Last, the amd64 package's library plugin is refused, the error naming both architectures.
# Not run here: the systemd unit and its sandbox (systemd would have to run the ARM binary:
# binfmt_misc), the plugin sandbox (`plugin_sandbox = "off"`: its exec trampoline re-executes the
# ARM binary too), process isolation, the TPM back end against swtpm (the amd64 system test does),
# and the maintainer scripts (dpkg in an ARM root needs binfmt_misc too).
#
# Usage: cross-smoke.sh [arm64|armhf ...] (default: both). Needs root (systemd-nspawn into the
# cross root, and the root's own making); prints why and exits 77 otherwise.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "$(id -u)" -ne 0 ]; then
    echo "cross-smoke: SKIPPED (needs root for systemd-nspawn and mmdebstrap)"
    exit 77 # "not run": tests/run-all.sh counts it so (and as a failure under CI=true)
fi
if [ "$#" -gt 0 ]; then arches=("$@"); else arches=(arm64 armhf); fi
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
work="$target_dir/cross-smoke"
mkdir -p "$work"
exec 9>"$work/.lock"
flock -n 9 || { echo "cross-smoke: another run is using $work"; exit 1; }
log() { echo "[cross-smoke $(date +%T)] $*"; }
timed() { # label command...: runs it and logs how long it took
    local label="$1" started=$SECONDS; shift
    "$@"
    log "$label: $((SECONDS - started))s" >&2
}

# 1. The packages. The root first, so its making is timed on its own.
root="$(timed "the cross root (made or reused)" bash packaging/cross-root.sh)"
rm -rf "$work/pkg"
mkdir -p "$work/pkg"
build() { # arch: builds its package and keeps it as $work/pkg/hubagent_<arch>.deb
    local deb
    deb="$(bash packaging/build-deb.sh --arch "$1" | tail -1)"
    [ -f "$deb" ] || { echo "cross-smoke: no $1 package built"; return 1; }
    cp "$deb" "$work/pkg/hubagent_$1.deb"
}
timed "the amd64 package" build amd64
for arch in "${arches[@]}"; do timed "the $arch package" build "$arch"; done
cargo build -q --locked -p hubsim
hubsim="$target_dir/debug/hubsim"

failed=()
for arch in "${arches[@]}"; do
    # 2. lintian (Debian unstable's, the release the package is built in), same overrides as amd64.
    lint_rc=0
    lint="$(systemd-nspawn -q --register=no --keep-unit --console=pipe --volatile=overlay -D "$root" \
        --bind-ro="$work/pkg:/mnt" --chdir=/mnt lintian --fail-on error,warning "hubagent_$arch.deb" </dev/null 2>&1)" || lint_rc=$?
    grep -v 'running with root privileges\|Attempted to remove disk file system' <<<"$lint" || true
    if [ "$lint_rc" -eq 0 ]; then log "$arch: lintian clean"; else echo "$arch: lintian: errors or warnings (above), exit $lint_rc"; failed+=("$arch lintian"); fi
    # 3. Against the amd64 package.
    bash packaging/compare-debs.sh "$work/pkg/hubagent_amd64.deb" "$work/pkg/hubagent_$arch.deb" || failed+=("$arch contents")
done

# 4. The agent under emulation.
free_ports() { python3 -c 'import socket
s=[socket.socket() for _ in range(2)]
[x.bind(("127.0.0.1",0)) for x in s]
print(*[x.getsockname()[1] for x in s])'; }
# wait_for what timeout-seconds command...: polls the command until it succeeds.
wait_for() {
    local what="$1" deadline=$((SECONDS + $2)); shift 2
    until "$@"; do
        [ "$SECONDS" -lt "$deadline" ] || { echo "cross-smoke: timed out waiting for $what"; return 1; }
        sleep 0.2
    done
}
hubsim_pid="" agent_pid=""
cleanup() {
    for pid in $agent_pid $hubsim_pid; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 1' INT TERM

smoke() { # arch
    local arch="$1" dir qemu gnu triple
    case "$arch" in
        arm64) qemu="qemu-aarch64" gnu=aarch64-linux-gnu triple=aarch64-unknown-linux-gnu ;;
        armhf) qemu="qemu-arm" gnu=arm-linux-gnueabihf triple=armv7-unknown-linux-gnueabihf ;;
    esac
    dir="$work/$arch"
    rm -rf "$dir"
    mkdir -p "$dir/state"
    chmod 700 "$dir/state"
    dpkg-deb -x "$work/pkg/hubagent_$arch.deb" "$dir/pkg"
    local emulated=("$root/usr/bin/$qemu" -L "$root" "$dir/pkg/usr/bin/hubagent")
    # The TPM helper is packaged, and only it links the TPM libraries (readelf reads ARM files).
    [ -x "$dir/pkg/usr/libexec/hubagent/hubagent-tpm" ] || { echo "$arch: no /usr/libexec/hubagent/hubagent-tpm"; return 1; }
    if readelf -d -W "$dir/pkg/usr/bin/hubagent" | grep -q 'NEEDED.*\[libtss2'; then
        echo "$arch: /usr/bin/hubagent links libtss2"; return 1
    fi
    agent() { "${emulated[@]}" "$@"; }

    local version
    version="$(agent --version)"
    [ "$version" = "hubagent $(dpkg-deb -f "$work/pkg/hubagent_$arch.deb" Version | sed 's/-[^-]*$//')" ] \
        || { echo "$arch: --version says '$version'"; return 1; }
    log "$arch: --version: $version"

    # The C plugin example, built for the target with the command docs/plugins.md gives (Debian's
    # cross gcc, in the root), from a copy with the example's layout (the checkout's own build
    # stays).
    mkdir -p "$dir/sdk/plugins/examples" "$dir/sdk/plugins/sdk"
    cp -r plugins/examples/c-counter "$dir/sdk/plugins/examples/"
    cp -r plugins/sdk/include "$dir/sdk/plugins/sdk/"
    rm -f "$dir/sdk/plugins/examples/c-counter/libc_counter.so"
    systemd-nspawn -q --register=no --keep-unit --console=pipe --volatile=overlay -D "$root" \
        --bind="$dir/sdk" --chdir="$dir/sdk/plugins/examples/c-counter" make -s CC="$gnu-gcc" </dev/null 2>&1 \
        | grep -v 'Attempted to remove disk file system' || true
    local c_plugin="$dir/sdk/plugins/examples/c-counter/libc_counter.so"
    [ -f "$c_plugin" ] || { echo "$arch: the C example did not build with CC=$gnu-gcc"; return 1; }
    log "$arch: the C example built with make CC=$gnu-gcc: $(readelf -h "$c_plugin" | sed -n 's/^ *Machine: *//p')"
    # README's Rust plugin ("Write a plugin", "In Rust": its Cargo.toml lines and src/lib.rs as
    # printed there), built with the cross command it gives, against this checkout's SDK. (An
    # empty [workspace]: README's crate sits beside the checkout, this one inside its target/.)
    mkdir -p "$dir/my-sensor/src"
    printf '[package]\nname = "my-sensor"\nversion = "0.1.0"\nedition = "2024"\n\n[workspace]\n\n[lib]\ncrate-type = ["cdylib"]\n\n[dependencies]\nhubagent-plugin-sdk = { path = "%s/plugins/sdk" }\n' \
        "$PWD" >"$dir/my-sensor/Cargo.toml"
    python3 -c 'import sys
text = open("README.md").read()
after = text[text.index("`src/lib.rs`:"):]
code = after[after.index("```rust\n") + 8:]
sys.stdout.write(code[:code.index("```")])' >"$dir/my-sensor/src/lib.rs"
    local upper; upper="$(tr 'a-z-' 'A-Z_' <<<"$triple")"
    systemd-nspawn -q --register=no --keep-unit --console=pipe --volatile=overlay -D "$root" \
        --bind="$dir/my-sensor" --bind-ro="$PWD" --bind="${CARGO_HOME:-$HOME/.cargo}:/cargo-home" --chdir="$dir/my-sensor" \
        --setenv=CARGO_HOME=/cargo-home --setenv="CARGO_TARGET_${upper}_LINKER=$gnu-gcc" \
        cargo build -q --release --target "$triple" </dev/null 2>&1 | grep -v 'Attempted to remove disk file system' || true
    local rust_plugin="$dir/my-sensor/target/$triple/release/libmy_sensor.so"
    [ -f "$rust_plugin" ] || { echo "$arch: README's Rust plugin did not build for $triple"; return 1; }
    log "$arch: README's Rust plugin built with cargo build --release --target $triple: $(readelf -h "$rust_plugin" | sed -n 's/^ *Machine: *//p')"

    local mqtt https
    read -r mqtt https < <(free_ports)
    "$hubsim" serve --state-dir "$dir/sim" --mqtt-port "$mqtt" --https-port "$https" \
        --id-scope 0ne00000001 >"$dir/hubsim.log" 2>&1 9>&- &
    hubsim_pid=$!
    wait_for "hubsim's endpoints" 30 test -f "$dir/sim/endpoints.json"
    api() { # METHOD PATH [BODY]: enrollments and /sim with the DPS policy's token, twins with the hub's
        local policy=dps
        [[ "$2" != /twins/* ]] || policy=hub
        curl -sS --fail-with-body --cacert "$dir/sim/ca.pem" -H "Authorization: $("$hubsim" token --state-dir "$dir/sim" --policy "$policy")" \
            -H 'Content-Type: application/json' -X "$1" "https://localhost:$https$2" ${3:+-d "$3"}
    }
    # An enrollment group with a symmetric key: the agent derives its device key from it.
    api PUT /enrollmentGroups/smoke '{"enrollmentGroupId":"smoke","attestation":{"type":"symmetricKey"}}' \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["attestation"]["symmetricKey"]["primaryKey"])' >"$dir/group.key"
    chmod 600 "$dir/group.key"
    local device="gw-$arch"

    # The exec plugin: numbers its lines under its run id (its pid, which it also writes down),
    # and puts the settings it runs with into each message; reads new settings between lines.
    cat >"$dir/counter.sh" <<'SH'
#!/bin/bash
run=$$
echo "$run" >"$1/exec-runs"
read -r settings
n=0
while true; do
    if read -r -t 0.1 line; then settings="$line"; fi
    n=$((n + 1))
    printf '{"body": {"run": "%s", "seq": %d, "settings": %s}}\n' "$run" "$n" "$settings"
done
SH
    chmod 755 "$dir/counter.sh"
    write_config() { # file with-library(yes|no)
        cat >"$1" <<CONF
[agent]
state_dir = "$dir/state"
control_socket = "$dir/state/control.sock"
# The plugin sandbox starts an exec plugin through the agent's own binary (hubagent
# sandbox-exec), which only binfmt_misc could start here; the amd64 tests prove the sandbox.
plugin_sandbox = "off"

[provisioning]
source = "dps"
global_endpoint = "localhost"
id_scope = "0ne00000001"
registration_id = "$device"

[provisioning.attestation]
method = "symmetric_key"
group_key = { file = "$dir/group.key" }

[hub]
port = $mqtt
trust_bundle = "$dir/sim/ca.pem"

[[plugin]]
name = "counter"
kind = "exec"
command = ["/bin/bash", "$dir/counter.sh", "$dir"]
[plugin.settings]
tag = "before"
CONF
        if [ "$2" = yes ]; then
            cat >>"$1" <<CONF

# The packaged library plugin, loaded into the (emulated) agent itself.
[[plugin]]
name = "sensor"
kind = "library"
path = "$dir/pkg/usr/lib/hubagent/plugins/libhubagent_simulated_sensor.so"
isolation = "in-process"
[plugin.settings]
interval = "100ms"

# README's Rust plugin, cross-built above.
[[plugin]]
name = "my-sensor"
kind = "library"
path = "$rust_plugin"
isolation = "in-process"

# The C example, cross-built above.
[[plugin]]
name = "c-counter"
kind = "library"
path = "$c_plugin"
isolation = "in-process"
[plugin.settings]
interval_ms = 200
step = 1
CONF
        fi
    }
    write_config "$dir/config.toml" yes
    # A bad file: refused with exit 78 (EX_CONFIG), naming the file, line and key.
    sed 's/^port = .*/port = "eighty"/' "$dir/config.toml" >"$dir/bad.toml"
    local rc=0 out
    out="$(agent -c "$dir/bad.toml" config check 2>&1)" || rc=$?
    [ "$rc" -eq 78 ] && grep -q 'bad.toml:[0-9]*:[0-9]*.*hub.port' <<<"$out" \
        || { echo "$arch: config check of a bad file: exit $rc, said: $out"; return 1; }
    # The in-process libraries show as NOT TRIED: the probe re-executes the ARM binary, which
    # only binfmt_misc could start here (docs/plugins.md, "Which files are run").
    good="$(agent -c "$dir/config.toml" config check 2>&1)" || { echo "$arch: config check refused the good file: $good"; return 1; }
    grep -q '^plugin c-counter: NOT TRIED (the agent could not run' <<<"$good" \
        || { echo "$arch: config check did not say why the C plugin was not tried: $good"; return 1; }
    log "$arch: config check: good file ok, bad file exit 78: $(head -1 <<<"$out")"

    start_agent() { # config
        # (Started directly, not through the function, so that $! is the emulator's pid: the
        # agent's. fd 9 is the run's lock, not theirs.)
        "${emulated[@]}" -c "$1" run >>"$dir/agent.log" 2>&1 9>&- &
        agent_pid=$!
    }
    telemetry() { api GET "/sim/telemetry/$device"; }
    # How many distinct (run, seq) messages of a source hubsim has, or checks: see the python.
    count_source() { # source
        telemetry | python3 -c 'import json,sys
src=sys.argv[1]
print(len({(json.loads(m["body"]).get("run",""), json.loads(m["body"])["seq"]) for m in json.load(sys.stdin) if m["properties"].get("source")==src}))' "$1"
    }
    has_source() { telemetry | python3 -c 'import json,sys
sys.exit(0 if sum(m["properties"].get("source")==sys.argv[1] for m in json.load(sys.stdin)) >= 3 else 1)' "$1"; }
    has_messages() { [ "$(count_source "$1")" -ge "$2" ]; }
    start_agent "$dir/config.toml"
    registered() { api GET /sim/registrations | python3 -c 'import json,sys
sys.exit(0 if any(r["registrationId"]==sys.argv[1] and r["outcome"]=="assigned" for r in json.load(sys.stdin)) else 1)' "$device"; }
    wait_for "$device's registration" 120 registered || { tail -20 "$dir/agent.log"; return 1; }
    wait_for "the library plugin's telemetry" 120 has_messages sensor 3 \
        && wait_for "the exec plugin's telemetry" 120 has_messages counter 3 \
        && wait_for "the C plugin's telemetry" 120 has_source c-counter \
        && wait_for "README's Rust plugin's telemetry" 120 has_source my-sensor || { tail -20 "$dir/agent.log"; return 1; }
    local assigned
    assigned="$(api GET /sim/registrations | python3 -c 'import json,sys; print(" ".join(r["outcome"]+":"+r["attestation"] for r in json.load(sys.stdin) if r["registrationId"]==sys.argv[1]))' "$device")"
    log "$arch: provisioned ($assigned), telemetry from the in-process library plugins (packaged Rust, README's Rust, C) and the exec plugin"

    # A desired-property change of the exec plugin: its messages carry the new settings, and the
    # reported properties echo them.
    api PATCH "/twins/$device" '{"properties":{"desired":{"plugins":{"counter":{"tag":"after"}}}}}' >/dev/null
    tagged_after() { telemetry | python3 -c 'import json,sys
sys.exit(0 if any(json.loads(m["body"]).get("settings",{}).get("tag")=="after" for m in json.load(sys.stdin) if m["properties"].get("source")=="counter") else 1)'; }
    reported_after() { api GET "/twins/$device" | python3 -c 'import json,sys
r=json.load(sys.stdin)["properties"]["reported"].get("plugins",{}).get("counter",{})
sys.exit(0 if r.get("settings",{}).get("tag")=="after" and r.get("status")=="running" else 1)'; }
    wait_for "a message with the new settings" 60 tagged_after && wait_for "the new settings reported" 60 reported_after \
        || { tail -20 "$dir/agent.log"; return 1; }
    log "$arch: desired.plugins.counter.tag = after: in the plugin's messages and in reported.plugins.counter"

    # kill -9 with a backlog: hubsim refuses connections and drops the live one; the plugins keep
    # publishing into the agent's queue until it holds messages hubsim has not got.
    api POST /sim/faults '{"refuseConnectionsSeconds": 600}' >/dev/null
    api POST "/sim/faults/drop/$device" >/dev/null
    published() { agent -c "$dir/config.toml" plugins list --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]]["published"])' "$1"; }
    backlog() { [ "$(published sensor)" -ge "$(($(count_source sensor) + 10))" ] && [ "$(published counter)" -ge "$(($(count_source counter) + 10))" ]; }
    wait_for "a backlog of acknowledged, undelivered messages" 120 backlog || { tail -20 "$dir/agent.log"; return 1; }
    # Read before the kill: what the agent acknowledged to each producer (more may follow before
    # the kill lands; those need not arrive).
    local sensor_acked counter_acked counter_run
    sensor_acked="$(published sensor)" counter_acked="$(published counter)"
    counter_run="$(cat "$dir/exec-runs")"
    local arrived_before; arrived_before="$(count_source sensor)/$(count_source counter)"
    kill -9 "$agent_pid"
    wait "$agent_pid" 2>/dev/null || true
    log "$arch: kill -9 with sensor $sensor_acked and counter $counter_acked acknowledged, hubsim had $arrived_before"
    api DELETE /sim/faults >/dev/null
    # Restarted without the library plugin: every sensor message that arrives now is from before
    # the kill (it numbers from 1 each run). The exec plugin's new run has a new run id.
    write_config "$dir/config-after.toml" no
    start_agent "$dir/config-after.toml"
    missing() { # prints what of the acknowledged messages hubsim lacks; fails while any
        telemetry | python3 -c 'import json,sys
want={("sensor",""): int(sys.argv[1]), ("counter", sys.argv[3]): int(sys.argv[2])}
got={(m["properties"].get("source"), json.loads(m["body"]).get("run",""), json.loads(m["body"]).get("seq")) for m in json.load(sys.stdin)}
lost=[(s, r, n) for (s, r), count in want.items() for n in range(1, count + 1) if (s, r, n) not in got]
print(f"{len(lost)} lost, e.g. {lost[:5]}")
sys.exit(1 if lost else 0)' "$sensor_acked" "$counter_acked" "$counter_run"
    }
    wait_for "every acknowledged message" 180 missing >/dev/null || { missing; tail -20 "$dir/agent.log"; return 1; }
    local registrations
    registrations="$(api GET /sim/registrations | python3 -c 'import json,sys; print(sum(r["registrationId"]==sys.argv[1] for r in json.load(sys.stdin)))' "$device")"
    [ "$registrations" -eq 1 ] || { echo "$arch: $registrations DPS registrations: the restart should use the cached assignment"; return 1; }
    log "$arch: after kill -9 and restart: all $sensor_acked sensor and $counter_acked counter messages acknowledged before the kill arrived; one DPS registration in all"
    kill "$agent_pid"
    wait "$agent_pid" 2>/dev/null || true

    # The amd64 package's library plugin is refused by the ARM agent, naming both architectures.
    local here
    case "$arch" in arm64) here="AArch64 (arm64)" ;; armhf) here="32-bit ARM (armhf/armel)" ;; esac
    rm -rf "$dir/amd64"
    dpkg-deb -x "$work/pkg/hubagent_amd64.deb" "$dir/amd64"
    cp "$dir/config-after.toml" "$dir/config-foreign.toml"
    printf '\n[[plugin]]\nname = "amd64-sysmetrics"\nkind = "library"\npath = "%s"\nisolation = "in-process"\n' \
        "$dir/amd64/usr/lib/hubagent/plugins/libhubagent_sysmetrics.so" >>"$dir/config-foreign.toml"
    mv "$dir/agent.log" "$dir/agent-scenario.log"
    start_agent "$dir/config-foreign.toml"
    refused() { grep -qs "built for x86-64 (amd64), but this agent runs on $here" "$dir/agent.log"; }
    wait_for "the amd64 plugin refused" 60 refused || { tail -20 "$dir/agent.log"; return 1; }
    log "$arch: the amd64 package's plugin refused: $(grep -o 'built for x86-64 (amd64), but this agent runs on [^:]*' "$dir/agent.log" | head -1)"
    kill "$agent_pid"
    wait "$agent_pid" 2>/dev/null || true
    kill "$hubsim_pid"
    wait "$hubsim_pid" 2>/dev/null || true
    agent_pid="" hubsim_pid=""
}

for arch in "${arches[@]}"; do
    started=$SECONDS
    if smoke "$arch"; then
        log "$arch: emulated smoke PASSED in $((SECONDS - started))s"
    else
        log "$arch: emulated smoke FAILED after $((SECONDS - started))s (agent log: $work/$arch/agent.log)"
        failed+=("$arch smoke")
        cleanup
        agent_pid="" hubsim_pid=""
    fi
done
if [ "${#failed[@]}" -gt 0 ]; then
    log "FAILED: ${failed[*]}"
    exit 1
fi
log "PASSED (${arches[*]}) in ${SECONDS}s"
