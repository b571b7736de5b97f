#!/usr/bin/env python3
"""Prints the table of docs/reliability.md from target/reliability/*.json (written by the fault
scenarios in tests/it/faults.rs and tests/it/plugin_outage.rs): `python3 scripts/reliability-table.py`.

Every delivery figure comes from the scenario's own count (tests/support/delivery.rs), from the
producer's side: "produced" is what the agent had acknowledged to the producer (accepted into its
durable queue) when the test read it before each kill -9 and stop, "lost" the acknowledged messages
that never arrived. A file without these figures (left by an older test) is refused, not filled in.
"""
import json
import sys
from pathlib import Path

root = Path(__file__).resolve().parents[1] / "target" / "reliability"
delivery = ["produced", "arrived_distinct", "lost", "duplicates", "arrived_after_reading"]
paths = sorted(root.glob("*.json"))
if not paths:
    sys.exit(f"no figures in {root}: run the fault scenarios first (docs/reliability.md)")
print("| scenario | produced | arrived (distinct) | lost | duplicates | arrived after the last reading "
      "| other measured figures |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for path in paths:
    r = json.loads(path.read_text())
    missing = [k for k in ["scenario"] + delivery if k not in r]
    if missing:
        sys.exit(f"{path}: no {', '.join(missing)}: written by an older test; run the scenarios again")
    other = ", ".join(
        f"{k.replace('_', ' ')} {v:.2f}" if isinstance(v, float) else f"{k.replace('_', ' ')} {v}"
        for k, v in sorted(r.items())
        if k not in delivery and k != "scenario" and not isinstance(v, (dict, list)))
    print(f"| {r['scenario']} | " + " | ".join(str(r[k]) for k in delivery) + f" | {other} |")
