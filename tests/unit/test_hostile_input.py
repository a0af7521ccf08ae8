"""Hostile input at a real agent host over raw DEALER sockets: every bad message is answered
with an error or dropped, counted in the host's /metrics, and the host serves on; floods are
answered `overloaded`; HTTP is read-only and bounded. Complements test_hostile.py."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import zmq
import zmq.utils.monitor
from hypothesis import example, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from agentlink.devtools.redis_server import RedisServer
from agentlink.devtools.testing import AgentSpec, host_config, run_group, wait_healthy
from agentlink.runtime import protocol
from agentlink.runtime.host import AgentHost
from agentlink.runtime.host.server import (
    MAX_MESSAGE_BYTES,
    MAX_NAME_ECHO,
    MAX_QUEUED_PER_WORKER,
    ROUTER_RCVHWM,
    harden_router,
)
from agentlink.runtime.host.web import MAX_HTTP_CONNECTIONS

from .conftest import eventually

AGENTS = [AgentSpec("A", "tests.unit.agents:Echo"), AgentSpec("S", "tests.unit.agents:Strict"),
          AgentSpec("Flaky", "tests.unit.agents:Flaky")]
NAMES = [a.name.encode() for a in AGENTS]


@pytest.fixture(scope="module")
def host(redis_server: RedisServer) -> Iterator[AgentHost]:
    """One host for the module: hypothesis sends hundreds of cases at it."""
    with run_group(AGENTS, redis_server.url, group="hostile-input") as running:
        yield running


@pytest.fixture(scope="module")
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield context
    context.destroy(linger=0)


@contextlib.contextmanager
def dealer(ctx: zmq.Context[zmq.Socket[bytes]], host: AgentHost) -> Iterator[zmq.Socket[bytes]]:
    """A fresh raw client: no reply meant for another test can reach it."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)  # a reply that never comes fails, never hangs
    sock.connect(f"tcp://127.0.0.1:{host.config.port}")
    try:
        yield sock
    finally:
        sock.close()


def ask(sock: zmq.Socket[bytes], frames: list[bytes]) -> dict[str, Any]:
    sock.send_multipart([b"", *frames])
    return json.loads(sock.recv_multipart()[-1])


def serves(ctx: zmq.Context[zmq.Socket[bytes]], host: AgentHost) -> bool:
    with dealer(ctx, host) as sock:
        return ask(sock, protocol.encode_request("A", "still here"))["result"]["echo"] == \
            "still here"


def http_request(host: AgentHost, method: str, path: str = "/health",
                 body: bytes | None = None) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", host.config.http_port, timeout=5)
    conn.request(method, path, body=body)
    response = conn.getresponse()
    response.read()
    conn.close()
    return response


def errors_counted(host: AgentHost, agent: str, code: str) -> float:
    """agentlink_request_errors_total{agent, code} as the host's /metrics page shows it."""
    conn = http.client.HTTPConnection("127.0.0.1", host.config.http_port, timeout=5)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return sum(s.value for family in text_string_to_metric_families(text)
               if family.name == "agentlink_request_errors" for s in family.samples
               if s.name.endswith("_total") and s.labels == {"agent": agent, "code": code})


# --- each kind of bad message ---------------------------------------------------------------

@pytest.mark.parametrize(("frames", "code", "agent"), [
    pytest.param([], protocol.BAD_REQUEST, "?", id="envelope-only"),
    pytest.param([b"A", b"{}", b"k", b"x", b"y"], protocol.BAD_REQUEST, "?", id="six-frames"),
    pytest.param([b"A", b"1" * 5000], protocol.BAD_REQUEST, "A", id="number-past-the-limit"),
    pytest.param([b"S", b"[]"], protocol.BAD_REQUEST, "S", id="json-the-agent-refuses"),
    pytest.param([b"S", b'{"n": "1"}'], protocol.BAD_REQUEST, "S", id="wrong-field-type"),
    pytest.param([b"Flaky", b"[]"], protocol.HANDLER_ERROR, "Flaky", id="json-the-agent-trips-on"),
    pytest.param([b"A", b"{}", b"\xff\xfe"], protocol.BAD_REQUEST, "A", id="non-utf8-key"),
    pytest.param([b"\xc3\x28", b"{}"], protocol.UNKNOWN_AGENT, "?", id="non-utf8-name"),
    pytest.param([b"N" * 100_000, b"{}"], protocol.UNKNOWN_AGENT, "?", id="huge-name"),
])
def test_a_bad_message_is_answered_counted_and_the_host_serves_on(
        ctx: zmq.Context[zmq.Socket[bytes]], host: AgentHost, frames: list[bytes], code: str,
        agent: str) -> None:
    before = errors_counted(host, agent, code)
    with dealer(ctx, host) as sock:
        reply = ask(sock, frames)
    assert reply["ok"] is False and reply["code"] == code
    assert len(reply["error"]) < MAX_NAME_ECHO + 100  # a huge name is not echoed whole
    assert errors_counted(host, agent, code) == before + 1
    assert serves(ctx, host)


