"""Monitoring benchmarks on the deployed lab, measured in one run on this machine.

1. Memory of the whole monitoring stack: each container's resident memory, from its cgroup
   as Docker reports it.
2. Scrape duration of every target, from Prometheus's own `scrape_duration_seconds`.
3. An agent host dies (SIGKILL): time until the health dashboard shows its agents down, until
   Prometheus's AgentHostDown alert fires, and until Alertmanager has it. The host is started
   again afterwards. With --screenshot, the dashboard is saved as a PNG during the fault.

Run: `make bench-monitoring` after `make deploy` (or `.venv/bin/python bench/monitoring.py`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
import yaml

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ("prometheus", "alertmanager", "node-exporter", "redis-exporter")
MB = 1_000_000
VICTIM = "pc2-vision"


def lab_addresses() -> tuple[dict[str, str], str]:
    hosts = yaml.safe_load((ROOT / "inventory" / "lab" / "hosts.yml").read_text())
    groups = hosts["all"]["children"]
    machines = groups["machines"]["children"]["agent_machines"]["hosts"]
    return ({name: v["agentlink_address"] for name, v in machines.items()},
            next(iter(groups["monitoring"]["hosts"])))


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def resident_mb(container: Any) -> float:
    """Resident memory of a container: its cgroup's usage less the page cache."""
    stats = container.stats(stream=False)["memory_stats"]
    detail = stats.get("stats", {})
    cache = detail.get("total_inactive_file", detail.get("inactive_file", 0))
    return float(stats["usage"] - cache) / MB


def stack_memory(client: docker.DockerClient) -> dict[str, float]:
    found = client.containers.list(filters={"label": "io.agentlink.infra"})
    return {c.name: resident_mb(c) for c in found
            if c.labels["io.agentlink.infra"] in MONITORING}


def scrape_durations(prometheus: str) -> dict[str, float]:
    query = urllib.parse.quote("scrape_duration_seconds")
    result = get_json(f"{prometheus}/api/v1/query?query={query}")["data"]["result"]
    seconds = [float(r["value"][1]) for r in result]
    return {"targets": len(seconds), "max_s": max(seconds), "sum_s": sum(seconds)}


def until(check: Callable[[], bool], started: float, timeout: float = 180) -> float:
    """Seconds from `started` until check() holds, polled every 0.1 s."""
    while not check():
        if time.monotonic() - started > timeout:
            raise SystemExit(f"not seen within {timeout:.0f}s")
        time.sleep(0.1)
    return time.monotonic() - started


def victim_down_on_dashboard(dashboard: str) -> bool:
    try:
        states = get_json(f"{dashboard}/api/dashboard")["instances"]
    except OSError:
        return False
    return any(i["group"] == VICTIM and i["state"] == "down" for i in states)


def alert_in(alerts: list[dict[str, Any]]) -> bool:
    return any(a["labels"].get("alertname") == "AgentHostDown"
               and a["labels"].get("group") == VICTIM for a in alerts)


def time_to_detect(client: docker.DockerClient, addresses: dict[str, str], prometheus: str,
                   alertmanager: str, while_down: Callable[[], None]) -> dict[str, float]:
    dashboard = f"http://{addresses['pc2']}:7211"
    firing = urllib.parse.quote(f'ALERTS{{alertname="AgentHostDown",group="{VICTIM}",'
                                f'alertstate="firing"}}')
    container = client.containers.get(f"agentlink-{VICTIM}")
    started = time.monotonic()
    container.kill()
    try:
        figures = {"dashboard_s": until(lambda: victim_down_on_dashboard(dashboard), started)}
        figures["prometheus_firing_s"] = until(lambda: bool(get_json(
            f"{prometheus}/api/v1/query?query={firing}")["data"]["result"]), started)
        figures["alertmanager_s"] = until(lambda: alert_in(get_json(
            f"{alertmanager}/api/v2/alerts?active=true")), started)
        while_down()
    finally:
        container.start()
    return figures


def screenshot(url: str, out: Path) -> None:
    """The dashboard as a person sees it during the fault: its alert listed."""
    sys.path.insert(0, str(ROOT))
    from tests.unit.browser import DASHBOARD_DRAWN, save_dashboard

    alert_shown = DASHBOARD_DRAWN.replace(
        "return ", "return document.querySelector('[data-alert]') !== null && ", 1)
    save_dashboard(url, str(out), alert_shown)
    print(f"saved {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--screenshot", help="also save the health dashboard as this PNG")
    args = parser.parse_args()
    addresses, monitoring = lab_addresses()
    prometheus = f"http://{addresses[monitoring]}:9090"
    alertmanager = f"http://{addresses[monitoring]}:9093"
    client = docker.from_env()

    memory = stack_memory(client)
    print("memory of the monitoring stack (resident, MB):")
    for name, mb in sorted(memory.items()):
        print(f"  {name:32} {mb:7.1f}")
    print(f"  {'total':32} {sum(memory.values()):7.1f}")
    scrapes = scrape_durations(prometheus)
    print(f"scrape duration over {scrapes['targets']} targets: slowest "
          f"{scrapes['max_s'] * 1000:.1f} ms, all together {scrapes['sum_s'] * 1000:.1f} ms")
    # The README's screenshot shows the dashboard during this fault, its alert firing.
    page = f"http://{addresses['pc2']}:7211/dashboard"
    detect = time_to_detect(client, addresses, prometheus, alertmanager,
                            lambda: args.screenshot and screenshot(page, Path(args.screenshot)))
    print(f"agent host {VICTIM} killed: dashboard shows it down after "
          f"{detect['dashboard_s']:.1f} s; AgentHostDown fires after "
          f"{detect['prometheus_firing_s']:.1f} s (rule waits 30 s); in Alertmanager after "
          f"{detect['alertmanager_s']:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"memory_mb": memory, "scrape": scrapes, "detect": detect}, indent=2) + "\n")


if __name__ == "__main__":
    main()
