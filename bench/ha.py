"""High-availability benchmarks on the deployed lab, measured in one run on this machine.

1. Rolling upgrade under load: the whole system upgraded by playbooks/upgrade.yml to a next
   release (an image built on the running one, as tests/upgrade does) while the load
   generator sends 40 requests/s; requests failed (goal 0) and the upgrade's wall time.
2. A replica dies: the process of agent host pc2-core (SystemDigitalTwin-2 and
   MemoryOrchestratorService-2) is SIGKILLed, and Docker restarts it. A caller sends one
   request after another to both agents meanwhile. Time to fail over: the longest any
   request waited across the fault. Time to heal: from the kill to both instances serving.
3. The Redis primary dies: its container is SIGKILLed, and started again after the
   Sentinels elected a new primary. The caller writes state meanwhile. Time to fail over:
   the longest a write waited (Sentinel detection and election included). Time to heal:
   from the restart to the old primary replicating in sync.

Faults are repeated (--trials) and given as p50/p99 over the trials, beside the caller's
own median round trip with no fault.

Run: `make bench-ha` after `make deploy` (or `.venv/bin/python bench/ha.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import docker
import redis
import yaml

from agentlink.deploy.docker_backend import LABEL_GROUP, LABEL_MACHINE
from agentlink.devtools.load import (
    MEMORY,
    BackgroundLoad,
    LoadSpec,
    Slot,
    build_request,
    percentile,
)
from agentlink.runtime.client import FailoverClient, operator_registry
from agentlink.runtime.registry import SERVING, Registry
from agentlink.runtime.status import fetch_health
from agentlink.security import operator_redis_auth

ROOT = Path(__file__).resolve().parent.parent
NEXT_RELEASE = ROOT / "tests" / "upgrade" / "releases" / "v2"  # the running image + a label
VICTIM = "pc2-core"
VICTIM_INSTANCES = {"SystemDigitalTwin": "SystemDigitalTwin-2",
                    "MemoryOrchestratorService": "MemoryOrchestratorService-2"}
SENTINEL_PORT = 26379
RESTART_RESET_S = 11  # a container up this long is restarted again without delay


def lab_sentinels() -> list[str]:
    hosts = yaml.safe_load((ROOT / "inventory" / "lab" / "hosts.yml").read_text())
    machines = hosts["all"]["children"]["machines"]["children"]
    return [f"{vars_['agentlink_address']}:{SENTINEL_PORT}" for group in machines.values()
            for vars_ in group["hosts"].values()]


class Caller:
    """One request after another to `targets` (load generator kinds); every latency kept."""

    def __init__(self, client: FailoverClient, targets: tuple[str, ...]) -> None:
        self.client = client
        self.targets = targets
        self.calls: list[tuple[float, float, bool]] = []  # began, ended, succeeded
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            agent, payload, key = build_request(self.targets[n % len(self.targets)],
                                                Slot(n, "bench-ha", 20.0))
            began = time.monotonic()
            try:
                self.client.call(agent, payload, key=key, timeout=20.0)
                ok = True
            except Exception:  # a failure is a figure here, not a crash
                ok = False
            self.calls.append((began, time.monotonic(), ok))
            n += 1

    def longest_wait(self, since: float) -> float:
        """Seconds of the slowest request that was still open at `since` or began after."""
        return max(ended - began for began, ended, _ in self.calls if ended >= since)

    def answered_since(self, since: float) -> bool:
        return any(began >= since and ok for began, _, ok in self.calls)

    def failed(self, since: float) -> int:
        return sum(1 for _, ended, ok in self.calls if ended >= since and not ok)

    def median_ms(self) -> float:
        return statistics.median(ended - began for began, ended, _ in self.calls) * 1000

    @contextmanager
    def running(self) -> Iterator[Caller]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(30)


def until(check: Callable[[], bool], timeout: float = 120) -> float:
    began = time.monotonic()
    while not check():
        if time.monotonic() - began > timeout:
            raise SystemExit(f"bench/ha.py: gave up after {timeout:g}s waiting for the lab")
        time.sleep(0.02)
    return time.monotonic() - began


def victim_serving(registry: Registry) -> bool:
    """Both instances serving, as the host's new process says and the registry shows.

    The killed process's record outlives it by its TTL, so the registry alone would say
    healthy too early; a dead process does not answer /health."""
    try:
        records = {r.instance: r for agent in VICTIM_INSTANCES
                   for r in registry.records(agent)}
    except redis.RedisError:
        return False
    found = [records.get(instance) for instance in VICTIM_INSTANCES.values()]
    if not all(r and r.state in SERVING and not r.drained for r in found):
        return False
    health = fetch_health(found[0].http) if found[0] else None
    return health is not None and all(
        health["agents"].get(i, {}).get("state") in SERVING for i in VICTIM_INSTANCES.values())


def wait_quiet(caller: Caller, seconds: float = 2.0) -> None:
    """Let the caller run fault-free for a while, so trials do not overlap."""
    time.sleep(seconds)
    assert caller.calls, "the caller sent nothing"


def replica_trials(engine: docker.DockerClient, registry: Registry, caller: Caller,
                   trials: int) -> dict[str, list[float]]:
    figures: dict[str, list[float]] = {"failover_s": [], "heal_s": [], "failed": []}
    for _ in range(trials):
        # Docker doubles its restart delay for a container that ran less than 10 s.
        wait_quiet(caller, RESTART_RESET_S)
        pid = engine.containers.get(f"agentlink-{VICTIM}").attrs["State"]["Pid"]
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)  # a crash: Docker's restart policy brings it back
        until(lambda: victim_serving(registry))
        figures["heal_s"].append(time.monotonic() - killed)
        wait_quiet(caller)
        until(lambda k=killed: caller.answered_since(k))
        figures["failover_s"].append(caller.longest_wait(killed))
        figures["failed"].append(caller.failed(killed))
        print(f"  replica trial: failover {figures['failover_s'][-1]:.3f}s, "
              f"heal {figures['heal_s'][-1]:.2f}s", flush=True)
    return figures


def primary_of(sentinel: redis.Redis) -> str:
    return sentinel.sentinel_get_master_addr_by_name("agentlink")[0]


def in_sync(address: str) -> bool:
    try:
        info = redis.Redis(host=address, port=6379, socket_timeout=0.5,
                           **operator_redis_auth()).info("replication")
    except redis.RedisError:
        return False
    return info["role"] == "slave" and info.get("master_link_status") == "up"


def redis_trials(engine: docker.DockerClient, caller: Caller, sentinels: list[str],
                 trials: int) -> dict[str, list[float]]:
    host, port = sentinels[0].rsplit(":", 1)
    sentinel = redis.Redis(host=host, port=int(port), decode_responses=True,
                           **operator_redis_auth(sentinel=True))
    figures: dict[str, list[float]] = {"failover_s": [], "heal_s": [], "failed": []}
    machine_of = {c.attrs["NetworkSettings"]["Networks"]["agentlink-lan"]["IPAddress"]:
                  c.labels[LABEL_MACHINE] for c in engine.containers.list()
                  if "agentlink-lan" in c.attrs["NetworkSettings"]["Networks"]}
    for _ in range(trials):
        wait_quiet(caller)
        old = primary_of(sentinel)
        container = engine.containers.get(f"agentlink-{machine_of[old]}-redis")
        killed = time.monotonic()
        container.kill()
        until(lambda o=old: primary_of(sentinel) != o)
        wait_quiet(caller)
        until(lambda k=killed: caller.answered_since(k))
        figures["failover_s"].append(caller.longest_wait(killed))
        figures["failed"].append(caller.failed(killed))
        container.start()
        restarted = time.monotonic()
        until(lambda o=old: in_sync(o))
        figures["heal_s"].append(time.monotonic() - restarted)
        print(f"  Redis trial: failover {figures['failover_s'][-1]:.3f}s, "
              f"heal {figures['heal_s'][-1]:.2f}s", flush=True)
    return figures


def next_release(engine: docker.DockerClient, tag: str) -> None:
    for container in engine.containers.list(filters={"label": LABEL_GROUP}):
        machine = container.labels[LABEL_MACHINE]
        engine.images.build(path=str(NEXT_RELEASE), tag=f"agentlink/{machine}:{tag}", rm=True,
                            buildargs={"FROM_IMAGE": container.attrs["Config"]["Image"]})


def upgrade_under_load(engine: docker.DockerClient, client: FailoverClient) -> dict[str, Any]:
    tag = f"bench-{int(time.time())}"
    next_release(engine, tag)
    spec = LoadSpec(rate=40, duration=1800, workers=64, timeout=20.0,
                    targets=("coordinator", "twin", "memory"))
    loader = BackgroundLoad(client, spec).start()
    time.sleep(3)
    began = time.monotonic()
    run = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"),
                          "playbooks/upgrade.yml", "-i", "inventory/lab",
                          "-e", f"upgrade_image_tag={tag}"], cwd=ROOT, capture_output=True,
                         text=True, check=False)
    seconds = time.monotonic() - began
    report = loader.stop()
    if run.returncode != 0:
        raise SystemExit(f"bench/ha.py: the upgrade failed:\n{run.stdout[-3000:]}")
    if report is None:
        raise SystemExit("bench/ha.py: the load generator did not finish")
    latency = report.latency()
    return {"hosts": run.stdout.count(" now runs "), "seconds": round(seconds, 1),
            "sent": report.sent, "failed": report.failed, "unsent": report.unsent,
            "lost": len(report.lost), "p99_ms": latency["p99"], "max_ms": latency["max"]}


def spread(samples: list[float]) -> dict[str, float]:
    return {"p50": round(percentile(samples, 50) or 0, 3),
            "p99": round(percentile(samples, 99) or 0, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8, help="replica deaths (default 8)")
    parser.add_argument("--redis-trials", type=int, default=4,
                        help="Redis primary deaths (default 4)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    engine = docker.from_env()
    sentinels = lab_sentinels()
    registry = operator_registry({"sentinels": sentinels, "service": "agentlink"})
    client = FailoverClient(registry, stateful={MEMORY})

    print("rolling upgrade of every agent host under 40 requests/s ...", flush=True)
    upgrade = upgrade_under_load(engine, client)
    print(f"  {upgrade['hosts']} hosts in {upgrade['seconds']}s; {upgrade['sent']} requests, "
          f"{upgrade['failed']} failed, {upgrade['unsent']} unsent, {upgrade['lost']} "
          f"acknowledged writes lost; p99 {upgrade['p99_ms']} ms, max {upgrade['max_ms']} ms")

    with Caller(client, ("twin", "memory")).running() as caller:
        print(f"replica deaths ({args.trials}, {VICTIM} SIGKILLed) ...", flush=True)
        replica = replica_trials(engine, registry, caller, args.trials)
        baseline_ms = caller.median_ms()
    with Caller(client, ("memory",)).running() as caller:
        print(f"Redis primary deaths ({args.redis_trials}) ...", flush=True)
        primary = redis_trials(engine, caller, sentinels, args.redis_trials)

    figures = {
        "upgrade": upgrade,
        "caller_median_ms": round(baseline_ms, 2),
        "replica_death": {"failover_s": spread(replica["failover_s"]),
                          "heal_s": spread(replica["heal_s"]),
                          "failed": int(sum(replica["failed"])), "trials": args.trials},
        "redis_primary_death": {"failover_s": spread(primary["failover_s"]),
                                "heal_s": spread(primary["heal_s"]),
                                "failed": int(sum(primary["failed"])),
                                "trials": args.redis_trials},
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
