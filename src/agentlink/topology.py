"""The topology file: every agent's class, placement, dependencies, replicas and limits.

This module is the only parser of `topology/agents.yml`; the runtime, the launcher and the
Ansible toolkit all read the system through it. `validate()` reports every problem at once.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import yaml

from agentlink.runtime.agent import load_class

AGENT_KEYS = {
    "name", "class", "machine", "group", "port", "placement", "depends_on", "replicas",
    "stateful", "resources", "health_timeout", "concurrency", "options",
}
PLACEMENT_KEYS = {"machine", "group", "port"}
TOP_KEYS = {"version", "machines", "defaults", "agents"}
DEFAULT_KEYS = {"resources", "health_timeout", "concurrency"}
# Requests one instance takes at once from the workflow scheduler, unless the topology says.
DEFAULT_CONCURRENCY = 8
DEFAULT_HEALTH_TIMEOUT_S = 15.0  # how long an agent may take to get healthy, by default
MACHINE_KEYS = {"address_env"}
RESOURCE_KEYS = {"memory", "cpus"}
CLASS_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
MEMORY_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([MG])i?B?$", re.IGNORECASE)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a topology or workflow file, located where possible."""

    message: str
    line: int | None = None

    def format(self, path: str) -> str:
        return f"{path}:{self.line}: {self.message}" if self.line else f"{path}: {self.message}"


class ProblemsError(Exception):
    """Every problem found in one document, one `path:line: message` line each."""

    def __init__(self, path: str, problems: list[Problem]) -> None:
        self.path = path
        self.problems = problems
        super().__init__("\n".join(p.format(path) for p in problems))


class TopologyError(ProblemsError):
    pass


@dataclass(frozen=True)
class Placement:
    machine: str
    group: str
    port: int


@dataclass(frozen=True)
class Agent:
    name: str
    cls: str
    placements: tuple[Placement, ...]
    depends_on: tuple[str, ...] = ()
    stateful: bool = False
    memory_mb: float = 32.0
    cpus: float = 0.1
    health_timeout: float = DEFAULT_HEALTH_TIMEOUT_S
    concurrency: int = DEFAULT_CONCURRENCY
    options: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def replicas(self) -> int:
        return len(self.placements)


@dataclass(frozen=True)
class Instance:
    """One running copy of an agent; its id is unique in the system."""

    agent: Agent
    index: int
    placement: Placement

    @property
    def id(self) -> str:
        return f"{self.agent.name}-{self.index}"


@dataclass
class Group:
    """One agent host process: a ROUTER port, an HTTP port (port + 1), its instances."""

    name: str
    machine: str
    port: int
    instances: list[Instance] = field(default_factory=list)

    @property
    def http_port(self) -> int:
        return self.port + 1

    @property
    def memory_mb(self) -> float:
        return sum(i.agent.memory_mb for i in self.instances)

    @property
    def cpus(self) -> float:
        return sum(i.agent.cpus for i in self.instances)


@dataclass
class Topology:
    path: str
    machines: dict[str, dict[str, Any]]
    agents: dict[str, Agent]
    lines: dict[str, int | None] = field(default_factory=dict)  # agent -> its line in path

    def where(self, agent: str) -> str:
        """`path:line` of an agent's entry, for messages about it."""
        line = self.lines.get(agent)
        return f"{self.path}:{line}" if line else self.path

    def address_env(self, machine: str) -> str:
        """The environment variable holding a machine's address: MAIN_PC_HOST, PC2_HOST."""
        default = f"{machine.upper().replace('-', '_')}_HOST"
        return str((self.machines.get(machine) or {}).get("address_env", default))

    # A topology does not change once loaded: what is derived from it is computed once.
    @cached_property
    def instances(self) -> list[Instance]:
        return [
            Instance(agent, index, placement)
            for agent in self.agents.values()
            for index, placement in enumerate(agent.placements, start=1)
        ]

    @cached_property
    def groups(self) -> dict[str, Group]:
        groups: dict[str, Group] = {}
        for inst in self.instances:
            p = inst.placement
            groups.setdefault(p.group, Group(p.group, p.machine, p.port)).instances.append(inst)
        return groups

    def groups_on(self, machine: str) -> list[Group]:
        """The agent hosts (groups) a machine runs, in topology order."""
        return [g for g in self.groups.values() if g.machine == machine]

    def layers(self) -> list[list[str]]:
        """Agent names by start layer: an agent starts one layer after its latest dependency."""
        return [list(names) for names in self._layers]

    @cached_property
    def _layers(self) -> tuple[tuple[str, ...], ...]:
        return tuple(tuple(names) for names in
                     layers_of({a.name: a.depends_on for a in self.agents.values()}))

    def layer_of(self) -> dict[str, int]:
        return {name: i for i, names in enumerate(self._layers) for name in names}

    def group_layer(self, group: Group) -> int:
        """A host process starts at the layer of its earliest agent."""
        layer = self.layer_of()
        return min(layer[i.agent.name] for i in group.instances)


