"""The core services every other agent leans on."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any

from agentlink.agent import BaseAgent, Degraded

MAX_OBSERVATIONS = 1000


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
    """The system's front door: routes a request to any agent by name."""

    def handle(self, request: dict[str, Any]) -> Any:
        target = request.get("agent")
        if not isinstance(target, str):
            raise ValueError("route needs 'agent': the name of the agent to call")
        result = self.call(target, request.get("payload", {}), key=request.get("key"),
                           timeout=request.get("timeout"))
        return {"agent": target, "result": result}


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
