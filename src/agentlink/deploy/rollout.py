"""What the `agent_launch` Ansible module does, as plain functions with plain results.

`launch()` brings the agent host containers of every machine to the topology, layer by
layer, gated on health; `plan()` says what that would change without touching anything
(check mode); `remove()` takes every agent host container away. Containers of groups that
are no longer in the topology are removed after a successful launch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from docker.errors import DockerException

from agentlink.deploy.docker_backend import LABEL_GROUP, DockerBackend, MachineSpec
from agentlink.deploy.launch import Launcher, Unit
from agentlink.deploy.launch import plan as plan_units
from agentlink.topology import Topology, TopologyError, load


def machine_specs(machines: dict[str, dict[str, Any]], topology: Topology
                  ) -> dict[str, MachineSpec]:
    missing = sorted(set(topology.machines) - set(machines))
    if missing:
        raise ValueError(f"the topology places agents on {', '.join(missing)}, which the "
                         "inventory does not define: add them to the inventory")
    return {name: MachineSpec(name=name, **{k: v for k, v in spec.items() if v is not None})
            for name, spec in machines.items() if name in topology.machines}


@contextmanager
def open_deployment(topology_path: str, machines: dict[str, dict[str, Any]], prefix: str
                    ) -> Iterator[tuple[Topology, DockerBackend]]:
    """The topology and the Docker backend of its machines, as the modules get them; the
    backend's connections (SSH forwards included) close when the block ends, exit_json's
    SystemExit included. Not at the process's exit: over Mitogen a module runs in an
    interpreter that lives for the whole run, and may end without running atexit."""
    topology = load(topology_path)
    with DockerBackend(machine_specs(machines, topology), prefix=prefix) as backend:
        yield topology, backend


def module_failure(err: Exception) -> dict[str, Any] | None:
    """fail_json arguments for an error every deploy module reports alike; None: not one."""
    if isinstance(err, TopologyError):
        return {"msg": f"invalid topology:\n{err}", "problems": [str(e) for e in err.problems]}
    if isinstance(err, DockerException):
        return {"msg": f"a Docker engine does not answer: {err}. On the lab host run "
                "scripts/ensure-docker.sh; on a real machine check agentlink_docker_host"}
    if isinstance(err, ValueError | OSError):
        return {"msg": str(err)}
    return None


def _units(topology: Topology) -> list[Unit]:
    return [unit for layer in plan_units(topology) for unit in layer]


def _orphans(topology: Topology, backend: DockerBackend) -> list[Any]:
    known = set(topology.groups)
    return [c for c in backend.containers() if c.labels.get(LABEL_GROUP) not in known]


def plan(topology: Topology, backend: DockerBackend) -> dict[str, Any]:
    """What launch() would change: per container, why; nothing is touched."""
    changes = {backend.name(u): reason for u in _units(topology)
               if (reason := backend.drift(u)) is not None}
    orphans = [c.name for c in _orphans(topology, backend)]
    return {"changed": bool(changes or orphans), "would_start": changes,
            "would_remove": orphans}


def launch(topology: Topology, backend: DockerBackend,
           progress: Callable[[str], None] = lambda _: None,
           one_by_one: bool = False) -> dict[str, Any]:
    report = Launcher(topology, backend, progress=progress, one_by_one=one_by_one).launch()
    removed = []
    for container in _orphans(topology, backend):
        container.remove(force=True)
        removed.append(container.name)
    result = report.to_dict()
    result["changed"] = report.changed or bool(removed)
    result["removed"] = removed
    return result


def remove(topology: Topology, backend: DockerBackend) -> dict[str, Any]:
    """Stop and remove every agent host container, later layers first."""
    removed = []
    for unit in reversed(_units(topology)):
        if backend.drift(unit) != "missing":
            backend.stop(unit)
            removed.append(backend.name(unit))
    for container in backend.containers():  # orphans, and hosts an upgrade kept aside
        container.remove(force=True)
        removed.append(str(container.name))
    return {"changed": bool(removed), "removed": removed}
