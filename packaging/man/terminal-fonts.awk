# Used by packaging/man/manuals.sh on pandoc's output for hubagent.toml(5).
# pandoc 2.17's man output asks for fonts a terminal does not have: groff 1.23 (Debian 13) warns
# about them, and lintian fails on groff's warnings. Its font probe (.ie/.el choosing V) becomes
# the choice it makes on a terminal (V = bold), and code blocks' \f[C] the roman font.
/^\.ie "\\f\[CB\]x\\f\[\]"x" \\\{\\$/ { probe = 1 }
probe {
    if ($0 ~ /^\.el /) in_else = 1
    if (in_else && $0 == ".\\}") {
        probe = 0
        print ".ftr V B"; print ".ftr VI BI"; print ".ftr VB B"; print ".ftr VBI BI"
    }
    next
}
{ gsub(/\\f\[C\]/, "\\f[R]"); print }
