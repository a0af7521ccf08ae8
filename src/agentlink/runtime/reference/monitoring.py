"""The pc2 monitoring chain, in the roadmap's fixed order:
PerformanceMonitor -> HealthMonitor -> ResourceManager -> SystemHealthManager."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import psutil
from prometheus_client.core import GaugeMetricFamily, Metric

from agentlink.runtime.agent import BaseAgent, Degraded
from agentlink.runtime.healthboard import HealthDashboard
from agentlink.runtime.registry import REDIS_ERRORS

MEMORY_PRESSURE = 0.9
# The roadmap's limits: the whole system under 8 GB and 60% CPU.
MEMORY_LIMIT_BYTES = 8 * 1024**3
CPU_RATIO_LIMIT = 0.6


class PerformanceMonitor(BaseAgent):
    """Performance figures of its own host process."""

    def handle(self, request: Any) -> Any:
        stats = self.context.stats() if self.context.stats else {}
        return {"instance": self.instance, "cpu_percent": psutil.cpu_percent(interval=None),
                **stats}


class HealthMonitor(BaseAgent):
    """Health as seen through the performance monitor."""

    def handle(self, request: Any) -> Any:
        perf = self.call("PerformanceMonitor", {})
        return {"instance": self.instance, "performance": perf}


class ResourceManager(BaseAgent):
    """Memory, CPU and disk of every machine and every agent host, from the samples each
    host publishes with its heartbeat (measured with psutil and the host's cgroup).

    An agent shares its host process with the rest of its group, so an agent's figures are
    its host's, with the agents sharing them named. A machine is under pressure above the
    roadmap's limits (options memory_limit_bytes, cpu_ratio_limit); the scheduler queues
    work for such a machine instead of failing it.
    """

    def handle(self, request: Any) -> Any:
        return self.report()

    def report(self) -> dict[str, Any]:
        samples = self._samples()
        machines = {s["machine"]: s["machine_resources"] for s in samples}
        for figures in machines.values():
            figures["under_pressure"] = self._under_pressure(figures)
        hosts = {s["group"]: {k: s[k] for k in ("machine", "agents", "rss_bytes",
                                                 "cpu_seconds", "memory_limit_bytes")}
                 for s in samples}
        agents = {agent: {"group": group, **{k: host[k] for k in
                                             ("machine", "rss_bytes", "memory_limit_bytes")},
                          "shared_with": len(host["agents"]) - 1}
                  for group, host in hosts.items() for agent in host["agents"]}
        return {"machine": self.context.machine, "machines": machines, "hosts": hosts,
                "agents": agents}

    def _samples(self) -> list[dict[str, Any]]:
        registry = self.context.registry
        return registry.resources() if registry is not None else []

    def _under_pressure(self, figures: dict[str, float]) -> bool:
        memory_limit = float(self.options.get("memory_limit_bytes", MEMORY_LIMIT_BYTES))
        cpu_limit = float(self.options.get("cpu_ratio_limit", CPU_RATIO_LIMIT))
        return figures["memory_used_bytes"] > memory_limit or figures["cpu_ratio"] > cpu_limit

    def collect_metrics(self) -> Iterable[Metric]:
        try:
            machines = self.report()["machines"]
        except REDIS_ERRORS:
            return  # the registry's own metrics say Redis is away
        for key, kind in _MACHINE_METRICS.items():
            family = GaugeMetricFamily(f"agentlink_machine_{key}", kind, labels=["machine"])
            for name, figures in machines.items():
                family.add_metric([name], float(figures[key]))
            yield family
        pressure = GaugeMetricFamily("agentlink_machine_under_pressure",
                                     "1 when the machine is over the memory or CPU limit",
                                     labels=["machine"])
        for name, figures in machines.items():
            pressure.add_metric([name], 1.0 if figures["under_pressure"] else 0.0)
        yield pressure

    def check_health(self) -> dict[str, bool | Degraded]:
        used = psutil.virtual_memory().percent / 100
        if used > MEMORY_PRESSURE:
            return {"memory": Degraded(f"machine memory {used:.0%} used")}
        return {"memory": True}


_MACHINE_METRICS = {
    "memory_used_bytes": "Memory in use on the machine (total minus available)",
    "memory_total_bytes": "Memory of the machine",
    "cpu_ratio": "Share of the machine's CPU in use, 0 to 1",
    "disk_used_bytes": "Disk in use on the filesystem the hosts write to",
    "disk_total_bytes": "Size of the filesystem the hosts write to",
}


class SystemHealthManager(HealthDashboard):
    """The summary of health and resources that an operator asks for, and the live health
    dashboard page on its host's HTTP port (/dashboard)."""

    def handle(self, request: Any) -> Any:
        return {"health": self.call("HealthMonitor", {}),
                "resources": self.call("ResourceManager", {})}
