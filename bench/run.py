#!/usr/bin/env python3
"""hubagent benchmark (issue #8): the release agent, its peers and hubsim, on loopback.

Run through bench/run.sh, which builds everything in release mode first. Prints a table where each
figure is the median of --runs runs with its spread (min-max); --write-doc also puts it into
docs/benchmarks.md between the generated-table markers. Standard library only.
"""

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REL = ROOT / "target" / "release"
VENV_PY = ROOT / "target" / "interop-venv" / "bin" / "python"
DOC = ROOT / "docs" / "benchmarks.md"
MQTT_PORT = 8883  # Azure's Python SDK can dial no other port
SIZE = 256
AGENT_REG = "bench-agent"
GROUP = "bench-group"


def log(text):
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def wait_for(what, check, timeout, interval=0.01):
    """Polls check() until it returns something truthy; fails naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def port_free(port):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# Process accounting: CPU time and resident memory of a process and all its descendants (/proc).

CLK = os.sysconf("SC_CLK_TCK")


def _children(pid):
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def tree(pid):
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo += _children(p)
    return pids


def cpu_seconds(pids):
    """User + system time of these processes (and of children they have reaped)."""
    total = 0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
        except (OSError, IndexError):
            pass
    return total / CLK


def rss_kib(pids):
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def pss_kib(pids):
    """The summed PSS of these processes: a page mapped by N processes counts 1/N in each, so the
    sum counts every page once (what they cost the machine's memory, where VmRSS counts a shared
    page in every process that maps it)."""
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            pass
    return total


class Sampler:
    """Samples the summed RSS of a process tree every 20 ms; `peak` is the largest sum seen. With
    `pss`, also the summed PSS of the same processes read right after each sample's VmRSS:
    `pss_at_peak` is that sum at the sample with the largest summed VmRSS (row 2c′ beside 2c)."""

    def __init__(self, pid, pss=False):
        self.pid, self.peak, self.pss_at_peak, self._stop = pid, 0, 0, threading.Event()
        self._pss = pss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            pids = tree(self.pid)
            rss = rss_kib(pids)
            if rss > self.peak:
                self.peak = rss
                if self._pss:
                    self.pss_at_peak = pss_kib(pids)
            self._stop.wait(0.02)

    def reset(self):
        """Starts a new peak (of VmRSS only: reading PSS walks the page tables, not wanted under load)."""
        self._pss = False
        self.peak = rss_kib(tree(self.pid))

    def stop(self):
        self._stop.set()
        self._thread.join()
        return self.peak


def run_measured(cmd, env=None, timeout=900):
    """Runs a single-process peer and returns (last JSON line, cpu seconds, peak RSS KiB)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out_chunks = []
    reader = threading.Thread(target=lambda: out_chunks.append(proc.stdout.read()), daemon=True)
    err_chunks = []
    err_reader = threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()), daemon=True)
    reader.start()
    err_reader.start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join(timeout)
    err_reader.join(timeout)
    if proc.returncode != 0:
        err = b"".join(err_chunks).decode()[-2000:]
        raise RuntimeError(f"{Path(cmd[0]).name} {cmd[1] if len(cmd) > 1 else ''} failed ({proc.returncode}): {err}")
    lines = [line for line in b"".join(out_chunks).decode().splitlines() if line.startswith("{")]
    return json.loads(lines[-1]), usage.ru_utime + usage.ru_stime, usage.ru_maxrss


# ---------------------------------------------------------------------------------------------
# hubsim


