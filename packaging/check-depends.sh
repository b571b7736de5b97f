#!/usr/bin/env bash
# Usage: check-depends.sh PACKAGE.deb
# Checks that only the TPM helper links the TPM libraries, then a built package's Depends against the shared-library dependencies that this system's
# dpkg-shlibdeps computes for the package's ELF files (the binary and the plugins): each computed
# dependency must be one of the declared alternatives, exactly as computed. The Depends are
# written out in agent/Cargo.toml (alternatives for Debian 12 and 13) instead of cargo deb's $auto;
# build-deb.sh runs this on the build machine, tests/system/deb-nspawn.sh in each release it
# supports. Needs dpkg-dev and the libraries installed. Prints the computed list; exit 1 when one
# is missing from the package.
#
# Per architecture: dpkg-shlibdeps runs for the package's Architecture (dpkg-architecture -a), so
# it reads that architecture's libraries (multiarch, e.g. libtss2-dev:arm64): an arm64 package is
# checked with arm64's symbols files, on an amd64 machine too. The arm64 and armhf packages
# compute their Depends with cargo-deb's $auto, which leaves out libgcc-s1 (Priority: required,
# on every Debian system): a computed libgcc-s1 may therefore be absent, but if declared it must
# match. Also prints the highest GLIBC_ symbol version the ELF files need (the oldest glibc they
# run on), which libc6's computed version must cover.
set -euo pipefail
deb="$(realpath "$1")"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# dpkg-shlibdeps wants a source tree: the package unpacked (with its DEBIAN/) where debhelper
# would put it.
mkdir -p "$tmp/debian/hubagent"
dpkg-deb -R "$deb" "$tmp/debian/hubagent"
printf 'Source: hubagent\n\nPackage: hubagent\nArchitecture: any\n' >"$tmp/debian/control"
arch="$(dpkg-deb -f "$deb" Architecture)"
mapfile -t elfs < <(cd "$tmp" && find debian/hubagent -type f \( -path '*/usr/bin/*' -o -path '*/usr/libexec/*' -o -name '*.so' \) | sort)
# (Its warnings, e.g. about usrmerge's diversions, are shown only when it fails.)
computed="$(cd "$tmp" && dpkg-architecture -a "$arch" -c dpkg-shlibdeps -O "${elfs[@]}" 2>"$tmp/warnings" | sed -n 's/^shlibs:Depends=//p')" \
    || { cat "$tmp/warnings" >&2; exit 1; }
# Packed relocations (agent/build.rs) need glibc 2.36's loader: the binaries carry a
# GLIBC_ABI_DT_RELR version need, which has no symbol, so dpkg-shlibdeps does not count it.
versions="$(cd "$tmp" && readelf -V -W "${elfs[@]}")"
if grep -q 'Name: GLIBC_ABI_DT_RELR' <<<"$versions"; then
    computed="$(sed -E 's/libc6 \(>= 2\.(2[0-9]|3[0-5])(\.[0-9]+)?\)/libc6 (>= 2.36)/g' <<<"$computed")"
    echo "check-depends: packed relocations (GLIBC_ABI_DT_RELR): libc6 (>= 2.36) at least"
fi
# Only the TPM helper links the TPM libraries (docs/tpm.md, "The TPM helper"): the daemon of an
# installation without a TPM must not map them, and the helper must be there and link them.
daemon_needs="$(cd "$tmp" && readelf -d -W debian/hubagent/usr/bin/hubagent | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')"
if grep -qE '^(libtss2|libcrypto)' <<<"$daemon_needs"; then
    echo "check-depends: /usr/bin/hubagent links the TPM libraries: $(tr '\n' ' ' <<<"$daemon_needs")" >&2
    exit 1
fi
helper="$tmp/debian/hubagent/usr/libexec/hubagent/hubagent-tpm"
if [ ! -f "$helper" ] || ! readelf -d -W "$helper" | grep -q 'NEEDED.*\[libtss2-esys'; then
    echo "check-depends: /usr/libexec/hubagent/hubagent-tpm is missing or does not link libtss2-esys" >&2
    exit 1
fi
echo "check-depends: the TPM libraries are linked by hubagent-tpm only"
declared="$(dpkg-deb -f "$deb" Depends)"
# The declared alternatives, one a line, without the spaces around them.
alternatives="$(tr ',|' '\n\n' <<<"$declared" | sed 's/^ *//; s/ *$//')"
missing=()
IFS=',' read -ra needs <<<"$computed"
for need in "${needs[@]}"; do
    need="$(sed 's/^ *//; s/ *$//' <<<"$need")"
    grep -qxF "$need" <<<"$alternatives" && continue
    # libgcc-s1: see above.
    if [[ "$need" == libgcc-s1* ]] && ! grep -q '^libgcc-s1\b' <<<"$alternatives"; then continue; fi
    missing+=("$need")
done
codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-unknown}"), $arch"
# readelf reads any architecture's ELF files (objdump only its own).
glibc="$(cd "$tmp" && readelf --dyn-syms -W "${elfs[@]}" | grep -o '@GLIBC_[0-9.]*' | sort -uV | tail -1)"
echo "check-depends ($codename): the highest glibc symbol version needed: ${glibc#@}"
echo "check-depends ($codename): dpkg-shlibdeps computes: $computed"
if [ "${#missing[@]}" -gt 0 ]; then
    echo "check-depends ($codename): not among the package's Depends alternatives: $(IFS=','; echo "${missing[*]}")"
    echo "check-depends ($codename): the package declares: $declared"
    exit 1
fi
