"""Which workflow step runs next.

Steps wait in one queue per agent, and within it one line per workflow. A step starts when
its agent has fewer steps running than its limit (from the topology's `concurrency`); the
next one is taken from the workflows in turn, so one workflow with a thousand steps does not
hold back the others. An agent whose every machine is under pressure (as ResourceManager
reports it) gets `pressure_limit` instead: its steps queue, they do not fail. A retry waits
out its backoff in a timer, not in a worker.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

log = logging.getLogger("agentlink.runtime.workflow")


@dataclass(frozen=True)
class Task:
    workflow: str
    step: str
    agent: str


class Scheduler:
    def __init__(self, run: Callable[[Task], None], limit: Callable[[str], int], *,
                 workers: int = 64, pressure_limit: int = 1) -> None:
        self._run = run
        self._limit = limit
        self.pressure_limit = pressure_limit
        self._queues: dict[str, OrderedDict[str, deque[Task]]] = {}
        self._running: dict[str, int] = {}
        self._throttled: frozenset[str] = frozenset()
        self._timers: list[tuple[float, int, Task]] = []
        self._order = itertools.count()
        self._lock = threading.Condition()
        self._stopped = False
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="workflow-step")
        self._timer = threading.Thread(target=self._wake_timers, name="workflow-timers",
                                       daemon=True)
        self._timer.start()

    def submit(self, task: Task, delay: float = 0.0) -> None:
        with self._lock:
            if self._stopped:
                return
            if delay > 0:
                heapq.heappush(self._timers, (time.monotonic() + delay, next(self._order), task))
                self._lock.notify_all()
                return
            self._enqueue(task)
            self._pump()

    def throttle(self, agents: Collection[str]) -> None:
        """Agents whose machines are all under pressure; the rest run at their limit."""
        with self._lock:
            self._throttled = frozenset(agents)
            self._pump()

    def drop(self, workflow: str) -> None:
        """Forget the queued steps of a workflow this replica no longer runs."""
        with self._lock:
            for lines in self._queues.values():
                lines.pop(workflow, None)
            self._timers = [t for t in self._timers if t[2].workflow != workflow]
            heapq.heapify(self._timers)

    def queued(self) -> dict[str, int]:
        with self._lock:
            depth = {agent: sum(len(line) for line in lines.values())
                     for agent, lines in self._queues.items()}
            for _, _, task in self._timers:
                depth[task.agent] = depth.get(task.agent, 0) + 1
            return depth

    def running(self) -> dict[str, int]:
        with self._lock:
            return {agent: n for agent, n in self._running.items() if n}

    @property
    def throttled(self) -> frozenset[str]:
        return self._throttled

    def stop(self, wait: float) -> None:
        """Start nothing more; give running steps up to `wait` seconds to finish."""
        with self._lock:
            self._stopped = True
            self._queues.clear()
            self._timers.clear()
            self._lock.notify_all()
            deadline = time.monotonic() + wait
            while any(self._running.values()) and time.monotonic() < deadline:
                self._lock.wait(max(deadline - time.monotonic(), 0))
        self._pool.shutdown(wait=False, cancel_futures=True)

    # --- under the lock -------------------------------------------------------------------

    def _enqueue(self, task: Task) -> None:
        lines = self._queues.setdefault(task.agent, OrderedDict())
        lines.setdefault(task.workflow, deque()).append(task)

    def _limit_of(self, agent: str) -> int:
        limit = max(1, self._limit(agent))
        return min(limit, self.pressure_limit) if agent in self._throttled else limit

    def _pump(self) -> None:
        for agent, lines in self._queues.items():
            while lines and self._running.get(agent, 0) < self._limit_of(agent):
                workflow, line = next(iter(lines.items()))
                task = line.popleft()
                if line:
                    lines.move_to_end(workflow)  # the next start goes to the next workflow
                else:
                    del lines[workflow]
                self._running[agent] = self._running.get(agent, 0) + 1
                self._pool.submit(self._execute, task)

    # --- threads --------------------------------------------------------------------------

    def _execute(self, task: Task) -> None:
        try:
            self._run(task)
        except Exception:  # a bug in one step must not leak its agent's slot
            log.exception("workflow %s step %s crashed", task.workflow, task.step)
        finally:
            with self._lock:
                self._running[task.agent] -= 1
                if self._stopped:
                    self._lock.notify_all()  # stop() waits for the running steps
                else:
                    self._pump()

    def _wake_timers(self) -> None:
        with self._lock:
            while not self._stopped:
                now = time.monotonic()
                while self._timers and self._timers[0][0] <= now:
                    self._enqueue(heapq.heappop(self._timers)[2])
                self._pump()
                wait = self._timers[0][0] - now if self._timers else None
                self._lock.wait(wait)
