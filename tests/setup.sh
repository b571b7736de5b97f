#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian 12 machine that has only the Rust
# toolchain, gcc and Python: Debian packages (via apt, as root or with sudo), cargo-nextest if
# missing, and a Python venv with Azure's device SDK for the interop tests. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Debian packages: the venv module, and what the TPM and system tests use (swtpm, tpm2-tools,
# systemd-nspawn, mmdebstrap, lintian, dpkg-dev for packaging/check-depends.sh's dpkg-shlibdeps),
# libfaketime for the clock-jump fault scenarios, faketime (its wrapper, which shares one
# accelerated clock between hubsim and the agent in the ignored accelerated soak), tinyproxy, the real HTTP proxy of the proxy
# tests, iproute2 (`ip netns`) for the scenario whose only way out is that proxy, Debian's python3
# for exec plugins (the plugin sandbox lets them execute from /usr), and prometheus-node-exporter,
# which serves the agent's metrics file in a test, and pandoc, which makes hubagent.toml(5) from
# docs/configuration.md when the package is built (packaging/man/manuals.sh). Installed only when
# something is missing.
packages=(python3 python3-venv swtpm swtpm-tools tpm2-tools libtss2-dev pkg-config systemd-container mmdebstrap lintian dpkg-dev libfaketime faketime tinyproxy iproute2 prometheus-node-exporter pandoc)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo-nextest >/dev/null 2>&1; then
    echo "setup: installing cargo-nextest"
    cargo install --locked cargo-nextest
fi

# The venv is rebuilt whenever tests/interop/requirements.txt changes (its hash is stamped inside),
# so a pin bumped on main is picked up by a machine that already has an older venv.
venv=target/interop-venv
stamp="$venv/requirements.sha256"
wanted=$(sha256sum tests/interop/requirements.txt | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    echo "setup: creating $venv from tests/interop/requirements.txt"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check -r tests/interop/requirements.txt
    echo "$wanted" > "$stamp"
fi
echo "setup: done in ${SECONDS}s"
