#!/usr/bin/env python3
"""Profile of the agent's live telemetry path (issue 18; docs/benchmarks.md, "Profile and what it
changed"): row 1's setup (hubsim, the release daemon with the `bench` library plugin in its own
plugin host, the durable queue), a burst of --messages, and `perf record -g` (or `perf stat`)
attached to the daemon and its plugin host only, for the burst alone.

    python3 bench/profile.py                       # perf record; prints the top symbols per process
    python3 bench/profile.py --stat                # perf stat: task-clock, context switches, syscalls
    python3 bench/profile.py --agent OTHER/target/release/hubagent   # another build's daemon
    python3 bench/profile.py --stat --batch 1024   # the bench plugin's batches of 1,024, not 64
    python3 bench/profile.py --stat --per-thread   # perf stat's counts for each thread
    python3 bench/profile.py --syscalls            # strace -c: the daemon's system calls, counted

Run after a release build (bench/run.sh builds one). Needs perf (Debian: linux-perf) and, for
attaching to processes, root or kernel.perf_event_paranoid <= 1; --syscalls needs strace, which
slows the daemon down many times over (its counts are what to read, not its times).
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402  (bench/run.py: hubsim, the agent, the burst)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=200_000)
    ap.add_argument("--stat", action="store_true", help="perf stat instead of perf record")
    ap.add_argument("--per-thread", action="store_true", help="with --stat: counts for each thread")
    ap.add_argument("--syscalls", action="store_true",
                    help="strace -c -f of the daemon instead of perf: how many system calls of each kind")
    ap.add_argument("--agent", type=Path, help="the hubagent binary (default: target/release/hubagent); "
                    "hubsim, the plugin host and the plugin libraries are taken from beside it")
    ap.add_argument("--batch", type=int, help="messages per publish_batch of the bench plugin "
                    "(default: the plugin's, 64, as row 1 sends them)")
    ap.add_argument("--out", type=Path, default=Path("perf-agent.data"), help="perf record's output")
    opts = ap.parse_args()
    if opts.agent:
        run.REL = opts.agent.resolve().parent
    work = Path(tempfile.mkdtemp(prefix="hubagent-profile-"))
    sim = run.Hubsim(work)
    try:
        key = run.enroll_agent(sim)
        run.clear_bench_desired(sim)
        agent = run.Agent(work, sim, "agent", key, [("bench", "hubagent_bench_plugin", {"count": 0})])
        agent.start()
        agent.wait_running(["bench"])
        pids = run.tree(agent.proc.pid)
        pid_list = ",".join(str(p) for p in pids)
        if opts.syscalls:
            cmd = ["strace", "-c", "-f", "-p", str(pids[0])]
        elif opts.stat:
            cmd = (["perf", "stat"] + (["--per-thread"] if opts.per_thread else [])
                   + ["-e", "task-clock,context-switches,cpu-migrations,page-faults,raw_syscalls:sys_enter",
                      "-p", pid_list])
        else:
            cmd = ["perf", "record", "-g", "-F", "1999", "-o", str(opts.out), "-p", pid_list]
        perf = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE)
        time.sleep(0.5)  # perf attaches to every thread of the processes before the burst starts
        rate, cpu_per_k = run.burst(sim, agent.proc.pid, opts.messages, "profile", opts.batch)
        perf.send_signal(2)
        out, err = perf.communicate(timeout=120)
        agent.stop()
        print(f"{opts.messages} messages: {rate:.0f} msg/s, {cpu_per_k * 1000:.1f} ms CPU per 1,000 "
              f"(daemon pid {pids[0]}, plugin host {pids[1:]})")
        if perf.returncode not in (0, -2, 130):
            sys.exit(f"perf failed ({perf.returncode}): {err.decode()[-2000:]}")
        if opts.stat or opts.syscalls:
            print(err.decode())
        else:
            for pid in pids:
                report = subprocess.run(
                    ["perf", "report", "-i", str(opts.out), "--no-children", "--pid", str(pid),
                     "--sort", "dso,sym", "-g", "none", "--percent-limit", "0.7", "--stdio"],
                    capture_output=True, check=True).stdout.decode()
                print(f"--- pid {pid} ({'daemon' if pid == pids[0] else 'plugin host'})")
                print("\n".join(line for line in report.splitlines() if line and not line.startswith("#")))
    finally:
        for agent in run.STARTED:
            if agent.proc:
                agent.stop()
        sim.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
