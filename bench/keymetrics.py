"""The roadmap's key metrics, measured on the deployed lab beside the old way, in one run.

1. Deploy the reference system (`site.yml` on the lab; whether its images were cached is said).
2. Cold start: remove the agent hosts and launch them again; the launcher's first start to
   all instances healthy, and each layer.
3. Under load over every agent (each worker also calls its dependencies): resident memory,
   ZeroMQ contexts, established TCP connections and listening ports, read from /proc in
   each container's own namespace (agentlink.devtools.footprint).
4. The old way, the same 85 agents as one process (container) each, each with its own
   health port, started one by one: the same figures, measured the same way.
5. Health loops and health-check code in the source an agent host imports; image sizes.
Then the lab is put back as `make deploy` left it, and the table is printed and written to
docs/benchmarks.json and the key-metrics section of docs/benchmarks.md.

Run: `make bench` (or `.venv/bin/python bench/keymetrics.py [--no-docs]`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import psutil
import yaml
from deploy import image_sizes, playbook
from docs_section import write_section
from ha import lab_sentinels

from agentlink.deploy.docker_backend import LABEL_GROUP
from agentlink.devtools.footprint import (
    ProcessFootprint,
    connections,
    health_code,
    local_ends,
    runtime_modules,
    tree_footprint,
)
from agentlink.devtools.load import DEFAULT_TARGETS, BackgroundLoad, LoadSpec
from agentlink.runtime.client import FailoverClient, operator_registry
from agentlink.topology import Topology, load

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "topology" / "agents.yml"
AGENTS = "bench/agents.yml"  # images (cached), configs, agent hosts
DOCS = ROOT / "docs"
MB = 2**20
LOAD_RATE = 100.0  # requests/s over every agent
LOAD_SETTLE_S = 8.0  # load runs this long before the system is read: connections are open
# Agents the load generator's own kinds reach; every other agent gets a worker's request.
BY_KIND = {"RequestCoordinator", "SystemDigitalTwin", "MemoryOrchestratorService"}


# --- the old way ---------------------------------------------------------------------------

def old_way_topology(reference: Topology) -> dict[str, Any]:
    """The same agents, one host process each (no replicas: the old system had none), each
    with its own ports; no CPU cap, so the old way's start is not slowed by our limits."""
    next_port: Counter[str] = Counter()
    agents = []
    for agent in reference.agents.values():
        placement = agent.placements[0]
        port = 7100 + 2 * next_port[placement.machine]
        next_port[placement.machine] += 1
        agents.append({
            "name": agent.name, "class": agent.cls, "machine": placement.machine,
            "group": f"{placement.machine}-{agent.name.lower()}", "port": port,
            "depends_on": list(agent.depends_on), "stateful": agent.stateful,
            "options": dict(agent.options), "health_timeout": agent.health_timeout,
            "resources": {"memory": f"{int(agent.memory_mb)}M", "cpus": 1.0}})
    machines = {name: dict(spec or {}) for name, spec in reference.machines.items()}
    return {"version": 1, "machines": machines, "agents": agents}


# --- reading the running system ------------------------------------------------------------

def read_processes(engine: docker.DockerClient
                   ) -> tuple[list[ProcessFootprint], list[ProcessFootprint]]:
    """Every process of the project's containers: (agent hosts, infrastructure)."""
    agents: list[ProcessFootprint] = []
    infrastructure: list[ProcessFootprint] = []
    for container in engine.containers.list(filters={"name": "agentlink-"}):
        held = tree_footprint(container.attrs["State"]["Pid"])
        (agents if LABEL_GROUP in container.labels else infrastructure).extend(held)
    return agents, infrastructure


