"""The core services every other agent leans on."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from agentlink.runtime.agent import BaseAgent, Degraded
from agentlink.topology import DEFAULT_CONCURRENCY

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from agentlink.runtime.workflow.engine import WorkflowEngine

MAX_OBSERVATIONS = 1000
RESOURCES = "ResourceManager"  # reports which machines are under pressure


class SystemDigitalTwin(BaseAgent):
    """A live model of the system: the latest observation each agent reported."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._observations: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def handle(self, request: dict[str, Any]) -> Any:
        op = request.get("op")
        if op == "observe":
            with self._lock:
                self._observations[str(request["source"])] = {
                    "value": request.get("value"), "at": time.time()}
                self._observations.move_to_end(str(request["source"]))
                while len(self._observations) > MAX_OBSERVATIONS:
                    self._observations.popitem(last=False)
            return {"observed": request["source"], "by": self.instance}
        if op == "snapshot":
            with self._lock:
                return {"instance": self.instance, "sources": len(self._observations),
                        "latest": dict(list(self._observations.items())[-10:])}
        raise ValueError(f"unknown op {op!r} (observe, snapshot)")


class RequestCoordinator(BaseAgent):
    """The system's front door: routes a request to any agent by name, and runs workflows
    with its other replicas (agentlink.runtime.workflow).

    Requests: {"agent", "payload"} routes; {"op": "workflow.run", "workflow": {...},
    "input": {...}} starts a workflow and answers its id once it is recorded;
    {"op": "workflow.status", "id"} answers its record, from any replica."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.engine = self._engine()

    def _engine(self) -> WorkflowEngine | None:
        """An engine when the host gives a registry (not in call_handle tests). Each replica
        takes its share of every agent's limit: concurrency x replicas / coordinators."""
        if self.context.registry is None:
            return None
        # Imported here: the engine and Jinja are 2 MB of every host that runs an agent of
        # this module, and only the coordinators' hosts run workflows.
        from agentlink.runtime.workflow.engine import WorkflowEngine

        agents = {a["name"]: a for a in self.context.system.get("agents", [])}
        coordinators = max(1, int(agents.get(self.name, {}).get("replicas", 1)))
        limits = {}
        for name, agent in agents.items():
            total = int(agent.get("concurrency", DEFAULT_CONCURRENCY)) * int(agent["replicas"])
            limits[name] = max(1, total // coordinators)
        machines: dict[str, set[str]] = {}
        for inst in self.context.system.get("instances", []):
            machines.setdefault(inst["agent"], set()).add(inst["machine"])
        return WorkflowEngine(
            self.context.registry.client, self.call, self.instance,
            agents=set(agents) or None, limits=limits, agent_machines=machines,
            pressure=self._machines_under_pressure if RESOURCES in agents else None)

    def _machines_under_pressure(self) -> set[str]:
        report = self.call(RESOURCES, {}, timeout=1.0)
        return {name for name, figures in report["machines"].items()
                if figures.get("under_pressure")}

    def start(self) -> None:
        if self.engine is not None:
            self.engine.start()

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.stop()

    def handle(self, request: dict[str, Any]) -> Any:
        op = request.get("op", "route")
        if op == "route":
            return self._route(request)
        if op not in ("workflow.run", "workflow.status"):
            raise ValueError(f"unknown op {op!r} (route, workflow.run, workflow.status)")
        if self.engine is None:
            raise ValueError(f"{self.instance} runs no workflow engine (no registry)")
        if op == "workflow.run":
            return self.engine.submit(request.get("workflow"), request.get("input"))
        return self.engine.status(str(request.get("id")))

    def _route(self, request: dict[str, Any]) -> Any:
        target = request.get("agent")
        if not isinstance(target, str):
            raise ValueError("route needs 'agent': the name of the agent to call")
        result = self.call(target, request.get("payload", {}), key=request.get("key"),
                           timeout=request.get("timeout"))
        return {"agent": target, "result": result}

    def check_health(self) -> dict[str, bool | Degraded]:
        if self.engine is None or self.engine.running:
            return {}
        return {"workflow_engine": Degraded("workflow engine not running")}

    def collect_metrics(self) -> Iterable[Metric]:
        if self.engine is not None:
            from agentlink.runtime.workflow.metrics import engine_metrics

            yield from engine_metrics(self.engine)


class UnifiedSystemAgent(BaseAgent):
    """One view of the system, from the digital twin and the health chain."""

    def handle(self, request: dict[str, Any]) -> Any:
        twin = self.call("SystemDigitalTwin", {"op": "snapshot"})
        return {"twin": twin["instance"], "sources": twin["sources"]}


class MemoryOrchestratorService(BaseAgent):
    """Stateful memory by key, kept in Redis so that any replica can take over a key."""

    def handle(self, request: dict[str, Any]) -> Any:
        op, key = request.get("op"), request.get("key")
        if not isinstance(key, str):
            raise ValueError("memory requests need a string 'key'")
        if op == "put":
            self.state.put(key, request.get("value"))
            return {"key": key, "stored": True, "by": self.instance}
        if op == "append":
            items = self.state.get(key) or []
            items.append(request.get("value"))
            self.state.put(key, items)
            return {"key": key, "length": len(items), "by": self.instance}
        if op == "get":
            return {"key": key, "value": self.state.get(key), "by": self.instance}
        raise ValueError(f"unknown op {op!r} (put, append, get)")

    def check_health(self) -> dict[str, bool | Degraded]:
        if not self.state.reachable():
            return {"state_store": Degraded("state store unreachable (Redis failing over?)")}
        return {"state_store": True}
