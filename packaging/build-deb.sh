#!/usr/bin/env bash
# Usage: build-deb.sh [--arch amd64|arm64|armhf] [cargo deb arguments...]
#        build-deb.sh [--arch ARCH] --releases
# Builds the Debian package (release, TPM support, no embedded demo, the shipped library plugins)
# for the given architecture (default amd64); prints its path last. Extra arguments go to cargo deb
# (e.g. --deb-version 0.2.0-1 for a test upgrade package). `--releases` prints the Debian
# releases the architecture's package is for and exits.
#
# amd64: one package serves Debian 12 (bookworm) and Debian 13 (trixie): the same binary runs on
# both, and its Depends name each TPM library by both releases' package names (docs/packaging.md,
# "Releases"). Build it on Debian 12, the older release: a binary linked there runs on both.
# tests/system/deb-nspawn.sh installs and runs it on each release below.
#
# arm64 and armhf: cross-built (docs/packaging.md, "Architectures"). Where the Rust standard
# library for the target is installed (rustup's `rustup target add`, or Debian's
# libstd-rust-dev:ARCH), with Debian's cross gcc as the linker and the target's libtss2-dev
# (multiarch); where not, inside a cached Debian unstable root that has them all
# (packaging/cross-root.sh), which this script re-enters. Their Depends are computed for the
# target by dpkg-shlibdeps (the `cross` variant in agent/Cargo.toml), then the TPM libraries among
# them moved to Recommends, as amd64's written-out fields have them (only the TPM helper links them).
set -euo pipefail
arch=amd64
if [ "${1:-}" = "--arch" ]; then
    arch="${2:-}"
    shift 2 || true
fi
case "$arch" in
    amd64) releases="bookworm trixie" ;;
    # Linked against Debian unstable's glibc and its t64 TPM library names: Debian 13 and later
    # (docs/packaging.md says how that was checked).
    arm64) releases="trixie" triple=aarch64-unknown-linux-gnu gnu=aarch64-linux-gnu ;;
    armhf) releases="trixie" triple=armv7-unknown-linux-gnueabihf gnu=arm-linux-gnueabihf ;;
    *) echo "build-deb: unknown --arch '$arch' (amd64, arm64 or armhf)" >&2; exit 2 ;;
esac
if [ "${1:-}" = "--releases" ]; then
    echo "$releases"
    exit 0
fi
cd "$(dirname "$0")/.."
command -v cargo-deb >/dev/null || cargo install --locked cargo-deb@3.8.0
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"

# The man pages and shell completions (packaging/man/manuals.sh) are the same for every
# architecture and are made by running hubagent: with the host's build of it (the amd64
# package's binary), into OUT, where agent/Cargo.toml's assets take them from (the release
# directory of the target being packaged, which cargo deb calls target/release).
manuals() { # OUT
    cargo build --release --locked -p hubagent --no-default-features --features tpm >&2
    bash packaging/man/manuals.sh "$target_dir/release/hubagent" "$1" >&2
}

if [ "$arch" = amd64 ]; then
    echo "build-deb: one package for Debian 12 and 13 ($releases), amd64" >&2
    # Built here, then packaged with --no-build: left to itself, cargo deb would build every
    # library of the workspace (test plugins included) because the assets name the plugins' .so
    # files. The features match [package.metadata.deb] in agent/Cargo.toml.
    cargo build --release --locked -p hubagent --no-default-features --features tpm >&2
    cargo build --release --locked -p hubagent-sysmetrics -p hubagent-simulated-sensor >&2
    manuals "$target_dir/release/manuals"
    cargo deb -p hubagent --locked --no-build "$@" >&2
    deb="$(ls -t target/debian/hubagent_*_amd64.deb | head -1)"
    # The Depends are written out in agent/Cargo.toml: check them against what this machine's
    # dpkg-shlibdeps computes for the binary and plugins just built.
    bash packaging/check-depends.sh "$deb" >&2
    # hubagent-dev (Architecture: all), beside it, with the same version.
    dev="$(bash packaging/build-dev-deb.sh "$(dpkg-deb -f "$deb" Version)" "$(dirname "$deb")")"
    echo "build-deb: and the development package $dev" >&2
    echo "$deb"
    exit 0
fi

