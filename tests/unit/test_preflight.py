"""site.yml refuses bad input before it builds or starts anything."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import docker
import yaml

from agentlink.devtools.testing import free_ports

from .conftest import ROOT

PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"


def playbook(path: str, inventory: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(PLAYBOOK), "-i", str(inventory), path, *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)


def site(inventory: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return playbook("site.yml", inventory, *extra)


def lab_inventory(tmp_path: Path, hosts: dict[str, Any]) -> Path:
    """An inventory of these hosts with the lab's group_vars."""
    inventory = tmp_path / "inventory"
    shutil.copytree(ROOT / "inventory" / "lab" / "group_vars", inventory / "group_vars")
    (inventory / "hosts.yml").write_text(yaml.safe_dump(hosts))
    return inventory


def project_containers() -> set[str]:
    return {c.name for c in docker.from_env().containers.list(all=True)
            if c.name.startswith("agentlink-")}


def test_an_invalid_topology_stops_before_anything_is_built(tmp_path: Path) -> None:
    before = project_containers()
    bad = tmp_path / "agents.yml"
    bad.write_text("machines: {mainpc: {}}\nagents:\n"
                   "  - {name: HealthMonitor, class: 'm:C', machine: mainpc, group: g,"
                   " port: 7000, depends_on: [PerformanceMonitor]}\n"
                   "  - {name: PerformanceMonitor, class: 'm:C', machine: mainpc, group: g,"
                   " port: 7000, depends_on: [HealthMonitor]}\n")
    result = site(ROOT / "inventory" / "lab", "-e", f"agentlink_topology={bad}")
    assert result.returncode != 0
    assert "HealthMonitor -> PerformanceMonitor -> HealthMonitor" in result.stdout
    assert "Build the runtime" not in result.stdout  # stopped in preflight
    assert project_containers() == before


def test_an_unreachable_machine_stops_the_run_everywhere(tmp_path: Path) -> None:
    before = project_containers()
    hosts = yaml.safe_load((ROOT / "inventory" / "lab" / "hosts.yml").read_text())
    pc2 = hosts["all"]["children"]["machines"]["children"]["agent_machines"]["hosts"]["pc2"]
    # SSH to a closed port on loopback: refused at once, nothing leaves this machine.
    pc2.update(ansible_connection="ssh", ansible_host="127.0.0.1",
               ansible_port=free_ports(1)[0])
    result = site(lab_inventory(tmp_path, hosts))
    assert result.returncode != 0
    assert "fatal: [pc2]: UNREACHABLE!" in result.stdout
    assert "Render the configs" not in result.stdout  # mainpc was not touched either
    assert project_containers() == before


def test_a_real_machine_that_has_its_docker_packages_gets_no_apt_run(tmp_path: Path) -> None:
    """The preflight asks dpkg which packages a real machine lacks and runs apt only for those:
    a machine that has them all needs no mirror. This machine stands in for one, asked about
    two packages every Debian has. Its dockerd runs (the unit tests need it), so the engine
    is not started either."""
    hosts = {"all": {"children": {"machines": {"hosts": {"m1": {
        "agentlink_lab": False, "ansible_python_interpreter": sys.executable}}}}}}
    result = playbook("playbooks/preflight.yml", lab_inventory(tmp_path, hosts),
                      "-e", '{"_preflight_packages": ["dpkg", "coreutils"]}')
    assert result.returncode == 0, result.stdout[-3000:]
    install = result.stdout.split("TASK [Install the missing ones]")[1].split("TASK [")[0]
    assert "skipping: [m1]" in install, install
    start = result.stdout.split("TASK [Start the Docker engine")[1].split("TASK [")[0]
    assert "skipping: [m1]" in start, start
