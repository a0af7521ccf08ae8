"""The deployed system's monitoring: every target scraped, rules loaded, and an alert that
really fires."""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from typing import Any

import yaml

from .conftest import ROOT, Deployment

RULES = ROOT / "roles" / "monitoring" / "files" / "rules" / "agentlink.rules.yml"


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def query(deployed: Deployment, expr: str) -> list[dict[str, Any]]:
    url = f"{deployed.prometheus_url}/api/v1/query?query={urllib.parse.quote(expr)}"
    answer = get_json(url)
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def wait_for(what: str, check: Any, timeout: float) -> Any:
    """Poll check() until it returns something truthy; fail naming what never happened."""
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout:g}s"
        time.sleep(1)
    return found


def test_every_target_is_scraped(deployed: Deployment) -> None:
    targets = get_json(f"{deployed.prometheus_url}/api/v1/targets?state=active")["data"]
    down = [(t["scrapeUrl"], t["lastError"]) for t in targets["activeTargets"]
            if t["health"] != "up"]
    assert down == []
    jobs = {t["labels"]["job"] for t in targets["activeTargets"]}
    assert jobs == {"agentlink", "node", "redis", "prometheus", "alertmanager"}
    scraped_groups = {t["labels"].get("group") for t in targets["activeTargets"]}
    assert set(deployed.topology.groups) <= scraped_groups


def test_every_alert_rule_is_loaded(deployed: Deployment) -> None:
    groups = get_json(f"{deployed.prometheus_url}/api/v1/rules")["data"]["groups"]
    loaded = {r["name"] for g in groups for r in g["rules"]}
    wanted = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"]
              for r in g["rules"]}
    assert wanted <= loaded


def test_metrics_cover_agents_machines_and_the_deploy(deployed: Deployment) -> None:
    healthy = query(deployed, 'count(agentlink_agent_health{state="healthy"} == 1)')
    assert int(healthy[0]["value"][1]) == len(deployed.topology.instances)
    memory = query(deployed, "agentlink_machine_memory_used_bytes")
    measured = {r["metric"]["machine"] for r in memory}
    assert measured == set(deployed.addresses)
    limits = query(deployed, "agentlink_process_memory_limit_bytes")
    assert {r["metric"]["group"] for r in limits} == set(deployed.topology.groups)
    deploys = query(deployed, "agentlink_deploy_duration_seconds")
    assert {r["metric"]["machine"] for r in deploys} == set(deployed.addresses)
    roles = {r["metric"]["machine"]: r["metric"]["role"]
             for r in query(deployed, "redis_instance_info")}
    assert set(roles) == set(deployed.addresses)
    assert sorted(roles.values()) == ["master", "slave"]  # which is which: the Sentinels' call


def test_a_stopped_agent_host_raises_an_alert_in_alertmanager(deployed: Deployment) -> None:
    container = deployed.container("agentlink-pc2-vision")
    container.stop(timeout=10)
    try:
        def firing() -> list[dict[str, Any]]:
            alerts = get_json(f"{deployed.alertmanager_url}/api/v2/alerts?active=true")
            return [a for a in alerts if a["labels"]["alertname"] == "AgentHostDown"
                    and a["labels"].get("group") == "pc2-vision"]

        alert = wait_for("AgentHostDown for pc2-vision in Alertmanager", firing, 120)[0]
        assert alert["labels"]["machine"] == "pc2"
        assert "pc2-vision" in alert["annotations"]["summary"]
    finally:
        container.start()
    host = f"http://{deployed.addresses['pc2']}:{deployed.topology.groups['pc2-vision'].http_port}"

    def healthy_again() -> bool:
        try:
            return bool(get_json(f"{host}/health")["state"] == "healthy")
        except OSError:
            return False

    wait_for("pc2-vision healthy again", healthy_again, 60)
