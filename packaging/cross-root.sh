#!/usr/bin/env bash
# Usage: cross-root.sh
# Prints the path of the Debian unstable root that builds, packages and emulates hubagent for
# arm64 and armhf, making it first when it is not cached. Used by build-deb.sh where Rust's own
# cross targets are not installed, and by tests/system/cross-smoke.sh.
#
# Why unstable: the workspace needs rustc >= 1.88, above Debian 13's; unstable's rustc comes with
# its standard library built for every Debian architecture (libstd-rust-dev:ARCH), and Debian's
# cross gcc links for them. The root is multiarch (amd64 native, arm64 and armhf foreign), so the
# target libraries (libtss2-dev:ARCH) sit where dpkg-shlibdeps and qemu look for them.
#
# Cached in ~/.cache/hubagent/ (or $HUBAGENT_CACHE) under a name carrying a hash of the
# mmdebstrap arguments: a changed package list makes a new root. Written aside and renamed, so an
# interrupted run leaves nothing half made; one maker at a time (flock).
set -euo pipefail
cache="${HUBAGENT_CACHE:-$HOME/.cache/hubagent}"
mkdir -p "$cache"
# shellcheck disable=SC2054 # the commas are mmdebstrap's
args=(--variant=apt --architectures=amd64,arm64,armhf
    # The mirror may be a dated snapshot: unstable's Release file then counts as expired.
    --aptopt='Acquire::Check-Valid-Until "false"'
    # Rust with its standard library for both targets.
    --include=rustc,cargo,libstd-rust-dev:arm64,libstd-rust-dev:armhf
    # Linkers: the native one for build scripts and proc macros, the cross ones for the targets.
    --include=gcc,libc6-dev,gcc-aarch64-linux-gnu,gcc-arm-linux-gnueabihf,libc6-dev-arm64-cross,libc6-dev-armhf-cross
    # The TPM libraries the agent links, for each target (pkg-config finds them); make for the
    # C plugin example.
    --include=libtss2-dev:arm64,libtss2-dev:armhf,pkgconf,make
    # Packaging: dpkg-shlibdeps (cargo-deb's $auto, check-depends.sh), lintian, the strip tools.
    --include=dpkg-dev,lintian,binutils-aarch64-linux-gnu,binutils-arm-linux-gnueabihf
    # The emulators of tests/system/cross-smoke.sh; the CA bundle's package (overwritten below).
    --include=qemu-user,ca-certificates
    unstable)
root="$cache/cross-root-$(printf '%s\n' "${args[@]}" | sha256sum | cut -c1-12)"
exec 9>"$cache/.cross-root.lock"
flock 9
if [ ! -d "$root" ]; then
    started=$SECONDS
    echo "cross-root: creating the Debian unstable root (amd64, arm64, armhf) in $root" >&2
    rm -rf "$root.new"
    if ! mmdebstrap "${args[@]}" "$root.new" >"$root.log" 2>&1; then
        tail -20 "$root.log" >&2
        echo "cross-root: mmdebstrap failed (log: $root.log)" >&2
        exit 1
    fi
    # cargo in the root reaches the crate registry through this machine's CA bundle.
    cp /etc/ssl/certs/ca-certificates.crt "$root.new/etc/ssl/certs/ca-certificates.crt"
    mv "$root.new" "$root"
    echo "cross-root: made in $((SECONDS - started))s" >&2
fi
echo "$root"
