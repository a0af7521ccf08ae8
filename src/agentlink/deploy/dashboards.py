"""Grafana dashboards built from the topology, their provisioning, and a validator for them.

The dashboards are generated rather than drawn by hand so that machines, layers, groups and
replicated agents follow the topology: a new group or replica needs no dashboard edit.
Queries use only the metrics the runtime and the exporters publish, each written so that a
quiet, healthy system shows 0 rather than "No data" (a counter without series yet is
`or`-ed with a zero). `validate_dashboard` catches what Grafana would accept silently and
draw wrong: overlapping panels, an unprovisioned datasource, an undefined `$variable`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from itertools import combinations
from typing import Any, NamedTuple

from agentlink.topology import Topology

Json = dict[str, Any]

DATASOURCE_UID = "agentlink-prometheus"
DATASOURCE: Json = {"type": "prometheus", "uid": DATASOURCE_UID}
SCHEMA_VERSION = 39
GRID_WIDTH = 24
# Grafana widens this to at least four scrape intervals, so a rate always has two samples.
RATE = "$__rate_interval"
# Variables Grafana defines itself; an expr may use them without a templating entry.
BUILTIN_VARIABLES = frozenset({"__rate_interval", "__interval", "__interval_ms", "__range",
                               "__range_s", "__range_ms"})
DASHBOARD_KEYS = ("uid", "title", "tags", "schemaVersion", "panels", "templating", "time",
                  "refresh")
PANEL_KEYS = ("id", "type", "title", "gridPos")
QUERY_PANEL_KEYS = ("datasource", "targets")
# $var, ${var} and ${var:format}, and the deprecated [[var]].
_VARIABLE_RE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\$(\w+)|\[\[(\w+)(?::[^\]]*)?\]\]")


class Query(NamedTuple):
    expr: str
    legend: str = ""


# --- panels and layout --------------------------------------------------------------------


def _targets(queries: Sequence[Query], instant: bool) -> list[Json]:
    targets = []
    for index, query in enumerate(queries):
        target: Json = {"refId": chr(ord("A") + index), "datasource": DATASOURCE,
                        "expr": query.expr, "legendFormat": query.legend}
        if instant:
            target |= {"instant": True, "range": False, "format": "table"}
        targets.append(target)
    return targets


def _panel(kind: str, title: str, queries: Sequence[Query], unit: str = "short",
           thresholds: Sequence[tuple[float | None, str]] = ((None, "green"),)) -> Json:
    """A query panel; thresholds are (from value, colour) steps, the first from None."""
    steps = [{"value": value, "color": color} for value, color in thresholds]
    return {
        "type": kind, "title": title, "datasource": DATASOURCE,
        "targets": _targets(queries, instant=kind == "table"),
        "fieldConfig": {"defaults": {"unit": unit,
                                     "thresholds": {"mode": "absolute", "steps": steps}},
                        "overrides": []},
    }


class _Grid:
    """Places panels left to right in rows of 24 columns, so no two can overlap."""

    def __init__(self) -> None:
        self.panels: list[Json] = []
        self._x = self._y = self._row_height = 0

    def add(self, panel: Json, width: int, height: int) -> None:
        if self._x + width > GRID_WIDTH:
            self._new_line()
        position = {"x": self._x, "y": self._y, "w": width, "h": height}
        self.panels.append({"id": len(self.panels) + 1, **panel, "gridPos": position})
        self._x += width
        self._row_height = max(self._row_height, height)

    def row(self, title: str) -> None:
        self._new_line()
        self.add({"type": "row", "title": title, "collapsed": False, "panels": []},
                 GRID_WIDTH, 1)
        self._new_line()

    def _new_line(self) -> None:
        self._y += self._row_height
        self._x = self._row_height = 0


def _dashboard(uid: str, title: str, grid: _Grid, variables: Sequence[Json] = ()) -> Json:
    return {
        "uid": uid, "title": title, "tags": ["agentlink"], "schemaVersion": SCHEMA_VERSION,
        "editable": False, "refresh": "5s", "time": {"from": "now-30m", "to": "now"},
        "timezone": "browser", "templating": {"list": list(variables)},
        "annotations": {"list": []}, "panels": grid.panels,
    }


# --- queries ------------------------------------------------------------------------------


def _selector(**labels: str) -> str:
    return "{" + ", ".join(f'{name}="{value}"' for name, value in labels.items()) + "}"


def _any_of(names: Iterable[str]) -> str:
    """A regex matching exactly these agents; topology names are words, so need no escaping."""
    return "|".join(names)


def _rate(metric: str, by: str, selector: str = "") -> str:
    return f"sum by ({by}) (rate({metric}{selector}[{RATE}]))"


def _zero_per(by: str, selector: str = "") -> str:
    """0 for every `by` value of the running instances. The request and error counters have
    no series for an agent before its first request or error; the health gauge has one per
    instance from the start, so `or`-ed with this a quiet system shows 0, not "No data"."""
    return f"sum by ({by}) (agentlink_agent_health{selector}) * 0"


def _counter_rate(metric: str, by: str, selector: str = "") -> str:
    return f"{_rate(metric, by, selector)} or {_zero_per(by, selector)}"


def _latency(quantile: float, selector: str) -> str:
    """Before the first request there is no histogram: the quantile is undefined (NaN)."""
    buckets = _rate("agentlink_request_duration_seconds_bucket", "le", selector)
    return (f"histogram_quantile({quantile}, {buckets}) or on () "
            f"sum(agentlink_agent_health{selector}) * NaN")


def _states(selector: str = "") -> Query:
    return Query(f"sum by (state) (agentlink_agent_health{selector})", "{{state}}")


# --- the four dashboards ------------------------------------------------------------------


def overview(topology: Topology) -> Json:
    """The whole system at a glance, then one row per machine with its layers."""
    grid = _Grid()
    grid.row("System")
    grid.add(_panel("stat", "Instances by state", [_states()]), 8, 4)
    grid.add(_panel("stat", "Requests", [Query(
        f"sum(rate(agentlink_requests_total[{RATE}])) or vector(0)", "requests/s")], "reqps"),
        4, 4)
    grid.add(_panel("stat", "Errors", [Query(
        f"sum(rate(agentlink_request_errors_total[{RATE}])) or vector(0)", "errors/s")],
        "reqps", ((None, "green"), (0.01, "red"))), 4, 4)
    grid.add(_panel("stat", "Scrape targets up", [Query("sum by (job) (up)", "{{job}}")]), 8, 4)
    _workflow_row(grid)
    for machine in topology.machines:
        _machine_row(grid, topology, machine)
    return _dashboard("agentlink-overview", "AgentLink: overview", grid)


def _workflow_row(grid: _Grid) -> None:
    """The workflow engine of every RequestCoordinator replica, summed."""
    grid.row("Workflows")
    started = f"sum(rate(agentlink_workflow_init_seconds_count[{RATE}]))"
    grid.add(_panel("stat", "Workflows started", [Query(f"{started} or vector(0)",
                                                        "workflows/s")]), 4, 6)
    grid.add(_panel("timeseries", "Workflows ended, by outcome", [Query(
        _rate("agentlink_workflows_finished_total", "outcome"), "{{outcome}}")], "reqps"), 6, 6)
    grid.add(_panel("stat", "Mean time to initialize", [Query(
        f"sum(rate(agentlink_workflow_init_seconds_sum[{RATE}])) / {started}", "init")], "s",
        ((None, "green"), (0.01, "orange"), (1, "red"))), 4, 6)
    grid.add(_panel("timeseries", "Steps queued and running", [
        Query("sum(agentlink_workflow_steps_queued)", "queued"),
        Query("sum(agentlink_workflow_steps_running)", "running")]), 6, 6)
    grid.add(_panel("stat", "Takeovers, retries, throttled agents", [
        Query(f"sum(increase(agentlink_workflows_resumed_total[{RATE}]))", "taken over"),
        Query(f"sum(rate(agentlink_workflow_step_retries_total[{RATE}]))", "retries/s"),
        Query("sum(agentlink_workflow_agents_throttled)", "throttled")]), 4, 6)


def _machine_row(grid: _Grid, topology: Topology, machine: str) -> None:
    grid.row(f"Machine {machine}")
    layers = [(index, [name for name in names
                       if any(p.machine == machine for p in topology.agents[name].placements)])
              for index, names in enumerate(topology.layers())]
    present = [(index, names) for index, names in layers if names]
    width = max(4, GRID_WIDTH // max(1, len(present)))
    for index, names in present:
        selector = f'{{machine="{machine}", agent=~"{_any_of(names)}"}}'
        grid.add(_panel("stat", f"Layer {index}: instances by state", [_states(selector)]),
                 width, 4)
    on_machine = _selector(machine=machine)
    grid.add(_panel("timeseries", "Requests by group", [Query(
        _counter_rate("agentlink_requests_total", "group", on_machine), "{{group}}")],
        "reqps"), 8, 7)
    grid.add(_panel("timeseries", "Errors by group", [Query(
        _counter_rate("agentlink_request_errors_total", "group", on_machine), "{{group}}")],
        "reqps"), 8, 7)
    grid.add(_panel("timeseries", "Host memory", [
        Query(f"node_memory_MemTotal_bytes{on_machine} - node_memory_MemAvailable_bytes"
              f"{on_machine}", "used"),
        Query(f"node_memory_MemTotal_bytes{on_machine}", "total")], "bytes"), 8, 7)


def agent(topology: Topology) -> Json:
    """One agent, picked with $agent: its traffic, latency, health and the host it runs on."""
    one = '{agent="$agent"}'
    on_its_groups = 'on (group) agentlink_agent_health{agent="$agent"}'
    on_its_machines = 'on (machine) agentlink_agent_health{agent="$agent"}'
    grid = _Grid()
    grid.row("Requests")
    grid.add(_panel("timeseries", "Request rate", [Query(
        _counter_rate("agentlink_requests_total", "machine, group", one),
        "{{group}} on {{machine}}")], "reqps"), 8, 8)
    grid.add(_panel("timeseries", "Error rate by code", [Query(
        f"{_rate('agentlink_request_errors_total', 'code', one)} or on () "
        f"label_replace({_zero_per('agent', one)}, "
        '"code", "none", "", "")', "{{code}}")], "reqps"), 8, 8)
    grid.add(_panel("timeseries", "Latency", [Query(_latency(0.5, one), "p50"),
                                              Query(_latency(0.99, one), "p99")], "s"), 8, 8)
    grid.row("Health and host")
    grid.add(_panel("stat", "Instances by state", [_states(one)]), 6, 7)
    grid.add(_panel("timeseries", "Host process memory", [
        Query(f"agentlink_process_resident_memory_bytes and {on_its_groups}",
              "{{group}} resident"),
        Query(f"agentlink_process_memory_limit_bytes and {on_its_groups}", "{{group}} limit")],
        "bytes"), 6, 7)
    grid.add(_panel("timeseries", "Host process CPU (cores)", [Query(
        f"{_rate('agentlink_process_cpu_seconds_total', 'group')} and {on_its_groups}",
        "{{group}}")]), 6, 7)
    grid.add(_panel("timeseries", "Machine memory and CPU", [
        Query(f"max by (machine) (agentlink_machine_memory_used_bytes) / max by (machine) "
              f"(agentlink_machine_memory_total_bytes) and {on_its_machines}",
              "{{machine}} memory"),
        Query(f"max by (machine) (agentlink_machine_cpu_ratio) and {on_its_machines}",
              "{{machine}} CPU")], "percentunit"), 6, 7)
    first = next(iter(topology.agents))
    return _dashboard("agentlink-agent", "AgentLink: agent", grid, [_agent_variable(first)])


def _agent_variable(default: str) -> Json:
    definition = "label_values(agentlink_agent_health, agent)"
    return {
        "name": "agent", "label": "Agent", "type": "query", "datasource": DATASOURCE,
        "query": {"query": definition, "refId": "agentlink-agent-variable"},
        "definition": definition, "refresh": 2, "sort": 1, "multi": False,
        "includeAll": False, "current": {"text": default, "value": default},
    }


def ha(topology: Topology) -> Json:
    """Replicas, Redis and the registry: what failover depends on."""
    grid = _Grid()
    grid.row("Replicated agents: healthy replicas")
    for replicated in (a for a in topology.agents.values() if a.replicas > 1):
        grid.add(_panel("stat", f"{replicated.name} (of {replicated.replicas})", [Query(
            f'sum(agentlink_agent_health{{agent="{replicated.name}", state="healthy"}})',
            "healthy")], thresholds=((None, "red"), (1, "orange"),
                                     (replicated.replicas, "green"))), 6, 4)
    grid.row("Redis")
    grid.add(_panel("table", "Redis role per machine", [Query(
        "max by (machine, role) (redis_instance_info)")]), 8, 6)
    grid.add(_panel("stat", "Redis up", [Query("max by (machine) (redis_up)", "{{machine}}")],
                    thresholds=((None, "red"), (1, "green"))), 5, 6)
    grid.add(_panel("stat", "Connected replicas", [Query(
        "max by (machine) (redis_connected_slaves)", "{{machine}}")]), 5, 6)
    grid.add(_panel("stat", "Replica link to primary", [Query(
        "max by (machine) (redis_master_link_up)", "{{machine}}")],
        thresholds=((None, "red"), (1, "green"))), 6, 6)
    grid.row("Registry")
    grid.add(_panel("timeseries", "Registry up per group", [Query(
        "min by (group) (agentlink_registry_up)", "{{group}}")]), 8, 7)
    grid.add(_panel("timeseries", "Heartbeat age per group", [Query(
        "max by (group) (agentlink_registry_heartbeat_age_seconds)", "{{group}}")], "s"), 8, 7)
    grid.add(_panel("timeseries", "Heartbeats per group", [Query(
        _rate("agentlink_registry_heartbeats_total", "group"), "{{group}}")], "ops"), 8, 7)
    grid.row("Connection pools")
    for title, metric in (("Pool reconnects", "agentlink_pool_reconnects_total"),
                          ("Pool timeouts", "agentlink_pool_timeouts_total")):
        grid.add(_panel("timeseries", title, [Query(_rate(metric, "group"), "{{group}}")],
                        "ops"), 8, 7)
    grid.add(_panel("timeseries", "Pooled sockets", [Query(
        "sum by (group) (agentlink_pool_sockets)", "{{group}}")]), 8, 7)
    return _dashboard("agentlink-ha", "AgentLink: HA and failover", grid)


def resources(topology: Topology) -> Json:
    """Machines, then every group's memory against its container limit."""
    grid = _Grid()
    grid.row("Machines")
    grid.add(_panel("timeseries", "Memory used", [
        Query("max by (machine) (agentlink_machine_memory_used_bytes)", "{{machine}} used"),
        Query("max by (machine) (agentlink_machine_memory_total_bytes)", "{{machine}} total")],
        "bytes"), 8, 7)
    grid.add(_panel("timeseries", "CPU", [
        Query("max by (machine) (agentlink_machine_cpu_ratio)", "{{machine}}"),
        Query(f'1 - avg by (machine) (rate(node_cpu_seconds_total{{mode="idle"}}[{RATE}]))',
              "{{machine}} (node)")], "percentunit"), 8, 7)
    grid.add(_panel("timeseries", "Disk used", [Query(
        "max by (machine) (agentlink_machine_disk_used_bytes) / "
        "max by (machine) (agentlink_machine_disk_total_bytes)", "{{machine}}")],
        "percentunit"), 8, 7)
    grid.add(_panel("timeseries", "CPU of each group (cores)", [Query(
        _rate("agentlink_process_cpu_seconds_total", "group"), "{{group}}")]), 24, 7)
    for machine in topology.machines:
        grid.row(f"Groups on {machine}: resident memory and limit")
        for group in topology.groups_on(machine):
            grid.add(_group_memory(group.name), 6, 6)
    return _dashboard("agentlink-resources", "AgentLink: resources", grid)


