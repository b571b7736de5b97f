#!/usr/bin/env bash
# cargo-deny: licenses, bans and sources always; advisories against the RustSec database.
#
# The RustSec database is a git repository on GitHub, and CI machines have no route to GitHub; no
# package we found in the registries CI can reach (crates.io, PyPI, Debian) ships a copy. So:
#   * with HUBAGENT_ADVISORY_DB=<path to a checkout of rustsec/advisory-db>, the advisories check
#     runs offline against that checkout;
#   * otherwise it runs when `cargo deny fetch db` succeeds;
#   * otherwise it is SKIPPED with a loud notice (never a silent pass). See docs/security.md.
set -euo pipefail
cd "$(dirname "$0")/.."

# Pinned so every machine runs the same rules; 0.20.2 builds with the machine's rustc (1.95).
deny_version=0.20.2
if ! cargo deny --version 2>/dev/null | grep -qx "cargo-deny $deny_version"; then
    echo "deny: installing cargo-deny $deny_version"
    cargo install --locked "cargo-deny@$deny_version"
fi

cargo deny --locked check licenses bans sources

if [ -n "${HUBAGENT_ADVISORY_DB:-}" ]; then
    # cargo-deny reads the database location only from its config: point a copy of ours at a
    # folder holding the checkout under the name cargo-deny derives from the default URL.
    db_root=$(mktemp -d)
    trap 'rm -rf "$db_root"' EXIT
    ln -s "$(realpath "$HUBAGENT_ADVISORY_DB")" "$db_root/advisory-db-3157b0e258782691"
    sed "s|^\[advisories\]|[advisories]\ndb-path = \"$db_root\"\ndb-urls = [\"https://github.com/rustsec/advisory-db\"]|" \
        deny.toml > "$db_root/deny.toml"
    echo "deny: advisories against the local database $HUBAGENT_ADVISORY_DB" \
         "($(git -C "$HUBAGENT_ADVISORY_DB" log -1 --format=%cs 2>/dev/null || echo 'date unknown'))"
    cargo deny --locked --offline --config "$db_root/deny.toml" check advisories
elif timeout 60 cargo deny fetch db >/dev/null 2>&1; then
    cargo deny --locked check advisories
else
    cat <<'NOTICE'

##########################################################################################
# NOTICE: cargo deny check advisories was SKIPPED.
# The RustSec advisory database (a git repository on GitHub) cannot be fetched from this
# machine, and we know of no package in the registries it reaches that ships a copy.
# Licenses, bans and sources WERE checked. The advisories that apply to Cargo.lock, and why
# each does not affect hubagent, are listed in deny.toml; to check against a local copy:
#     HUBAGENT_ADVISORY_DB=/path/to/advisory-db bash .ci/deny.sh
##########################################################################################

NOTICE
fi
