#!/usr/bin/env bash
# System test: the real .deb in a real systemd. Builds the package, boots a minimal Debian 12 root
# with systemd-nspawn (sharing the host's network, so it reaches a hubsim started here on
# loopback), installs the package and drives it the way an operator does, then checks in hubsim
# what the agent did. Needs root (nspawn); prints why and exits 0 without it.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "$(id -u)" -ne 0 ]; then
    echo "deb-nspawn: SKIPPED (needs root for systemd-nspawn)"
    exit 0
fi
work="$PWD/target/system"
mkdir -p "$work"
log() { echo "[deb-nspawn $(date +%T)] $*"; }

# 1. The package.
log "building the .deb"
deb="$(bash packaging/build-deb.sh | tail -1)"
[ -f "$deb" ] || { echo "no .deb built"; exit 1; }

# 2. A minimal Debian 12 with systemd, cached as a tarball (the runtime libraries of the TPM
#    back end are included so installing the .deb needs no network inside).
rootfs_tar="$work/rootfs.tar"
if [ ! -s "$rootfs_tar" ]; then
    log "creating the Debian 12 root (cached in $rootfs_tar)"
    mmdebstrap --variant=minbase \
        --include=systemd-sysv,dbus,ca-certificates,libtss2-esys-3.0.2-0,libtss2-tctildr0,libtss2-mu0,libtss2-sys1 \
        bookworm "$rootfs_tar"
fi
root="$(mktemp -d "$work/root.XXXX")"
sim="$(mktemp -d "$work/sim.XXXX")"
cleanup() {
    [ -n "${hubsim_pid:-}" ] && kill "$hubsim_pid" 2>/dev/null || true
    rm -rf "$root" "$sim"
}
trap cleanup EXIT
tar -xf "$rootfs_tar" -C "$root"

