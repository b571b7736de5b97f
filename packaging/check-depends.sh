#!/usr/bin/env bash
# Usage: check-depends.sh PACKAGE.deb
# Checks a built package's Depends against the shared-library dependencies that this system's
# dpkg-shlibdeps computes for the package's ELF files (the binary and the plugins): each computed
# dependency must be one of the declared alternatives, exactly as computed. The Depends are
# written out in agent/Cargo.toml (alternatives for Debian 12 and 13) instead of cargo deb's $auto;
# build-deb.sh runs this on the build machine, tests/system/deb-nspawn.sh in each release it
# supports. Needs dpkg-dev and the libraries installed. Prints the computed list; exit 1 when one
# is missing from the package.
set -euo pipefail
deb="$(realpath "$1")"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# dpkg-shlibdeps wants a source tree: the package unpacked (with its DEBIAN/) where debhelper
# would put it.
mkdir -p "$tmp/debian/hubagent"
dpkg-deb -R "$deb" "$tmp/debian/hubagent"
printf 'Source: hubagent\n\nPackage: hubagent\nArchitecture: any\n' >"$tmp/debian/control"
mapfile -t elfs < <(cd "$tmp" && find debian/hubagent -type f \( -path '*/usr/bin/*' -o -name '*.so' \) | sort)
# (Its warnings, e.g. about usrmerge's diversions, are shown only when it fails.)
computed="$(cd "$tmp" && dpkg-shlibdeps -O "${elfs[@]}" 2>"$tmp/warnings" | sed -n 's/^shlibs:Depends=//p')" \
    || { cat "$tmp/warnings" >&2; exit 1; }
declared="$(dpkg-deb -f "$deb" Depends)"
# The declared alternatives, one a line, without the spaces around them.
alternatives="$(tr ',|' '\n\n' <<<"$declared" | sed 's/^ *//; s/ *$//')"
missing=()
IFS=',' read -ra needs <<<"$computed"
for need in "${needs[@]}"; do
    need="$(sed 's/^ *//; s/ *$//' <<<"$need")"
    grep -qxF "$need" <<<"$alternatives" || missing+=("$need")
done
codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-unknown}")"
echo "check-depends ($codename): dpkg-shlibdeps computes: $computed"
if [ "${#missing[@]}" -gt 0 ]; then
    echo "check-depends ($codename): not among the package's Depends alternatives: $(IFS=','; echo "${missing[*]}")"
    echo "check-depends ($codename): the package declares: $declared"
    exit 1
fi
