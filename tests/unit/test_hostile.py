"""Hostile input at a real agent host: malformed frames, wrong JSON, unknown names, oversized
messages, floods and odd HTTP all get an error reply or are dropped, and are counted; the
host keeps serving. A property-based test sends arbitrary frames."""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
from collections.abc import Iterator

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentlink import protocol
from agentlink.host import MAX_MESSAGE_BYTES, MAX_QUEUED_PER_WORKER, AgentHost
from agentlink.pool import Pool
from agentlink.testing import AgentSpec, host_config, wait_healthy

from .conftest import eventually

ECHO = "tests.unit.agents:Echo"
GATE = "tests.unit.agents:Gate"


@pytest.fixture(scope="module")
def host(redis_server: object) -> Iterator[AgentHost]:
    """One host for the module (hypothesis runs many cases against it)."""
    url = redis_server.url  # type: ignore[attr-defined]
    running = AgentHost(host_config("hostile", [AgentSpec("A", ECHO)], url))
    running.start()
    try:
        wait_healthy(running)
        yield running
    finally:
        running.stop()


@pytest.fixture
def dealer(host: AgentHost) -> Iterator[zmq.Socket[bytes]]:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 3000)
    sock.connect(f"tcp://127.0.0.1:{host.config.port}")
    yield sock
    sock.close()
    ctx.term()


def exchange(sock: zmq.Socket[bytes], frames: list[bytes]) -> dict[str, object]:
    sock.send_multipart([b"", *frames])
    return json.loads(sock.recv_multipart()[-1])


def serves(host: AgentHost) -> bool:
    pool = Pool()
    try:
        reply = pool.request(f"tcp://127.0.0.1:{host.config.port}",
                             protocol.encode_request("A", {"still": "here"}), timeout=5)
        return protocol.decode_reply(reply)["echo"] == {"still": "here"}
    finally:
        pool.close()
        pool.context.destroy(linger=0)


def counted(host: AgentHost, code: str) -> float:
    return sum(s.value for m in host.metrics.registry.collect()
               if m.name == "agentlink_request_errors" for s in m.samples
               if s.name.endswith("_total") and s.labels["code"] == code)


@pytest.mark.parametrize(("frames", "code"), [
    ([b"A"], protocol.BAD_REQUEST),
    ([b"A", b"{}", b"k", b"extra"], protocol.BAD_REQUEST),
    ([b"A", b"{not json"], protocol.BAD_REQUEST),
    ([b"A", b"\xff\xfe\x00"], protocol.BAD_REQUEST),
    ([b"A", b"[" * 100_000], protocol.BAD_REQUEST),
    ([b"\xff" * 5000, b"{}"], protocol.UNKNOWN_AGENT),
    ([b"NoSuchAgent", b"{}"], protocol.UNKNOWN_AGENT),
])
def test_each_bad_request_gets_an_error_reply_and_is_counted(
        host: AgentHost, dealer: zmq.Socket[bytes], frames: list[bytes], code: str) -> None:
    before = counted(host, code)
    reply = exchange(dealer, frames)
    assert reply["ok"] is False and reply["code"] == code
    assert len(str(reply["error"])) < 300  # a huge name is not echoed back whole
    assert counted(host, code) == before + 1
    assert serves(host)


def test_unknown_names_do_not_become_metric_labels(host: AgentHost,
                                                   dealer: zmq.Socket[bytes]) -> None:
    for n in range(20):
        exchange(dealer, [f"made-up-{n}".encode(), b"{}"])
    labels = {s.labels["agent"] for m in host.metrics.registry.collect()
              if m.name == "agentlink_request_errors" for s in m.samples}
    assert labels <= {"A", "?"}


def test_an_oversized_message_drops_its_sender_and_the_host_serves_others(
        host: AgentHost, dealer: zmq.Socket[bytes]) -> None:
    dealer.send_multipart([b"", b"A", b"x" * (MAX_MESSAGE_BYTES + 1)])
    with pytest.raises(zmq.Again):
        dealer.recv_multipart()  # no reply: the connection was dropped
    eventually(lambda: any(s.value for m in host.metrics.registry.collect()
                           if m.name == "agentlink_peer_events" for s in m.samples
                           if s.labels.get("event") == "disconnected"))
    assert serves(host)


