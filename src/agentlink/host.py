"""The agent host: one process runs one group of agents.

One ZeroMQ context (the pool's), one ROUTER port shared by the group's agents with messages
routed by agent name, and one HTTP port for /health and /metrics. Requests run on a bounded
worker pool; replies go back to the ROUTER thread over an inproc socket, because a ZeroMQ
socket belongs to one thread; an instance whose handler has proven quick and self-contained
is answered on the ROUTER's thread itself (_InlineProof). One supervisor thread waits for
every agent's dependencies, evaluates health and heartbeats the registry for the whole group.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socketserver
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import redis
import zmq
import zmq.utils.monitor
from zmq.auth.thread import ThreadAuthenticator

from agentlink import protocol
from agentlink.agent import (
    AgentContext,
    BaseAgent,
    Caller,
    Check,
    Health,
    WebReply,
    checks_of,
    evaluate_health,
    load_class,
)
from agentlink.client import FailoverClient
from agentlink.durable import DURABLE_ERRORS, OUTAGE_S, REPLICA_WAIT_MS, Durable
from agentlink.idempotency import Idempotency
from agentlink.metrics import HostMetrics
from agentlink.pool import get_pool
from agentlink.registry import REDIS_ERRORS, InstanceRecord, Registry, redis_client
from agentlink.resources import host_sample
from agentlink.security import CurveKeys
from agentlink.topology import DEFAULT_CONCURRENCY

log = logging.getLogger("agentlink.host")
# How `agentlink run` exits when a thread of the host died (EX_SOFTWARE): Docker restarts it.
EXIT_DIED = 70
REPLY_LINGER_MS = 1000
DRAIN_GRACE_S = 0.5
# Bounds against hostile input. A message over MAX_MESSAGE_BYTES drops its sender's
# connection (ZMQ_MAXMSGSIZE); beyond MAX_QUEUED_PER_WORKER requests per worker in flight, a
# new one is answered `overloaded` instead of queued. Names from a message are echoed in
# error replies cut to MAX_NAME_ECHO characters.
MAX_MESSAGE_BYTES = 1 << 20
MAX_QUEUED_PER_WORKER = 64
MAX_NAME_ECHO = 64
HTTP_TIMEOUT_S = 5.0  # a client that sends nothing for this long is dropped
MAX_HTTP_CONNECTIONS = 32
MAX_HTTP_PATH = 1024
# A request finding its instance at its `concurrency` waits for a place, off the workers, at
# most SLOT_WAIT_S (below the failover client's shortest attempt, 1 s: it is answered before
# its caller gives up on it) and behind at most PARKED_PER_PLACE * concurrency others; then
# it is answered `overloaded`. The oldest waiting gets the next free place: while writes ride
# out a Redis failover and places free one by one, a request no longer loses them to
# whichever caller's retry happens to arrive first, until its deadline.
SLOT_WAIT_S = 0.8
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
# Messages one peer may have waiting at the ROUTER; then libzmq stops reading its connection
# and TCP pushes back on the sender. Clients keep one request in flight per socket.
ROUTER_RCVHWM = 256
_PEER_EVENTS: dict[int, str] = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "handshake_failed",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake_failed",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake_failed",
    zmq.EVENT_DISCONNECTED: "disconnected"}


def harden_router(sock: zmq.Socket[bytes]) -> None:
    """Bound what one peer can make the ROUTER hold (set before bind): a frame over
    MAX_MESSAGE_BYTES drops the sender's connection, and at most ROUTER_RCVHWM messages of
    one peer wait unread."""
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    sock.setsockopt(zmq.RCVHWM, ROUTER_RCVHWM)


@dataclass
class InstanceSpec:
    agent: str
    instance: str
    cls: str
    depends_on: list[str] = field(default_factory=list)
    health_timeout: float = 15.0
    options: dict[str, Any] = field(default_factory=dict)
    # Requests the instance runs at once (the topology's `concurrency`); more wait for a place
    # without a worker, briefly (SLOT_WAIT_S), then are answered `overloaded`: one agent stuck
    # (writes waiting out a partition) cannot take every worker of its host from the others.
    concurrency: int = DEFAULT_CONCURRENCY


@dataclass
class HostConfig:
    group: str
    machine: str
    port: int
    http_port: int
    advertise_host: str
    redis: dict[str, Any]
    instances: list[InstanceSpec]
    stateful_agents: list[str] = field(default_factory=list)
    ttl: float = 6.0
    heartbeat: float = 2.0
    # Threads that run handlers. Mostly waiting (on other agents, on Redis), so cheap; enough
    # that one agent stuck in a Redis failover does not starve its group's other agents.
    workers: int = 32
    stop_deadline: float = 10.0
    slot_wait: float = SLOT_WAIT_S
    system: dict[str, Any] = field(default_factory=dict)  # see render_startup_config
    curve: dict[str, str] = field(default_factory=dict)  # keys' files; empty: CURVE off
    # The address both ports listen on: every interface ("*") on a machine, loopback for
    # `agentlink up`, whose hosts nobody else should reach.
    bind: str = "*"


class RedisState:
    """An agent's state in one Redis hash, shared by all its replicas; every write is
    acknowledged only once it would survive a failover (see agentlink.durable)."""

    def __init__(self, client: redis.Redis, agent: str, replica_wait_ms: int = REPLICA_WAIT_MS,
                 outage_s: float = OUTAGE_S, on_use: Callable[[], None] = lambda: None) -> None:
        self.client = client
        self.on_use = on_use  # told of every read and write: the host's _InlineProof
        self.durable = Durable(client, replica_wait_ms, outage_s)
        self.key = f"agentlink:state:{agent}"

    def reachable(self) -> bool:
        """One quick try, for health checks: they must never wait out an outage."""
        try:
            self.client.exists(self.key)
        except REDIS_ERRORS:
            return False
        return True

    def get(self, key: str) -> Any:
        self.on_use()
        value = self.durable.read(lambda pipe: pipe.hget(self.key, key))
        return None if value is None else json.loads(value)

    def put(self, key: str, value: Any) -> None:
        self.on_use()
        self.durable.write(lambda pipe: pipe.hset(self.key, key, json.dumps(value)))

    def delete(self, key: str) -> None:
        self.on_use()
        self.durable.write(lambda pipe: pipe.hdel(self.key, key))


# A request as a worker takes it: who asked, for which instance, the body, the idempotency key.
Job = tuple[bytes, "_Slot", bytes, "bytes | None"]


class _InlineProof:
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


class _Slot:
    """One hosted instance: the agent object, its lifecycle facts, and the requests it runs
    or that wait for a place (its bulkhead)."""

    def __init__(self, spec: InstanceSpec, agent: BaseAgent, record: InstanceRecord,
                 inline: _InlineProof) -> None:
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


class AgentHost:
    def __init__(self, config: HostConfig, redis_conn: redis.Redis | None = None) -> None:
        self.config = config
        self.pool = get_pool()
        # Both ways: the ROUTER serves only known clients, and this host's calls to other
        # hosts present its key (the pool is the process's).
        self.keys = CurveKeys.from_settings(config.curve)
        self.pool.keys = self.keys
        self._auth: ThreadAuthenticator | None = None
        self.redis = redis_conn or redis_client(config.redis)
        self.registry = Registry(self.redis, ttl=config.ttl)
        self.client = FailoverClient(self.registry, self.pool,
                                     stateful=set(config.stateful_agents))
        self.metrics = HostMetrics(self)
        self.endpoint = f"tcp://{config.advertise_host}:{config.port}"
        self.client.local = (self.endpoint, self.local_reply)
        self.idempotency = Idempotency(self.redis)
        self._local = threading.local()  # per thread: its reply socket, went_out of a run
        self.slots = {spec.agent: self._make_slot(spec) for spec in config.instances}
        self.metrics.declare(list(self.slots))
        self.started_at = 0.0
        self.stopping = threading.Event()
        # Set when a thread the host cannot serve without ended by an error: the process
        # must end then (`run` exits non-zero), so that its restart policy brings it back.
        self.died: str | None = None
        self.on_death: Callable[[], None] = lambda: None
        self._inflight = 0
        self._inflight_lock = threading.Lock()
        # A plain queue and threads: the handoff is a C-level lock, the cheapest there is.
        # Each job with whether it holds its instance's place already (handed over by leave).
        self._work_queue: queue.SimpleQueue[tuple[Job, bool] | None] = queue.SimpleQueue()
        self._reply_addr = f"inproc://replies-{id(self)}"
        self._pushers: list[zmq.Socket[bytes]] = []
        self._threads: list[threading.Thread] = []
        self._router: zmq.Socket[bytes] | None = None
        self._http: ThreadingHTTPServer | None = None
        self._io_done = threading.Event()

    @property
    def inflight(self) -> int:
        return self._inflight

    def _make_slot(self, spec: InstanceSpec) -> _Slot:
        cfg = self.config
        context = AgentContext(
            name=spec.agent, instance=spec.instance, machine=cfg.machine, options=spec.options,
            call=self._calling_out(self.client.call),
            state=RedisState(self.redis, spec.agent, on_use=self._went_out),
            stats=self.metrics.snapshot, system=cfg.system, registry=self.registry)
        record = InstanceRecord(
            agent=spec.agent, instance=spec.instance, machine=cfg.machine, group=cfg.group,
            endpoint=self.endpoint,
            http=f"http://{cfg.advertise_host}:{cfg.http_port}")
        return _Slot(spec, load_class(spec.cls)(context), record,
                     _InlineProof(allowed=spec.agent not in cfg.stateful_agents))

    def _went_out(self) -> None:
        """The running handler called another agent or the state store (_InlineProof)."""
        self._local.went_out = True

    def _calling_out(self, call: Caller) -> Caller:
        def marked(agent: str, payload: Any, key: str | None = None,
                   timeout: float | None = None, idempotency_key: str | None = None) -> Any:
            try:
                return call(agent, payload, key=key, timeout=timeout,
                            idempotency_key=idempotency_key)
            finally:  # after the call: an agent of this process it reached ran on this thread
                self._went_out()
        return marked

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Bind both ports (failing here if either is taken), then serve in threads."""
        ctx = self.pool.context
        self._router = ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        harden_router(self._router)
        self._peers = self._router.get_monitor_socket(sum(_PEER_EVENTS))
        if self.keys is not None:
            self._auth = self.keys.authenticator(ctx)
            self.keys.make_server(self._router)
        self._router.bind(f"tcp://{self.config.bind}:{self.config.port}")
        self._replies = ctx.socket(zmq.PULL)
        self._replies.bind(self._reply_addr)
        http_address = "" if self.config.bind == "*" else self.config.bind
        self._http = _BoundedHTTPServer((http_address, self.config.http_port),
                                        _http_handler(self))
        for slot in self.slots.values():
            slot.record.pid = os.getpid()
        self.started_at = time.monotonic()
        workers = [(self._worker, f"worker-{n}") for n in range(self.config.workers)]
        for target, name in ((self._serve_zmq, "zmq"), (self._http.serve_forever, "http"),
                             (self._supervise, "supervisor"), *workers):
            thread = threading.Thread(target=self._essential(target, name),
                                      name=f"{self.config.group}-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("group %s serving %d agent(s) on ports %d/%d", self.config.group,
                 len(self.slots), self.config.port, self.config.http_port)

    def _essential(self, target: Callable[[], None], name: str) -> Callable[[], None]:
        """The thread's work; if it ends by an error, the host is dead (say so, and why)."""
        def guarded() -> None:
            try:
                target()
            except BaseException as err:
                self.died = f"its {name} thread failed: {type(err).__name__}: {err}"
                log.critical("group %s: %s", self.config.group, self.died, exc_info=True)
                self.on_death()

        return guarded

    def stop(self) -> None:
        """Deregister, refuse new work, let in-flight requests finish within the deadline."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        self.registry.deregister([s.record for s in self.slots.values()])
        deadline = time.monotonic() + self.config.stop_deadline
        while self._inflight and time.monotonic() < deadline:
            time.sleep(0.01)
        if self._inflight:
            log.warning("stopping with %d request(s) still running", self._inflight)
        for slot in self.slots.values():
            if slot.started:
                self._agent_hook(slot, slot.agent.stop)
        for _ in range(self.config.workers):
            self._work_queue.put(None)
        self._io_done.wait(2.0)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        for sock in self._pushers:
            sock.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        self.pool.close()
        log.info("group %s stopped", self.config.group)

    # --- health --------------------------------------------------------------------------

    def instance_health(self, slot: _Slot) -> Health:
        checks: list[Check] = []
        if not slot.ready:
            waited = time.monotonic() - self.started_at
            if waited > slot.spec.health_timeout:
                checks.append(Check("dependencies", "failed",
                                    f"not healthy after {slot.spec.health_timeout:g}s: "
                                    + ", ".join(slot.waiting_for)))
            else:
                checks.append(Check("dependencies", "ok",
                                    "waiting for " + ", ".join(slot.waiting_for)))
        if self.stopping.is_set():
            checks.append(Check("lifecycle", "failed", "stopping"))
        if not self.registry.available:
            checks.append(Check("registry", "degraded", self.registry.last_error))
        if slot.ready:
            checks.extend(checks_of(slot.agent))
        return evaluate_health(checks, starting=not slot.ready)

    def health(self) -> dict[str, Any]:
        agents = {s.spec.instance: {"agent": s.spec.agent, **self.instance_health(s).to_dict()}
                  for s in self.slots.values()}
        states = {a["state"] for a in agents.values()}
        state = next((s for s in ("unhealthy", "starting", "degraded") if s in states), "healthy")
        return {"group": self.config.group, "machine": self.config.machine, "state": state,
                "agents": agents}

    def _supervise(self) -> None:
        """Wait for dependencies, keep the registry current; fast while anything starts."""
        last_beat = 0.0
        while not self.stopping.is_set():
            self._resolve_dependencies()
            changed = False
            for slot in self.slots.values():
                state = self.instance_health(slot).state
                changed |= state != slot.record.state
                slot.record.state = state
            now = time.monotonic()
            due = changed or now - last_beat >= self.config.heartbeat
            # While Redis is away, retry every round: re-registering is how we come back.
            if (due or not self.registry.available) and self.registry.register(
                    [s.record for s in self.slots.values()]):
                last_beat = now
                self.registry.publish_resources(self.config.group, host_sample(
                    self.config.group, self.config.machine, list(self.slots),
                    self.metrics.process))
            starting = any(not s.ready for s in self.slots.values())
            self.stopping.wait(0.05 if starting else min(0.5, self.config.heartbeat))

    def _resolve_dependencies(self) -> None:
        for slot in self.slots.values():
            if not slot.ready:
                slot.waiting_for = [d for d in slot.spec.depends_on
                                    if not self._dependency_up(d)]
                slot.ready = not slot.waiting_for
            if slot.ready and not slot.started:
                slot.started = True
                self._agent_hook(slot, slot.agent.start)

    @staticmethod
    def _agent_hook(slot: _Slot, hook: Callable[[], None]) -> None:
        try:
            hook()
        except Exception:  # the agent's health checks say what this broke
            log.exception("%s: %s() failed", slot.spec.instance, hook.__name__)

    def _dependency_up(self, agent: str) -> bool:
        local = self.slots.get(agent)
        if local is not None and local.record.state in ("healthy", "degraded"):
            return True
        return bool(self.registry.discover(agent))

    # --- requests ------------------------------------------------------------------------

    def _serve_zmq(self) -> None:
        assert self._router is not None
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._replies, zmq.POLLIN)
        poller.register(self._peers, zmq.POLLIN)
        try:
            # In flight ends when this thread has sent the reply, so a stop never drops one.
            # After the last reply the socket stays open (and answers late requests with
            # `unavailable`) for a short grace: closing at once lost replies that libzmq had
            # not yet written, linger or not.
            drained_at = None
            while drained_at is None or time.monotonic() - drained_at < DRAIN_GRACE_S:
                for sock, _ in poller.poll(50):
                    try:
                        self._on_ready(sock)
                    except Exception:  # one bad message must never end the serving thread
                        log.exception("group %s: a message was not handled", self.config.group)
                        self.metrics.rejected("?", protocol.INTERNAL)
                self._refuse_expired()
                if drained_at is None and self.stopping.is_set() and self._inflight == 0:
                    drained_at = time.monotonic()
        finally:
            self._router.disable_monitor()
            self._peers.close(linger=0)
            self._router.close(linger=REPLY_LINGER_MS)  # let the last replies leave
            self._replies.close(linger=0)
            self._io_done.set()

    def _on_ready(self, sock: zmq.Socket[bytes]) -> None:
        assert self._router is not None
        if sock is self._router:
            self._dispatch(self._router.recv_multipart())
        elif sock is self._peers:
            event = zmq.utils.monitor.recv_monitor_message(sock)["event"]
            self.metrics.peer_event(_PEER_EVENTS.get(event, "other"))
        else:
            self._router.send_multipart(self._replies.recv_multipart())
            self._answered()

    def _answered(self) -> None:
        """One admitted request's reply is sent: it is in flight no more."""
        with self._inflight_lock:
            self._inflight -= 1

    def _dispatch(self, frames: list[bytes]) -> None:
        """Queue a request for a worker, answer it here (a proven instance's, _InlineProof),
        or answer at once why not (and count it)."""
        if len(frames) not in (4, 5) or frames[1] != b"":
            self._refuse(frames[0], "?", protocol.BAD_REQUEST,
                         "expected frames: agent name, JSON body[, key]")
            return
        ident, _, target, body, *key = frames
        wanted = target.decode(errors="replace")
        name = wanted[:MAX_NAME_ECHO]
        slot = self.slots.get(wanted)
        if slot is None:
            self._refuse(ident, "?", protocol.UNKNOWN_AGENT,
                         f"{name} is not served by group {self.config.group}")
        elif self.stopping.is_set() or not slot.ready:
            self._refuse(ident, name, protocol.UNAVAILABLE, f"{name} is not accepting requests")
        elif key and not _is_utf8(key[0]):  # decoded loosely, two keys could share a run
            self._refuse(ident, name, protocol.BAD_REQUEST, "idempotency key is not UTF-8")
        elif not key and slot.inline.proven and slot.take_free_place():
            self._answer_inline(ident, slot, body)
        elif not self._admit():
            self._refuse(ident, name, protocol.OVERLOADED,
                         f"group {self.config.group} has {self._inflight} requests in flight")
        else:
            self._work_queue.put(((ident, slot, body, key[0] if key else None), False))

    def _answer_inline(self, ident: bytes, slot: _Slot, body: bytes) -> None:
        """Run a request of a proven instance here, on the ROUTER's thread (_InlineProof).
        Not counted in flight: it is answered before this thread reads another message."""
        assert self._router is not None
        reply = self._reply_or_internal_error(slot, body, None)
        parked = slot.leave()
        if parked is not None:  # a worker parked it meanwhile: it has the place now
            self._work_queue.put((parked, True))
        self._router.send_multipart([ident, b"", reply])

    def _admit(self) -> bool:
        """Count one more request in flight, unless the bound is reached (a flood)."""
        with self._inflight_lock:
            if self._inflight >= MAX_QUEUED_PER_WORKER * self.config.workers:
                return False
            self._inflight += 1
            return True

    def _refuse(self, ident: bytes, agent: str, code: str, message: str) -> None:
        assert self._router is not None
        self.metrics.rejected(agent, code)
        self._router.send_multipart([ident, b"", protocol.error(code, message)])

    def _worker(self) -> None:
        while (item := self._work_queue.get()) is not None:
            self._work(*item)

    def _work(self, job: Job, holds_place: bool = False) -> None:
        """Run the job, then on this worker each parked job its instance hands the place to.
        A job parked here is run by the worker that frees a place, or refused by the IO
        thread once it waited `slot_wait` (_refuse_expired)."""
        slot = job[1]
        entered = True if holds_place else slot.enter(job)
        if entered is None:
            self.metrics.rejected(slot.spec.agent, protocol.OVERLOADED)
            self._pusher().send_multipart([job[0], b"", protocol.error(
                protocol.OVERLOADED, f"{slot.busy()} and {len(slot.parked)} waiting")])
        next_job: Job | None = job if entered else None
        while next_job is not None:
            ident, _, body, key = next_job
            reply = self._reply_or_internal_error(slot, body, key)
            self._pusher().send_multipart([ident, b"", reply])
            next_job = slot.leave()

    def _reply_or_internal_error(self, slot: _Slot, body: bytes, key: bytes | None) -> bytes:
        try:
            return self._answer(slot, body, key)
        except Exception:  # a reply must go back: it ends the request's in-flight count
            log.exception("%s: request not answered", slot.spec.instance)
            self.metrics.rejected(slot.spec.agent, protocol.INTERNAL)
            return protocol.error(protocol.INTERNAL, "the host failed to answer")

    def _refuse_expired(self) -> None:
        """Answer `overloaded` the requests that waited `slot_wait` for a place: their callers
        try another replica. Here, as only this thread sends on the ROUTER."""
        for slot in self.slots.values():
            for ident, *_ in slot.expired(self.config.slot_wait):
                self._refuse(ident, slot.spec.agent, protocol.OVERLOADED,
                             f"{slot.busy()} (waited {self.config.slot_wait:g}s for a place)")
                self._answered()

    def local_reply(self, frames: list[bytes]) -> list[bytes]:
        """Answer a request to an agent of this process in the caller's thread.

        The failover client comes here instead of this process's own endpoint: no TCP
        connection to itself, no socket round trip, and no worker thread waiting for another
        worker to take a request it sent itself."""
        name = frames[0].decode(errors="replace")
        slot = self.slots.get(name)
        if slot is None or self.stopping.is_set() or not slot.ready:
            self.metrics.rejected(name, protocol.UNAVAILABLE)
            return [protocol.error(protocol.UNAVAILABLE, f"{name} is not accepting requests")]
        return [self._answer(slot, frames[1], frames[2] if len(frames) > 2 else None)]

    def _answer(self, slot: _Slot, body: bytes, key: bytes | None) -> bytes:
        """The reply to a request; with an idempotency key, at most one run per key."""
        if key is None:
            return self._run(slot, body)[0]
        agent, name = slot.spec.agent, key.decode(errors="replace")
        try:
            earlier = self.idempotency.claim(agent, name)
        except DURABLE_ERRORS as err:
            return protocol.error(protocol.UNAVAILABLE, f"idempotency store: {err}")
        if earlier is not None:
            self.metrics.repeated(agent)
            return earlier
        reply, succeeded = self._run(slot, body)
        try:
            self.idempotency.finish(agent, name, reply, succeeded)
        except DURABLE_ERRORS as err:  # the claim expires; a repeat after that runs again
            log.warning("%s: reply for key %r not kept: %s", slot.spec.instance, name, err)
        return reply

    def _run(self, slot: _Slot, body: bytes) -> tuple[bytes, bool]:
        started = time.perf_counter()
        try:
            request = json.loads(body)
        except (ValueError, RecursionError) as err:  # not JSON, or nested past the stack
            self.metrics.observe(slot.spec.agent, time.perf_counter() - started,
                                 protocol.BAD_REQUEST)
            return protocol.error(protocol.BAD_REQUEST, f"body is not JSON: {err}"[:200]), False
        self._local.went_out = False
        try:
            reply = protocol.ok(slot.agent.handle(request))
            code = ""
        except ValueError as err:
            code, reply = protocol.BAD_REQUEST, protocol.error(protocol.BAD_REQUEST, str(err))
        except Exception as err:
            log.warning("%s failed: %s: %s", slot.spec.instance, type(err).__name__, err,
                        exc_info=True)
            code = protocol.HANDLER_ERROR
            reply = protocol.error(code, f"{type(err).__name__}: {err}")
        seconds = time.perf_counter() - started
        slot.inline.observe(seconds, self._local.went_out)
        self.metrics.observe(slot.spec.agent, seconds, code)
        return reply, not code

    def _pusher(self) -> zmq.Socket[bytes]:
        sock = getattr(self._local, "push", None)
        if sock is None:
            sock = self.pool.context.socket(zmq.PUSH)
            sock.connect(self._reply_addr)
            self._local.push = sock
            self._pushers.append(sock)
        return sock


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode()
    except UnicodeDecodeError:
        return False
    return True


