"""The deployed system as the tests see it, for the inventory they are given.

AGENTLINK_INVENTORY names it (default inventory/lab; molecule dual gives the dual harness's).
Addresses, Docker engines, secrets and config paths are read from the inventory with
Ansible's own inventory and templating, so the tests see what the playbooks saw. Faults are
made the way each inventory allows: in the lab by Docker networks, on the dual harness's
hosts by scripts/dual_hosts.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import pytest
import redis
import testinfra
from ansible.inventory.manager import InventoryManager
from ansible.parsing.dataloader import DataLoader
from ansible.template import Templar
from ansible.vars.manager import VariableManager
from docker.models.containers import Container

from agentlink.deploy.docker_backend import LABEL_GROUP, LABEL_MACHINE, DockerBackend, MachineSpec
from agentlink.runtime.client import operator_registry
from agentlink.runtime.registry import Registry
from agentlink.security import operator_redis_auth
from agentlink.topology import Topology, load

ROOT = Path(__file__).resolve().parents[2]
INVENTORY = Path(os.environ.get("AGENTLINK_INVENTORY") or ROOT / "inventory" / "lab")
HARNESS = ROOT / "scripts" / "dual_hosts.py"
# What `slow` does to a lab machine; the dual harness has the same (scripts/dual_hosts.py).
SLOW_LOSS = ("-m", "statistic", "--mode", "random", "--probability", "0.05")
SLOW_DELAY = ("netem", "delay", "50ms")
HARNESS_INVENTORY = ROOT / "molecule" / "dual" / "inventory"


@dataclass(frozen=True)
class Machine:
    name: str
    address: str
    docker_host: str
    ssh_args: str
    config_dir: str
    secret_dir: str


def read_inventory(path: Path) -> tuple[dict[str, list[str]], dict[str, dict[str, Any]]]:
    """Groups, and each machine's variables templated as a play would see them."""
    loader = DataLoader()
    inventory = InventoryManager(loader=loader, sources=[str(path)])
    variables = VariableManager(loader=loader, inventory=inventory)
    hosts = {}
    for host in inventory.get_hosts("machines"):
        found = variables.get_vars(host=host)
        templar = Templar(loader=loader, variables=found)
        hosts[host.name] = {name: templar.template(found[name]) for name in
                            ("agentlink_address", "agentlink_lab", "agentlink_docker_host",
                             "agentlink_config_dir", "agentlink_secret_dir",
                             "agentlink_controller_secrets")}
        hosts[host.name]["ssh_args"] = templar.template(
            found.get("agentlink_docker_ssh_args", ""))
    return inventory.get_groups_dict(), hosts


