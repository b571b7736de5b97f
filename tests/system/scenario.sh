#!/bin/bash
# The system test's operator, inside the booted container (tests/system/deb-nspawn.sh copies it to
# /root and runs it as a oneshot unit): installs the package and drives it as README's "Install
# on a gateway" does, recording each result as a line of /root/e2e-out.txt, which deb-nspawn.sh
# checks. Not `set -e`: every step records its result, a failed one included.
# /root/e2e.env sets MQTT_PORT (the hubsim on the host), SWTPM_PORT (a swtpm on the host) and
# PROXY (an HTTP proxy on the host, the only way out of the network namespace at
# /run/netns/proxy-only).
# shellcheck disable=SC2015 # `check && rec ok || rec failed`: rec cannot fail
. /root/e2e.env
out=/root/e2e-out.txt
rec() { echo "$*" >>$out; }
show() { systemctl show -p ActiveState,SubState,StatusText,NRestarts,MainPID hubagent | tr '\n' ' '; }
wait_status() { # text to wait for in StatusText
    for _ in $(seq 120); do show | grep -q "$1" && return 0; sleep 0.5; done; return 1
}
# When the agent last registered with DPS (hubagent status), to see a new registration happen.
provisioned_at() { hubagent status --json 2>/dev/null | tr -d '\n ' | grep -o '"provisioned_at":"[^"]*"'; }
wait_registered_since() { # provisioned_at before; then connected again
    for _ in $(seq 120); do
        now=$(provisioned_at)
        [ -n "$now" ] && [ "$now" != "$1" ] && show | grep -q "connected to" && return 0
        sleep 0.5
    done
    return 1
}
packages() { dpkg-query -W -f '${db:Status-Abbrev} ${Package}\n' | awk '$1 == "ii" { print $2 }' | sort; }
set -x
export DEBIAN_FRONTEND=noninteractive
rec "release $(. /etc/os-release && echo "$VERSION_CODENAME") systemd $(systemctl --version | sed -n '1s/^systemd \([0-9]*\).*/\1/p')"
# apt, as README's operator does, on a fresh minimal system. Only what the cached root holds in
# apt's cache can be installed (deb-nspawn.sh downloaded the TPM libraries' closure there): every
# download goes to a proxy that refuses connections. (Not --no-download: apt refuses it with a
# .deb file to install, "Pathname to install is not absolute".) So a dependency the release
# cannot satisfy from the TPM libraries fails here, and the packages apt pulls in must be
# exactly those.
apt_offline=(-o Acquire::http::Proxy=http://127.0.0.1:9 -o Acquire::https::Proxy=http://127.0.0.1:9)
expected=$(find /var/cache/apt/archives -name '*.deb' -printf '%f\n' | sed 's/_.*//' | sort)
before=$(packages)
# The TPM libraries are the package's Recommends (docs/packaging.md, "Dependencies"): apt would
# install them with it (shown, not done: -s)...
apt-get install -s "${apt_offline[@]}" /root/hubagent.deb </dev/null >/root/e2e-simulated.txt 2>&1
would=$(sed -n 's/^Inst \([^ ]*\) .*/\1/p' /root/e2e-simulated.txt | grep -vx hubagent | sort)
[ "$would" = "$expected" ] && rec "recommends-by-default yes" || rec "recommends-by-default no: $(tr '\n' ' ' <<<"$would")"
# ...and an operator without a TPM leaves them out.
if ! apt-get install -y --no-install-recommends "${apt_offline[@]}" /root/hubagent.deb </dev/null >>/root/e2e-dpkg.log 2>&1; then
    # Nothing below can work without the package: stop now rather than wait out every step.
    rec "install failed: $(grep -A3 'unmet dependencies' /root/e2e-dpkg.log | tr -s ' \n' ' ')"
    systemctl poweroff
    exit 1
fi
rec "install ok"
rec "install-size $(grep -o 'After this operation, .* will be used' /root/e2e-dpkg.log | head -1)"
rec "pulled-in-without-recommends [$(comm -13 <(echo "$before") <(packages) | grep -vx hubagent | tr '\n' ' ')]"
# A TPM command there (the shipped configuration is incomplete until below: none is read, the TPM
# is named on the command line): the helper cannot start, and the error says which library is
# missing and what to install on this release; the operator runs that.
tpm_error=$(hubagent -c /nonexistent/hubagent.toml tpm show-ek --tcti "swtpm:host=127.0.0.1,port=$SWTPM_PORT" 2>&1 </dev/null)
rec "tpm-without-libraries rc=$? $(grep -o 'cannot start: [^ ]* is not installed' <<<"$tpm_error")"
version_id=$(. /etc/os-release && echo "$VERSION_ID")
fix=$(grep -o "\`apt install [^\`]*\` (Debian $version_id)" <<<"$tpm_error" | sed 's/^`apt install \([^`]*\)`.*/\1/')
# shellcheck disable=SC2086 # the package names are words
[ -n "$fix" ] && apt-get install -y "${apt_offline[@]}" $fix </dev/null >>/root/e2e-dpkg.log 2>&1 \
    && rec "tpm-libraries-installed $fix" || rec "tpm-libraries-not-installed: $(tr '\n' ' ' <<<"$tpm_error")"
pulled=$(comm -13 <(echo "$before") <(packages) | grep -vx hubagent)
rec "pulled-in $(tr '\n' ' ' <<<"$pulled")"
[ "$pulled" = "$expected" ] && rec "pulled-in-exact yes" || rec "pulled-in-exact no: expected $(tr '\n' ' ' <<<"$expected")"
rec "user $(id hubagent)"
rec "config-mode $(stat -c '%a %U:%G' /etc/hubagent/config.toml)"
rec "plugins $(stat -c '%n %a %U:%G' /usr/lib/hubagent/plugins/*.so | tr '\n' ' ')"
# The executable the library plugins run in (the sysmetrics plugin below runs in it).
rec "plugin-host $(stat -c '%n %a %U:%G' /usr/libexec/hubagent/hubagent-plugin-host)"
# The executable every TPM operation runs in (`hubagent tpm show-ek` below runs through it).
rec "tpm-helper $(stat -c '%n %a %U:%G' /usr/libexec/hubagent/hubagent-tpm)"
rec "enabled $(systemctl is-enabled hubagent)"
rec "active-before-config $(systemctl is-active hubagent)"
# The units as this release's systemd reads them: no warning, no unknown option.
systemd-analyze verify hubagent.service hubagent-reprovision.service >/root/e2e-verify.txt 2>&1 \
    && [ ! -s /root/e2e-verify.txt ] && rec "verify clean" || rec "verify not clean: $(tr '\n' ' ' </root/e2e-verify.txt)"
rec "dropins $(systemctl show -p DropInPaths --value hubagent)"
# The manual pages as man shows them, and what the groff behind it says about them (lintian checks
# the same, at the same width; here with this release's man-db and groff).
man hubagent 2>/root/e2e-man.txt | grep -q 'EXIT STATUS' && man hubagent | grep -q 'hubagent-plugins(1)' \
    && rec "man-hubagent ok" || rec "man-hubagent failed: $(tr '\n' ' ' </root/e2e-man.txt)"
man hubagent-status 2>>/root/e2e-man.txt | grep -q -- '--json' && rec "man-subcommand ok" || rec "man-subcommand failed"
man 5 hubagent.toml 2>>/root/e2e-man.txt | grep -q 'metrics_interval' && man hubagent.toml | grep -q '^NAME' \
    && rec "man-config ok" || rec "man-config failed: $(tr '\n' ' ' </root/e2e-man.txt)"
lint=$(for page in /usr/share/man/man1/hubagent*.1.gz /usr/share/man/man5/hubagent.toml.5.gz; do
    LC_ALL=C.UTF-8 MANWIDTH=120 man --warnings -E UTF-8 -l -Tutf8 -Z "$page" 2>&1 >/dev/null; done)
[ -z "$lint" ] && rec "man-lint clean" || rec "man-lint $(tr '\n' ' ' <<<"$lint")"
# bash's completion as bash-completion loads it (on demand, from its directory): what it offers
# for "hubagent pl" (plugins, not the internal plugin-host) and for "hubagent plugins r".
complete_words() { # words...: prints the completions of the last one
    # (_comp_load: bash-completion >= 2.12, Debian 13; __load_completion before it.)
    bash -c '. /usr/share/bash-completion/bash_completion && { _comp_load hubagent 2>/dev/null || __load_completion hubagent; } || exit 1
COMP_WORDS=("$@") COMP_CWORD=$(($# - 1)) COMP_LINE="$*" COMP_POINT=${#COMP_LINE}
"$(complete -p hubagent | sed "s/.*-F \([^ ]*\) .*/\1/")" hubagent "${COMP_WORDS[-1]}" "${COMP_WORDS[-2]}"
printf "%s\n" "${COMPREPLY[@]}"' complete "$@" 2>&1 | sort | tr '\n' ' ' | sed 's/ $//'
}
rec "bash-completion [$(complete_words hubagent pl)] [$(complete_words hubagent plugins r)]"
rec "completions $(ls /usr/share/bash-completion/completions/hubagent /usr/share/fish/vendor_completions.d/hubagent.fish /usr/share/zsh/vendor-completions/_hubagent | tr '\n' ' ' | sed 's/ $//')"
# A plugin author: the dev package, the C example built with pkg-config as its header says, and
# the library it makes loaded by the installed agent (the probe `config check` runs).
apt-get install -y "${apt_offline[@]}" /root/hubagent-dev.deb </dev/null >>/root/e2e-dpkg.log 2>&1 && rec "dev-install ok"
rec "dev-pkg-config $(pkg-config --modversion hubagent-plugin) $(pkg-config --cflags hubagent-plugin)"
mkdir -p /root/c-counter /usr/local/lib/hubagent-test
cp /usr/share/doc/hubagent-dev/examples/c-counter/* /root/c-counter/
# shellcheck disable=SC2046 # pkg-config's flags are words
cc $(pkg-config --cflags hubagent-plugin) -shared -fPIC -O2 -Wall -Wextra -Werror -pthread \
    /root/c-counter/counter.c -o /usr/local/lib/hubagent-test/libc_counter.so >/root/e2e-cc.txt 2>&1 \
    && rec "dev-cc ok" || rec "dev-cc failed: $(tr '\n' ' ' </root/e2e-cc.txt)"
chmod 0644 /usr/local/lib/hubagent-test/libc_counter.so
rec "dev-probe $(hubagent plugin-host --name counter --path /usr/local/lib/hubagent-test/libc_counter.so --probe 2>&1 | tr '\n' ' ')"
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
port = $MQTT_PORT
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

# The plugin sandbox, seen from inside an exec plugin: what the kernel answers when it reads the
# device key, the cached assignment and the configuration, and when it asks the agent for its
# status over the control socket (docs/security.md).
[[plugin]]
name = "probe"
kind = "exec"
command = ["/bin/sh", "-c", '''
try() { if out=\$("\$@" 2>&1 >/dev/null); then echo ok; else case \$out in *"ermission denied"*) echo EACCES;; *) echo "other:\$out" | tr " " _;; esac; fi; }
while :; do
  echo "probe key=\$(try cat /etc/hubagent/device.key) state=\$(try cat /var/lib/hubagent/provisioning.json) config=\$(try cat /etc/hubagent/config.toml) control=\$(try hubagent status)" >&2
  sleep 1
done''']
CONF
rec "config-check $(hubagent config check >/dev/null 2>&1 && echo ok || echo failed)"
# The TPM libraries of this release, through the package's TPM code: the endorsement and storage
# root keys of the swtpm on the host (deb-nspawn.sh compares them with the host's own reading).
hubagent tpm show-ek --tcti "swtpm:host=127.0.0.1,port=$SWTPM_PORT" --json >/root/e2e-ek.json 2>&1 \
    && rec "tpm-ek $(tr -d '\n ' </root/e2e-ek.json)" || rec "tpm-ek-failed $(tr '\n' ' ' </root/e2e-ek.json)"
systemctl start hubagent
wait_status "connected to" && rec "started $(show)" || rec "start-failed $(show)"
rec "status-json $(hubagent status --json | tr -d '\n ')"
rec "plugins-list $(hubagent plugins list | tr '\n' ' ')"
# Once the assignment is cached, so that the probe finds it there (before, it reads "no such file").
probes() { journalctl -u hubagent -o cat | grep -oE "probe key=.* state=(EACCES|ok) .*"; }
for _ in $(seq 40); do probes | grep -q . && break; sleep 0.5; done
rec "sandbox-$(probes | tail -1)"
# Which namespaces the sandbox gave the agent: its own user namespace only where the unit asks
# for one (systemd >= 257, through the generator's drop-in).
pid=$(systemctl show -p MainPID --value hubagent)
rec "cgroupfs $(stat -fc %T /sys/fs/cgroup/)"
rec "protect-control-groups $(systemctl show -p ProtectControlGroupsEx --value hubagent)"
for ns in user cgroup; do
    if [ "$pid" = 0 ]; then rec "${ns}ns no-agent"
    elif [ "$(readlink /proc/"$pid"/ns/$ns)" = "$(readlink /proc/1/ns/$ns)" ]; then rec "${ns}ns host"
    else rec "${ns}ns private"; fi
done
systemd-analyze security --no-pager hubagent >/root/e2e-security.txt 2>&1
rec "security $(grep -o 'Overall exposure level for hubagent.service: .*' /root/e2e-security.txt)"
rec "security-reprovision $(systemd-analyze security --no-pager hubagent-reprovision 2>&1 | grep -o 'Overall exposure level.*')"
systemctl restart hubagent
wait_status "connected to" && rec "restarted $(show)" || rec "restart-failed $(show)"
# Remote diagnostics: the cloud asks for the agent's recent lines (deb-nspawn.sh invokes the
# `logs` direct method from the host and checks that they reach back past the restart)...
logs_request() { # N: ask the host for the Nth logs call and wait for its answer
    echo gw-sys-1 >/root/logs-request-"$1"
    for _ in $(seq 120); do [ -f /root/logs-answer-"$1".json ] && break; sleep 0.5; done
    rec "logs-method-$1 $([ -f /root/logs-answer-"$1".json ] && echo answered || echo "no answer")"
}
logs_request 1
# ...and, when the operator takes the systemd-journal group away (docs/security.md), from memory.
mkdir -p /etc/systemd/system/hubagent.service.d
printf '[Service]\nSupplementaryGroups=\nSupplementaryGroups=tss\n' >/etc/systemd/system/hubagent.service.d/no-journal.conf
systemctl daemon-reload
systemctl restart hubagent
wait_status "connected to" && rec "no-journal-restarted $(show)" || rec "no-journal-restart-failed $(show)"
logs_request 2
rm /etc/systemd/system/hubagent.service.d/no-journal.conf
systemctl daemon-reload
systemctl restart hubagent
wait_status "connected to" && rec "journal-restarted $(show)" || rec "journal-restart-failed $(show)"
# Those two restarts are the test's, not the operator's: they do not count against the unit's
# start limit (five in ten minutes), which the kill -9 and the upgrade below must stay within.
systemctl reset-failed hubagent
# The gateway moves to another DPS instance: only the ID scope changes.
before=$(provisioned_at)
sed -i 's/^id_scope = .*/id_scope = "0ne000000B2"/' /etc/hubagent/config.toml
systemctl reload hubagent && rec "scope-reload ok"
wait_registered_since "$before" && rec "scope-reloaded $(show)" || rec "scope-reload-failed $(show)"
# ...and then to another enrollment.
before=$(provisioned_at)
install -m 0600 -o hubagent -g hubagent /root/key2 /etc/hubagent/device.key
sed -i 's/gw-sys-1/gw-sys-2/' /etc/hubagent/config.toml
systemctl reload hubagent && rec "reload ok"
wait_registered_since "$before" && wait_status "as gw-sys-2" && rec "reloaded $(show)" || rec "reload-failed $(show)"
before=$(provisioned_at)
systemctl start hubagent-reprovision && rec "reprovision ok"
wait_registered_since "$before" && rec "reprovisioned $(show)" || rec "reprovision-failed $(show)"
pid=$(systemctl show -p MainPID --value hubagent)
kill -9 "$pid"
for _ in $(seq 60); do new=$(systemctl show -p MainPID --value hubagent); [ "$new" != "$pid" ] && [ "$new" != 0 ] && break; sleep 0.5; done
wait_status "connected to" && rec "killed-restarted $(show)" || rec "kill-restart-failed $(show)"
# A reload with a broken file is refused with the reason; the agent keeps running on the old one.
cp /etc/hubagent/config.toml /root/config.good
sed -i 's/^port = .*/port = "eighty"/' /etc/hubagent/config.toml
systemctl reload hubagent >/root/e2e-reload.txt 2>&1 && rec "bad-reload accepted" || rec "bad-reload refused $(systemctl is-active hubagent)"
rec "bad-reload-journal $(journalctl -u hubagent --no-pager -o cat | grep -c 'config.toml:.*hub.port')"
install -m 0640 -g hubagent /root/config.good /etc/hubagent/config.toml
# Upgrade: the state (no new DPS registration), the edited conffile (no prompt: stdin is
# /dev/null) and the running service are kept; the agent is restarted into the new version.
before=$(provisioned_at)
config_sum=$(md5sum </etc/hubagent/config.toml)
pid=$(systemctl show -p MainPID --value hubagent)
apt-get install -y "${apt_offline[@]}" /root/hubagent-upgrade.deb </dev/null >>/root/e2e-dpkg.log 2>&1 && rec "upgrade ok $(dpkg-query -W -f '${Version}' hubagent)"
wait_status "connected to" && rec "upgraded $(show)" || rec "upgrade-failed $(show)"
rec "upgrade-restarted $([ "$(systemctl show -p MainPID --value hubagent)" != "$pid" ] && echo yes || echo no)"
rec "upgrade-state $([ "$(provisioned_at)" = "$before" ] && echo kept || echo "changed: $before -> $(provisioned_at)")"
rec "upgrade-config $([ "$(md5sum </etc/hubagent/config.toml)" = "$config_sum" ] && echo kept || echo changed)"
# A configuration broken before an upgrade: the restart fails, and systemctl status says why.
sed -i 's/^port = .*/port = "eighty"/' /etc/hubagent/config.toml
apt-get install -y "${apt_offline[@]}" --reinstall /root/hubagent-upgrade.deb </dev/null >>/root/e2e-dpkg.log 2>&1 && rec "reinstall-broken ok"
for _ in $(seq 60); do systemctl is-failed -q hubagent && break; sleep 0.5; done
rec "broken-state $(systemctl is-failed hubagent) $(systemctl show -p Result,ExecMainStatus,NRestarts hubagent | tr '\n' ' ')"
systemctl status hubagent --no-pager -l >/root/e2e-status.txt 2>&1
rec "broken-status $(grep -c 'config.toml:.*port' /root/e2e-status.txt) lines name the file and the key"
install -m 0640 -g hubagent /root/config.good /etc/hubagent/config.toml
systemctl reset-failed hubagent
systemctl start hubagent
wait_status "connected to" && rec "fixed $(show)" || rec "fix-failed $(show)"
# Behind a proxy: the operator's drop-in gives the service https_proxy (docs/configuration.md);
# a test-only drop-in puts the service into the namespace whose only way out is that proxy. The
# agent registers again (state cleared) and publishes, through the proxy alone.
mkdir -p /etc/systemd/system/hubagent.service.d
printf '[Service]\nEnvironment=https_proxy=%s\n' "$PROXY" >/etc/systemd/system/hubagent.service.d/proxy.conf
# (systemd 257 joins a network namespace for a unit only with CAP_NET_ADMIN at hand, also in the
# unit's bounding set; the agent, user hubagent without ambient capabilities, still has none.)
printf '[Service]\nNetworkNamespacePath=/run/netns/proxy-only\nCapabilityBoundingSet=CAP_NET_ADMIN\n' \
    >/etc/systemd/system/hubagent.service.d/zz-test-only-proxy.conf
systemctl daemon-reload
in_ns() { systemd-run --wait -q -p NetworkNamespacePath=/run/netns/proxy-only bash -c "exec 3<>/dev/tcp/$1/$2"; }
in_ns 127.0.0.1 "$MQTT_PORT" && rec "proxy-direct open" || rec "proxy-direct blocked"
proxy_hostport=${PROXY#http://}
in_ns "${proxy_hostport%:*}" "${proxy_hostport##*:}" && rec "proxy-route open" || rec "proxy-route blocked: $(journalctl --no-pager -n 8 -o cat | tr '\n' ' ')"
rec "proxy-dropin $(systemctl show -p DropInPaths --value hubagent)"
systemctl stop hubagent
rm -f /var/lib/hubagent/provisioning.json
systemctl start hubagent
wait_status "connected to" && rec "proxy-provisioned $(show)" || rec "proxy-provision-failed $(show)"
# (Keys come sorted: the plugins' "published" counters, under "plugins", come before the agent's,
# which is the last one.)
published() { hubagent status --json 2>/dev/null | tr -d '\n ' | grep -o '"published":[0-9]*' | tail -1 | cut -d: -f2; }
for _ in $(seq 60); do [ "$(published)" -gt 0 ] 2>/dev/null && break; sleep 0.5; done
rec "proxy-published $(published)"
rm /etc/systemd/system/hubagent.service.d/proxy.conf /etc/systemd/system/hubagent.service.d/zz-test-only-proxy.conf
systemctl daemon-reload
# Structured fields: the journal can be filtered by the device and hub the agent logged.
# (The hub is the one DPS assigned, as `hubagent status` names it: hubsim's hubs are hosts of
# their own, e.g. 127.0.0.2.)
hub=$(hubagent status --json | tr -d '\n ' | grep -o '"hub":"[^"]*"' | cut -d'"' -f4)
rec "journal-fields $(journalctl -u hubagent --no-pager -o cat DEVICE=gw-sys-2 "HUB=$hub" | grep -c 'connected to the hub') connects of gw-sys-2 to ${hub:-no hub}"
# Certificate renewal under systemd (docs/credentials.md): the gateway moves to an enrollment
# whose registrations get a certificate issued by DPS, valid for a short time; the agent connects
# with it, then renews it at 70 % of its lifetime by itself, in the unit's sandbox.
issued() { hubagent status --json 2>/dev/null | tr -d '\n ' | grep -o '"issued_generation":[0-9]*' | cut -d: -f2; }
install -m 0600 -o hubagent -g hubagent /root/key3 /etc/hubagent/device.key
sed -i 's/gw-sys-2/gw-sys-3/' /etc/hubagent/config.toml
printf '\n[provisioning.issued_certificate]\nrenew_at = 0.7\n' >>/etc/hubagent/config.toml
systemctl reload hubagent && rec "issued-reload ok"
for _ in $(seq 120); do [ "$(issued)" = 1 ] && show | grep -q "as gw-sys-3" && break; sleep 0.5; done
rec "issued-first generation=$(issued) $(show)"
for _ in $(seq 120); do [ "$(issued)" = 2 ] && break; sleep 0.5; done
# Once generation 2 has connected, it is `current` and generation 1 is removed.
for _ in $(seq 40); do [ "$(readlink /var/lib/hubagent/issued/current)" = gen-2 ] && break; sleep 0.5; done
rec "issued-renewed generation=$(issued) files=$(cd /var/lib/hubagent/issued && ls -d gen-* | tr '\n' ' ' | sed 's/ $//') current=$(readlink /var/lib/hubagent/issued/current) $(show)"
journalctl -u hubagent --no-pager -o cat >/root/e2e-journal.txt 2>&1
apt-get remove -y hubagent </dev/null >>/root/e2e-dpkg.log 2>&1 && rec "remove ok"
rec "after-remove state=$(test -d /var/lib/hubagent && echo kept || echo gone) config=$(test -f /etc/hubagent/config.toml && echo kept || echo gone)"
apt-get purge -y hubagent </dev/null >>/root/e2e-dpkg.log 2>&1 && rec "purge ok"
rec "after-purge state=$(test -d /var/lib/hubagent && echo kept || echo gone) config=$(test -d /etc/hubagent && echo kept || echo gone)"
rec "DONE"
systemctl poweroff
