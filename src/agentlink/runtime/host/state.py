"""An agent's state as its handlers see it (AgentContext.state): one Redis hash."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import redis

from agentlink.runtime.durable import OUTAGE_S, REPLICA_WAIT_MS, Durable
from agentlink.runtime.registry import REDIS_ERRORS


class RedisState:
    """An agent's state in one Redis hash, shared by all its replicas; every write is
    acknowledged only once it would survive a failover (see agentlink.runtime.durable)."""

    def __init__(self, client: redis.Redis, agent: str, replica_wait_ms: int = REPLICA_WAIT_MS,
                 outage_s: float = OUTAGE_S, on_use: Callable[[], None] = lambda: None) -> None:
        self.client = client
        self.on_use = on_use  # told of every read and write: the host's _InlineProof
        self.durable = Durable(client, replica_wait_ms, outage_s)
        self.key = f"agentlink:state:{agent}"

    def reachable(self) -> bool:
        """One quick try, for health checks: they must never wait out an outage."""
        try:
            self.client.exists(self.key)
        except REDIS_ERRORS:
            return False
        return True

    def get(self, key: str) -> Any:
        self.on_use()
        value = self.durable.read(lambda pipe: pipe.hget(self.key, key))
        return None if value is None else json.loads(value)

    def put(self, key: str, value: Any) -> None:
        self.on_use()
        self.durable.write(lambda pipe: pipe.hset(self.key, key, json.dumps(value)))

    def delete(self, key: str) -> None:
        self.on_use()
        self.durable.write(lambda pipe: pipe.hdel(self.key, key))
