"""Stored state is acknowledged only once a connected replica has it (WAIT)."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from agentlink.durable import StateNotReplicated
from agentlink.host import RedisState
from agentlink.redis_server import RedisServer

from .conftest import eventually


@pytest.fixture
def primary_and_replica(tmp_path: Path) -> Iterator[tuple[redis.Redis, redis.Redis, int]]:
    """Two redis-servers, the second replicating the first; and the replica's pid."""
    servers = [RedisServer(tmp_path / name) for name in ("primary", "replica")]
    for server in servers:
        server.start()
    primary, replica = (redis.Redis(port=s.port, socket_timeout=0.5) for s in servers)
    replica.replicaof("127.0.0.1", servers[0].port)
    eventually(lambda: replica.info("replication")["master_link_status"] == "up",
               what="the replica in sync")
    assert servers[1].process is not None
    try:
        yield primary, replica, servers[1].process.pid
    finally:
        for server in servers:
            server.stop()


def test_a_write_is_on_the_replica_when_acknowledged(
        primary_and_replica: tuple[redis.Redis, redis.Redis, int]) -> None:
    primary, replica, _ = primary_and_replica
    state = RedisState(primary, "Memory")
    for n in range(20):
        state.put(f"k{n}", n)
        # No polling: WAIT returned only after the replica had it.
        assert replica.hget("agentlink:state:Memory", f"k{n}") == str(n).encode()


def test_a_write_no_replica_confirms_is_not_acknowledged(
        primary_and_replica: tuple[redis.Redis, redis.Redis, int]) -> None:
    primary, _, replica_pid = primary_and_replica
    state = RedisState(primary, "Memory", replica_wait_ms=100, outage_s=1)
    state.put("before", 1)
    # The replica stays connected but is frozen: it acknowledges nothing.
    os.kill(replica_pid, signal.SIGSTOP)
    try:
        with pytest.raises(StateNotReplicated, match="no replica confirmed"):
            state.put("during", 2)
    finally:
        os.kill(replica_pid, signal.SIGCONT)
    state.put("after", 3)  # acknowledged again once the replica is back


def test_a_lone_primary_still_acknowledges(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "alone")
    server.start()
    try:
        client = redis.Redis(port=server.port, socket_timeout=0.5)
        state = RedisState(client, "Memory")
        state.put("k", {"v": 1})
        assert state.get("k") == {"v": 1}
    finally:
        server.stop()


def test_a_write_during_a_redis_restart_is_acknowledged_and_kept(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "restarting")
    server.start()
    try:
        client = redis.Redis(port=server.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        state = RedisState(client, "Memory")
        server.stop()
        restarter = threading.Timer(0.5, server.start)
        restarter.start()
        state.put("written-while-down", 42)  # waits for the restart instead of failing
        restarter.join()
        server.restart()  # and it was fsynced before the acknowledgement
        assert state.get("written-while-down") == 42
    finally:
        server.stop()
