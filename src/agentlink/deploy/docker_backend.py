"""The Docker backend of the launcher: one container per agent host, on each machine's engine.

A machine is a Docker engine (local socket, or ssh:// to a real host, reached through
agentlink.deploy.docker_ssh with the machine's SSH options) plus how its containers reach the
network: `host` on a real machine, or `container:<anchor>` in the lab,
where one small anchor container per machine owns the machine's address and port space.
Either way every container of a machine shares one address, so configs are the same.

A container carries a digest of everything that defines it (image, command, environment,
config checksum, limits, network); an unchanged running container is left alone, any drift
recreates it. The launcher algorithm itself lives in agentlink.deploy.launch.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from typing import Any

import docker
from docker.errors import DockerException, NotFound
from docker.models.containers import Container

from agentlink.deploy.docker_ssh import SSHForward
from agentlink.deploy.launch import Unit
from agentlink.runtime.status import fetch_health
from agentlink.security import container_mounts

LABEL_DIGEST = "io.agentlink.digest"
LABEL_GROUP = "io.agentlink.group"
LABEL_MACHINE = "io.agentlink.machine"
CONFIG_MOUNT = "/etc/agentlink"
PREVIOUS = "-previous"  # name suffix of the host an upgrade keeps aside for a rollback
MIN_MEMORY_MB = 64  # the Python runtime alone; agents' own limits add to it
CPU_PERIOD_US = 100_000
UNLIMITED = -1  # a CFS quota of -1: no CPU limit
# An agent host's own limits: nothing writable but a small /tmp (the rest is the machine's
# hardening, below). Threads count as pids: a host runs its workers, HTTP and ZeroMQ
# threads, well under the bound.
AGENT_HOST_LIMITS: dict[str, Any] = {"tmpfs": {"/tmp": "size=16m,mode=1777"}, "pids_limit": 256}
# community.docker.docker_container's option names, as the inventory writes the hardening
# every container shares (agentlink_container_hardening), to the Docker SDK's run arguments.
_HARDENING_OPTIONS = {"read_only": "read_only", "cap_drop": "cap_drop",
                      "security_opts": "security_opt"}


def run_hardening(hardening: dict[str, Any]) -> dict[str, Any]:
    """The Docker SDK's run arguments for the inventory's container hardening."""
    unknown = sorted(set(hardening) - set(_HARDENING_OPTIONS))
    if unknown:
        raise ValueError(f"container hardening: unknown option(s) {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(_HARDENING_OPTIONS))}")
    return {_HARDENING_OPTIONS[key]: value for key, value in hardening.items()}


@dataclass
class MachineSpec:
    """How to run containers on one machine (from inventory, via the Ansible module)."""

    name: str
    image: str
    config_dir: str  # on that machine: holds startup_config.yaml, mounted read-only
    address: str  # where the controller reaches this machine's ports
    docker_host: str = "unix:///var/run/docker.sock"
    network_mode: str = "host"
    env: dict[str, str] = field(default_factory=dict)
    config_checksum: str = ""  # of the rendered configs: a change recreates containers
    secret_dir: str = ""  # on that machine: keys and passwords (roles/secrets); "" for none
    restart_policy: str = "unless-stopped"
    ssh_args: str = ""  # for an ssh:// docker_host: the key, port, options Ansible uses
    # read_only, cap_drop, security_opts (agentlink_container_hardening); {} for none
    hardening: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        run_hardening(self.hardening)  # a misspelt option fails before anything starts


class DockerBackend:
    def __init__(self, machines: dict[str, MachineSpec], *, prefix: str = "agentlink",
                 stop_timeout: int = 15) -> None:
        self.machines = machines
        self.prefix = prefix
        self.stop_timeout = stop_timeout
        self._clients: dict[str, docker.DockerClient] = {}
        self._forwards: dict[str, SSHForward] = {}  # docker_host -> its SSH forward
        # One lock per engine: connecting to a machine the LAN lost holds up no other.
        self._locks = {spec.docker_host: threading.Lock() for spec in machines.values()}

    def client(self, machine: str) -> docker.DockerClient:
        """The machine's engine; over SSH, a forward that died (the LAN dropped it) is made
        again, so a call after the network came back works."""
        url = self.machines[machine].docker_host
        with self._locks[url]:
            forward = self._forwards.get(url)
            if url in self._clients and (forward is None or forward.alive()):
                return self._clients[url]
            self._disconnect(url)
            self._clients[url] = docker.DockerClient(base_url=self._connect(machine), timeout=60)
            return self._clients[url]

    def _connect(self, machine: str) -> str:
        spec = self.machines[machine]
        if not spec.docker_host.startswith("ssh://"):
            return spec.docker_host
        forward = SSHForward(spec.docker_host, spec.ssh_args)
        url = forward.open()
        self._forwards[spec.docker_host] = forward
        return url

    def _disconnect(self, url: str) -> None:
        if (client := self._clients.pop(url, None)) is not None:
            client.close()
        if (forward := self._forwards.pop(url, None)) is not None:
            forward.close()

    def close(self) -> None:
        """Close every engine connection, and the SSH forwards they ride."""
        for url, lock in self._locks.items():
            with lock:
                self._disconnect(url)

    def __enter__(self) -> DockerBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def name(self, unit: Unit) -> str:
        return f"{self.prefix}-{unit.name}"

    def desired(self, unit: Unit) -> dict[str, Any]:
        """The container's run arguments, labelled with their digest."""
        machine = self.machines[unit.machine]
        memory_mb = MIN_MEMORY_MB + int(unit.group.memory_mb)
        spec: dict[str, Any] = {
            "image": machine.image,
            "command": ["run", "--config", f"{CONFIG_MOUNT}/startup_config.yaml",
                        "--group", unit.name],
            "environment": dict(sorted(machine.env.items())),
            "network_mode": machine.network_mode,
            "volumes": self._volumes(machine, unit.name),
            "mem_limit": f"{memory_mb}m",
            # The CPU limit as a quota per period: the form `docker update` can change.
            "cpu_period": CPU_PERIOD_US,
            "cpu_quota": self._cpu_quota(unit),
            "restart_policy": {"Name": machine.restart_policy},
            "stop_signal": "SIGTERM",
            **AGENT_HOST_LIMITS,
            **run_hardening(machine.hardening),
        }
        digest = hashlib.sha256(json.dumps([spec, machine.config_checksum], sort_keys=True)
                                .encode()).hexdigest()[:16]
        spec["labels"] = {LABEL_DIGEST: digest, LABEL_GROUP: unit.name,
                          LABEL_MACHINE: unit.machine}
        return spec

    @staticmethod
    def _cpu_quota(unit: Unit) -> int:
        """The group's CPU limit in microseconds per CPU_PERIOD_US, at least a tenth of one."""
        return max(int(unit.group.cpus * CPU_PERIOD_US), CPU_PERIOD_US // 10)

    @staticmethod
    def _volumes(machine: MachineSpec, group: str) -> dict[str, dict[str, str]]:
        mounts = {machine.config_dir: CONFIG_MOUNT}
        if machine.secret_dir:
            mounts |= container_mounts(machine.secret_dir, group)
        return {source: {"bind": target, "mode": "ro"} for source, target in mounts.items()}

    def _get(self, unit: Unit, suffix: str = "") -> Container | None:
        try:
            return self.client(unit.machine).containers.get(self.name(unit) + suffix)
        except NotFound:
            return None

    def drift(self, unit: Unit) -> str | None:
        """Why the unit's container must be (re)created, or None when it is as specified."""
        container = self._get(unit)
        if container is None:
            return "missing"
        if container.labels.get(LABEL_DIGEST) != self.desired(unit)["labels"][LABEL_DIGEST]:
            return "image, environment, config or limits changed"
        if container.status != "running":
            return f"container is {container.status}"
        return None

    def image(self, unit: Unit) -> str:
        return self.machines[unit.machine].image

    def running_image(self, unit: Unit) -> str | None:
        container = self._get(unit)
        return None if container is None else container.attrs["Config"]["Image"]

    # --- a rolling upgrade keeps the old host aside until the new one is healthy ----------

    def set_aside(self, unit: Unit) -> bool:
        self.discard_previous(unit)
        container = self._get(unit)
        if container is None:
            return False
        container.stop(timeout=self.stop_timeout)
        container.rename(self.name(unit) + PREVIOUS)
        return True

    def restore(self, unit: Unit) -> bool:
        self.stop(unit)
        previous = self._get(unit, PREVIOUS)
        if previous is None:
            return False
        previous.rename(self.name(unit))
        previous.start()
        return True

    def discard_previous(self, unit: Unit) -> None:
        previous = self._get(unit, PREVIOUS)
        if previous is not None:
            previous.remove(force=True)

    def start(self, unit: Unit) -> bool:
        """(Re)create the container, without its CPU limit until settle(): the limit is the
        host's budget once running, and a start (imports, config, connections) is a burst
        that it stretched several times over (0.2 CPU made a 0.5 s start 2.5 s)."""
        if self.drift(unit) is None:
            return False
        self.stop(unit)
        self.client(unit.machine).containers.run(
            name=self.name(unit), detach=True, **{**self.desired(unit), "cpu_quota": UNLIMITED})
        return True

    def settle(self, unit: Unit) -> None:
        """Apply the CPU limit start() held back; nothing when it is applied already."""
        container = self._get(unit)
        quota = self._cpu_quota(unit)
        if container is not None and container.attrs["HostConfig"]["CpuQuota"] != quota:
            container.update(cpu_period=CPU_PERIOD_US, cpu_quota=quota)

    def stop(self, unit: Unit) -> None:
        container = self._get(unit)
        if container is None:
            return
        try:
            container.stop(timeout=self.stop_timeout)
            container.remove(force=True)
        except NotFound:
            pass

    def alive(self, unit: Unit) -> bool:
        """Running, and not restarted since it was created: a crash loop is not alive."""
        container = self._get(unit)
        if container is None:
            return False
        state = container.attrs.get("State", {})
        return bool(state.get("Running")) and not container.attrs.get("RestartCount", 0)

    def health(self, unit: Unit) -> dict[str, Any] | None:
        return fetch_health(f"http://{self.machines[unit.machine].address}:"
                            f"{unit.group.http_port}")

    def logs(self, unit: Unit, lines: int = 20) -> list[str]:
        container = self._get(unit)
        if container is None:
            return []
        try:
            return container.logs(tail=lines).decode(errors="replace").splitlines()
        except DockerException:
            return []

    def containers(self) -> list[Container]:
        """Every agent host container of this project, on every machine."""
        found = []
        for machine in self.machines:
            found += self.client(machine).containers.list(
                all=True, filters={"label": [f"{LABEL_MACHINE}={machine}", LABEL_GROUP]})
        return found