def test_a_non_utf8_idempotency_key_claims_nothing(ctx: zmq.Context[zmq.Socket[bytes]],
                                                   host: AgentHost,
                                                   redis_server: RedisServer) -> None:
    """Read loosely, b"\\xff" and b"\\xfe" would both be "\\ufffd": one run for two keys."""
    store = redis.Redis.from_url(redis_server.url)
    with dealer(ctx, host) as sock:
        for key in (b"\xff", b"\xfe"):
            assert ask(sock, [b"A", b"{}", key])["code"] == protocol.BAD_REQUEST
        assert store.keys("agentlink:idempotency:A:*") == []
        assert ask(sock, [b"A", b'"once"', b"k-1"])["result"]["echo"] == "once"
        assert ask(sock, [b"A", b'"twice"', b"k-1"])["result"]["echo"] == "once"  # the first


def test_a_failure_while_answering_is_replied_and_frees_its_place(
        ctx: zmq.Context[zmq.Socket[bytes]], host: AgentHost,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug behind a worker still sends a reply: the in-flight count comes back to 0."""
    answer = host._answer

    def failing(slot: Any, body: bytes, key: bytes | None) -> bytes:
        if body == b'"fail"':
            raise RuntimeError("injected")
        return answer(slot, body, key)

    monkeypatch.setattr(host, "_answer", failing)
    before = errors_counted(host, "A", protocol.INTERNAL)
    with dealer(ctx, host) as sock:
        assert ask(sock, [b"A", b'"fail"'])["code"] == protocol.INTERNAL
    assert errors_counted(host, "A", protocol.INTERNAL) == before + 1
    eventually(lambda: host.inflight == 0, what="the failed request leaving the count")
    assert serves(ctx, host)


# --- size and flood bounds ------------------------------------------------------------------

def test_harden_router_bounds_size_and_queue(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    sock = ctx.socket(zmq.ROUTER)
    try:
        harden_router(sock)
        assert sock.getsockopt(zmq.MAXMSGSIZE) == MAX_MESSAGE_BYTES
        assert sock.getsockopt(zmq.RCVHWM) == ROUTER_RCVHWM
    finally:
        sock.close(linger=0)


def test_a_message_at_the_bound_is_served_one_past_it_drops_only_its_sender(
        ctx: zmq.Context[zmq.Socket[bytes]], host: AgentHost) -> None:
    at_bound = b'"' + b"x" * (MAX_MESSAGE_BYTES - 2) + b'"'
    with dealer(ctx, host) as sock:
        assert len(ask(sock, [b"A", at_bound])["result"]["echo"]) == MAX_MESSAGE_BYTES - 2
        events = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        events.setsockopt(zmq.RCVTIMEO, 5000)
        try:
            sock.send_multipart([b"", b"A", at_bound + b" "])
            event = zmq.utils.monitor.recv_monitor_message(events)
            assert event["event"] == zmq.EVENT_DISCONNECTED  # the host dropped this peer
        finally:
            sock.disable_monitor()
            events.close(linger=0)
        assert serves(ctx, host)  # others are served
        # and the dropped peer only lost its message: reconnected, it is served again
        assert ask(sock, protocol.encode_request("A", 1))["result"]["echo"] == 1


def test_a_flood_is_answered_overloaded_counted_and_the_queue_drains(
        ctx: zmq.Context[zmq.Socket[bytes]], redis_server: RedisServer) -> None:
    """Two workers held at a gate; the bound's worth is queued, the rest refused at once."""
    config = host_config("flood", [AgentSpec("G", "tests.unit.agents:Gate"), AGENTS[0]],
                         redis_server.url)
    config.workers = 2
    flooded = AgentHost(config)
    flooded.start()
    gate = flooded.slots["G"].agent
    bound, extra = MAX_QUEUED_PER_WORKER * config.workers, 20
    try:
        wait_healthy(flooded)
        with dealer(ctx, flooded) as sock:
            for n in range(bound + extra):
                sock.send_multipart([b"", *protocol.encode_request("G", n)])
            refused = [json.loads(sock.recv_multipart()[-1]) for _ in range(extra)]
            assert {r["code"] for r in refused} == {protocol.OVERLOADED}
            assert protocol.OVERLOADED in protocol.RETRYABLE  # a client tries elsewhere
            assert errors_counted(flooded, "G", protocol.OVERLOADED) == extra
            assert flooded.inflight == bound  # queued, never more
            gate.open()  # type: ignore[attr-defined]
            ran = [json.loads(sock.recv_multipart()[-1]) for _ in range(bound)]
            assert all(r["ok"] for r in ran)
        eventually(lambda: flooded.inflight == 0, what="the queue draining")
        assert serves(ctx, flooded)
    finally:
        gate.open()  # type: ignore[attr-defined]
        flooded.stop()


# --- HTTP -----------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"])
def test_http_refuses_every_method_that_could_change_anything(host: AgentHost,
                                                              method: str) -> None:
    response = http_request(host, method, body=b'{"state": "healthy"}')
    assert response.status == 405
    assert response.getheader("Allow") == "GET, HEAD"


def test_http_answers_get_and_head_and_bounds_the_path(host: AgentHost) -> None:
    head = http_request(host, "HEAD")
    assert head.status == 200 and int(head.getheader("Content-Length", "0")) > 0
    assert http_request(host, "GET", "/" + "x" * 2000).status == 414
    assert http_request(host, "HEAD", "/health/" + "x" * 2000).status == 414
    assert http_request(host, "BREW").status == 501  # a made-up method: not implemented
    assert http_request(host, "GET").status == 200


def test_http_refuses_connections_beyond_the_bound_then_recovers(host: AgentHost) -> None:
    address = ("127.0.0.1", host.config.http_port)
    idle = [socket.create_connection(address, timeout=5) for _ in range(MAX_HTTP_CONNECTIONS)]
    try:
        with socket.create_connection(address, timeout=5) as extra:
            extra.sendall(b"GET /health HTTP/1.0\r\n\r\n")
            try:
                answer = extra.recv(64)
            except ConnectionResetError:
                answer = b""
            assert answer == b""  # closed unanswered: every handler thread is taken
    finally:
        for sock in idle:
            sock.close()
    eventually(lambda: http_request(host, "GET").status == 200, what="HTTP served again")


# --- properties -----------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=3),
    max_leaves=8)
