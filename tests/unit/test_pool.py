"""The pool: one context, sockets reused, Lazy Pirate retries, thread safety."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import zmq

from agentlink.devtools.testing import free_ports
from agentlink.runtime.pool import PeerGone, Pool, RequestTimeout, get_context, get_pool


class EchoRouter:
    """A real ROUTER peer in a thread; can be stopped and started again on its port.

    Requests for an agent in `hold` are kept unanswered, their bodies appended to `held`."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.context = zmq.Context()
        self.thread: threading.Thread | None = None
        self.stopping = threading.Event()
        self.hold: set[bytes] = set()
        self.held: list[bytes] = []

    def start(self) -> None:
        self.stopping.clear()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(5)

    def _serve(self, ready: threading.Event) -> None:
        sock = self.context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(f"tcp://127.0.0.1:{self.port}")
        ready.set()
        while not self.stopping.is_set():
            if sock.poll(20):
                ident, empty, *body = sock.recv_multipart()
                if body[0] in self.hold:
                    self.held.append(body[-1])
                else:
                    sock.send_multipart([ident, empty, b"re:" + body[-1]])
        sock.close(linger=0)

    def stop(self) -> None:
        self.stopping.set()
        if self.thread:
            self.thread.join(5)


@pytest.fixture
def peer() -> Iterator[EchoRouter]:
    router = EchoRouter(free_ports(1)[0])
    router.start()
    yield router
    router.stop()
    router.context.term()


@pytest.fixture
def pool() -> Iterator[Pool]:
    p = Pool(zmq.Context())
    yield p
    p.close()
    p.context.term()


def endpoint(peer: EchoRouter) -> str:
    return f"tcp://127.0.0.1:{peer.port}"


def test_request_and_reply(pool: Pool, peer: EchoRouter) -> None:
    assert pool.request(endpoint(peer), [b"agent", b"hello"]) == [b"re:hello"]


def test_one_socket_per_endpoint_reused(pool: Pool, peer: EchoRouter) -> None:
    for n in range(20):
        assert pool.request(endpoint(peer), [b"a", str(n).encode()]) == [f"re:{n}".encode()]
    assert pool.stats.sockets == 1
    assert pool.stats.requests == 20


def test_timeout_raises_and_is_counted(pool: Pool, peer: EchoRouter) -> None:
    peer.hold.add(b"a")  # connected, never answered
    with pytest.raises(RequestTimeout):
        pool.request(endpoint(peer), [b"a", b"x"], timeout=0.2, retries=1)
    assert pool.stats.timeouts == 2
    assert pool.stats.reconnects == 1  # the retry ran on a fresh socket
    assert pool.stats.sockets == 0  # a timed-out socket is closed, not kept


def test_reconnects_after_the_peer_restarts(pool: Pool, peer: EchoRouter) -> None:
    assert pool.request(endpoint(peer), [b"a", b"1"]) == [b"re:1"]
    peer.stop()
    with pytest.raises(RequestTimeout):
        pool.request(endpoint(peer), [b"a", b"2"], timeout=0.3)
    peer.start()
    assert pool.request(endpoint(peer), [b"a", b"3"], timeout=2.0, retries=2) == [b"re:3"]


def test_a_peer_that_is_down_is_left_at_once_for_another(pool: Pool) -> None:
    dead = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    with pytest.raises(PeerGone, match="is not connected"):
        pool.request(dead, [b"a", b"x"], timeout=60)  # not 60 s: CONNECT_WAIT_S


def test_a_socket_still_connecting_is_kept_for_the_next_request(pool: Pool) -> None:
    """Nothing was sent on it: a handshake slower than CONNECT_WAIT_S (a loaded machine)
    finishes on it later, where a fresh socket each time would start over."""
    router = EchoRouter(free_ports(1)[0])
    with pytest.raises(PeerGone, match="is not connected"):
        pool.request(endpoint(router), [b"a", b"1"], timeout=60)
    assert (pool.stats.sockets, pool.stats.timeouts) == (1, 0)
    router.start()
    try:
        assert pool.request(endpoint(router), [b"a", b"2"], timeout=2.0) == [b"re:2"]
        assert (pool.stats.sockets, pool.stats.reconnects) == (1, 0)  # the same socket
    finally:
        router.stop()
        router.context.term()


def test_a_peer_that_dies_with_the_request_out_fails_it_at_once(pool: Pool) -> None:
    """A crashed peer's reply never comes: the request must not wait out its 60 s."""
    port = free_ports(1)[0]
    context = zmq.Context()
    silent = context.socket(zmq.ROUTER)  # takes requests, never answers
    silent.bind(f"tcp://127.0.0.1:{port}")
    received = threading.Event()

    def crash_once_received() -> None:
        if silent.poll(10_000):
            received.set()
            silent.close(linger=0)  # the connection drops, as when the process dies

    crash = threading.Thread(target=crash_once_received)
    crash.start()
    with pytest.raises(PeerGone, match="disconnected with the request out"):
        pool.request(f"tcp://127.0.0.1:{port}", [b"a", b"lost"], timeout=60)
    crash.join()
    context.term()
    assert received.is_set()
    assert pool.stats.sockets == 0  # the socket of the lost request is closed


def test_concurrent_threads_each_get_their_own_reply(pool: Pool, peer: EchoRouter) -> None:
    results: dict[int, list[bytes]] = {}
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for k in range(25):
                body = f"{n}-{k}".encode()
                reply = pool.request(endpoint(peer), [b"a", body], timeout=5.0)
                results.setdefault(n, []).append(reply[0])
                assert reply == [b"re:" + body]
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert sum(len(v) for v in results.values()) == 8 * 25
    assert 1 <= pool.stats.sockets <= 8  # reused, at most one per concurrent caller


def test_an_agent_whose_requests_hang_leaves_sockets_for_the_others(
        pool: Pool, peer: EchoRouter) -> None:
    """One host serves several agents on one endpoint: requests of one agent that hang
    (writes waiting out a partition) take that agent's lane, never a quick agent's."""
    peer.hold.add(b"stuck")
    lanes = Pool(pool.context, max_per_endpoint=2)
    failures: list[RequestTimeout] = []

    def hang() -> None:
        try:
            lanes.request(endpoint(peer), [b"stuck", b"w"], timeout=4.0, lane="stuck")
        except RequestTimeout as err:
            failures.append(err)

    hanging = [threading.Thread(target=hang) for _ in range(2)]
    try:
        for t in hanging:
            t.start()
        deadline = time.monotonic() + 5
        while len(peer.held) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(peer.held) == 2  # every socket of the stuck lane is out
        assert lanes.request(endpoint(peer), [b"quick", b"q"], timeout=1.0,
                             lane="quick") == [b"re:q"]
    finally:
        for t in hanging:
            t.join(10)
        lanes.close()
    # Both were sent and went unanswered: timed out, not refused for want of a socket.
    assert [type(err) for err in failures] == [RequestTimeout, RequestTimeout]


def test_the_process_has_one_context() -> None:
    assert get_pool() is get_pool()
    assert get_context() is get_pool().context
