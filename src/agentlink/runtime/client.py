"""The failover client: call an agent by name, never by address.

Instances come from the registry. A request never waits for it once an agent has been looked
up: the answer is refreshed in the background every `refresh` seconds, so a registry that is
slow or away (its primary cut off, the Sentinels electing another) costs no request time.
An instance the registry stops naming is still tried, after the ones it names, for
`remember` seconds after it was last seen serving: while the registry moves to a new
primary, its entries can be missing for seconds although the instances serve, and a request
fails only when no instance answers. Stateless agents are tried round-robin;
stateful ones in a stable order per key (rendezvous hashing), so a key sticks to one replica
while it lives and moves to the same next one for every caller when it dies. A timeout or a
retryable error marks the instance for a cool-down and the next one is tried, all within the
request's one deadline. Each attempt gets at least half of what is left of it, so a slow
handler is not mistaken for a dead one; a request retried after a timeout may have run
once already, so handlers reached through failover should be idempotent, or the request
should carry an idempotency key.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from agentlink.runtime import protocol
from agentlink.runtime.pool import PeerGone, Pool, RequestTimeout, SocketsBusy, get_pool
from agentlink.runtime.registry import InstanceRecord, Registry, redis_client
from agentlink.security import operator_keys, operator_settings

# How an attempt failed, in a NoInstance message: what to look at differs for each.
_HOW_IT_FAILED: dict[type[RequestTimeout], str] = {
    PeerGone: "disconnected", SocketsBusy: "had every socket of this caller busy"}


def operator_registry(settings: dict[str, Any]) -> Registry:
    """The registry as the controller's commands, tests and benchmarks reach it. A deployed
    system (found through its Sentinels) is reached with its inventory's credentials and
    this process's pool presents the operator's CURVE keys (agentlink.security); a local
    run's Redis (a URL) has no users and its hosts no keys."""
    if not settings.get("sentinels"):
        return Registry(redis_client(settings))
    keys = operator_keys()
    if keys is not None:
        get_pool().keys = keys
    return Registry(redis_client(operator_settings(settings)))


class NoInstance(Exception):
    """No instance of the agent answered within the request's deadline."""


def rendezvous_order(key: str, instances: list[InstanceRecord]) -> list[InstanceRecord]:
    def weight(rec: InstanceRecord) -> bytes:
        return hashlib.blake2b(f"{key}|{rec.instance}".encode(), digest_size=8).digest()

    return sorted(instances, key=weight, reverse=True)


@dataclass
class _Known:
    """What the registry said of one agent, and when each instance was last seen serving."""

    fetched: float
    named: list[InstanceRecord]
    seen: dict[str, tuple[float, InstanceRecord]] = field(default_factory=dict)
    refreshing: bool = False