def connection_kinds(agents: list[ProcessFootprint], infrastructure: list[ProcessFootprint]
                     ) -> dict[str, int]:
    agent_ends, infra_ends = local_ends(agents), local_ends(infrastructure)
    kinds: Counter[str] = Counter()
    for conn in connections(agents + infrastructure):
        if not conn <= agent_ends | infra_ends:
            kinds["from outside (load generator)"] += 1
        elif conn <= agent_ends:
            kinds["between agents"] += 1
        elif conn <= infra_ends:
            kinds["within the infrastructure"] += 1
        else:
            kinds["agents to Redis and Sentinel"] += 1
    return dict(kinds)


def measure(engine: docker.DockerClient, topology: Topology) -> dict[str, Any]:
    """The running system's figures, read while a load over every agent runs."""
    client = FailoverClient(operator_registry({"sentinels": lab_sentinels(),
                                               "service": "agentlink"}))
    targets = (*DEFAULT_TARGETS, *(f"agent:{a}" for a in topology.agents if a not in BY_KIND))
    spec = LoadSpec(rate=LOAD_RATE, duration=600, workers=16, timeout=10.0, targets=targets)
    with BackgroundLoad(client, spec) as loader:
        time.sleep(LOAD_SETTLE_S)
        agents, infrastructure = read_processes(engine)
        report = loader.stop()
    if report is None:
        raise SystemExit("bench/keymetrics.py: the load generator did not finish")
    everything = agents + infrastructure
    return {
        "agent_processes": len(agents),
        "agent_rss_mb": round(sum(p.rss for p in agents) / MB, 1),
        "agent_pss_mb": round(sum(p.pss for p in agents) / MB, 1),
        "all_rss_mb": round(sum(p.rss for p in everything) / MB, 1),
        "zmq_contexts": sum(p.zmq_contexts for p in agents),
        "connections": connection_kinds(agents, infrastructure),
        "agent_ports": sum(len(p.listening) for p in agents),
        "infrastructure_ports": sum(len(p.listening) for p in infrastructure),
        "load": {"sent": report.sent, "failed": report.failed},
    }


# --- the run -------------------------------------------------------------------------------

def launch(*extra_vars: str) -> dict[str, Any]:
    """Remove the agent hosts, then launch them: the cold start, from the launcher's result."""
    playbook(AGENTS, "agents_state=absent", *extra_vars)
    run = playbook(AGENTS, *extra_vars)
    return {"seconds": run["launch_seconds"], "layers": run["layers"]}


def run_new(engine: docker.DockerClient, reference: Topology) -> dict[str, Any]:
    print("cold start of the reference system ...", flush=True)
    start = launch()
    print("measuring it under load ...", flush=True)
    return {"start": start, **measure(engine, reference)}


def run_old(engine: docker.DockerClient, reference: Topology, workdir: Path) -> dict[str, Any]:
    old_path = workdir / "old-way.yml"
    old_path.write_text(yaml.safe_dump(old_way_topology(reference), sort_keys=False))
    old = load(old_path)
    topology = f"agentlink_topology={old_path}"
    print("removing the reference system's agent hosts ...", flush=True)
    playbook(AGENTS, "agents_state=absent")
    try:
        print(f"the old way: {len(old.groups)} processes, started one by one ...", flush=True)
        start = launch(topology, "agents_start_one_by_one=true")
        print("measuring it under load ...", flush=True)
        figures = measure(engine, old)
    finally:
        print("removing the old way, putting the reference system back ...", flush=True)
        playbook(AGENTS, "agents_state=absent", topology)
        playbook(AGENTS)
    return {"start": start, **figures}


def present_images() -> set[str] | None:
    """The project's image references, if every one of them is in the engine."""
    manifest = ROOT / "build" / "images.json"
    if not manifest.exists():
        return None
    engine = docker.from_env()
    refs = set(json.loads(manifest.read_text())["images"].values())
    return refs if all(engine.images.list(name=ref) for ref in refs) else None


def machine() -> dict[str, Any]:
    release = dict(line.split("=", 1) for line in
                   Path("/etc/os-release").read_text().splitlines() if "=" in line)
    return {"os": release.get("PRETTY_NAME", "").strip('"'), "cores": psutil.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30),
            "python": platform.python_version(),
            "docker": docker.from_env().version()["Version"]}


