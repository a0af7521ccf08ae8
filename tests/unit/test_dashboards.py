"""The Grafana dashboards built from the topology: sound, parseable PromQL, and a validator
that catches each kind of mistake."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from agentlink.deploy.dashboards import (
    DATASOURCE_UID,
    agent,
    dashboards,
    grafana_provisioning,
    validate_dashboard,
)
from agentlink.topology import Topology, load

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = load(ROOT / "topology" / "agents.yml")
BUILT = {doc["uid"]: doc for doc in dashboards(REFERENCE)}


def concrete(expr: str) -> str:
    """An expr as Grafana would send it: the template variables filled in."""
    return expr.replace("$agent", "RequestCoordinator").replace("$__rate_interval", "1m")


def test_the_four_dashboards_are_built() -> None:
    assert set(BUILT) == {"agentlink-overview", "agentlink-agent", "agentlink-ha",
                          "agentlink-resources"}


@pytest.mark.parametrize("uid", sorted(BUILT))
def test_every_dashboard_of_the_reference_topology_is_sound(uid: str) -> None:
    assert validate_dashboard(BUILT[uid]) == []


def titles(doc: dict[str, Any]) -> list[str]:
    return [panel["title"] for panel in doc["panels"]]


def test_panels_follow_the_topology() -> None:
    replicated = [a for a in REFERENCE.agents.values() if a.replicas > 1]
    assert {f"{a.name} (of {a.replicas})" for a in replicated} <= set(titles(BUILT["agentlink-ha"]))
    assert set(REFERENCE.groups) <= set(titles(BUILT["agentlink-resources"]))
    assert "Workflows" in titles(BUILT["agentlink-overview"])
    machine_rows = {t for t in titles(BUILT["agentlink-overview"]) if t.startswith("Machine ")}
    assert machine_rows == {f"Machine {m}" for m in REFERENCE.machines}


def test_the_agent_variable_lists_agents_from_prometheus() -> None:
    (variable,) = BUILT["agentlink-agent"]["templating"]["list"]
    assert variable["name"] == "agent"
    assert variable["definition"] == "label_values(agentlink_agent_health, agent)"
    assert variable["current"]["value"] in REFERENCE.agents


def test_provisioning_names_the_datasource_every_panel_uses() -> None:
    files = grafana_provisioning("http://10.0.0.2:9090", "/var/lib/grafana/dash", "5s")
    (datasource,) = files["datasources/agentlink.yml"]["datasources"]
    assert datasource["uid"] == DATASOURCE_UID
    assert datasource["url"] == "http://10.0.0.2:9090"
    assert datasource["jsonData"]["timeInterval"] == "5s"
    (provider,) = files["dashboards/agentlink.yml"]["providers"]
    assert provider["options"]["path"] == "/var/lib/grafana/dash"
    assert all(doc["apiVersion"] == 1 for doc in files.values())


# --- every PromQL expression parses ---------------------------------------------------------


def test_every_expression_parses_with_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is missing: scripts/ensure-packages.sh prometheus installs it")
    groups = [{"name": uid, "rules": [
        {"record": f"{uid.replace('-', '_')}:panel_{panel['id']}_{target['refId']}",
         "expr": concrete(target["expr"])}
        for panel in doc["panels"] for target in panel.get("targets", [])]}
        for uid, doc in BUILT.items()]
    rules = tmp_path / "dashboards.rules.yml"
    rules.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    result = subprocess.run([promtool, "check", "rules", str(rules)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the validator catches each kind of problem ---------------------------------------------


@pytest.fixture
def doc() -> dict[str, Any]:
    """A sound dashboard to break: the agent dashboard uses a template variable."""
    return copy.deepcopy(agent(REFERENCE))


def query_panels(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [panel for panel in doc["panels"] if panel["type"] != "row"]


def only_problem(doc: dict[str, Any]) -> str:
    problems = validate_dashboard(doc)
    assert len(problems) == 1, problems
    return problems[0]


def test_a_missing_dashboard_key(doc: dict[str, Any]) -> None:
    del doc["uid"]
    assert only_problem(doc) == "missing key 'uid'"


def test_a_missing_panel_key(doc: dict[str, Any]) -> None:
    panel = query_panels(doc)[0]
    del panel["targets"]
    assert only_problem(doc) == f"panel {panel['id']} '{panel['title']}': missing key 'targets'"


def test_a_duplicate_panel_id(doc: dict[str, Any]) -> None:
    first, second = query_panels(doc)[:2]
    second["id"] = first["id"]
    assert f"duplicate panel id {first['id']}" in only_problem(doc)


def test_a_panel_outside_the_grid(doc: dict[str, Any]) -> None:
    doc["panels"].append({**copy.deepcopy(query_panels(doc)[0]), "id": 99,
                          "gridPos": {"x": 20, "y": 100, "w": 8, "h": 4}})
    assert "outside the 24-column grid" in only_problem(doc)


def test_overlapping_panels(doc: dict[str, Any]) -> None:
    first, second = query_panels(doc)[:2]
    second["gridPos"] = {**first["gridPos"], "x": first["gridPos"]["x"] + 1}
    problem = only_problem(doc)
    assert f"panels {first['id']} '{first['title']}' and {second['id']}" in problem
    assert problem.endswith("overlap")


def test_a_datasource_that_is_not_provisioned(doc: dict[str, Any]) -> None:
    query_panels(doc)[0]["datasource"] = {"type": "prometheus", "uid": "someone-elses"}
    assert "someone-elses" in only_problem(doc)


def test_a_variable_with_another_datasource(doc: dict[str, Any]) -> None:
    doc["templating"]["list"][0]["datasource"] = {"type": "loki", "uid": DATASOURCE_UID}
    assert only_problem(doc).startswith("variable 'agent': datasource")


def test_a_target_without_expr(doc: dict[str, Any]) -> None:
    query_panels(doc)[0]["targets"][0]["expr"] = ""
    assert only_problem(doc).endswith("target 'A' has no expr")


def test_a_duplicate_ref_id(doc: dict[str, Any]) -> None:
    latency = next(p for p in doc["panels"] if len(p.get("targets", [])) > 1)
    latency["targets"][1]["refId"] = "A"
    assert only_problem(doc).endswith("duplicate refId 'A'")


@pytest.mark.parametrize("written", ["$machine", "${machine}", "${machine:regex}",
                                     "[[machine]]"])
def test_an_undefined_variable(doc: dict[str, Any], written: str) -> None:
    query_panels(doc)[0]["targets"][0]["expr"] = f'up{{machine="{written}"}}'
    assert only_problem(doc).endswith("uses $machine, which templating does not define")


def test_a_removed_variable_is_caught_where_it_is_used(doc: dict[str, Any]) -> None:
    doc["templating"]["list"] = []
    problems = validate_dashboard(doc)
    uses = sum("$agent" in t["expr"] for p in query_panels(doc) for t in p["targets"])
    assert len(problems) == uses > 0


def test_a_small_topology_gets_its_own_panels(tmp_path: Path) -> None:
    path = tmp_path / "agents.yml"
    path.write_text(yaml.safe_dump({"machines": {"solo": {}}, "agents": [
        {"name": "Alpha", "class": "m:A", "machine": "solo", "group": "g1", "port": 7000},
        {"name": "Beta", "class": "m:B", "depends_on": ["Alpha"], "placement": [
            {"machine": "solo", "group": "g1", "port": 7000},
            {"machine": "solo", "group": "g2", "port": 7002}]}]}))
    small: Topology = load(path)
    built = {doc["uid"]: doc for doc in dashboards(small)}
    assert all(validate_dashboard(doc) == [] for doc in built.values())
    assert "Beta (of 2)" in titles(built["agentlink-ha"])
    assert {"g1", "g2"} <= set(titles(built["agentlink-resources"]))
    layers = [t for t in titles(built["agentlink-overview"]) if t.startswith("Layer ")]
    assert layers == ["Layer 0: instances by state", "Layer 1: instances by state"]
