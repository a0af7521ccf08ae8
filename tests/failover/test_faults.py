"""Faults under load on the deployed system (the lab, or the dual harness's hosts): a replica
killed, pc2 cut off and then stopped, the Redis primary killed (also right after the
Sentinels stalled), the primary's machine cut off with clients on both sides, a host
frozen, slow links. In each the system keeps answering every request for which a live
replica exists, loses no acknowledged write, shows what is degraded, and heals."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest
import redis
from docker.models.containers import Container

from agentlink.devtools.load import MEMORY, LoadReport, LoadSpec, run_load
from agentlink.runtime.client import FailoverClient

from .conftest import Deployment

ROOT_TOPOLOGY = "topology/agents.yml"
# Replicated agents only: each has a replica on mainpc, which no fault here takes away.
TARGETS = ("coordinator", "twin", "memory")


def under_load(deployed: Deployment, fault: Callable[[], object], duration: float = 20.0
               ) -> LoadReport:
    """Run the load; inject the fault once it is flowing; the report after read-back."""
    client = FailoverClient(deployed.registry(), stateful={MEMORY})
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
    assert report.failed == 0, (summary["failures"], summary["failure_examples"],
                                summary["failed_at"])
    assert report.unsent == 0
    assert report.lost == [], f"acknowledged writes lost: {report.lost[:5]}"
    assert report.verified == len(report.acknowledged) > 0


def serving(deployed: Deployment) -> bool:
    """`agentlink status` through the Sentinels: every instance registered and serving."""
    args = [arg for s in deployed.sentinels for arg in ("--sentinel", s)]
    result = subprocess.run([sys.executable, "-m", "agentlink", "status", "--file",
                             ROOT_TOPOLOGY, *args], capture_output=True, text=True,
                            check=False, timeout=60)
    return result.returncode == 0


def wait_until(what: str, check: Callable[[], bool], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout:g}s"
        time.sleep(1)


def replicated(deployed: Deployment) -> bool:
    """The primary the Sentinels name has its replica connected and in sync."""
    try:
        primary = deployed.sentinel(deployed.addresses["mainpc"]).sentinel_get_master_addr_by_name(
            "agentlink")[0]
        info = deployed.redis(primary).info("replication")
    except (redis.RedisError, TypeError):
        return False
    return info["role"] == "master" and info["connected_slaves"] == len(deployed.addresses) - 1 \
        and all(info[f"slave{n}"]["state"] == "online" for n in range(info["connected_slaves"]))


@pytest.fixture(autouse=True)
def healthy_before(deployed: Deployment) -> None:
    """Each fault starts from a healed system: one fault at a time, not a double fault."""
    wait_until("every instance serving before the fault", lambda: serving(deployed))
    wait_until("Redis replicated before the fault", lambda: replicated(deployed))


def test_a_replica_killed_under_load(deployed: Deployment) -> None:
    host = deployed.container("agentlink-pc2-core")  # SDT-2 and MOS-2
    try:
        report = under_load(deployed, host.kill)
        assert not serving(deployed)  # status shows the killed replicas
    finally:
        host.start()
    assert_nothing_lost(report)
    wait_until("pc2-core healthy again", lambda: serving(deployed))


def test_pc2_cut_off_then_stopped_under_load(deployed: Deployment) -> None:
    try:
        report = under_load(deployed, lambda: deployed.cut("pc2"))
        assert not serving(deployed)
    finally:
        deployed.heal("pc2")
    assert_nothing_lost(report)
    wait_until("pc2 back after the cut", lambda: serving(deployed))

    stopped: list[Container] = []
    try:
        report = under_load(deployed, lambda: stopped.extend(deployed.stop("pc2")))
    finally:
        deployed.start(stopped)
    assert_nothing_lost(report)
    wait_until("pc2 back after the stop", lambda: serving(deployed))


def kill_the_redis_primary_under_load(deployed: Deployment,
                                      before: Callable[[], object] = lambda: None) -> None:
    """Kill the primary Redis under load (after `before`): the Sentinels elect the replica,
    no request fails, no acknowledged write is lost, and the old primary rejoins as a
    replica."""
    machine = primary_machine(deployed)
    old = deployed.addresses[machine]
    primary = deployed.container(f"agentlink-{machine}-redis")

    def fault() -> None:
        before()
        primary.kill()

    try:
        report = under_load(deployed, fault)
        elected = primary_machine(deployed)
    finally:
        primary.start()
    assert elected != machine  # the Sentinels elected the replica
    assert_nothing_lost(report)
    wait_until("the old primary back as a replica",
               lambda: deployed.redis(old).info("replication")["role"] == "slave")
    wait_until("every instance serving", lambda: serving(deployed))


def test_the_redis_primary_killed_under_load(deployed: Deployment) -> None:
    kill_the_redis_primary_under_load(deployed)


def test_the_redis_primary_killed_after_a_stall(deployed: Deployment) -> None:
    """Every Sentinel stalled 3 s (a machine that stopped scheduling: a VM's steal time, a
    swap storm), then the primary killed. A Sentinel that finds its timer late distrusts
    what it measured (TILT) and starts no failover for the tilt period: Redis's 30 s
    outlasted every request's deadline, and by then the replica had been cut off from its
    primary for longer than Sentinel allows a replica it promotes, so none was promoted."""
    sentinels = [deployed.container(f"agentlink-{m}-sentinel") for m in deployed.machines]

    def stall() -> None:
        for sentinel in sentinels:
            sentinel.pause()
        try:
            time.sleep(3)
        finally:
            for sentinel in sentinels:
                sentinel.unpause()

    kill_the_redis_primary_under_load(deployed, before=stall)


def primary_machine(deployed: Deployment) -> str:
    """The machine whose Redis the Sentinels name primary now."""
    address = deployed.sentinel(deployed.addresses["mainpc"]).sentinel_get_master_addr_by_name(
        "agentlink")[0]
    return next(m for m, a in deployed.addresses.items() if a == address)


def agentlink_load(deployed: Deployment, prefix: list[str], duration: float,
                   env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """`agentlink load` as a process, at the rate and patience of `under_load`, its JSON
    report on stdout; `prefix` runs it elsewhere (inside a machine's network)."""
    sentinels = [arg for s in deployed.sentinels for arg in ("--sentinel", s)]
    command = [*prefix, sys.executable, "-m", "agentlink", "load",
               *sentinels, "--rate", "40", "--duration", str(duration), "--timeout", "20",
               "--workers", "64", "--json", *(arg for t in TARGETS for arg in ("--target", t))]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=env)


