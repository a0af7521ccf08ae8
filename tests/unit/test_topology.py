"""Topology validation reports every problem, located; the reference system is valid."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agentlink import topology as topo

from .conftest import ROOT

REFERENCE = ROOT / "topology" / "agents.yml"
ECHO = "tests.unit.agents:Echo"
HEAD = "machines:\n  mainpc: {}\n  pc2: {}\nagents:\n"


def agent(name: str, group: str = "g", port: int = 7000, machine: str = "mainpc",
          deps: str = "", extra: str = "") -> str:
    dep = f", depends_on: [{deps}]" if deps else ""
    return (f"  - {{name: {name}, class: 'm:C', machine: {machine}, group: {group}, "
            f"port: {port}{dep}{extra}}}\n")


def problems(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "t.yml"
    path.write_text(text)
    return [p.format(str(path)) for p in topo.validate(path)]


def only(tmp_path: Path, text: str) -> str:
    found = problems(tmp_path, text)
    assert len(found) == 1, found
    return found[0]


def test_yaml_syntax_error_is_located(tmp_path: Path) -> None:
    found = only(tmp_path, HEAD + agent("A") + "  - {name: B, class: [\n")
    assert "YAML syntax error" in found
    assert ":7:" in found or ":6:" in found


def test_unknown_key_names_the_key_and_the_line(tmp_path: Path) -> None:
    found = only(tmp_path, HEAD + agent("A") + agent("B", extra=", replica: 2"))
    assert "unknown key 'replica' in agent 'B'" in found
    assert f"{tmp_path / 't.yml'}:6:" in found


def test_duplicate_name(tmp_path: Path) -> None:
    assert "duplicate agent name 'A'" in only(tmp_path, HEAD + agent("A") + agent("A"))


def test_unknown_dependency(tmp_path: Path) -> None:
    found = only(tmp_path, HEAD + agent("A", deps="Ghost"))
    assert "agent 'A' depends on unknown agent 'Ghost'" in found


def test_cycle_is_printed_in_dependency_order(tmp_path: Path) -> None:
    text = HEAD + agent("HealthMonitor", deps="PerformanceMonitor") + \
        agent("PerformanceMonitor", deps="HealthMonitor")
    found = only(tmp_path, text)
    assert "dependency cycle: HealthMonitor -> PerformanceMonitor -> HealthMonitor" in found


def test_longer_cycle_and_self_dependency(tmp_path: Path) -> None:
    text = HEAD + agent("A", deps="B") + agent("B", deps="C") + agent("C", deps="A") + \
        agent("D", deps="D") + agent("E", deps="A")
    found = problems(tmp_path, text)
    assert any("A -> B -> C -> A" in p for p in found)
    assert any("D -> D" in p for p in found)
    assert len(found) == 2  # E depends on a cycle but is not in one


def test_unknown_machine(tmp_path: Path) -> None:
    found = only(tmp_path, HEAD + agent("A", machine="pc3"))
    assert "unknown machine 'pc3' (known: mainpc, pc2)" in found


def test_group_spread_over_two_machines(tmp_path: Path) -> None:
    found = only(tmp_path, HEAD + agent("A") + agent("B", machine="pc2"))
    assert "group 'g' is spread over two machines: mainpc and pc2" in found


def test_two_groups_on_one_port_of_one_machine(tmp_path: Path) -> None:
    found = only(tmp_path, HEAD + agent("A", group="a", port=7000) +
                 agent("B", group="b", port=7000))
    assert "groups 'a' and 'b' both use port 7000 on mainpc" in found


def test_a_port_clash_is_named_at_the_line_of_the_later_group(tmp_path: Path) -> None:
    found = only(tmp_path, HEAD + agent("A", group="a", port=7000) +
                 agent("B", group="b", port=7000))
    assert found.startswith(f"{tmp_path / 't.yml'}:6: groups 'a' and 'b'")  # B's line


def test_a_group_also_uses_port_plus_one(tmp_path: Path) -> None:
    found = only(tmp_path, HEAD + agent("A", group="a", port=7000) +
                 agent("B", group="b", port=7001))
    assert "both use port 7001 on mainpc" in found


def test_same_port_on_two_machines_is_fine(tmp_path: Path) -> None:
    text = HEAD + agent("A", group="a", port=7000) + agent("B", group="b", port=7000,
                                                             machine="pc2")
    assert problems(tmp_path, text) == []


def replicated(replicas: int, *placements: tuple[str, str]) -> str:
    """A replicated agent Twin with one placement (machine, group) per entry, port 7000."""
    lines = "".join(f"      - {{machine: {m}, group: {g}, port: 7000}}\n" for m, g in placements)
    return f"  - name: Twin\n    class: 'm:C'\n    replicas: {replicas}\n    placement:\n{lines}"


def test_replicas_in_one_process(tmp_path: Path) -> None:
    text = HEAD + replicated(2, ("mainpc", "g"), ("mainpc", "g"))
    assert "two replicas in one process (group 'g')" in only(tmp_path, text)


def test_replica_count_must_match_placements(tmp_path: Path) -> None:
    text = HEAD + replicated(3, ("mainpc", "a"), ("pc2", "b"))
    assert "replicas is 3 but 2 placement(s) given" in only(tmp_path, text)


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = HEAD + agent("A", deps="Ghost") + agent("A") + \
        agent("B", group="b", port=7100, machine="pc9") + \
        agent("C", group="c", port=7000, extra=", colour: red")
    found = problems(tmp_path, text)
    assert len(found) == 5, found
    joined = "\n".join(found)
    for needle in ("unknown agent 'Ghost'", "duplicate agent name 'A'", "unknown machine 'pc9'",
                   "unknown key 'colour'", "both use port 7000"):
        assert needle in joined


def test_cli_validate_exits_2_with_one_line_per_problem(tmp_path: Path) -> None:
    path = tmp_path / "t.yml"
    path.write_text(HEAD + agent("HealthMonitor", deps="PerformanceMonitor") +
                    agent("PerformanceMonitor", deps="HealthMonitor") + agent("X", deps="Y"))
    result = subprocess.run([sys.executable, "-m", "agentlink", "validate", str(path)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3
    assert lines[-1] == f"2 problem(s) in {path}"
    assert all(line.startswith(f"{path}:") for line in lines[:-1])


def test_cli_validate_names_every_agent_class_that_does_not_import(tmp_path: Path) -> None:
    path = tmp_path / "t.yml"
    path.write_text(HEAD
                    + "  - {name: Typo,"
                      " class: 'agentlink.runtime.reference.core:RequestCordinator',"
                      " machine: mainpc, group: a, port: 7000}\n"
                    + "  - {name: Gone, class: 'agentlink.refrence.core:RequestCoordinator',"
                      " machine: mainpc, group: b, port: 7010}\n"
                    + "  - {name: NoAgent, class: 'agentlink.topology:Topology',"
                      " machine: mainpc, group: c, port: 7020}\n"
                    + agent("Fine", group="d", port=7030).replace("m:C", ECHO))
    result = subprocess.run([sys.executable, "-m", "agentlink", "validate", str(path)],
                            capture_output=True, text=True, check=False, cwd=ROOT)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[0] == (f"{path}:5: agent 'Typo': class agentlink.runtime.reference.core:"
                        "RequestCordinator does not import: AttributeError: module "
                        "'agentlink.runtime.reference.core' has no attribute 'RequestCordinator'")
    assert lines[1] == (f"{path}:6: agent 'Gone': class agentlink.refrence.core:"
                        "RequestCoordinator does not import: ModuleNotFoundError: No module "
                        "named 'agentlink.refrence'")
    assert lines[2].startswith(f"{path}:7: agent 'NoAgent'") and "not a BaseAgent" in lines[2]
    assert lines[-1] == f"3 problem(s) in {path}"


def test_reference_topology_is_valid() -> None:
    t = topo.load(REFERENCE)
    assert len(t.agents) == 85
    assert set(t.machines) == {"mainpc", "pc2"}
    twin = t.agents["SystemDigitalTwin"]
    assert twin.replicas == 3
    assert {p.machine for p in twin.placements} == {"mainpc", "pc2"}
    memory = t.agents["MemoryOrchestratorService"]
    assert memory.replicas == 2 and memory.stateful
    for agent_ in t.agents.values():  # replicas in different processes, on both machines
        assert len({p.group for p in agent_.placements}) == agent_.replicas
        if agent_.replicas > 1:
            assert len({p.machine for p in agent_.placements}) == 2


def test_reference_monitoring_chain_starts_in_the_roadmap_order() -> None:
    layer = topo.load(REFERENCE).layer_of()
    assert layer["PerformanceMonitor"] < layer["HealthMonitor"] < layer["ResourceManager"] \
        < layer["SystemHealthManager"]


def test_reference_meets_the_port_goal() -> None:
    t = topo.load(REFERENCE)
    assert 2 * len(t.groups) <= 20


def test_layers_command(tmp_path: Path) -> None:
    path = tmp_path / "t.yml"
    path.write_text(HEAD + agent("A") + agent("B", deps="A") + agent("C", deps="A, B") +
                    agent("D"))
    result = subprocess.run([sys.executable, "-m", "agentlink", "layers", str(path)],
                            capture_output=True, text=True, check=True)
    assert result.stdout.splitlines() == ["layer 0: A, D", "layer 1: B", "layer 2: C"]


@pytest.mark.parametrize("value,mb", [("64M", 64.0), ("1G", 1024.0), (48, 48.0),
                                      ("1.5G", 1536.0), ("lots", None), (0, None)])
def test_memory_sizes(value: object, mb: float | None) -> None:
    assert topo.parse_memory(value) == mb


def test_a_topology_loaded_once_is_read_again_when_the_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "t.yml"
    path.write_text(HEAD + agent("A"))
    first = topo.load_once(path)
    assert topo.load_once(path) is first  # one parse for every filter call of a play
    path.write_text(HEAD + agent("A") + agent("B", port=7000))
    assert sorted(topo.load_once(path).agents) == ["A", "B"]
