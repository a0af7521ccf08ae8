"""The layered launcher's start order, against an in-memory backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from agentlink.deploy.launch import Launcher, LaunchError, Unit
from agentlink.topology import Topology, load

HEALTHY_AFTER_POLLS = 2


class SlowToHealthBackend:
    """A host answers `starting` to its first polls after a start, then `healthy`."""

    def __init__(self) -> None:
        self.polls: dict[str, int] = {}
        self.events: list[str] = []
        self.settled: list[str] = []

    def start(self, unit: Unit) -> bool:
        self.events.append(f"start {unit.name}")
        self.polls[unit.name] = 0
        return True

    def stop(self, unit: Unit) -> None:
        self.polls.pop(unit.name, None)

    def alive(self, unit: Unit) -> bool:
        return unit.name in self.polls

    def health(self, unit: Unit) -> dict[str, Any] | None:
        if unit.name not in self.polls:
            return None
        self.polls[unit.name] += 1
        state = "healthy" if self.polls[unit.name] > HEALTHY_AFTER_POLLS else "starting"
        if state == "healthy" and f"healthy {unit.name}" not in self.events:
            self.events.append(f"healthy {unit.name}")
        return {"agents": {inst.id: {"state": state} for inst in unit.group.instances}}

    def logs(self, unit: Unit, lines: int = 20) -> list[str]:
        return []

    def settle(self, unit: Unit) -> None:
        self.settled.append(unit.name)


@pytest.fixture
def topology(tmp_path: Path) -> Topology:
    """Three hosts in layer 0, one in layer 1 that depends on two of them."""
    path = tmp_path / "topology.yml"
    agents = [{"name": f"A{n}", "class": "tests.unit.agents:Echo", "machine": "m",
               "group": f"g{n}", "port": 7000 + 10 * n} for n in range(3)]
    agents.append({"name": "B", "class": "tests.unit.agents:Echo", "machine": "m",
                   "group": "g3", "port": 7030, "depends_on": ["A0", "A2"]})
    path.write_text(yaml.safe_dump({"version": 1, "machines": {"m": {}}, "agents": agents}))
    return load(path)


def test_a_layer_starts_all_its_hosts_before_waiting(topology: Topology) -> None:
    backend = SlowToHealthBackend()
    Launcher(topology, backend, poll=0).launch()
    assert backend.events[:3] == ["start g0", "start g1", "start g2"]
    assert backend.events[-2:] == ["start g3", "healthy g3"]


def test_one_by_one_waits_for_each_host_before_starting_the_next(topology: Topology) -> None:
    backend = SlowToHealthBackend()
    report = Launcher(topology, backend, poll=0, one_by_one=True).launch()
    assert backend.events == ["start g0", "healthy g0", "start g1", "healthy g1",
                              "start g2", "healthy g2", "start g3", "healthy g3"]
    assert [layer.started for layer in report.layers] == [["g0", "g1", "g2"], ["g3"]]


def test_every_host_is_settled_once_the_whole_launch_is_healthy(topology: Topology) -> None:
    """Settling applies what a start held back (the CPU limit): after the last gate, so no
    agent's start runs throttled, and for every host, also one left unsettled before."""
    backend = SlowToHealthBackend()
    Launcher(topology, backend, poll=0).launch()
    assert sorted(backend.settled) == ["g0", "g1", "g2", "g3"]


class OneSickBackend(SlowToHealthBackend):
    """g2's A2 says it is unhealthy (a failed check); g0 and g1 never get past starting."""

    def health(self, unit: Unit) -> dict[str, Any] | None:
        state = "unhealthy" if unit.name == "g2" else "starting"
        return {"agents": {inst.id: {"state": state, "checks": [{"name": "model"}]}
                           for inst in unit.group.instances}}


def test_a_gate_that_times_out_names_the_agent_that_says_it_is_unhealthy(
        tmp_path: Path) -> None:
    path = tmp_path / "topology.yml"
    agents = [{"name": f"A{n}", "class": "tests.unit.agents:Echo", "machine": "m",
               "group": f"g{n}", "port": 7000 + 10 * n, "health_timeout": 0.2}
              for n in range(3)]
    path.write_text(yaml.safe_dump({"version": 1, "machines": {"m": {}}, "agents": agents}))
    topology = load(path)
    with pytest.raises(LaunchError) as failure:
        Launcher(topology, OneSickBackend(), poll=0.01).launch()
    assert failure.value.instance == "A2-1"
    assert "did not become healthy within 0.2s" in str(failure.value)


def test_a_failed_launch_settles_nothing(tmp_path: Path) -> None:
    path = tmp_path / "topology.yml"
    agents = [{"name": "A", "class": "tests.unit.agents:Echo", "machine": "m", "group": "g0",
               "port": 7000, "health_timeout": 0.2}]
    path.write_text(yaml.safe_dump({"version": 1, "machines": {"m": {}}, "agents": agents}))
    backend = OneSickBackend()
    with pytest.raises(LaunchError):
        Launcher(load(path), backend, poll=0.01).launch()
    assert backend.settled == []
