"""The process's one ZeroMQ context and its pooled client sockets.

DEALER sockets are kept per remote endpoint and lane and reused: a caller checks one out,
uses it for one request and returns it. Sequential callers share one socket; concurrent
callers (a handler calling an agent of its own host, say) get another, up to a bound, so
nested calls never wait on each other. The failover client gives each agent its own lane:
one host serves several agents on one endpoint, and requests of one stuck agent (writes
waiting out a partition) must not take every socket from the requests of the others.

A request that times out closes its socket with LINGER 0 and retries on a fresh one (the
Lazy Pirate pattern), so a stale reply can never be read as the answer to a later request.

Each socket is monitored for disconnects. When the connection drops while a request is out
(the peer crashed, or ZeroMQ's heartbeat found it gone), the reply can never come, so the
request fails at once with PeerGone instead of waiting out its timeout; so does a request
that finds no connection within CONNECT_WAIT_S. The failover client then moves on to
another replica. A socket that was still connecting sent nothing, so it goes back to the
pool and goes on connecting: on a loaded machine a handshake (CURVE's included) can take
longer than the wait, and a fresh socket each time would never finish one.

With CURVE keys (`Pool.keys`), every socket encrypts and authenticates: the pool presents
this process's keypair and expects the server key of the group the endpoint serves.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import zmq

from agentlink.security import CurveKeys

MAX_SOCKETS_PER_ENDPOINT = 16
# How long a request waits for a connection to its endpoint. A live peer on the LAN is
# connected within milliseconds; one that is down is then left for another replica.
CONNECT_WAIT_S = 0.25
HEARTBEAT_IVL_MS = 500
HEARTBEAT_TIMEOUT_MS = 2000


class RequestTimeout(Exception):
    """No reply from the endpoint within the request's time."""


class SocketsBusy(RequestTimeout):
    """Every socket of the lane stayed in use for the request's time: it was never sent."""


class PeerGone(RequestTimeout):
    """No connection to the peer, or it dropped with the request out: no reply will come."""


class _NotConnected(PeerGone):
    """No connection yet: nothing was sent, and the socket may still connect."""


@dataclass
class PoolStats:
    sockets: int = 0
    reconnects: int = 0
    timeouts: int = 0
    requests: int = 0


class _Conn:
    """A DEALER socket and the monitor that reports its disconnects."""

    def __init__(self, sock: zmq.Socket[bytes]) -> None:
        self.sock = sock
        self.monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.poller = zmq.Poller()
        self.poller.register(sock, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)

    def forget_disconnects(self) -> None:
        """Drop events from before this request: a drop while idle lost nothing."""
        while self.monitor.poll(0):
            self.monitor.recv_multipart()

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=0)


class _Endpoint:
    def __init__(self) -> None:
        self.free: list[_Conn] = []
        self.open = 0
        self.timed_out = False  # a socket was dropped after a timeout: the next is a reconnect
        self.ready = threading.Condition()


