#!/usr/bin/env python3
"""A hubagent exec plugin in Python (standard library only).

hubagent starts this program, writes its settings as one JSON line on stdin at start and again
whenever they change, and reads messages as JSON lines from stdout:

    {"body": {...}, "contentType": "application/json", "properties": {"k": "v"}}

A line {"rejectSettings": "why"} refuses the settings just received (the old ones stay);
{"log": "text", "level": "info"} and {"health": "ok|degraded|failed", "detail": "..."} are
optional. Anything printed to stderr is logged by the agent.

Settings: interval (seconds, default 5), room (a label, default "lab").
"""
import json
import math
import queue
import sys
import threading
import time


def read_settings(out):
    """Puts every settings line from stdin on `out`; None at EOF (the agent is stopping us)."""
    for line in sys.stdin:
        line = line.strip()
        if line:
            try:
                out.put(json.loads(line))
            except ValueError as e:
                print(f"bad settings line: {e}", file=sys.stderr)
    out.put(None)


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def validate(settings):
    interval = settings.get("interval", 5)
    if not isinstance(interval, (int, float)) or interval < 0.05:
        return None, "interval must be a number of seconds, at least 0.05"
    room = settings.get("room", "lab")
    if not isinstance(room, str):
        return None, "room must be a string"
    return {"interval": float(interval), "room": room}, None


def main():
    updates = queue.Queue()
    threading.Thread(target=read_settings, args=(updates,), daemon=True).start()
    current = None
    n = 0
    while True:
        timeout = current["interval"] if current else None
        try:
            new = updates.get(timeout=timeout)
            if new is None:
                return 0
            checked, why = validate(new)
            if why:
                emit({"rejectSettings": why})
            else:
                current = checked
                emit({"log": f"settings applied: {current}", "level": "info"})
            continue
        except queue.Empty:
            pass
        n += 1
        emit({
            "body": {"seq": n, "room": current["room"],
                     "temperature": round(20 + 2 * math.sin(n / 5), 2)},
            "contentType": "application/json",
            "properties": {"example": "python-exec"},
        })


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (BrokenPipeError, KeyboardInterrupt):
        sys.exit(0)
