"""Admission: which requests an instance runs now, which wait for a place (its bulkhead),
and which may be answered on the ROUTER's thread (InlineProof)."""

from __future__ import annotations

import threading
import time
from collections import deque

from agentlink.runtime.agent import BaseAgent
from agentlink.runtime.registry import InstanceRecord
from agentlink.runtime.startup_config import InstanceSpec

# A request finding its instance at its `concurrency` waits for a place, off the workers, at
# most the host's `slot_wait` (startup_config.SLOT_WAIT_S) and behind at most
# PARKED_PER_PLACE * concurrency others; then it is answered `overloaded`. The oldest waiting
# gets the next free place: while writes ride out a Redis failover and places free one by
# one, a request no longer loses them to whichever caller's retry happens to arrive first,
# until its deadline.
PARKED_PER_PLACE = 8
# A request for an instance whose handler has proven quick and self-contained runs on the
# ROUTER's thread, with no worker: the two thread handoffs (the work queue in, the reply
# socket out) were half of an idle round trip (bench/runtime.py). The proof: INLINE_TRIAL_RUNS
# runs in a row, each under INLINE_MAX_S, none calling another agent or the state store. A
# call out sends the instance to the workers for good. A run over the bound sends it back to
# a trial twice as long as its last (up to 2**INLINE_MAX_DOUBLINGS times): a handler slow
# now and then runs mostly on workers, while a run slowed by a busy machine (wall time) costs
# only a while on the workers. Stateful agents and requests with an idempotency key (its
# claim is a Redis round trip) always go to a worker.
INLINE_TRIAL_RUNS = 16
INLINE_MAX_S = 0.002
INLINE_MAX_DOUBLINGS = 10


# A request as a worker takes it: who asked, for which instance, the body, the idempotency key.
Job = tuple[bytes, "Slot", bytes, "bytes | None"]


class InlineProof:
    """Whether an instance's requests may run on the ROUTER's thread (see INLINE_TRIAL_RUNS).
    Workers update it without a lock: a count lost in a race only delays the decision."""

    def __init__(self, allowed: bool) -> None:
        self.fast_runs = 0
        self.slow_runs = 0
        self.never = not allowed

    @property
    def trial(self) -> int:
        """Fast runs in a row it takes now."""
        return INLINE_TRIAL_RUNS << min(self.slow_runs, INLINE_MAX_DOUBLINGS)

    @property
    def proven(self) -> bool:
        return not self.never and self.fast_runs >= self.trial

    def observe(self, seconds: float, went_out: bool) -> None:
        if went_out:
            self.never = True
        elif seconds > INLINE_MAX_S:
            self.fast_runs = 0
            self.slow_runs += 1
        else:
            self.fast_runs += 1


class Slot:
    """One hosted instance: the agent object, its lifecycle facts, and the requests it runs
    or that wait for a place (its bulkhead)."""

    def __init__(self, spec: InstanceSpec, agent: BaseAgent, record: InstanceRecord,
                 inline: InlineProof) -> None:
        self.spec = spec
        self.agent = agent
        self.record = record
        self.inline = inline
        self.ready = not spec.depends_on
        self.started = False  # agent.start() called
        self.waiting_for: list[str] = list(spec.depends_on)
        self.running = 0  # requests in its handler now, on the host's workers
        self.parked: deque[tuple[float, Job]] = deque()  # (since, job), oldest first
        self._running_lock = threading.Lock()

    def enter(self, job: Job) -> bool | None:
        """Take a place among the instance's `concurrency` (True: run the job now); when all
        are taken, park the job for the next free place (False), unless too many wait
        already (None: refuse it)."""
        with self._running_lock:
            if self.running < self.spec.concurrency:
                self.running += 1
                return True
            if len(self.parked) >= PARKED_PER_PLACE * self.spec.concurrency:
                return None
            self.parked.append((time.monotonic(), job))
            return False

    def take_free_place(self) -> bool:
        """Take a place if one is free and no job waits for one; never park."""
        with self._running_lock:
            if self.running < self.spec.concurrency and not self.parked:
                self.running += 1
                return True
            return False

    def leave(self) -> Job | None:
        """Give the place up, or hand it to the oldest parked job (returned: run it next)."""
        with self._running_lock:
            if self.parked:
                return self.parked.popleft()[1]
            self.running -= 1
            return None

    def busy(self) -> str:
        return f"{self.spec.instance} is running {self.spec.concurrency} requests already"

    def expired(self, waited: float) -> list[Job]:
        """Take out the parked jobs that waited `waited` seconds or more."""
        if not self.parked:  # read without the lock: the common case costs nothing
            return []
        since = time.monotonic() - waited
        jobs = []
        with self._running_lock:
            while self.parked and self.parked[0][0] <= since:
                jobs.append(self.parked.popleft()[1])
        return jobs


