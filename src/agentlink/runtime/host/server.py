"""The agent host: its ROUTER, its workers, and how a request becomes a reply.

The ROUTER thread reads every request; a request for an instance proven quick is answered
right there (admission.InlineProof), any other is queued for a worker, whose reply goes back
to the ROUTER thread over an inproc socket, because a ZeroMQ socket belongs to one thread.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from http.server import ThreadingHTTPServer
from typing import Any

import redis
import zmq
import zmq.utils.monitor
from zmq.auth.thread import ThreadAuthenticator

from agentlink.runtime import protocol
from agentlink.runtime.agent import AgentContext, Caller, load_class
from agentlink.runtime.client import FailoverClient
from agentlink.runtime.durable import DURABLE_ERRORS
from agentlink.runtime.host.admission import InlineProof, Job, Slot
from agentlink.runtime.host.state import RedisState
from agentlink.runtime.host.supervisor import Supervisor
from agentlink.runtime.host.web import BoundedHTTPServer, http_handler
from agentlink.runtime.idempotency import Idempotency
from agentlink.runtime.metrics import HostMetrics
from agentlink.runtime.pool import get_pool
from agentlink.runtime.registry import InstanceRecord, Registry, redis_client
from agentlink.runtime.startup_config import HostConfig, InstanceSpec
from agentlink.security import CurveKeys

log = logging.getLogger("agentlink.runtime.host")
REPLY_LINGER_MS = 1000
DRAIN_GRACE_S = 0.5
# Workers a host starts with; more start as jobs wait, up to its config's `workers`.
INITIAL_WORKERS = 2
# Bounds against hostile input. A message over MAX_MESSAGE_BYTES drops its sender's
# connection (ZMQ_MAXMSGSIZE); beyond MAX_QUEUED_PER_WORKER requests per worker in flight, a
# new one is answered `overloaded` instead of queued. Names from a message are echoed in
# error replies cut to MAX_NAME_ECHO characters.
MAX_MESSAGE_BYTES = 1 << 20
MAX_QUEUED_PER_WORKER = 64
MAX_NAME_ECHO = 64
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
        self.stopping = threading.Event()
        self.supervisor = Supervisor(config, self.slots, self.registry, self.metrics,
                                     self.stopping)
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
        # Workers start as jobs need them, up to config.workers: an idle host keeps few
        # threads (each holds a stack and, once it replied, a socket).
        self._workers_lock = threading.Lock()
        self._workers = 0  # started
        self._idle_workers = 0  # waiting for a job
        self._workers_closed = False  # stopping: no worker starts any more
        self._router: zmq.Socket[bytes] | None = None
        self._http: ThreadingHTTPServer | None = None
        self._io_done = threading.Event()

    @property
    def inflight(self) -> int:
        return self._inflight

    def _make_slot(self, spec: InstanceSpec) -> Slot:
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
        return Slot(spec, load_class(spec.cls)(context), record,
                     InlineProof(allowed=spec.agent not in cfg.stateful_agents))

    def _went_out(self) -> None:
        """The running handler called another agent or the state store (InlineProof)."""
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
        self._http = BoundedHTTPServer((http_address, self.config.http_port),
                                        http_handler(self))
        for slot in self.slots.values():
            slot.record.pid = os.getpid()
        self.supervisor.started_at = time.monotonic()
        for target, name in ((self._serve_zmq, "zmq"), (self._http.serve_forever, "http"),
                             (self.supervisor.run, "supervisor")):
            self._thread(target, name)
        with self._workers_lock:
            for _ in range(min(INITIAL_WORKERS, self.config.workers)):
                self._start_worker()
        log.info("group %s serving %d agent(s) on ports %d/%d", self.config.group,
                 len(self.slots), self.config.port, self.config.http_port)

    def _thread(self, target: Callable[[], None], name: str) -> None:
        threading.Thread(target=self._essential(target, name),
                         name=f"{self.config.group}-{name}", daemon=True).start()

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
        self.supervisor.stop_agents()
        with self._workers_lock:
            self._workers_closed = True
            for _ in range(self._workers):
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

    def health(self) -> dict[str, Any]:
        return self.supervisor.health()

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
        """Queue a request for a worker, answer it here (a proven instance's, InlineProof),
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
            self._submit(((ident, slot, body, key[0] if key else None), False))

    def _answer_inline(self, ident: bytes, slot: Slot, body: bytes) -> None:
        """Run a request of a proven instance here, on the ROUTER's thread (InlineProof).
        Not counted in flight: it is answered before this thread reads another message."""
        assert self._router is not None
        reply = self._reply_or_internal_error(slot, body, None)
        parked = slot.leave()
        if parked is not None:  # a worker parked it meanwhile: it has the place now
            self._submit((parked, True))
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

    def _submit(self, item: tuple[Job, bool]) -> None:
        """Queue a job for the workers; start one more when fewer wait than jobs do."""
        self._work_queue.put(item)
        with self._workers_lock:
            if (self._idle_workers < self._work_queue.qsize()
                    and self._workers < self.config.workers and not self._workers_closed):
                self._start_worker()

    def _start_worker(self) -> None:
        """Under _workers_lock."""
        self._thread(self._worker, f"worker-{self._workers}")
        self._workers += 1

    def _worker(self) -> None:
        while True:
            with self._workers_lock:
                self._idle_workers += 1
            item = self._work_queue.get()
            with self._workers_lock:
                self._idle_workers -= 1
            if item is None:
                return
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

    def _reply_or_internal_error(self, slot: Slot, body: bytes, key: bytes | None) -> bytes:
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

    def _answer(self, slot: Slot, body: bytes, key: bytes | None) -> bytes:
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

    def _run(self, slot: Slot, body: bytes) -> tuple[bytes, bool]:
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
