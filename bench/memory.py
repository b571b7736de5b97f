#!/usr/bin/env python3
"""Where the agent's memory goes (issue 18): the release daemon with the benchmark's three plugins
(row 2c's setup, bench/run.py), idle, broken down per process from /proc/PID/smaps.

    python3 bench/memory.py            # after bash bench/run.sh (or its cargo build --release)
    python3 bench/memory.py --agent OTHER/target/release/hubagent   # another build's daemon

For every process of the agent's tree (`hubagent run` and its `hubagent-plugin-host` children) it
prints VmRSS and where those pages are: the process's executable's code and read-only data (file
pages, clean), the executable's writable and relocated data (dirty), the plugin library, other shared
libraries, the main heap ([heap], glibc's main arena), the other anonymous mappings split into
glibc's per-thread arenas (64 MiB-aligned reservations), thread stacks (the mapping each thread's
stack pointer is in, from /proc/PID/task/TID/syscall) and the rest. Runs hubsim on a free port (not
8883), so it can run beside the benchmark. Standard library only; needs to read the processes'
/proc files (root, or the same user: the daemon marks itself non-dumpable, which hides smaps from
other users).
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (bench/run.py: hubsim, the agent and the plugins as row 2c has them)

ARENA_ALIGN = 64 << 20  # glibc's HEAP_MAX_SIZE on 64-bit: non-main arenas are aligned to it


class Agent(bench.Agent):
    """bench/run.py's agent, with the hubagent binary to start as a choice (a before/after)."""

    binary = bench.REL / "hubagent"

    def start(self, notify=None):
        self.log = open(self.dir / "agent.log", "ab")
        bench.STARTED.append(self)
        self.proc = subprocess.Popen([str(self.binary), "--config", str(self.config), "run"],
                                     stdout=self.log, stderr=subprocess.STDOUT)


def mappings(pid):
    """(start, end, perms, path, {field: kB}) for each mapping in /proc/PID/smaps."""
    out, current = [], None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(None, 5)
        if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            start, end = (int(x, 16) for x in head[0].split("-"))
            current = (start, end, head[1], head[5] if len(head) > 5 else "", {})
            out.append(current)
        elif head[0].endswith(":") and len(head) >= 2 and head[1].isdigit():
            current[4][head[0][:-1]] = int(head[1])
    return out


def stack_pointers(pid):
    """The stack pointer of each thread (blocked in a system call, as idle threads are)."""
    sps = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "syscall").read_text().split()
            comm = (task / "comm").read_text().strip()
        except OSError:
            continue
        if len(fields) >= 8:
            sps[int(task.name)] = (int(fields[-2], 16), comm)
    return sps


def breakdown(pid, exe):
    maps = mappings(pid)
    sps = stack_pointers(pid)
    stacks = {}
    for tid, (sp, comm) in sps.items():
        for m in maps:
            if m[0] <= sp < m[1]:
                stacks[m[0]] = comm
    rows = {}

    def add(what, m):
        r = rows.setdefault(what, [0, 0, 0])
        r[0] += m[4].get("Rss", 0)
        r[1] += m[4].get("Private_Dirty", 0)
        r[2] += 1

    for m in maps:
        start, end, perms, path, f = m
        if not f.get("Rss"):
            continue
        name = Path(path).name
        if path == exe:
            add("binary: code (r-x)" if "x" in perms else
                "binary: relocated + writable data (rw)" if "w" in perms else
                "binary: read-only data (r--)", m)
        elif path.endswith(".so") and "hubagent" in name:
            add("plugin library", m)
        elif path.startswith("/") and ".so" in name:
            add(f"shared libraries ({'libc' if name.startswith('libc.') else 'other'})", m)
        elif path == "[heap]":
            add("heap: main arena ([heap])", m)
        elif path == "[stack]":
            add("stack: main thread", m)
        elif start in stacks:
            add(f"stack: threads ({len([s for s in stacks if s != start]) + 1} in total)", m)
        elif path == "" and start % ARENA_ALIGN == 0:
            add("heap: thread arenas (glibc, 64 MiB-aligned)", m)
        elif path == "":
            add("anonymous, other (large allocations, thread stacks not sampled)", m)
        else:
            add(f"other ({path})", m)
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                  if ":" in line)
    return rows, status, sorted(set(c for _, c in sps.values())), len(sps)


