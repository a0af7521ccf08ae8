"""Testing agents, in the spirit of nameko's testing tools.

- `call_handle(MyAgent, request, calls={...})`: one handle() call with no ZeroMQ and no Redis;
  calls to other agents go to the functions you give, state lives in a dict.
- `run_group(agents, redis_url)`: a real agent host in this process (real ROUTER and HTTP
  ports, real registry), started and healthy inside the `with` block, stopped after it.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from agentlink.runtime.agent import AgentContext, BaseAgent, MemoryState
from agentlink.runtime.host import AgentHost
from agentlink.runtime.startup_config import HostConfig, InstanceSpec
from agentlink.topology import DEFAULT_CONCURRENCY


def free_ports(count: int) -> list[int]:
    """`count` consecutive free ports on loopback (a group needs port and port + 1)."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = int(probe.getsockname()[1])
        if base + count > 65535:
            continue
        try:
            with contextlib.ExitStack() as stack:
                for port in range(base, base + count):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("", port))
            return list(range(base, base + count))
        except OSError:
            continue
    raise RuntimeError("no run of free ports found")


def call_handle(agent_cls: type[BaseAgent], request: Any, *,
                calls: Mapping[str, Callable[[Any], Any]] | None = None,
                options: dict[str, Any] | None = None, state: MemoryState | None = None,
                name: str | None = None) -> Any:
    """Run one request through an agent's handle(), with its calls and state faked."""
    fakes = dict(calls or {})

    def call(agent: str, payload: Any, key: str | None = None,
             timeout: float | None = None, idempotency_key: str | None = None) -> Any:
        if agent not in fakes:
            raise AssertionError(f"unexpected call to {agent}; fake it with calls={{...}}")
        return fakes[agent](payload)

    name = name or agent_cls.__name__
    context = AgentContext(name=name, instance=f"{name}-1", options=options or {}, call=call,
                           state=state if state is not None else MemoryState())
    return agent_cls(context).handle(request)


@dataclass
class AgentSpec:
    """One agent to host in a test group: its class path and, for a replica, its index."""

    name: str
    cls: str
    index: int = 1
    depends_on: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    health_timeout: float = 10.0
    concurrency: int = DEFAULT_CONCURRENCY


def host_config(group: str, agents: list[AgentSpec], redis_url: str, *,
                stateful: list[str] | None = None, machine: str = "local",
                ports: tuple[int, int] | None = None) -> HostConfig:
    port, http_port = ports or tuple(free_ports(2))
    return HostConfig(
        group=group, machine=machine, port=port, http_port=http_port,
        advertise_host="127.0.0.1", redis={"url": redis_url}, stateful_agents=stateful or [],
        ttl=3.0, heartbeat=0.5,
        instances=[InstanceSpec(agent=a.name, instance=f"{a.name}-{a.index}", cls=a.cls,
                                depends_on=a.depends_on, health_timeout=a.health_timeout,
                                options=a.options, concurrency=a.concurrency)
                   for a in agents])


def wait_healthy(host: AgentHost, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while host.health()["state"] != "healthy" or not host.registry.available:
        if time.monotonic() > deadline:
            raise TimeoutError(f"group {host.config.group} not healthy: {host.health()}")
        time.sleep(0.02)
    # healthy locally is not yet registered: wait for the supervisor's write
    while any(host.registry.discover(s.spec.agent) == [] for s in host.slots.values()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"group {host.config.group} not registered")
        time.sleep(0.02)


@contextlib.contextmanager
def run_group(agents: list[AgentSpec], redis_url: str, *, group: str = "test",
              stateful: list[str] | None = None, wait: bool = True) -> Iterator[AgentHost]:
    """Host these agents in this process; healthy and registered inside the block."""
    host = AgentHost(host_config(group, agents, redis_url, stateful=stateful))
    host.start()
    try:
        if wait:
            wait_healthy(host)
        yield host
    finally:
        host.stop()
