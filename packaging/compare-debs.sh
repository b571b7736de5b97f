#!/usr/bin/env bash
# Usage: compare-debs.sh AMD64.deb OTHER.deb
# Checks a package of another architecture (arm64, armhf) against the amd64 one: the same files
# with the same modes and owners, the same conffiles and maintainer scripts; every ELF file built
# for the package's architecture and linking the same shared libraries (sonames) as its amd64
# twin; and Depends and Recommends (the TPM libraries, which only the TPM helper links) naming
# the same packages, by the names the other architecture's dpkg-shlibdeps computed (amd64's
# alternatives name Debian 12's and 13's; the cross-built packages, for Debian 13 and later, name
# 13's), with no amd64 version copied where it was not computed. Run by tests/system/cross-smoke.sh in CI. Prints what differs; exit 1 when anything
# does.
set -euo pipefail
base="$(realpath "$1")" other="$(realpath "$2")"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
arch="$(dpkg-deb -f "$other" Architecture)"
[ "$(dpkg-deb -f "$base" Architecture)" = amd64 ] || { echo "compare-debs: $base is not the amd64 package"; exit 2; }
failed=0
fail() { echo "compare-debs ($arch): $*"; failed=1; }
for side in base other; do
    deb="${!side}"
    mkdir -p "$tmp/$side/root" "$tmp/$side/control"
    dpkg-deb -x "$deb" "$tmp/$side/root"
    dpkg-deb -e "$deb" "$tmp/$side/control"
    # Mode, owner and path of every entry (sizes differ by architecture); owners as numbers, and
    # without the top directory entry some builders write.
    dpkg-deb -c "$deb" | awk '$6 != "./" {print $1, $2, $6, $7, $8}' | sed 's#^\([^ ]*\) root/root #\1 0/0 #' \
        | sort -k3 >"$tmp/$side.files"
done
diff -u "$tmp/base.files" "$tmp/other.files" >"$tmp/files.diff" || { fail "the files differ from amd64's:"; cat "$tmp/files.diff"; }
for control in conffiles postinst postrm prerm preinst; do
    [ -e "$tmp/base/control/$control" ] || [ -e "$tmp/other/control/$control" ] || continue
    if ! diff -u "$tmp/base/control/$control" "$tmp/other/control/$control" >"$tmp/control.diff" 2>&1; then
        fail "$control differs from amd64's:"; cat "$tmp/control.diff"
    fi
done

# The ELF files: the package's architecture (readelf's Machine), and the same sonames as amd64's.
case "$arch" in
    arm64) machine="AArch64" ;;
    armhf) machine="ARM" ;;
    *) echo "compare-debs: no ELF machine known for $arch"; exit 2 ;;
esac
needed() { readelf -d -W "$1" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | grep -v '^ld-linux' | sort; }
mapfile -t elfs < <(cd "$tmp/other/root" && find . -type f \( -path '*/usr/bin/*' -o -path '*/usr/libexec/*' -o -name '*.so' \) | sort)
[ "${#elfs[@]}" -gt 0 ] || fail "no ELF files"
for elf in "${elfs[@]}"; do
    got="$(readelf -h "$tmp/other/root/$elf" | sed -n 's/^ *Machine: *//p')"
    [ "$got" = "$machine" ] || fail "$elf is built for '$got', not $machine"
    if [ "$(needed "$tmp/base/root/$elf")" != "$(needed "$tmp/other/root/$elf")" ]; then
        fail "$elf links other libraries than on amd64: $(needed "$tmp/other/root/$elf" | tr '\n' ' ')/ amd64: $(needed "$tmp/base/root/$elf" | tr '\n' ' ')"
    fi
done

# Depends and Recommends: package names without versions, one a line.
names() { tr ',|' '\n\n' <<<"$1" | sed 's/(.*)//; s/^ *//; s/ *$//' | grep -v '^$' | sort -u; }
compare_field() { # FIELD
    local field="$1" base_list other_list group found name
    base_list="$(dpkg-deb -f "$base" "$field")" other_list="$(dpkg-deb -f "$other" "$field")"
    # Every package the other names is one amd64's alternatives name...
    while read -r name; do
        grep -qxF "$name" <(names "$base_list") || fail "$field names $name, which amd64's $field do not"
    done < <(names "$other_list")
    # ...and every amd64 entry (a group of alternatives) has one of its names there, but
    # libgcc-s1, which the cross-built packages leave to Priority: required (agent/Cargo.toml).
    IFS=',' read -ra groups <<<"$base_list"
    for group in "${groups[@]}"; do
        found=""
        while read -r name; do
            grep -qxF "$name" <(names "$other_list") && found="$name"
        done < <(names "$group")
        [ -n "$found" ] || [[ "$group" == *libgcc-s1* ]] || fail "$field have nothing for amd64's '$(sed 's/^ *//' <<<"$group")'"
    done
}
compare_field Depends
compare_field Recommends
base_depends="$(dpkg-deb -f "$base" Depends)" other_depends="$(dpkg-deb -f "$other" Depends)"
# Versions: computed for the other architecture, not amd64's written-out list (its libc6 says
# which glibc the cross-built binaries need).
[ "$base_depends" != "$other_depends" ] || fail "Depends are amd64's, word for word"
if [ "$failed" -ne 0 ]; then
    echo "compare-debs ($arch): FAILED against $(basename "$base")"
    exit 1
fi
echo "compare-debs ($arch): same $(wc -l <"$tmp/base.files") files, conffiles and maintainer scripts as amd64; ${#elfs[@]} ELF files for $machine with amd64's sonames; Depends: $other_depends; Recommends: $(dpkg-deb -f "$other" Recommends)"
