"""Resource samples and the ResourceManager agent, on real hosts and a real Redis."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import pytest

from agentlink.devtools.testing import AgentSpec, run_group
from agentlink.runtime import protocol
from agentlink.runtime.pool import get_pool
from agentlink.runtime.registry import RESOURCE_GROUPS, Registry
from agentlink.runtime.resources import cgroup_memory_limit

from .conftest import eventually

RESOURCES = "agentlink.runtime.reference.monitoring:ResourceManager"
ECHO = "tests.unit.agents:Echo"


@pytest.mark.parametrize("text,expected", [
    ("134217728\n", 134217728),  # v2 with a limit, or v1 with one
    ("max\n", None),  # v2 without a limit
    (str(1 << 62), None),  # v1 writes "no limit" as a huge number
])
def test_cgroup_memory_limit(tmp_path: Path, text: str, expected: int | None) -> None:
    limit_file = tmp_path / "memory.max"
    limit_file.write_text(text)
    assert cgroup_memory_limit((tmp_path / "absent", limit_file)) == expected


def test_no_cgroup_files_means_no_limit(tmp_path: Path) -> None:
    assert cgroup_memory_limit((tmp_path / "absent",)) is None


def report_when(endpoint: str, ready: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """ResourceManager's report, once it shows what `ready` waits for."""
    seen: list[dict[str, Any]] = []

    def asked() -> bool:
        frames = protocol.encode_request("ResourceManager", {})
        seen.append(protocol.decode_reply(get_pool().request(endpoint, frames, timeout=5.0)))
        return ready(seen[-1])

    eventually(asked, what="a full resource report")
    return seen[-1]


def test_resource_manager_sees_every_host_and_agent(redis_url: str) -> None:
    # limits no machine reaches, so that a busy test machine is not under pressure
    roomy = {"memory_limit_bytes": 1 << 60, "cpu_ratio_limit": 1.0}
    with run_group([AgentSpec("A", ECHO), AgentSpec("B", ECHO)], redis_url, group="workers"), \
            run_group([AgentSpec("ResourceManager", RESOURCES, options=roomy)], redis_url,
                      group="monitoring") as monitor:
        endpoint = f"tcp://127.0.0.1:{monitor.config.port}"
        report = report_when(endpoint, lambda r: len(r["hosts"]) == 2)
        assert set(report["hosts"]) == {"workers", "monitoring"}
        workers = report["hosts"]["workers"]
        assert sorted(workers["agents"]) == ["A", "B"] and workers["rss_bytes"] > 10e6
        assert report["agents"]["A"]["group"] == "workers"
        assert report["agents"]["A"]["shared_with"] == 1
        local = report["machines"]["local"]
        assert 0 < local["memory_used_bytes"] < local["memory_total_bytes"]
        assert 0 < local["disk_used_bytes"] < local["disk_total_bytes"]
        assert local["under_pressure"] is False

        url = f"http://127.0.0.1:{monitor.config.http_port}/metrics"
        metrics = urlopen(url, timeout=5).read().decode()
        assert 'agentlink_machine_memory_total_bytes{machine="local"}' in metrics
        assert 'agentlink_machine_under_pressure{machine="local"} 0.0' in metrics


def test_pressure_follows_the_configured_limits(redis_url: str) -> None:
    tiny = {"memory_limit_bytes": 1}  # any machine uses more than one byte
    with run_group([AgentSpec("ResourceManager", RESOURCES, options=tiny)], redis_url) as host:
        endpoint = f"tcp://127.0.0.1:{host.config.port}"
        report = report_when(endpoint, lambda r: bool(r["machines"]))
        assert report["machines"]["local"]["under_pressure"] is True


def test_resource_samples_are_read_without_walking_the_keyspace(registry: Registry) -> None:
    client = registry.client
    client.mset({f"agentlink:workflow:{n}": "{}" for n in range(2000)})  # unrelated keys
    registry.publish_resources("workers", {"group": "workers"})
    Registry(client, ttl=0.05).publish_resources("gone", {"group": "gone"})
    eventually(lambda: client.get("agentlink:resources:gone") is None, what="a sample expired")
    scans_before = client.info("commandstats").get("cmdstat_scan", {}).get("calls", 0)

    assert registry.resources() == [{"group": "workers"}]
    assert client.info("commandstats").get("cmdstat_scan", {}).get("calls", 0) == scans_before
    assert client.smembers(RESOURCE_GROUPS) == {b"workers"}  # the expired host is forgotten