class Pool:
    def __init__(self, context: zmq.Context[zmq.Socket[bytes]] | None = None,
                 max_per_endpoint: int = MAX_SOCKETS_PER_ENDPOINT) -> None:
        self.context = context or zmq.Context()
        self.max_per_endpoint = max_per_endpoint
        self.stats = PoolStats()
        self.keys: CurveKeys | None = None  # None: plain TCP (tests, a local run)
        self._endpoints: dict[tuple[str, str], _Endpoint] = {}
        self._lock = threading.Lock()

    def _endpoint(self, endpoint: str, lane: str) -> _Endpoint:
        with self._lock:
            return self._endpoints.setdefault((endpoint, lane), _Endpoint())

    def _open(self, endpoint: str, server: str | None) -> _Conn:
        sock = self.context.socket(zmq.DEALER)
        if self.keys is not None and server is not None:
            self.keys.make_client(sock, server)
        sock.setsockopt(zmq.LINGER, 0)
        # Only queue to a connected peer: a dead endpoint is noticed when sending, not later.
        sock.setsockopt(zmq.IMMEDIATE, 1)
        # A peer the LAN lost is noticed within 2 s (a ping every 0.5 s): the requests out to
        # it fail over then, instead of waiting out their attempt.
        sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        sock.connect(endpoint)
        return _Conn(sock)

    def _checkout(self, endpoint: str, slot: _Endpoint, deadline: float,
                  server: str | None) -> _Conn:
        with slot.ready:
            while not slot.free and slot.open >= self.max_per_endpoint:
                if not slot.ready.wait(max(deadline - time.monotonic(), 0)):
                    raise SocketsBusy(f"all {slot.open} sockets to {endpoint} are busy")
            if slot.free:
                return slot.free.pop()
            slot.open += 1
            reconnect, slot.timed_out = slot.timed_out, False
        self._count(sockets=1, reconnects=int(reconnect))
        return self._open(endpoint, server)

    def _checkin(self, slot: _Endpoint, conn: _Conn | None) -> None:
        with slot.ready:
            if conn is None:
                slot.open -= 1
                slot.timed_out = True
            else:
                slot.free.append(conn)
            slot.ready.notify()

    def request(self, endpoint: str, frames: list[bytes], timeout: float = 2.0,
                retries: int = 0, server: str | None = None, lane: str = "") -> list[bytes]:
        """Send frames to endpoint and return the reply frames (the empty delimiter removed).

        `server` names the host behind the endpoint (its group), whose CURVE key to expect;
        `lane` names whose sockets to use (at most max_per_endpoint of them)."""
        slot = self._endpoint(endpoint, lane)
        deadline = time.monotonic() + timeout * (retries + 1)
        gone = False
        for _ in range(retries + 1):
            conn = self._checkout(endpoint, slot, deadline, server)
            attempt_timeout = min(timeout, max(deadline - time.monotonic(), 0.0))
            try:
                reply = self._exchange(conn, frames, attempt_timeout)
            except _NotConnected:
                self._checkin(slot, conn)
                gone = True
                continue
            except PeerGone:
                reply, gone = None, True
            except zmq.ZMQError:
                reply = None
            if reply is not None:
                self._checkin(slot, conn)
                self._count(requests=1)
                return reply
            conn.close()
            self._checkin(slot, None)
            self._count(sockets=-1, timeouts=1)
        if gone:
            raise PeerGone(f"{endpoint} is not connected, or disconnected with the request out")
        raise RequestTimeout(f"no reply from {endpoint} after {retries + 1} attempt(s)")

    @staticmethod
    def _exchange(conn: _Conn, frames: list[bytes], timeout: float) -> list[bytes] | None:
        ms = int(timeout * 1000)
        conn.forget_disconnects()
        if not conn.sock.poll(int(min(timeout, CONNECT_WAIT_S) * 1000), zmq.POLLOUT):
            raise _NotConnected  # with IMMEDIATE, nothing was queued
        conn.sock.send_multipart([b"", *frames], zmq.NOBLOCK)
        ready = dict(conn.poller.poll(ms))
        if conn.sock in ready:
            reply = conn.sock.recv_multipart()
            return reply[1:] if reply and reply[0] == b"" else reply
        if conn.monitor in ready:
            raise PeerGone
        return None

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self.stats, name, getattr(self.stats, name) + delta)

    def close(self) -> None:
        """Close every idle socket; sockets in use are closed by their callers' timeouts."""
        with self._lock:
            endpoints = list(self._endpoints.values())
        for slot in endpoints:
            with slot.ready:
                idle, slot.free = slot.free, []
                slot.open -= len(idle)
            for conn in idle:
                conn.close()
            self._count(sockets=-len(idle))


_pool: Pool | None = None
_pool_pid = 0
_pool_lock = threading.Lock()


def get_pool() -> Pool:
    """The process's pool; a forked child gets its own (ZeroMQ contexts do not survive fork)."""
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():
            _pool, _pool_pid = Pool(), os.getpid()
        return _pool


def get_context() -> zmq.Context[zmq.Socket[bytes]]:
    return get_pool().context
