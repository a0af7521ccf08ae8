"""The layered launcher: start a topology in dependency layers, gated on health.

Layers are computed over agents. A group's process starts at the layer of its earliest agent;
each agent inside it waits for its own dependencies, and each layer is gated on the health of
that layer's agents, so grouping can never deadlock a start. Health is polled fast with a
deadline. On failure everything this run started is stopped, in reverse, and the error names
the agent, its last health answer and its last log lines.

Backends (local processes here, Docker containers in agentlink.deploy.docker_backend) only know how
to start, stop, probe and read logs of one unit: the algorithm lives here, once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from agentlink.topology import Group, Topology


@dataclass(frozen=True)
class Unit:
    """One agent host process to run: a group and the layer it starts in."""

    group: Group
    layer: int

    @property
    def name(self) -> str:
        return self.group.name

    @property
    def machine(self) -> str:
        return self.group.machine


class Backend(Protocol):
    def start(self, unit: Unit) -> bool:
        """Make the unit run as specified; True when something was (re)started."""

    def stop(self, unit: Unit) -> None: ...

    def alive(self, unit: Unit) -> bool: ...

    def health(self, unit: Unit) -> dict[str, Any] | None:
        """The unit's /health answer, or None when it does not answer."""

    def logs(self, unit: Unit, lines: int = 20) -> list[str]: ...

    def settle(self, unit: Unit) -> None:
        """The unit's start is over and healthy: apply what the start held back (Docker: the
        CPU limit); nothing when it already runs as specified."""


@dataclass
class LayerReport:
    index: int
    agents: list[str]
    started: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class LaunchReport:
    layers: list[LayerReport]
    seconds: float

    @property
    def changed(self) -> bool:
        return any(layer.started for layer in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {"seconds": round(self.seconds, 3), "changed": self.changed,
                "layers": [{"layer": r.index, "agents": r.agents, "started": r.started,
                            "unchanged": r.unchanged, "seconds": round(r.seconds, 3)}
                           for r in self.layers]}


class LaunchError(Exception):
    def __init__(self, instance: str, reason: str, last_health: Any, log_lines: list[str],
                 stopped: list[str]) -> None:
        self.instance = instance
        self.reason = reason
        self.last_health = last_health
        self.log_lines = log_lines
        self.stopped = stopped
        super().__init__(instance, reason)

    def describe(self) -> str:
        """The agent, why, its last health answer and log lines."""
        logs = "\n".join(f"    {line}" for line in self.log_lines) or "    (no output)"
        return (f"agent {self.instance} {self.reason}\n"
                f"  last health answer: {self.last_health}\n  last log lines:\n{logs}")

    def __str__(self) -> str:
        return (f"{self.describe()}\n"
                f"  stopped what this run started: {', '.join(self.stopped) or 'nothing'}")


def plan(topology: Topology) -> list[list[Unit]]:
    """Units by the layer they start in."""
    layers: list[list[Unit]] = [[] for _ in topology.layers()]
    for group in topology.groups.values():
        layer = topology.group_layer(group)
        layers[layer].append(Unit(group, layer))
    return layers


def _instance_state(report: dict[str, Any] | None, instance: str) -> tuple[str, Any]:
    if report is None:
        return "down", None
    answer = report.get("agents", {}).get(instance)
    return (answer or {}).get("state", "missing"), answer


# Which of the agents still pending a timed-out gate names: one that says it is unhealthy
# (its failed check is the reason), before one that does not answer, before one starting.
_BLAME = {"unhealthy": 0, "starting": 2}


def _state(answer: Any) -> str:
    return str((answer or {}).get("state", "missing"))


class Launcher:
    """`one_by_one` starts a layer's hosts one at a time, each gated before the next: the
    old way of starting a system, kept so that benchmarks can measure against it."""

    def __init__(self, topology: Topology, backend: Backend, *, poll: float = 0.05,
                 progress: Callable[[str], None] = lambda _: None,
                 one_by_one: bool = False) -> None:
        self.topology = topology
        self.backend = backend
        self.poll = poll
        self.progress = progress
        self.one_by_one = one_by_one

    def launch(self) -> LaunchReport:
        begun = time.monotonic()
        started: list[Unit] = []
        reports = []
        agent_layers = self.topology.layers()
        units = plan(self.topology)
        by_group = {unit.name: unit for layer in units for unit in layer}
        for index, agents in enumerate(agent_layers):
            layer_begun = time.monotonic()
            report = LayerReport(index, agents)
            batches = [[u] for u in units[index]] if self.one_by_one else [units[index]]
            try:
                for batch in batches:
                    for unit, changed in self._start_all(batch):
                        (report.started if changed else report.unchanged).append(unit.name)
                        if changed:
                            started.append(unit)
                    if self.one_by_one:
                        self.gate(agents, {u.name: u for u in batch})
                self.progress(f"layer {index}: {len(agents)} agent(s), started "
                              f"{len(report.started)} host(s), {len(report.unchanged)} "
                              "unchanged; waiting for health")
                # Hosts of earlier layers also serve agents of this one.
                self.gate(agents, by_group)
            except LaunchError as err:
                self._rollback(started, err)
                raise
            report.seconds = time.monotonic() - layer_begun
            self.progress(f"layer {index}: healthy in {report.seconds:.2f}s")
            reports.append(report)
        seconds = time.monotonic() - begun
        # Every host, not only those started now: a launch cut off before this left some
        # running without their limits.
        for unit in by_group.values():
            self.backend.settle(unit)
        return LaunchReport(reports, seconds)

    def _start_all(self, units: list[Unit]) -> list[tuple[Unit, bool]]:
        if not units:
            return []
        with ThreadPoolExecutor(max_workers=min(8, len(units))) as pool:
            return list(zip(units, pool.map(self.backend.start, units), strict=True))

    def gate(self, agents: list[str], units: dict[str, Unit]) -> None:
        """Wait until every instance of these agents in these units (by group name) is
        healthy, or fail naming one."""
        pending = {inst.id: units[inst.placement.group] for inst in self.topology.instances
                   if inst.agent.name in agents and inst.placement.group in units}
        timeouts = {a: self.topology.agents[a].health_timeout for a in agents}
        deadline = time.monotonic() + max(timeouts.values())
        answers: dict[str, Any] = {}
        while pending:
            for unit in {u.name: u for u in pending.values()}.values():
                report = self.backend.health(unit)
                for instance in [i for i, u in pending.items() if u is unit]:
                    state, answers[instance] = _instance_state(report, instance)
                    if state in ("healthy", "degraded"):
                        del pending[instance]
                    elif report is None and not self.backend.alive(unit):
                        raise self._failure(instance, unit, "exited during start", answers)
            if not pending:
                return
            if time.monotonic() > deadline:
                instance = min(pending, key=lambda i: _BLAME.get(_state(answers.get(i)), 1))
                raise self._failure(instance, pending[instance], f"did not become healthy "
                                    f"within {max(timeouts.values()):g}s", answers)
            time.sleep(self.poll)

    def _failure(self, instance: str, unit: Unit, reason: str, answers: dict[str, Any]
                 ) -> LaunchError:
        return LaunchError(instance, f"(group {unit.name} on {unit.machine}) {reason}",
                           answers.get(instance), self.backend.logs(unit), [])

    def _rollback(self, started: list[Unit], err: LaunchError) -> None:
        for unit in reversed(started):
            self.progress(f"rollback: stopping {unit.name} on {unit.machine}")
            self.backend.stop(unit)
            err.stopped.append(unit.name)
