"""The partition of the Redis primary's machine, measured on a deployed inventory.

The machine whose Redis the Sentinels name primary is cut off the LAN for 22 s (its address
kept, as behind a pulled cable) while `agentlink load` sends 40 requests/s from each side:
from the controller, with the other machine and the witness, and from inside the cut-off
machine's network. Per side: requests sent and failed (by reason), acknowledged writes
lost, and the longest request (the stall).

`--src DIR` runs both clients from another tree's `src` (the same load, that tree's client
and load generator): with the agent hosts deployed from that tree too, a figure of before.

Run: `.venv/bin/python bench/partition.py [--inventory DIR] [--src DIR] [--json FILE]`
(`make bench-partition`) with the inventory deployed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the tests' view of a deployment: inventory, faults

from tests.failover.test_faults import agentlink_load, primary_machine  # noqa: E402
from tests.integration.conftest import INVENTORY, Deployment  # noqa: E402

CUT_S = 22.0
BEFORE_CUT_S = 8.0
LOAD_S = 45.0


def load(deployed: Deployment, prefix: list[str], src: Path) -> subprocess.Popen[str]:
    """The faults' load, with the client and load generator of the tree `src`."""
    env = {**os.environ, "PYTHONPATH": str(src), "AGENTLINK_SECRETS": str(deployed.secrets)}
    return agentlink_load(deployed, prefix, LOAD_S, env)


def side(report: dict[str, Any]) -> dict[str, Any]:
    return {"sent": report["sent"], "failed": report["failed"],
            "failures": report["failures"], "acknowledged": report["acknowledged"],
            "lost": report["lost"], "lost_keys": report["lost_keys"],
            "longest_ms": report["latency_ms"]["max"],
            "p99_ms": report["latency_ms"]["p99"]}


def measure(deployed: Deployment, src: Path) -> dict[str, Any]:
    machine = primary_machine(deployed)
    print(f"the primary is on {machine}: cutting it off for {CUT_S:g}s under load ...",
          flush=True)
    outside, inside = load(deployed, [], src), load(deployed, deployed.inside(machine), src)
    time.sleep(BEFORE_CUT_S)
    deployed.cut(machine)
    try:
        time.sleep(CUT_S)
    finally:
        deployed.heal(machine)
    reports: dict[str, Any] = {}
    readers = [threading.Thread(target=lambda n=name, p=proc: reports.__setitem__(
        n, json.loads(p.communicate(timeout=300)[0]))) for name, proc in
        (("outside", outside), ("inside", inside))]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join()
    return {"cut_off": machine, "controller side": side(reports["outside"]),
            f"inside {machine}": side(reports["inside"])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inventory", type=Path, default=INVENTORY)
    parser.add_argument("--src", type=Path, default=ROOT / "src",
                        help="the tree whose client and load generator to run")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    deployed = Deployment(args.inventory)
    os.environ["AGENTLINK_SECRETS"] = str(deployed.secrets)
    try:
        figures = measure(deployed, args.src.resolve())
    finally:
        deployed.close()
    print(f"\n| side ({figures['cut_off']} cut off {CUT_S:g} s) | sent | failed | lost "
          "| longest request ms | failed by reason |\n|---|---:|---:|---:|---:|---|")
    for name, row in figures.items():
        if isinstance(row, dict):
            reasons = "; ".join(f"{why} {n}" for why, n in row["failures"].items()) or "-"
            print(f"| {name} | {row['sent']} | {row['failed']} | {row['lost']} "
                  f"| {row['longest_ms']} | {reasons} |")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
