"""Acknowledged writes to Redis: what agent state, workflow records and idempotent replies
are written with.

A write is acknowledged once it is fsynced on the primary (appendfsync always) and, when a
replica is connected, confirmed by it (WAIT): so it survives the primary's loss and the
Sentinels' failover. With no replica connected, the fsynced copy alone is the guarantee (it
survives a restart of that Redis), but only while no failover can happen behind this
primary's back: a Sentinel that this client reaches must see a majority of the Sentinels
(CKQUORUM), and a majority of the Sentinels must name this primary. A primary cut off from
the LAN with its own Sentinel gets neither, while the majority elects its replica, so a
write it took would be lost when it rejoins as a replica: such a write is refused
(NoQuorum), never acknowledged. Back on the LAN, the old primary stays a primary for 8 s or
more before the Sentinels demote it, and its own Sentinel may name it a little longer: the
majority's answer sends writes and reads to the new primary (PrimaryMoved, retried there).
A read is answered only by a primary that would acknowledge a write, so an acknowledged
write is never read back missing from a demoted or stale Redis. Reads and writes ride out
a failover or a restart (seconds) instead of failing.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import redis

from agentlink.runtime.registry import REDIS_ERRORS, as_text

# Writes (or a read) as one pipeline: WAIT counts the writes of its own connection.
Writes = Callable[[Any], Any]
Reads = Callable[[Any], Any]


class StateNotReplicated(RuntimeError):
    """A replica is connected but did not confirm the write in time: not acknowledged."""


class NoQuorum(StateNotReplicated):
    """No replica, and no Sentinel that sees a majority names this primary: a failover may
    be under way elsewhere, so the write is not acknowledged."""


class PrimaryMoved(StateNotReplicated):
    """This Redis is no longer the primary the Sentinels' majority names (a failover while it
    was cut off, or it is a replica now): not acknowledged here, tried again on theirs."""


# What a durable read or write raises once the outage outlasts its patience.
DURABLE_ERRORS = (*REDIS_ERRORS, redis.ReadOnlyError, StateNotReplicated)


# How long a replica may take to confirm a write, and how long an outage is ridden out (a
# failover, with one failed Sentinel election retried after 8 s, fits in it).
REPLICA_WAIT_MS = 300
OUTAGE_S = 15.0
# How long a primary without a Sentinel majority is given: a restarted Sentinel meets the
# others within a few seconds; one cut off from the LAN does not, and its callers should
# hear so long before an outage's patience is out.
NO_QUORUM_S = 3.0


class _Pending:
    """One caller's writes in a group commit, and what became of them."""

    def __init__(self, writes: Writes) -> None:
        self.writes = writes
        self.commands = 0
        self.results: list[Any] = []
        self.error: Exception | None = None
        self.leads = False  # promoted: it sends the next batch itself
        self.done = threading.Event()

    def queue(self, pipe: Any) -> None:
        before = len(pipe)
        self.writes(pipe)
        self.commands = len(pipe) - before

    def outcome(self) -> list[Any]:
        if self.error is not None:
            raise self.error
        return self.results


class _GroupCommit:
    """Writes of concurrent callers on one pipeline, acknowledged together: one WAIT for the
    batch instead of one for each write, and what is acknowledged is the same (WAIT
    counts every write of its connection before it). The first caller to find no batch in
    flight sends one; whoever queues meanwhile waits, and the first of them sends the next
    batch, theirs, as soon as this one is answered: nobody sends for others for long."""

    def __init__(self, send: Callable[[Writes], list[Any]]) -> None:
        self._send = send
        self._lock = threading.Lock()
        self._queue: list[_Pending] = []
        self._sending = False

    def write(self, writes: Writes) -> list[Any]:
        mine = _Pending(writes)
        with self._lock:
            self._queue.append(mine)
            mine.leads = not self._sending
            self._sending = True
        if not mine.leads:
            mine.done.wait()
        if mine.leads:
            self._send_batch()
        return mine.outcome()

    def _send_batch(self) -> None:
        with self._lock:
            batch, self._queue = self._queue, []
        def queue_all(pipe: Any) -> None:
            for pending in batch:
                pending.queue(pipe)

        try:  # a batch is answered, or fails, as one: then each caller retries its own
            results = self._send(queue_all)
            for pending in batch:
                pending.results, results = results[:pending.commands], results[pending.commands:]
        except Exception as err:  # the batch is not acknowledged: each caller hears why
            for pending in batch:
                pending.error = err
        with self._lock:
            if self._queue:
                self._queue[0].leads = True
                self._queue[0].done.set()
            else:
                self._sending = False
        for pending in batch:
            pending.leads = False
            pending.done.set()


