"""Registry (TTL, drain, Redis outages) and failover client (round-robin, sticky, failover)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import Counter
from contextlib import ExitStack

import pytest
import redis

from agentlink.devtools.redis_server import RedisServer
from agentlink.devtools.testing import AgentSpec, run_group
from agentlink.runtime import protocol
from agentlink.runtime.client import FailoverClient, NoInstance
from agentlink.runtime.registry import InstanceRecord, Registry, redis_client

from .conftest import Traffic, eventually

ECHO = "tests.unit.agents:Echo"
MEMORY = "agentlink.runtime.reference.core:MemoryOrchestratorService"


def record(instance: str, state: str = "healthy") -> InstanceRecord:
    return InstanceRecord(agent="A", instance=instance, machine="m", group="g",
                          endpoint="tcp://127.0.0.1:1", http="http://127.0.0.1:2", state=state)


def test_discovery_returns_fresh_serving_undrained_instances(registry: Registry) -> None:
    registry.register([record("A-1"), record("A-2", "starting"), record("A-3", "degraded"),
                       record("A-4", "unhealthy")])
    assert {r.instance for r in registry.discover("A")} == {"A-1", "A-3"}
    registry.set_drain("A", "A-1", True)
    assert {r.instance for r in registry.discover("A")} == {"A-3"}
    assert next(r for r in registry.records("A") if r.instance == "A-1").drained
    registry.set_drain("A", "A-1", False)
    assert {r.instance for r in registry.discover("A")} == {"A-1", "A-3"}


def test_an_instance_without_heartbeat_expires(redis_url: str) -> None:
    short = Registry(redis_client({"url": redis_url}), ttl=0.3)
    short.register([record("A-1")])
    assert short.discover("A")
    eventually(lambda: short.discover("A") == [], what="expiry")


def test_deregister_removes_at_once(registry: Registry) -> None:
    registry.register([record("A-1")])
    registry.deregister([record("A-1")])
    assert registry.records("A") == []


def test_round_robin_spreads_over_replicas(redis_url: str) -> None:
    with ExitStack() as stack:
        for n in (1, 2, 3):
            stack.enter_context(run_group([AgentSpec("Twin", ECHO, index=n)], redis_url,
                                          group=f"twin-{n}"))
        client = FailoverClient(Registry(redis_client({"url": redis_url})))
        served = Counter(client.call("Twin", n)["by"] for n in range(30))
    assert served == {"Twin-1": 10, "Twin-2": 10, "Twin-3": 10}


def test_round_robin_is_per_agent_when_calls_to_several_agents_interleave(
        redis_url: str) -> None:
    """Calls to Pair alternate with calls to Solo: each agent still takes its own turns."""
    with ExitStack() as stack:
        for n in (1, 2):
            stack.enter_context(run_group([AgentSpec("Pair", ECHO, index=n)], redis_url,
                                          group=f"pair-{n}"))
        stack.enter_context(run_group([AgentSpec("Solo", ECHO)], redis_url, group="solo"))
        client = FailoverClient(Registry(redis_client({"url": redis_url})))
        served = Counter()
        for n in range(20):
            served[client.call("Pair", n)["by"]] += 1
            client.call("Solo", n)
    assert served == {"Pair-1": 10, "Pair-2": 10}


def test_sticky_routing_by_key_for_stateful_agents(redis_url: str) -> None:
    with ExitStack() as stack:
        for n in (1, 2):
            stack.enter_context(run_group([AgentSpec("Memory", ECHO, index=n)], redis_url,
                                          group=f"mem-{n}", stateful=["Memory"]))
        client = FailoverClient(Registry(redis_client({"url": redis_url})),
                                stateful={"Memory"})
        by_key = {key: {client.call("Memory", {}, key=key)["by"] for _ in range(5)}
                  for key in (f"user-{n}" for n in range(20))}
    assert all(len(owners) == 1 for owners in by_key.values())  # each key sticks
    assert len(set().union(*by_key.values())) == 2  # and keys spread over both


def test_a_replica_stopped_mid_traffic_loses_no_request(redis_url: str) -> None:
    with run_group([AgentSpec("Twin", ECHO, index=1)], redis_url, group="twin-1"), \
            run_group([AgentSpec("Twin", ECHO, index=2)], redis_url, group="twin-2") as host2:
        client = FailoverClient(Registry(redis_client({"url": redis_url})))
        with Traffic(lambda: client.call("Twin", {}, timeout=5)["by"]) as traffic:
            eventually(lambda: "Twin-2" in traffic.answers, what="traffic to Twin-2")
            host2.stop()  # a replica goes away mid-traffic
            traffic.more_than(50)
    assert traffic.failures == []
    assert traffic.answers[-1] == "Twin-1"


def test_handler_errors_are_not_retried_elsewhere(redis_url: str) -> None:
    failing = "tests.unit.agents:Failing"
    with run_group([AgentSpec("F", failing, index=1)], redis_url, group="f1"), \
            run_group([AgentSpec("F", failing, index=2)], redis_url, group="f2"):
        client = FailoverClient(Registry(redis_client({"url": redis_url})))
        with pytest.raises(protocol.RemoteError):
            client.call("F", {})
        assert client.failovers == 0


def test_no_instance_fails_within_the_deadline(redis_url: str) -> None:
    client = FailoverClient(Registry(redis_client({"url": redis_url})))
    with pytest.raises(NoInstance, match="Ghost"):
        client.call("Ghost", {}, timeout=0.3)


def test_redis_outage_degrades_then_heals_and_keeps_state(redis_server: RedisServer,
                                                          redis_url: str) -> None:
    with run_group([AgentSpec("Memory", MEMORY)], redis_url, group="mem") as host, \
            run_group([AgentSpec("Echo", ECHO)], redis_url, group="echo"):
        client = FailoverClient(Registry(redis_client({"url": redis_url})),
                                stateful={"Memory"})
        assert client.call("Memory", {"op": "put", "key": "k", "value": 42}, key="k")["stored"]
        assert client.call("Echo", "before")["echo"] == "before"
        redis_server.stop()
        try:
            eventually(lambda: host.health()["agents"]["Memory-1"]["state"] == "degraded",
                       what="degraded while Redis is away")

            def degraded_checks() -> set[str]:
                return {c["name"] for c in host.health()["agents"]["Memory-1"]["checks"]
                        if c["status"] == "degraded"}

            eventually(lambda: degraded_checks() == {"registry", "state_store"},
                       what="registry and state store both degraded")
            # Known instances keep serving from the last discovery.
            assert client.call("Echo", "during", timeout=3)["echo"] == "during"
        finally:
            redis_server.start()
        eventually(lambda: host.health()["state"] == "healthy", what="healthy again")
        eventually(lambda: {r.instance for r in host.registry.discover("Memory")} ==
                   {"Memory-1"}, what="re-registered")
        assert client.call("Memory", {"op": "get", "key": "k"}, key="k")["value"] == 42


class MovingRegistry(Registry):
    """A registry that answers once, then as it does while it moves to a new primary: on the
    request's own thread it must not be asked at all; in the background it names nobody."""

    def __init__(self, url: str) -> None:
        super().__init__(redis_client({"url": url}))
        self.lookups = 0

    def discover(self, agent: str) -> list[InstanceRecord]:
        self.lookups += 1
        if self.lookups == 1:
            return super().discover(agent)
        assert threading.current_thread().name.startswith("discovery"), \
            "a request waited for the registry"
        return []


