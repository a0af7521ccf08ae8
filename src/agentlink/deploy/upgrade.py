"""Rolling upgrade of agent hosts, one host at a time, with drain, health gate and rollback.

For one host (one group's process): when it already runs as specified, nothing happens.
Otherwise its replicated instances are drained in the registry, so callers go to the other
replicas, and the callers' discovery caches are given time to notice. The host is then
stopped: it stops taking requests (late ones are answered `unavailable`, which callers retry
elsewhere) and finishes those in flight. Its container is kept aside, the new one started
and gated on health; then the drain is lifted, the callers are given the same time to
notice, and the old container removed.

When anything fails after the old host was stopped, the new container is removed, the old
one is started again and gated, and UpgradeFailed says what failed and what was restored.
The drain is always lifted. The playbook (playbooks/upgrade.yml) runs this host by host and
stops at the first failure.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from agentlink.deploy.launch import Backend, Launcher, LaunchError, Unit
from agentlink.deploy.launch import plan as plan_units
from agentlink.topology import Topology

DRAIN_TTL_S = 600  # a drain left behind by a killed run lifts itself


class ReplaceableBackend(Backend, Protocol):
    """A backend that can keep a stopped host aside and bring it back (DockerBackend)."""

    def drift(self, unit: Unit) -> str | None: ...

    def image(self, unit: Unit) -> str:
        """The image the unit should run."""

    def running_image(self, unit: Unit) -> str | None:
        """The image the unit's current container was started from, if there is one."""

    def set_aside(self, unit: Unit) -> bool:
        """Stop the unit's host gracefully and keep it; False when there was none."""

    def restore(self, unit: Unit) -> bool:
        """Remove the unit's new host and start the one set aside; False when none was."""

    def discard_previous(self, unit: Unit) -> None: ...


class Drainer(Protocol):
    def set_drain(self, agent: str, instance: str, drained: bool,
                  ttl: int | None = None) -> None: ...


@dataclass
class HostUpgrade:
    """One host to upgrade, and afterwards what happened to it."""

    group: str
    machine: str
    layer: int
    reason: str
    image_from: str | None
    image_to: str
    drained: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class UpgradeFailed(Exception):
    def __init__(self, host: HostUpgrade, cause: str, restored: bool, restore_error: str = ""
                 ) -> None:
        self.host = host
        self.cause = cause
        self.restored = restored
        self.restore_error = restore_error
        super().__init__(host.group, cause)

    def __str__(self) -> str:
        h = self.host
        if self.restored:
            outcome = f"rolled back to {h.image_from}: healthy again"
        elif h.image_from is None:
            outcome = "there was no previous host to roll back to: the group is down"
        else:
            outcome = f"rollback to {h.image_from} failed too: {self.restore_error}"
        return (f"upgrade of host {h.group} on {h.machine} to {h.image_to} failed: "
                f"{self.cause}\n  {outcome}\n  the upgrade stops here; hosts upgraded before "
                f"this one keep the new image. Fix the image and run the upgrade again.")


def _units(topology: Topology) -> list[Unit]:
    return [unit for layer in plan_units(topology) for unit in layer]


def _drainable(unit: Unit) -> list[tuple[str, str]]:
    """(agent, instance) of the unit's instances that have a replica elsewhere."""
    return [(inst.agent.name, inst.id) for inst in unit.group.instances
            if len(inst.agent.placements) > 1]


def _unit(topology: Topology, group: str) -> Unit:
    unit = next((u for u in _units(topology) if u.name == group), None)
    if unit is None:
        raise ValueError(f"the topology has no agent host group {group!r}")
    return unit


def _planned(unit: Unit, backend: ReplaceableBackend) -> HostUpgrade | None:
    reason = backend.drift(unit)
    if reason is None:
        return None
    return HostUpgrade(unit.name, unit.machine, unit.layer, reason, backend.running_image(unit),
                       backend.image(unit), [instance for _, instance in _drainable(unit)])


def pending(topology: Topology, backend: ReplaceableBackend) -> list[HostUpgrade]:
    """The hosts that do not run as specified, in start order, each with why."""
    return [host for unit in _units(topology) if (host := _planned(unit, backend))]


def pending_host(topology: Topology, backend: ReplaceableBackend, group: str
                 ) -> HostUpgrade | None:
    """What upgrading this one host would do; None when it already runs as specified."""
    return _planned(_unit(topology, group), backend)


class Upgrader:
    def __init__(self, topology: Topology, backend: ReplaceableBackend, drainer: Drainer, *,
                 settle: float = 1.0, progress: Callable[[str], None] = lambda _: None) -> None:
        self.topology = topology
        self.backend = backend
        self.drainer = drainer
        self.settle = settle  # callers re-read the registry at least this often
        self.progress = progress
        self.launcher = Launcher(topology, backend, progress=progress)

    def upgrade(self, group: str) -> HostUpgrade | None:
        """Replace one host; None when it already runs as specified."""
        unit = _unit(self.topology, group)
        host = _planned(unit, self.backend)
        if host is None:
            return None
        begun = time.monotonic()
        drained = _drainable(unit)
        self._drain(drained, True)
        try:
            self._replace(unit, host)
        finally:
            self._drain(drained, False)
        host.seconds = round(time.monotonic() - begun, 3)
        return host

    def _drain(self, instances: list[tuple[str, str]], drained: bool) -> None:
        """Drain or undrain, then give callers time to re-read the registry either way: the
        next host's drain may take these instances' replicas away right after an undrain."""
        for agent, instance in instances:
            self.drainer.set_drain(agent, instance, drained, ttl=DRAIN_TTL_S)
        if instances:
            what = "drained" if drained else "undrained"
            self.progress(f"{what} {', '.join(i for _, i in instances)}; "
                          f"waiting {self.settle:g}s for callers to notice")
            time.sleep(self.settle)

    def _replace(self, unit: Unit, host: HostUpgrade) -> None:
        agents = sorted({inst.agent.name for inst in unit.group.instances})
        self.backend.set_aside(unit)
        try:
            self.backend.start(unit)
            self.launcher.gate(agents, {unit.name: unit})
        except Exception as err:  # whatever went wrong, the old host goes back
            raise self._roll_back(unit, host, agents, err) from err
        self.backend.settle(unit)
        self.backend.discard_previous(unit)

    def _roll_back(self, unit: Unit, host: HostUpgrade, agents: list[str], err: Exception
                   ) -> UpgradeFailed:
        cause = err.describe() if isinstance(err, LaunchError) else f"{type(err).__name__}: {err}"
        self.progress(f"{unit.name}: {cause.splitlines()[0]}; rolling back")
        try:
            if not self.backend.restore(unit):
                return UpgradeFailed(host, cause, restored=False)
            self.launcher.gate(agents, {unit.name: unit})
        except Exception as again:  # reported next to the first failure
            why = again.describe() if isinstance(again, LaunchError) else str(again)
            return UpgradeFailed(host, cause, restored=False, restore_error=why)
        return UpgradeFailed(host, cause, restored=True)