def _group_memory(group: str) -> Json:
    selector = _selector(group=group)
    return _panel("timeseries", group, [
        Query(f"max(agentlink_process_resident_memory_bytes{selector})", "resident"),
        Query(f"max(agentlink_process_memory_limit_bytes{selector})", "limit")], "bytes")


def dashboards(topology: Topology) -> list[Json]:
    return [overview(topology), agent(topology), ha(topology), resources(topology)]


# --- provisioning -------------------------------------------------------------------------


def grafana_provisioning(prometheus_url: str, dashboards_dir: str,
                         scrape_interval: str) -> dict[str, Json]:
    """Grafana's provisioning files, by path under its provisioning directory.

    The datasource uid is fixed because every panel names it. Its scrape interval is what
    Grafana sizes $__rate_interval from. The provider re-reads the dashboards directory by
    itself, so a changed dashboard needs no restart.
    """
    datasource = {"name": "AgentLink Prometheus", "type": "prometheus",
                  "uid": DATASOURCE_UID, "access": "proxy", "url": prometheus_url,
                  "isDefault": True, "editable": False,
                  "jsonData": {"timeInterval": scrape_interval}}
    provider = {"name": "agentlink", "orgId": 1, "folder": "AgentLink", "type": "file",
                "disableDeletion": True, "allowUiUpdates": False,
                "updateIntervalSeconds": 30, "options": {"path": dashboards_dir}}
    return {"datasources/agentlink.yml": {"apiVersion": 1, "datasources": [datasource]},
            "dashboards/agentlink.yml": {"apiVersion": 1, "providers": [provider]}}