def test_requests_go_on_to_instances_last_seen_while_the_registry_names_nobody(
        redis_url: str) -> None:
    with run_group([AgentSpec("Echo", ECHO)], redis_url):
        registry = MovingRegistry(redis_url)
        client = FailoverClient(registry, refresh=0, remember=30)
        assert client.call("Echo", 1)["by"] == "Echo-1"
        assert client.call("Echo", 2)["by"] == "Echo-1"  # and a refresh goes to the background
        eventually(lambda: registry.lookups >= 2, what="a refresh in the background")
        for n in range(20):  # the registry names nobody now: the last seen still answer
            assert client.call("Echo", n, timeout=2)["echo"] == n


def test_an_instance_not_named_for_longer_than_remember_is_forgotten(redis_url: str) -> None:
    with run_group([AgentSpec("Echo", ECHO)], redis_url):
        registry = MovingRegistry(redis_url)
        client = FailoverClient(registry, refresh=0, remember=0.2)
        client.call("Echo", 1)
        time.sleep(0.3)  # longer than `remember`
        with contextlib.suppress(NoInstance):  # answered or not: it starts a refresh
            client.call("Echo", 2, timeout=0.5)
        eventually(lambda: registry.lookups >= 2, what="a refresh in the background")
        with pytest.raises(NoInstance, match="Echo"):
            client.call("Echo", 2, timeout=0.5)


def test_a_sentinel_that_does_not_answer_is_asked_once_per_lookup() -> None:
    """A Sentinel cut off from the LAN: one try, then the next Sentinel; redis-py's own
    retries (three, with seconds of backoff) held every lookup for ~10 s."""
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        client = redis_client({"sentinels": [f"127.0.0.1:{port}"], "service": "agentlink",
                               "timeout": 0.2})
        with pytest.raises(redis.sentinel.MasterNotFoundError):
            client.ping()
        silent.settimeout(0.5)
        accepted = 0
        with contextlib.suppress(TimeoutError):
            while True:
                silent.accept()[0].close()
                accepted += 1
    assert accepted == 1
