"""The sustained load ceiling of the deployed lab: the highest rate it holds.

`agentlink.devtools.load` runs the default mix (the coordinator routing to the digital twin,
the twin, acknowledged writes to the memory service) at rising rates, each for `--seconds`;
a rate is held when every request succeeded, no acknowledged write was lost, and p99 latency stayed
within the bar (20 ms). The ramp stops at the first rate not held. The load generator runs
on this machine beside the lab, as a user's client would.

Run: `make bench-load` after `make deploy` (or `.venv/bin/python bench/ceiling.py`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from docs_section import write_section
from ha import lab_sentinels

from agentlink.devtools.load import MEMORY, LoadReport, LoadSpec, run_load
from agentlink.runtime.client import FailoverClient, operator_registry

RATES = (250, 500, 1000, 1500, 2000, 2500, 3000, 4000)
P99_BAR_MS = 20.0
SETTLE_S = 2.0  # between rates: the last one's stragglers and Redis's fsyncs settle


def held(report: LoadReport) -> bool:
    p99 = report.latency()["p99"]
    return report.ok and p99 is not None and p99 <= P99_BAR_MS


def level(client: FailoverClient, rate: int, seconds: float) -> dict[str, Any]:
    # Enough senders that a slow reply delays no other request's send (paced, not closed-loop).
    spec = LoadSpec(rate=rate, duration=seconds, workers=max(8, rate // 100), timeout=10.0)
    report = run_load(client, spec)
    latency = report.latency()
    return {"rate": rate, "sent": report.sent, "failed": report.failed, "late": report.late,
            "lost": len(report.lost), "p50_ms": latency["p50"], "p99_ms": latency["p99"],
            "max_ms": latency["max"], "held": held(report)}


def ramp(rates: tuple[int, ...], seconds: float) -> list[dict[str, Any]]:
    client = FailoverClient(operator_registry({"sentinels": lab_sentinels(),
                                               "service": "agentlink"}), stateful={MEMORY})
    levels = []
    for rate in rates:
        print(f"{rate} requests/s for {seconds:g} s ...", flush=True)
        levels.append(level(client, rate, seconds))
        print("  " + ", ".join(f"{k} {v}" for k, v in levels[-1].items() if k != "rate"),
              flush=True)
        if not levels[-1]["held"]:
            break
        time.sleep(SETTLE_S)
    return levels


def table(levels: list[dict[str, Any]], seconds: float) -> str:
    ceiling = max((lv["rate"] for lv in levels if lv["held"]), default=None)
    rows = [f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with "
            f"`make bench-load` on the lab, {seconds:g} s per rate, the load generator on the "
            "same machine.", "",
            "| requests/s | sent | failed | acknowledged writes lost | late sends | p50 ms | "
            "p99 ms | max ms | held |", "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for lv in levels:
        rows.append(f"| {lv['rate']} | {lv['sent']} | {lv['failed']} | {lv['lost']} | "
                    f"{lv['late']} | {_ms(lv['p50_ms'])} | {_ms(lv['p99_ms'])} | "
                    f"{_ms(lv['max_ms'])} | {'yes' if lv['held'] else 'no'} |")
    rows += ["", f"Ceiling (p99 ≤ {P99_BAR_MS:g} ms, 0 failed, 0 lost): "
             f"**{ceiling if ceiling is not None else 'none of the rates'} requests/s**."]
    return "\n".join(rows)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per rate (default 10)")
    parser.add_argument("--rates", type=lambda text: tuple(int(r) for r in text.split(",")),
                        default=RATES, help="comma-separated, rising (default %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--no-docs", action="store_true",
                        help="print only (a trial of a few rates should not replace the docs)")
    args = parser.parse_args()
    levels = ramp(args.rates, args.seconds)
    body = table(levels, args.seconds)
    print("\n" + body)
    if not args.no_docs:
        write_section("load-ceiling", "Sustained load ceiling (`make bench-load`, "
                      "`bench/ceiling.py`)", body)
    if args.json:
        args.json.write_text(json.dumps(levels, indent=2) + "\n")


if __name__ == "__main__":
    main()
