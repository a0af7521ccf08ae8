"""The scheduler: per-agent limits, fairness between workflows, back-pressure, backoff."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import redis

from agentlink.runtime.agent import AgentContext
from agentlink.runtime.reference.core import RequestCoordinator
from agentlink.runtime.workflow.engine import WorkflowEngine
from agentlink.runtime.workflow.scheduler import Scheduler, Task
from tests.unit.conftest import eventually


class Gate:
    """A run function whose calls block until released; it keeps who ran, in order."""

    def __init__(self) -> None:
        self.started: list[Task] = []
        self.running: dict[str, int] = {}
        self.most: dict[str, int] = {}
        self.open = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, task: Task) -> None:
        with self._lock:
            self.started.append(task)
            self.running[task.agent] = self.running.get(task.agent, 0) + 1
            self.most[task.agent] = max(self.most.get(task.agent, 0), self.running[task.agent])
        self.open.wait(10)
        with self._lock:
            self.running[task.agent] -= 1


@pytest.fixture
def gate() -> Iterator[Gate]:
    gate = Gate()
    yield gate
    gate.open.set()


def tasks(workflow: str, agent: str, count: int) -> list[Task]:
    return [Task(workflow, f"{workflow}-{n}", agent) for n in range(count)]


def test_an_agent_never_runs_more_steps_than_its_limit(gate: Gate) -> None:
    scheduler = Scheduler(gate, {"A": 2, "B": 3}.__getitem__)
    for task in tasks("w1", "A", 5) + tasks("w2", "B", 5):
        scheduler.submit(task)
    eventually(lambda: len(gate.started) == 5, what="A's 2 and B's 3 steps started")
    assert scheduler.queued() == {"A": 3, "B": 2}
    gate.open.set()
    eventually(lambda: len(gate.started) == 10, what="every step run")
    assert gate.most == {"A": 2, "B": 3}
    scheduler.stop(5)


def test_workflows_take_turns_at_a_busy_agent(gate: Gate) -> None:
    scheduler = Scheduler(gate, lambda agent: 1)
    for task in tasks("big", "A", 4) + tasks("small", "A", 1):
        scheduler.submit(task)
    gate.open.set()
    eventually(lambda: len(gate.started) == 5, what="every step run")
    order = [t.workflow for t in gate.started]
    # big's first step starts at once; then the queued ones take turns by workflow, so the
    # small workflow's step goes next but one, not after all of big's.
    assert order == ["big", "big", "small", "big", "big"]
    scheduler.stop(5)


def test_an_agent_under_pressure_queues_its_steps_and_runs_one_at_a_time(gate: Gate) -> None:
    scheduler = Scheduler(gate, lambda agent: 4)
    scheduler.throttle({"A"})
    for task in tasks("w", "A", 3) + tasks("v", "B", 3):
        scheduler.submit(task)
    eventually(lambda: len(gate.started) == 4, what="1 step of A and 3 of B started")
    assert scheduler.queued() == {"A": 2, "B": 0}
    scheduler.throttle(set())  # pressure gone: the queue drains at the full limit
    eventually(lambda: len(gate.started) == 6, what="A's queued steps started")
    gate.open.set()
    scheduler.stop(5)
    assert gate.most["A"] == 3


def test_a_delayed_step_waits_in_a_timer_then_runs() -> None:
    ran = threading.Event()
    scheduler = Scheduler(lambda task: ran.set(), lambda agent: 1)
    scheduler.submit(Task("w", "s", "A"), delay=0.2)
    assert scheduler.queued() == {"A": 1}  # counted while it waits
    assert ran.wait(5)
    scheduler.stop(5)


def test_dropping_a_workflow_forgets_its_queued_steps(gate: Gate) -> None:
    scheduler = Scheduler(gate, lambda agent: 1)
    for task in tasks("keep", "A", 2) + tasks("gone", "A", 2):
        scheduler.submit(task)
    scheduler.submit(Task("gone", "later", "A"), delay=30)
    eventually(lambda: len(gate.started) == 1, what="the first step started")
    scheduler.drop("gone")
    gate.open.set()
    eventually(lambda: len(gate.started) == 2, what="keep's second step")
    scheduler.stop(5)
    assert {t.workflow for t in gate.started} == {"keep"}


def test_the_engine_throttles_agents_whose_every_machine_is_under_pressure(
        redis_url: str) -> None:
    pressure: list[object] = [{"pc2"}]

    def report() -> set[str]:
        if isinstance(pressure[0], Exception):
            raise pressure[0]
        return set(pressure[0])  # type: ignore[call-overload]

    engine = WorkflowEngine(redis.Redis.from_url(redis_url), lambda *a, **k: None, "c-1",
                            agent_machines={"OnPc2": {"pc2"}, "Both": {"pc2", "mainpc"}},
                            pressure=report)
    engine._poll_pressure()
    assert engine.scheduler.throttled == {"OnPc2"}  # Both still has a machine with room
    pressure[0] = {"pc2", "mainpc"}
    engine._poll_pressure()
    assert engine.scheduler.throttled == {"OnPc2", "Both"}
    pressure[0] = TimeoutError("ResourceManager away")
    engine._poll_pressure()  # no report: full limits, rather than a stall
    assert engine.scheduler.throttled == set()
    engine.scheduler.stop(1)


def test_the_coordinator_reads_pressure_from_resource_managers_report() -> None:
    report = {"machines": {"mainpc": {"under_pressure": False},
                           "pc2": {"under_pressure": True}}}
    context = AgentContext(name="RequestCoordinator", instance="RequestCoordinator-1",
                           call=lambda agent, payload, **_: report)
    assert RequestCoordinator(context)._machines_under_pressure() == {"pc2"}