def resident_code(pid, exe, top):
    """Which crates the resident pages of a process's executable code belong to: each page of the
    executable's r-x mapping that /proc/PID/pagemap says is present, attributed to the symbols
    (`nm -S -C`) it holds, by the first path segment of each symbol's name (the crate; for
    `<T as Trait>::f`, T's crate). Includes the pages fault-around mapped without their running."""
    page = os.sysconf("SC_PAGE_SIZE")
    maps = [m for m in mappings(pid) if m[3] == exe]
    base = min(m[0] for m in maps)  # a position-independent executable's first segment is at 0
    present = set()
    with open(f"/proc/{pid}/pagemap", "rb") as pagemap:
        for start, end, perms, _, _ in maps:
            if "x" not in perms:
                continue
            pagemap.seek(start // page * 8)
            entries = pagemap.read((end - start) // page * 8)
            for i in range(0, len(entries), 8):
                if int.from_bytes(entries[i:i + 8], "little") >> 63:
                    present.add((start - base) // page + i // 8)
    nm = subprocess.run(["nm", "-S", "-C", "--defined-only", exe], capture_output=True, text=True, check=True)
    crates, covered = {}, set()
    for line in nm.stdout.splitlines():
        fields = line.split(" ", 3)
        if len(fields) < 4 or fields[2] not in "tTwW":
            continue
        addr, size, name = int(fields[0], 16), int(fields[1], 16), fields[3]
        path = re.search(r"([A-Za-z_][A-Za-z0-9_]*)::", name)
        crate = path.group(1) if path else "(no path: C or assembly)"
        for pg in range(addr // page, (addr + max(size, 1) - 1) // page + 1):
            if pg in present:
                lo, hi = max(addr, pg * page), min(addr + size, (pg + 1) * page)
                crates[crate] = crates.get(crate, 0) + max(hi - lo, 0)
                covered.add(pg)
    total = len(present) * page
    print(f"\n  resident code of {exe}: {total / 1024:.0f} KiB in {len(present)} pages; by crate "
          f"(bytes of its functions in resident pages; {len(present - covered)} pages hold no symbol):")
    for crate, size in sorted(crates.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {crate:<40} {size / 1024:>8.0f} KiB")


def report(pid, exe):
    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    args = [a.decode() for a in cmd if a]
    # A host is `hubagent-plugin-host --build B --name N ...` (before: `hubagent plugin-host`).
    kind = "plugin-host " + args[args.index("--name") + 1] if "--name" in args else "daemon"
    rows, status, comms, threads = breakdown(pid, exe)
    rss = int(status["VmRSS"].split()[0])
    rollup = {line.split(":")[0]: int(line.split()[1]) for line in
              Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]}
    print(f"\n{kind} (pid {pid}): VmRSS {rss / 1024:.2f} MiB (anon {int(status['RssAnon'].split()[0]) / 1024:.2f}, "
          f"file {int(status['RssFile'].split()[0]) / 1024:.2f}), VmHWM {int(status['VmHWM'].split()[0]) / 1024:.2f} MiB, "
          f"{threads} threads ({', '.join(comms)})")
    print(f"  PSS {rollup['Pss'] / 1024:.2f} MiB (anon {rollup['Pss_Anon'] / 1024:.2f}, file {rollup['Pss_File'] / 1024:.2f}); "
          f"private (USS) {(rollup['Private_Clean'] + rollup['Private_Dirty']) / 1024:.2f} MiB")
    print(f"  {'where':<64} {'RSS KiB':>8} {'dirty KiB':>9} {'maps':>5}")
    for what, (r, d, n) in sorted(rows.items(), key=lambda kv: -kv[1][0]):
        print(f"  {what:<64} {r:>8} {d:>9} {n:>5}")
    return rss, rollup['Pss']


def executable(pid):
    """The path of the file a process executes, as its mappings name it."""
    return os.readlink(f"/proc/{pid}/exe")


def breakdowns(pids):
    sizes = [report(p, executable(p)) for p in pids]
    print(f"\nsum of VmRSS now: {sum(r for r, _ in sizes) / 1024:.2f} MiB; sum of PSS (each shared page "
          f"counted once in all): {sum(p for _, p in sizes) / 1024:.2f} MiB")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agent", type=Path, default=bench.REL / "hubagent", help="the hubagent binary")
    ap.add_argument("--idle", type=float, default=12, help="seconds idle before the breakdown (row 2c: 2 + 10)")
    ap.add_argument("--burst", type=int, default=0,
                    help="then a burst of this many messages (row 2d: 50000) and the breakdown after it")
    ap.add_argument("--code", type=int, default=0, metavar="N",
                    help="also the N crates with the most resident code in the daemon (pagemap + nm)")
    ap.add_argument("--keep", action="store_true")
    opts = ap.parse_args()
    bench.MQTT_PORT = bench.free_port()  # not 8883: the benchmark may be running
    agent_binary = opts.agent.resolve()
    work = Path(tempfile.mkdtemp(prefix="hubagent-memory-"))
    sim = agent = None
    try:
        sim = bench.Hubsim(work)
        key = bench.enroll_agent(sim)
        agent = Agent(work, sim, "agent", key, bench.THREE_PLUGINS)
        agent.binary = agent_binary
        agent.start()
        agent.wait_running(["bench", "sensor", "sysmetrics"])
        sampler = bench.Sampler(agent.proc.pid)
        time.sleep(opts.idle)
        peak = sampler.stop()
        pids = bench.tree(agent.proc.pid)
        print(f"{agent_binary}: {len(pids)} processes; peak of the summed VmRSS while idle "
              f"{peak / 1024:.2f} MiB (row 2c's measure)")
        breakdowns(pids)
        if opts.code:
            resident_code(agent.proc.pid, executable(agent.proc.pid), opts.code)
        if opts.burst:
            sampler = bench.Sampler(agent.proc.pid)
            rate, _ = bench.burst(sim, agent.proc.pid, opts.burst, "memory")
            peak = sampler.stop()
            print(f"\nafter a burst of {opts.burst} messages ({rate:.0f} msg/s): peak of the summed VmRSS "
                  f"during it {peak / 1024:.2f} MiB (row 2d's measure)")
            breakdowns(pids)
    finally:
        if agent and agent.proc:
            agent.stop()
        if sim:
            sim.stop()
        if not opts.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
