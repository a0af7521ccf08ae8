"""The workflow engine in RequestCoordinator, on real agent hosts and a real Redis: parallel
and sequential steps, retries, a step that always fails, idempotent steps, and a coordinator
replica killed mid-workflow."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from agentlink.devtools.testing import AgentSpec, free_ports, run_group
from agentlink.runtime import protocol
from agentlink.runtime.client import FailoverClient
from agentlink.runtime.host import AgentHost
from agentlink.runtime.pool import get_pool
from agentlink.runtime.registry import Registry, redis_client
from agentlink.runtime.workflow.engine import OWNERS, ended_key, record_key, wait_ended
from tests.unit.agents import Flaky, Slow
from tests.unit.conftest import ROOT, eventually

CORE = "agentlink.runtime.reference.core"
TEST = "tests.unit.agents"
WORKERS = [AgentSpec("Rendezvous", f"{TEST}:Rendezvous"), AgentSpec("Flaky", f"{TEST}:Flaky"),
           AgentSpec("Failing", f"{TEST}:Failing"), AgentSpec("Slow", f"{TEST}:Slow"),
           AgentSpec("Echo", f"{TEST}:Echo"), AgentSpec("StoredSteps", f"{TEST}:StoredSteps"),
           AgentSpec("MemoryOrchestratorService", f"{CORE}:MemoryOrchestratorService")]


@pytest.fixture
def system(redis_url: str) -> Iterator[FailoverClient]:
    """Test agents and one coordinator replica, each group a host in this process."""
    Flaky.calls.clear()
    Slow.finished.clear()
    with run_group(WORKERS, redis_url, group="workers"), \
            run_group([AgentSpec("RequestCoordinator", f"{CORE}:RequestCoordinator")],
                      redis_url, group="coordinator-1"):
        yield FailoverClient(Registry(redis_client({"url": redis_url})))


def run(client: FailoverClient, steps: list[dict[str, Any]], **inputs: Any) -> dict[str, Any]:
    """Start a workflow through the coordinator and wait for its end."""
    started = client.call("RequestCoordinator", {
        "op": "workflow.run", "workflow": {"name": "test", "steps": steps}, "input": inputs})
    return wait_end(client, started["id"])


def wait_end(client: FailoverClient, workflow_id: str, timeout: float = 20) -> dict[str, Any]:
    def status() -> dict[str, Any]:
        return client.call("RequestCoordinator", {"op": "workflow.status", "id": workflow_id})

    eventually(lambda: status()["state"] != "running", timeout, f"end of {workflow_id}")
    return status()


def test_independent_steps_run_in_parallel_and_a_join_gets_their_results(
        system: FailoverClient) -> None:
    meet = {"agent": "Rendezvous", "payload": {"barrier": "{{ workflow.id }}", "parties": 2}}
    record = run(system, [
        {"id": "left", **meet}, {"id": "right", **meet},
        {"id": "join", "agent": "Echo", "depends_on": ["left", "right"],
         "payload": {"both": ["{{ steps.left.result.met }}", "{{ steps.right.result.met }}"]}},
    ])
    assert record["state"] == "succeeded", record
    # Each Rendezvous call waits for the other: neither could end unless both ran at once.
    joined = record["steps"]["join"]["result"]["echo"]["both"]
    assert joined == [record["id"], record["id"]]


def test_sequential_steps_run_in_order_with_earlier_results(system: FailoverClient) -> None:
    append = {"agent": "MemoryOrchestratorService",
              "payload": {"op": "append", "key": "{{ workflow.id }}"}}
    record = run(system, [
        {"id": "first", **append} | {"payload": {**append["payload"], "value": "first"}},
        {"id": "second", "depends_on": ["first"], **append}
        | {"payload": {**append["payload"], "value": "after {{ steps.first.result.length }}"}},
        {"id": "third", "depends_on": ["second"], **append}
        | {"payload": {**append["payload"], "value": "after {{ steps.second.result.length }}"}},
        {"id": "read", "depends_on": ["third"], "agent": "MemoryOrchestratorService",
         "payload": {"op": "get", "key": "{{ workflow.id }}"}},
    ])
    assert record["state"] == "succeeded", record
    assert record["steps"]["read"]["result"]["value"] == ["first", "after 1", "after 2"]


def test_a_step_starts_on_stored_results_and_a_result_nothing_waits_on_rides_along(
        redis_url: str) -> None:
    Slow.finished.clear()
    steps = [{"id": "fast", "agent": "Echo", "payload": {}},
             {"id": "slow", "agent": "Slow", "payload": {"sleep": 2}},
             {"id": "check", "agent": "StoredSteps", "depends_on": ["fast", "slow"],
              "payload": {"workflow": "{{ workflow.id }}"}}]
    stored = redis.Redis.from_url(redis_url)
    with run_group(WORKERS, redis_url, group="workers"), \
            run_group([AgentSpec("RequestCoordinator", f"{CORE}:RequestCoordinator")],
                      redis_url, group="coordinator-1") as coordinator:
        client = FailoverClient(Registry(redis_client({"url": redis_url})))
        workflow_id = client.call("RequestCoordinator", {"op": "workflow.run",
                                                         "workflow": {"steps": steps}})["id"]
        running = engine_of(coordinator)._runs[workflow_id].record["steps"]
        eventually(lambda: running["fast"]["state"] == "succeeded", what="the fast step's end")
        record = json.loads(stored.get(record_key(workflow_id)) or "{}")
        assert not Slow.finished
        # Nothing waits on the fast step's result while the slow one runs: not written yet.
        assert record["steps"]["fast"]["state"] != "succeeded"
        final = wait_end(client, workflow_id)
        kept = json.loads(stored.get(record_key(workflow_id)) or "{}")
    assert kept["state"] == "succeeded" and "document" not in kept  # only a resume needs it
    # The step that depends on both ran only once both results were stored.
    seen = final["steps"]["check"]["result"]
    assert (seen["fast"], seen["slow"]) == ("succeeded", "succeeded")


def test_a_failing_step_is_retried_until_it_succeeds(system: FailoverClient) -> None:
    record = run(system, [{"id": "shaky", "agent": "Flaky", "retries": 3,
                           "payload": {"key": "{{ workflow.id }}", "fail": 2}}])
    assert record["state"] == "succeeded", record
    assert record["steps"]["shaky"]["attempts"] == 3
    assert record["steps"]["shaky"]["result"]["calls"] == 3


def test_a_step_that_always_fails_fails_the_workflow_naming_it(system: FailoverClient) -> None:
    record = run(system, [
        {"id": "fine", "agent": "Echo", "payload": {}},
        {"id": "doomed", "agent": "Failing", "depends_on": ["fine"], "retries": 2},
        {"id": "never", "agent": "Echo", "depends_on": ["doomed"]},
    ])
    assert record["state"] == "failed"
    assert record["failed_step"] == "doomed"
    assert record["error"].startswith("step 'doomed' failed after 3 attempt(s)")
    assert "boom" in record["error"]
    assert record["steps"]["fine"]["state"] == "succeeded"
    assert record["steps"]["never"]["state"] == "pending"


def test_callers_waiting_in_redis_each_hear_how_a_workflow_ended(
        system: FailoverClient, redis_url: str) -> None:
    started = system.call("RequestCoordinator", {"op": "workflow.run", "workflow": {
        "name": "test", "steps": [{"id": "nap", "agent": "Slow", "payload": {"sleep": 1.0}},
                                  {"id": "doomed", "agent": "Failing", "depends_on": ["nap"]}]}})
    store = redis.Redis.from_url(redis_url)
    assert wait_ended(store, started["id"], 0.1) is None  # still napping
    eventually(lambda: wait_ended(store, started["id"], 0.4) is not None, 10, "its end")
    # The state stays for every later caller, as long as the record.
    assert [wait_ended(store, started["id"], 0.1) for _ in range(3)] == ["failed"] * 3
    assert store.pttl(ended_key(started["id"])) > 0


def test_a_bad_definition_is_refused_with_every_problem(system: FailoverClient) -> None:
    with pytest.raises(protocol.RemoteError) as refused:
        system.call("RequestCoordinator", {"op": "workflow.run", "workflow": {"steps": [
            {"id": "a", "agent": "Echo", "depends_on": ["b"]},
            {"id": "b", "agent": "Echo", "depends_on": ["a"]},
            {"id": "c", "agent": "Echo", "depends_on": ["nope"]}]}})
    assert refused.value.code == protocol.BAD_REQUEST
    assert "dependency cycle: a -> b -> a" in refused.value.message
    assert "step 'c' depends on unknown step 'nope'" in refused.value.message


def test_status_of_an_unknown_workflow_is_a_bad_request(system: FailoverClient) -> None:
    with pytest.raises(protocol.RemoteError, match="no workflow 'nope'"):
        system.call("RequestCoordinator", {"op": "workflow.status", "id": "nope"})


def test_a_request_with_an_idempotency_key_runs_once(system: FailoverClient) -> None:
    first = system.call("Slow", {"sleep": 0}, idempotency_key="k1")
    again = system.call("Slow", {"sleep": 0}, idempotency_key="k1")
    assert again == first
    assert len(Slow.finished) == 1
    system.call("Slow", {"sleep": 0}, idempotency_key="k2")
    assert len(Slow.finished) == 2


def test_a_failed_run_releases_its_idempotency_key(system: FailoverClient) -> None:
    with pytest.raises(protocol.RemoteError):
        system.call("Flaky", {"key": "x", "fail": 1}, idempotency_key="once")
    assert system.call("Flaky", {"key": "x", "fail": 1}, idempotency_key="once")["calls"] == 2


# --- a coordinator replica killed mid-workflow ---------------------------------------------

REPLICA = """
import sys, time
from agentlink.runtime.host import AgentHost
from agentlink.devtools.testing import AgentSpec, host_config
config = host_config("coordinator-1", [AgentSpec("RequestCoordinator",
                     "agentlink.runtime.reference.core:RequestCoordinator")], sys.argv[1],
                     ports=(int(sys.argv[2]), int(sys.argv[3])))
