"""What only a deployment to real machines has: images shipped by export/copy/load, configs
and secrets in each machine's /etc, host networking, nothing written on the controller by
mistake, and an unreachable machine that stops the run before anything changes."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import docker
import pytest

from agentlink.deploy.docker_backend import LABEL_GROUP
from tests.failover.test_faults import serving, wait_until

from .conftest import Deployment


@pytest.fixture(autouse=True)
def real_machines(deployed: Deployment) -> None:
    if deployed.lab:
        pytest.skip("the lab shares this machine's engine and files")


def test_each_machine_runs_the_images_the_controller_built(deployed: Deployment) -> None:
    controller = docker.from_env()
    for machine in deployed.machines:
        running = deployed.containers(machine)
        assert running, machine
        for container in running:
            ref = container.attrs["Config"]["Image"]
            assert container.image.id == controller.images.get(ref).id, (machine, ref)
        # the copies shipped are removed once loaded
        leftovers = deployed.host(machine).check_output("ls /var/tmp")
        assert ".tar" not in leftovers, (machine, leftovers)


def test_configs_and_secrets_are_in_each_machine_s_etc(deployed: Deployment) -> None:
    for name, machine in deployed.machines.items():
        host = deployed.host(name)
        secrets = host.file(machine.secret_dir)
        assert secrets.is_directory and secrets.user == "root" and secrets.mode == 0o700
        keys = {Path(p).name for p in host.check_output(
            f"find {machine.secret_dir}/private -type f").split()}
        groups = {g.name for g in deployed.topology.groups.values() if g.machine == name}
        assert keys == {f"{g}.key_secret" for g in groups}, name  # its own hosts' keys only
        if name in deployed.addresses:
            assert host.file(f"{machine.config_dir}/startup_config.yaml").contains(
                f"machine: {name}")


def test_every_container_uses_the_machine_s_network(deployed: Deployment) -> None:
    for container in deployed.containers():
        assert container.attrs["HostConfig"]["NetworkMode"] == "host", container.name


def test_nothing_was_written_on_the_controller_in_a_machine_s_place(
        deployed: Deployment) -> None:
    """A task that should run on a machine but runs on the controller (a delegation from a
    local play) writes to the controller's /etc/agentlink; the hosts' /etc is their own."""
    for machine in deployed.machines.values():
        for path in (machine.config_dir, machine.secret_dir):
            assert not Path(path).exists(), f"{path} was made on the controller"


def test_an_unreachable_machine_stops_the_run_before_anything_changes(
        deployed: Deployment) -> None:
    before = {c.id for c in deployed.containers(label=LABEL_GROUP)}
    deployed.cut("pc2")
    try:
        run = deployed.playbook("site.yml", timeout=300)
    finally:
        deployed.heal("pc2")
    assert run.returncode != 0
    assert "UNREACHABLE" in run.stdout and "[pc2]" in run.stdout, run.stdout[-2000:]
    assert "NO MORE HOSTS LEFT" in run.stdout  # preflight stopped every machine
    assert "PLAY [Build the AgentLink images" not in run.stdout
    assert {c.id for c in deployed.containers(label=LABEL_GROUP)} == before
    # Back on the LAN, the system heals by itself: what the later tests start from.
    wait_until("every instance serving after the cut", lambda: serving(deployed))
    wait_until("every target scraped after the cut", lambda: all_scraped(deployed))


def all_scraped(deployed: Deployment) -> bool:
    """Prometheus's last scrape of every target succeeded."""
    url = f"{deployed.prometheus_url}/api/v1/targets?state=active"
    with urllib.request.urlopen(url, timeout=5) as response:
        targets = json.load(response)["data"]["activeTargets"]
    return bool(targets) and all(t["health"] == "up" for t in targets)