# --- loading with line numbers (workflow definitions load the same way) --------------------


class LineDict(dict[Hashable, Any]):
    line: int = 0


class LineLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> LineDict:
        mapping = LineDict(super().construct_mapping(node, deep=deep))
        mapping.line = node.start_mark.line + 1
        return mapping


LineLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    lambda loader, node: loader.construct_mapping(node, deep=True),  # type: ignore[arg-type]
)


def line_of(obj: Any) -> int | None:
    return getattr(obj, "line", None)


def parse_memory(value: Any) -> float | None:
    """'64M', '1G', 48 (MB) -> megabytes; None when it is not a size."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    match = MEMORY_RE.match(str(value).strip())
    if not match:
        return None
    number, unit = float(match.group(1)), match.group(2).upper()
    return number * 1024 if unit == "G" else number


def read_document(path: str, error: type[ProblemsError]) -> Any:
    """A YAML (or JSON) file whose mappings know their line; an unreadable file or a syntax
    error raises `error` naming the file and the line."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise error(path, [Problem(f"cannot read file: {err.strerror}")]) from err
    try:
        return yaml.load(text, Loader=LineLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = mark.line + 1 if mark else None
        reason = getattr(err, "problem", None) or str(err)
        raise error(path, [Problem(f"YAML syntax error: {reason}", line)]) from err


# --- validation ---------------------------------------------------------------------------


def validate(path: str | Path) -> list[Problem]:
    try:
        load(path)
    except TopologyError as err:
        return err.problems
    return []


def load(path: str | Path) -> Topology:
    """Parse and check a topology file; raise TopologyError listing every problem."""
    path = str(path)
    doc = read_document(path, TopologyError)
    checker = _Checker()
    topology = checker.validate(path, doc)
    if checker.problems:
        raise TopologyError(path, checker.problems)
    return topology


def load_once(path: str | Path) -> Topology:
    """`load`, parsed once per version of the file in this process: Ansible's templating
    calls the filters for every host and task, each with the topology's path. A topology
    is never changed once loaded, so callers can share one."""
    stat = Path(path).stat()
    return _load_version(str(path), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=8)
def _load_version(path: str, mtime_ns: int, size: int) -> Topology:
    return load(path)


class _Checker:
    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def add(self, message: str, line: int | None) -> None:
        self.problems.append(Problem(message, line))

    def unknown_keys(self, mapping: dict[str, Any], allowed: set[str], where: str) -> None:
        for key in sorted(set(mapping) - allowed):
            self.add(f"unknown key '{key}' in {where} (allowed: {', '.join(sorted(allowed))})",
                     line_of(mapping))

    def validate(self, path: str, doc: Any) -> Topology:
        if not isinstance(doc, dict):
            self.add("the file must be a mapping with 'machines' and 'agents'", None)
            return Topology(path, {}, {})
        self.unknown_keys(doc, TOP_KEYS, "the top level")
        machines = doc.get("machines") or {}
        if not isinstance(machines, dict) or not machines:
            self.add("'machines' must map each machine name to its settings", line_of(doc))
            machines = {}
        for name, settings in machines.items():
            if not isinstance(settings, dict):
                self.add(f"machine '{name}': settings must be a mapping (or {{}})", line_of(doc))
                continue
            self.unknown_keys(settings, MACHINE_KEYS, f"machine '{name}'")
        defaults = doc.get("defaults") or {}
        if isinstance(defaults, dict):
            self.unknown_keys(defaults, DEFAULT_KEYS, "defaults")
        raw_agents = doc.get("agents")
        if not isinstance(raw_agents, list) or not raw_agents:
            self.add("'agents' must be a non-empty list", line_of(doc))
            raw_agents = []
        agents: dict[str, Agent] = {}
        for raw in raw_agents:
            agent = self.agent(raw, defaults, machines)
            if agent is None:
                continue
            if agent.name in agents:
                self.add(f"duplicate agent name '{agent.name}'", line_of(raw))
                continue
            agents[agent.name] = agent
        lines = {r["name"]: line_of(r) for r in raw_agents
                 if isinstance(r, dict) and isinstance(r.get("name"), str)}
        topology = Topology(path, dict(machines), agents,
                            {name: lines.get(name) for name in agents})
        self.dependencies(agents, lines)
        self.groups(topology, lines)
        return topology

    def agent(self, raw: Any, defaults: dict[str, Any], machines: dict[str, Any]) -> Agent | None:
        if not isinstance(raw, dict):
            self.add(f"an agent must be a mapping, got {raw!r}", None)
            return None
        line = line_of(raw)
        self.unknown_keys(raw, AGENT_KEYS, f"agent '{raw.get('name', '?')}'")
        name = raw.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z][\w-]*", name):
            self.add(f"agent name must be a word, got {name!r}", line)
            return None
        cls = raw.get("class")
        if not isinstance(cls, str) or not CLASS_RE.match(cls):
            self.add(f"agent '{name}': class must be 'module:Class', got {cls!r}", line)
        placements = self.placements(name, raw, machines)
        depends = raw.get("depends_on") or []
        if not isinstance(depends, list) or not all(isinstance(d, str) for d in depends):
            self.add(f"agent '{name}': depends_on must be a list of agent names", line)
            depends = []
        resources = {**(defaults.get("resources") or {}), **(raw.get("resources") or {})}
        self.unknown_keys(resources, RESOURCE_KEYS, f"resources of agent '{name}'")
        memory = parse_memory(resources.get("memory", 32))
        if memory is None:
            self.add(f"agent '{name}': memory must be like '64M' or '1G'", line)
        cpus = resources.get("cpus", 0.1)
        if not isinstance(cpus, int | float) or cpus <= 0:
            self.add(f"agent '{name}': cpus must be a positive number", line)
            cpus = 0.1
        timeout = raw.get("health_timeout",
                          defaults.get("health_timeout", DEFAULT_HEALTH_TIMEOUT_S))
        if not isinstance(timeout, int | float) or timeout <= 0:
            self.add(f"agent '{name}': health_timeout must be a positive number of seconds", line)
            timeout = DEFAULT_HEALTH_TIMEOUT_S
        concurrency = raw.get("concurrency", defaults.get("concurrency", DEFAULT_CONCURRENCY))
        if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
            self.add(f"agent '{name}': concurrency must be a whole number of requests, 1 or more",
                     line)
            concurrency = DEFAULT_CONCURRENCY
        return Agent(
            name=name, cls=str(cls), placements=tuple(placements), depends_on=tuple(depends),
            stateful=bool(raw.get("stateful", False)), memory_mb=memory or 32.0,
            cpus=float(cpus), health_timeout=float(timeout), concurrency=concurrency,
            options=dict(raw.get("options") or {}),
        )

    def placements(self, name: str, raw: dict[str, Any],
                   machines: dict[str, Any]) -> list[Placement]:
        line = line_of(raw)
        if "placement" in raw:
            entries = raw["placement"]
            if not isinstance(entries, list) or not entries:
                self.add(f"agent '{name}': placement must be a list of machine/group/port", line)
                return []
            for key in PLACEMENT_KEYS & set(raw):
                self.add(f"agent '{name}': '{key}' goes inside placement when it is given", line)
        else:
            entries = [raw]
        replicas = raw.get("replicas", len(entries))
        if replicas != len(entries):
            self.add(f"agent '{name}': replicas is {replicas} "
                     f"but {len(entries)} placement(s) given", line)
        result = []
        for entry in entries:
            if entry is not raw:
                self.unknown_keys(entry, PLACEMENT_KEYS, f"placement of agent '{name}'")
            where = line_of(entry) or line
            machine, group, port = entry.get("machine"), entry.get("group"), entry.get("port")
            if machine not in machines:
                known = ", ".join(machines) or "none"
                self.add(f"agent '{name}': unknown machine {machine!r} (known: {known})", where)
            if not isinstance(group, str) or not group:
                self.add(f"agent '{name}': group must be the name of its host process", where)
                continue
            if not isinstance(port, int) or not 1024 <= port <= 65534:
                self.add(f"agent '{name}': port must be a number from 1024 to 65534", where)
                continue
            result.append(Placement(str(machine), group, port))
        seen: set[str] = set()
        for p in result:
            if p.group in seen:
                self.add(f"agent '{name}': two replicas in one process (group '{p.group}'); "
                         "replicas must live in different groups", line)
            seen.add(p.group)
        return result

    def dependencies(self, agents: dict[str, Agent], lines: dict[str, int | None]) -> None:
        check_dependencies({a.name: a.depends_on for a in agents.values()}, "agent",
                           lambda message, name: self.add(message, lines.get(name)))

    def groups(self, topology: Topology, lines: dict[str, int | None]) -> None:
        machine_of: dict[str, str] = {}
        port_of: dict[str, int] = {}
        for inst in topology.instances:
            p, line = inst.placement, lines.get(inst.agent.name)
            if machine_of.setdefault(p.group, p.machine) != p.machine:
                self.add(f"group '{p.group}' is spread over two machines: "
                         f"{machine_of[p.group]} and {p.machine} (agent '{inst.agent.name}')", line)
            if port_of.setdefault(p.group, p.port) != p.port:
                self.add(f"group '{p.group}' has two ports: {port_of[p.group]} and {p.port} "
                         f"(agent '{inst.agent.name}'); all agents of a group share its port", line)
        owner: dict[tuple[str, int], str] = {}
        clashes: dict[tuple[str, str], tuple[str, int]] = {}
        for group, port in port_of.items():
            for used in (port, port + 1):  # ROUTER port and HTTP port
                key = (machine_of[group], used)
                if key in owner and owner[key] != group:
                    clashes.setdefault((owner[key], group), key)
                owner.setdefault(key, group)
        first_line: dict[str, int | None] = {}
        for inst in topology.instances:
            first_line.setdefault(inst.placement.group, lines.get(inst.agent.name))
        for (first, second), (machine, port) in clashes.items():
            self.add(f"groups '{first}' and '{second}' both use port {port} on {machine} "
                     "(a group uses its port and port + 1)", first_line.get(second))