class Durable:
    def __init__(self, client: redis.Redis, replica_wait_ms: int = REPLICA_WAIT_MS,
                 outage_s: float = OUTAGE_S, group_commit: bool = False) -> None:
        """`group_commit`: concurrent writes share one pipeline and one acknowledgement
        (_GroupCommit), for a writer with many threads such as the workflow engine."""
        self.client = client
        self.outage_s = outage_s
        self._commit = _GroupCommit(self._replicated) if group_commit else None
        # Below the client's socket timeout (0.5 s), so a slow replica is an answer, not a
        # broken connection.
        self.replica_wait_ms = replica_wait_ms
        self._replica_seen = False

    def retrying(self, operation: Callable[[], Any]) -> Any:
        """Ride out a failover, a Redis restart or a replica that just vanished (seconds)
        instead of failing: through Sentinel, each retry asks again who the primary is, and
        the primary drops a dead replica after repl-timeout (5 s in the lab's redis.conf).
        Operations given here must be idempotent."""
        deadline = time.monotonic() + self.outage_s
        delay = 0.05
        no_quorum_since = None
        while True:
            try:
                return operation()
            except NoQuorum:
                no_quorum_since = no_quorum_since or time.monotonic()
                if time.monotonic() - no_quorum_since > NO_QUORUM_S or \
                        time.monotonic() + delay > deadline:
                    raise
            except DURABLE_ERRORS:
                no_quorum_since = None
                if time.monotonic() + delay > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def write(self, writes: Writes) -> list[Any]:
        """Queue `writes` on a pipeline and return their results once acknowledged."""
        commit = self._replicated if self._commit is None else self._commit.write
        return list(self.retrying(lambda: commit(writes)))

    def read(self, reads: Reads) -> Any:
        """The result of the one read `reads` queues, from a primary that would acknowledge
        a write: a demoted primary (a replica now) or a lone one without a Sentinel
        majority may miss acknowledged writes, so it does not answer."""
        return self.retrying(lambda: self._from_primary(reads))

    def _from_primary(self, reads: Reads) -> Any:
        pipe = self.client.pipeline(transaction=False)
        reads(pipe)
        pipe.info("replication")
        value, replication = pipe.execute()
        if replication.get("role") != "master":
            self.client.connection_pool.disconnect(inuse_connections=False)
            raise PrimaryMoved("this Redis is a replica now: read again from the primary")
        if not replication.get("connected_slaves"):
            self._check_quorum()
        return value

    def _replicated(self, writes: Writes, wait: bool | None = None) -> list[Any]:
        """Write, and when a replica is connected, wait for it to confirm. WAIT blocks for
        its whole timeout when no replica is there, so it is only sent when one was seen;
        a replica seen for the first time gets the (idempotent) writes again, with WAIT.
        A WAIT that a replica answered needs nothing more; INFO, which says whether one is
        connected, is asked when none was seen or none confirmed."""
        wait = self._replica_seen if wait is None else wait
        pipe = self.client.pipeline(transaction=False)
        writes(pipe)
        if wait:
            pipe.wait(1, self.replica_wait_ms)
        else:
            pipe.info("replication")
        results = pipe.execute()
        own, answer = results[:-1], results[-1]
        if wait and answer >= 1:
            return own
        replication = self.client.info("replication") if wait else answer
        self._replica_seen = replication.get("connected_slaves", 0) > 0
        if not self._replica_seen:
            self._check_quorum()
            return own
        if not wait:
            return self._replicated(writes, wait=True)
        # A replica that stopped confirming may be behind a partition: if this primary has
        # no Sentinel majority either, say so now instead of when it drops the replica
        # (repl-timeout, seconds later).
        self._check_quorum()
        raise StateNotReplicated(
            f"no replica confirmed the write within {self.replica_wait_ms} ms")

    def _check_quorum(self) -> None:
        """Return when a majority of the Sentinels name the primary this client writes to,
        each seeing a majority of the Sentinels (CKQUORUM); raise PrimaryMoved when such a
        majority names another one, NoQuorum otherwise. A plain Redis (no Sentinels: a
        local run) has nothing to fail over to."""
        pool: Any = self.client.connection_pool  # a SentinelConnectionPool, or not
        manager = getattr(pool, "sentinel_manager", None)
        if manager is None:
            return
        sentinels = list(manager.sentinels)
        majority = len(sentinels) // 2 + 1
        primary = _address(pool.master_address)
        named: dict[int, tuple[str, int] | None] = {}  # id(sentinel) -> its primary
        votes: Counter[tuple[str, int] | None] = Counter()
        said: list[str] = []
        for sentinel in sentinels:
            try:
                sentinel.execute_command("SENTINEL", "CKQUORUM", pool.service_name)
                named[id(sentinel)] = _address(
                    sentinel.sentinel_get_master_addr_by_name(pool.service_name))
            except redis.ResponseError as err:  # NOQUORUM: it sees no majority
                said.append(str(err))
                continue
            except REDIS_ERRORS:
                said.append("a Sentinel does not answer")
                continue
            votes[named[id(sentinel)]] += 1
            if primary is None or votes[primary] >= majority:
                _rank(manager, named, primary)
                return
        elsewhere, count = votes.most_common(1)[0] if votes else (None, 0)
        _rank(manager, named, elsewhere)
        if count >= majority:
            # The pool finds the primary when it connects: through a Sentinel of the majority.
            pool.disconnect(inuse_connections=False)
            raise PrimaryMoved(f"a majority of the Sentinels names {elsewhere}, not {primary}")
        said += [f"{n} name {where}" for where, n in votes.items()]
        raise NoQuorum("no replica and no Sentinel majority for this primary: the write is not "
                       f"acknowledged ({'; '.join(said)})")


def _rank(manager: Any, named: dict[int, tuple[str, int] | None],
          primary: tuple[str, int] | None) -> None:
    """Sentinels that name `primary` first, then the others that answered, the silent
    last: redis-py asks them in order when it looks up the primary, and a Sentinel cut off
    costs its whole connect timeout. A new list, as lookups iterate the old one."""
    def rank(sentinel: Any) -> int:
        if id(sentinel) not in named:
            return 2
        return 0 if named[id(sentinel)] == primary else 1
    manager.sentinels = sorted(manager.sentinels, key=rank)


def _address(pair: Any) -> tuple[str, int] | None:
    """(host, port) as a Sentinel or a pool gives it, bytes or text."""
    if not pair:
        return None
    host, port = pair
    return as_text(host), int(port)
