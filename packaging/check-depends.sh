#!/usr/bin/env bash
# Usage: check-depends.sh PACKAGE.deb
# Checks that only the TPM helper links the TPM libraries, then a built package's Depends and
# Recommends against the shared-library dependencies that this system's dpkg-shlibdeps computes
# for the package's ELF files, split as debhelper splits them (dpkg-shlibdeps -dDepends ...
# -dRecommends ...): what the daemon, the plugin host and the plugins need must each be one of the
# declared Depends alternatives, exactly as computed; what the TPM helper needs beyond that
# (the TPM libraries) one of the Depends or Recommends alternatives, and none of it may be in
# Depends (an installation without Recommends must not get them; docs/packaging.md,
# "Dependencies"). The fields are written out in agent/Cargo.toml (alternatives for Debian 12 and
# 13) instead of cargo deb's $auto; build-deb.sh runs this on the build machine,
# tests/system/deb-nspawn.sh in each release it supports. Needs dpkg-dev and the libraries
# installed. Prints the computed lists; exit 1 when one is missing from the package or misplaced.
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
helper_elf=debian/hubagent/usr/libexec/hubagent/hubagent-tpm
mapfile -t elfs < <(cd "$tmp" && find debian/hubagent -type f \( -path '*/usr/bin/*' -o -path '*/usr/libexec/*' -o -name '*.so' \) | sort)
mapfile -t required_elfs < <(printf '%s\n' "${elfs[@]}" | grep -vxF "$helper_elf")
# (Its warnings, e.g. about usrmerge's diversions, are shown only when it fails.) What the TPM
# helper needs goes to Recommends, where dpkg-shlibdeps leaves out what Depends already has.
shlibdeps="$(cd "$tmp" && dpkg-architecture -a "$arch" -c dpkg-shlibdeps -O -dDepends "${required_elfs[@]}" -dRecommends "$helper_elf" 2>"$tmp/warnings")" \
    || { cat "$tmp/warnings" >&2; exit 1; }
computed="$(sed -n 's/^shlibs:Depends=//p' <<<"$shlibdeps")"
computed_recommends="$(sed -n 's/^shlibs:Recommends=//p' <<<"$shlibdeps")"
# Packed relocations (agent/build.rs) need glibc 2.36's loader: the binaries carry a
# GLIBC_ABI_DT_RELR version need, which has no symbol, so dpkg-shlibdeps does not count it.
versions="$(cd "$tmp" && readelf -V -W "${elfs[@]}")"
if grep -q 'Name: GLIBC_ABI_DT_RELR' <<<"$versions"; then
    computed="$(sed -E 's/libc6 \(>= 2\.(2[0-9]|3[0-5])(\.[0-9]+)?\)/libc6 (>= 2.36)/g' <<<"$computed")"
    computed_recommends="$(sed -E 's/libc6 \(>= 2\.(2[0-9]|3[0-5])(\.[0-9]+)?\)/libc6 (>= 2.36)/g' <<<"$computed_recommends")"
    echo "check-depends: packed relocations (GLIBC_ABI_DT_RELR): libc6 (>= 2.36) at least"
fi
# Only the TPM helper links the TPM libraries (docs/tpm.md, "The TPM helper"): the daemon of an
# installation without a TPM must not map them, and the helper must be there and link them.
daemon_needs="$(cd "$tmp" && readelf -d -W debian/hubagent/usr/bin/hubagent | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')"
if grep -qE '^(libtss2|libcrypto)' <<<"$daemon_needs"; then
    echo "check-depends: /usr/bin/hubagent links the TPM libraries: $(tr '\n' ' ' <<<"$daemon_needs")" >&2
    exit 1
fi
helper="$tmp/$helper_elf"
if [ ! -f "$helper" ] || ! readelf -d -W "$helper" | grep -q 'NEEDED.*\[libtss2-esys'; then
    echo "check-depends: /usr/libexec/hubagent/hubagent-tpm is missing or does not link libtss2-esys" >&2
    exit 1
fi
echo "check-depends: the TPM libraries are linked by hubagent-tpm only"
declared="$(dpkg-deb -f "$deb" Depends)"
declared_recommends="$(dpkg-deb -f "$deb" Recommends)"
# The declared alternatives, one a line, without the spaces around them.
alternatives_of() { tr ',|' '\n\n' <<<"$1" | sed 's/^ *//; s/ *$//' | grep -v '^$' || true; }
alternatives="$(alternatives_of "$declared")"
alternatives_or_recommended="$(alternatives_of "$declared"$'\n'"$declared_recommends")"
missing=()
# NEEDS ALTERNATIVES: each computed need that is not one of the alternatives, into missing.
check_covered() {
    local need
    IFS=',' read -ra needs <<<"$1"
    for need in "${needs[@]}"; do
        need="$(sed 's/^ *//; s/ *$//' <<<"$need")"
        [ -n "$need" ] || continue
        grep -qxF "$need" <<<"$2" && continue
        # libgcc-s1: see above.
        if [[ "$need" == libgcc-s1* ]] && ! grep -q '^libgcc-s1\b' <<<"$2"; then continue; fi
        missing+=("$need")
    done
}
check_covered "$computed" "$alternatives"
check_covered "$computed_recommends" "$alternatives_or_recommended"
# The helper's own libraries must not be required: their package names (without versions) absent
# from Depends.
misplaced=()
IFS=',' read -ra helper_needs <<<"$computed_recommends"
for need in "${helper_needs[@]}"; do
    name="$(sed 's/(.*//; s/^ *//; s/ *$//' <<<"$need")"
    [ -n "$name" ] || continue
    if sed 's/ *(.*//' <<<"$alternatives" | grep -qxF "$name"; then misplaced+=("$name"); fi
done
codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-unknown}"), $arch"
# readelf reads any architecture's ELF files (objdump only its own).
glibc="$(cd "$tmp" && readelf --dyn-syms -W "${elfs[@]}" | grep -o '@GLIBC_[0-9.]*' | sort -uV | tail -1)"
echo "check-depends ($codename): the highest glibc symbol version needed: ${glibc#@}"
echo "check-depends ($codename): dpkg-shlibdeps computes Depends: $computed"
echo "check-depends ($codename): and for the TPM helper, Recommends: $computed_recommends"
failed=0
if [ "${#missing[@]}" -gt 0 ]; then
    echo "check-depends ($codename): not among the package's alternatives (Depends for the daemon, plugin host and plugins; Depends or Recommends for the TPM helper): $(IFS=','; echo "${missing[*]}")"
    failed=1
fi
if [ "${#misplaced[@]}" -gt 0 ]; then
    echo "check-depends ($codename): only the TPM helper needs $(IFS=','; echo "${misplaced[*]}"): Recommends, not Depends"
    failed=1
fi
if [ "$failed" -ne 0 ]; then
    echo "check-depends ($codename): the package declares Depends: $declared"
    echo "check-depends ($codename): and Recommends: $declared_recommends"
    exit 1
fi
