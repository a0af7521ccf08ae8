"""Stored state is acknowledged only once a connected replica has it (WAIT)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import yaml

from agentlink.devtools.redis_server import RedisServer
from agentlink.devtools.testing import free_ports
from agentlink.runtime.durable import (
    Durable,
    NoQuorum,
    PrimaryMoved,
    StateNotReplicated,
    _GroupCommit,
)
from agentlink.runtime.host.state import RedisState
from agentlink.runtime.registry import redis_client
from agentlink.runtime.workflow.engine import _SAVE, ended_key, owned_key, record_key

from .conftest import ROOT, eventually


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
    state.put("first", 0)  # a replica seen: from now on each write waits for it
    infos = primary.info("commandstats")["cmdstat_info"]["calls"]
    for n in range(20):
        state.put(f"k{n}", n)
        # No polling: WAIT returned only after the replica had it.
        assert replica.hget("agentlink:state:Memory", f"k{n}") == str(n).encode()
    # A WAIT the replica answered is the acknowledgement: no INFO asked beside it.
    assert primary.info("commandstats")["cmdstat_info"]["calls"] == infos + 1  # this one


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


def deployed_acl(password: str) -> list[str]:
    """The redis role's ACL lines for the default user and the agents' user."""
    role = ROOT / "roles" / "redis"
    config = (role / "templates" / "redis.conf.j2").read_text().splitlines()
    users = yaml.safe_load((role / "vars" / "main.yml").read_text())["_redis_users"]
    agents = next(user["rules"] for user in users if user["name"] == "agents")
    return [*(line for line in config if line.startswith("user default ")),
            f"user agents on >{password} {agents}"]


def test_a_script_s_writes_survive_a_restart_under_the_deployed_acl(tmp_path: Path) -> None:
    """A script's writes go to the append-only file as one MULTI/EXEC. Redis 7.0 replays it
    as the default user and checks that user's permissions again at EXEC: with the
    default user disabled and allowed nothing, every such write was dropped at restart."""
    server = RedisServer(tmp_path / "acl", config=deployed_acl("agents-secret"))
    server.start()
    try:
        client = redis.Redis(port=server.port, username="agents", password="agents-secret",
                             socket_timeout=0.5)
        record, owned, ended = record_key("w1"), owned_key("c1"), ended_key("w1")
        client.sadd(owned, "w1")
        # The engine's last write of a workflow: the record, out of the owner's set, ended.
        assert client.eval(_SAVE, 3, record, owned, ended, '{"state": "succeeded"}', "w1",
                           "succeeded", 60_000) == 1
        server.restart()
        assert client.get(record) == b'{"state": "succeeded"}'
        assert client.lrange(ended, 0, -1) == [b"succeeded"]
        assert client.smembers(owned) == set()
        for anyone in ({}, {"username": "default", "password": "guess"}):
            with pytest.raises(redis.AuthenticationError):  # still no way in without a user
                redis.Redis(port=server.port, **anyone).get(record)  # type: ignore[arg-type]
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


@pytest.fixture
def start_sentinel(tmp_path: Path) -> Iterator[Callable[[int, int], str]]:
    """A factory: a real Sentinel that watches the Redis on the port given, with the quorum
    given (of one Sentinel: 1 is a majority, 2 cannot be reached); its address."""
    sentinels: list[subprocess.Popen[bytes]] = []

    def start(redis_port: int, quorum: int) -> str:
        port = free_ports(1)[0]
        conf = tmp_path / f"sentinel-{port}.conf"
        conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
                        f"sentinel monitor agentlink 127.0.0.1 {redis_port} {quorum}\n")
        sentinels.append(subprocess.Popen(["redis-server", str(conf), "--sentinel"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        probe = redis.Redis(port=port, socket_connect_timeout=0.2)

        def answers() -> bool:
            try:
                return bool(probe.ping())
            except redis.ConnectionError:
                return False

        eventually(answers, what="the Sentinel")
        return f"127.0.0.1:{port}"

    try:
        yield start
    finally:
        for sentinel in sentinels:
            sentinel.terminate()
            sentinel.wait(10)


@pytest.fixture
def primary_with_sentinel(tmp_path: Path, start_sentinel: Callable[[int, int], str]
                          ) -> Iterator[Callable[[int], redis.Redis]]:
    """A lone primary, and a factory: a client of it through one real Sentinel that watches
    it with the quorum given."""
    server = RedisServer(tmp_path / "primary")
    server.start()
    try:
        yield lambda quorum: redis_client({"sentinels": [start_sentinel(server.port, quorum)],
                                           "service": "agentlink"})
    finally:
        server.stop()


def test_a_lone_primary_confirmed_by_a_sentinel_majority_acknowledges(
        primary_with_sentinel: Callable[[int], redis.Redis]) -> None:
    state = RedisState(primary_with_sentinel(1), "Memory")
    state.put("k", 1)  # no replica, and the one Sentinel is a majority: safe alone
    assert state.get("k") == 1


def test_a_lone_primary_without_a_sentinel_majority_refuses_the_write(
        primary_with_sentinel: Callable[[int], redis.Redis]) -> None:
    """As a primary cut off from the LAN with its own Sentinel: the others may be electing
    its replica, and a write it took would be lost when it rejoins."""
    state = RedisState(primary_with_sentinel(2), "Memory", outage_s=10)
    with pytest.raises(NoQuorum, match="NOQUORUM"):
        state.put("k", 1)


def test_a_redis_that_is_no_longer_primary_answers_no_read(
        primary_and_replica: tuple[redis.Redis, redis.Redis, int]) -> None:
    """As a client still connected to a primary the Sentinels demoted: what that Redis
    holds may miss writes the new primary acknowledged, so it does not answer."""
    primary, replica, _ = primary_and_replica
    RedisState(primary, "Memory").put("k", 1)
    with pytest.raises(PrimaryMoved, match="a replica now"):
        RedisState(replica, "Memory", outage_s=0.5).get("k")


def test_a_primary_only_its_own_sentinel_names_is_left_for_the_majority_s(
        tmp_path: Path, start_sentinel: Callable[[int, int], str]) -> None:
    """As an old primary back on the LAN after a failover, before the Sentinels demote it:
    its own Sentinel (asked first) still names it, the two others name the new one. The
    write is acknowledged on the new primary, never on the old one alone."""
    old, new = RedisServer(tmp_path / "old"), RedisServer(tmp_path / "new")
    for server in (old, new):
        server.start()
    try:
        sentinels = [start_sentinel(old.port, 1), start_sentinel(new.port, 1),
                     start_sentinel(new.port, 1)]
        state = RedisState(redis_client({"sentinels": sentinels, "service": "agentlink"}),
                           "Memory")
        state.put("k", 1)
        assert redis.Redis(port=new.port).hget("agentlink:state:Memory", "k") == b"1"
        assert state.get("k") == 1
    finally:
        for server in (old, new):
            server.stop()


def test_a_group_commit_answers_each_caller_its_own_results_with_one_wait_per_batch(
        primary_and_replica: tuple[redis.Redis, redis.Redis, int]) -> None:
    """Sixteen threads writing at once through one group-commit Durable: each gets its own
    results, every write is on the replica when acknowledged, in fewer WAITs than writes."""
    primary, replica, _ = primary_and_replica
    durable = Durable(primary, group_commit=True)
    results: dict[int, list[list[object]]] = {}
    not_replicated: list[str] = []
    start = threading.Barrier(16)

    def writer(n: int) -> None:
        start.wait()
        for i in range(20):
            key = f"k{n}-{i}"
            answer = durable.write(lambda pipe, key=key, i=i: (pipe.set(key, i), pipe.get(key)))
            if replica.get(key) != str(i).encode():
                not_replicated.append(key)
            results.setdefault(n, []).append(answer)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not not_replicated, "acknowledged before the replica had it"
    expected = [[True, str(i).encode()] for i in range(20)]
    assert all(answers == expected for answers in results.values()), \
        "a caller got another's results"
    assert len(results) == 16
    waits = primary.info("commandstats")["cmdstat_wait"]["calls"]
    assert waits < 320, f"{waits} WAITs for 320 writes: nothing was batched"


def test_a_failed_batch_fails_each_of_its_callers_and_the_next_batch_is_sent() -> None:
    sent: list[int] = []

    class Pipe(list[str]):
        def set(self, key: str) -> None:
            self.append(key)

    def send(writes: Callable[[Pipe], None]) -> list[str]:
        pipe = Pipe()
        writes(pipe)
        sent.append(len(pipe))
        if len(sent) == 1:
            raise redis.ConnectionError("the primary went away")
        return [f"ok {key}" for key in pipe]

    commit = _GroupCommit(send)  # type: ignore[arg-type]
    with pytest.raises(redis.ConnectionError):
        commit.write(lambda pipe: pipe.set("a"))
    assert commit.write(lambda pipe: pipe.set("b")) == ["ok b"]
    assert sent == [1, 1]
