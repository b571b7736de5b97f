#!/usr/bin/env bash
# System test: the real .deb in a real systemd. Builds the package, boots a minimal Debian 12 root
# with systemd-nspawn (sharing the host's network, so it reaches a hubsim started here on
# loopback), installs the package and drives it the way an operator does, then checks in hubsim
# what the agent did. Needs root (nspawn); prints why and exits 0 without it.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "$(id -u)" -ne 0 ]; then
    echo "deb-nspawn: SKIPPED (needs root for systemd-nspawn)"
    exit 77 # "not run", as automake's test drivers count it: tests/run-all.sh reports it as such
fi
work="$PWD/target/system"
mkdir -p "$work"
log() { echo "[deb-nspawn $(date +%T)] $*"; }

# 1. The package.
log "building the .deb"
deb="$(bash packaging/build-deb.sh | tail -1)"
[ -f "$deb" ] || { echo "no .deb built"; exit 1; }
# The same build with a higher version: what an upgrade installs. (cargo deb clears
# target/debian, so the first package is kept aside.)
cp "$deb" "$work/hubagent.deb"
deb="$work/hubagent.deb"
version="$(dpkg-deb -f "$deb" Version)"
deb2="$(bash packaging/build-deb.sh --deb-version "$version+upgrade1" | tail -1)"
[ "$(dpkg-deb -f "$deb2" Version)" = "$version+upgrade1" ] || { echo "no upgrade .deb built"; exit 1; }
# Lintian-clean: errors and warnings fail; deliberate exceptions are overrides with their reason
# (packaging/debian/hubagent.lintian-overrides).
log "lintian $deb"
lint_rc=0
lint="$(lintian --fail-on error,warning "$deb" 2>&1)" || lint_rc=$?
grep -v 'running with root privileges' <<<"$lint" || true
[ "$lint_rc" -eq 0 ] || { echo "lintian: the package has errors or warnings (above), exit $lint_rc"; exit 1; }

# 2. A minimal Debian 12 with systemd, cached as a tarball (the runtime libraries of the TPM
#    back end are included so installing the .deb needs no network inside).
rootfs_tar="$work/rootfs.tar"
if [ ! -s "$rootfs_tar" ]; then
    log "creating the Debian 12 root (cached in $rootfs_tar)"
    # Written aside and renamed, so an interrupted run leaves no half tarball to be reused.
    mmdebstrap --variant=minbase \
        --include=systemd-sysv,dbus,ca-certificates,libtss2-esys-3.0.2-0,libtss2-tctildr0,libtss2-mu0,libtss2-sys1 \
        bookworm "$work/rootfs-new.tar"
    mv "$work/rootfs-new.tar" "$rootfs_tar"
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
# Two ID scopes: the test moves the gateway from the first to the second (same enrollments).
target/debug/hubsim serve --state-dir "$sim" --mqtt-port "$mqtt" --https-port "$https" \
    --id-scope 0ne00000001 --id-scope 0ne000000B2 >"$sim/hubsim.log" 2>&1 &
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
cp "$deb2" "$root/root/hubagent-upgrade.deb"
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
# When the agent last registered with DPS (hubagent status), to see a new registration happen.
provisioned_at() { hubagent status --json 2>/dev/null | tr -d '\n ' | grep -o '"provisioned_at":"[^"]*"'; }
wait_registered_since() { # provisioned_at before; then connected again
    for i in \$(seq 120); do
        now=\$(provisioned_at)
        [ -n "\$now" ] && [ "\$now" != "\$1" ] && show | grep -q "connected to" && return 0
        sleep 0.5
    done
    return 1
}
set -x
export DEBIAN_FRONTEND=noninteractive
# apt, as README's operator does: it resolves the Depends from what is installed (the root has them).
apt-get install -y /root/hubagent.deb </dev/null >>/root/e2e-dpkg.log 2>&1 && rec "install ok"
rec "user \$(id hubagent)"
rec "config-mode \$(stat -c '%a %U:%G' /etc/hubagent/config.toml)"
rec "plugins \$(stat -c '%n %a %U:%G' /usr/lib/hubagent/plugins/*.so | tr '\n' ' ')"
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