json_frames = json_values.map(lambda v: json.dumps(v).encode())
reply_frames = st.fixed_dictionaries(
    {"ok": json_values}, optional={"code": json_values, "error": json_values,
                                   "result": json_values}).map(lambda d: json.dumps(d).encode())
nested = st.integers(1, 100_000).map(lambda depth: b"[" * depth + b"]" * (depth % 3))
frames_at_host = st.lists(st.one_of(st.sampled_from(NAMES), json_frames, st.binary(max_size=32),
                                    st.text(max_size=12).map(str.encode)), max_size=6)


@settings(max_examples=300, deadline=None)
@given(frames=frames_at_host)
def test_any_frames_are_answered_and_the_host_serves_on(ctx: zmq.Context[zmq.Socket[bytes]],
                                                        host: AgentHost,
                                                        frames: list[bytes]) -> None:
    with dealer(ctx, host) as sock:
        sock.send_multipart([b"", *frames])
        sock.send_multipart([b"", *protocol.encode_request("A", "valid")])
        replies = [json.loads(sock.recv_multipart()[-1]) for _ in range(2)]  # in any order
    assert all("ok" in r for r in replies)
    assert {"ok": True, "result": {"echo": "valid", "by": "A-1"}} in replies


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=40), json_frames, reply_frames, nested),
                max_size=6))
@example([b"[" * 100_000])
@example([b'{"ok": false, "code": ' + b"[" * 500 + b"]" * 500 + b"}"])
def test_decoding_any_frames_gives_a_result_or_a_remote_error(frames: list[bytes]) -> None:
    with contextlib.suppress(protocol.RemoteError):  # anything else raised fails the test
        protocol.decode_reply(frames)


def test_made_up_agent_names_never_become_metric_labels(
        ctx: zmq.Context[zmq.Socket[bytes]], host: AgentHost) -> None:
    """Else a flood of names would grow the host's series, and its memory, without bound."""
    with dealer(ctx, host) as sock:
        for n in range(20):
            ask(sock, [f"made-up-{n}".encode(), b"{}"])
    labels = {s.labels["agent"] for m in host.metrics.registry.collect()
              if m.name == "agentlink_request_errors" for s in m.samples}
    assert labels <= {a.name for a in AGENTS} | {"?"}


def test_the_serving_thread_survives_a_message_it_cannot_handle(
        ctx: zmq.Context[zmq.Socket[bytes]], host: AgentHost,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in dispatch for one message is logged and counted, not the end of serving."""
    reached: list[bool] = []

    def explode(frames: list[bytes]) -> None:
        reached.append(True)
        raise RuntimeError("boom")

    before = errors_counted(host, "?", protocol.INTERNAL)
    monkeypatch.setattr(host, "_dispatch", explode)
    with dealer(ctx, host) as sock:
        sock.send_multipart([b"", b"A", b"{}"])
        eventually(lambda: bool(reached))
    monkeypatch.undo()
    eventually(lambda: errors_counted(host, "?", protocol.INTERNAL) == before + 1)
    assert serves(ctx, host)

