#!/usr/bin/env bash
# Usage: packaging/build-dev-deb.sh VERSION OUT_DIR
# Builds hubagent-dev_VERSION_all.deb in OUT_DIR (printed last): what a plugin author installs to
# write a library plugin in C, or a plugin of any kind, against the installed agent
# (docs/packaging.md, "The development package"):
#   /usr/include/hubagent/hubagent_plugin.h     the ABI (plugins/sdk/include)
#   /usr/share/pkgconfig/hubagent-plugin.pc    `cc $(pkg-config --cflags hubagent-plugin) -shared -fPIC ...`
#   /usr/share/doc/hubagent-dev/plugins.md      the rules plugins live by (docs/plugins.md)
#   /usr/share/doc/hubagent-dev/examples/       the C library plugin and the Python exec plugin
# Architecture: all (a header, text and examples: the same on every architecture), so it is
# built once, with the amd64 package (packaging/build-deb.sh). Made with dpkg-deb from a staged
# tree: cargo deb packages one crate's build products, and this package has none.
set -euo pipefail
[ "$#" -eq 2 ] || { echo "usage: $0 VERSION OUT_DIR" >&2; exit 2; }
version="$1" out="$2"
cd "$(dirname "$0")/.."
header=plugins/sdk/include/hubagent_plugin.h
abi="$(sed -n 's/^#define HUBAGENT_PLUGIN_ABI_MAJOR \([0-9]*\)$/\1/p' "$header").$(sed -n 's/^#define HUBAGENT_PLUGIN_ABI_MINOR \([0-9]*\)$/\1/p' "$header")"
[[ "$abi" =~ ^[0-9]+\.[0-9]+$ ]] || { echo "build-dev-deb: no ABI version in $header" >&2; exit 1; }
stage="$(mktemp -d)"
chmod 0755 "$stage"
trap 'rm -rf "$stage"' EXIT
doc="$stage/usr/share/doc/hubagent-dev"
install -D -m 0644 "$header" "$stage/usr/include/hubagent/hubagent_plugin.h"
install -d "$stage/usr/share/pkgconfig" "$doc/examples"
# The .pc's version is the ABI's (`pkg-config --atleast-version=1.1 hubagent-plugin` for methods
# and C2D); plugins link against nothing: the host hands them its functions at start.
cat >"$stage/usr/share/pkgconfig/hubagent-plugin.pc" <<PC
prefix=/usr
includedir=\${prefix}/include/hubagent

Name: hubagent-plugin
Description: C ABI of hubagent library plugins (hubagent_plugin.h, ABI $abi)
URL: https://example.invalid/hubagent
Version: $abi
Cflags: -I\${includedir}
PC
chmod 0644 "$stage/usr/share/pkgconfig/hubagent-plugin.pc"
install -m 0644 docs/plugins.md "$doc/plugins.md"
cp -r plugins/examples/c-counter plugins/examples/python-exec "$doc/examples/"
# Examples are read and copied, not run in place: no file of theirs is executable there.
find "$doc/examples" -type d -exec chmod 0755 {} + && find "$doc/examples" -type f -exec chmod 0644 {} +
install -D -m 0644 packaging/debian/hubagent-dev.lintian-overrides "$stage/usr/share/lintian/overrides/hubagent-dev"
gzip -9n <packaging/debian/changelog >"$doc/changelog.Debian.gz"
# The same copyright metadata cargo deb writes for the hubagent package (agent/Cargo.toml).
cat >"$doc/copyright" <<'COPYRIGHT'
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: hubagent
Source: https://example.invalid/hubagent
Copyright: 2026, hubagent developers
License: MIT OR Apache-2.0
COPYRIGHT
chmod 0644 "$doc/copyright" "$doc/changelog.Debian.gz"
install -d "$stage/DEBIAN"
cat >"$stage/DEBIAN/control" <<CONTROL
Package: hubagent-dev
Source: hubagent
Version: $version
Architecture: all
Maintainer: hubagent developers <hubagent@example.invalid>
Installed-Size: $(du -sk --exclude=DEBIAN "$stage" | cut -f1)
Recommends: pkgconf | pkg-config
Suggests: hubagent, gcc | c-compiler
Section: libdevel
Priority: optional
Homepage: https://example.invalid/hubagent
Description: hubagent plugin development files (C header, pkg-config, examples)
 hubagent is an edge agent for Azure IoT Hub that publishes telemetry from
 plugins. This package is for plugin authors: the C header of the library
 plugin ABI ($abi) with a pkg-config file (hubagent-plugin), so that
 "cc \$(pkg-config --cflags hubagent-plugin) -shared -fPIC" builds a plugin,
 the plugin rules (plugins.md), and example plugins in C and Python.
CONTROL
(cd "$stage" && find usr -type f -exec md5sum {} + | sort -k2 >DEBIAN/md5sums)
chmod 0644 "$stage/DEBIAN/control" "$stage/DEBIAN/md5sums"
mkdir -p "$out"
deb="$out/hubagent-dev_${version}_all.deb"
dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >&2
echo "$deb"
