#!/usr/bin/env bash
# cargo-deny: licenses, bans and sources, and advisories against the RustSec database.
#
# The RustSec database is a git repository on GitHub, which CI machines cannot reach. Where it comes
# from, first found wins:
#   * HUBAGENT_ADVISORY_DB=<path to a checkout of rustsec/advisory-db>;
#   * ../shared/rustsec-advisory-db.bundle beside the checkout (a git bundle of the database that
#     CI provides; cloned into a temporary directory);
#   * `cargo deny fetch db` (a machine that reaches GitHub).
# With none of them the check FAILS: an advisories check that silently does not run is no check.
# See docs/security.md.
set -euo pipefail
cd "$(dirname "$0")/.."

# Pinned so every machine runs the same rules; 0.20.2 builds with the machine's rustc (1.95).
deny_version=0.20.2
if ! cargo deny --version 2>/dev/null | grep -qx "cargo-deny $deny_version"; then
    echo "deny: installing cargo-deny $deny_version"
    cargo install --locked "cargo-deny@$deny_version"
fi

cargo deny --locked check licenses bans sources

bundle=../shared/rustsec-advisory-db.bundle
if [ -z "${HUBAGENT_ADVISORY_DB:-}" ] && [ -f "$bundle" ]; then
    bundle_checkout=$(mktemp -d)
    git clone -q "$bundle" "$bundle_checkout/advisory-db"
    HUBAGENT_ADVISORY_DB="$bundle_checkout/advisory-db"
fi

if [ -n "${HUBAGENT_ADVISORY_DB:-}" ]; then
    # cargo-deny reads the database location only from its config: point a copy of ours at a
    # folder holding the checkout under the name cargo-deny derives from the default URL.
    db_root=$(mktemp -d)
    trap 'rm -rf "$db_root" "${bundle_checkout:-}"' EXIT
    ln -s "$(realpath "$HUBAGENT_ADVISORY_DB")" "$db_root/advisory-db-3157b0e258782691"
    sed "s|^\[advisories\]|[advisories]\ndb-path = \"$db_root\"\ndb-urls = [\"https://github.com/rustsec/advisory-db\"]|" \
        deny.toml > "$db_root/deny.toml"
    echo "deny: advisories against the local database $HUBAGENT_ADVISORY_DB" \
         "($(git -C "$HUBAGENT_ADVISORY_DB" log -1 --format=%cs 2>/dev/null || echo 'date unknown'))"
    cargo deny --locked --offline --config "$db_root/deny.toml" check advisories
elif timeout 60 cargo deny fetch db >/dev/null 2>&1; then
    cargo deny --locked check advisories
else
    cat >&2 <<'ERROR'
deny: FAILED: no RustSec advisory database. Neither HUBAGENT_ADVISORY_DB nor
../shared/rustsec-advisory-db.bundle is there, and `cargo deny fetch db` cannot reach GitHub.
Point HUBAGENT_ADVISORY_DB at a checkout of rustsec/advisory-db (docs/security.md).
ERROR
    exit 1
fi
