"""Agents for tests only."""

from __future__ import annotations

import json
import threading
import time
from typing import Any, ClassVar

from agentlink.runtime.agent import BaseAgent, Degraded
from agentlink.runtime.workflow.engine import record_key


class Echo(BaseAgent):
    def handle(self, request: Any) -> Any:
        return {"echo": request, "by": self.instance}


class Strict(BaseAgent):
    """Takes only {"n": <int>} and says so (ValueError) for any other JSON."""

    def handle(self, request: Any) -> Any:
        if not isinstance(request, dict) or type(request.get("n")) is not int:
            raise ValueError('expected {"n": <int>}')
        return {"n": request["n"] + 1}


class Slow(BaseAgent):
    """Sleeps as long as the request says; records that it finished."""

    finished: ClassVar[list[str]] = []

    def handle(self, request: Any) -> Any:
        time.sleep(float(request.get("sleep", 0.5)))
        Slow.finished.append(self.instance)
        return {"slept": request.get("sleep"), "by": self.instance}


class Gate(BaseAgent):
    """Holds every request until open() (at most 10 s): fills a host's workers on purpose."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._open = threading.Event()

    def open(self) -> None:
        self._open.set()

    def handle(self, request: Any) -> Any:
        self._open.wait(10)
        return {"by": self.instance}


class StoredSteps(BaseAgent):
    """The state of each step of a workflow as its record in Redis has it at this moment."""

    def handle(self, request: Any) -> Any:
        assert self.context.registry is not None
        text = self.context.registry.client.get(record_key(request["workflow"]))
        return {sid: step["state"] for sid, step in json.loads(text)["steps"].items()}


class Failing(BaseAgent):
    def handle(self, request: Any) -> Any:
        raise RuntimeError("boom")


class Checked(BaseAgent):
    """check_health() answers whatever the class attribute says (set by the test)."""

    answer: ClassVar[dict[str, Any]] = {}

    def handle(self, request: Any) -> Any:
        return "ok"

    def check_health(self) -> dict[str, bool | Degraded]:
        if Checked.answer.get("raise"):
            raise ValueError("sensor unplugged")
        return dict(Checked.answer.get("checks", {}))


class Relay(BaseAgent):
    """Calls the agent named in the request: for nested and chained calls."""

    def handle(self, request: Any) -> Any:
        if request.get("next"):
            return {"by": self.instance,
                    "inner": self.call(request["next"], {"next": request.get("then")})}
        return {"by": self.instance}


class NeverHealthy(BaseAgent):
    def handle(self, request: Any) -> Any:
        return None

    def check_health(self) -> dict[str, bool | Degraded]:
        return {"model_loaded": False}


class OddAnswer(BaseAgent):
    """check_health() answers the class attribute as it is: None, a string, a number..."""

    answer: ClassVar[Any] = None

    def handle(self, request: Any) -> Any:
        return "ok"

    def check_health(self) -> Any:
        return OddAnswer.answer


class CrashesAtStart(BaseAgent):
    """Its host process cannot even construct it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the model file is missing")

    def handle(self, request: Any) -> Any:
        return None


class Rendezvous(BaseAgent):
    """Answers only when `parties` calls are in handle() at once: proof of parallel steps."""

    barriers: ClassVar[dict[str, threading.Barrier]] = {}
    lock: ClassVar[threading.Lock] = threading.Lock()

    def handle(self, request: Any) -> Any:
        name = str(request["barrier"])
        with Rendezvous.lock:
            barrier = Rendezvous.barriers.setdefault(
                name, threading.Barrier(int(request.get("parties", 2))))
        barrier.wait(timeout=float(request.get("within", 5)))
        return {"met": name, "step": request.get("step")}


class Flaky(BaseAgent):
    """Fails the first `fail` calls for each `key`, then answers."""

    calls: ClassVar[dict[str, int]] = {}

    def handle(self, request: Any) -> Any:
        key = str(request["key"])
        Flaky.calls[key] = Flaky.calls.get(key, 0) + 1
        if Flaky.calls[key] <= int(request["fail"]):
            raise RuntimeError(f"call {Flaky.calls[key]} of {key} fails")
        return {"key": key, "calls": Flaky.calls[key]}


class WhereRun(BaseAgent):
    """Says which thread ran it; on request, sleeps, calls another agent or uses its state
    first (what takes an instance off its host's ROUTER thread)."""

    def handle(self, request: Any) -> Any:
        time.sleep(float(request.get("sleep", 0)))
        if "call" in request:
            self.call(request["call"], "hello")
        if request.get("state"):
            self.state.put("seen", True)
        return {"thread": threading.current_thread().name}
