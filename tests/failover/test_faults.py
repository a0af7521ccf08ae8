"""Faults under load on the deployed lab: a replica killed, pc2 cut off and then stopped, the
Redis primary killed. In each the system keeps answering every request for which a live
replica exists, loses no acknowledged write, shows what is degraded, and heals."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable

import docker
import pytest
import redis

from agentlink.client import FailoverClient
from agentlink.load import MEMORY, LoadReport, LoadSpec, run_load

from .conftest import Lab

ROOT_TOPOLOGY = "topology/agents.yml"
# Replicated agents only: each has a replica on mainpc, which no fault here takes away.
TARGETS = ("coordinator", "twin", "memory")


def under_load(lab: Lab, fault: Callable[[], None], duration: float = 20.0) -> LoadReport:
    """Run the load; inject the fault once it is flowing; the report after read-back."""
    client = FailoverClient(lab.registry(), stateful={MEMORY})
    flowing = threading.Event()
    injector = threading.Thread(target=lambda: flowing.wait(30) and fault())
    injector.start()
    # A request may wait out a failover (seconds): late, not failed. Enough workers that the
    # waiting ones do not hold up the schedule.
    report = run_load(client, LoadSpec(rate=40, duration=duration, workers=64, timeout=20.0,
                                       targets=TARGETS),
                      progress=lambda r: r.succeeded > 80 and flowing.set())
    injector.join()
    assert flowing.is_set(), "the load never got going"
    return report


def assert_nothing_lost(report: LoadReport) -> None:
    summary = report.summary()
    assert report.failed == 0, (summary["failures"], summary["failure_examples"])
    assert report.unsent == 0
    assert report.lost == [], f"acknowledged writes lost: {report.lost[:5]}"
    assert report.verified == len(report.acknowledged) > 0


def serving(lab: Lab) -> bool:
    """`agentlink status` through the Sentinels: every instance registered and serving."""
    args = [arg for s in lab.sentinels for arg in ("--sentinel", s)]
    result = subprocess.run([sys.executable, "-m", "agentlink", "status", "--file",
                             ROOT_TOPOLOGY, *args], capture_output=True, text=True,
                            check=False, timeout=60)
    return result.returncode == 0


def wait_until(what: str, check: Callable[[], bool], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout:g}s"
        time.sleep(1)


def containers_of(machine: str) -> list[docker.models.containers.Container]:
    found = docker.from_env().containers.list(
        all=True, filters={"label": f"io.agentlink.machine={machine}"})
    # The anchor owns the machine's network: first up, last down.
    return sorted(found, key=lambda c: c.name != f"agentlink-{machine}")


def replicated(lab: Lab) -> bool:
    """The primary the Sentinels name has its replica connected and in sync."""
    try:
        primary = lab.sentinel(lab.addresses["mainpc"]).sentinel_get_master_addr_by_name(
            "agentlink")[0]
        info = lab.redis(primary).info("replication")
    except (redis.RedisError, TypeError):
        return False
    return info["role"] == "master" and info["connected_slaves"] == len(lab.addresses) - 1 \
        and all(info[f"slave{n}"]["state"] == "online" for n in range(info["connected_slaves"]))


@pytest.fixture(autouse=True)
def healthy_before(lab: Lab) -> None:
    """Each fault starts from a healed system: one fault at a time, not a double fault."""
    wait_until("every instance serving before the fault", lambda: serving(lab))
    wait_until("Redis replicated before the fault", lambda: replicated(lab))


def test_a_replica_killed_under_load(lab: Lab) -> None:
    host = docker.from_env().containers.get("agentlink-pc2-core")  # SDT-2 and MOS-2
    try:
        report = under_load(lab, host.kill)
        assert not serving(lab)  # status shows the killed replicas
    finally:
        host.start()
    assert_nothing_lost(report)
    wait_until("pc2-core healthy again", lambda: serving(lab))


def test_pc2_cut_off_then_stopped_under_load(lab: Lab) -> None:
    client = docker.from_env()
    lan, anchor = client.networks.get("agentlink-lan"), client.containers.get("agentlink-pc2")
    try:
        report = under_load(lab, lambda: lan.disconnect(anchor))
        assert not serving(lab)
    finally:
        lan.connect(anchor, ipv4_address=lab.addresses["pc2"], aliases=["pc2"])
    assert_nothing_lost(report)
    wait_until("pc2 back after the cut", lambda: serving(lab))

    pc2 = containers_of("pc2")
    try:
        report = under_load(lab, lambda: [c.stop(timeout=5) for c in reversed(pc2)])
    finally:
        for container in pc2:
            container.start()
    assert_nothing_lost(report)
    wait_until("pc2 back after the stop", lambda: serving(lab))


def test_the_redis_primary_killed_under_load(lab: Lab) -> None:
    sentinel = lab.sentinel(lab.addresses["mainpc"])
    old = sentinel.sentinel_get_master_addr_by_name("agentlink")[0]
    machine = next(m for m, a in lab.addresses.items() if a == old)
    primary = docker.from_env().containers.get(f"agentlink-{machine}-redis")
    try:
        report = under_load(lab, primary.kill)
        new = sentinel.sentinel_get_master_addr_by_name("agentlink")[0]
    finally:
        primary.start()
    assert new != old  # the Sentinels elected the replica
    assert_nothing_lost(report)
    wait_until("the old primary back as a replica",
               lambda: lab.redis(old).info("replication")["role"] == "slave")
    wait_until("every instance serving", lambda: serving(lab))
