"""What a running system holds, read where it is held.

From /proc, per process and inside the process's own network namespace: resident and
proportional memory (PSS: a page shared by n processes counts 1/n in each, so a sum over
processes counts every page once, where a sum of resident sizes counts the interpreter and
the libraries every process maps again for each), ZeroMQ contexts (libzmq names each
context's reaper thread `ZMQbg/Reaper`; a context that never opened a socket has none, and
holds nothing), established TCP connections and listening ports. From the source: the
health loops and the lines of health-check code. Used by bench/keymetrics.py; nothing here
estimates.
"""

from __future__ import annotations

import ast
import ipaddress
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

TCP_ESTABLISHED = "01"
TCP_LISTEN = "0A"
ZMQ_CONTEXT_THREAD = "ZMQbg/Reaper"

Address = tuple[str, int]
Definition = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef


@dataclass
class ProcessFootprint:
    pid: int
    rss: int  # bytes
    pss: int  # bytes: shared pages divided among the processes that map them
    zmq_contexts: int
    listening: set[Address] = field(default_factory=set)
    established: set[tuple[Address, Address]] = field(default_factory=set)  # (local, remote)


def _address(hex_address: str) -> Address:
    """An address of /proc/net/tcp{,6}: hex IP in the kernel's byte order, hex port."""
    ip_hex, port_hex = hex_address.split(":")
    raw = bytes.fromhex(ip_hex)
    # The kernel prints each 32-bit word of the address in host (little-endian) order.
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(raw)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), int(port_hex, 16)


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed while we looked
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    return inodes


def tcp_sockets(pid: int) -> tuple[set[Address], set[tuple[Address, Address]]]:
    """(listening addresses, established (local, remote) pairs) of one process.

    /proc/<pid>/net/tcp is the table of the process's network namespace (psutil reads the
    caller's), and the process's own socket inodes pick its rows out of it."""
    inodes = _socket_inodes(pid)
    listening: set[Address] = set()
    established: set[tuple[Address, Address]] = set()
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as rows:
            next(rows)
            for row in rows:
                fields = row.split()
                if fields[9] not in inodes:
                    continue
                local, remote = _address(fields[1]), _address(fields[2])
                if fields[3] == TCP_LISTEN:
                    listening.add(local)
                elif fields[3] == TCP_ESTABLISHED:
                    established.add((local, remote))
    return listening, established


def zmq_contexts(pid: int) -> int:
    count = 0
    for comm in Path(f"/proc/{pid}/task").glob("*/comm"):
        try:
            count += comm.read_text().strip() == ZMQ_CONTEXT_THREAD
        except OSError:  # the thread ended while we looked
            continue
    return count


def process_footprint(pid: int) -> ProcessFootprint:
    listening, established = tcp_sockets(pid)
    memory = psutil.Process(pid).memory_full_info()
    return ProcessFootprint(pid, memory.rss, memory.pss, zmq_contexts(pid), listening,
                            established)


def tree_footprint(pid: int) -> list[ProcessFootprint]:
    """The process and all its descendants (a container's init and what it runs)."""
    root = psutil.Process(pid)
    pids = [root.pid] + [child.pid for child in root.children(recursive=True)]
    return [process_footprint(p) for p in pids if psutil.pid_exists(p)]


def connections(processes: Iterable[ProcessFootprint]) -> set[frozenset[Address]]:
    """Distinct TCP connections of these processes: a connection between two of them is
    seen from both ends and counted once."""
    return {frozenset(pair) for proc in processes for pair in proc.established}


def local_ends(processes: Iterable[ProcessFootprint]) -> set[Address]:
    return {local for proc in processes for local, _ in proc.established}


# --- health-check code -------------------------------------------------------------------

# The names the docstring of health_code lists. Not every check_*: check_dependencies
# validates a topology, and counted as health code it added 12 lines that are not.
HEALTH_NAME = re.compile(r"health|^checks?$|^checks_of$|^Check$", re.IGNORECASE)


@dataclass(frozen=True)
class CodeSpan:
    where: str  # module.qualified.name
    lines: int  # lines of code: no blank lines, comments or docstrings


