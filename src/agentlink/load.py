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
from typing import Any

from agentlink.client import FailoverClient

Request = tuple[str, Any, str | None]  # agent, payload, key (for stateful stickiness)
MEMORY = "MemoryOrchestratorService"


def _observe(n: int) -> dict[str, Any]:
    return {"op": "observe", "source": f"load-{n % 100}", "value": n}


# What each target sends for request n of a run.
TARGETS: dict[str, Callable[[int, str], Request]] = {
    "coordinator": lambda n, run: ("RequestCoordinator",
                                   {"agent": "SystemDigitalTwin", "payload": _observe(n)}, None),
    "twin": lambda n, run: ("SystemDigitalTwin", _observe(n), None),
    "memory": lambda n, run: (MEMORY, {"op": "put", "key": f"load-{run}-{n}", "value": n},
                              f"load-{run}-{n}"),
}


def build_request(target: str, n: int, run: str) -> Request:
    """Request n for a target: a known kind, or `agent:<Name>` with an empty payload."""
    if target.startswith("agent:"):
        return target.split(":", 1)[1], {}, None
    if target not in TARGETS:
        known = ", ".join([*TARGETS, "agent:<Name>"])
        raise ValueError(f"unknown load target {target!r} (known: {known})")
    return TARGETS[target](n, run)


def percentile(samples: list[float], p: float) -> float:
    """The nearest-rank percentile (p in 0..100); NaN for no samples."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


@dataclass
class LoadSpec:
    rate: float = 50.0  # requests per second, all workers together
    duration: float = 10.0
    workers: int = 4
    timeout: float = 5.0  # each request's deadline, failovers included
    targets: tuple[str, ...] = ("coordinator", "twin", "memory")


@dataclass
class LoadReport:
    sent: int = 0
    succeeded: int = 0
    late: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    seconds: float = 0.0
    acknowledged: dict[str, Any] = field(default_factory=dict)  # memory key -> value
    lost: list[str] = field(default_factory=list)
    verified: int = 0

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    def summary(self) -> dict[str, Any]:
        lat = self.latencies_ms
        return {"sent": self.sent, "succeeded": self.succeeded, "failed": self.failed,
                "late": self.late, "rate": round(self.sent / self.seconds, 1) if self.seconds
                else 0.0, "latency_ms": {f"p{p}": round(percentile(lat, p), 2)
                                         for p in (50, 90, 99, 100)},
                "failures": dict(self.failures), "acknowledged": len(self.acknowledged),
                "verified": self.verified, "lost": self.lost}


class LoadRun:
    """One run: `workers` threads take request numbers in order and send each when due."""

    def __init__(self, client: FailoverClient, spec: LoadSpec,
                 progress: Callable[[LoadReport], None] | None = None) -> None:
        self.client = client
        self.spec = spec
        self.progress = progress
        self.report = LoadReport()
        self.run_id = uuid.uuid4().hex[:8]
        self._numbers = itertools.count()
        self._lock = threading.Lock()

    def run(self) -> LoadReport:
        self._start = time.monotonic()
        threads = [threading.Thread(target=self._worker, daemon=True)
                   for _ in range(self.spec.workers)]
        for thread in threads:
            thread.start()
        while any(t.is_alive() for t in threads):
            threads[0].join(1.0)
            if self.progress:
                self.progress(self.report)
        self.report.seconds = time.monotonic() - self._start
        return self.report

    def _worker(self) -> None:
        total = int(self.spec.rate * self.spec.duration)
        while (n := self._next()) < total:
            due = self._start + n / self.spec.rate
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            else:
                with self._lock:
                    self.report.late += 1
            self._send(n)

    def _next(self) -> int:
        with self._lock:
            return next(self._numbers)

    def _send(self, n: int) -> None:
        target = self.spec.targets[n % len(self.spec.targets)]
        agent, payload, key = build_request(target, n, self.run_id)
        began = time.monotonic()
        try:
            self.client.call(agent, payload, key=key, timeout=self.spec.timeout)
        except Exception as err:  # every failure is counted and named, none stops the run
            reason = getattr(err, "code", "") or type(err).__name__
            with self._lock:
                self.report.sent += 1
                self.report.failures[f"{agent}: {reason}"] += 1
            return
        with self._lock:
            self.report.sent += 1
            self.report.succeeded += 1
            self.report.latencies_ms.append((time.monotonic() - began) * 1000)
            if agent == MEMORY:
                self.report.acknowledged[str(key)] = payload["value"]


def verify_state(client: FailoverClient, report: LoadReport, timeout: float = 10.0) -> None:
    """Read back every acknowledged write; what is missing or different is lost."""
    for key, value in report.acknowledged.items():
        got = client.call(MEMORY, {"op": "get", "key": key}, key=key, timeout=timeout)
        if got.get("value") == value:
            report.verified += 1
        else:
            report.lost.append(key)


def run_load(client: FailoverClient, spec: LoadSpec,
             progress: Callable[[LoadReport], None] | None = None) -> LoadReport:
    """Run the load, then check the acknowledged state."""
    report = LoadRun(client, spec, progress).run()
    verify_state(client, report)
    return report