class _BoundedHTTPServer(ThreadingHTTPServer):
    """One thread per connection, up to MAX_HTTP_CONNECTIONS; more are closed at once."""

    daemon_threads = True
    # The listen backlog (5 by default): a burst of scrapes and polls beyond it waits a second
    # for the client's SYN to be sent again.
    request_queue_size = MAX_HTTP_CONNECTIONS

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(MAX_HTTP_CONNECTIONS)

    def server_bind(self) -> None:
        """Bind without HTTPServer's lookup of its own name (socket.getfqdn): where DNS is
        slow or gone, that waited out the resolver (10 s) before every host could start."""
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: nothing else would free the slot
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def _http_handler(host: AgentHost) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = HTTP_TIMEOUT_S  # read-only and bounded: GET/HEAD, slow clients dropped

        def _refuse(self) -> None:
            self._send(WebReply(405, "application/json", b'{"error": "read-only: GET, HEAD"}'),
                       allow="GET, HEAD")

        # Methods made up by the client stay 501 (not implemented), as HTTP says.
        do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _refuse

        def do_GET(self) -> None:
            self._send(self._page())

        def do_HEAD(self) -> None:
            self._send(self._page(), with_body=False)

        def _page(self) -> WebReply:
            if len(self.path) > MAX_HTTP_PATH:
                return WebReply(414, "application/json", b'{"error": "path too long"}')
            if self.path == "/metrics":
                return WebReply(200, "text/plain; version=0.0.4", host.metrics.render())
            if self.path.rstrip("/") == "/health" or self.path.startswith("/health/"):
                body, status = self._health(self.path[len("/health/"):])
                return WebReply(status, "application/json", body)
            return self._agent_page()

        def _send(self, reply: WebReply, with_body: bool = True, allow: str = "") -> None:
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(reply.body)))
            if allow:
                self.send_header("Allow", allow)
            self.end_headers()
            if with_body:
                self.wfile.write(reply.body)

        def _agent_page(self) -> WebReply:
            for slot in host.slots.values():
                try:
                    reply = slot.agent.web(self.path)
                except Exception as err:  # an agent's page must never take the port down
                    log.exception("%s failed to answer GET %s", slot.spec.instance, self.path)
                    body = json.dumps({"error": f"{type(err).__name__}: {err}"}).encode()
                    return WebReply(500, "application/json", body)
                if reply is not None:
                    return reply
            return WebReply(404, "application/json", b'{"error": "not found"}')

        def _health(self, name: str) -> tuple[bytes, int]:
            report = host.health()
            if name:
                match = [v | {"instance": k} for k, v in report["agents"].items()
                         if name in (k, v["agent"])]
                if not match:
                    return b'{"error": "unknown agent"}', 404
                report = match[0]
            status = 200 if report["state"] in ("healthy", "degraded") else 503
            return json.dumps(report).encode(), status

        def log_message(self, format: str, *args: Any) -> None:
            return  # health polls are frequent; access logs would drown the real ones

    return Handler


