"""Every query of every generated dashboard returns data from the deployed Prometheus: a panel
that shows "No data" on a healthy system is a broken panel."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import pytest

from agentlink.deploy.dashboards import dashboards
from agentlink.topology import load

from .conftest import ROOT, Deployment

QUERIES = [
    pytest.param(doc["uid"], panel["title"], target["expr"],
                 id=f"{doc['uid']}/{panel['id']}{target['refId']}")
    for doc in dashboards(load(ROOT / "topology" / "agents.yml"))
    for panel in doc["panels"] for target in panel.get("targets", [])
]


def concrete(expr: str) -> str:
    """An expr as Grafana would send it: the template variables filled in."""
    return expr.replace("$agent", "RequestCoordinator").replace("$__rate_interval", "1m")


def instant_query(prometheus_url: str, expr: str) -> Any:
    url = f"{prometheus_url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.load(response)
    except urllib.error.HTTPError as err:  # a bad query: Prometheus says why in the body
        return json.load(err)


@pytest.mark.parametrize(("dashboard", "panel", "expr"), QUERIES)
def test_every_panel_query_returns_data(deployed: Deployment, dashboard: str, panel: str,
                                        expr: str) -> None:
    answer = instant_query(deployed.prometheus_url, concrete(expr))
    where = f"dashboard {dashboard}, panel '{panel}', expr {concrete(expr)}"
    assert answer["status"] == "success", f"{where}: {answer}"
    assert answer["data"]["result"], f"{where}: no data"
