#!/usr/bin/env python3
"""Prints the table of docs/reliability.md from target/reliability/*.json (written by the fault
scenarios in tests/it/faults.rs and tests/it/plugin_outage.rs): `python3 scripts/reliability-table.py`."""
import json
from pathlib import Path

root = Path(__file__).resolve().parents[1] / "target" / "reliability"
print("| scenario | produced | arrived (distinct) | duplicates | lost | other measured figures |")
print("| --- | --- | --- | --- | --- | --- |")
for path in sorted(root.glob("*.json")):
    r = json.loads(path.read_text())
    main = {"scenario", "produced", "arrived_distinct", "duplicates", "lost"}
    other = ", ".join(
        f"{k.replace('_', ' ')} {v:.2f}" if isinstance(v, float) else f"{k.replace('_', ' ')} {v}"
        for k, v in sorted(r.items()) if k not in main and not isinstance(v, (dict, list)))
    print(f"| {r['scenario']} | {r.get('produced', '-')} | {r.get('arrived_distinct', r.get('produced', '-'))} "
          f"| {r.get('duplicates', '-')} | {r['lost']} | {other} |")