# --- validation ---------------------------------------------------------------------------


def validate_dashboard(doc: Json) -> list[str]:
    """Every problem of a dashboard, one line each; an empty list means it is sound."""
    problems = [f"missing key '{key}'" for key in DASHBOARD_KEYS if key not in doc]
    variables = _variables(doc, problems)
    panels = doc.get("panels", [])
    if not isinstance(panels, list):
        return [*problems, "'panels' must be a list"]
    seen: set[Any] = set()
    for panel in panels:
        where = f"panel {panel.get('id')} '{panel.get('title', '?')}'"
        if panel.get("id") in seen:
            problems.append(f"{where}: duplicate panel id {panel.get('id')}")
        seen.add(panel.get("id"))
        problems += [f"{where}: {problem}" for problem in _panel_problems(panel, variables)]
    return problems + _overlaps(panels)


def _variables(doc: Json, problems: list[str]) -> set[str]:
    """Names defined in templating; a variable's own datasource must be the provisioned one."""
    names = set(BUILTIN_VARIABLES)
    for variable in (doc.get("templating") or {}).get("list", []):
        names.add(variable.get("name"))
        if "datasource" in variable and variable["datasource"] != DATASOURCE:
            problems.append(f"variable '{variable.get('name')}': datasource "
                            f"{variable['datasource']} is not {DATASOURCE}")
    return names


