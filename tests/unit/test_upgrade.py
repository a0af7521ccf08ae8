"""The rolling upgrade of one host (agentlink.deploy.upgrade) against a scripted backend and the
real registry: what is drained and when, the health gate, and the rollback."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from agentlink.deploy.launch import Unit
from agentlink.deploy.upgrade import UpgradeFailed, Upgrader, pending
from agentlink.runtime.registry import InstanceRecord, Registry
from agentlink.topology import Topology, load

OLD, NEW = "agentlink/m1:v1", "agentlink/m1:v2"


@dataclass
class Host:
    image: str
    running: bool = True


@dataclass
class ScriptedBackend:
    """Hosts as data: a host is healthy unless its image is in `broken`."""

    topology: Topology
    registry: Registry
    want: str = NEW
    broken: set[str] = field(default_factory=set)
    missing_images: set[str] = field(default_factory=set)
    hosts: dict[str, Host] = field(default_factory=dict)
    aside: dict[str, Host] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    drained_at_start: list[str] = field(default_factory=list)
    settled: list[str] = field(default_factory=list)

    def image(self, unit: Unit) -> str:
        return self.want

    def running_image(self, unit: Unit) -> str | None:
        host = self.hosts.get(unit.name)
        return host.image if host else None

    def drift(self, unit: Unit) -> str | None:
        host = self.hosts.get(unit.name)
        if host is None:
            return "missing"
        return None if host.image == self.want and host.running else "image changed"

    def start(self, unit: Unit) -> bool:
        self.events.append(f"start {unit.name}")
        self.drained_at_start = sorted(
            r.instance for inst in unit.group.instances
            for r in self.registry.records(inst.agent.name) if r.drained)
        if self.want in self.missing_images:
            raise LookupError(f"no such image: {self.want}")
        self.hosts[unit.name] = Host(self.want)
        return True

    def stop(self, unit: Unit) -> None:
        self.hosts.pop(unit.name, None)

    def alive(self, unit: Unit) -> bool:
        return unit.name in self.hosts

    def health(self, unit: Unit) -> dict[str, Any] | None:
        host = self.hosts.get(unit.name)
        if host is None:
            return None
        state = "unhealthy" if host.image in self.broken else "healthy"
        return {"agents": {inst.id: {"state": state} for inst in unit.group.instances}}

    def logs(self, unit: Unit, lines: int = 20) -> list[str]:
        return [f"{unit.name} log line"]

    def settle(self, unit: Unit) -> None:
        self.settled.append(unit.name)

    def set_aside(self, unit: Unit) -> bool:
        self.events.append(f"set aside {unit.name}")
        host = self.hosts.pop(unit.name, None)
        if host is not None:
            self.aside[unit.name] = host
        return host is not None

    def restore(self, unit: Unit) -> bool:
        self.events.append(f"restore {unit.name}")
        self.hosts.pop(unit.name, None)
        if unit.name not in self.aside:
            return False
        self.hosts[unit.name] = self.aside.pop(unit.name)
        return True

    def discard_previous(self, unit: Unit) -> None:
        self.events.append(f"discard {unit.name}")
        self.aside.pop(unit.name, None)


@pytest.fixture
def topology(tmp_path: Path) -> Topology:
    """Base alone in group base; Twin replicated in base (m1) and top (m2)."""
    path = tmp_path / "topology.yml"
    path.write_text(yaml.safe_dump({"machines": {"m1": {}, "m2": {}}, "agents": [
        {"name": "Base", "class": "m:A", "machine": "m1", "group": "base", "port": 7000,
         "health_timeout": 0.3},
        {"name": "Twin", "class": "m:A", "depends_on": ["Base"], "replicas": 2,
         "health_timeout": 0.3, "placement": [
             {"machine": "m1", "group": "base", "port": 7000},
             {"machine": "m2", "group": "top", "port": 7010}]},
    ]}))
    return load(path)


@pytest.fixture
def backend(topology: Topology, registry: Registry) -> ScriptedBackend:
    registry.ttl = 60  # every instance registered and serving for the whole test
    registry.register([InstanceRecord(inst.agent.name, inst.id, inst.placement.machine,
                                      inst.placement.group, "tcp://x:1", "http://x:2",
                                      state="healthy") for inst in topology.instances])
    return ScriptedBackend(topology, registry,
                           hosts={"base": Host(OLD), "top": Host(OLD)})


def upgrader(topology: Topology, backend: ScriptedBackend, registry: Registry) -> Upgrader:
    return Upgrader(topology, backend, registry, settle=0.0)


def drained(registry: Registry) -> list[str]:
    return sorted(r.instance for agent in ("Base", "Twin") for r in registry.records(agent)
                  if r.drained)


def test_pending_lists_drifted_hosts_in_start_order_with_what_gets_drained(
        topology: Topology, backend: ScriptedBackend) -> None:
    backend.hosts["top"] = Host(NEW)
    assert [h.to_dict() for h in pending(topology, backend)] == [
        {"group": "base", "machine": "m1", "layer": 0, "reason": "image changed",
         "image_from": OLD, "image_to": NEW, "drained": ["Twin-1"], "seconds": 0.0}]


def test_a_host_is_replaced_with_its_replicas_drained_and_undrained_after(
        topology: Topology, backend: ScriptedBackend, registry: Registry) -> None:
    done = upgrader(topology, backend, registry).upgrade("base")
    assert done is not None and (done.image_from, done.image_to) == (OLD, NEW)
    assert backend.events == ["set aside base", "start base", "discard base"]
    assert backend.settled == ["base"]  # its CPU limit, once healthy
    # Only the replicated instance is drained: Base has no other instance to take its calls.
    assert backend.drained_at_start == ["Twin-1"]
    assert drained(registry) == []
    assert backend.hosts["base"].image == NEW and backend.aside == {}
    assert backend.hosts["top"].image == OLD  # one host at a time


def test_callers_are_given_time_to_see_the_instances_back_before_the_next_host(
        topology: Topology, backend: ScriptedBackend, registry: Registry) -> None:
    """The next host's drain may take the undrained instances' replicas away at once: the
    wait for callers to re-read the registry follows the undrain too, not only the drain."""
    said = backend.events  # what the upgrade says, in turn with what it does
    Upgrader(topology, backend, registry, settle=0.0, progress=said.append).upgrade("base")
    waits = [line for line in said if "waiting 0s for callers to notice" in line]
    assert waits == ["drained Twin-1; waiting 0s for callers to notice",
                     "undrained Twin-1; waiting 0s for callers to notice"]
    assert said.index(waits[0]) < said.index("set aside base")
    assert said.index(waits[1]) > said.index("discard base")


def test_a_host_already_as_specified_is_left_alone(
        topology: Topology, backend: ScriptedBackend, registry: Registry) -> None:
    backend.hosts["base"] = Host(NEW)
    assert upgrader(topology, backend, registry).upgrade("base") is None
    assert backend.events == []


def test_a_drain_lifts_itself_if_the_run_is_killed(
        topology: Topology, backend: ScriptedBackend, registry: Registry) -> None:
    registry.set_drain("Twin", "Twin-1", True, ttl=600)
    assert 0 < registry.client.ttl("agentlink:drain:Twin:Twin-1") <= 600


def test_a_new_host_that_never_gets_healthy_is_rolled_back(
        topology: Topology, backend: ScriptedBackend, registry: Registry) -> None:
    backend.broken = {NEW}
    with pytest.raises(UpgradeFailed) as failed:
        upgrader(topology, backend, registry).upgrade("base")
    err = failed.value
    assert err.restored
    assert backend.events == ["set aside base", "start base", "restore base"]
    assert backend.settled == []  # the restored host kept the limit it ran with
    assert backend.hosts["base"].image == OLD
    assert drained(registry) == []
    text = str(err)
    assert "upgrade of host base on m1 to agentlink/m1:v2 failed" in text
    assert "did not become healthy within 0.3s" in text
    assert "rolled back to agentlink/m1:v1: healthy again" in text
    assert "the upgrade stops here" in text


def test_a_new_host_that_cannot_start_is_rolled_back(
        topology: Topology, backend: ScriptedBackend, registry: Registry) -> None:
    backend.missing_images = {NEW}
    with pytest.raises(UpgradeFailed) as failed:
        upgrader(topology, backend, registry).upgrade("base")
    assert failed.value.restored
    assert "LookupError: no such image: agentlink/m1:v2" in str(failed.value)
    assert backend.hosts["base"].image == OLD


def test_a_rollback_that_fails_too_says_so(
        topology: Topology, backend: ScriptedBackend, registry: Registry) -> None:
    backend.broken = {OLD, NEW}
    with pytest.raises(UpgradeFailed) as failed:
        upgrader(topology, backend, registry).upgrade("base")
    assert not failed.value.restored
    assert "rollback to agentlink/m1:v1 failed too: agent Base-1" in str(failed.value)
    assert drained(registry) == []


def test_an_unknown_group_is_named(topology: Topology, backend: ScriptedBackend,
                                   registry: Registry) -> None:
    with pytest.raises(ValueError, match="no agent host group 'nope'"):
        upgrader(topology, backend, registry).upgrade("nope")
