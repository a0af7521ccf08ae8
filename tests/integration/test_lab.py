"""The deployed system (lab or two machines): containers, configs, health, registry, Redis HA
wiring, real traffic."""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import sys
import urllib.request
from typing import Any

import pytest

from agentlink.deploy.docker_backend import MIN_MEMORY_MB
from agentlink.runtime.client import FailoverClient

from .conftest import ROOT, Deployment

IPV4 = re.compile(r"(?<![\d.])\d{1,3}(?:\.\d{1,3}){3}(?![\d.])")


def groups(deployed: Deployment) -> list[str]:
    return sorted(deployed.topology.groups)


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=3) as response:
        return json.load(response)


def run_in(deployed: Deployment, container: str, *argv: str) -> tuple[int, str]:
    result = deployed.container(container).exec_run(list(argv))
    return result.exit_code, result.output.decode(errors="replace").strip()


@pytest.mark.parametrize("group", ["mainpc-core", "pc2-monitoring"])
def test_agent_host_runs_as_non_root_with_its_config_read_only(deployed: Deployment,
                                                              group: str) -> None:
    name = f"agentlink-{group}"
    assert run_in(deployed, name, "id", "-un") == (0, "agentlink")
    assert run_in(deployed, name, "test", "-f", "/etc/agentlink/startup_config.yaml")[0] == 0
    mounts = run_in(deployed, name, "cat", "/proc/mounts")[1]
    line = next(m for m in mounts.splitlines() if " /etc/agentlink " in m)
    assert line.split()[3].split(",")[0] == "ro"
    for tool in ("pip", "gcc"):  # a runtime image, no tools
        assert run_in(deployed, name, "sh", "-c", f"command -v {tool}")[0] != 0


def test_the_runtime_image_carries_the_runtime_and_not_the_controller(deployed: Deployment
                                                                      ) -> None:
    name = "agentlink-mainpc-core"
    assert run_in(deployed, name, "python3", "-c", "import agentlink.runtime.host")[0] == 0
    for package in ("agentlink.deploy", "agentlink.devtools"):
        code, output = run_in(deployed, name, "python3", "-c", f"import {package}")
        assert code != 0 and "ModuleNotFoundError" in output, (package, output)


def test_every_group_answers_healthy_with_all_its_instances(deployed: Deployment) -> None:
    for group in deployed.topology.groups.values():
        url = f"http://{deployed.addresses[group.machine]}:{group.http_port}"
        health = get_json(f"{url}/health")
        assert health["state"] == "healthy", (group.name, health)
        assert set(health["agents"]) == {i.id for i in group.instances}
        with urllib.request.urlopen(f"{url}/metrics", timeout=3) as response:
            assert b"agentlink_requests_total" in response.read()


def test_status_reports_every_instance_serving(deployed: Deployment) -> None:
    args = [arg for s in deployed.sentinels for arg in ("--sentinel", s)]
    result = subprocess.run([sys.executable, "-m", "agentlink", "status", "--json", "--file",
                             str(ROOT / "topology" / "agents.yml"), *args],
                            capture_output=True, text=True, check=False, timeout=60)
    report = json.loads(result.stdout)
    assert result.returncode == 0
    assert report["serving"] == report["total"] == len(deployed.topology.instances)


def test_redis_replicates_and_three_sentinels_agree_on_the_primary(deployed: Deployment) -> None:
    answers = set()
    for address in [*deployed.addresses.values(), *deployed.witness.values()]:
        master = deployed.sentinel(address).sentinel_master("agentlink")
        assert master["num-other-sentinels"] == 2  # the witness counts towards quorum
        answers.add(master["ip"])
    assert len(answers) == 1  # mainpc after a first deploy; whoever won after a failover
    primary = answers.pop()
    replica = next(a for a in deployed.addresses.values() if a != primary)
    info = deployed.redis(replica).info("replication")
    assert info["role"] == "slave" and info["master_host"] == primary


def test_each_redis_refuses_writes_before_its_container_runs_out_of_memory(
        deployed: Deployment) -> None:
    for machine, address in deployed.addresses.items():
        limit = deployed.container(f"agentlink-{machine}-redis").attrs["HostConfig"]["Memory"]
        memory = deployed.redis(address).info("memory")
        assert memory["maxmemory_policy"] == "noeviction"
        assert 0 < memory["maxmemory"] < limit  # the rest: a fork's pages, replica buffers


def test_a_request_crosses_machines_through_the_coordinator(deployed: Deployment) -> None:
    client = FailoverClient(deployed.registry(), stateful={"MemoryOrchestratorService"})
    reply = client.call("RequestCoordinator", {"agent": "SystemHealthManager", "payload": {}})
    assert reply["result"]["resources"]["machine"] == "pc2"  # answered on pc2
    stored = client.call("MemoryOrchestratorService",
                         {"op": "put", "key": "lab-test", "value": [1, 2]}, key="lab-test")
    got = client.call("MemoryOrchestratorService", {"op": "get", "key": "lab-test"},
                      key="lab-test")
    assert got["value"] == [1, 2] and got["by"] == stored["by"]  # sticky by key


def test_containers_carry_the_topology_limits_and_a_restart_policy(deployed: Deployment
                                                                  ) -> None:
    for group in deployed.topology.groups.values():
        config = deployed.container(f"agentlink-{group.name}").attrs["HostConfig"]
        assert config["Memory"] == (MIN_MEMORY_MB + int(group.memory_mb)) * 2**20
        # Held back while the host started (DockerBackend.start), applied once healthy.
        assert config["CpuQuota"] / config["CpuPeriod"] == pytest.approx(max(group.cpus, 0.1),
                                                                         abs=1e-4)
        assert config["RestartPolicy"]["Name"] == "unless-stopped"


def test_no_address_but_the_inventory_s_in_containers_or_configs(deployed: Deployment
                                                                 ) -> None:
    allowed = {*deployed.addresses.values(), *deployed.witness.values()}
    for group in deployed.topology.groups.values():
        env = deployed.container(f"agentlink-{group.name}").attrs["Config"]["Env"]
        found = {ip for var in env for ip in IPV4.findall(var)
                 if ipaddress.ip_address(ip)}
        assert found <= allowed, (group.name, found)
    files: set[str] = set()
    for machine in deployed.machines.values():
        # Every line of every rendered file of the machine, as path:line, in one command.
        lines = deployed.host(machine.name).check_output(
            f"find {machine.config_dir} {machine.secret_dir} -type f -exec grep -H '' {{}} +")
        for line in lines.splitlines():
            path, _, text = line.partition(":")
            files.add(f"{machine.name}:{path}")
            # Loopback is no machine's address: Redis and Sentinel also bind it.
            found = set(IPV4.findall(text))
            assert found <= allowed | {"127.0.0.1"}, (machine.name, path, found)
    assert len(files) > 2 * len(deployed.machines)
