"""The deployed lab: containers, configs, health, registry, Redis HA wiring, real traffic."""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import docker
import pytest
import testinfra

from agentlink.client import FailoverClient
from agentlink.docker_backend import MIN_MEMORY_MB

from .conftest import ROOT, Lab

IPV4 = re.compile(r"(?<![\d.])\d{1,3}(?:\.\d{1,3}){3}(?![\d.])")


def groups(lab: Lab) -> list[str]:
    return sorted(lab.topology.groups)


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=3) as response:
        return json.load(response)


@pytest.mark.parametrize("group", ["mainpc-core", "pc2-monitoring"])
def test_agent_host_runs_as_non_root_with_its_config_read_only(lab: Lab, group: str) -> None:
    host = testinfra.get_host(f"docker://agentlink-{group}")
    assert host.check_output("id -un") == "agentlink"
    assert host.file("/etc/agentlink/startup_config.yaml").exists
    mounts = host.file("/proc/mounts").content_string
    line = next(m for m in mounts.splitlines() if " /etc/agentlink " in m)
    assert " ro," in line or line.split()[3].startswith("ro")
    assert not host.exists("pip") and not host.exists("gcc")  # a runtime image, no tools


def test_every_group_answers_healthy_with_all_its_instances(lab: Lab) -> None:
    for group in lab.topology.groups.values():
        url = f"http://{lab.addresses[group.machine]}:{group.http_port}"
        health = get_json(f"{url}/health")
        assert health["state"] == "healthy", (group.name, health)
        assert set(health["agents"]) == {i.id for i in group.instances}
        with urllib.request.urlopen(f"{url}/metrics", timeout=3) as response:
            assert b"agentlink_requests_total" in response.read()


def test_status_reports_every_instance_serving(lab: Lab) -> None:
    args = [arg for s in lab.sentinels for arg in ("--sentinel", s)]
    result = subprocess.run([sys.executable, "-m", "agentlink", "status", "--json", "--file",
                             str(ROOT / "topology" / "agents.yml"), *args],
                            capture_output=True, text=True, check=False, timeout=60)
    report = json.loads(result.stdout)
    assert result.returncode == 0
    assert report["serving"] == report["total"] == len(lab.topology.instances)


def test_redis_replicates_and_three_sentinels_agree_on_the_primary(lab: Lab) -> None:
    answers = set()
    for address in [*lab.addresses.values(), *lab.witness.values()]:
        master = lab.sentinel(address).sentinel_master("agentlink")
        assert master["num-other-sentinels"] == 2  # the witness counts towards quorum
        answers.add(master["ip"])
    assert len(answers) == 1  # mainpc after a first deploy; whoever won after a failover
    primary = answers.pop()
    replica = next(a for a in lab.addresses.values() if a != primary)
    info = lab.redis(replica).info("replication")
    assert info["role"] == "slave" and info["master_host"] == primary


def test_a_request_crosses_machines_through_the_coordinator(lab: Lab) -> None:
    client = FailoverClient(lab.registry(), stateful={"MemoryOrchestratorService"})
    reply = client.call("RequestCoordinator", {"agent": "SystemHealthManager", "payload": {}})
    assert reply["result"]["resources"]["machine"] == "pc2"  # answered on pc2
    stored = client.call("MemoryOrchestratorService",
                         {"op": "put", "key": "lab-test", "value": [1, 2]}, key="lab-test")
    got = client.call("MemoryOrchestratorService", {"op": "get", "key": "lab-test"},
                      key="lab-test")
    assert got["value"] == [1, 2] and got["by"] == stored["by"]  # sticky by key


def test_containers_carry_the_topology_limits_and_a_restart_policy(lab: Lab) -> None:
    client = docker.from_env()
    for group in lab.topology.groups.values():
        config = client.containers.get(f"agentlink-{group.name}").attrs["HostConfig"]
        assert config["Memory"] == (MIN_MEMORY_MB + int(group.memory_mb)) * 2**20
        assert config["NanoCpus"] > 0
        assert config["RestartPolicy"]["Name"] == "unless-stopped"


def test_no_address_but_the_inventory_s_in_containers_or_configs(lab: Lab) -> None:
    allowed = {*lab.addresses.values(), *lab.witness.values()}
    client = docker.from_env()
    for group in lab.topology.groups.values():
        env = client.containers.get(f"agentlink-{group.name}").attrs["Config"]["Env"]
        found = {ip for var in env for ip in IPV4.findall(var)
                 if ipaddress.ip_address(ip)}
        assert found <= allowed, (group.name, found)
    for path in Path(ROOT / ".lab").rglob("*"):
        if path.is_file():
            # Loopback is no machine's address: Redis and Sentinel also bind it.
            assert set(IPV4.findall(path.read_text())) <= allowed | {"127.0.0.1"}, path
