#!/usr/bin/env bash
# Usage: packaging/man/manuals.sh HUBAGENT OUT_DIR
# Makes the package's man pages and shell completions in OUT_DIR (emptied first), with HUBAGENT, a
# hubagent binary of the build machine (the pages are the same for every architecture, so a
# cross-built package gets them from the host's binary: packaging/build-deb.sh):
#   man1/*.1.gz    hubagent(1) and one page per subcommand, by `HUBAGENT manuals` (clap_mangen,
#                  from the definition that makes --help)
#   man5/hubagent.toml.5.gz   docs/configuration.md, by pandoc: its tables become tagged
#                  paragraphs (tables-as-lists.lua), links the documents' names, and only fonts a
#                  terminal has are asked for (terminal-fonts.awk)
#   completions/bash/hubagent, zsh/_hubagent, fish/hubagent.fish   by `HUBAGENT manuals` (clap_complete)
# Pages are compressed with gzip -9n, as Debian policy and lintian want (no name or time stamp
# inside: the same sources make the same bytes).
set -euo pipefail
[ "$#" -eq 2 ] || { echo "usage: $0 HUBAGENT OUT_DIR" >&2; exit 2; }
bin="$1" out="$2"
cd "$(dirname "$0")/../.."
command -v pandoc >/dev/null || { echo "manuals: pandoc is needed for hubagent.toml(5) (apt install pandoc; tests/setup.sh installs it)" >&2; exit 1; }
rm -rf "$out"
mkdir -p "$out/man5"
"$bin" manuals "$out"
version="$("$bin" --version | awk '{print $2}')"
# docs/configuration.md starts with its title, which the page's NAME replaces.
[ "$(head -1 docs/configuration.md)" = "# Configuration reference" ] \
    || { echo "manuals: docs/configuration.md no longer starts with '# Configuration reference': update $0" >&2; exit 1; }
{
    printf '## NAME\n\nhubagent.toml \\- the configuration of hubagent(1)\n\n## DESCRIPTION\n\n'
    tail -n +2 docs/configuration.md
    printf '\n## SEE ALSO\n\n**hubagent**(1); the full documentation in /usr/share/doc/hubagent (README.md, plugins.md, security.md, tpm.md).\n'
} | pandoc --from gfm --to man --standalone --shift-heading-level-by=-1 \
    --lua-filter packaging/man/tables-as-lists.lua -V adjusting=l \
    -M title=hubagent.toml -M section=5 -M header="hubagent manual" -M footer="hubagent $version" \
    | awk -f packaging/man/terminal-fonts.awk >"$out/man5/hubagent.toml.5"
gzip -9n "$out"/man1/*.1 "$out"/man5/*.5
