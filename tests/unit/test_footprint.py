"""Reading what a running process holds from /proc, and health code from the source."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentlink.devtools.footprint import (
    connections,
    health_code,
    process_footprint,
    runtime_modules,
    zmq_contexts,
)
from agentlink.devtools.testing import free_ports

HOLDER = """
import socket, sys, zmq
contexts = [zmq.Context() for _ in range(3)]
for ctx in contexts:
    ctx.socket(zmq.DEALER)
idle = zmq.Context()  # never opens a socket: holds no thread, no socket
server = socket.create_server(("127.0.0.1", {port}))
client = socket.create_connection(("127.0.0.1", {port}))
accepted, _ = server.accept()
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def holder() -> Iterator[tuple[int, int]]:
    """A process with three ZeroMQ contexts in use, one idle, a listener and a connection
    to itself; yields its pid and port."""
    port = free_ports(1)[0]
    proc = subprocess.Popen([sys.executable, "-c", HOLDER.format(port=port)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    yield proc.pid, port
    proc.kill()
    proc.wait()


def test_contexts_are_counted_by_the_threads_libzmq_starts(holder: tuple[int, int]) -> None:
    # libzmq names each thread from inside it once it runs, so a context opened a moment
    # ago may still show a thread named "python": wait for the names to settle.
    deadline = time.monotonic() + 10
    while (counted := zmq_contexts(holder[0])) != 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert counted == 3


def test_sockets_are_read_from_the_process_s_own_table(holder: tuple[int, int]) -> None:
    pid, port = holder
    held = process_footprint(pid)
    assert held.listening == {("127.0.0.1", port)}
    assert len(held.established) == 2  # both ends of one connection
    assert connections([held]) == {frozenset({("127.0.0.1", port),
                                              next(r for lo, r in held.established
                                                   if lo[1] == port)})}
    assert held.rss > 0
    # libc and the interpreter are mapped by other processes too: their pages count in
    # part, so the proportional size is below the resident one.
    assert 0 < held.pss < held.rss


PACKAGE = {
    "pkg/__init__.py": "",
    "pkg/main.py": """
        from pkg import agent
        from pkg.host import Host
        def later():
            from pkg import tooling
    """,
    "pkg/agent.py": '''
        class Check:
            """A check's result."""
            name: str
        class BaseAgent:
            def check_health(self):
                return {}
        class Disk(BaseAgent):
            def check_health(self):
                return {"disk": True}
        class Healthy(Disk):
            def handle(self, request):
                return request
        def checks_of(agent):
            return [agent.check_health]
        def check_dependencies(graph):  # validates a graph: not a health check
            return [node for node in graph if node not in graph]
    ''',
    "pkg/host.py": """
        class Host:
            def loop(self):
                # evaluates its own health: a health loop
                while True:
                    self.own_health()
            def own_health(self):
                return 1
            def wait(self, backend):
                while backend.health() is None:  # waits on another process: not one
                    pass
    """,
    "pkg/tooling.py": """
        def health_poll():
            while True:
                self.health()
    """,
}


def test_health_code_is_found_in_the_modules_a_host_imports(tmp_path: Path) -> None:
    for name, text in PACKAGE.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(textwrap.dedent(text))
    modules = runtime_modules(tmp_path, ["pkg.main"])
    assert sorted(modules) == ["pkg", "pkg.agent", "pkg.host", "pkg.main"]
    found = health_code(modules)
    assert [s.where for s in found.loops] == ["pkg.host.Host.loop"]
    assert {s.where: s.lines for s in found.code} == {
        "pkg.agent.Check": 2, "pkg.agent.BaseAgent.check_health": 2,
        "pkg.agent.checks_of": 2, "pkg.host.Host.loop": 3, "pkg.host.Host.own_health": 2}
    assert found.lines == 11
    assert [s.where for s in found.agent_checks] == ["pkg.agent.Disk.check_health"]