class FailoverClient:
    def __init__(self, registry: Registry, pool: Pool | None = None, *,
                 refresh: float = 0.5, attempt_timeout: float = 1.0, cooldown: float = 2.0,
                 remember: float = 30.0, stateful: set[str] | None = None) -> None:
        self.registry = registry
        self.pool = pool or get_pool()
        self.refresh = refresh
        self.attempt_timeout = attempt_timeout
        self.cooldown = cooldown
        self.remember = remember
        self.stateful = stateful or set()
        self.failovers = 0
        # (endpoint, answer): requests to this endpoint are answered in-process, not sent.
        self.local: tuple[str, Callable[[list[bytes]], list[bytes]]] | None = None
        self._known: dict[str, _Known] = {}
        self._suspect: dict[str, float] = {}
        # Per agent: one shared count, advanced by calls to other agents in between, gave an
        # agent called every other request the same replica first every time.
        self._turns_of: dict[str, itertools.count[int]] = {}
        self._lock = threading.Lock()
        self._refresher: ThreadPoolExecutor | None = None

    def _discover(self, agent: str, force: bool = False
                  ) -> tuple[list[InstanceRecord], list[InstanceRecord]]:
        """The instances the registry names, and those it named lately but not now. Only an
        agent's first lookup waits for the registry; later ones refresh behind it."""
        with self._lock:
            known = self._known.get(agent)
        if known is None:
            self._fetch(agent)
        elif force or time.monotonic() - known.fetched >= self.refresh:
            self._refresh_later(agent)
        return self._candidates(agent)

    def _fetch(self, agent: str) -> None:
        found = self.registry.discover(agent)
        now = time.monotonic()
        with self._lock:
            known = self._known.setdefault(agent, _Known(now, found))
            known.fetched, known.named, known.refreshing = now, found, False
            known.seen.update((rec.instance, (now, rec)) for rec in found)
            for instance, (when, _) in list(known.seen.items()):
                if now - when > self.remember:
                    del known.seen[instance]

    def _refresh_later(self, agent: str) -> None:
        with self._lock:
            known = self._known[agent]
            if known.refreshing:
                return
            known.refreshing = True
            if self._refresher is None:
                self._refresher = ThreadPoolExecutor(2, thread_name_prefix="discovery")
        future = self._refresher.submit(self._fetch, agent)
        future.add_done_callback(lambda _: self._refreshed(agent))

    def _refreshed(self, agent: str) -> None:
        with self._lock:  # also when the registry raised: the next lookup tries again
            self._known[agent].refreshing = False

    def _candidates(self, agent: str) -> tuple[list[InstanceRecord], list[InstanceRecord]]:
        now = time.monotonic()
        with self._lock:
            known = self._known[agent]
            named = {rec.instance for rec in known.named}
            lately = [rec for when, rec in known.seen.values()
                      if rec.instance not in named and now - when <= self.remember]
            return list(known.named), lately

    def _order(self, agent: str, found: tuple[list[InstanceRecord], list[InstanceRecord]],
               key: str | None) -> list[InstanceRecord]:
        """Who to try, in turn: the named instances, then the lately seen ones, each in the
        agent's order (round-robin, or by key); suspects of either after all the others."""
        ordered = [rec for instances in found for rec in self._turns(agent, instances, key)]
        now = time.monotonic()
        with self._lock:
            suspect = {i for i, until in self._suspect.items() if until > now}
        # Suspects go last, not away: when all are suspect, still try them.
        return [r for r in ordered if r.instance not in suspect] + \
               [r for r in ordered if r.instance in suspect]

    def _turns(self, agent: str, instances: list[InstanceRecord], key: str | None
               ) -> list[InstanceRecord]:
        if key is not None and agent in self.stateful:
            return rendezvous_order(key, instances)
        ordered = sorted(instances, key=lambda r: r.instance)
        if ordered:
            with self._lock:
                turn = self._turns_of.setdefault(agent, itertools.count())
            start = next(turn) % len(ordered)
            ordered = ordered[start:] + ordered[:start]
        return ordered

    def _mark(self, rec: InstanceRecord) -> None:
        with self._lock:
            self._suspect[rec.instance] = time.monotonic() + self.cooldown
            self.failovers += 1

    def call(self, agent: str, payload: Any, key: str | None = None,
             timeout: float | None = None, idempotency_key: str | None = None) -> Any:
        """`key` routes a stateful agent's request; `idempotency_key` makes the request run at
        most once, however often it is sent (see agentlink.runtime.idempotency)."""
        deadline = time.monotonic() + (timeout or 5.0)
        last_error = "no instance registered"
        frames = protocol.encode_request(agent, payload, idempotency_key)
        force = False
        while time.monotonic() < deadline:
            candidates = self._order(agent, self._discover(agent, force), key)
            for rec in candidates:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                # At least half of what is left: a slow answer is not a dead replica.
                attempt = min(remaining, max(self.attempt_timeout, remaining / 2))
                try:
                    if self.local is not None and rec.endpoint == self.local[0]:
                        reply = self.local[1](frames)
                    else:
                        reply = self.pool.request(rec.endpoint, frames, timeout=attempt,
                                                  server=rec.group, lane=agent)
                    return protocol.decode_reply(reply)
                except RequestTimeout as err:
                    how = _HOW_IT_FAILED.get(type(err), "timed out")
                    last_error = f"{rec.instance} at {rec.endpoint} {how}"
                except protocol.RemoteError as err:
                    if err.code not in protocol.RETRYABLE:
                        raise
                    last_error = f"{rec.instance}: {err}"
                self._mark(rec)
            force = True
            time.sleep(min(0.05, max(deadline - time.monotonic(), 0)))
        raise NoInstance(f"{agent}: no instance answered in time ({last_error})")
