"""The process's one ZeroMQ context and its pooled client sockets.

DEALER sockets are kept per remote endpoint and reused: a caller checks one out, uses it for
one request and returns it. Sequential callers share one socket per endpoint; concurrent
callers (a handler calling an agent of its own host, say) get another, up to a bound, so
nested calls never wait on each other. A request that times out closes its socket with
LINGER 0 and retries on a fresh one (the Lazy Pirate pattern), so a stale reply can never be
read as the answer to a later request.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import zmq

MAX_SOCKETS_PER_ENDPOINT = 16


class RequestTimeout(Exception):
    """No reply from the endpoint within the request's time."""


@dataclass
class PoolStats:
    sockets: int = 0
    reconnects: int = 0
    timeouts: int = 0
    requests: int = 0


class _Endpoint:
    def __init__(self) -> None:
        self.free: list[zmq.Socket[bytes]] = []
        self.open = 0
        self.timed_out = False  # a socket was dropped after a timeout: the next is a reconnect
        self.ready = threading.Condition()


class Pool:
    def __init__(self, context: zmq.Context[zmq.Socket[bytes]] | None = None,
                 max_per_endpoint: int = MAX_SOCKETS_PER_ENDPOINT) -> None:
        self.context = context or zmq.Context()
        self.max_per_endpoint = max_per_endpoint
        self.stats = PoolStats()
        self._endpoints: dict[str, _Endpoint] = {}
        self._lock = threading.Lock()

    def _endpoint(self, endpoint: str) -> _Endpoint:
        with self._lock:
            return self._endpoints.setdefault(endpoint, _Endpoint())

    def _open(self, endpoint: str) -> zmq.Socket[bytes]:
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        # Only queue to a connected peer: a dead endpoint is noticed when sending, not later.
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
        sock.connect(endpoint)
        return sock

    def _checkout(self, endpoint: str, slot: _Endpoint, deadline: float) -> zmq.Socket[bytes]:
        with slot.ready:
            while not slot.free and slot.open >= self.max_per_endpoint:
                if not slot.ready.wait(max(deadline - time.monotonic(), 0)):
                    raise RequestTimeout(f"all {slot.open} sockets to {endpoint} are busy")
            if slot.free:
                return slot.free.pop()
            slot.open += 1
            reconnect, slot.timed_out = slot.timed_out, False
        self._count(sockets=1, reconnects=int(reconnect))
        return self._open(endpoint)

    def _checkin(self, slot: _Endpoint, sock: zmq.Socket[bytes] | None) -> None:
        with slot.ready:
            if sock is None:
                slot.open -= 1
                slot.timed_out = True
            else:
                slot.free.append(sock)
            slot.ready.notify()

    def request(self, endpoint: str, frames: list[bytes], timeout: float = 2.0,
                retries: int = 0) -> list[bytes]:
        """Send frames to endpoint and return the reply frames (the empty delimiter removed)."""
        slot = self._endpoint(endpoint)
        deadline = time.monotonic() + timeout * (retries + 1)
        for _ in range(retries + 1):
            sock = self._checkout(endpoint, slot, deadline)
            attempt_timeout = min(timeout, max(deadline - time.monotonic(), 0.0))
            try:
                reply = self._exchange(sock, frames, attempt_timeout)
            except zmq.ZMQError:
                reply = None
            if reply is not None:
                self._checkin(slot, sock)
                self._count(requests=1)
                return reply
            sock.close(linger=0)
            self._checkin(slot, None)
            self._count(sockets=-1, timeouts=1)
        raise RequestTimeout(f"no reply from {endpoint} after {retries + 1} attempt(s)")

    @staticmethod
    def _exchange(sock: zmq.Socket[bytes], frames: list[bytes],
                  timeout: float) -> list[bytes] | None:
        ms = int(timeout * 1000)
        if not sock.poll(ms, zmq.POLLOUT):
            return None
        sock.send_multipart([b"", *frames], zmq.NOBLOCK)
        if not sock.poll(ms, zmq.POLLIN):
            return None
        reply = sock.recv_multipart()
        return reply[1:] if reply and reply[0] == b"" else reply

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
            for sock in idle:
                sock.close(linger=0)
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
