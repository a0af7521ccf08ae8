"""The workflow engine: runs workflows on one RequestCoordinator replica, state in Redis.

Every workflow is one JSON record in Redis, written with an acknowledged write (see
agentlink.runtime.durable) when it is created, before a step starts on earlier results and
when it ends, so what a caller was told, and what a step was given, is never lost; a result
nothing waits on yet goes with the next write. Its final state also goes on a list that
callers block on (wait_ended) instead of polling the record. Each replica owns the
workflows it runs: their ids are in its set `owned:<replica>`, and its key
`alive:<replica>` lives while its keeper renews it. When a replica dies or is cut off, its
key expires; another replica moves the dead one's set into its own in one atomic step and
resumes each workflow from its record: steps whose results were written keep them, the
others run again. A step with an idempotency key is answered by the agent host from its
first run if that run completed (agentlink.runtime.idempotency), so it never runs twice.
Writes are guarded: a replica writes a record only while the workflow is in its set.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import jinja2
import redis

from agentlink.runtime import protocol
from agentlink.runtime.agent import Caller
from agentlink.runtime.durable import DURABLE_ERRORS, Durable
from agentlink.runtime.registry import as_text
from agentlink.runtime.workflow.definition import Step, Workflow, parse
from agentlink.runtime.workflow.scheduler import Scheduler, Task
from agentlink.topology import DEFAULT_CONCURRENCY

log = logging.getLogger("agentlink.runtime.workflow")
PREFIX = "agentlink:workflow"
OWNERS = f"{PREFIX}s:owners"
RUNNING, SUCCEEDED, FAILED, PENDING = "running", "succeeded", "failed", "pending"
BACKOFF_S, BACKOFF_CAP_S = 0.1, 2.0
IN_PROGRESS_WAIT_S = 0.2

# Write the record only while this replica owns the workflow. A finished workflow leaves the
# owner's set, its record expires after the retention time, and its final state goes on its
# `ended` list (one element, same expiry) for those waiting on it (wait_ended).
_SAVE = """
if redis.call('sismember', KEYS[2], ARGV[2]) == 0 then return 0 end
if ARGV[3] == '' then
  redis.call('set', KEYS[1], ARGV[1])
else
  redis.call('set', KEYS[1], ARGV[1], 'px', ARGV[4])
  redis.call('srem', KEYS[2], ARGV[2])
  redis.call('del', KEYS[3])
  redis.call('rpush', KEYS[3], ARGV[3])
  redis.call('pexpire', KEYS[3], ARGV[4])
end
return 1
"""
# Move a dead replica's workflows to the caller, only if it is still dead: returns them.
# The dead one leaves the owners, so that replicas gone for good are not looked at every
# beat forever; one that comes back adds itself again with its next beat.
_ADOPT = """
if redis.call('exists', KEYS[1]) == 1 then return {} end
local ids = redis.call('smembers', KEYS[2])
if #ids > 0 then
  redis.call('sunionstore', KEYS[3], KEYS[3], KEYS[2])
  redis.call('del', KEYS[2])
