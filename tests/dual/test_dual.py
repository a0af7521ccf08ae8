"""What only a deployment to real machines has: images shipped by export/copy/load, configs
and secrets in each machine's /etc, host networking, nothing written on the controller by
mistake, an unreachable machine that stops the run before anything changes, and a machine
lost mid-run that fails the run rather than hanging it."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import docker
import psutil
import pytest

from agentlink.deploy.docker_backend import LABEL_GROUP
from agentlink.devtools.local import terminate
from tests.failover.test_faults import serving, wait_until

from .conftest import Deployment

ROOT = Path(__file__).resolve().parents[2]


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


def test_a_machine_lost_mid_run_fails_the_run_instead_of_hanging_it(
        deployed: Deployment, tmp_path: Path) -> None:
    """The connection a run over Mitogen holds to a machine gives up on it once it goes
    silent (SSH keepalive, 15 s): the run fails and names the machine; it does not wait."""
    command = [str(Path(sys.executable).parent / "ansible-playbook"),
               str(Path(__file__).with_name("lost_mid_run.yml")), "-i", str(deployed.inventory),
               "-e", f"lost_mid_run_dir={tmp_path}"]
    # Over Mitogen (opt-in), whose keepalive inventory/dual sets to ansible.cfg's 15 s.
    run = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, env={**os.environ, "ANSIBLE_STRATEGY": "mitogen_linear"})
    try:
        wait_until("the run reached pc2 or ended",
                   lambda: (tmp_path / "reached").exists() or run.poll() is not None)
        assert run.poll() is None, run.communicate()[0][-2000:]
        deployed.cut("pc2")
        (tmp_path / "cut").touch()
        # Ten times the keepalive's 15 s; Mitogen's own default would wait 5 minutes.
        stdout, _ = run.communicate(timeout=150)
    finally:
        if run.poll() is None:
            kill_with_descendants(run.pid)
        deployed.heal("pc2")
    assert run.returncode != 0
    assert "fatal: [pc2]: UNREACHABLE!" in stdout, stdout[-2000:]
    assert "Ask the machine again" in stdout.split("fatal: [pc2]")[0]


def kill_with_descendants(pid: int) -> None:
    """A run's task workers (each its own session) and Mitogen's processes outlive a killed
    ansible-playbook: kill the whole tree, found before anything in it dies."""
    with contextlib.suppress(psutil.NoSuchProcess):
        terminate([p.pid for p in psutil.Process(pid).children(recursive=True)] + [pid])


def all_scraped(deployed: Deployment) -> bool:
    """Prometheus's last scrape of every target succeeded."""
    url = f"{deployed.prometheus_url}/api/v1/targets?state=active"
    with urllib.request.urlopen(url, timeout=5) as response:
        targets = json.load(response)["data"]["activeTargets"]
    return bool(targets) and all(t["health"] == "up" for t in targets)