def run(config: HostConfig) -> int:
    """Run a host until SIGTERM or SIGINT, then stop gracefully; if a thread it cannot
    serve without dies, stop and exit EXIT_DIED."""
    import signal

    # Block the stop signals before any thread exists, so every thread (ours and libzmq's)
    # inherits the mask and none is interrupted mid-call; the main thread takes the signal
    # synchronously below.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    # A thread of the host that dies wakes the main thread with SIGUSR1.
    wake = {*stop_signals, signal.SIGUSR1}
    signal.pthread_sigmask(signal.SIG_BLOCK, wake)
    host = AgentHost(config)
    host.on_death = lambda: os.kill(os.getpid(), signal.SIGUSR1)
    try:
        host.start()
    except (zmq.ZMQError, OSError) as err:
        log.error("group %s cannot start: %s (is another process on port %d or %d?)",
                  config.group, err, config.port, config.http_port)
        return 1
    received = signal.sigwait(wake)
    if host.died is not None:
        log.critical("group %s: exiting, %s", config.group, host.died)
    else:
        log.info("group %s received %s: stopping", config.group, signal.Signals(received).name)
    host.stop()
    # Terminating the context is what lets the last replies leave: libzmq sends what the
    # lingering sockets still hold. Without it the process exits and drops them.
    host.pool.context.destroy(linger=REPLY_LINGER_MS)
    return EXIT_DIED if host.died is not None else 0
