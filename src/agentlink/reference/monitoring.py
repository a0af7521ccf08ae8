"""The pc2 monitoring chain, in the roadmap's fixed order:
PerformanceMonitor -> HealthMonitor -> ResourceManager -> SystemHealthManager."""

from __future__ import annotations

import shutil
from typing import Any

import psutil

from agentlink.agent import BaseAgent, Degraded

MEMORY_PRESSURE = 0.9


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
    """Memory, CPU and disk of the machine it runs on."""

    def handle(self, request: Any) -> Any:
        memory = psutil.virtual_memory()
        disk = shutil.disk_usage("/")
        return {"machine": self.context.machine, "memory_used_bytes": memory.used,
                "memory_total_bytes": memory.total, "memory_fraction": memory.percent / 100,
                "cpu_percent": psutil.cpu_percent(interval=None), "disk_used_bytes": disk.used,
                "disk_total_bytes": disk.total}

    def check_health(self) -> dict[str, bool | Degraded]:
        used = psutil.virtual_memory().percent / 100
        if used > MEMORY_PRESSURE:
            return {"memory": Degraded(f"machine memory {used:.0%} used")}
        return {"memory": True}


class SystemHealthManager(BaseAgent):
    """The summary of health and resources that an operator asks for."""

    def handle(self, request: Any) -> Any:
        return {"health": self.call("HealthMonitor", {}),
                "resources": self.call("ResourceManager", {})}