class Hubsim:
    def __init__(self, work, name="hubsim", binary=None):
        self.dir = work / name
        binary = binary or REL / "hubsim"
        self.https_port = free_port()
        if not port_free(MQTT_PORT):
            log(f"port {MQTT_PORT} is taken (another hubsim?); waiting up to 10 minutes for it")
            wait_for(f"port {MQTT_PORT} to be free", lambda: port_free(MQTT_PORT), 600, 2)
        self.log = open(work / f"{name}.log", "wb")
        self.proc = subprocess.Popen(
            [str(binary), "serve", "--state-dir", str(self.dir), "--mqtt-port", str(MQTT_PORT),
             "--https-port", str(self.https_port), "--retry-after", "0", "--telemetry-keep", "1000"],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "RUST_LOG": "warn"})
        wait_for("hubsim to write endpoints.json", lambda: (self.dir / "endpoints.json").exists()
                 or self.proc.poll() is not None, 60)
        if self.proc.poll() is not None:
            raise RuntimeError(f"hubsim exited at start; see {work / (name + '.log')}")
        self.ca = self.dir / "ca.pem"
        self.ssl = ssl.create_default_context(cafile=str(self.ca))
        self.tokens = {p: subprocess.check_output(
            [str(binary), "token", "--state-dir", str(self.dir), "--policy", p, "--ttl", "6h"]
        ).decode().strip() for p in ("hub", "dps")}
        self.scope = json.loads((self.dir / "endpoints.json").read_text())["idScope"]
        wait_for("hubsim's management API", self._up, 30, 0.05)

    def _up(self):
        try:
            return self.api("GET", "/sim/status") is not None
        except OSError:
            return False

    def api(self, method, path, body=None, policy="hub"):
        req = urllib.request.Request(
            f"https://localhost:{self.https_port}{path}", method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": self.tokens[policy], "Content-Type": "application/json"})
        with urllib.request.urlopen(req, context=self.ssl, timeout=30) as r:
            text = r.read()
            return json.loads(text) if text else {}

    def received(self, device):
        return self.api("GET", "/sim/status")["telemetryReceived"].get(device, 0)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


# ---------------------------------------------------------------------------------------------
# the agent


STARTED = []  # every Agent, so a failed run leaves no daemon behind


class Agent:
    """The release hubagent with its own state dir; library plugins copied to a root-owned
    0700 directory so the plugin path check passes when the benchmark runs as root."""

    def __init__(self, work, sim, name, key, plugins, hub_extra="", env=None):
        self.dir = work / name
        self.env = env or {}
        self.dir.mkdir(mode=0o700, exist_ok=True)
        self.sim, self.socket = sim, self.dir / "control.sock"
        keyfile = self.dir / "device.key"
        keyfile.write_text(key)
        keyfile.chmod(0o600)
        self.plugin_dir = self.dir / "plugins"
        self.plugin_dir.mkdir(mode=0o755, exist_ok=True)
        self.config = self.dir / "config.toml"
        self.base = f"""
[agent]
state_dir = "{self.dir / 'state'}"
control_socket = "{self.socket}"
log_level = "warn"
allow_unsafe_plugin_paths = {'true' if os.getuid() != 0 else 'false'}

[provisioning]
source = "dps"
global_endpoint = "localhost"
id_scope = "{sim.scope}"
registration_id = "{AGENT_REG}"

[provisioning.attestation]
method = "symmetric_key"
key = {{ file = "{keyfile}" }}

[hub]
port = {MQTT_PORT}
trust_bundle = "{sim.ca}"
reconnect_backoff_max = "1s"
{hub_extra}
[queue]
max_bytes = "4GiB"
"""
        self.set_plugins(plugins)
        self.proc = None

    def plugin(self, name, lib, settings, extra=""):
        src = REL / f"lib{lib}.so"
        dst = self.plugin_dir / src.name
        if not dst.exists():
            shutil.copyfile(src, dst)
            dst.chmod(0o644)
        return (f'\n[[plugin]]\nname = "{name}"\nkind = "library"\npath = "{dst}"\n'
                f"max_rate = 1000000000\nburst = 1000000000\n{extra}"
                f"[plugin.settings]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items()))

    def set_plugins(self, plugins):
        text = self.base + "".join(self.plugin(*p) for p in plugins)
        self.config.write_text(text)

    def start(self, notify=None):
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        env.update(self.env)
        if notify:
            env["NOTIFY_SOCKET"] = notify
        self.log = open(self.dir / "agent.log", "ab")
        STARTED.append(self)
        self.started = time.time()
        self.proc = subprocess.Popen([str(REL / "hubagent"), "--config", str(self.config), "run"],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env)
        return self.started

    def status(self):
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(30)
                s.connect(str(self.socket))
                s.sendall(b'{"command":"status"}\n')
                data = b""
                while not data.endswith(b"\n"):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            answer = json.loads(data)
            return answer.get("result") if answer.get("ok") else None
        except (OSError, ValueError):
            if self.proc and self.proc.poll() is not None:
                raise RuntimeError(f"the agent exited ({self.proc.returncode}); see {self.dir / 'agent.log'}")
            return None

    def wait_running(self, plugins, timeout=60):
        def ready():
            s = self.status()
            if not s or s["connection"] != "connected":
                return None
            states = {n: p.get("status") for n, p in (s.get("plugins") or {}).items()}
            return s if all(states.get(n) == "running" for n in plugins) else None
        return wait_for(f"the agent to connect with plugins {plugins} running", ready, timeout, 0.02)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            t0 = time.monotonic()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            if time.monotonic() - t0 > 2:
                log(f"note: the agent took {time.monotonic() - t0:.1f} s to stop ({self.dir.name})")
        self.proc = None
        self.log.close()


class NotifySocket:
    """A NOTIFY_SOCKET as systemd provides it; `wait_ready` returns when READY=1 arrives."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)

    def wait_ready(self, timeout=30):
        self.sock.settimeout(timeout)
        while True:
            data = self.sock.recv(4096).decode()
            if "READY=1" in data.split("\n"):
                return time.time()

    def close(self):
        self.sock.close()
        os.unlink(self.path)


# ---------------------------------------------------------------------------------------------
# the rows


def enroll_agent(sim, name=AGENT_REG):
    enrollment = sim.api("PUT", f"/enrollments/{name}",
                         {"registrationId": name, "attestation": {"type": "symmetricKey"}}, policy="dps")
    return enrollment["attestation"]["symmetricKey"]["primaryKey"]


def device(sim, device_id):
    """The device's primary key; the device is created once (the hub, like hubsim, answers 409 to
    a second create without If-Match)."""
    try:
        d = sim.api("GET", f"/devices/{device_id}")
    except urllib.error.HTTPError as e:
        if e.code != 404:
            raise
        d = sim.api("PUT", f"/devices/{device_id}",
                    {"deviceId": device_id, "authentication": {"type": "sas"}, "status": "enabled"})
    return d["authentication"]["symmetricKey"]["primaryKey"]


def clear_bench_desired(sim):
    """The twin's desired settings override the configuration: drop an earlier run's burst
    (there is no twin before the agent's first registration)."""
    try:
        sim.api("PATCH", f"/twins/{AGENT_REG}", {"properties": {"desired": {"plugins": {"bench": None}}}})
    except urllib.error.HTTPError as e:
        if e.code != 404:
            raise


def wait_received(sim, device, target, timeout):
    """Polls hubsim until `device` has `target` messages; returns (first-seen time, done time)."""
    first, deadline = None, time.monotonic() + timeout
    start = sim.received(device)
    while True:
        n = sim.received(device)
        now = time.time()
        if first is None and n > start:
            first = now
        if n >= target:
            return first or now, now
        if time.monotonic() > deadline:
            raise RuntimeError(f"hubsim has {n} of {target} messages from {device} after {timeout}s")
        time.sleep(0.005 if first is None else 0.05)


THREE_PLUGINS = [("bench", "hubagent_bench_plugin", {"count": 0}),
                 ("sensor", "hubagent_simulated_sensor", {"interval": "5s"}),
                 ("sysmetrics", "hubagent_sysmetrics", {"interval": "30s"})]


def agent_runs(sim, work, opts, results):
    """Rows 1-3 for the agent: per run, a fresh DPS registration with the first message, idle
    with three plugins, a burst of messages through the queue, then a restart on the cache."""
    key = enroll_agent(sim)
    for run in range(opts.runs):
        clear_bench_desired(sim)
        agent = Agent(work, sim, f"agent-{run}", key,
                      [("bench", "hubagent_bench_plugin", {"count": 1, "run": "first"})] + THREE_PLUGINS[1:])
        base = sim.received(AGENT_REG)
        notify = NotifySocket(work / f"notify-{run}")
        t0 = agent.start(notify.path)
        _, first = wait_received(sim, AGENT_REG, base + 1, 60)
        results["first_telemetry_fresh"].append(first - t0)
        notify.close()
        agent.wait_running(["bench", "sensor", "sysmetrics"])
        pid = agent.proc.pid

        # Idle with three plugins (process isolation: three plugin-host children).
        time.sleep(2)  # let start-up work (twin, first readings) finish before measuring idle
        sampler = Sampler(pid, pss=True)
        c0, t_idle = cpu_seconds(tree(pid)), time.time()
        time.sleep(opts.idle_seconds)
        results["idle_cpu_pct"].append(100 * (cpu_seconds(tree(pid)) - c0) / (time.time() - t_idle))
        results["idle_rss"].append(sampler.peak / 1024)
        results["idle_pss"].append(sampler.pss_at_peak / 1024)
        procs = len(tree(pid))

        # Load: a burst of N messages from the bench plugin, triggered through the twin.
        sampler.reset()
        rate, cpu_per_k = burst(sim, pid, opts.messages, run)
        results["agent_rate"].append(rate)
        results["agent_cpu_per_k"].append(cpu_per_k)
        results["load_rss"].append(sampler.stop() / 1024)
        agent.stop()

        # Restart with the cached assignment: exec to READY=1, and to connected.
        notify = NotifySocket(work / f"notify-{run}")
        t0 = agent.start(notify.path)
        results["ready_cached"].append(notify.wait_ready() - t0)
        notify.close()
        agent.stop()
        log(f"agent run {run + 1}: {results['agent_rate'][-1]:.0f} msg/s, first telemetry "
            f"{results['first_telemetry_fresh'][-1] * 1000:.0f} ms, READY {results['ready_cached'][-1] * 1000:.0f} ms, "
            f"{procs} processes")


def burst(sim, pid, count, run, batch=None):
    """A burst of `count` messages from the bench plugin of the agent `pid`, triggered through
    the twin (`run` tells bursts apart; `batch`: messages per `publish_batch`, the plugin's
    default of 64 when not given): (msg/s until hubsim has them all, CPU s per 1,000)."""
    base = sim.received(AGENT_REG)
    c0, t0 = cpu_seconds(tree(pid)), time.time()
    settings = {"count": count, "run": run}
    if batch is not None:
        settings["batch"] = batch
    sim.api("PATCH", f"/twins/{AGENT_REG}",
            {"properties": {"desired": {"plugins": {"bench": settings}}}})
    _, done = wait_received(sim, AGENT_REG, base + count, 600)
    return count / (done - t0), 1000 * (cpu_seconds(tree(pid)) - c0) / count


class Tinyproxy:
    """Debian's tinyproxy on a free loopback port, CONNECT to any port, no authentication: the
    proxy of rows 1c/2e (the test suite's, tests/support/proxy.rs)."""

    def __init__(self, work):
        self.port = free_port()
        conf = work / "tinyproxy.conf"
        conf.write_text(f"Port {self.port}\nListen 127.0.0.1\nTimeout 600\nMaxClients 100\n"
                        f"Allow 127.0.0.1\nLogLevel Warning\nLogFile \"{work / 'tinyproxy.log'}\"\n")
        self.proc = subprocess.Popen(["tinyproxy", "-d", "-c", str(conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for("tinyproxy to listen", lambda: not port_free(self.port), 30, 0.02)

    def stop(self):
        self.proc.kill()
        self.proc.wait()


def websocket_runs(sim, work, opts, results):
    """Rows 1b/1c/2e: the same burst as row 1 over MQTT over WebSockets (hubsim's HTTPS port), and
    through an HTTP proxy (tinyproxy) too, by the agent and by bare rumqttc, in the same run as
    row 1 so the figures compare."""
    if shutil.which("tinyproxy") is None:
        log("no tinyproxy (Debian package tinyproxy; tests/setup.sh installs it): no proxy rows")
        proxy = None
    else:
        proxy = Tinyproxy(work)
    routes = [("ws", {})] + ([("proxy", {"https_proxy": f"http://127.0.0.1:{proxy.port}"})] if proxy else [])
    key = enroll_agent(sim)
    bare_key = device(sim, "bench-bare")
    try:
        for run in range(opts.runs):
            for name, env in routes:
                clear_bench_desired(sim)
                agent = Agent(work, sim, f"{name}-{run}", key, [("bench", "hubagent_bench_plugin", {"count": 0})],
                              hub_extra=f'transport = "websockets"\nwebsocket_port = {sim.https_port}\n', env=env)
                agent.start()
                agent.wait_running(["bench"])
                rate, cpu_per_k = burst(sim, agent.proc.pid, opts.messages, f"{name}-{run}")
                agent.stop()
                results[f"agent_{name}_rate"].append(rate)
                results[f"agent_{name}_cpu_per_k"].append(cpu_per_k)
                bare = ["--websocket", "--port", str(sim.https_port)]
                if name == "proxy":
                    bare += ["--proxy", f"127.0.0.1:{proxy.port}"]
                out, cpu, _ = run_measured([str(REL / "bench-publisher"), "--ca", str(sim.ca), "--device-id", "bench-bare",
                                            "--count", str(opts.messages), "--size", str(SIZE)] + bare,
                                           env={**os.environ, "BENCH_DEVICE_KEY": bare_key})
                results[f"bare_{name}_rate"].append(out["msgs_per_s"])
                results[f"bare_{name}_cpu_per_k"].append(1000 * cpu / opts.messages)
                log(f"{name} run {run + 1}: agent {rate:.0f} msg/s, bare rumqttc {out['msgs_per_s']:.0f} msg/s")
    finally:
        if proxy:
            proxy.stop()


def bare_runs(sim, opts, results):
    key = device(sim, "bench-bare")
    for run in range(opts.runs):
        out, cpu, rss = run_measured([str(REL / "bench-publisher"), "--ca", str(sim.ca), "--device-id", "bench-bare",
                                      "--count", str(opts.messages), "--size", str(SIZE)],
                                     env={**os.environ, "BENCH_DEVICE_KEY": key})
        results["bare_rate"].append(out["msgs_per_s"])
        results["bare_cpu_per_k"].append(1000 * cpu / opts.messages)
        results["bare_rss"].append(rss / 1024)
        log(f"bare rumqttc run {run + 1}: {out['msgs_per_s']:.0f} msg/s")


def sdk_runs(sim, opts, results):
    if not VENV_PY.exists():
        log(f"no {VENV_PY}: skipping Azure's Python SDK (bench/run.sh creates it)")
        return
    key = device(sim, "bench-sdk")
    cs = f"HostName=127.0.0.2;DeviceId=bench-sdk;SharedAccessKey={key}"  # hubsim's default hub
    script = str(ROOT / "bench" / "sdk_publisher.py")
    for run in range(opts.runs):
        out, cpu, rss = run_measured([str(VENV_PY), script, "send", cs, str(sim.ca), str(opts.sdk_messages),
                                      str(SIZE), "32"])
        results["sdk_rate"].append(out["msgs_per_s"])
        results["sdk_cpu_per_k"].append(1000 * cpu / opts.sdk_messages)
        results["sdk_rss"].append(rss / 1024)
        reg = f"bench-sdk-dps-{run}"
        dkey = enroll_agent(sim, reg)
        t0 = time.time()
        out, _, _ = run_measured([str(VENV_PY), script, "provision", reg, sim.scope, dkey, str(sim.ca)])
        results["sdk_first_telemetry_fresh"].append(out["done_at"] - t0)
        log(f"Python SDK run {run + 1}: {results['sdk_rate'][-1]:.0f} msg/s, first telemetry "
            f"{results['sdk_first_telemetry_fresh'][-1] * 1000:.0f} ms")


def backlog_runs(sim, work, opts, results):
    """Row 4: the hub refuses connections while the bench plugin queues `backlog` messages; then
    the hub recovers and the agent drains them."""
    key = enroll_agent(sim)
    clear_bench_desired(sim)
    for run in range(opts.backlog_runs):
        agent = Agent(work, sim, f"backlog-{run}", key, [])
        agent.start()
        agent.wait_running([])  # registered with DPS, assignment cached
        agent.stop()
        sim.api("POST", "/sim/faults", {"refuseConnectionsSeconds": 3600})
        agent.set_plugins([("bench", "hubagent_bench_plugin", {"count": opts.backlog, "run": "backlog"})])
        base = sim.received(AGENT_REG)
        agent.start()
        t_fill = time.time()
        s = wait_for(f"{opts.backlog} messages in the agent's queue",
                     lambda: (lambda st: st if st and st["queue"] and st["queue"]["depth"] >= opts.backlog else None)(
                         agent.status()), 1800, 0.2)
        fill = time.time() - t_fill
        results["queue_bytes_per_msg"].append(s["queue"]["bytes_on_disk"] / s["queue"]["depth"])
        results["fill_rate"].append(opts.backlog / fill)
        sim.api("DELETE", "/sim/faults")
        first, done = wait_received(sim, AGENT_REG, base + opts.backlog, 1800)
        results["drain_rate"].append(opts.backlog / (done - first))
        agent.stop()
        shutil.rmtree(agent.dir / "state" / "queue", ignore_errors=True)
        log(f"backlog run {run + 1}: filled at {results['fill_rate'][-1]:.0f} msg/s, drained at "
            f"{results['drain_rate'][-1]:.0f} msg/s, {results['queue_bytes_per_msg'][-1]:.0f} B/msg on disk")


def hubsim_runs(work, opts, results):
    """Row 5, per run on a fresh hubsim of its own (so every run starts from no devices): register
    `opts.registrations` devices (the rate overall, of the first and of the last tenth), then
    connect all of them at once to the hub and hold them."""
    window = max(1, opts.registrations // 10)
    for run in range(opts.runs):
        sim = Hubsim(work, f"hubsim-row5-{run}", opts.hubsim)
        try:
            group_key = sim.api("PUT", f"/enrollmentGroups/{GROUP}",
                                {"enrollmentGroupId": GROUP, "attestation": {"type": "symmetricKey"}},
                                policy="dps")["attestation"]["symmetricKey"]["primaryKey"]
            env = {**os.environ, "BENCH_GROUP_KEY": group_key}
            prober = [str(REL / "bench-prober"), "--ca", str(sim.ca), "--prefix", "dev",
                      "--count", str(opts.registrations)]
            out, _, _ = run_measured(prober + ["--window", str(window), "register", "--id-scope", sim.scope],
                                     env=env, timeout=7200)
            if out["failed"]:
                raise RuntimeError(f"DPS registrations failed: {out}")
            results["registrations_per_s"].append(out["per_s"])
            results["registrations_first_per_s"].append(out["first_window_per_s"])
            results["registrations_last_per_s"].append(out["last_window_per_s"])
            results["registrations_last_vs_first"].append(out["last_window_per_s"] / out["first_window_per_s"])
            log(f"hubsim run {run + 1}: {out['per_s']:.0f} registrations/s ({opts.registrations:,} devices; "
                f"first {window:,}: {out['first_window_per_s']:.0f}/s, last {window:,}: "
                f"{out['last_window_per_s']:.0f}/s)")
            proc = subprocess.Popen(prober + ["--concurrency", "64", "hold"],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
            first = json.loads(proc.stdout.readline())
            held = sim.api("GET", "/sim/status")["connectedDevices"]
            proc.stdin.close()
            if proc.wait(120) != 0:
                raise RuntimeError(f"bench-prober hold exited with {proc.returncode}")
            results["connections_held"].append(min(first["ok"], held))
            results["connections_per_s"].append(first["per_s"])
            results["hubsim_rss"].append(rss_mib(sim.proc.pid))
            log(f"hubsim run {run + 1}: {held} connections held ({first['failed']} failed, first error: "
                f"{first['first_error']}), {first['per_s']:.0f} connects/s")
        finally:
            sim.stop()


BILLING_READINGS, BILLING_SIZE = 1000, 200
# The bytes' lower bound: 1,000 readings of 200 B in full 4 KB blocks.
BILLING_BOUND = -(-BILLING_READINGS * BILLING_SIZE // 4096)
# batch: the defaults (max_bytes 65536, max_delay 1s: a batch's envelope and its rounding up to
# whole 4 KB blocks once per 16 blocks); batch4k: one block per batch, the default until
# 2026-12-07 (docs/configuration.md, "Which `max_bytes`").
BILLING_MODES = [("alone", ""),
                 ("batch", 'batch = {}\n'),
                 ("batch4k", 'batch = { max_bytes = 4096, max_delay = "1s" }\n'),
                 ("gzip", 'batch = {}\ncompress = "gzip"\n')]


def billing_runs(sim, work, opts, results):
    """Row 6: billed 4 KB blocks (hubsim meters them as the hub does) per 1,000 readings of 200 B
    from the bench plugin, sent alone, batched (the defaults, and 4 KB), and batched with gzip."""
    key = enroll_agent(sim)
    for run in range(opts.runs):
        for mode, extra in BILLING_MODES:
            clear_bench_desired(sim)
            settings = {"count": BILLING_READINGS, "size": BILLING_SIZE, "run": f"billing-{mode}-{run}"}
            agent = Agent(work, sim, f"billing-{mode}-{run}", key, [])
            agent.config.write_text(agent.base + agent.plugin("bench", "hubagent_bench_plugin", settings, extra))
            status = sim.api("GET", "/sim/status")
            readings0 = status["readingsReceived"].get(AGENT_REG, 0)
            blocks0 = status["billedBlocks"].get(AGENT_REG, 0)
            agent.start()

            def arrived():
                s = sim.api("GET", "/sim/status")
                done = s["readingsReceived"].get(AGENT_REG, 0) - readings0 >= BILLING_READINGS
                return s if done else None
            status = wait_for(f"{BILLING_READINGS} readings ({mode})", arrived, 60, 0.1)
            agent.stop()
            readings = status["readingsReceived"][AGENT_REG] - readings0
            blocks = status["billedBlocks"][AGENT_REG] - blocks0
            results[f"billing_{mode}"].append(blocks * BILLING_READINGS / readings)
            log(f"billing run {run + 1}, {mode}: {readings} readings billed {blocks} blocks")


def rss_mib(pid):
    """Peak RSS (VmHWM) of a running process, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


# ---------------------------------------------------------------------------------------------
# the table


def fig(values, fmt="{:.0f}", scale=1.0):
    if not values:
        return "—"
    med = statistics.median(values) * scale
    lo, hi = min(values) * scale, max(values) * scale
    return f"{fmt.format(med)} ({fmt.format(lo)}–{fmt.format(hi)})"


def ratio(ours, theirs):
    """The ratio of two figures' medians, for the rows whose target is a ratio."""
    if not ours or not theirs:
        return "—"
    return f"{statistics.median(ours) / statistics.median(theirs):.2f}"


def table(r, opts):
    rows = [
        ("1. Telemetry throughput, msg/s (256 B, QoS 1)",
         f"{fig(r['agent_rate'])} plugin → queue → hub", f"{fig(r['bare_rate'])}",
         f"{fig(r['sdk_rate'])}"),
        ("1b. Telemetry throughput over WebSockets (443), msg/s", fig(r["agent_ws_rate"]),
         fig(r["bare_ws_rate"]), "—"),
        ("1c. Telemetry throughput over WebSockets through an HTTP proxy (tinyproxy), msg/s",
         fig(r["agent_proxy_rate"]), fig(r["bare_proxy_rate"]), "—"),
        ("1′. … hubagent ÷ bare rumqttc (medians; issue 18's target ≥ 0.8)",
         ratio(r["agent_rate"], r["bare_rate"]), "—", "—"),
        # One decimal: the target is a ratio, and whole milliseconds hid a fifth of it.
        ("2a. CPU time per 1,000 messages, ms", fig(r["agent_cpu_per_k"], "{:.1f}", 1000),
         fig(r["bare_cpu_per_k"], "{:.1f}", 1000), fig(r["sdk_cpu_per_k"], "{:.0f}", 1000)),
        ("2a′. … hubagent ÷ bare rumqttc (medians; issue 18's target ≤ 1.5)",
         ratio(r["agent_cpu_per_k"], r["bare_cpu_per_k"]), "—", "—"),
        ("2e. CPU time per 1,000 messages over WebSockets (through the proxy), ms",
         f"{fig(r['agent_ws_cpu_per_k'], '{:.1f}', 1000)} ({fig(r['agent_proxy_cpu_per_k'], '{:.1f}', 1000)})",
         f"{fig(r['bare_ws_cpu_per_k'], '{:.1f}', 1000)} ({fig(r['bare_proxy_cpu_per_k'], '{:.1f}', 1000)})", "—"),
        ("2b. Idle CPU with 3 plugins, % of one core", fig(r["idle_cpu_pct"], "{:.2f}"), "—", "—"),
        ("2c. Peak RSS idle with 3 plugins, MiB (all processes)", fig(r["idle_rss"], "{:.1f}"), "—", "—"),
        ("2c′. … the sum of PSS at that peak, MiB (every shared page counted once)",
         fig(r["idle_pss"], "{:.1f}"), "—", "—"),
        ("2d. Peak RSS under load, MiB (all processes)", fig(r["load_rss"], "{:.1f}"),
         fig(r["bare_rss"], "{:.1f}"), fig(r["sdk_rss"], "{:.1f}")),
        ("3a. Start to READY=1, cached assignment, ms", fig(r["ready_cached"], "{:.0f}", 1000), "—", "—"),
        ("3b. Start to first telemetry, fresh DPS registration, ms",
         fig(r["first_telemetry_fresh"], "{:.0f}", 1000), "—", fig(r["sdk_first_telemetry_fresh"], "{:.0f}", 1000)),
        (f"4a. Backlog drain, msg/s ({opts.backlog:,} queued)", fig(r["drain_rate"]),
         f"{fig(r['bare_rate'])} (row 1)", "—"),
        ("4b. Queue fill while the hub refuses, msg/s", fig(r["fill_rate"]), "—", "—"),
        ("4c. Disk bytes per queued message", fig(r["queue_bytes_per_msg"]), "—", "—"),
        (f"5a. hubsim DPS registrations/s, {opts.registrations:,} devices into an empty hubsim",
         fig(r["registrations_per_s"]), "", ""),
        (f"5a′. … the first {opts.registrations // 10:,} → the last {opts.registrations // 10:,} (last ÷ first)",
         f"{fig(r['registrations_first_per_s'])} → {fig(r['registrations_last_per_s'])} "
         f"({fig(r['registrations_last_vs_first'], '{:.2f}')})", "", ""),
        (f"5b. hubsim concurrent device connections held (of {opts.connections:,})",
         fig(r["connections_held"]), "", ""),
        ("5c. hubsim device connects/s (TLS + SAS)", fig(r["connections_per_s"]), "", ""),
        ("5d. hubsim peak RSS holding them, MiB", fig(r["hubsim_rss"], "{:.0f}"), "", ""),
        (f"6. Billed 4 KB blocks per {BILLING_READINGS:,} readings of {BILLING_SIZE} B: alone → batched "
         f"(defaults: 64 KiB, 1 s) → batched (4 KB, 1 s) → batched (defaults) + gzip (lower bound of "
         f"the bytes: {BILLING_BOUND})",
         f"{fig(r['billing_alone'])} → {fig(r['billing_batch'])} → {fig(r['billing_batch4k'])} → "
         f"{fig(r['billing_gzip'])}", "—", "—"),
    ]
    if opts.backlog_only:
        rows = [row for row in rows if row[0].startswith("4")]
    if opts.hubsim_only:
        rows = [row for row in rows if row[0].startswith("5")]
    if opts.billing_only:
        rows = [row for row in rows if row[0].startswith("6")]
    head = "| measurement | hubagent | bare rumqttc (limit of the path) | Azure Python SDK |\n| --- | --- | --- | --- |\n"
    return head + "".join(f"| {a} | {b} | {c} | {d} |\n" for a, b, c, d in rows)


def machine():
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024
    return (f"{os.cpu_count()} × {cpu}, {mem / 1024:.0f} GiB RAM, Linux {platform.release()}, "
            f"{platform.freedesktop_os_release().get('PRETTY_NAME', '') if hasattr(platform, 'freedesktop_os_release') else ''}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="runs per figure (median and min–max)")
    ap.add_argument("--quick", action="store_true", help="fewer messages and devices (a smoke run)")
    ap.add_argument("--write-doc", action="store_true", help=f"put the table into {DOC.relative_to(ROOT)}")
    ap.add_argument("--keep", action="store_true", help="keep the working directory (logs, state)")
    ap.add_argument("--hubsim-only", action="store_true",
                    help="row 5 only (hubsim's registrations and connections); not for --write-doc")
    ap.add_argument("--hubsim", type=Path, default=None,
                    help="the hubsim binary row 5 measures (default: target/release/hubsim), "
                         "e.g. another checkout's, for a before/after with the same prober")
    ap.add_argument("--throughput-only", action="store_true",
                    help="rows 1-3 and the WebSocket rows only (no hubsim capacity, SDK or backlog runs); "
                         "not for --write-doc")
    ap.add_argument("--backlog-only", action="store_true",
                    help="row 4 only (backlog fill, drain and disk bytes per message); not for --write-doc")
    ap.add_argument("--billing-only", action="store_true",
                    help="row 6 only (billed 4 KB blocks per 1,000 readings, alone, batched, batched + gzip); "
                         "not for --write-doc")
    ap.add_argument("--backlog", type=int, help="messages to queue in row 4 (default 1,000,000; 50,000 with --quick)")
    opts = ap.parse_args()
    q = opts.quick
    opts.messages = 5_000 if q else 50_000
    opts.sdk_messages = 1_000 if q else 5_000
    opts.backlog = opts.backlog or (50_000 if q else 1_000_000)
    opts.backlog_runs = opts.runs
    opts.registrations = 500 if q else 10_000
    opts.connections = opts.registrations  # row 5b holds every device row 5a registered
    opts.idle_seconds = 3 if q else 10

    # hubsim and the prober each hold a descriptor per connection (row 5b); 1024 is a common default.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = opts.connections + 1024
    if soft != resource.RLIM_INFINITY and soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            sys.exit(f"bench: {opts.connections} connections need {wanted} open files; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    work = Path(tempfile.mkdtemp(prefix="hubagent-bench-"))
    log(f"working directory {work}")
    results = {k: [] for k in (
        "agent_rate", "bare_rate", "sdk_rate", "agent_cpu_per_k", "bare_cpu_per_k", "sdk_cpu_per_k",
        "idle_cpu_pct", "idle_rss", "idle_pss", "load_rss", "bare_rss", "sdk_rss", "ready_cached", "first_telemetry_fresh",
        "sdk_first_telemetry_fresh", "drain_rate", "fill_rate", "queue_bytes_per_msg", "registrations_per_s",
        "registrations_first_per_s", "registrations_last_per_s", "registrations_last_vs_first", "hubsim_rss",
        "connections_held", "connections_per_s", "agent_ws_rate", "agent_ws_cpu_per_k", "bare_ws_rate",
        "bare_ws_cpu_per_k", "agent_proxy_rate", "agent_proxy_cpu_per_k", "bare_proxy_rate", "bare_proxy_cpu_per_k",
        "billing_alone", "billing_batch", "billing_batch4k", "billing_gzip")}
    started = time.time()
    only = [name for name in ("throughput_only", "backlog_only", "hubsim_only", "billing_only")
            if getattr(opts, name)]
    if only and opts.write_doc:
        sys.exit("bench: --throughput-only, --backlog-only, --hubsim-only and --billing-only leave rows empty; "
                 "the doc's table comes from a full run")
    if len(only) > 1:
        sys.exit("bench: --throughput-only, --backlog-only, --hubsim-only and --billing-only exclude each other")
    sim = None
    try:
        if opts.hubsim_only:
            hubsim_runs(work, opts, results)
        elif opts.backlog_only:
            sim = Hubsim(work)
            backlog_runs(sim, work, opts, results)
        elif opts.billing_only:
            sim = Hubsim(work)
            billing_runs(sim, work, opts, results)
        else:
            if not opts.throughput_only:
                hubsim_runs(work, opts, results)
            sim = Hubsim(work)
            bare_runs(sim, opts, results)
            agent_runs(sim, work, opts, results)
            websocket_runs(sim, work, opts, results)
            if not opts.throughput_only:
                sdk_runs(sim, opts, results)
                backlog_runs(sim, work, opts, results)
                billing_runs(sim, work, opts, results)
    finally:
        for agent in STARTED:
            if agent.proc:
                agent.stop()
        if sim:
            sim.stop()
        if not opts.keep:
            shutil.rmtree(work, ignore_errors=True)
    minutes = (time.time() - started) / 60
    text = (f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine()}; "
            f"median (min–max) of {opts.runs} runs{' (--quick)' if q else ''}, "
            + (f"{opts.backlog:,} messages queued per run (--backlog-only); " if opts.backlog_only else
               f"{opts.registrations:,} devices per run (--hubsim-only); " if opts.hubsim_only else
               "row 6 only (--billing-only); " if opts.billing_only else
               f"{opts.messages:,} messages per throughput run ({opts.sdk_messages:,} for the Python SDK); ")
            + f"the whole benchmark took {minutes:.1f} min.\n\n" + table(results, opts))
    print(text)
    if opts.write_doc:
        doc = DOC.read_text()
        begin, end = "<!-- bench:begin -->\n", "<!-- bench:end -->"
        a, b = doc.index(begin) + len(begin), doc.index(end)
        DOC.write_text(doc[:a] + text + doc[b:])
        log(f"table written to {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
