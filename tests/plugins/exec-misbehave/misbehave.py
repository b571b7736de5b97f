#!/usr/bin/env python3
"""An exec plugin that misbehaves on request, for the method tests (tests/it/methods.rs): it
declares the methods `echo` (answers 200 with its payload), `hang` (never answers) and `exit`
(exits with status 3 during the call), and ignores its settings."""
import json
import sys


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


emit({"declare": {"methods": ["echo", "hang", "exit"]}})
for line in sys.stdin:
    call = json.loads(line)
    if call.get("$call") != "method":
        continue
    if call["method"] == "echo":
        emit({"methodResponse": call["id"], "status": 200, "payload": call["payload"]})
    elif call["method"] == "exit":
        sys.exit(3)
    # "hang": no answer, ever.