def check_dependencies(depends_on: Mapping[str, Iterable[str]], kind: str,
                       add: Callable[[str, str], None]) -> tuple[dict[str, list[str]],
                                                                 list[list[str]]]:
    """Name each dependency on an unknown {kind} and each cycle, as add(message, the node it
    is about); return the graph of the known dependencies and its cycles."""
    for node, deps in depends_on.items():
        for dep in deps:
            if dep not in depends_on:
                add(f"{kind} '{node}' depends on unknown {kind} '{dep}'", node)
    graph = {node: [d for d in deps if d in depends_on] for node, deps in depends_on.items()}
    cycles = find_cycles(graph)
    for cycle in cycles:
        add(f"dependency cycle: {' -> '.join(cycle)}", cycle[0])
    return graph, cycles


def find_cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """One cycle per strongly connected component, in dependency order, closed: [a, b, a]."""
    cycles = []
    for component in _strongly_connected(graph):
        members = set(component)
        start = min(members, key=list(graph).index)
        if len(members) == 1 and start not in graph[start]:
            continue
        cycles.append(_cycle_from(start, graph, members))
    return cycles


def _cycle_from(start: str, graph: dict[str, list[str]], members: set[str]) -> list[str]:
    path, seen = [start], {start}
    node = start
    while True:
        nexts = [n for n in graph[node] if n in members]
        if start in nexts:
            return [*path, start]
        node = next((n for n in nexts if n not in seen), nexts[0])
        if node in seen:  # closed a loop not through start: report that loop
            return [*path[path.index(node):], node]
        path.append(node)
        seen.add(node)


def _strongly_connected(graph: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative so a long chain cannot hit the recursion limit."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    result: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                result.append(component)
    return result


def layers_of(graph: dict[str, Iterable[str]]) -> list[list[str]]:
    """Longest-path layering of an acyclic graph; names keep file order within a layer."""
    layer: dict[str, int] = {}

    def depth(name: str) -> int:
        if name not in layer:
            layer[name] = 1 + max((depth(d) for d in graph[name] if d in graph), default=-1)
        return layer[name]

    for name in graph:
        depth(name)
    result: list[list[str]] = [[] for _ in range(max(layer.values(), default=-1) + 1)]
    for name in graph:
        result[layer[name]].append(name)
    return result


def import_problems(topology: Topology) -> list[Problem]:
    """Every agent whose class does not import (a typo in the module or the class, an error
    in its module), found before anything starts, at the agent's line."""
    problems = []
    for agent in topology.agents.values():
        try:
            load_class(agent.cls)
        except Exception as err:  # whatever the module raises: it is the author's
            problems.append(Problem(f"agent '{agent.name}': class {agent.cls} does not "
                                    f"import: {type(err).__name__}: {err}",
                                    topology.lines.get(agent.name)))
    return problems
