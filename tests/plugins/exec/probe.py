#!/usr/bin/env python3
"""An exec plugin for the sandbox's tests: the exec twin of the misbehave plugin's "probe" mode.

Every `interval` seconds it tries what its settings list: `read` (files or directories), `write`
(files to create or append to), `connect` (UNIX socket paths), `tcp` ("host:port"), and prints
`probe {"read": {path: "ok" | "EACCES" | ...}, ...}` on stderr, which the agent logs.
"""
import errno
import json
import os
import socket
import sys
import threading


def outcome(attempt):
    try:
        attempt()
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, f"errno {e.errno}")


def read(path):
    if os.path.isdir(path):  # stat is not confined: it says which read to try
        os.listdir(path)
    else:
        with open(path, "rb") as f:
            f.read(1)


def write(path):
    with open(path, "a") as f:
        f.write("probe\n")


def connect_unix(path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)


def connect_tcp(address):
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5):
        pass


def probe(settings):
    tries = {"read": read, "write": write, "connect": connect_unix, "tcp": connect_tcp}
    return {
        key: {target: outcome(lambda: attempt(target)) for target in settings.get(key, [])}
        for key, attempt in tries.items()
    }


def main():
    settings = json.loads(sys.stdin.readline())
    stopped = threading.Event()

    def wait_for_eof():
        for _ in sys.stdin:
            pass
        stopped.set()

    threading.Thread(target=wait_for_eof, daemon=True).start()
    interval = float(settings.get("interval", 0.2))
    while True:
        print("probe " + json.dumps(probe(settings)), file=sys.stderr, flush=True)
        if stopped.wait(interval):
            return


main()
