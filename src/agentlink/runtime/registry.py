"""The service registry in Redis: who runs where, and whether it is healthy right now.

Each instance is one key with a TTL, refreshed by its host's heartbeat; a host that dies simply
expires. Discovery returns instances that are fresh, serving (healthy or degraded) and not
drained. When Redis cannot be reached, discovery keeps answering from the last good answer for
a bounded time, and the next heartbeat after Redis returns registers everything again.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from agentlink.security import read_secret

PREFIX = "agentlink"
RESOURCE_GROUPS = f"{PREFIX}:resources"  # the hosts that publish resource samples
SERVING = frozenset({"healthy", "degraded"})
REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.sentinel.MasterNotFoundError)


@dataclass
class InstanceRecord:
    agent: str
    instance: str
    machine: str
    group: str
    endpoint: str  # tcp://host:port of the group's ROUTER
    http: str  # http://host:port of the group's /health and /metrics
    state: str = "starting"
    pid: int = 0
    heartbeat: float = 0.0
    drained: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> InstanceRecord:
        return cls(**json.loads(text))


def as_text(reply: bytes | str) -> str:
    """A Redis reply as text: these clients leave responses undecoded."""
    return reply.decode() if isinstance(reply, bytes) else reply


def redis_client(settings: dict[str, Any]) -> redis.Redis:
    """A client for `{"url": ...}` or `{"sentinels": ["host:port"], "service": ...}`.

    Timeouts are short and client-side retries off: the registry has its own fallback, and an
    agent must never block for seconds on an unreachable Redis.
    """
    options: dict[str, Any] = {
        "socket_timeout": settings.get("timeout", 0.5),
        "socket_connect_timeout": settings.get("timeout", 0.5),
        "retry": Retry(NoBackoff(), 0),
        "password": _password(settings, "password"),
        "username": settings.get("username") or None,
    }
    if settings.get("sentinels"):
        nodes = [(h, int(p)) for h, p in (s.rsplit(":", 1) for s in settings["sentinels"])]
        # The same bounds for the Sentinels: redis-py retries a Sentinel three times with a
        # backoff of seconds by default, and asks the first one first on every new
        # connection, so one Sentinel cut off from the LAN held every lookup for ~10 s.
        sentinel = Sentinel(nodes, sentinel_kwargs={
            key: options[key] for key in ("socket_timeout", "socket_connect_timeout", "retry")
        } | {"password": _password(settings, "sentinel_password")}, **options)
        return cast(redis.Redis, sentinel.master_for(settings.get("service", "agentlink")))
    return redis.Redis.from_url(settings.get("url", "redis://127.0.0.1:6379/0"), **options)


def _password(settings: dict[str, Any], name: str) -> str | None:
    """`<name>` itself, or read from `<name>_file` (how containers get it: a mounted file)."""
    if settings.get(f"{name}_file"):
        return read_secret(settings[f"{name}_file"])
    return settings.get(name) or None


class Registry:
    def __init__(self, client: redis.Redis, ttl: float = 6.0, cache_for: float = 30.0) -> None:
        self.client = client
        self.ttl = ttl
        self.cache_for = cache_for
        self.available = True
        self.last_error = ""
        self.heartbeats = 0
        self.last_success = 0.0
        self._cache: dict[str, tuple[float, list[InstanceRecord]]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(agent: str, instance: str) -> str:
        return f"{PREFIX}:instance:{agent}:{instance}"

    @staticmethod
    def _members(agent: str) -> str:
        return f"{PREFIX}:members:{agent}"

    @staticmethod
    def _drain_key(agent: str, instance: str) -> str:
        return f"{PREFIX}:drain:{agent}:{instance}"

    def _ok(self) -> None:
        self.available, self.last_error, self.last_success = True, "", time.time()

    def _failed(self, err: Exception) -> None:
        self.available, self.last_error = False, f"{type(err).__name__}: {err}"

    def register(self, records: list[InstanceRecord]) -> bool:
        """Write (or refresh) records with the TTL; False when Redis is unreachable."""
        now = time.time()
        try:
            pipe = self.client.pipeline(transaction=False)
            for rec in records:
                rec.heartbeat = now
                pipe.set(self._key(rec.agent, rec.instance), rec.to_json(), px=int(self.ttl * 1000))
                pipe.sadd(self._members(rec.agent), rec.instance)
                pipe.sadd(f"{PREFIX}:agents", rec.agent)
            pipe.execute()
        except REDIS_ERRORS as err:
            self._failed(err)
            return False
        self.heartbeats += 1
        self._ok()
        return True

    def deregister(self, records: list[InstanceRecord]) -> None:
        try:
            pipe = self.client.pipeline(transaction=False)
            for rec in records:
                pipe.delete(self._key(rec.agent, rec.instance))
                pipe.srem(self._members(rec.agent), rec.instance)
            pipe.execute()
        except redis.RedisError as err:  # any: the TTL removes them anyway
            self._failed(err)

    def set_drain(self, agent: str, instance: str, drained: bool,
                  ttl: int | None = None) -> None:
        """Drain (or undrain) an instance: discovery stops returning it, it keeps running.

        With `ttl`, the drain lifts itself after that many seconds."""
        key = self._drain_key(agent, instance)
        if drained:
            self.client.set(key, "1", ex=ttl)
        else:
            self.client.delete(key)

    def records(self, agent: str) -> list[InstanceRecord]:
        """Every fresh record of an agent, whatever its state; raises when Redis is down."""
        ids = sorted(as_text(m) for m in self.client.smembers(self._members(agent)))
        if not ids:
            return []
        pipe = self.client.pipeline(transaction=False)
        pipe.mget([self._key(agent, i) for i in ids])
        pipe.mget([self._drain_key(agent, i) for i in ids])
        values, drains = pipe.execute()
        found = []
        for value, drain in zip(values, drains, strict=True):
            if value is not None:
                rec = InstanceRecord.from_json(value)
                rec.drained = drain is not None
                found.append(rec)
        return found

    def discover(self, agent: str) -> list[InstanceRecord]:
        """Fresh, serving, undrained instances; the last good answer while Redis is away."""
        try:
            found = [r for r in self.records(agent) if r.state in SERVING and not r.drained]
        except REDIS_ERRORS as err:
            self._failed(err)
            with self._lock:
                when, cached = self._cache.get(agent, (0.0, []))
            return cached if time.monotonic() - when < self.cache_for else []
        self._ok()
        with self._lock:
            self._cache[agent] = (time.monotonic(), found)
        return found

    def agents(self) -> list[str]:
        return sorted(as_text(m) for m in self.client.smembers(f"{PREFIX}:agents"))

    def publish_resources(self, group: str, sample: dict[str, Any]) -> None:
        """A host's resource sample, expiring like its records; best effort."""
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.set(self._resources_key(group), json.dumps(sample), px=int(self.ttl * 1000))
            pipe.sadd(RESOURCE_GROUPS, group)
            pipe.execute()
        except REDIS_ERRORS as err:
            self._failed(err)

    def resources(self) -> list[dict[str, Any]]:
        """Every live host's latest resource sample; raises when Redis is down. The hosts
        that published are a set, read with one MGET: a SCAN for the keys would walk the
        whole keyspace, workflow records and idempotency replies included."""
        groups = sorted(as_text(m) for m in self.client.smembers(RESOURCE_GROUPS))
        if not groups:
            return []
        values = self.client.mget([self._resources_key(g) for g in groups])
        stale = [g for g, v in zip(groups, values, strict=True) if v is None]
        if stale:  # hosts gone from the topology; a live one adds itself back
            self.client.srem(RESOURCE_GROUPS, *stale)
        return [json.loads(v) for v in values if v is not None]

    @staticmethod
    def _resources_key(group: str) -> str:
        return f"{PREFIX}:resources:{group}"
