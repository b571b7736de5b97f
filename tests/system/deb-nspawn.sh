#!/usr/bin/env bash
# System test: the real .deb in a real systemd, on each Debian release the package is for
# (`packaging/build-deb.sh --releases`: Debian 12 bookworm and Debian 13 trixie), or on the
# releases given as arguments. Builds the package once, then per release, one after the other:
# lintian and dpkg-shlibdeps of that release on the package, then a minimal root of that release
# booted with systemd-nspawn (sharing the host's network, so it reaches a hubsim and a swtpm
# started here on loopback), where tests/system/scenario.sh installs the package and drives it the
# way an operator does; then checks in hubsim what the agent did. Needs root (nspawn); prints why
# and exits 0 without it.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "$(id -u)" -ne 0 ]; then
    echo "deb-nspawn: SKIPPED (needs root for systemd-nspawn)"
    exit 77 # "not run", as automake's test drivers count it: tests/run-all.sh reports it as such
fi
work="$PWD/target/system"
mkdir -p "$work"
# One run at a time: two would make and remove the same roots under each other.
exec 9>"$work/.lock"
flock -n 9 || { echo "deb-nspawn: another run is using $work"; exit 1; }
log() { echo "[deb-nspawn $(date +%T)] $*"; }
if [ "$#" -gt 0 ]; then releases=("$@"); else read -ra releases <<<"$(bash packaging/build-deb.sh --releases)"; fi
host_release="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"

# The TPM libraries the package recommends, by each release's package names (agent/Cargo.toml's
# Recommends): on a fresh minimal system, `apt install ./hubagent.deb` must pull in exactly these
# and what they depend on, and with --no-install-recommends none of them.
tpm_libs() {
    case "$1" in
        bookworm) echo libtss2-esys-3.0.2-0 libtss2-mu0 libtss2-tctildr0 ;;
        trixie) echo libtss2-esys-3.0.2-0t64 libtss2-mu-4.0.1-0t64 libtss2-tctildr0t64 ;;
        *) echo "deb-nspawn: no TPM library names for release $1" >&2; return 1 ;;
    esac
}

# 1. The package, built once for all releases.
log "building the .deb"
deb="$(bash packaging/build-deb.sh | tail -1)"
[ -f "$deb" ] || { echo "no .deb built"; exit 1; }
# The same build with a higher version: what an upgrade installs. (cargo deb clears
# target/debian, so the first package is kept aside.)
mkdir -p "$work/pkg"
built_dir="$(dirname "$deb")"
cp "$deb" "$work/pkg/hubagent.deb"
deb="$work/pkg/hubagent.deb"
version="$(dpkg-deb -f "$deb" Version)"
# The development package build-deb.sh made beside it (Architecture: all).
cp "$built_dir/hubagent-dev_${version}_all.deb" "$work/pkg/hubagent-dev.deb"
deb2="$(bash packaging/build-deb.sh --deb-version "$version+upgrade1" | tail -1)"
[ "$(dpkg-deb -f "$deb2" Version)" = "$version+upgrade1" ] || { echo "no upgrade .deb built"; exit 1; }
cp "$deb2" "$work/pkg/hubagent-upgrade.deb"
deb2="$work/pkg/hubagent-upgrade.deb"
cp packaging/check-depends.sh "$work/pkg/"
cargo build -q -p hubsim

