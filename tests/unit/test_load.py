"""The load generator: pacing, the mix of targets, percentiles, and on real hosts a steady
run, a replica stopped under load and no instance at all (`agentlink load` exits 1)."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from agentlink.cli import main
from agentlink.devtools.load import (
    BackgroundLoad,
    LoadReport,
    LoadSpec,
    parse_target,
    percentile,
    run_load,
)
from agentlink.devtools.testing import AgentSpec, run_group
from agentlink.runtime.client import FailoverClient
from agentlink.runtime.registry import Registry, redis_client

CORE = "agentlink.runtime.reference.core"
STATEFUL = ["MemoryOrchestratorService"]


def twin(index: int) -> AgentSpec:
    return AgentSpec("SystemDigitalTwin", f"{CORE}:SystemDigitalTwin", index=index)


def memory(index: int) -> AgentSpec:
    return AgentSpec("MemoryOrchestratorService", f"{CORE}:MemoryOrchestratorService",
                     index=index)


def client_for(redis_url: str) -> FailoverClient:
    return FailoverClient(Registry(redis_client({"url": redis_url})), stateful=set(STATEFUL))


class FakeMemory:
    """A caller with no network: times observes, stores puts, except that it drops the put of
    request `drop` and garbles that of request `garble` (acknowledged all the same)."""

    def __init__(self, drop: int = -1, garble: int = -1) -> None:
        self.drop, self.garble = drop, garble
        self.stored: dict[str, Any] = {}
        self.sent_at: dict[int, float] = {}

    def call(self, agent: str, payload: Any, key: str | None = None,
             timeout: float | None = None) -> Any:
        if agent == "SystemDigitalTwin":
            self.sent_at[payload["value"]] = time.monotonic()
            return {"observed": payload["source"]}
        n = int(payload["key"].rsplit("-", 1)[1])
        if payload["op"] == "put" and n != self.drop:
            self.stored[payload["key"]] = "garbled" if n == self.garble else payload["value"]
        return {"value": self.stored.get(payload["key"])}


# -- no network ----------------------------------------------------------------------------

def test_percentiles_by_nearest_rank() -> None:
    samples = [float(n) for n in range(100, 0, -1)]  # unordered on purpose
    assert [percentile(samples, p) for p in (50, 90, 99, 100)] == [50.0, 90.0, 99.0, 100.0]
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    report = LoadReport(latencies_ms=[4.0, 1.0, 3.0, 2.0])
    assert report.latency() == {"p50": 2.0, "p90": 4.0, "p99": 4.0, "max": 4.0}
    assert LoadReport().latency() == {"p50": None, "p90": None, "p99": None, "max": None}


def test_targets_are_weighted_kinds_and_unknown_ones_are_named() -> None:
    assert parse_target("memory=3") == ("memory", 3)
    assert parse_target("agent:Echo") == ("agent:Echo", 1)
    spec = LoadSpec(targets=("twin", "memory=2"))
    assert spec.plan == ["twin", "memory", "memory"]
    with pytest.raises(ValueError, match="unknown load target 'nope'"):
        LoadSpec(targets=("nope",))
    with pytest.raises(ValueError, match="whole number"):
        LoadSpec(targets=("twin=0",))
    with pytest.raises(ValueError, match="rate"):
        LoadSpec(rate=0)


def test_requests_wait_for_their_slot_and_the_mix_follows_the_weights() -> None:
    caller = FakeMemory()
    before = time.monotonic()
    report = run_load(caller, LoadSpec(rate=100, duration=0.5, targets=("twin", "memory")))
    # Request n is never sent before its slot: paced, not as fast as possible.
    assert all(at >= before + n / 100 for n, at in caller.sent_at.items())
    assert len(caller.sent_at) == len(report.acknowledged) == 25
    assert report.sent == report.succeeded == report.scheduled == 50
    assert report.ok


def test_a_stopped_run_ends_early_owing_nothing() -> None:
    caller = FakeMemory()
    stop = threading.Event()

    def stop_after_ten(report: LoadReport) -> None:
        if report.sent >= 10:
            stop.set()

    report = run_load(caller, LoadSpec(rate=20, duration=600, targets=("twin",)),
                      progress=stop_after_ten, stop=stop)
    assert 10 <= report.sent < 12000
    assert report.scheduled == report.sent == report.succeeded and report.unsent == 0
    assert report.ok


def test_a_background_load_runs_until_stopped() -> None:
    caller = FakeMemory()
    with BackgroundLoad(caller, LoadSpec(rate=50, duration=600, targets=("twin",))) as load:
        time.sleep(0.3)
        report = load.stop()
    assert report is not None and 5 <= report.sent < 1000  # not the 30000 of the whole run
    assert report.scheduled == report.sent == report.succeeded and report.unsent == 0


def test_an_acknowledged_write_missing_or_different_is_lost() -> None:
    report = run_load(FakeMemory(drop=3, garble=5),
                      LoadSpec(rate=100, duration=0.1, targets=("memory",)))
    assert report.failed == 0 and len(report.acknowledged) == 10 and report.verified == 8
    assert sorted(report.lost_why.values()) == ["different: 'garbled'", "missing"]
    assert not report.ok  # what makes `agentlink load` exit 1


# -- real hosts ----------------------------------------------------------------------------

def test_a_steady_run_succeeds_and_every_acknowledged_write_reads_back(redis_url: str) -> None:
    coordinator = AgentSpec("RequestCoordinator", f"{CORE}:RequestCoordinator")
    with run_group([coordinator, twin(1), memory(1)], redis_url, group="one",
                   stateful=STATEFUL), \
            run_group([twin(2), memory(2)], redis_url, group="two", stateful=STATEFUL):
        spec = LoadSpec(rate=80, duration=1.5, targets=("coordinator", "twin", "memory=2"))
        report = run_load(client_for(redis_url), spec)
    assert report.failed == 0, report.summary()
    # The schedule is a count, so "close to rate * duration" is exact when nothing stalls.
    assert report.sent == report.succeeded == 120
    assert report.verified == len(report.acknowledged) == 60 and report.lost == []
    assert report.summary()["latency_ms"]["p99"] is not None


class Watching(FailoverClient):
    """Sets `served` once the replica to be stopped has answered a few requests."""

    def __init__(self, redis_url: str, instance: str) -> None:
        super().__init__(Registry(redis_client({"url": redis_url})), stateful=set(STATEFUL))
        self.instance, self.answers = instance, 0
        self.served = threading.Event()

    def call(self, agent: str, payload: Any, key: str | None = None,
             timeout: float | None = None) -> Any:
        reply = super().call(agent, payload, key=key, timeout=timeout)
        if isinstance(reply, dict) and reply.get("by") == self.instance:
            self.answers += 1
            if self.answers >= 10:
                self.served.set()
        return reply


def test_a_replica_stopped_mid_run_fails_no_request_and_loses_no_write(
        redis_url: str) -> None:
    with run_group([twin(1), memory(1)], redis_url, group="stays", stateful=STATEFUL), \
            run_group([twin(2), memory(2)], redis_url, group="goes",
                      stateful=STATEFUL) as goes:
        client = Watching(redis_url, "SystemDigitalTwin-2")
        stopper = threading.Thread(target=lambda: client.served.wait(10) and goes.stop())
        stopper.start()
        report = run_load(client, LoadSpec(rate=60, duration=2.0, targets=("twin", "memory")))
        stopper.join()
    assert goes.stopping.is_set()  # the replica really went away during the run
    assert report.failed == 0 and report.sent == 120, report.summary()
    assert report.verified == len(report.acknowledged) == 60 and report.lost == []


def test_no_instance_fails_every_request_with_its_reason_and_exits_1(
        redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["load", "--redis-url", redis_url, "--home", str(tmp_path), "--rate", "20",
              "--duration", "0.5", "--timeout", "0.2", "--workers", "10"]
    assert main([*common, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert (report["sent"], report["succeeded"], report["failed"]) == (10, 0, 10)
    assert report["failures"] == {"RequestCoordinator: NoInstance": 4,
                                  "SystemDigitalTwin: NoInstance": 3,
                                  "MemoryOrchestratorService: NoInstance": 3}
    assert report["latency_ms"]["p50"] is None and report["acknowledged"] == 0
    assert len(report["failed_at"]) == 10
    assert all(re.fullmatch(r"\d\d:\d\d:\d\d\.\d after 0\.\ds", at) for at in report["failed_at"])

    assert main([*common, "--target", "agent:Nobody"]) == 1
    out = capsys.readouterr().out
    assert "0 succeeded, 10 failed" in out
    assert "failed 10x: Nobody: NoInstance" in out


def test_a_bad_target_is_refused_before_any_request(
        redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["load", "--redis-url", redis_url, "--home", str(tmp_path),
                 "--target", "twin=many"]) == 2
    assert "weight of load target 'twin'" in capsys.readouterr().err