# A shipped library plugin, in its own supervised process under the unit's sandbox.
[[plugin]]
name = "sysmetrics"
kind = "library"
path = "/usr/lib/hubagent/plugins/libhubagent_sysmetrics.so"
[plugin.settings]
interval = "1s"
CONF
rec "config-check \$(hubagent config check >/dev/null 2>&1 && echo ok || echo failed)"
systemctl start hubagent
wait_status "connected to" && rec "started \$(show)" || rec "start-failed \$(show)"
rec "status-json \$(hubagent status --json | tr -d '\n ')"
rec "plugins-list \$(hubagent plugins list | tr '\n' ' ')"
systemd-analyze security --no-pager hubagent >/root/e2e-security.txt 2>&1
rec "security \$(grep -o 'Overall exposure level for hubagent.service: .*' /root/e2e-security.txt)"
rec "security-reprovision \$(systemd-analyze security --no-pager hubagent-reprovision 2>&1 | grep -o 'Overall exposure level.*')"
systemctl restart hubagent
wait_status "connected to" && rec "restarted \$(show)" || rec "restart-failed \$(show)"
# The gateway moves to another DPS instance: only the ID scope changes.
before=\$(provisioned_at)
sed -i 's/^id_scope = .*/id_scope = "0ne000000B2"/' /etc/hubagent/config.toml
systemctl reload hubagent && rec "scope-reload ok"
wait_registered_since "\$before" && rec "scope-reloaded \$(show)" || rec "scope-reload-failed \$(show)"
# ...and then to another enrollment.
before=\$(provisioned_at)
install -m 0600 -o hubagent -g hubagent /root/key2 /etc/hubagent/device.key
sed -i 's/gw-sys-1/gw-sys-2/' /etc/hubagent/config.toml
systemctl reload hubagent && rec "reload ok"
wait_registered_since "\$before" && wait_status "as gw-sys-2" && rec "reloaded \$(show)" || rec "reload-failed \$(show)"
before=\$(provisioned_at)
systemctl start hubagent-reprovision && rec "reprovision ok"
wait_registered_since "\$before" && rec "reprovisioned \$(show)" || rec "reprovision-failed \$(show)"
pid=\$(systemctl show -p MainPID --value hubagent)
kill -9 \$pid
for i in \$(seq 60); do new=\$(systemctl show -p MainPID --value hubagent); [ "\$new" != "\$pid" ] && [ "\$new" != 0 ] && break; sleep 0.5; done
wait_status "connected to" && rec "killed-restarted \$(show)" || rec "kill-restart-failed \$(show)"
# A reload with a broken file is refused with the reason; the agent keeps running on the old one.
cp /etc/hubagent/config.toml /root/config.good
sed -i 's/^port = .*/port = "eighty"/' /etc/hubagent/config.toml
systemctl reload hubagent >/root/e2e-reload.txt 2>&1 && rec "bad-reload accepted" || rec "bad-reload refused \$(systemctl is-active hubagent)"
rec "bad-reload-journal \$(journalctl -u hubagent --no-pager -o cat | grep -c 'config.toml:.*hub.port')"
install -m 0640 -g hubagent /root/config.good /etc/hubagent/config.toml
# Upgrade: the state (no new DPS registration), the edited conffile (no prompt: stdin is
# /dev/null) and the running service are kept; the agent is restarted into the new version.
before=\$(provisioned_at)
config_sum=\$(md5sum </etc/hubagent/config.toml)
pid=\$(systemctl show -p MainPID --value hubagent)
apt-get install -y /root/hubagent-upgrade.deb </dev/null >>/root/e2e-dpkg.log 2>&1 && rec "upgrade ok \$(dpkg-query -W -f '\${Version}' hubagent)"
wait_status "connected to" && rec "upgraded \$(show)" || rec "upgrade-failed \$(show)"
rec "upgrade-restarted \$([ "\$(systemctl show -p MainPID --value hubagent)" != "\$pid" ] && echo yes || echo no)"
rec "upgrade-state \$([ "\$(provisioned_at)" = "\$before" ] && echo kept || echo "changed: \$before -> \$(provisioned_at)")"
rec "upgrade-config \$([ "\$(md5sum </etc/hubagent/config.toml)" = "\$config_sum" ] && echo kept || echo changed)"
# A configuration broken before an upgrade: the restart fails, and systemctl status says why.
sed -i 's/^port = .*/port = "eighty"/' /etc/hubagent/config.toml
apt-get install -y --reinstall /root/hubagent-upgrade.deb </dev/null >>/root/e2e-dpkg.log 2>&1 && rec "reinstall-broken ok"
for i in \$(seq 60); do systemctl is-failed -q hubagent && break; sleep 0.5; done
rec "broken-state \$(systemctl is-failed hubagent) \$(systemctl show -p Result,ExecMainStatus,NRestarts hubagent | tr '\n' ' ')"
systemctl status hubagent --no-pager -l >/root/e2e-status.txt 2>&1
rec "broken-status \$(grep -c 'config.toml:.*port' /root/e2e-status.txt) lines name the file and the key"
install -m 0640 -g hubagent /root/config.good /etc/hubagent/config.toml
systemctl reset-failed hubagent
systemctl start hubagent
wait_status "connected to" && rec "fixed \$(show)" || rec "fix-failed \$(show)"
# Structured fields: the journal can be filtered by the device and hub the agent logged.
rec "journal-fields \$(journalctl -u hubagent --no-pager -o cat DEVICE=gw-sys-2 HUB=localhost | grep -c 'connected to the hub') connects of gw-sys-2"
journalctl -u hubagent --no-pager -o cat >/root/e2e-journal.txt 2>&1
apt-get remove -y hubagent </dev/null >>/root/e2e-dpkg.log 2>&1 && rec "remove ok"
rec "after-remove state=\$(test -d /var/lib/hubagent && echo kept || echo gone) config=\$(test -f /etc/hubagent/config.toml && echo kept || echo gone)"
apt-get purge -y hubagent </dev/null >>/root/e2e-dpkg.log 2>&1 && rec "purge ok"
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
expect "^plugins .*/libhubagent_simulated_sensor.so 644 root:root .*/libhubagent_sysmetrics.so 644 root:root"
expect "^enabled enabled"
expect "^active-before-config inactive"
expect "^config-check ok"
expect "^started .*ActiveState=active SubState=running"
expect "^restarted .*ActiveState=active SubState=running"
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
expect "^journal-fields [1-9][0-9]* connects of gw-sys-2"
expect "^after-remove state=kept config=kept"
expect "^after-purge state=gone config=gone"
expect "^DONE"
expect "^security Overall exposure level for hubagent.service: [0-9.]* \\(PERFECT\\|SAFE\\|OK\\)"
expect "^security-reprovision Overall exposure level for hubagent-reprovision.service: [0-9.]* \\(PERFECT\\|SAFE\\|OK\\)"
# The sandbox's score (docs/packaging.md reports it): what is still open, and the total.
grep -E '^✗' "$root/root/e2e-security.txt" || true
log "systemd-analyze security: $(grep -o 'Overall exposure level.*' "$root/root/e2e-security.txt")"
log "systemd-analyze security: $(grep -o 'Overall exposure level for hubagent-reprovision.*' "$out")"
registrations="$(api GET /sim/registrations)"
# The ID scope of each successful registration, in order.
scopes() { python3 -c "import json,sys; print(' '.join(r['idScope'] for r in json.load(sys.stdin) if r['registrationId']=='$1' and r['outcome']=='assigned'))" <<<"$registrations"; }
count() { scopes "$1" | wc -w; }
[ "$(scopes gw-sys-1)" = "0ne00000001 0ne000000B2" ] || { echo "gw-sys-1 registered under [$(scopes gw-sys-1)]: expected the first scope once (the restart uses the cache), then the new one after the reload"; fail=1; }
[ "$(scopes gw-sys-2)" = "0ne000000B2 0ne000000B2" ] || { echo "gw-sys-2 registered under [$(scopes gw-sys-2)]: expected reload + reprovision in the new scope"; fail=1; }
messages="$(api GET /sim/telemetry/gw-sys-1 | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')"
[ "$messages" -gt 0 ] || { echo "no telemetry from the installed agent"; fail=1; }
# The shipped library plugin's readings, read from /proc and statvfs inside the unit's sandbox:
# a sandbox that hides /proc's system files would leave them empty.
metrics="$(api GET /sim/telemetry/gw-sys-1 | python3 -c 'import json,sys
bodies=[json.loads(m["body"]) for m in json.load(sys.stdin) if m["properties"].get("source")=="sysmetrics" and m["body"]]
full=[b for b in bodies if "memory" in b and "uptimeSeconds" in b and "load" in b and b.get("disks",{}).get("/")]
print(len(bodies), len(full))')"
read -r metrics_all metrics_full <<<"$metrics"
[ "$metrics_full" -gt 0 ] || { echo "sysmetrics plugin: $metrics_all messages, none with memory, load, uptime and disk readings"; fail=1; }
log "hubsim: gw-sys-1 registered $(count gw-sys-1)x, gw-sys-2 $(count gw-sys-2)x, $messages messages from gw-sys-1 ($metrics_all from the sysmetrics plugin)"
if [ "$fail" -ne 0 ]; then
    echo "--- agent journal"; cat "$root/root/e2e-journal.txt" 2>/dev/null | tail -40
    echo "--- dpkg"; tail -20 "$root/root/e2e-dpkg.log" 2>/dev/null
    echo "--- systemctl status with the broken configuration"; cat "$root/root/e2e-status.txt" 2>/dev/null
    exit 1
fi
log "PASSED"
