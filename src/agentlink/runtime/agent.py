"""BaseAgent: what an agent author subclasses, and the system's one health implementation.

A subclass writes `handle(request)` and, if it has something of its own to check,
`check_health()`. Sockets, the registry, dependency waits, heartbeats and metrics belong to
the agent host; an agent reaches other agents with `self.call()` and shared state with
`self.state`, so it can be tested with no ZeroMQ or Redis at all (see agentlink.devtools.testing).
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from agentlink.runtime.registry import Registry

State = Literal["starting", "healthy", "degraded", "unhealthy"]
CheckStatus = Literal["ok", "degraded", "failed"]
_RANK: dict[str, int] = {"ok": 0, "degraded": 1, "failed": 2}


class Degraded(str):
    """Return this from check_health() for a check that is impaired but still serving."""


@dataclass(frozen=True)
class Check:
    name: str
    status: CheckStatus
    detail: str = ""


@dataclass(frozen=True)
class Health:
    state: State
    checks: tuple[Check, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state,
                "checks": [{"name": c.name, "status": c.status, "detail": c.detail}
                           for c in self.checks]}


def evaluate_health(checks: list[Check], starting: bool) -> Health:
    """The state from named checks: any failed is unhealthy, any degraded is degraded."""
    worst = max((_RANK[c.status] for c in checks), default=0)
    if worst == 2:
        state: State = "unhealthy"
    elif starting:
        state = "starting"
    else:
        state = "degraded" if worst == 1 else "healthy"
    return Health(state, tuple(checks))


def checks_of(agent: BaseAgent) -> list[Check]:
    """Run the agent's own checks. A check that raises, or an answer that is not a mapping
    of check names, is one failed check of this agent: never a crash of its host."""
    try:
        results = agent.check_health()
    except Exception as err:
        return [Check("check_health", "failed", f"{type(err).__name__}: {err}")]
    if not isinstance(results, Mapping):
        return [Check("check_health", "failed", f"returned {type(results).__name__} "
                      f"{results!r:.80}, not a dict of named checks")]
    return [Check(str(name), "degraded", str(value)) if isinstance(value, Degraded)
            else Check(str(name), "ok" if value else "failed") for name, value in results.items()]


class Caller(Protocol):
    def __call__(self, agent: str, payload: Any, key: str | None = None,
                 timeout: float | None = None, idempotency_key: str | None = None) -> Any: ...


class StateStore(Protocol):
    """Key/value state shared by all replicas of one agent."""

    def get(self, key: str) -> Any: ...
    def put(self, key: str, value: Any) -> None: ...
    def delete(self, key: str) -> None: ...
    def reachable(self) -> bool: ...


class MemoryState:
    """A StateStore in a dict, for tests of an agent's handle()."""

    def __init__(self, data: MutableMapping[str, str] | None = None) -> None:
        self.data = data if data is not None else {}

    def get(self, key: str) -> Any:
        value = self.data.get(key)
        return None if value is None else json.loads(value)

    def put(self, key: str, value: Any) -> None:
        self.data[key] = json.dumps(value)

    def delete(self, key: str) -> None:
        self.data.pop(key, None)

    def reachable(self) -> bool:
        return True


@dataclass
class AgentContext:
    """What the host hands an agent: identity, options, and its ways out."""

    name: str
    instance: str
    machine: str = "local"
    options: dict[str, Any] = field(default_factory=dict)
    call: Caller | None = None
    state: StateStore = field(default_factory=MemoryState)
    stats: Callable[[], dict[str, Any]] | None = None
    # The whole system as the startup config describes it (agents, groups, monitoring
    # addresses): what an agent that looks after other agents needs to know.
    system: dict[str, Any] = field(default_factory=dict)
    registry: Registry | None = None


@dataclass(frozen=True)
class WebReply:
    """An agent's answer to a GET on its host's HTTP port."""

    status: int
    content_type: str
    body: bytes


class BaseAgent:
    def __init__(self, context: AgentContext) -> None:
        self.context = context
        self.name = context.name
        self.instance = context.instance
        self.options = context.options
        self.state = context.state
        self.log = logging.getLogger(f"agentlink.runtime.agent.{context.instance}")

    def handle(self, request: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement handle()")

    def start(self) -> None:
        """Called once the agent's dependencies are up, before it is registered as serving:
        start background work here (threads must not block the call)."""

    def stop(self) -> None:
        """Called when the host stops, after in-flight requests ended: end background work."""

    def check_health(self) -> dict[str, bool | Degraded]:
        """Named checks of the agent's own: True ok, False failed, Degraded('why') impaired."""
        return {}

    def web(self, path: str) -> WebReply | None:
        """Answer a GET on the host's HTTP port (beside /health and /metrics); None: not mine.
        The port is read-only: an agent serves pages and JSON here, never changes state."""
        return None

    def collect_metrics(self) -> Iterable[Metric]:
        """Prometheus metrics of the agent's own, read at every scrape of its host."""
        return ()

    def call(self, agent: str, payload: Any, key: str | None = None,
             timeout: float | None = None, idempotency_key: str | None = None) -> Any:
        """Call another agent by name through the failover client."""
        if self.context.call is None:
            raise RuntimeError(f"{self.instance} has no way to call {agent} (no client given)")
        return self.context.call(agent, payload, key=key, timeout=timeout,
                                 idempotency_key=idempotency_key)


def load_class(path: str) -> type[BaseAgent]:
    """The agent class a topology names as `module:Class`."""
    module, _, name = path.partition(":")
    cls = getattr(importlib.import_module(module), name)
    if not (isinstance(cls, type) and issubclass(cls, BaseAgent)):
        raise TypeError(f"{path} is not a BaseAgent subclass")
    return cls