def _docstring_lines(node: ast.AST) -> set[int]:
    lines: set[int] = set()
    for inner in ast.walk(node):
        if isinstance(inner, Definition | ast.Module) and ast.get_docstring(inner) is not None:
            doc = inner.body[0]
            lines.update(range(doc.lineno, (doc.end_lineno or doc.lineno) + 1))
    return lines


def _code_lines(node: Definition, source: list[str]) -> int:
    skip = _docstring_lines(node)
    return sum(1 for number in range(node.lineno, (node.end_lineno or node.lineno) + 1)
               if number not in skip
               and (text := source[number - 1].strip()) and not text.startswith("#"))


def runtime_modules(src: Path, roots: Iterable[str]) -> dict[str, Path]:
    """The package's modules an agent host process imports at start: the module-level
    imports followed from `roots` (imports inside functions are loaded only when used)."""
    found: dict[str, Path] = {}
    pending = list(roots)
    while pending:
        name = pending.pop()
        path = _module_path(src, name)
        if name in found or path is None:
            continue
        found[name] = path
        parent = name.rpartition(".")[0]
        pending.extend([parent] if parent else [])
        for statement in ast.parse(path.read_text()).body:
            if isinstance(statement, ast.Import):
                pending.extend(alias.name for alias in statement.names)
            elif isinstance(statement, ast.ImportFrom) and statement.module:
                pending.append(statement.module)
                pending.extend(f"{statement.module}.{alias.name}" for alias in statement.names)
    return found


def _module_path(src: Path, name: str) -> Path | None:
    base = src.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _agent_classes(trees: Iterable[ast.Module]) -> set[str]:
    """Names of the classes that derive from BaseAgent, directly or through each other."""
    classes = [node for tree in trees for node in ast.walk(tree) if isinstance(node, ast.ClassDef)]
    agents = {"BaseAgent"}
    while new := {c.name for c in classes if c.name not in agents
                  and any(isinstance(b, ast.Name) and b.id in agents for b in c.bases)}:
        agents |= new
    return agents - {"BaseAgent"}


def _calls_own_health(loop: ast.While) -> bool:
    return any(isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
               and isinstance(call.func.value, ast.Name) and call.func.value.id == "self"
               and "health" in call.func.attr for call in ast.walk(loop))


@dataclass
class HealthCode:
    loops: list[CodeSpan] = field(default_factory=list)  # loops that run agents' checks
    code: list[CodeSpan] = field(default_factory=list)  # everything health, loops included
    agent_checks: list[CodeSpan] = field(default_factory=list)  # agents' own check_health

    @property
    def lines(self) -> int:
        return sum(span.lines for span in self.code)


def health_code(modules: dict[str, Path]) -> HealthCode:
    """Health loops and health-check code of these modules.

    A health loop is a `while` loop that evaluates its own process's health (calls
    `self.<...health...>()`); waiting on another process's /health is not one. Health-check
    code is every function or class named for health or checks (`*health*`, `check`,
    `checks_of`, `Check`) and every health loop; an agent's own `check_health` is its
    business, listed apart."""
    sources = {module: path.read_text() for module, path in sorted(modules.items())}
    trees = {module: ast.parse(text) for module, text in sources.items()}
    agents = _agent_classes(trees.values())
    found = HealthCode()
    for module, tree in trees.items():
        _visit(tree, module, sources[module].splitlines(), found, agents, inside_agent=False)
    return found


def _visit(node: ast.AST, where: str, source: list[str], found: HealthCode,
           agents: set[str], inside_agent: bool) -> None:
    for child in ast.iter_child_nodes(node):
        if not isinstance(child, Definition):
            continue
        span = CodeSpan(f"{where}.{child.name}", _code_lines(child, source))
        agent = isinstance(child, ast.ClassDef) and child.name in agents
        if inside_agent and HEALTH_NAME.search(child.name):
            found.agent_checks.append(span)
        elif not agent and HEALTH_NAME.search(child.name):
            found.code.append(span)
        elif not isinstance(child, ast.ClassDef) and any(
                isinstance(n, ast.While) and _calls_own_health(n) for n in ast.walk(child)):
            found.loops.append(span)
            found.code.append(span)
        else:
            _visit(child, span.where, source, found, agents, inside_agent or agent)