def _panel_problems(panel: Json, variables: set[str]) -> list[str]:
    keys = PANEL_KEYS if panel.get("type") == "row" else PANEL_KEYS + QUERY_PANEL_KEYS
    problems = [f"missing key '{key}'" for key in keys if key not in panel]
    problems += _grid_problems(panel.get("gridPos"))
    if "datasource" in panel and panel["datasource"] != DATASOURCE:
        problems.append(f"datasource {panel['datasource']} is not {DATASOURCE}")
    return problems + _target_problems(panel.get("targets") or [], variables)


def _grid_problems(position: Any) -> list[str]:
    if not isinstance(position, dict):
        return []  # reported as a missing key
    if not all(isinstance(position.get(k), int) for k in "xywh"):
        return [f"gridPos {position} needs integers x, y, w, h"]
    x, y, w, h = (position[k] for k in "xywh")
    if x < 0 or y < 0 or w < 1 or h < 1 or x + w > GRID_WIDTH:
        return [f"gridPos {position} is outside the {GRID_WIDTH}-column grid"]
    return []


def _target_problems(targets: list[Json], variables: set[str]) -> list[str]:
    problems = []
    ref_ids = [target.get("refId") for target in targets]
    for ref_id in sorted({r for r in ref_ids if ref_ids.count(r) > 1}, key=str):
        problems.append(f"duplicate refId {ref_id!r}")
    for target in targets:
        expr = target.get("expr")
        if not expr:
            problems.append(f"target {target.get('refId')!r} has no expr")
            continue
        if "datasource" in target and target["datasource"] != DATASOURCE:
            problems.append(f"target {target.get('refId')!r}: datasource "
                            f"{target['datasource']} is not {DATASOURCE}")
        for name in sorted(_used_variables(expr) - variables):
            problems.append(f"target {target.get('refId')!r} uses ${name}, "
                            "which templating does not define")
    return problems


def _used_variables(expr: str) -> set[str]:
    return {next(g for g in match if g) for match in _VARIABLE_RE.findall(expr)}


def _overlaps(panels: list[Json]) -> list[str]:
    placed = [p for p in panels
              if isinstance(p.get("gridPos"), dict) and not _grid_problems(p["gridPos"])]
    return [f"panels {a.get('id')} '{a.get('title')}' and {b.get('id')} '{b.get('title')}' "
            "overlap" for a, b in combinations(placed, 2)
            if _intersect(a["gridPos"], b["gridPos"])]


def _intersect(a: Json, b: Json) -> bool:
    return bool(a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"]
                and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"])
