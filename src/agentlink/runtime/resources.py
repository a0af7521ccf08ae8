"""Resource samples, read where they really are: psutil for processes and the machine, the
cgroup for a container's memory limit. Every host publishes one sample per heartbeat; the
ResourceManager agent reads them all from the registry."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import psutil

# cgroup v2 first, then v1; inside a container each names that container's own limit.
_CGROUP_LIMIT_FILES = (Path("/sys/fs/cgroup/memory.max"),
                       Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))
# v1 writes "no limit" as a huge number rather than "max".
_UNLIMITED = 1 << 60


def cgroup_memory_limit(files: tuple[Path, ...] = _CGROUP_LIMIT_FILES) -> int | None:
    """The memory limit of this process's cgroup in bytes; None when there is none."""
    for path in files:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text == "max" or not text.isdigit() or int(text) >= _UNLIMITED:
            return None
        return int(text)
    return None


def process_sample(process: psutil.Process) -> dict[str, float]:
    times = process.cpu_times()
    return {"rss_bytes": float(process.memory_info().rss),
            "cpu_seconds": times.user + times.system}


def machine_sample(disk_path: str = "/") -> dict[str, float]:
    """What the machine has in use. In a container, memory and CPU are the host's own figures;
    disk is the filesystem the container writes to."""
    memory = psutil.virtual_memory()
    disk = shutil.disk_usage(disk_path)
    return {"memory_used_bytes": float(memory.total - memory.available),
            "memory_total_bytes": float(memory.total),
            # Since the previous call in this process: one heartbeat's worth of CPU.
            "cpu_ratio": psutil.cpu_percent(interval=None) / 100,
            "disk_used_bytes": float(disk.used), "disk_total_bytes": float(disk.total)}


def host_sample(group: str, machine: str, agents: list[str],
                process: psutil.Process) -> dict[str, Any]:
    """One heartbeat's sample of an agent host: its process, its limit and its machine."""
    return {"group": group, "machine": machine, "agents": agents, "at": time.time(),
            "memory_limit_bytes": cgroup_memory_limit(), **process_sample(process),
            "machine_resources": machine_sample()}
