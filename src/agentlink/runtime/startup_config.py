"""The startup config's schema: what one machine's agent hosts read at start.

The controller renders one file per machine from the topology (agentlink.deploy.render);
`agentlink run` loads one group's part of it (load_host_config). Both go through the types
and defaults here, so the two sides cannot drift apart. Addresses are `${VAR:-default}` in
the file and expanded from the process's environment when it is loaded.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from agentlink.topology import DEFAULT_CONCURRENCY, DEFAULT_HEALTH_TIMEOUT_S

# The registry's timing: an instance that misses heartbeats for TTL_S is gone from discovery.
TTL_S = 6.0
HEARTBEAT_S = 2.0
# A request finding its instance at its `concurrency` waits this long for a place at most
# (below the failover client's shortest attempt, 1 s: it is answered before its caller gives
# up on it), then it is answered `overloaded` (see agentlink.runtime.host.admission).
SLOT_WAIT_S = 0.8

_VAR = re.compile(r"\$\{(?P<name>[A-Za-z_]\w*)(?::-(?P<default>[^}]*))?\}")


class ConfigError(Exception):
    pass


@dataclass
class InstanceSpec:
    """One hosted instance, as a startup config lists it under its group."""

    agent: str
    instance: str
    cls: str
    depends_on: list[str] = field(default_factory=list)
    health_timeout: float = DEFAULT_HEALTH_TIMEOUT_S
    options: dict[str, Any] = field(default_factory=dict)
    # Requests the instance runs at once (the topology's `concurrency`); more wait for a place
    # without a worker, briefly (SLOT_WAIT_S), then are answered `overloaded`: one agent stuck
    # (writes waiting out a partition) cannot take every worker of its host from the others.
    concurrency: int = DEFAULT_CONCURRENCY

    def to_doc(self) -> dict[str, Any]:
        return {"agent": self.agent, "instance": self.instance, "class": self.cls,
                "depends_on": list(self.depends_on), "health_timeout": self.health_timeout,
                "concurrency": self.concurrency, "options": self.options}

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> InstanceSpec:
        return cls(agent=doc["agent"], instance=doc["instance"], cls=doc["class"],
                   depends_on=list(doc.get("depends_on") or []),
                   health_timeout=float(doc.get("health_timeout", DEFAULT_HEALTH_TIMEOUT_S)),
                   concurrency=int(doc.get("concurrency", DEFAULT_CONCURRENCY)),
                   options=dict(doc.get("options") or {}))


@dataclass
class HostConfig:
    """One group's host settings, picked out of its machine's startup config."""

    group: str
    machine: str
    port: int
    http_port: int
    advertise_host: str
    redis: dict[str, Any]
    instances: list[InstanceSpec]
    stateful_agents: list[str] = field(default_factory=list)
    ttl: float = TTL_S
    heartbeat: float = HEARTBEAT_S
    # Threads that run handlers. Mostly waiting (on other agents, on Redis), so cheap; enough
    # that one agent stuck in a Redis failover does not starve its group's other agents.
    workers: int = 32
    stop_deadline: float = 10.0
    slot_wait: float = SLOT_WAIT_S
    system: dict[str, Any] = field(default_factory=dict)  # see deploy.render.system_layout
    curve: dict[str, str] = field(default_factory=dict)  # keys' files; empty: CURVE off
    # The address both ports listen on: every interface ("*") on a machine, loopback for
    # `agentlink up`, whose hosts nobody else should reach.
    bind: str = "*"


def registry_doc(ttl: float = TTL_S, heartbeat: float = HEARTBEAT_S) -> dict[str, float]:
    return {"ttl": ttl, "heartbeat": heartbeat}


def expand(text: str, env: Mapping[str, str] | None = None) -> str:
    """Expand ${VAR} and ${VAR:-default}; an unset VAR without a default is an error."""
    env = os.environ if env is None else env

    def value(match: re.Match[str]) -> str:
        name, default = match.group("name"), match.group("default")
        if env.get(name):
            return env[name]
        if default is None:
            raise ConfigError(f"environment variable {name} is not set and has no default")
        return default

    return _VAR.sub(value, text)


# libyaml's safe loader where PyYAML was built with it (its wheels are): a machine's config
# lists every agent of the system, and the pure-Python parser spent 0.2 s of each host's
# start on it, 7 times libyaml's time.
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_host_config(path: str | Path, group: str,
                     env: Mapping[str, str] | None = None) -> HostConfig:
    """Read a startup config (expanding ${VAR}) and pick one group's host settings."""
    doc = yaml.load(expand(Path(path).read_text(), env), Loader=_SAFE_LOADER)
    groups = doc.get("groups") or {}
    if group not in groups:
        known = ", ".join(groups) or "none"
        raise ConfigError(f"group {group!r} is not in {path} (groups there: {known})")
    g = groups[group]
    registry = {**registry_doc(), **(doc.get("registry") or {})}
    return HostConfig(
        group=group, machine=doc["machine"], port=int(g["port"]),
        http_port=int(g["http_port"]), advertise_host=str(doc["advertise_host"]),
        redis=doc["redis"], stateful_agents=list(doc.get("stateful_agents") or []),
        instances=[InstanceSpec.from_doc(i) for i in g["instances"]],
        ttl=float(registry["ttl"]), heartbeat=float(registry["heartbeat"]),
        system=dict(doc.get("system") or {}),
        curve=dict((doc.get("security") or {}).get("curve") or {}),
        bind=str(doc.get("bind", "*")),
    )
