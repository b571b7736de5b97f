#!/usr/bin/env python3
"""Instructions the daemon and its plugin hosts execute in user space for a burst (issue 18,
docs/benchmarks.md "Reading ahead, one timer, and the hot path's text"): row 2c's agent under
valgrind's callgrind, as bench/code_order.py runs it (start-up, --idle seconds, a burst of
--burst messages), once per build given; prints the instruction counts, and with --top the
functions that executed the most in the last build's daemon.

    python3 bench/instructions.py target/release                  # this build
    python3 bench/instructions.py /tmp/before /tmp/after --top 30  # two builds, one after the other

Each directory holds `hubagent` and `hubagent-plugin-host` (a release build's target/release, or
a copy of them); hubsim and the plugin libraries come from target/release. The counts leave out
the kernel (system calls, TCP) and depend only on the code, not on the machine's load, which
moves `perf stat`'s task-clock by ±20 % in the virtual machines these figures come from: the
measure to compare two builds' user-space work by. They include start-up, the same in both.
Needs valgrind and callgrind_annotate.
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import code_order  # noqa: E402  (row 2c's agent under callgrind)


def total(callgrind_out):
    """The instruction count (Ir) callgrind wrote for the whole run."""
    for line in Path(callgrind_out).read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    sys.exit(f"instructions: no total in {callgrind_out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("builds", type=Path, nargs="+", help="directories holding hubagent and hubagent-plugin-host")
    ap.add_argument("--burst", type=int, default=20_000, help="messages in the burst (default 20,000)")
    ap.add_argument("--idle", type=float, default=1, help="seconds idle after start-up (default 1)")
    ap.add_argument("--top", type=int, default=0, help="then the last build's daemon's N costliest functions")
    opts = ap.parse_args()
    for tool in ("valgrind", "callgrind_annotate"):
        if not shutil.which(tool):
            sys.exit(f"instructions: needs {tool} (apt-get install valgrind)")
    print(f"| build | daemon, instructions | per message | plugin hosts, instructions |")
    print("| --- | --- | --- | --- |")
    for build in opts.builds:
        work = Path(tempfile.mkdtemp(prefix="hubagent-instructions-"))
        (daemon_out, _), host_outs = code_order.profile(
            build / "hubagent", build / "hubagent-plugin-host", opts.idle, opts.burst, work)
        daemon = total(daemon_out)
        hosts = sum(total(out) for out in host_outs)
        print(f"| {build} | {daemon:,} | {daemon / opts.burst:,.0f} | {hosts:,} |", flush=True)
        if opts.top and build == opts.builds[-1]:
            report = subprocess.run(["callgrind_annotate", "--threshold=99", str(daemon_out)],
                                    capture_output=True, text=True, check=True).stdout
            rows = [line for line in report.splitlines() if line.strip()[:1].isdigit()]
            print("\n".join(rows[:opts.top + 1]))
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
