"""The deployed lab, as the tests see it: addresses from the inventory, the topology."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest
import redis
import yaml

from agentlink.client import operator_registry
from agentlink.registry import Registry
from agentlink.security import operator_redis_auth
from agentlink.topology import Topology, load

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Lab:
    topology: Topology
    addresses: dict[str, str]  # machine -> address, from inventory/lab
    monitoring: str  # the machine that runs Prometheus and Alertmanager
    witness: dict[str, str]  # machines that run only a Sentinel -> address

    @property
    def prometheus_url(self) -> str:
        return f"http://{self.addresses[self.monitoring]}:9090"

    @property
    def alertmanager_url(self) -> str:
        return f"http://{self.addresses[self.monitoring]}:9093"

    @property
    def sentinels(self) -> list[str]:
        every = [*self.addresses.values(), *self.witness.values()]
        return [f"{address}:26379" for address in every]

    def registry(self) -> Registry:
        return operator_registry({"sentinels": self.sentinels, "service": "agentlink"})

    @staticmethod
    def redis(address: str) -> redis.Redis:
        """The Redis at address, as the operator (the agents' ACL user)."""
        return redis.Redis(host=address, port=6379, **operator_redis_auth())

    @staticmethod
    def sentinel(address: str) -> redis.Redis:
        return redis.Redis(host=address, port=26379, decode_responses=True,
                           **operator_redis_auth(sentinel=True))


@pytest.fixture(scope="session")
def lab() -> Lab:
    """The running lab; skipped when none is deployed, a failure under molecule verify."""
    try:
        docker.from_env().containers.get("agentlink-mainpc-core")
    except docker.errors.DockerException as err:
        if os.environ.get("AGENTLINK_REQUIRE_LAB"):
            pytest.fail(f"the lab must be deployed here: {err}")
        pytest.skip(f"no lab deployed ({err}); make deploy first")
    hosts = yaml.safe_load((ROOT / "inventory" / "lab" / "hosts.yml").read_text())
    groups = hosts["all"]["children"]
    machines = groups["machines"]["children"]
    address = {name: vars_["agentlink_address"] for group in machines.values()
               for name, vars_ in group["hosts"].items()}
    agent_machines = set(machines["agent_machines"]["hosts"])
    return Lab(load(ROOT / "topology" / "agents.yml"),
               {m: a for m, a in address.items() if m in agent_machines},
               monitoring=next(iter(groups["monitoring"]["hosts"])),
               witness={m: a for m, a in address.items() if m not in agent_machines})