# 2. The roots, made the same way for every release by mmdebstrap and cached in target/system
#    under a name that carries a hash of their mmdebstrap arguments (a changed package list makes
#    a new root). Each is written aside and renamed, so an interrupted run leaves nothing half made.
# Acquire::Check-Valid-Until: this machine's mirror may be a dated snapshot, and the -updates and
# -security suites' Release files expire a week after they were made; the roots are test
# fixtures, not systems kept up to date.
mm_common=(--variant=minbase --aptopt='Acquire::Check-Valid-Until "false"')
rm -f "$work/rootfs.tar" # the single Debian 12 root of earlier versions of this script
cached_root() { # kind (test|tools) release: prints the root's path, making it first if needed
    local kind="$1" release="$2" libs args path started
    libs="$(tpm_libs "$release")"
    if [ "$kind" = test ]; then
        # The test root: minimal, with systemd; the TPM libraries and what they need are only
        # downloaded into apt's cache (with the package lists), so installing the .deb inside
        # needs no network and can take nothing else (scenario.sh forbids downloads).
        # shellcheck disable=SC2054 # the commas are mmdebstrap's
        # (GzipIndexes: the package lists stay compressed, half the size of the root.)
        # man-db and bash-completion: the package's man pages and completion are read there;
        # gcc, libc6-dev and pkg-config: the dev package's C example is built there with them.
        args=(--include=systemd-sysv,dbus,ca-certificates,man-db,bash-completion,gcc,libc6-dev,pkg-config
            --skip=cleanup/apt/lists --skip=cleanup/apt/cache --aptopt='Acquire::GzipIndexes "true"'
            --customize-hook="chroot \"\$1\" sh -c 'apt-get clean && apt-get install -y -q --download-only $libs'"
            "$release")
        path="$work/root-$release-$(printf '%s\n' "${mm_common[@]}" "${args[@]}" | sha256sum | cut -c1-12).tar"
    else
        # The tools root: this release's lintian and dpkg-shlibdeps, with its TPM libraries
        # installed (their symbols files are what dpkg-shlibdeps reads). A directory, never changed.
        args=(--include="lintian,dpkg-dev,${libs// /,}" "$release")
        path="$work/tools-$release-$(printf '%s\n' "${mm_common[@]}" "${args[@]}" | sha256sum | cut -c1-12)"
    fi
    if [ ! -e "$path" ]; then
        started=$SECONDS
        log "creating the $release $kind root (cached in $path)" >&2
        rm -rf "$path.new"
        if [ "$kind" = test ]; then
            mmdebstrap "${mm_common[@]}" "${args[@]}" "$path.new.tar" >"$path.log" 2>&1 \
                && mv "$path.new.tar" "$path"
        else
            mmdebstrap "${mm_common[@]}" "${args[@]}" "$path.new" >"$path.log" 2>&1 \
                && mv "$path.new" "$path"
        fi || { tail -20 "$path.log" >&2; echo "mmdebstrap failed ($path.log)" >&2; return 1; }
        log "the $release $kind root took $((SECONDS - started))s" >&2
    fi
    echo "$path"
}
# Runs a command with the given release's tools: this machine's own when it runs that release,
# else in its tools root (left unchanged: writes go to a tmpfs overlay; target/system/pkg is
# bound in at /mnt).
with_tools() { # release command...
    local release="$1"; shift
    if [ "$release" = "$host_release" ]; then
        (cd "$work/pkg" && "$@")
    else
        local tools; tools="$(cached_root tools "$release")"
        systemd-nspawn -q --register=no --keep-unit --volatile=overlay --bind-ro="$work/pkg:/mnt" \
            --chdir=/mnt -D "$tools" "$@" </dev/null
    fi
}

