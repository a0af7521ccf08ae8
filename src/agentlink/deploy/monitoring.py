"""Prometheus scrape targets from the topology and the inventory: no hand-kept target list.

Each job becomes one file_sd file; Prometheus re-reads those files by itself, so a new agent
host or machine is scraped without a reload.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agentlink.topology import load_once

TargetGroups = list[dict[str, Any]]


def agent_targets(topology_path: str, addresses: Mapping[str, str]) -> TargetGroups:
    """One target per agent host: its HTTP port on its machine, labelled machine and group."""
    topology = load_once(topology_path)
    return [{"targets": [f"{addresses[g.machine]}:{g.http_port}"],
             "labels": {"machine": g.machine, "group": g.name}}
            for g in sorted(topology.groups.values(), key=lambda g: (g.machine, g.port))]


def machine_targets(addresses: Mapping[str, str], port: int) -> TargetGroups:
    """One target per machine on `port` (an exporter every machine runs)."""
    return [{"targets": [f"{address}:{port}"], "labels": {"machine": machine}}
            for machine, address in sorted(addresses.items())]


def scrape_targets(topology_path: str, addresses: Mapping[str, str],
                   exporter_ports: Mapping[str, int]) -> dict[str, TargetGroups]:
    """Every file_sd file by job: `agentlink` from the topology, one job per exporter."""
    jobs = {"agentlink": agent_targets(topology_path, addresses)}
    jobs.update({job: machine_targets(addresses, port) for job, port in exporter_ports.items()})
    return jobs