if [ ! -d "$(rustc --print sysroot)/lib/rustlib/$triple/lib" ]; then
    # No standard library for the target here: build in the Debian root, which has it. The
    # checkout is bound at the same path; cargo's home (registry and the cargo-deb binary) is
    # shared, so crates are downloaded once; the root's own files stay unchanged (a tmpfs
    # overlay takes other writes). The root's rustc builds into a target directory kept beside
    # the root (its artifacts are only good for that rustc; a new root gets a new one), shared by
    # every checkout and CI run on this machine, so a rebuild compiles what changed only (cargo
    # locks it while it builds). The package is copied to this checkout's target/debian/.
    [ -z "${HUBAGENT_IN_CROSS_ROOT:-}" ] || { echo "build-deb: the cross root has no Rust standard library for $triple" >&2; exit 1; }
    [ "$(id -u)" -eq 0 ] || { echo "build-deb: building for $arch without rustup's $triple target needs root (systemd-nspawn into the cross root)" >&2; exit 1; }
    root="$(bash packaging/cross-root.sh)"
    cross_target="$root-target"
    mkdir -p "$cross_target" "$target_dir/debian"
    cargo_home="${CARGO_HOME:-$HOME/.cargo}"
    manuals "$cross_target/$triple/release/manuals"
    echo "build-deb: no Rust standard library for $triple here: building in $root" >&2
    # (PATH: the root's cargo and rustc first; cargo-deb from the shared cargo home, whose rustup
    # proxies must not shadow them.)
    built="$(systemd-nspawn -q --register=no --keep-unit --console=pipe --volatile=overlay -D "$root" \
        --bind="$PWD" --bind="$cross_target" --bind="$cargo_home:/cargo-home" --chdir="$PWD" \
        --setenv=CARGO_HOME=/cargo-home --setenv=CARGO_TARGET_DIR="$cross_target" \
        --setenv=PATH=/usr/sbin:/usr/bin:/sbin:/bin:/cargo-home/bin --setenv=HUBAGENT_IN_CROSS_ROOT=1 \
        bash packaging/build-deb.sh --arch "$arch" "$@" </dev/null | tail -1)"
    [ -f "$built" ] || { echo "build-deb: no $arch package came out of the cross root" >&2; exit 1; }
    cp "$built" "$target_dir/debian/"
    echo "$target_dir/debian/$(basename "$built")"
    exit 0
fi

echo "build-deb: $arch package for Debian $releases, cross-built for $triple with $gnu-gcc ($(rustc --version))" >&2
# The cross linker and C compiler, and pkg-config answering with the target's libraries
# (libtss2-dev:$arch, multiarch) for tss-esapi-sys.
upper="$(tr 'a-z-' 'A-Z_' <<<"$triple")"
export "CARGO_TARGET_${upper}_LINKER=$gnu-gcc" "CC_${triple//-/_}=$gnu-gcc"
export PKG_CONFIG_ALLOW_CROSS=1 PKG_CONFIG_LIBDIR="/usr/lib/$gnu/pkgconfig:/usr/share/pkgconfig"
# (In the cross root, the pages were made on the host before entering it.)
[ -n "${HUBAGENT_IN_CROSS_ROOT:-}" ] || manuals "${CARGO_TARGET_DIR:-target}/$triple/release/manuals"
cargo build --release --locked --target "$triple" -p hubagent --no-default-features --features tpm >&2
cargo build --release --locked --target "$triple" -p hubagent-sysmetrics -p hubagent-simulated-sensor >&2
cargo deb -p hubagent --locked --no-build --target "$triple" --variant cross "$@" >&2
deb="$(ls -t "${CARGO_TARGET_DIR:-target}/$triple"/debian/hubagent_*_"$arch".deb 2>/dev/null | head -1)"
[ -n "$deb" ] || { echo "build-deb: cargo deb made no hubagent_*_$arch.deb" >&2; exit 1; }
# cargo-deb's $auto computes the TPM helper's libraries into Depends with the rest: the package is
# rebuilt with them (the libtss2 packages) in Recommends instead, its files unchanged.
# check-depends.sh then checks the split against dpkg-shlibdeps.
unpacked="$(mktemp -d)"
dpkg-deb -R "$deb" "$unpacked/pkg"
control="$unpacked/pkg/DEBIAN/control"
IFS=',' read -ra entries <<<"$(sed -n 's/^Depends: //p' "$control")"
required=() recommended=()
for entry in "${entries[@]}"; do
    entry="$(sed 's/^ *//; s/ *$//' <<<"$entry")"
    case "$entry" in libtss2-*) recommended+=("$entry") ;; *) required+=("$entry") ;; esac
done
if [ "${#recommended[@]}" -eq 0 ] || grep -q '^Recommends:' "$control"; then
    echo "build-deb: expected the TPM libraries in the computed Depends and no Recommends: $(grep -E '^(Depends|Recommends):' "$control")" >&2
    exit 1
fi
joined() { local out; printf -v out '%s, ' "$@"; echo "${out%, }"; }
awk -v depends="$(joined "${required[@]}")" -v recommends="$(joined "${recommended[@]}")" \
    '/^Depends: / { print "Depends: " depends; print "Recommends: " recommends; next } { print }' \
    "$control" >"$unpacked/control" && cat "$unpacked/control" >"$control"
dpkg-deb --root-owner-group -Zxz -b "$unpacked/pkg" "$deb" >/dev/null
rm -rf "$unpacked"
bash packaging/check-depends.sh "$deb" >&2
echo "$deb"
