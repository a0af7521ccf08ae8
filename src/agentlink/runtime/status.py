"""What runs where, and how it is: every instance of the topology, from the registry and a
live probe of its host's /health."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from agentlink.runtime.registry import Registry
from agentlink.topology import Topology

Probe = Callable[[str], dict[str, Any] | None]


def fetch_health(url: str, timeout: float = 0.5) -> dict[str, Any] | None:
    """GET a /health URL; the JSON body of a 503 is an answer too. None if no answer.

    An answer that is not HTTP is no answer either: probing a port in the ephemeral range
    that nothing listens on, the kernel may connect the probe to itself (TCP simultaneous
    open), and the probe then reads back its own request."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as response:
            return dict(json.load(response))
    except urllib.error.HTTPError as err:
        try:
            return dict(json.load(err))
        except ValueError:
            return None
    except (OSError, ValueError, http.client.HTTPException):
        return None


@dataclass
class InstanceStatus:
    machine: str
    layer: int
    group: str
    agent: str
    instance: str
    registered: bool
    state: str
    drained: bool = False

    @property
    def serving(self) -> bool:
        return self.registered and self.state in ("healthy", "degraded") and not self.drained


def collect(topology: Topology, registry: Registry, probe: Probe) -> list[InstanceStatus]:
    layer = topology.layer_of()
    records = {r.instance: r for name in topology.agents for r in registry.records(name)}
    answers: dict[str, dict[str, Any] | None] = {}
    rows = []
    for inst in topology.instances:
        record = records.get(inst.id)
        state = "unregistered"
        if record is not None:
            if record.http not in answers:
                answers[record.http] = probe(record.http)
            live = (answers[record.http] or {}).get("agents", {}).get(inst.id)
            state = live["state"] if live else "not answering"
        rows.append(InstanceStatus(
            machine=inst.placement.machine, layer=layer[inst.agent.name],
            group=inst.placement.group, agent=inst.agent.name, instance=inst.id,
            registered=record is not None, state=state,
            drained=bool(record and record.drained)))
    return sorted(rows, key=lambda r: (r.machine, r.layer, r.instance))


def as_json(rows: list[InstanceStatus]) -> dict[str, Any]:
    return {"healthy": all(r.serving for r in rows),
            "total": len(rows), "serving": sum(r.serving for r in rows),
            "instances": [asdict(r) for r in rows]}


def as_table(rows: list[InstanceStatus]) -> str:
    header = ("MACHINE", "LAYER", "GROUP", "INSTANCE", "STATE")
    lines = [(r.machine, str(r.layer), r.group, r.instance,
              r.state + (" (drained)" if r.drained else "")) for r in rows]
    widths = [max(len(x[i]) for x in [header, *lines]) for i in range(len(header))]
    out = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
           for row in [header, *lines]]
    serving = sum(r.serving for r in rows)
    machines = len({r.machine for r in rows})
    out.append(f"{serving}/{len(rows)} instances serving on {machines} machine(s)")
    return "\n".join(out)