def health_figures(reference: Topology) -> dict[str, Any]:
    roots = ["agentlink.__main__", "agentlink.runtime.startup_config", "agentlink.runtime.host",
             *{agent.cls.split(":")[0] for agent in reference.agents.values()}]
    found = health_code(runtime_modules(ROOT / "src", roots))
    return {"loops": [s.where for s in found.loops], "lines": found.lines,
            "code": {s.where: s.lines for s in found.code},
            "agent_checks": {s.where: s.lines for s in found.agent_checks}}


# --- the table -----------------------------------------------------------------------------

@dataclass
class Row:
    metric: str
    measured: float
    baseline: str = "-"  # the roadmap's
    target: str = "-"  # the roadmap's final target
    target_bound: float | None = None  # the most the target allows
    goal: str = "-"  # ours (DESIGN.md)
    goal_bound: float | None = None
    old_way: float | None = None  # the same figure of the old way, same run

    def cells(self) -> list[str]:
        def within(bound: float | None) -> str:
            return "-" if bound is None else ("yes" if self.measured <= bound else "**no**")
        ratio = (f"{self.old_way / self.measured:.1f}x" if self.old_way and self.measured
                 else "-")
        return [self.metric, self.baseline, self.target, self.goal, _number(self.measured),
                within(self.target_bound), within(self.goal_bound),
                "-" if self.old_way is None else _number(self.old_way), ratio]


HEADER = ["metric", "roadmap baseline", "roadmap final target", "our goal", "measured",
          "beats target", "meets goal", "old way, same run", "old ÷ new"]


def _number(value: float) -> str:
    return f"{value:g}" if float(value).is_integer() else f"{value:.1f}"


def rows(new: dict[str, Any], old: dict[str, Any], health: dict[str, Any],
         images: dict[str, Any], machines: list[str]) -> list[Row]:
    machine_images = [images["images_mb"][name] for name in machines]
    between = "between agents"
    infra = "agents to Redis and Sentinel"
    hosts = new["agent_processes"]
    return [
        Row("memory of all agent processes, resident MB", new["agent_rss_mb"], "~3 GB",
            "1.8 GB", 1800, "≤ 0.6 GB", 600, old["agent_rss_mb"]),
        Row("&nbsp;&nbsp;the same, shared pages counted once (proportional, PSS) MB",
            new["agent_pss_mb"], old_way=old["agent_pss_mb"]),
        Row("&nbsp;&nbsp;everything the project runs (Redis, Sentinels, monitoring) MB",
            new["all_rss_mb"], old_way=old["all_rss_mb"]),
        Row("cold start, launcher's first start to all healthy, s", new["start"]["seconds"],
            "3-5 min", "1-2 min", 120, "≤ 20 s", 20, old["start"]["seconds"]),
        Row("ZeroMQ contexts", new["zmq_contexts"], "120", "10", 10,
            f"= host processes ({hosts})", hosts, old["zmq_contexts"]),
        Row("TCP connections between agents, under load", new["connections"].get(between, 0),
            "200+", "10-20", 20, old_way=old["connections"].get(between, 0)),
        Row("&nbsp;&nbsp;agents to Redis and Sentinel (listed apart)",
            new["connections"].get(infra, 0), old_way=old["connections"].get(infra, 0)),
        Row("health-check implementations (health loops)", len(health["loops"]), "40+", "1", 1,
            "1", 1),
        Row("health-check code, lines", health["lines"], "1000+", "50-100", 100, "≤ 100", 100),
        Row("image size per machine, MB (largest)", round(max(machine_images), 1), "2-3 GB",
            "1.2-1.8 GB", 1800, "≤ 150 MB", 150),
        Row("&nbsp;&nbsp;machine images and their base, shared layers stored once, MB",
            round(images["agent_images_stored_mb"], 1)),
        Row("&nbsp;&nbsp;all images (with Redis, exporters, Prometheus), stored once, MB",
            round(images["stored_mb"], 1)),
        Row("listening ports of the agents", new["agent_ports"], "170+", "10-20", 20, "≤ 20", 20,
            old["agent_ports"]),
        Row("&nbsp;&nbsp;listening ports of the infrastructure (listed apart)",
            new["infrastructure_ports"], old_way=old["infrastructure_ports"]),
    ]


