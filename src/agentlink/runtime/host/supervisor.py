"""The host's supervisor thread: it waits for each instance's dependencies, starts its agent
once they are up, evaluates health, and heartbeats the registry for the whole group."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from agentlink.runtime.agent import Check, Health, checks_of, evaluate_health
from agentlink.runtime.host.admission import Slot
from agentlink.runtime.metrics import HostMetrics
from agentlink.runtime.registry import Registry
from agentlink.runtime.resources import host_sample
from agentlink.runtime.startup_config import HostConfig

log = logging.getLogger("agentlink.runtime.host")


class Supervisor:
    def __init__(self, config: HostConfig, slots: dict[str, Slot], registry: Registry,
                 metrics: HostMetrics, stopping: threading.Event) -> None:
        self.config = config
        self.slots = slots
        self.registry = registry
        self.metrics = metrics
        self.stopping = stopping
        self.started_at = 0.0  # when the host started serving: dependencies wait from here

    def instance_health(self, slot: Slot) -> Health:
        checks: list[Check] = []
        if not slot.ready:
            waited = time.monotonic() - self.started_at
            if waited > slot.spec.health_timeout:
                checks.append(Check("dependencies", "failed",
                                    f"not healthy after {slot.spec.health_timeout:g}s: "
                                    + ", ".join(slot.waiting_for)))
            else:
                checks.append(Check("dependencies", "ok",
                                    "waiting for " + ", ".join(slot.waiting_for)))
        if self.stopping.is_set():
            checks.append(Check("lifecycle", "failed", "stopping"))
        if not self.registry.available:
            checks.append(Check("registry", "degraded", self.registry.last_error))
        if slot.ready:
            checks.extend(checks_of(slot.agent))
        return evaluate_health(checks, starting=not slot.ready)

    def health(self) -> dict[str, Any]:
        agents = {s.spec.instance: {"agent": s.spec.agent, **self.instance_health(s).to_dict()}
                  for s in self.slots.values()}
        states = {a["state"] for a in agents.values()}
        state = next((s for s in ("unhealthy", "starting", "degraded") if s in states), "healthy")
        return {"group": self.config.group, "machine": self.config.machine, "state": state,
                "agents": agents}

    def run(self) -> None:
        """Wait for dependencies, keep the registry current; fast while anything starts."""
        last_beat = 0.0
        while not self.stopping.is_set():
            self._resolve_dependencies()
            changed = False
            for slot in self.slots.values():
                state = self.instance_health(slot).state
                changed |= state != slot.record.state
                slot.record.state = state
            now = time.monotonic()
            due = changed or now - last_beat >= self.config.heartbeat
            # While Redis is away, retry every round: re-registering is how we come back.
            if (due or not self.registry.available) and self.registry.register(
                    [s.record for s in self.slots.values()]):
                last_beat = now
                self.registry.publish_resources(self.config.group, host_sample(
                    self.config.group, self.config.machine, list(self.slots),
                    self.metrics.process))
            starting = any(not s.ready for s in self.slots.values())
            self.stopping.wait(0.05 if starting else min(0.5, self.config.heartbeat))

    def _resolve_dependencies(self) -> None:
        for slot in self.slots.values():
            if not slot.ready:
                slot.waiting_for = [d for d in slot.spec.depends_on
                                    if not self._dependency_up(d)]
                slot.ready = not slot.waiting_for
            if slot.ready and not slot.started:
                slot.started = True
                agent_hook(slot, slot.agent.start)

    def _dependency_up(self, agent: str) -> bool:
        local = self.slots.get(agent)
        if local is not None and local.record.state in ("healthy", "degraded"):
            return True
        return bool(self.registry.discover(agent))

    def stop_agents(self) -> None:
        for slot in self.slots.values():
            if slot.started:
                agent_hook(slot, slot.agent.stop)


def agent_hook(slot: Slot, hook: Callable[[], None]) -> None:
    try:
        hook()
    except Exception:  # the agent's health checks say what this broke
        log.exception("%s: %s() failed", slot.spec.instance, hook.__name__)
