"""At most one run per idempotency key: what lets a workflow step be sent again safely.

A request that carries a key claims it in Redis before its handler runs (SET NX, with a
time to live). A repeat while it runs is answered `in_progress`; a repeat after it succeeded
is answered with the stored reply, from whichever replica of the agent it reaches, and the
handler does not run again. A failed run releases the key, so a retry runs for real. If the
host dies mid-run the claim expires after `claim_s` and the key may run again: the one case
where at-most-once yields to getting the work done.
"""

from __future__ import annotations

import os

import redis

from agentlink.runtime import protocol
from agentlink.runtime.durable import Durable

PREFIX = "agentlink:idempotency"
CLAIM = b"claim:"  # a stored reply is JSON, so never starts like this


class Idempotency:
    def __init__(self, client: redis.Redis, claim_s: float = 30.0,
                 keep_s: float = 24 * 3600) -> None:
        self.client = client
        self.durable = Durable(client)
        self.claim_ms = int(claim_s * 1000)
        self.keep_ms = int(keep_s * 1000)

    @staticmethod
    def _key(agent: str, key: str) -> str:
        return f"{PREFIX}:{agent}:{key}"

    def claim(self, agent: str, key: str) -> bytes | None:
        """None: the caller runs the request. Otherwise the reply to send instead: the
        stored one, or `in_progress`."""
        name = self._key(agent, key)
        token = CLAIM + os.urandom(8).hex().encode()
        # SET NX GET: the value before, or None when this call set it. A write sent again
        # (a failover, a replica seen for the first time) finds its own token.
        before = self.durable.write(
            lambda pipe: pipe.set(name, token, nx=True, get=True, px=self.claim_ms))[0]
        if before is None or before == token:
            return None
        if before.startswith(CLAIM):
            return protocol.error(protocol.IN_PROGRESS,
                                  f"{agent}: a request with key {key!r} is running")
        return bytes(before)

    def finish(self, agent: str, key: str, reply: bytes, succeeded: bool) -> None:
        """Keep a successful reply for repeats; release the key of a failed run."""
        name = self._key(agent, key)
        if succeeded:
            self.durable.write(lambda pipe: pipe.set(name, reply, px=self.keep_ms))
        else:
            self.durable.write(lambda pipe: pipe.delete(name))
