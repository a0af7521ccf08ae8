"""Acknowledged writes to Redis: what agent state, workflow records and idempotent replies
are written with.

A write is acknowledged once it is fsynced on the primary (appendfsync always) and, when a
replica is connected, confirmed by it (WAIT): so it survives the primary's loss and the
Sentinels' failover. With no replica connected there is nothing to fail over to, and the
fsynced copy alone is the guarantee (it survives a restart of that Redis). Reads and writes
ride out a failover or a restart (seconds) instead of failing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import redis

from agentlink.registry import REDIS_ERRORS

# Writes as one pipeline: WAIT counts the writes of its own connection.
Writes = Callable[[Any], Any]


class StateNotReplicated(RuntimeError):
    """A replica is connected but did not confirm the write in time: not acknowledged."""


# What a durable read or write raises once the outage outlasts its patience.
DURABLE_ERRORS = (*REDIS_ERRORS, redis.ReadOnlyError, StateNotReplicated)


# How long a replica may take to confirm a write, and how long an outage is ridden out (a
# failover, with one failed Sentinel election retried after 8 s, fits in it).
REPLICA_WAIT_MS = 300
OUTAGE_S = 15.0


class Durable:
    def __init__(self, client: redis.Redis, replica_wait_ms: int = REPLICA_WAIT_MS,
                 outage_s: float = OUTAGE_S) -> None:
        self.client = client
        self.outage_s = outage_s
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
        while True:
            try:
                return operation()
            except DURABLE_ERRORS:
                if time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.5)

    def write(self, writes: Writes) -> list[Any]:
        """Queue `writes` on a pipeline and return their results once acknowledged."""
        return list(self.retrying(lambda: self._replicated(writes)))

    def _replicated(self, writes: Writes, wait: bool | None = None) -> list[Any]:
        """Write, and when a replica is connected, wait for it to confirm. WAIT blocks for
        its whole timeout when no replica is there, so it is only sent when one was seen;
        a replica seen for the first time gets the (idempotent) writes again, with WAIT."""
        wait = self._replica_seen if wait is None else wait
        pipe = self.client.pipeline(transaction=False)
        writes(pipe)
        if wait:
            pipe.wait(1, self.replica_wait_ms)
        pipe.info("replication")
        results = pipe.execute()
        self._replica_seen = results[-1].get("connected_slaves", 0) > 0
        own = results[:-2] if wait else results[:-1]
        if not self._replica_seen:
            return own
        if not wait:
            return self._replicated(writes, wait=True)
        if results[-2] < 1:
            raise StateNotReplicated(
                f"no replica confirmed the write within {self.replica_wait_ms} ms")
        return own
