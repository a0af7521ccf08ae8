"""Prometheus metrics of one agent host (`/metrics`), named by Prometheus conventions."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import psutil
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agentlink.runtime.resources import cgroup_memory_limit

if TYPE_CHECKING:
    from agentlink.runtime.host import AgentHost

STATES = ("starting", "healthy", "degraded", "unhealthy")


class _LiveCollector(Collector):
    """Values read at scrape time: health, process resources, pool and registry."""

    def __init__(self, host: AgentHost, process: psutil.Process) -> None:
        self.host = host
        self.process = process
        self.memory_limit = cgroup_memory_limit()

    def collect(self) -> Iterator[Metric]:
        # "agent_instance", not "instance": Prometheus owns "instance" (the scrape target).
        health = GaugeMetricFamily("agentlink_agent_health",
                                   "1 for the instance's current health state",
                                   labels=["agent", "agent_instance", "group", "state"])
        for slot in self.host.slots.values():
            for state in STATES:
                health.add_metric([slot.spec.agent, slot.spec.instance, self.host.config.group,
                                   state], 1.0 if slot.record.state == state else 0.0)
        yield health
        group = [self.host.config.group]
        memory = GaugeMetricFamily("agentlink_process_resident_memory_bytes",
                                   "Resident memory of the agent host process", labels=["group"])
        memory.add_metric(group, float(self.process.memory_info().rss))
        yield memory
        if self.memory_limit is not None:
            limit = GaugeMetricFamily("agentlink_process_memory_limit_bytes",
                                      "Memory limit of the host's container (its cgroup)",
                                      labels=["group"])
            limit.add_metric(group, float(self.memory_limit))
            yield limit
        cpu = CounterMetricFamily("agentlink_process_cpu_seconds",
                                  "CPU time of the agent host process", labels=["group"])
        times = self.process.cpu_times()
        cpu.add_metric(group, times.user + times.system)
        yield cpu
        yield GaugeMetricFamily("agentlink_requests_in_flight",
                                "Requests being handled now (a draining host waits for 0)",
                                value=self.host.inflight)
        stats = self.host.pool.stats
        yield GaugeMetricFamily("agentlink_pool_sockets", "Open pooled client sockets",
                                value=stats.sockets)
        yield CounterMetricFamily("agentlink_pool_reconnects", "Sockets recreated after a timeout",
                                  value=stats.reconnects)
        yield CounterMetricFamily("agentlink_pool_timeouts", "Pooled requests that timed out",
                                  value=stats.timeouts)
        registry = self.host.registry
        yield CounterMetricFamily("agentlink_registry_heartbeats",
                                  "Heartbeats written to the registry", value=registry.heartbeats)
        age = time.time() - registry.last_success if registry.last_success else float("nan")
        yield GaugeMetricFamily("agentlink_registry_heartbeat_age_seconds",
                                "Seconds since the registry last answered", value=age)
        yield GaugeMetricFamily("agentlink_registry_up", "1 when Redis answers",
                                value=1.0 if registry.available else 0.0)
        for slot in self.host.slots.values():
            yield from slot.agent.collect_metrics()


class HostMetrics:
    def __init__(self, host: AgentHost) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter("agentlink_requests", "Requests handled", ["agent"],
                                registry=self.registry)
        self.errors = Counter("agentlink_request_errors", "Requests answered with an error",
                              ["agent", "code"], registry=self.registry)
        self.repeats = Counter("agentlink_request_repeats",
                               "Requests with an idempotency key already run: answered with "
                               "the first reply (or in_progress), not run again", ["agent"],
                               registry=self.registry)
        self.peer_events = Counter("agentlink_peer_events",
                                   "Connections to the host's ROUTER that failed the CURVE "
                                   "handshake or were dropped (an oversized message drops one)",
                                   ["event"], registry=self.registry)
        self.duration = Histogram("agentlink_request_duration_seconds", "Time in handle()",
                                  ["agent"], registry=self.registry,
                                  buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5,
                                           1, 2.5, 5))
        self.process = psutil.Process()
        self.registry.register(_LiveCollector(host, self.process))
        self._host = host
        self._series: dict[str, tuple[Counter, Histogram]] = {}

    def declare(self, agents: list[str]) -> None:
        """Start each agent's request series at 0, so a quiet agent still has a rate; keep
        them at hand: `labels()` per request was a tenth of the host's time on a request."""
        self._series = {agent: (self.requests.labels(agent), self.duration.labels(agent))
                        for agent in agents}

    def observe(self, agent: str, seconds: float, error_code: str) -> None:
        requests, duration = self._series[agent]
        requests.inc()
        duration.observe(seconds)
        if error_code:
            self.errors.labels(agent, error_code).inc()

    def repeated(self, agent: str) -> None:
        self.repeats.labels(agent).inc()

    def rejected(self, agent: str, code: str) -> None:
        """`agent` is one this host serves, or "?": a name from a message never becomes a
        label, or a flood of made-up names would grow the series without bound."""
        self.errors.labels(agent, code).inc()

    def peer_event(self, event: str) -> None:
        self.peer_events.labels(event).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def snapshot(self) -> dict[str, Any]:
        """Figures an agent may report about its own process (used by the monitoring agents)."""
        return {"group": self._host.config.group, "rss_bytes": self.process.memory_info().rss,
                "pool": vars(self._host.pool.stats).copy()}