def markdown(result: dict[str, Any], table: list[Row]) -> str:
    m = result["machine"]
    new, old, health = result["new"], result["old_way"], result["health"]
    lines = [
        f"Measured {result['measured_at']} on {m['os']}, {m['cores']} cores, "
        f"{m['memory_gb']} GB, Python {m['python']}, Docker {m['docker']}, with "
        f"`{result['command']}` after `make deploy` (images "
        f"{'cached' if result['images_cached'] else 'built in this run'}).",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|---|---|---|---|---:|---|---|---:|---:|",
        *("| " + " | ".join(row.cells()) + " |" for row in table),
        "",
        f"- The reference system: {new['agent_processes']} agent host processes; the old way: "
        f"{old['agent_processes']}, one per agent, each with its own ZeroMQ context and "
        "health port, started one by one (each healthy before the next).",
        "- Cold start per layer: " + ", ".join(f"layer {n}: {s:.2f} s"
                                               for n, s in new["start"]["layers"]) + ".",
        f"- Under load: {LOAD_RATE:g} requests/s over every agent (each worker also calls its "
        f"dependencies), read after {LOAD_SETTLE_S:g} s; failed requests: "
        f"{new['load']['failed']} of {new['load']['sent']} (old way: "
        f"{old['load']['failed']} of {old['load']['sent']}).",
        "- Connections of each kind: " + "; ".join(
            f"{kind}: {count} (old way {old['connections'].get(kind, 0)})"
            for kind, count in sorted(new["connections"].items())) + ".",
        "- The health loop: " + ", ".join(f"`{w}`" for w in health["loops"])
        + "; health-check code: " + ", ".join(f"`{w}` {n}" for w, n in health["code"].items())
        + " (lines of code, no blank lines, comments or docstrings). Agents' own checks, "
        "listed apart: " + ", ".join(f"`{w}` {n}" for w, n in health["agent_checks"].items())
        + ".",
    ]
    return "\n".join(lines)


def print_table(table: list[Row]) -> None:
    cells = [HEADER, *(row.cells() for row in table)]
    widths = [max(len(c[i].replace("&nbsp;", " ")) for c in cells) for i in range(len(HEADER))]
    for row in cells:
        print("  ".join(c.replace("&nbsp;", " ").ljust(w) for c, w in zip(row, widths,
                                                                          strict=True)))


def write_docs(result: dict[str, Any], table: list[Row]) -> None:
    (DOCS / "benchmarks.json").write_text(json.dumps(result, indent=2) + "\n")
    write_section("key-metrics", "Key metrics", markdown(result, table))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-docs", action="store_true",
                        help="print the table only; leave docs/benchmarks.* alone")
    args = parser.parse_args()
    engine = docker.from_env()
    reference = load(REFERENCE)
    before = present_images()
    print("deploying the reference system (site.yml on the lab) ...", flush=True)
    playbook("site.yml")
    cached = before is not None and before == present_images()
    with tempfile.TemporaryDirectory(prefix="agentlink-bench-") as tmp:
        new = run_new(engine, reference)
        old = run_old(engine, reference, Path(tmp))
    result = {
        "measured_at": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(), "command": "make bench", "images_cached": cached,
        "new": new, "old_way": old, "health": health_figures(reference),
        "images": image_sizes(reference.machines),
    }
    table = rows(new, old, result["health"], result["images"], list(reference.machines))
    result["table"] = [dict(zip(HEADER, row.cells(), strict=True)) for row in table]
    print()
    print_table(table)
    if not args.no_docs:
        write_docs(result, table)
        print("\nwritten: docs/benchmarks.json, docs/benchmarks.md (key metrics)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