AgentHost(config).start()
print("serving", flush=True)
time.sleep(3600)
"""


@pytest.fixture
def doomed_replica(redis_url: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Coordinator replica 1 in a process of its own, to be killed; replica 2 is ours."""
    port, http_port = free_ports(2)
    proc = subprocess.Popen([sys.executable, "-c", REPLICA, redis_url, str(port),
                             str(http_port)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "serving"
        yield proc, f"tcp://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()


def test_a_workflow_survives_its_coordinator_killed_with_no_step_run_twice(
        redis_url: str, doomed_replica: tuple[subprocess.Popen[str], str]) -> None:
    proc, endpoint = doomed_replica
    Slow.finished.clear()

    def append(step: str) -> dict[str, Any]:
        return {"agent": "MemoryOrchestratorService",
                "idempotency_key": "{{ workflow.id }}-" + step,
                "payload": {"op": "append", "key": "{{ workflow.id }}", "value": step}}

    steps = [
        {"id": "before", **append("before")},
        {"id": "slow", "agent": "Slow", "depends_on": ["before"], "payload": {"sleep": 1.5},
         "idempotency_key": "{{ workflow.id }}-slow", "timeout": 10},
        {"id": "after", "depends_on": ["slow"], **append("after")},
    ]
    state = redis.Redis.from_url(redis_url)
    with run_group(WORKERS, redis_url, group="workers"):
        # Sent to replica 1 itself, so that it is the one running the workflow.
        reply = get_pool().request(endpoint, protocol.encode_request("RequestCoordinator", {
            "op": "workflow.run", "workflow": {"steps": steps}}), timeout=5)
        workflow_id = protocol.decode_reply(reply)["id"]
        record = f"agentlink:workflow:{workflow_id}"

        def slow_step_running() -> bool:
            steps_now = json.loads(state.get(record) or "{}").get("steps", {})
            return steps_now.get("before", {}).get("state") == "succeeded" and \
                state.exists(f"agentlink:idempotency:Slow:{workflow_id}-slow") == 1

        eventually(slow_step_running, what="the slow step under way on replica 1")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        with run_group([AgentSpec("RequestCoordinator", f"{CORE}:RequestCoordinator",
                                  index=2)], redis_url, group="coordinator-2") as survivor:
            client = FailoverClient(Registry(redis_client({"url": redis_url})))
            final = wait_end(client, workflow_id)
            resumed = engine_of(survivor).stats.snapshot()[0]["resumed"]
            owners = state.smembers(OWNERS)
    assert final["state"] == "succeeded", final
    assert final["owner"] == "RequestCoordinator-2"
    assert resumed == 1
    assert owners == {b"RequestCoordinator-2"}  # the dead replica is no longer looked at
    assert len(Slow.finished) == 1  # the slow step ran once, across the takeover
    stored = json.loads(state.hget("agentlink:state:MemoryOrchestratorService", workflow_id))
    assert stored == ["before", "after"]


def engine_of(host: AgentHost) -> Any:
    return host.slots["RequestCoordinator"].agent.engine


# --- the command line ----------------------------------------------------------------------

TEST_TOPOLOGY = """
machines: {local: {}}
agents:
  - {name: Echo, class: "tests.unit.agents:Echo", machine: local, group: g, port: 20000}
  - {name: Failing, class: "tests.unit.agents:Failing", machine: local, group: g, port: 20000}
"""


def agentlink(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agentlink", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_workflow_run_wait_follows_it_and_exits_by_its_outcome(
        system: FailoverClient, redis_url: str, tmp_path: Path) -> None:
    (tmp_path / "topology.yml").write_text(TEST_TOPOLOGY)
    (tmp_path / "ok.yml").write_text(
        "name: ok\nsteps:\n  - {id: hello, agent: Echo, payload: {x: '{{ input.x }}'}}\n")
    (tmp_path / "bad.yml").write_text(
        "name: bad\nsteps:\n  - {id: hello, agent: Echo}\n"
        "  - {id: boom, agent: Failing, depends_on: [hello]}\n")
    common = ["--topology", str(tmp_path / "topology.yml"), "--redis-url", redis_url, "--wait"]
    ok = agentlink("workflow", "run", str(tmp_path / "ok.yml"), "--input", '{"x": 7}', *common)
    assert ok.returncode == 0, ok.stderr
    assert re.search(r"workflow ok \w+: succeeded", ok.stdout)
    assert '{"echo": {"x": 7}' in ok.stdout
    bad = agentlink("workflow", "run", str(tmp_path / "bad.yml"), *common)
    assert bad.returncode == 1
    assert "step 'boom' failed after 1 attempt(s): handler_error: RuntimeError: boom" in bad.stdout
    workflow_id = re.search(r"started (\w+)", bad.stdout).group(1)  # type: ignore[union-attr]
    status = agentlink("workflow", "status", workflow_id, "--json", "--redis-url", redis_url)
    assert status.returncode == 1
    assert json.loads(status.stdout)["failed_step"] == "boom"


def test_workflow_run_refuses_a_file_naming_an_agent_not_in_the_topology(
        tmp_path: Path) -> None:
    (tmp_path / "wf.yml").write_text("steps:\n  - {id: a, agent: Nobody}\n")
    refused = agentlink("workflow", "run", str(tmp_path / "wf.yml"), "--redis-url",
                        "redis://127.0.0.1:1/0")
    assert refused.returncode == 2
    assert "wf.yml:2: step 'a': unknown agent 'Nobody' (not in the topology)" in refused.stderr