# 3. On the host for every release: a swtpm (the package's TPM code is run against it in each
#    release, with that release's TPM libraries), and one hubsim per release (started below).
# tpm2-tss's swtpm TCTI sends its control commands to the next port up: two free ports in a row.
read -r swtpm_port swtpm_ctrl < <(python3 -c 'import socket
while True:
    a, b = socket.socket(), socket.socket()
    a.bind(("127.0.0.1", 0))
    try:
        b.bind(("127.0.0.1", a.getsockname()[1] + 1))
    except OSError:
        continue
    print(a.getsockname()[1], b.getsockname()[1])
    break')
swtpm_dir="$(mktemp -d "$work/swtpm.XXXX")"
swtpm socket --tpm2 --server "type=tcp,port=$swtpm_port,bindaddr=127.0.0.1" \
    --ctrl "type=tcp,port=$swtpm_ctrl,bindaddr=127.0.0.1" --tpmstate "dir=$swtpm_dir" \
    --flags not-need-init,startup-clear >"$swtpm_dir/swtpm.log" 2>&1 &
swtpm_pid=$!
# The proxy scenario: a network namespace whose only way out is a veth pair to the host, where
# tinyproxy listens on the host's end. The container binds it in at /run/netns/proxy-only, and
# scenario.sh puts the agent's unit into it (NetworkNamespacePath=, a test-only drop-in): there
# the hubsim on the host's loopback cannot be reached, the proxy can. systemd 257 joins a network
# namespace only with CAP_NET_ADMIN, which nspawn keeps from a container sharing the host's
# network unless asked (--capability below). (systemd's own IPAddressDeny= would be simpler, but
# its BPF firewall is not enforced inside nspawn on this machine: tried, connections went through.)
proxy_ns="hubagent-deb-$$" proxy_host_ip=10.254.77.1 proxy_ns_ip=10.254.77.2
ip netns add "$proxy_ns"
ip link add "hd$$h" type veth peer name "hd$$n"
ip link set "hd$$n" netns "$proxy_ns"
ip addr add "$proxy_host_ip/30" dev "hd$$h"
ip link set "hd$$h" up
ip -n "$proxy_ns" addr add "$proxy_ns_ip/30" dev "hd$$n"
ip -n "$proxy_ns" link set "hd$$n" up
ip -n "$proxy_ns" link set lo up
root="" sim="" hubsim_pid="" proxy_pid=""
cleanup() {
    if [ -n "$hubsim_pid" ]; then kill "$hubsim_pid" 2>/dev/null || true; fi
    if [ -n "$proxy_pid" ]; then kill "$proxy_pid" 2>/dev/null || true; fi
    if [ -n "${logs_caller_pid:-}" ]; then kill "$logs_caller_pid" 2>/dev/null || true; fi
    kill "$swtpm_pid" 2>/dev/null || true
    ip netns del "$proxy_ns" 2>/dev/null || true
    rm -rf "$root" "$sim" "$swtpm_dir"
}
trap cleanup EXIT
trap 'exit 1' INT TERM
# The endorsement and storage root keys as the host's build reads them (the agent's own
# quickstart variables stand in for a configuration): what each release must read too.
for _ in $(seq 100); do
    host_ek="$(PROVISIONING_IDSCOPE=0ne00000001 PROVISIONING_REGISTRATION_ID=ek target/release/hubagent \
        tpm show-ek -c config/config.toml --tcti "swtpm:host=127.0.0.1,port=$swtpm_port" --json 2>/dev/null | tr -d '\n ')" \
        && break
    sleep 0.1
done
[ -n "$host_ek" ] || { echo "the swtpm did not answer"; cat "$swtpm_dir/swtpm.log"; exit 1; }

run_release() { # release: everything for one release; returns non-zero when a check failed
    local release="$1" started=$SECONDS fail=0
    log "== $release"
    # (run_release runs in an || list, where set -e does not apply: the steps that the rest
    # depends on return by hand.)
    if [ "$release" != "$host_release" ]; then cached_root tools "$release" >/dev/null || return 1; fi
    # Lintian-clean with this release's lintian: errors and warnings fail; deliberate exceptions
    # are overrides with their reason (packaging/debian/hubagent.lintian-overrides).
    log "$release: lintian"
    local lint lint_rc=0
    lint="$(with_tools "$release" lintian --fail-on error,warning hubagent.deb hubagent-upgrade.deb hubagent-dev.deb 2>&1)" || lint_rc=$?
    grep -v 'running with root privileges' <<<"$lint" || true
    [ "$lint_rc" -eq 0 ] || { echo "$release: lintian: the package has errors or warnings (above), exit $lint_rc"; fail=1; }
    log "$release: $(with_tools "$release" lintian --version)"
    # The Depends against this release's dpkg-shlibdeps.
    with_tools "$release" bash check-depends.sh hubagent.deb || { echo "$release: the Depends miss what this release's dpkg-shlibdeps computes"; fail=1; }

    local rootfs_tar; rootfs_tar="$(cached_root test "$release")" || return 1
    root="$(mktemp -d "$work/root.XXXX")"
    sim="$(mktemp -d "$work/sim.XXXX")"
    tar -xf "$rootfs_tar" -C "$root" || return 1

    # hubsim on the host, on free ports, with two enrollments; a new one per release, so its
    # registrations are this release's only.
    local mqtt https
    read -r mqtt https < <(python3 -c 'import socket
s=[socket.socket() for _ in range(2)]
[x.bind(("127.0.0.1",0)) for x in s]
print(*[x.getsockname()[1] for x in s])')
    # Two ID scopes: the test moves the gateway from the first to the second (same enrollments).
    target/debug/hubsim serve --state-dir "$sim" --mqtt-port "$mqtt" --https-port "$https" \
        --id-scope 0ne00000001 --id-scope 0ne000000B2 >"$sim/hubsim.log" 2>&1 &
    hubsim_pid=$!
    for _ in $(seq 100); do [ -f "$sim/endpoints.json" ] && break; sleep 0.1; done
    api() { # METHOD PATH [BODY]: DPS's service API, or the hub's with API_POLICY=hub
        local token; token="$(target/debug/hubsim token --state-dir "$sim" --policy "${API_POLICY:-dps}")"
        curl -sS --fail-with-body --cacert "$sim/ca.pem" -H "Authorization: $token" \
            -H 'Content-Type: application/json' -X "$1" "https://localhost:$https$2" ${3:+-d "$3"}
    }
    key_of() { python3 -c 'import json,sys; print(json.load(sys.stdin)["attestation"]["symmetricKey"]["primaryKey"])'; }
    local key1 key2
    # The proxy, on the host's end of the namespace's veth pair, for this release's run.
    local proxy_port
    proxy_port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
    printf 'Port %s\nListen %s\nAllow %s\nTimeout 600\nLogLevel Connect\nLogFile "%s"\n' \
        "$proxy_port" "$proxy_host_ip" "$proxy_ns_ip" "$sim/tinyproxy.log" >"$sim/tinyproxy.conf"
    tinyproxy -d -c "$sim/tinyproxy.conf" >/dev/null 2>&1 &
    proxy_pid=$!
    key1="$(api PUT /enrollments/gw-sys-1 '{"registrationId":"gw-sys-1","attestation":{"type":"symmetricKey"}}' | key_of)" || return 1
    key2="$(api PUT /enrollments/gw-sys-2 '{"registrationId":"gw-sys-2","attestation":{"type":"symmetricKey"}}' | key_of)" || return 1
    # A third enrollment whose registrations get a certificate issued by a hubsim CA, valid for
    # 50 s from a minute back (docs/hubsim.md): renewed under systemd at the scenario's end.
    local key3
    target/debug/hubsim certs root --out "$sim/issuing-ca" --cn "issuing-ca" >/dev/null || return 1
    key3="$(api PUT /enrollments/gw-sys-3 '{"registrationId":"gw-sys-3","attestation":{"type":"symmetricKey"},"certificateIssuance":{"issuerDir":"'"$sim/issuing-ca"'","validitySeconds":50}}' | key_of)" || return 1

    # What the operator does, inside the container, as a oneshot unit that records each result.
    cp "$deb" "$root/root/hubagent.deb"
    cp "$deb2" "$root/root/hubagent-upgrade.deb"
    cp "$work/pkg/hubagent-dev.deb" "$root/root/hubagent-dev.deb"
    cp "$sim/ca.pem" "$root/root/hubsim-ca.pem"
    printf '%s\n' "$key1" >"$root/root/key1"
    printf '%s\n' "$key2" >"$root/root/key2"
    printf '%s\n' "$key3" >"$root/root/key3"
    printf 'MQTT_PORT=%s\nSWTPM_PORT=%s\nPROXY=http://%s:%s\n' "$mqtt" "$swtpm_port" "$proxy_host_ip" "$proxy_port" >"$root/root/e2e.env"
    install -m 0755 tests/system/scenario.sh "$root/root/e2e.sh"
    cat >"$root/etc/systemd/system/e2e.service" <<'EOF'
[Unit]
Description=hubagent system test
After=multi-user.target
[Service]
Type=oneshot
ExecStart=/root/e2e.sh
StandardOutput=journal
[Install]
WantedBy=multi-user.target
EOF
    ln -sf /etc/systemd/system/e2e.service "$root/etc/systemd/system/multi-user.target.wants/e2e.service"
    echo "deb-nspawn" >"$root/etc/hostname"
    # minbase has no /etc/hosts: the agent must resolve "localhost" (the hubsim on the host).
    printf '127.0.0.1 localhost deb-nspawn\n::1 localhost ip6-localhost\n' >"$root/etc/hosts"

    # The cloud's side of remote diagnostics: each time the scenario names a device in
    # /root/logs-request-N, the `logs` direct method is invoked on it through hubsim's service API
    # (as Azure's service SDK would) and the answer left in /root/logs-answer-N.json.
    (
        for n in 1 2; do
            for _ in $(seq 1200); do [ -s "$root/root/logs-request-$n" ] && break; sleep 0.5; done
            API_POLICY=hub api POST "/twins/$(cat "$root/root/logs-request-$n")/methods" \
                '{"methodName":"logs","payload":{"limit":500},"responseTimeoutInSeconds":25}' \
                >"$root/root/logs-answer.tmp" 2>&1
            mv "$root/root/logs-answer.tmp" "$root/root/logs-answer-$n.json"
        done
    ) &
    logs_caller_pid=$!

    log "$release: booting the container"
    # nspawn's own system call allow list (systemd 252) predates Landlock: without these the
    # container's kernel would look as if it had none, and the plugin sandbox could not be seen.
    timeout 600 systemd-nspawn -q -D "$root" -b --console=pipe --register=no --keep-unit \
        --system-call-filter="landlock_create_ruleset landlock_add_rule landlock_restrict_self" \
        --bind-ro="/run/netns/$proxy_ns:/run/netns/proxy-only" --capability=CAP_NET_ADMIN \
        >"$work/nspawn-$release.log" 2>&1 </dev/null || true

    kill "$logs_caller_pid" 2>/dev/null || true
    wait "$logs_caller_pid" 2>/dev/null || true
    # Verdict: what the container recorded, and what hubsim saw.
    local out="$root/root/e2e-out.txt"
    if [ ! -f "$out" ]; then
        echo "$release: the container recorded nothing"; tail -50 "$work/nspawn-$release.log"
        return 1
    fi
    cat "$out"
    expect() { grep -q "$1" "$out" || { echo "$release: MISSING: $1"; fail=1; }; }
    expect "^release $release systemd [0-9]"
    expect "^recommends-by-default yes"
    expect "^install ok"
    expect "^pulled-in-without-recommends \\[\\]$"
    expect "^tpm-without-libraries rc=[1-9][0-9]* cannot start: libtss2-esys.so.0 is not installed$"
    expect "^tpm-libraries-installed $(tpm_libs "$release")$"
    expect "^pulled-in-exact yes"
    expect "^user .*(tss)"
    expect "^config-mode 640 root:hubagent"
    expect "^plugins .*/libhubagent_simulated_sensor.so 644 root:root .*/libhubagent_sysmetrics.so 644 root:root"
    expect "^plugin-host /usr/libexec/hubagent/hubagent-plugin-host 755 root:root"
    expect "^tpm-helper /usr/libexec/hubagent/hubagent-tpm 755 root:root"
    expect "^enabled enabled"
    expect "^active-before-config inactive"
    expect "^verify clean"
    # The operator's and the plugin author's toolbox: man pages, completions, the dev package
    # (whose pkg-config version, and the C example's, is the header's ABI).
    local header=plugins/sdk/include/hubagent_plugin.h abi
    abi="$(sed -n 's/^#define HUBAGENT_PLUGIN_ABI_MAJOR \([0-9]*\)$/\1/p' "$header").$(sed -n 's/^#define HUBAGENT_PLUGIN_ABI_MINOR \([0-9]*\)$/\1/p' "$header")"
    expect "^man-hubagent ok"
    expect "^man-subcommand ok"
    expect "^man-config ok"
    expect "^man-lint clean"
    expect "^bash-completion \\[plugins\\] \\[restart\\]$"
    expect "^completions /usr/share/bash-completion/completions/hubagent /usr/share/fish/vendor_completions.d/hubagent.fish /usr/share/zsh/vendor-completions/_hubagent$"
    expect "^dev-install ok"
    expect "^dev-pkg-config $abi -I/usr/include/hubagent"
    expect "^dev-cc ok"
    expect "^dev-probe {\"abi\":\"$abi\",\"name\":\"c-counter\",\"ok\":true"
    expect "^config-check ok"
    expect "^sandbox-probe key=EACCES state=EACCES config=EACCES control=EACCES"
    grep -qxF "tpm-ek $host_ek" "$out" || { echo "$release: MISSING: the swtpm's keys as the host reads them ($host_ek)"; fail=1; }
    expect "^started .*ActiveState=active SubState=running"
    # The sandbox options of systemd >= 257 (the generator's drop-in) where systemd has them.
    local systemd_version; systemd_version="$(sed -n 's/^release .* systemd \([0-9]*\)$/\1/p' "$out")"
    if [ "${systemd_version:-0}" -ge 257 ]; then
        expect "^dropins .*/hubagent.service.d/50-sandbox-systemd257.conf"
        expect "^userns private"
        expect "^protect-control-groups strict"
        # systemd makes the cgroup namespace on the unified (v2) hierarchy only, and falls back to
        # a read-only /sys/fs/cgroup otherwise (a host booted with cgroup v1, as some CI machines).
        if grep -q "^cgroupfs cgroup2fs" "$out"; then
            expect "^cgroupns private"
        else
            log "$release: the host runs cgroup v1: ProtectControlGroups=strict cannot make a cgroup namespace here (not checked)"
        fi
    else
        expect "^dropins $"
        expect "^userns host"
    fi
    expect "^restarted .*ActiveState=active SubState=running"
    expect "^no-journal-restarted .*ActiveState=active SubState=running"
    expect "^journal-restarted .*ActiveState=active SubState=running"
    # The logs method under systemd reads the journal, so it reaches back past the restart: the
    # connection before it and the one after (the lines kept in memory hold only the second).
    # Without the systemd-journal group (an operator's drop-in), it answers from memory and says
    # why.
    logs_seen() { # N: the answer's status, source, connections logged and journal error
        python3 -c 'import json,sys
answer=json.load(sys.stdin)
payload=answer["payload"]
connects=sum("connected to the hub" in line["message"] for line in payload["lines"])
print(answer["status"], payload.get("source"), connects, payload.get("journalError", "-"))' <"$root/root/logs-answer-$1.json" 2>/dev/null \
            || echo "not an answer: $(head -c 300 "$root/root/logs-answer-$1.json" 2>&1)"
    }
    [[ "$(logs_seen 1)" =~ ^200\ journal\ ([2-9]|[1-9][0-9]+)\ -$ ]] || { echo "$release: the logs method (status, source, connections, journal error): $(logs_seen 1): expected 200 from the journal with the connections before and after the restart"; fail=1; }
    [[ "$(logs_seen 2)" =~ ^200\ memory\ 1\ journalctl: ]] || { echo "$release: the logs method without the journal group: $(logs_seen 2): expected 200 from memory (one connection) with journalctl's reason"; fail=1; }
    expect "^scope-reload ok"
    expect "^scope-reloaded .*as gw-sys-1.*ActiveState=active"
    expect "^reload ok"
    expect "^reloaded .*as gw-sys-2.*ActiveState=active"
    expect "^reprovision ok"
    expect "^reprovisioned .*as gw-sys-2.*ActiveState=active"
    expect "^killed-restarted .*NRestarts=1 ActiveState=active SubState=running"
    expect "^bad-reload refused active"
    expect "^bad-reload-journal [1-9]"
    expect "^upgrade ok $version+upgrade1"
    expect "^upgraded .*ActiveState=active SubState=running"
    expect "^upgrade-restarted yes"
    expect "^upgrade-state kept"
    expect "^upgrade-config kept"
    expect "^reinstall-broken ok"
    expect "^broken-state failed Result=exit-code NRestarts=0 ExecMainStatus=78"
    expect "^broken-status [1-9][0-9]* lines name the file and the key"
    expect "^fixed .*ActiveState=active SubState=running"
    expect "^proxy-direct blocked"
    expect "^proxy-route open"
    expect "^proxy-dropin .*/hubagent.service.d/proxy.conf"
    expect "^proxy-provisioned .*as gw-sys-2.*ActiveState=active"
    expect "^proxy-published [1-9]"
    # Both connections were tunnels of the proxy (its log names each CONNECT).
    for tunnel in "localhost:$mqtt" "127.0.0.2:$mqtt"; do
        grep -q "CONNECT $tunnel " "$sim/tinyproxy.log" || { echo "$release: the proxy carried no tunnel to $tunnel"; fail=1; }
    done
    expect "^journal-fields [1-9][0-9]* connects of gw-sys-2"
    expect "^issued-first generation=1"
    expect "^issued-renewed generation=2 files=gen-2 current=gen-2"
    expect "^after-remove state=kept config=kept"
    expect "^after-purge state=gone config=gone"
    expect "^DONE"
    expect "^security Overall exposure level for hubagent.service: [0-9.]* \\(PERFECT\\|SAFE\\|OK\\)"
    expect "^security-reprovision Overall exposure level for hubagent-reprovision.service: [0-9.]* \\(PERFECT\\|SAFE\\|OK\\)"
    # The sandbox's score (docs/packaging.md reports it): what is still open, and the total.
    grep -E '^✗' "$root/root/e2e-security.txt" || true
    log "$release: systemd-analyze security: $(grep -o 'Overall exposure level.*' "$root/root/e2e-security.txt")"
    log "$release: systemd-analyze security: $(grep -o 'Overall exposure level for hubagent-reprovision.*' "$out")"
    local registrations messages metrics metrics_all metrics_full
    registrations="$(api GET /sim/registrations)"
    # The ID scope of each successful registration, in order.
    scopes() { python3 -c "import json,sys; print(' '.join(r['idScope'] for r in json.load(sys.stdin) if r['registrationId']=='$1' and r['outcome']=='assigned'))" <<<"$registrations"; }
    [ "$(scopes gw-sys-1)" = "0ne00000001 0ne000000B2" ] || { echo "$release: gw-sys-1 registered under [$(scopes gw-sys-1)]: expected the first scope once (the restart uses the cache), then the new one after the reload"; fail=1; }
    [ "$(scopes gw-sys-3)" = "0ne000000B2 0ne000000B2" ] || { echo "$release: gw-sys-3 registered under [$(scopes gw-sys-3)]: expected the first issuance and the renewal"; fail=1; }
    [ "$(scopes gw-sys-2)" = "0ne000000B2 0ne000000B2 0ne000000B2" ] || { echo "$release: gw-sys-2 registered under [$(scopes gw-sys-2)]: expected reload, reprovision and the registration through the proxy in the new scope"; fail=1; }
    messages="$(api GET /sim/telemetry/gw-sys-1 | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')"
    [ "$messages" -gt 0 ] || { echo "$release: no telemetry from the installed agent"; fail=1; }
    # The shipped library plugin's readings, read from /proc and statvfs inside the unit's
    # sandbox: a sandbox that hides /proc's system files would leave them empty.
    metrics="$(api GET /sim/telemetry/gw-sys-1 | python3 -c 'import json,sys
bodies=[json.loads(m["body"]) for m in json.load(sys.stdin) if m["properties"].get("source")=="sysmetrics" and m["body"]]
full=[b for b in bodies if "memory" in b and "uptimeSeconds" in b and "load" in b and b.get("disks",{}).get("/")]
print(len(bodies), len(full))')"
    read -r metrics_all metrics_full <<<"$metrics"
    [ "$metrics_full" -gt 0 ] || { echo "$release: sysmetrics plugin: $metrics_all messages, none with memory, load, uptime and disk readings"; fail=1; }
    log "$release: hubsim: gw-sys-1 registered $(scopes gw-sys-1 | wc -w)x, gw-sys-2 $(scopes gw-sys-2 | wc -w)x, $messages messages from gw-sys-1 ($metrics_all from the sysmetrics plugin)"
    if [ "$fail" -ne 0 ]; then
        echo "--- $release: agent journal"; tail -40 "$root/root/e2e-journal.txt" 2>/dev/null
        echo "--- $release: dpkg"; tail -20 "$root/root/e2e-dpkg.log" 2>/dev/null
        echo "--- $release: systemd-analyze verify"; cat "$root/root/e2e-verify.txt" 2>/dev/null
        echo "--- $release: systemctl status with the broken configuration"; cat "$root/root/e2e-status.txt" 2>/dev/null
    fi
    kill "$hubsim_pid" "$proxy_pid" 2>/dev/null || true
    wait "$hubsim_pid" "$proxy_pid" 2>/dev/null || true
    hubsim_pid="" proxy_pid=""
    rm -rf "$root" "$sim"
    root="" sim=""
    if [ "$fail" -ne 0 ]; then
        log "$release: FAILED after $((SECONDS - started))s"
        return 1
    fi
    log "$release: PASSED in $((SECONDS - started))s"
}

failed=()
for release in "${releases[@]}"; do
    run_release "$release" || failed+=("$release")
done
if [ "${#failed[@]}" -gt 0 ]; then
    log "FAILED on ${failed[*]} (of ${releases[*]})"
    exit 1
fi
log "PASSED on ${releases[*]} in ${SECONDS}s"