class Deployment:
    """One deployed inventory: its machines, their engines, and the faults the tests make."""

    def __init__(self, inventory: Path) -> None:
        groups, hosts = read_inventory(inventory)
        self.inventory = inventory
        self.topology: Topology = load(ROOT / "topology" / "agents.yml")
        self.machines = {name: Machine(name, str(v["agentlink_address"]),
                                       str(v["agentlink_docker_host"]), str(v["ssh_args"]),
                                       str(v["agentlink_config_dir"]),
                                       str(v["agentlink_secret_dir"]))
                         for name, v in hosts.items()}
        agent_machines = groups["agent_machines"]
        # machine -> address: the agent machines, and those that only run a Sentinel
        self.addresses = {m: self.machines[m].address for m in agent_machines}
        self.witness = {m: s.address for m, s in self.machines.items() if m not in agent_machines}
        self.monitoring = groups["monitoring"][0]
        first = hosts[agent_machines[0]]
        self.lab = bool(first["agentlink_lab"])
        self.secrets = Path(str(first["agentlink_controller_secrets"]))
        self.harness = inventory.resolve() == HARNESS_INVENTORY.resolve()
        self._engines = DockerBackend({m: MachineSpec(name=m, image="", config_dir="",
                                                      address=s.address,
                                                      docker_host=s.docker_host,
                                                      ssh_args=s.ssh_args)
                                       for m, s in self.machines.items()})

    # --- where things are ---------------------------------------------------------------

    @property
    def prometheus_url(self) -> str:
        return f"http://{self.addresses[self.monitoring]}:9090"

    @property
    def alertmanager_url(self) -> str:
        return f"http://{self.addresses[self.monitoring]}:9093"

    @property
    def sentinels(self) -> list[str]:
        return [f"{s.address}:26379" for s in self.machines.values()]

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

    # --- engines and containers -----------------------------------------------------------

    def engine(self, machine: str) -> docker.DockerClient:
        return self._engines.client(machine)

    def containers(self, machine: str | None = None, label: str = LABEL_MACHINE,
                   include_stopped: bool = False) -> list[Container]:
        """The project's containers on one machine or on every one (running ones only,
        unless include_stopped)."""
        found = []
        for name in [machine] if machine else self.machines:
            found += self.engine(name).containers.list(
                all=include_stopped, filters={"label": [f"{LABEL_MACHINE}={name}", label]})
        return found

    def container(self, name: str) -> Container:
        """A project container by name (agentlink-<group>, agentlink-<machine>-<service>)."""
        suffix = name.removeprefix("agentlink-")
        group = self.topology.groups.get(suffix)
        machine = group.machine if group else next(
            (m for m in self.machines if suffix == m or suffix.startswith(f"{m}-")), None)
        if machine is None:
            raise KeyError(f"{name} is no container of this project")
        return self.engine(machine).containers.get(name)

    def host(self, machine: str) -> testinfra.host.Host:
        """The machine itself, over the SSH Ansible uses (the lab's machines: this one)."""
        if self.lab:
            return testinfra.get_host("local://")
        return testinfra.get_host(f"ansible://{machine}",
                                  ansible_inventory=str(self.inventory))

    # --- faults ---------------------------------------------------------------------------

    def cut(self, machine: str) -> None:
        """Cut the machine off the LAN: packets dropped both ways, connections hang, and the
        machine keeps its address and reaches itself, as behind a pulled cable. (Docker's
        network disconnect would take the address away from the machine itself.)"""
        if self.lab:
            for rule in self._lan_rules(machine):
                self._in_lab_machine(machine, "iptables", "-I", *rule, "-j", "DROP")
        else:
            self._harness("cut", machine)

    def heal(self, machine: str) -> None:
        if self.lab:
            for rule in self._lan_rules(machine):
                self._in_lab_machine(machine, "iptables", "-D", *rule, "-j", "DROP")
        else:
            self._harness("heal", machine)

    def slow(self, machine: str) -> None:
        """5% loss on everything the machine sends onto the LAN, and 50 ms delay where the
        kernel has netem (as scripts/dual_hosts.py slow does)."""
        if not self.lab:
            self._harness("slow", machine)
            return
        device = self._lan_device(machine)
        self._in_lab_machine(machine, "iptables", "-I", "OUTPUT", "-o", device, *SLOW_LOSS,
                             "-j", "DROP")
        self._in_lab_machine(machine, "tc", "qdisc", "replace", "dev", device, "root",
                             *SLOW_DELAY, check=False)

    def fast(self, machine: str) -> None:
        if not self.lab:
            self._harness("fast", machine)
            return
        device = self._lan_device(machine)
        self._in_lab_machine(machine, "iptables", "-D", "OUTPUT", "-o", device, *SLOW_LOSS,
                             "-j", "DROP")
        self._in_lab_machine(machine, "tc", "qdisc", "del", "dev", device, "root",
                             check=False)

    def inside(self, machine: str) -> list[str]:
        """The command prefix that runs a program of this machine (the controller) in the
        machine's network: a client on the machine's side of a partition."""
        if self.lab:
            return ["nsenter", "-t", str(self._anchor(machine).attrs["State"]["Pid"]), "-n"]
        if not self.harness:
            pytest.skip(f"{self.inventory} is real machines: the tests run no client there")
        return [sys.executable, str(HARNESS), "inside", machine, "--"]

    def _lan_rules(self, machine: str) -> list[list[str]]:
        device = self._lan_device(machine)
        return [["INPUT", "-i", device], ["OUTPUT", "-o", device]]

    def _lan_device(self, machine: str) -> str:
        """The lab machine's interface on the lan network: the one with its address."""
        found = self._in_lab_machine(machine, "ip", "-o", "-4", "addr", "show")
        return next(line.split()[1] for line in found.splitlines()
                    if f" {self.machines[machine].address}/" in line)

    def _in_lab_machine(self, machine: str, *argv: str, check: bool = True) -> str:
        """A command of this machine (iptables, tc) in the anchor's network namespace."""
        return subprocess.run([*self.inside(machine), *argv], check=check,
                              capture_output=True, text=True).stdout

    def stop(self, machine: str) -> list[Container]:
        """Lose the machine: stop every container of it (the lab's anchor last); what start()
        takes to bring it back."""
        running = sorted(self.containers(machine), key=lambda c: c.name == f"agentlink-{machine}")
        for container in running:
            container.stop(timeout=5)
        return running

    @staticmethod
    def start(stopped: list[Container]) -> None:
        for container in reversed(stopped):
            container.start()

    def _anchor(self, machine: str) -> Container:
        return docker.from_env().containers.get(f"agentlink-{machine}")

    def _harness(self, action: str, machine: str) -> None:
        if not self.harness:
            pytest.skip(f"{self.inventory} is real machines: the tests do not cut them off")
        subprocess.run([sys.executable, str(HARNESS), action, machine], check=True,
                       capture_output=True, text=True, timeout=60)

    # --- the toolkit on this inventory ---------------------------------------------------

    def playbook(self, playbook: str, *args: str, timeout: float = 900
                 ) -> subprocess.CompletedProcess[str]:
        command = [str(Path(sys.executable).parent / "ansible-playbook"), playbook,
                   "-i", str(self.inventory), *args]
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False,
                              timeout=timeout)

    def close(self) -> None:
        self._engines.close()


def agent_hosts(deployed: Deployment) -> dict[str, str]:
    """Every agent host container of the deployment: name -> the image it runs."""
    return {c.name: c.attrs["Config"]["Image"]
            for c in deployed.containers(label=LABEL_GROUP, include_stopped=True)}


@pytest.fixture(scope="session")
def deployed() -> Iterator[Deployment]:
    """The deployed inventory; skipped when it is not deployed, a failure under molecule."""
    deployment = Deployment(INVENTORY)
    try:
        deployment.container(f"agentlink-{next(iter(deployment.topology.groups))}")
    except (docker.errors.DockerException, OSError) as err:
        deployment.close()
        if os.environ.get("AGENTLINK_REQUIRE_LAB"):
            pytest.fail(f"{INVENTORY} must be deployed: {err}")
        pytest.skip(f"{INVENTORY} is not deployed ({err}); make deploy first")
    # The operator's credentials and CURVE key of this inventory, for this process and the
    # commands it runs (agentlink status).
    previous = os.environ.get("AGENTLINK_SECRETS")
    os.environ["AGENTLINK_SECRETS"] = str(deployment.secrets)
    yield deployment
    deployment.close()
    if previous is None:
        os.environ.pop("AGENTLINK_SECRETS", None)
    else:
        os.environ["AGENTLINK_SECRETS"] = previous
