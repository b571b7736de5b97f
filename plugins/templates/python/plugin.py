#!/usr/bin/env python3
"""{{name}}: a hubagent exec plugin in Python (standard library only).

Every `interval` it publishes {"count": N}, counting up by `step`; the direct method
`{{name}}.get` answers the count.

Settings, one JSON line on stdin at start and one per change: `interval` (a duration, "500ms",
"5s", "1m"; default "1s") and `step` (a whole number, not 0; default 1). A line
{"rejectSettings": "why"} refuses them (the old ones stay).

Try it: hubagent plugins try --settings '{"step": 2}' -- python3 {{file}}
(options go before `--`; after it come the program and its arguments).
"""
import json
import queue
import sys
import threading

UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}


def emit(line):
    # One JSON object a line on stdout; flushed so the agent sees it at once.
    print(json.dumps(line), flush=True)


def duration(text):
    for unit in ("ms", "s", "m", "h"):
        number = text[: -len(unit)]
        if text.endswith(unit) and number.replace(".", "", 1).isdigit():
            return float(number) * UNITS[unit]
    raise ValueError(f"interval '{text}' is not a duration such as \"5s\" (ms, s, m, h)")


def read_settings(settings):
    """The settings as (interval in seconds, step), or ValueError naming what is wrong."""
    unknown = set(settings) - {"interval", "step"}
    if unknown:
        raise ValueError(f"unknown setting {sorted(unknown)[0]!r} (known: interval, step)")
    interval = settings.get("interval", "1s")
    if not isinstance(interval, str):
        raise ValueError("interval must be a duration such as \"5s\"")
    seconds = duration(interval)
    if seconds < 0.01:
        raise ValueError("interval must be at least 10ms")
    step = settings.get("step", 1)
    if not isinstance(step, int) or isinstance(step, bool):
        raise ValueError("step must be a whole number")
    if step == 0:
        raise ValueError("step must not be 0")
    return seconds, step


def read_stdin(lines):
    """Every line the agent writes (settings and calls) goes on `lines`; None at EOF."""
    for line in sys.stdin:
        if line.strip():
            lines.put(json.loads(line))
    lines.put(None)


def main():
    emit({"declare": {"methods": ["get"]}})
    lines = queue.Queue()
    threading.Thread(target=read_stdin, args=(lines,), daemon=True).start()
    current, count = None, 0
    while True:
        try:
            line = lines.get(timeout=current[0] if current else None)
        except queue.Empty:
            count += current[1]
            emit({"body": {"count": count}})
            continue
        if line is None:
            return  # EOF: the agent is stopping us
        if "$call" in line:
            if line["$call"] == "method" and line["method"] == "get":
                emit({"methodResponse": line["id"], "status": 200, "payload": {"count": count}})
            elif line["$call"] == "method":
                emit({"methodResponse": line["id"], "status": 404, "payload": {}})
            else:
                emit({"c2dNack": line["id"], "reason": "this plugin takes no C2D messages"})
            continue
        try:
            current = read_settings(line)
        except ValueError as e:
            emit({"rejectSettings": str(e)})


if __name__ == "__main__":
    main()
