"""The process backend: every machine of the topology as local processes on this host.

`agentlink up` renders each machine's startup config, starts a local redis-server, and
launches the agent hosts as detached processes (logs in <home>/logs); `agentlink down`
stops them. State lives in <home>/state.json so that `status` and `down` find it again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from agentlink.deploy.launch import Launcher, LaunchError, LaunchReport, Unit
from agentlink.deploy.render import render_startup_config, write_startup_config
from agentlink.devtools.redis_server import RedisServer
from agentlink.runtime.status import fetch_health
from agentlink.topology import Topology

STOP_DEADLINE = 15.0


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def terminate(pids: list[int], deadline: float = STOP_DEADLINE) -> None:
    """SIGTERM to all at once, wait for their graceful stops together, then SIGKILL the
    ones still there: stopping ten hosts takes as long as the slowest, not the sum. A host
    that exited is stopped even while it waits as a zombie for a parent to reap it (psutil
    waits for the reaping, which an init that reaps late delays by seconds)."""
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).send_signal(signal.SIGTERM)
    end = time.monotonic() + deadline
    alive = [pid for pid in pids if running(pid)]
    while alive and time.monotonic() < end:
        time.sleep(0.02)
        alive = [pid for pid in alive if running(pid)]
    for pid in alive:
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).kill()


def check_ports_free(topology: Topology) -> list[str]:
    """On one host all machines share the port space: every group port must be unique.
    Each clash is named at the line of the later group's first agent."""
    owner: dict[int, str] = {}
    problems = []
    for group in topology.groups.values():
        where = topology.where(group.instances[0].agent.name)
        for port in (group.port, group.http_port):
            if port in owner:
                problems.append(f"{where}: port {port} is used by groups {owner[port]} and "
                                f"{group.name}; on one host every machine's ports must differ")
            owner[port] = group.name
    return problems


@dataclass
class ProcessBackend:
    home: Path
    configs: dict[str, Path]

    def _pidfile(self, unit: Unit) -> Path:
        return self.home / "run" / f"{unit.name}.json"

    def _read(self, unit: Unit) -> dict[str, Any]:
        try:
            return dict(json.loads(self._pidfile(unit).read_text()))
        except (OSError, ValueError):
            return {}

    def _digest(self, unit: Unit) -> str:
        return hashlib.sha256(self.configs[unit.machine].read_bytes()
                              + unit.name.encode()).hexdigest()[:16]

    def start(self, unit: Unit) -> bool:
        info, digest = self._read(unit), self._digest(unit)
        if running(info.get("pid", 0)) and info.get("config") == digest:
            return False
        self.stop(unit)
        log_path = self.home / "logs" / f"{unit.name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "agentlink", "run", "--config",
                 str(self.configs[unit.machine]), "--group", unit.name],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        self._pidfile(unit).parent.mkdir(parents=True, exist_ok=True)
        self._pidfile(unit).write_text(json.dumps(
            {"pid": proc.pid, "config": digest, "http": self.http(unit)}))
        return True

    def stop(self, unit: Unit) -> None:
        pid = self._read(unit).get("pid", 0)
        if pid and running(pid):
            terminate([pid])
        self._pidfile(unit).unlink(missing_ok=True)

    def alive(self, unit: Unit) -> bool:
        pid = self._read(unit).get("pid", 0)
        if not pid:
            return False
        with contextlib.suppress(ChildProcessError):  # reap our exited child: no zombie
            os.waitpid(pid, os.WNOHANG)
        return running(pid)

    def settle(self, unit: Unit) -> None:
        """Local processes run without limits: nothing was held back."""

    @staticmethod
    def http(unit: Unit) -> str:
        return f"http://127.0.0.1:{unit.group.http_port}"

    def health(self, unit: Unit) -> dict[str, Any] | None:
        return fetch_health(self.http(unit))

    def logs(self, unit: Unit, lines: int = 20) -> list[str]:
        try:
            text = (self.home / "logs" / f"{unit.name}.log").read_text(errors="replace")
        except OSError:
            return []
        return text.splitlines()[-lines:]


class LocalLab:
    """`agentlink up/down`: a topology's machines as local processes plus a local Redis."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.state_file = home / "state.json"

    def state(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.state_file.read_text()))
        except (OSError, ValueError):
            return {}

    def up(self, topology: Topology, redis_url: str | None,
           progress: Callable[[str], None]) -> LaunchReport:
        state = self.state()
        started_redis = not redis_url and not self._redis_running(state)
        if not redis_url:
            redis_url = self._ensure_redis(state, progress)
        configs = {}
        for machine in topology.machines:
            # Loopback only: a local run has no CURVE and no Redis users (README, "Local mode").
            config = render_startup_config(
                topology, machine, dict.fromkeys(topology.machines, "127.0.0.1"),
                {"url": redis_url}, bind="127.0.0.1")
            configs[machine] = self.home / "config" / machine / "startup_config.yaml"
            write_startup_config(config, configs[machine])
        state.update(topology=str(Path(topology.path).resolve()), redis_url=redis_url,
                     configs={m: str(p) for m, p in configs.items()})
        self.home.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps(state, indent=2))
        backend = ProcessBackend(self.home, configs)
        try:
            return Launcher(topology, backend, progress=progress).launch()
        except LaunchError as err:
            if started_redis:  # what this run started goes, its Redis too
                self._stop_redis(progress)
                err.stopped.append("redis-server")
            raise

    @staticmethod
    def _redis_running(state: dict[str, Any]) -> bool:
        return running(state.get("redis_pid", 0)) and bool(state.get("redis_url"))

    def _ensure_redis(self, state: dict[str, Any], progress: Callable[[str], None]) -> str:
        if self._redis_running(state):
            return str(state["redis_url"])
        server = RedisServer(self.home / "redis")
        server.start()
        assert server.process is not None
        state["redis_pid"] = server.process.pid
        progress(f"started redis-server on port {server.port} (log: {server.directory}/redis.log)")
        return server.url

    def down(self, progress: Callable[[str], None]) -> int:
        """Stop every host this lab started, all at once, then its Redis; returns how many
        were stopped."""
        hosts = []
        for pidfile in sorted((self.home / "run").glob("*.json")):
            pid = json.loads(pidfile.read_text()).get("pid", 0)
            if running(pid):
                progress(f"stopping {pidfile.stem} (pid {pid})")
                hosts.append(pid)
            pidfile.unlink()
        terminate(hosts)
        self._stop_redis(progress)
        return len(hosts)

    def _stop_redis(self, progress: Callable[[str], None]) -> None:
        redis_pid = self.state().get("redis_pid", 0)
        if running(redis_pid):
            progress(f"stopping redis-server (pid {redis_pid})")
            terminate([redis_pid])
        self.state_file.unlink(missing_ok=True)
