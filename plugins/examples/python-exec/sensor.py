#!/usr/bin/env python3
"""A hubagent exec plugin in Python (standard library only).

hubagent starts this program, writes its settings as one JSON line on stdin at start and again
whenever they change, and reads messages as JSON lines from stdout:

    {"body": {...}, "contentType": "application/json", "properties": {"k": "v"}}

A line {"rejectSettings": "why"} refuses the settings just received (the old ones stay);
{"log": "text", "level": "info"} and {"health": "ok|degraded|failed", "detail": "..."} are
optional. Anything printed to stderr is logged by the agent.

Direct methods and cloud-to-device messages: the first line declares what the plugin takes,

    {"declare": {"methods": ["read", "set_room"], "c2dFilter": {"to": "sensor"}}}

then the agent writes calls on stdin, told apart from settings by "$call", and the plugin answers:

    {"$call": "method", "id": 7, "method": "read", "payload": ...}
        -> {"methodResponse": 7, "status": 200, "payload": {...}}
    {"$call": "c2d", "id": 8, "message": {"messageId", "body" (base64), "properties", ...}}
        -> {"c2dAck": 8}   (taken: only now is it completed at the hub)
        or {"c2dNack": 8, "reason": "..."}   (left with the hub, which delivers it again)

The method `<plugin name>.read` answers the last reading; `<plugin name>.set_room` changes the
room until the next settings change. A C2D message with the property to=sensor is logged; one
seen before (the same messageId: a redelivery) is acknowledged again without acting twice.

Settings: interval (a duration in hubagent's one format, "500ms", "5s", "2m" or "1h"; default
"5s"; a bare number of seconds, as older configurations of this example write it, is still read),
room (a label, default "lab").
"""
import base64
import json
import math
import queue
import re
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


UNITS = {"ms": 0.001, "s": 1, "": 1, "m": 60, "min": 60, "h": 3600}


def seconds(duration):
    """hubagent's duration format ("250ms", "5s", "2m", "1h") in seconds; None if it is not one."""
    if isinstance(duration, bool):
        return None
    if isinstance(duration, (int, float)):  # older settings: a number of seconds
        return float(duration)
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*(ms|s|min|m|h|)\s*", str(duration))
    return float(match.group(1)) * UNITS[match.group(2)] if match else None


def validate(settings):
    interval = seconds(settings.get("interval", "5s"))
    if interval is None or interval < 0.05:
        return None, 'settings.interval: interval must be a duration such as "5s", at least "50ms"'
    room = settings.get("room", "lab")
    if not isinstance(room, str):
        return None, "room must be a string"
    return {"interval": float(interval), "room": room}, None


def reading(n, current):
    return {"seq": n, "room": current["room"], "temperature": round(20 + 2 * math.sin(n / 5), 2)}


def answer_call(call, n, current, seen):
    """Answers a method or C2D call of the agent."""
    if call["$call"] == "method":
        if call["method"] == "read" and current:
            emit({"methodResponse": call["id"], "status": 200, "payload": reading(n, current)})
        elif call["method"] == "set_room" and current and isinstance(call["payload"], str):
            current["room"] = call["payload"]
            emit({"methodResponse": call["id"], "status": 200, "payload": {"room": current["room"]}})
        else:
            emit({"methodResponse": call["id"], "status": 400,
                  "payload": {"error": f"cannot {call['method']} with {call['payload']!r}"}})
    elif call["$call"] == "c2d":
        message = call["message"]
        if message["messageId"] in seen:
            emit({"log": f"C2D {message['messageId']} again (a redelivery): already done"})
        else:
            body = base64.b64decode(message["body"]).decode("utf-8", "replace")
            emit({"log": f"C2D {message['messageId']}: {body}"})
            seen.add(message["messageId"])
        emit({"c2dAck": call["id"]})


def main():
    emit({"declare": {"methods": ["read", "set_room"], "c2dFilter": {"to": "sensor"}}})
    updates = queue.Queue()
    threading.Thread(target=read_settings, args=(updates,), daemon=True).start()
    current = None
    seen = set()
    n = 0
    while True:
        timeout = current["interval"] if current else None
        try:
            new = updates.get(timeout=timeout)
            if new is None:
                return 0
            if "$call" in new:
                answer_call(new, n, current, seen)
                continue
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
            "body": reading(n, current),
            "contentType": "application/json",
            "properties": {"example": "python-exec"},
        })


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (BrokenPipeError, KeyboardInterrupt):
        sys.exit(0)
