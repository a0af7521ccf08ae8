"""Startup configs: rendered per machine from the topology, read by each agent host
(the schema, and its loader, are agentlink.runtime.startup_config).

Addresses never live in the topology. A rendered config names them as `${VAR:-default}`
and the host expands them from its environment at start, so the same file serves the lab and
two real machines; the defaults are whatever the inventory put there.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from agentlink.runtime.startup_config import InstanceSpec, registry_doc
from agentlink.security import CONTAINER_CURVE, CONTAINER_REDIS_AUTH
from agentlink.topology import Instance, Topology, load_once


def system_layout(topology: Topology, addresses: Mapping[str, str],
                  monitoring: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Every agent and host of the system, for the agents that look after the others:
    where each instance runs, its start layer, and each host's HTTP address.

    `monitoring` places services as `{"alertmanager": {"machine": "pc2", "port": 9093}}`;
    they become URLs with the machine's address as ${VAR:-default}.
    """

    def url(machine: str, port: int) -> str:
        return f"http://${{{topology.address_env(machine)}:-{addresses[machine]}}}:{port}"

    layer = topology.layer_of()
    agents = [{"name": a.name, "layer": layer[a.name], "replicas": a.replicas,
               "stateful": a.stateful, "memory_mb": a.memory_mb,
               "concurrency": a.concurrency}
              for a in topology.agents.values()]
    instances = [{"agent": i.agent.name, "instance": i.id, "machine": i.placement.machine,
                  "group": i.placement.group} for i in topology.instances]
    groups = {g.name: {"machine": g.machine, "layer": topology.group_layer(g),
                       "http": url(g.machine, g.http_port)}
              for g in topology.groups.values()}
    services = {name: url(str(where["machine"]), int(where["port"]))
                for name, where in (monitoring or {}).items()}
    return {"agents": agents, "instances": instances, "groups": groups, "monitoring": services}


def render_startup_config(topology: Topology, machine: str,
                          addresses: Mapping[str, str], redis: Mapping[str, Any],
                          registry: Mapping[str, float] | None = None,
                          monitoring: Mapping[str, Mapping[str, Any]] | None = None,
                          bind: str = "*") -> dict[str, Any]:
    """The startup config of one machine: its groups, with addresses as ${VAR:-default}.

    `addresses` maps each machine to its default address (from inventory); `redis` is
    `{"url": ...}` or `{"sentinels": [...], "service": ...}` and may use ${VAR} itself;
    `monitoring` says where Prometheus and Alertmanager run (see system_layout); `bind` is
    the address the hosts' ports listen on (every interface by default).
    """
    groups: dict[str, Any] = {}
    for group in topology.groups.values():
        if group.machine != machine:
            continue
        groups[group.name] = {
            "port": group.port,
            "http_port": group.http_port,
            "memory_mb": group.memory_mb,
            "cpus": round(group.cpus, 3),
            "instances": [instance_spec(i).to_doc() for i in group.instances],
        }
    var = topology.address_env(machine)
    return {
        "machine": machine,
        "advertise_host": f"${{{var}:-{addresses[machine]}}}",
        "bind": bind,
        "redis": dict(redis),
        "registry": dict(registry or registry_doc()),
        "stateful_agents": sorted(a.name for a in topology.agents.values() if a.stateful),
        "groups": groups,
        "system": system_layout(topology, addresses, monitoring),
    }


def instance_spec(instance: Instance) -> InstanceSpec:
    agent = instance.agent
    return InstanceSpec(agent=agent.name, instance=instance.id, cls=agent.cls,
                        depends_on=list(agent.depends_on), health_timeout=agent.health_timeout,
                        concurrency=agent.concurrency, options=agent.options)


def sentinel_settings(topology: Topology, addresses: Mapping[str, str], port: int,
                      service: str) -> dict[str, Any]:
    """Redis through Sentinel on every machine given, each address as ${VAR:-default}."""
    return {"sentinels": [f"${{{topology.address_env(m)}:-{addr}}}:{port}"
                          for m, addr in addresses.items()], "service": service}


def startup_config_for(topology_path: str, machine: str, addresses: Mapping[str, str],
                       sentinel_port: int, service: str,
                       monitoring: Mapping[str, Mapping[str, Any]] | None = None,
                       sentinel_addresses: Mapping[str, str] | None = None,
                       secured: bool = True) -> dict[str, Any]:
    """A machine's startup config with Redis through Sentinel (what the Ansible role uses).
    The Sentinels are on every agent machine unless `sentinel_addresses` says otherwise (the
    witness runs one too). Secured: Redis with the agents' user and CURVE between hosts, the
    secrets read from files the container gets mounted (agentlink.security)."""
    topology = load_once(topology_path)
    redis = sentinel_settings(topology, sentinel_addresses or addresses, sentinel_port, service)
    if secured:
        redis |= CONTAINER_REDIS_AUTH
    config = render_startup_config(topology, machine, addresses, redis, monitoring=monitoring)
    if secured:
        config["security"] = {"curve": dict(CONTAINER_CURVE)}
    return config


def write_startup_config(config: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
