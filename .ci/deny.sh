#!/usr/bin/env bash
# cargo-deny: licenses, bans and sources always; advisories against the RustSec database.
# The database is a git repository on GitHub; when this machine cannot fetch it (CI has no route to
# GitHub), the advisories check is skipped with a loud notice rather than silently passing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo-deny >/dev/null 2>&1; then
    cargo install --locked cargo-deny@0.20.2
fi
cargo deny --locked check licenses bans sources
if timeout 60 cargo deny fetch db >/dev/null 2>&1; then
    cargo deny --locked check advisories
else
    echo "NOTICE: cargo deny advisories SKIPPED: the RustSec advisory database (github.com/rustsec/advisory-db)"
    echo "NOTICE: cannot be fetched from this machine. Known advisories and their reasons are listed in deny.toml."
fi