def load_from(deployed: Deployment, machine: str, duration: float) -> subprocess.Popen[str]:
    """`agentlink load` from inside the machine's network, as a client on that machine."""
    return agentlink_load(deployed, deployed.inside(machine), duration)


def test_the_primary_s_machine_cut_off_with_clients_on_both_sides(deployed: Deployment
                                                                  ) -> None:
    """The issue's partition: the Redis primary's machine off the LAN for 22 s, a load on
    each side. The majority side (the controller, the other machine, the witness) fails
    nothing: the Sentinels elect the other Redis and every agent has a replica there. The
    cut-off side reaches its own replicas: all it may fail are state writes, which a primary
    without a Sentinel majority refuses, and no acknowledged write is lost on either side."""
    machine = primary_machine(deployed)
    inside = load_from(deployed, machine, duration=40)

    def partition() -> None:
        deployed.cut(machine)
        try:
            time.sleep(22)
        finally:
            deployed.heal(machine)

    try:
        outside = under_load(deployed, partition, duration=40)
        stdout, _ = inside.communicate(timeout=120)
    finally:
        inside.kill()
    assert_nothing_lost(outside)
    cut_off = json.loads(stdout)
    refused = {why: n for why, n in cut_off["failures"].items() if why.startswith(MEMORY)}
    assert cut_off["failures"] == refused, (cut_off["failures"], cut_off["failure_examples"])
    assert cut_off["lost"] == 0 and cut_off["unsent"] == 0
    assert cut_off["succeeded"] > cut_off["sent"] / 2  # its coordinator and twin calls
    wait_until("the old primary back as a replica", lambda: replicated(deployed))
    wait_until("every instance serving", lambda: serving(deployed))


def test_a_host_frozen_for_10s_under_load(deployed: Deployment) -> None:
    """`docker pause`: the process holds its connections and answers nothing, as a stuck
    interpreter would; its replicas elsewhere take its requests."""
    host = deployed.container("agentlink-pc2-core")  # SDT-2, MOS-2, RC-2

    def freeze() -> None:
        host.pause()
        try:
            time.sleep(10)
        finally:
            host.unpause()

    report = under_load(deployed, freeze)
    assert_nothing_lost(report)
    wait_until("pc2-core serving again", lambda: serving(deployed))


def test_slow_links_under_load(deployed: Deployment) -> None:
    """50 ms delay and 5% loss on everything every machine sends onto the LAN."""
    machines = list(deployed.machines)
    try:
        report = under_load(deployed, lambda: [deployed.slow(m) for m in machines])
    finally:
        for machine in machines:
            deployed.fast(machine)
    assert_nothing_lost(report)