def test_a_flood_beyond_the_queue_is_answered_overloaded(redis_url: str) -> None:
    """Every worker held at a gate, then more requests than the queue takes."""
    config = host_config("flood", [AgentSpec("G", GATE)], redis_url)
    config.workers = 1
    flooded = AgentHost(config)
    flooded.start()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    try:
        wait_healthy(flooded)
        sock.connect(f"tcp://127.0.0.1:{config.port}")
        bound = MAX_QUEUED_PER_WORKER * config.workers
        for _ in range(bound + 10):
            sock.send_multipart([b"", *protocol.encode_request("G", {})])
        codes = [json.loads(sock.recv_multipart()[-1]).get("code") for _ in range(10)]
        assert codes == [protocol.OVERLOADED] * 10
        flooded.slots["G"].agent.open()  # type: ignore[attr-defined]
        replies = [json.loads(sock.recv_multipart()[-1]) for _ in range(bound)]
        assert all(r["ok"] for r in replies)  # the queued ones all ran
    finally:
        flooded.slots["G"].agent.open()  # type: ignore[attr-defined]
        sock.close(linger=0)
        ctx.term()
        flooded.stop()


def http_status(host: AgentHost, method: str, path: str = "/health") -> int:
    conn = http.client.HTTPConnection("127.0.0.1", host.config.http_port, timeout=5)
    try:
        conn.request(method, path)
        return conn.getresponse().status
    finally:
        conn.close()


def test_http_is_read_only_and_bounded(host: AgentHost) -> None:
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        assert http_status(host, method) == 405
    assert http_status(host, "GET", "/" + "x" * 5000) == 414
    assert http_status(host, "GET") == 200


def test_idle_http_connections_beyond_the_bound_do_not_stop_the_host(host: AgentHost) -> None:
    idle = [http.client.HTTPConnection("127.0.0.1", host.config.http_port, timeout=5)
            for _ in range(40)]
    for conn in idle:
        conn.connect()  # connected, never sends: each holds a thread until its timeout
    try:
        assert serves(host)
    finally:
        for conn in idle:
            conn.close()
    eventually(lambda: http_status(host, "GET") == 200, timeout=15)


# --- properties -----------------------------------------------------------------------------

frame = st.one_of(st.binary(max_size=64), st.sampled_from([b"A", b"", b"{}", b"null", b"[]"]),
                  st.text(max_size=20).map(str.encode))


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=st.lists(st.lists(frame, min_size=1, max_size=6), min_size=1, max_size=5))
def test_arbitrary_frames_never_stop_the_host(host: AgentHost, dealer: zmq.Socket[bytes],
                                              messages: list[list[bytes]]) -> None:
    for frames in messages:
        dealer.send_multipart([b"", *frames])
    for _ in messages:  # every message is answered: an error or a result
        assert "ok" in json.loads(dealer.recv_multipart()[-1])
    assert all(t.is_alive() for t in host._threads)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=4))
def test_decoding_any_reply_gives_a_result_or_a_remote_error(frames: list[bytes]) -> None:
    with contextlib.suppress(protocol.RemoteError):  # anything else fails the test
        protocol.decode_reply(frames)


def test_a_host_thread_survives_what_it_cannot_handle(host: AgentHost,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in dispatch for one message is logged and counted, not the end of serving."""
    broken = threading.Event()

    def explode(frames: list[bytes]) -> None:
        broken.set()
        raise RuntimeError("boom")

    before = counted(host, protocol.INTERNAL)
    monkeypatch.setattr(host, "_dispatch", explode)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(f"tcp://127.0.0.1:{host.config.port}")
    sock.send_multipart([b"", b"A", b"{}"])
    eventually(broken.is_set)
    monkeypatch.undo()
    sock.close(linger=0)
    ctx.term()
    eventually(lambda: counted(host, protocol.INTERNAL) == before + 1)
    assert serves(host)