end
redis.call('srem', KEYS[4], ARGV[1])
return ids
"""


def record_key(workflow_id: str) -> str:
    return f"{PREFIX}:{workflow_id}"


def ended_key(workflow_id: str) -> str:
    return f"{PREFIX}:{workflow_id}:ended"


def wait_ended(client: redis.Redis, workflow_id: str, timeout: float) -> str | None:
    """The workflow's final state once it has ended, or None while it still runs after
    `timeout` seconds (below the client's socket timeout). It blocks in Redis instead of
    polling the record, and any number of callers may wait on one workflow: BLMOVE from the
    list to itself hands each of them its one element and keeps it."""
    key = ended_key(workflow_id)
    state = client.blmove(key, key, timeout, "LEFT", "RIGHT")  # type: ignore[arg-type]
    return None if state is None else as_text(state)


def owned_key(owner: str) -> str:
    return f"{PREFIX}s:owned:{owner}"


def alive_key(owner: str) -> str:
    return f"{PREFIX}s:alive:{owner}"


class UnknownWorkflow(ValueError):
    """No record of this id (never created, or past its retention)."""


@dataclass
class _Run:
    """A workflow this replica drives: its definition and its record, kept in step."""

    workflow: Workflow
    record: dict[str, Any]
    lock: threading.Lock = field(default_factory=threading.Lock)
    started: set[str] = field(default_factory=set)

    @property
    def id(self) -> str:
        return str(self.record["id"])

    def succeeded(self) -> set[str]:
        return {sid for sid, s in self.record["steps"].items() if s["state"] == SUCCEEDED}

    def template_context(self) -> dict[str, Any]:
        return {"input": self.record["input"],
                "workflow": {"id": self.id, "name": self.record["name"]},
                "steps": {sid: {"result": s.get("result")}
                          for sid, s in self.record["steps"].items() if s["state"] == SUCCEEDED}}


class EngineStats:
    """What collect_metrics exports; counters only grow. Steps end on many threads."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    def snapshot(self) -> tuple[Counter[str], defaultdict[str, float]]:
        with self._lock:
            return Counter(self.counts), defaultdict(float, self.seconds)

    def count(self, what: str, seconds: float | None = None) -> None:
        with self._lock:
            self.counts[what] += 1
            if seconds is not None:
                self.seconds[what] += seconds


class WorkflowEngine:
    def __init__(self, client: redis.Redis, call: Caller, owner: str, *,
                 agents: Collection[str] | None = None,
                 limits: Mapping[str, int] | None = None,
                 default_limit: int = DEFAULT_CONCURRENCY,
                 agent_machines: Mapping[str, Collection[str]] | None = None,
                 pressure: Callable[[], Collection[str]] | None = None,
                 lease_s: float = 3.0, retention_s: float = 24 * 3600) -> None:
        self.client = client
        self.durable = Durable(client, group_commit=True)
        self.call = call
        self.owner = owner
        self.agents = agents
        self.limits = dict(limits or {})
        self.default_limit = default_limit
        self.agent_machines = {a: set(m) for a, m in (agent_machines or {}).items()}
        self.pressure = pressure
        self.lease_s = lease_s
        self.retention_ms = int(retention_s * 1000)
        self.stats = EngineStats()
        self.machines_under_pressure: set[str] = set()
        self.scheduler = Scheduler(self._run_step, self._limit)
        self._adopt = client.register_script(_ADOPT)
        self._runs: dict[str, _Run] = {}
        self._runs_lock = threading.Lock()
        self._stop = threading.Event()
        self._keeper: threading.Thread | None = None
        self._alive_until = 0.0
        self._reconcile_due = False

    # --- the request API --------------------------------------------------------------

    def submit(self, document: Any, inputs: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Check, record (acknowledged) and start a workflow; returns its id at once."""
        began = time.perf_counter()
        workflow = parse(document, self.agents, source="workflow")
        if not self.running:
            raise RuntimeError(f"{self.owner}: the workflow engine is not running")
        wid = uuid.uuid4().hex
        record = {"id": wid, "name": workflow.name, "document": workflow.document,
                  "input": {**workflow.input, **(inputs or {})}, "state": RUNNING,
                  "created": time.time(), "owner": self.owner,
                  "steps": {sid: {"state": PENDING, "attempts": 0} for sid in workflow.steps}}
        self.durable.write(lambda pipe: (
            pipe.set(record_key(wid), json.dumps(record)), pipe.sadd(owned_key(self.owner), wid)))
        self._start(_Run(workflow, record))
        seconds = time.perf_counter() - began
        self.stats.count("started", seconds)
        return {"id": wid, "state": RUNNING, "owner": self.owner,
                "init_ms": round(seconds * 1000, 3)}

    def status(self, workflow_id: str) -> dict[str, Any]:
        """A workflow's record as stored, without its definition; any replica answers."""
        text = self._stored(workflow_id)
        if text is None:
            raise UnknownWorkflow(f"no workflow {workflow_id!r} (unknown, or past retention)")
        record: dict[str, Any] = json.loads(text)
        record.pop("document", None)
        return record

    # --- lifecycle ----------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._keeper is not None and not self._stop.is_set()

    def start(self) -> None:
        """Keep this replica alive in Redis, resume its own workflows and adopt the dead's."""
        self._keeper = threading.Thread(target=self._keep, name="workflow-keeper", daemon=True)
        self._keeper.start()

    def stop(self, wait: float = 5.0) -> None:
        """Finish running steps (up to `wait`), then hand the rest to the other replicas
        at once: dropping the alive key lets them adopt at their next look."""
        if self._stop.is_set():
            return
        self._stop.set()
        self.scheduler.stop(wait)
        if self._keeper is not None:
            self._keeper.join(2.0)
        with self._runs_lock:
            self._runs.clear()
        with contextlib.suppress(*DURABLE_ERRORS):  # if not, it expires on its own
            self.client.delete(alive_key(self.owner))

    def owned(self) -> int:
        with self._runs_lock:
            return len(self._runs)

    # --- keeping alive, adopting, pressure ------------------------------------------------

    def _keep(self) -> None:
        beat = self.lease_s / 3
        first = True
        while not self._stop.is_set():
            try:
                self._beat(first)
                first = False
                self._adopt_dead()
            except DURABLE_ERRORS as err:
                log.warning("workflow keeper: Redis unreachable: %s", err)
                if time.monotonic() > self._alive_until:
                    self._forget_all("lost touch with Redis for longer than the lease")
            self._poll_pressure()
            self._stop.wait(beat)

    def _beat(self, first: bool) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.set(alive_key(self.owner), "1", px=int(self.lease_s * 1000), get=True)
        pipe.sadd(OWNERS, self.owner)
        was_alive = pipe.execute()[0] is not None
        self._alive_until = time.monotonic() + self.lease_s
        if first or not was_alive or self._reconcile_due:
            self._reconcile_due = False
            # Own workflows from before a restart, or checked after the key had lapsed:
            # another replica may have adopted some of them meanwhile.
            self._reconcile()

    def _reconcile(self) -> None:
        ids = {as_text(m) for m in self.client.smembers(owned_key(self.owner))}
        with self._runs_lock:
            gone = [wid for wid in self._runs if wid not in ids]
            new = [wid for wid in ids if wid not in self._runs]
        for wid in gone:
            self._forget(wid, "adopted by another replica")
        self._resume(new)

    def _adopt_dead(self) -> None:
        owners = sorted(as_text(m) for m in self.client.smembers(OWNERS))
        for other in owners:
            if other == self.owner:
                continue
            ids = self._adopt(keys=[alive_key(other), owned_key(other), owned_key(self.owner),
                                    OWNERS], args=[other])
            if ids:
                log.info("adopting %d workflow(s) of %s", len(ids), other)
                self._resume([as_text(i) for i in ids])

    def _stored(self, workflow_id: str) -> bytes | None:
        """A workflow's stored record, as the primary has it."""
        stored: bytes | None = self.durable.read(lambda pipe: pipe.get(record_key(workflow_id)))
        return stored

    def _resume(self, ids: list[str]) -> None:
        for wid in ids:
            text = self._stored(wid)
            if text is None:
                continue
            record = json.loads(text)
            if record["state"] != RUNNING:
                self.client.srem(owned_key(self.owner), wid)
                continue
            for step in record["steps"].values():
                if step["state"] != SUCCEEDED:
                    step["state"] = PENDING
            record["owner"] = self.owner
            self.stats.count("resumed")
            self._start(_Run(parse(json.loads(record["document"]), None), record))

    def _poll_pressure(self) -> None:
        if self.pressure is None:
            return
        try:
            machines = set(self.pressure())
        except Exception as err:  # monitoring away: run at full limits rather than stall
            log.debug("no pressure report: %s", err)
            machines = set()
        self.machines_under_pressure = machines
        self.scheduler.throttle([a for a, where in self.agent_machines.items()
                                 if where and where <= machines])

    def _limit(self, agent: str) -> int:
        return self.limits.get(agent, self.default_limit)

    def _forget_all(self, why: str) -> None:
        with self._runs_lock:
            ids = list(self._runs)
        for wid in ids:
            self._forget(wid, why)

    def _forget(self, wid: str, why: str) -> None:
        with self._runs_lock:
            dropped = self._runs.pop(wid, None)
        if dropped is not None:
            self.scheduler.drop(wid)
            log.info("workflow %s: no longer run here (%s)", wid, why)

    # --- running steps ------------------------------------------------------------------

    def _start(self, run: _Run) -> None:
        run.started.update(run.succeeded())
        with self._runs_lock:
            self._runs[run.id] = run
        with run.lock:
            ready = self._take_ready(run)
        self._submit(run, ready)

    @staticmethod
    def _take_ready(run: _Run) -> list[Step]:
        """The steps that can start now, marked running; the caller holds run.lock."""
        ready = run.workflow.ready(run.succeeded(), run.started)
        run.started.update(s.id for s in ready)
        for step in ready:
            run.record["steps"][step.id]["state"] = RUNNING
        return ready

    def _submit(self, run: _Run, steps: list[Step]) -> None:
        for step in steps:
            self.scheduler.submit(Task(run.id, step.id, step.agent))

    def _run_step(self, task: Task) -> None:
        with self._runs_lock:
            run = self._runs.get(task.workflow)
        if run is None:
            return  # given up or adopted elsewhere meanwhile
        step = run.workflow.steps[task.step]
        with run.lock:
            context = run.template_context()
            state = run.record["steps"][step.id]
            state["attempts"] += 1
            attempt = state["attempts"]
        try:
            payload, key = step.render_payload(context), step.render_key(context)
        except (jinja2.TemplateError, TypeError, ValueError) as err:
            self._end_step(run, step.id, error=f"payload: {type(err).__name__}: {err}")
            return
        try:
            result = self.call(step.agent, payload, timeout=step.timeout, idempotency_key=key)
        except protocol.RemoteError as err:
            if err.code == protocol.IN_PROGRESS:  # its first run is still going: not a retry
                with run.lock:
                    state["attempts"] -= 1
                self.stats.count("waits_in_progress")
                self.scheduler.submit(task, IN_PROGRESS_WAIT_S)
                return
            self._failed_attempt(run, task, attempt, str(err),
                                 retry=err.code != protocol.BAD_REQUEST)
            return
        except Exception as err:  # NoInstance, a timeout, a transport error: try again
            self._failed_attempt(run, task, attempt, f"{type(err).__name__}: {err}", retry=True)
            return
        self._end_step(run, step.id, result=result)

    def _failed_attempt(self, run: _Run, task: Task, attempt: int, error: str,
                        retry: bool) -> None:
        step = run.workflow.steps[task.step]
        if retry and attempt <= step.retries:
            self.stats.count("retries")
            delay = min(BACKOFF_CAP_S, BACKOFF_S * 2 ** (attempt - 1))
            self.scheduler.submit(task, delay * random.uniform(0.5, 1.0))
            return
        self._end_step(run, step.id, error=error)

    def _end_step(self, run: _Run, sid: str, result: Any = None, error: str | None = None
                  ) -> None:
        with run.lock:
            state = run.record["steps"][sid]
            state.update(state=FAILED if error else SUCCEEDED, finished=time.time())
            state["error" if error else "result"] = error if error else result
            self.stats.count(f"steps_{state['state']}")
            done = self._conclude(run, sid, error)
            # Written when the workflow ends or a step can start on this result. A result
            # nothing waits on yet rides with the next write: lost to a takeover, its step
            # runs again, like any step whose end was not written.
            ready = [] if done else self._take_ready(run)
            if (done or ready) and not self._write(run, done):
                self._forget(run.id, "record not written")
                return
        if done:
            with self._runs_lock:
                self._runs.pop(run.id, None)
            self.stats.count(f"finished_{run.record['state']}",
                             run.record["finished"] - run.record["created"])
        else:
            self._submit(run, ready)

    @staticmethod
    def _conclude(run: _Run, sid: str, error: str | None) -> bool:
        """Mark the workflow finished when a step failed for good or all succeeded."""
        record = run.record
        if error:
            attempts = record["steps"][sid]["attempts"]
            record.update(state=FAILED, failed_step=sid,
                          error=f"step '{sid}' failed after {attempts} attempt(s): {error}")
        elif len(run.succeeded()) == len(run.workflow.steps):
            record["state"] = SUCCEEDED
        else:
            return False
        record["finished"] = time.time()
        return True

    def _write(self, run: _Run, done: bool) -> bool:
        """The record, acknowledged; False when another replica owns the workflow now. A
        finished workflow's record is kept for the retention time without its definition,
        which only a resume needs: that halves what Redis holds for it."""
        record = {k: v for k, v in run.record.items() if k != "document"} if done \
            else run.record
        args = [json.dumps(record), run.id, run.record["state"] if done else "",
                self.retention_ms]
        keys = [record_key(run.id), owned_key(self.owner), ended_key(run.id)]
        try:
            # EVAL, not a registered script: in a pipeline, redis-py asks SCRIPT EXISTS
            # first, a round trip per batch; Redis caches the script by its hash anyway.
            written = self.durable.write(lambda pipe: pipe.eval(_SAVE, len(keys), *keys, *args))
        except DURABLE_ERRORS as err:
            log.warning("workflow %s: record not written: %s", run.id, err)
            self._reconcile_due = True  # still ours in Redis: resume it from its record
            return False
        return bool(written[0])
