"""Rolling upgrades on the deployed system (molecule scenarios upgrade and dual), in order:
the running release (v1) to v2 under load, again to v2 (no change), --check to v3, then to a
v3 whose agents never get healthy, which must roll back to v2 and stop. Under load no request fails
and no acknowledged write is lost."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from agentlink.deploy.docker_backend import LABEL_GROUP, LABEL_MACHINE
from agentlink.devtools.load import MEMORY, BackgroundLoad, LoadReport, LoadSpec
from agentlink.runtime.client import FailoverClient
from tests.failover.test_faults import TARGETS, assert_nothing_lost, serving
from tests.integration.conftest import agent_hosts

from .conftest import Deployment

RELEASES = Path(__file__).parent / "releases"


@pytest.fixture(scope="module")
def releases(deployed: Deployment) -> dict[str, dict[str, str]]:
    """Images v2 and v3 of each agent machine, built on the controller from the image that
    machine runs (the playbook ships them); release -> images."""
    engine = docker.from_env()
    running = {c.labels[LABEL_MACHINE]: c.attrs["Config"]["Image"]
               for c in deployed.containers(label=LABEL_GROUP)}
    built: dict[str, dict[str, str]] = {"v1": running, "v2": {}, "v3": {}}
    for machine, v1 in running.items():
        for release, base in (("v2", v1), ("v3", f"agentlink/{machine}:v2")):
            tag = f"agentlink/{machine}:{release}"
            engine.images.build(path=str(RELEASES / release), tag=tag, rm=True,
                                buildargs={"FROM_IMAGE": base})
            built[release][machine] = tag
    return built


def upgrade(deployed: Deployment, *args: str) -> subprocess.CompletedProcess[str]:
    return deployed.playbook("playbooks/upgrade.yml", *args)


@pytest.fixture
def load(deployed: Deployment) -> Iterator[BackgroundLoad]:
    client = FailoverClient(deployed.registry(), stateful={MEMORY})
    # A request may wait while a host without a replica is replaced: late, not failed.
    spec = LoadSpec(rate=40, duration=1800, workers=64, timeout=20.0, targets=TARGETS)
    with BackgroundLoad(client, spec) as running:
        yield running


def finished(load: BackgroundLoad) -> LoadReport:
    report = load.stop()
    assert report is not None, "the load generator did not finish"
    return report


def test_an_upgrade_to_v2_replaces_every_host_under_load_and_fails_no_request(
        deployed: Deployment, releases: dict[str, dict[str, str]], load: BackgroundLoad) -> None:
    before = agent_hosts(deployed)
    run = upgrade(deployed, "-e", "upgrade_image_tag=v2")
    report = finished(load)
    assert run.returncode == 0, run.stdout[-3000:]
    after = agent_hosts(deployed)
    assert set(after) == set(before)  # replaced, and nothing kept aside
    for name, image in after.items():
        machine = image.split("/")[1].split(":")[0]
        assert image == releases["v2"][machine], f"{name} runs {image}"
        assert f"{name.removeprefix('agentlink-')} now runs {image} and is healthy" in run.stdout
    assert_nothing_lost(report)
    assert serving(deployed)


def test_an_upgrade_to_the_release_running_changes_nothing(
        deployed: Deployment, releases: dict[str, dict[str, str]]) -> None:
    before = deployed.containers(label=LABEL_GROUP)
    run = upgrade(deployed, "-e", "upgrade_image_tag=v2")
    assert run.returncode == 0, run.stdout[-3000:]
    assert "nothing to upgrade" in run.stdout
    assert "changed=0" in run.stdout and "changed=1" not in run.stdout
    after = deployed.containers(label=LABEL_GROUP)
    assert sorted(c.id for c in after) == sorted(c.id for c in before)


def test_check_mode_lists_the_hosts_it_would_replace_and_touches_none(
        deployed: Deployment, releases: dict[str, dict[str, str]]) -> None:
    before = agent_hosts(deployed)
    run = upgrade(deployed, "--check", "-e", "upgrade_image_tag=v3")
    assert run.returncode == 0, run.stdout[-3000:]
    groups = sorted(name.removeprefix("agentlink-") for name in before)
    assert f"{len(groups)} host(s) to upgrade, one at a time" in run.stdout
    assert all(f"changed: [{group}]" in run.stdout for group in groups)
    assert agent_hosts(deployed) == before


def test_a_release_that_never_gets_healthy_is_rolled_back_and_stops_the_upgrade(
        deployed: Deployment, releases: dict[str, dict[str, str]], load: BackgroundLoad) -> None:
    run = upgrade(deployed, "-e", "upgrade_image_tag=v3")
    report = finished(load)
    assert run.returncode != 0
    assert "did not become healthy within" in run.stdout
    assert "v3 cannot load its model" in run.stdout  # the failed check, from its last answer
    assert "rolled back to agentlink/" in run.stdout and ":v2: healthy again" in run.stdout
    assert "the upgrade stops here" in run.stdout
    # The first host was rolled back and no other was tried: all still run v2.
    running = agent_hosts(deployed)
    assert all(image.endswith(":v2") for image in running.values()), running
    # SCAN, not KEYS: the agents' ACL user has no dangerous commands.
    assert not list(deployed.registry().client.scan_iter("agentlink:drain:*"))
    assert_nothing_lost(report)
    assert serving(deployed)


def test_an_image_that_is_not_there_is_named_before_anything_changes(
        deployed: Deployment, releases: dict[str, dict[str, str]]) -> None:
    before = agent_hosts(deployed)
    run = upgrade(deployed, "-e", "upgrade_image_tag=v9")
    assert run.returncode != 0
    assert "Not on this Docker engine: agentlink/mainpc:v9, agentlink/pc2:v9" in run.stdout
    assert agent_hosts(deployed) == before
