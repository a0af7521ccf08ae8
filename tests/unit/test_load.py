"""The load generator on real hosts: paced requests, failover under load, lost-state check."""

from __future__ import annotations

import threading

import pytest

from agentlink.cli import main
from agentlink.client import FailoverClient
from agentlink.load import LoadSpec, build_request, percentile, run_load
from agentlink.registry import Registry, redis_client
from agentlink.testing import AgentSpec, run_group

TWIN = "agentlink.reference.core:SystemDigitalTwin"
MEMORY = "agentlink.reference.core:MemoryOrchestratorService"
STATEFUL = ["MemoryOrchestratorService"]


def client_for(redis_url: str) -> FailoverClient:
    return FailoverClient(Registry(redis_client({"url": redis_url})), stateful=set(STATEFUL))


def test_percentiles_by_nearest_rank() -> None:
    samples = [float(n) for n in range(1, 101)]
    assert [percentile(samples, p) for p in (50, 90, 99, 100)] == [50.0, 90.0, 99.0, 100.0]
    assert percentile([7.0], 99) == 7.0


def test_unknown_target_is_named() -> None:
    with pytest.raises(ValueError, match="unknown load target 'nope'"):
        build_request("nope", 0, "run")
    assert build_request("agent:Echo", 3, "run") == ("Echo", {}, None)


def test_a_steady_run_succeeds_and_every_acknowledged_write_reads_back(redis_url: str) -> None:
    with run_group([AgentSpec("SystemDigitalTwin", TWIN, index=1),
                    AgentSpec("MemoryOrchestratorService", MEMORY, index=1)], redis_url,
                   group="one", stateful=STATEFUL), \
            run_group([AgentSpec("SystemDigitalTwin", TWIN, index=2),
                       AgentSpec("MemoryOrchestratorService", MEMORY, index=2)], redis_url,
                      group="two", stateful=STATEFUL):
        spec = LoadSpec(rate=80, duration=1.5, targets=("twin", "memory"))
        report = run_load(client_for(redis_url), spec)
    assert report.failed == 0
    assert report.sent == 120  # every scheduled request was sent
    assert report.verified == len(report.acknowledged) == 60
    assert report.lost == []


def test_a_replica_stopped_mid_run_fails_no_request(redis_url: str) -> None:
    with run_group([AgentSpec("SystemDigitalTwin", TWIN, index=1)], redis_url, group="stays"), \
            run_group([AgentSpec("SystemDigitalTwin", TWIN, index=2)], redis_url,
                      group="goes") as goes:
        spec = LoadSpec(rate=60, duration=2.0, targets=("twin",))
        progressed = threading.Event()
        stopper = threading.Thread(target=lambda: progressed.wait(5) and goes.stop())
        stopper.start()
        report = run_load(client_for(redis_url), spec,
                          progress=lambda r: r.sent > 20 and progressed.set())
        stopper.join()
    assert goes.stopping.is_set()
    assert report.failed == 0 and report.sent == 120


def test_no_instance_fails_every_request_and_exits_1(redis_url: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["load", "--redis-url", redis_url, "--rate", "20", "--duration", "0.5",
                 "--timeout", "0.3", "--target", "agent:Nobody"])
    out = capsys.readouterr().out
    assert code == 1
    assert "0 succeeded, 10 failed" in out
    assert "failed 10x: Nobody: NoInstance" in out
