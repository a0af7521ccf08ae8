"""A load generator: requests at a set rate for a set time, through the failover client.

Requests are paced on a fixed schedule (request n is due at start + n / rate), not sent as
fast as possible, so a stall shows up as latency and as `late` requests instead of quietly
lowering the load. Every acknowledged write to the stateful memory agent is remembered and
read back afterwards: a missing or different value is acknowledged state that was lost.
Used by `agentlink load`, the failover tests and the benchmarks.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol


class Caller(Protocol):
    """What the load goes through: a FailoverClient in use, anything with its `call` in tests."""

    def call(self, agent: str, payload: Any, key: str | None = None,
             timeout: float | None = None) -> Any: ...


Request = tuple[str, Any, str | None]  # agent, payload, key (for stateful stickiness)
MEMORY = "MemoryOrchestratorService"
# A request this far past its slot was sent late; less is the scheduler's own jitter.
LATE_AFTER = 0.005
MAX_FAILED_AT = 20  # failures whose time a report keeps
# Share of a request's deadline the coordinator gets for its own call, so that a slow
# downstream comes back as the coordinator's error instead of making the client give up
# on a healthy coordinator (its first attempt gets half of the deadline).
COORDINATOR_SHARE = 0.4


@dataclass(frozen=True)
class Slot:
    """What a target needs to build request n of a run."""

    n: int
    run: str  # the run's id, so keys of two runs never collide
    timeout: float


def _observe(slot: Slot) -> dict[str, Any]:
    return {"op": "observe", "source": f"load-{slot.n % 100}", "value": slot.n}


def _coordinator(slot: Slot) -> Request:
    route = {"agent": "SystemDigitalTwin", "payload": _observe(slot),
             "timeout": slot.timeout * COORDINATOR_SHARE}
    return "RequestCoordinator", route, None


def _memory(slot: Slot) -> Request:
    key = f"load-{slot.run}-{slot.n}"
    return MEMORY, {"op": "put", "key": key, "value": f"{slot.run}:{slot.n}"}, key


# What each kind of target sends; `agent:<Name>` sends any agent a worker's request with
# one hop, so that a worker also calls each of its dependencies once.
WORKER_REQUEST = {"text": "the quick brown fox jumps over the lazy dog", "hops": 1}
TARGETS: dict[str, Callable[[Slot], Request]] = {
    "coordinator": _coordinator,
    "twin": lambda slot: ("SystemDigitalTwin", _observe(slot), None),
    "memory": _memory,
}
DEFAULT_TARGETS = ("coordinator", "twin", "memory")


def parse_target(text: str) -> tuple[str, int]:
    """`kind` or `kind=weight` (a whole number >= 1); unknown kinds are named."""
    kind, _, weight = text.partition("=")
    if kind not in TARGETS and not (kind.startswith("agent:") and len(kind) > 6):
        known = ", ".join([*TARGETS, "agent:<Name>"])
        raise ValueError(f"unknown load target {kind!r} (known: {known})")
    if weight and (not weight.isdigit() or int(weight) < 1):
        raise ValueError(f"weight of load target {kind!r} must be a whole number >= 1")
    return kind, int(weight or 1)


def build_request(target: str, slot: Slot) -> Request:
    """The request a target kind sends in this slot."""
    if target.startswith("agent:"):
        return target.split(":", 1)[1], WORKER_REQUEST, None
    return TARGETS[target](slot)


def percentile(samples: list[float], p: float) -> float | None:
    """The nearest-rank percentile (p in 0..100), a sample that was seen; None for none."""
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


@dataclass
class LoadSpec:
    """What to send: `rate` requests/s in all for `duration` s, spread over `targets`.

    Targets are kinds of TARGETS or `agent:<Name>`, each optionally weighted (`memory=2`);
    they take turns in proportion to their weights, so a run's mix is exact.
    """

    rate: float = 50.0
    duration: float = 10.0
    workers: int = 4
    timeout: float = 5.0  # each request's deadline, failovers included
    targets: tuple[str, ...] = DEFAULT_TARGETS
    plan: list[str] = field(init=False, repr=False, default_factory=list)  # kind per turn

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.duration <= 0 or self.timeout <= 0 or self.workers < 1:
            raise ValueError("rate, duration and timeout must be > 0 and workers >= 1")
        if not self.targets:
            raise ValueError("a load needs at least one target")
        self.plan = [kind for kind, weight in map(parse_target, self.targets)
                     for _ in range(weight)]

    @property
    def scheduled(self) -> int:
        return int(self.rate * self.duration)


@dataclass
class LoadReport:
    """Counts of a run; `failures` by "<agent>: <exception type or error code>"."""

    scheduled: int = 0
    sent: int = 0
    succeeded: int = 0
    late: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    failure_examples: dict[str, str] = field(default_factory=dict)  # first message each
    # When the first failures ended (UTC) and how long each was out: to set a failed run
    # beside the logs of what it ran through.
    failed_at: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)  # of succeeded requests
    seconds: float = 0.0
    acknowledged: dict[str, Any] = field(default_factory=dict)  # memory key -> value
    verified: int = 0
    lost: list[str] = field(default_factory=list)  # acknowledged keys not read back
    lost_why: dict[str, str] = field(default_factory=dict)

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    @property
    def unsent(self) -> int:
        """Scheduled requests never sent: the run was still behind a deadline after its end."""
        return self.scheduled - self.sent

    @property
    def ok(self) -> bool:
        """What a gate wants: every request sent and answered, no acknowledged write lost."""
        return self.failed == 0 and not self.lost and self.unsent == 0

    def latency(self) -> dict[str, float | None]:
        samples = self.latencies_ms
        found = {"p50": percentile(samples, 50), "p90": percentile(samples, 90),
                 "p99": percentile(samples, 99), "max": max(samples, default=None)}
        return {name: None if ms is None else round(ms, 2) for name, ms in found.items()}

    def summary(self) -> dict[str, Any]:
        """Plain data (JSON-ready) for a report, a benchmark table or an assertion message."""
        rate = round(self.sent / self.seconds, 1) if self.seconds else 0.0
        return {"scheduled": self.scheduled, "sent": self.sent, "unsent": self.unsent,
                "succeeded": self.succeeded, "failed": self.failed, "late": self.late,
                "seconds": round(self.seconds, 2), "rate": rate,
                "latency_ms": self.latency(), "failures": dict(self.failures),
                "failure_examples": self.failure_examples, "failed_at": self.failed_at,
                "acknowledged": len(self.acknowledged), "verified": self.verified,
                "lost": len(self.lost), "lost_keys": dict(list(self.lost_why.items())[:20])}


class LoadRun:
    """One run: `workers` threads take request numbers in order and send each when due."""

    def __init__(self, client: Caller, spec: LoadSpec,
                 progress: Callable[[LoadReport], None] | None = None,
                 stop: threading.Event | None = None) -> None:
        self.client = client
        self.spec = spec
        self.progress = progress
        self.stop = stop or threading.Event()
        self.report = LoadReport(scheduled=spec.scheduled)
        self.run_id = uuid.uuid4().hex[:8]
        self._numbers = itertools.count()
        self._lock = threading.Lock()
        self._start = 0.0

    def run(self) -> LoadReport:
        self._start = time.monotonic()
        threads = [threading.Thread(target=self._worker, daemon=True)
                   for _ in range(self.spec.workers)]
        for thread in threads:
            thread.start()
        self._wait(threads)
        self.report.seconds = time.monotonic() - self._start
        if self.stop.is_set():  # ended early on purpose: what was not due yet is not owed
            self.report.scheduled = self.report.sent
        return self.report

    def _wait(self, threads: list[threading.Thread]) -> None:
        """Join the workers, reporting progress once a second meanwhile."""
        tick = self._start + 1.0
        for thread in threads:
            while thread.is_alive():
                thread.join(max(0.0, tick - time.monotonic()))
                if time.monotonic() >= tick:
                    tick += 1.0
                    if self.progress:
                        self.progress(self.report)

    def _worker(self) -> None:
        # Past this, what is still unsent is a backlog, not load at the set rate: give up on it.
        give_up = self._start + self.spec.duration + self.spec.timeout
        while (n := self._next()) < self.report.scheduled:
            due = self._start + n / self.spec.rate
            now = time.monotonic()
            if now > give_up or self.stop.is_set():
                return
            if due > now and self.stop.wait(due - now):
                return
            if now - due > LATE_AFTER:
                with self._lock:
                    self.report.late += 1
            self._send(n)

    def _next(self) -> int:
        with self._lock:
            return next(self._numbers)

    def _send(self, n: int) -> None:
        target = self.spec.plan[n % len(self.spec.plan)]
        agent, payload, key = build_request(target, Slot(n, self.run_id, self.spec.timeout))
        began = time.monotonic()
        try:
            self.client.call(agent, payload, key=key, timeout=self.spec.timeout)
        except Exception as err:  # every failure is counted and named, none stops the run
            self._failed(agent, err, time.monotonic() - began)
            return
        with self._lock:
            self.report.sent += 1
            self.report.succeeded += 1
            self.report.latencies_ms.append((time.monotonic() - began) * 1000)
            if agent == MEMORY and key is not None:
                self.report.acknowledged[key] = payload["value"]

    def _failed(self, agent: str, err: Exception, seconds: float) -> None:
        reason = f"{agent}: {getattr(err, 'code', '') or type(err).__name__}"
        with self._lock:
            self.report.sent += 1
            self.report.failures[reason] += 1
            self.report.failure_examples.setdefault(reason, str(err))
            if len(self.report.failed_at) < MAX_FAILED_AT:
                ended = datetime.now(UTC).strftime("%H:%M:%S.%f")[:10]
                self.report.failed_at.append(f"{ended} after {seconds:.1f}s")


def verify_state(client: Caller, report: LoadReport, timeout: float = 5.0) -> None:
    """Read back every acknowledged write (through failover, as any caller would).

    A value that is missing, different or unreadable is lost: the caller was told it was
    stored, so it must be there after any fault a live replica survived.
    """
    for key, value in report.acknowledged.items():
        try:
            got = client.call(MEMORY, {"op": "get", "key": key}, key=key, timeout=timeout)
        except Exception as err:  # unreadable counts as lost, the check goes on
            why = f"unreadable: {getattr(err, 'code', '') or type(err).__name__}"
        else:
            if got.get("value") == value:
                report.verified += 1
                continue
            why = "missing" if got.get("value") is None else f"different: {got.get('value')!r}"
        report.lost.append(key)
        report.lost_why[key] = why


def run_load(client: Caller, spec: LoadSpec,
             progress: Callable[[LoadReport], None] | None = None,
             stop: threading.Event | None = None) -> LoadReport:
    """Run the load, then check the acknowledged state; `progress` gets the report each second.

    Setting `stop` ends the run early: requests already sent are waited for, later ones are
    not scheduled."""
    report = LoadRun(client, spec, progress, stop).run()
    verify_state(client, report, spec.timeout)
    return report


class BackgroundLoad:
    """`run_load` on a thread from `with` (or start()) until stop(): a load that lasts as
    long as an operation of unknown length, such as an upgrade or a measurement."""

    def __init__(self, client: Caller, spec: LoadSpec) -> None:
        self._stop = threading.Event()
        self._report: LoadReport | None = None
        self._thread = threading.Thread(target=self._run, args=(client, spec), daemon=True)

    def _run(self, client: Caller, spec: LoadSpec) -> None:
        self._report = run_load(client, spec, stop=self._stop)

    def start(self) -> BackgroundLoad:
        self._thread.start()
        return self

    def stop(self, wait: float = 120.0) -> LoadReport | None:
        """End the load and return its report; None if it did not finish within `wait`."""
        self._stop.set()
        self._thread.join(wait)
        return self._report

    def __enter__(self) -> BackgroundLoad:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