# 3. hubsim on the host, on free ports, with two enrollments.
read -r mqtt https < <(python3 -c 'import socket
s=[socket.socket() for _ in range(2)]
[x.bind(("127.0.0.1",0)) for x in s]
print(*[x.getsockname()[1] for x in s])')
cargo build -q -p hubsim
target/debug/hubsim serve --state-dir "$sim" --mqtt-port "$mqtt" --https-port "$https" >"$sim/hubsim.log" 2>&1 &
hubsim_pid=$!
for _ in $(seq 100); do [ -f "$sim/endpoints.json" ] && break; sleep 0.1; done
api() { # METHOD PATH [BODY]
    local token; token="$(target/debug/hubsim token --state-dir "$sim")"
    curl -sS --fail-with-body --cacert "$sim/ca.pem" -H "Authorization: $token" \
        -H 'Content-Type: application/json' -X "$1" "https://localhost:$https$2" ${3:+-d "$3"}
}
key_of() { python3 -c 'import json,sys; print(json.load(sys.stdin)["attestation"]["symmetricKey"]["primaryKey"])'; }
key1="$(api PUT /enrollments/gw-sys-1 '{"registrationId":"gw-sys-1","attestation":{"type":"symmetricKey"}}' | key_of)"
key2="$(api PUT /enrollments/gw-sys-2 '{"registrationId":"gw-sys-2","attestation":{"type":"symmetricKey"}}' | key_of)"

# 4. What the operator does, inside the container, as a oneshot unit that records each result.
cp "$deb" "$root/root/hubagent.deb"
cp "$sim/ca.pem" "$root/root/hubsim-ca.pem"
printf '%s\n' "$key1" >"$root/root/key1"
printf '%s\n' "$key2" >"$root/root/key2"
cat >"$root/root/e2e.sh" <<EOF
#!/bin/bash
out=/root/e2e-out.txt
rec() { echo "\$*" >>\$out; }
show() { systemctl show -p ActiveState,SubState,StatusText,NRestarts,MainPID hubagent | tr '\n' ' '; }
wait_status() { # text to wait for in StatusText
    for i in \$(seq 120); do show | grep -q "\$1" && return 0; sleep 0.5; done; return 1
}
set -x
dpkg -i /root/hubagent.deb >>/root/e2e-dpkg.log 2>&1 && rec "install ok"
rec "user \$(id hubagent)"
rec "config-mode \$(stat -c '%a %U:%G' /etc/hubagent/config.toml)"
rec "enabled \$(systemctl is-enabled hubagent)"
rec "active-before-config \$(systemctl is-active hubagent)"
install -m 0644 /root/hubsim-ca.pem /etc/hubagent/hubsim-ca.pem
install -m 0600 -o hubagent -g hubagent /root/key1 /etc/hubagent/device.key
cat >/etc/hubagent/config.toml <<CONF
[provisioning]
source = "dps"
global_endpoint = "localhost"
id_scope = "0ne00000001"
registration_id = "gw-sys-1"

[provisioning.attestation]
method = "symmetric_key"
key = { file = "/etc/hubagent/device.key" }

[hub]
port = $mqtt
trust_bundle = "/etc/hubagent/hubsim-ca.pem"

[[plugin]]
name = "sensor"
kind = "builtin"
builtin = "simulated-sensor"
interval = "200ms"
CONF
rec "config-check \$(hubagent config check >/dev/null 2>&1 && echo ok || echo failed)"
systemctl start hubagent
wait_status "connected to" && rec "started \$(show)" || rec "start-failed \$(show)"
rec "status-json \$(hubagent status --json | tr -d '\n ')"
systemctl restart hubagent
wait_status "connected to" && rec "restarted \$(show)" || rec "restart-failed \$(show)"
install -m 0600 -o hubagent -g hubagent /root/key2 /etc/hubagent/device.key
sed -i 's/gw-sys-1/gw-sys-2/' /etc/hubagent/config.toml
systemctl reload hubagent && rec "reload ok"
wait_status "as gw-sys-2" && rec "reloaded \$(show)" || rec "reload-failed \$(show)"
systemctl start hubagent-reprovision && rec "reprovision ok"
sleep 3
wait_status "as gw-sys-2" && rec "reprovisioned \$(show)"
pid=\$(systemctl show -p MainPID --value hubagent)
kill -9 \$pid
for i in \$(seq 60); do new=\$(systemctl show -p MainPID --value hubagent); [ "\$new" != "\$pid" ] && [ "\$new" != 0 ] && break; sleep 0.5; done
wait_status "connected to" && rec "killed-restarted \$(show)" || rec "kill-restart-failed \$(show)"
journalctl -u hubagent --no-pager -o cat >/root/e2e-journal.txt 2>&1
dpkg -r hubagent >>/root/e2e-dpkg.log 2>&1 && rec "remove ok"
rec "after-remove state=\$(test -d /var/lib/hubagent && echo kept || echo gone) config=\$(test -f /etc/hubagent/config.toml && echo kept || echo gone)"
dpkg -P hubagent >>/root/e2e-dpkg.log 2>&1 && rec "purge ok"
rec "after-purge state=\$(test -d /var/lib/hubagent && echo kept || echo gone) config=\$(test -d /etc/hubagent && echo kept || echo gone)"
rec "DONE"
systemctl poweroff
EOF
chmod +x "$root/root/e2e.sh"
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

log "booting the container"
timeout 600 systemd-nspawn -q -D "$root" -b --console=pipe --register=no --keep-unit >"$work/nspawn.log" 2>&1 </dev/null || true

# 5. Verdict: what the container recorded, and what hubsim saw.
out="$root/root/e2e-out.txt"
[ -f "$out" ] || { echo "the container recorded nothing"; tail -50 "$work/nspawn.log"; exit 1; }
cat "$out"
fail=0
expect() { grep -q "$1" "$out" || { echo "MISSING: $1"; fail=1; }; }
expect "^install ok"
expect "^user .*(tss)"
expect "^config-mode 640 root:hubagent"
expect "^enabled enabled"
expect "^active-before-config inactive"
expect "^config-check ok"
expect "^started .*ActiveState=active SubState=running"
expect "^restarted .*ActiveState=active SubState=running"
expect "^reload ok"
expect "^reloaded .*as gw-sys-2.*ActiveState=active"
expect "^reprovision ok"
expect "^killed-restarted .*NRestarts=1 ActiveState=active SubState=running"
expect "^after-remove state=kept config=kept"
expect "^after-purge state=gone config=gone"
expect "^DONE"
registrations="$(api GET /sim/registrations)"
count() { python3 -c "import json,sys; print(sum(1 for r in json.load(sys.stdin) if r['registrationId']=='$1' and r['outcome']=='assigned'))" <<<"$registrations"; }
[ "$(count gw-sys-1)" = 1 ] || { echo "gw-sys-1 registered $(count gw-sys-1) times: the restart must use the cache"; fail=1; }
[ "$(count gw-sys-2)" = 2 ] || { echo "gw-sys-2 registered $(count gw-sys-2) times: expected reload + reprovision"; fail=1; }
messages="$(api GET /sim/telemetry/gw-sys-1 | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')"
[ "$messages" -gt 0 ] || { echo "no telemetry from the installed agent"; fail=1; }
log "hubsim: gw-sys-1 registered $(count gw-sys-1)x, gw-sys-2 $(count gw-sys-2)x, $messages messages from gw-sys-1"
if [ "$fail" -ne 0 ]; then
    echo "--- agent journal"; cat "$root/root/e2e-journal.txt" 2>/dev/null | tail -40
    echo "--- dpkg"; tail -20 "$root/root/e2e-dpkg.log" 2>/dev/null
    exit 1
fi
log "PASSED"
