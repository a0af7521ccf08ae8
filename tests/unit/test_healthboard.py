"""The health dashboard agent: replica rule, polling real hosts, history, alerts, routes."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from agentlink.devtools.testing import AgentSpec, free_ports, run_group
from agentlink.runtime.agent import AgentContext
from agentlink.runtime.healthboard import HealthDashboard, agent_state, fetch_alerts

from .conftest import eventually

ECHO = "tests.unit.agents:Echo"


@pytest.mark.parametrize("states,expected", [
    (["healthy", "healthy"], "healthy"),
    (["healthy", "down"], "degraded"),
    (["degraded"], "degraded"),
    (["starting", "down"], "starting"),
    (["unhealthy", "down"], "unhealthy"),
    (["unknown", "unknown"], "unknown"),
    (["down", "down"], "down"),
    ([], "down"),
])
def test_an_agent_state_comes_from_its_replicas(states: list[str], expected: str) -> None:
    assert agent_state(states) == expected


def system(hosts: dict[str, str], instances: list[tuple[str, str, str]],
           alertmanager: str = "") -> dict[str, Any]:
    """A system layout: group -> http URL; instances as (agent, instance, group)."""
    return {
        "agents": [{"name": a, "layer": 0, "replicas": 1} for a in dict.fromkeys(
            agent for agent, _, _ in instances)],
        "instances": [{"agent": a, "instance": i, "machine": "m1", "group": g}
                      for a, i, g in instances],
        "groups": {g: {"machine": "m1", "layer": 0, "http": url} for g, url in hosts.items()},
        "monitoring": {"alertmanager": alertmanager} if alertmanager else {},
    }


def dashboard(layout: dict[str, Any]) -> HealthDashboard:
    return HealthDashboard(AgentContext(name="Board", instance="Board-1", system=layout))


def test_polling_real_hosts_shows_states_and_records_changes(redis_url: str) -> None:
    nowhere = f"http://127.0.0.1:{free_ports(1)[0]}"
    pool = ThreadPoolExecutor(4)
    with run_group([AgentSpec("A", ECHO)], redis_url, group="ga") as ga:
        with run_group([AgentSpec("B", ECHO, index=1), AgentSpec("C", ECHO)], redis_url,
                       group="gb") as gb:
            board = dashboard(system(
                {"ga": f"http://127.0.0.1:{ga.config.http_port}",
                 "gb": f"http://127.0.0.1:{gb.config.http_port}", "gone": nowhere},
                [("A", "A-1", "ga"), ("B", "B-1", "gb"), ("B", "B-2", "gone"),
                 ("C", "C-1", "gb")]))
            board.poll(pool)
            first = board.snapshot()
            agents = {a["name"]: a for a in first["agents"]}
            assert agents["A"]["state"] == "healthy"
            assert (agents["B"]["state"], agents["B"]["serving"], agents["B"]["replicas"]) == \
                ("degraded", 1, 2)
            assert first["history"] == []
            assert first["machines"] == {"m1": {"0": ["A", "B", "C"]}}
        board.poll(pool)  # gb has stopped
    after = board.snapshot()
    assert {a["name"]: a["state"] for a in after["agents"]} == \
        {"A": "healthy", "B": "down", "C": "down"}
    assert after["counts"] == {"healthy": 1, "down": 2}
    changes = {(h["agent"], h["instance"], h["from"], h["to"]) for h in after["history"]}
    assert changes == {("B", "B-1", "healthy", "down"), ("C", "C-1", "healthy", "down")}
    pool.shutdown()


def test_before_the_first_poll_every_agent_is_unknown() -> None:
    board = dashboard(system({"g": "http://127.0.0.1:1"}, [("A", "A-1", "g")]))
    doc = board.snapshot()
    assert (doc["counts"], doc["polled_at"]) == ({"unknown": 1}, 0.0)


def test_the_first_health_check_starts_polling(redis_url: str) -> None:
    with run_group([AgentSpec("A", ECHO)], redis_url, group="ga") as ga:
        board = dashboard(system({"ga": f"http://127.0.0.1:{ga.config.http_port}"},
                                 [("A", "A-1", "ga")]))
        assert board.check_health() == {}
        eventually(lambda: board.snapshot()["counts"] == {"healthy": 1}, what="A polled")


ALERTS = [
    {"labels": {"alertname": "MachineCPUHigh", "severity": "warning", "machine": "m1"},
     "annotations": {"summary": "CPU of m1 over 60%"}, "startsAt": "2026-01-01T00:00:00Z"},
    {"labels": {"alertname": "AgentHostDown", "severity": "critical", "group": "g"},
     "annotations": {"summary": "Agent host g on m1 is down"},
     "startsAt": "2026-01-01T00:01:00Z"}]


class FakeAlertmanager(BaseHTTPRequestHandler):
    """Answers like Alertmanager's v2 API."""

    def do_GET(self) -> None:
        # only what the dashboard should ask for: firing, neither silenced nor inhibited
        if self.path != "/api/v2/alerts?active=true&silenced=false&inhibited=false":
            self.send_error(404)
            return
        body = json.dumps(ALERTS).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return


@pytest.fixture
def alertmanager() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeAlertmanager)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_firing_alerts_come_from_alertmanager(alertmanager: str) -> None:
    alerts = fetch_alerts(alertmanager)
    assert (alerts["available"], alerts["total"]) == (True, 2)
    assert [(a["name"], a["severity"]) for a in alerts["firing"]] == \
        [("AgentHostDown", "critical"), ("MachineCPUHigh", "warning")]  # critical first
    assert alerts["firing"][0]["summary"] == "Agent host g on m1 is down"


def test_alerts_say_why_they_are_missing() -> None:
    assert fetch_alerts("")["note"] == "no Alertmanager configured"
    unreachable = fetch_alerts(f"http://127.0.0.1:{free_ports(1)[0]}")
    assert unreachable["available"] is False
    assert unreachable["note"].startswith("alerts unavailable:")


def test_routes(alertmanager: str) -> None:
    board = dashboard(system({}, [], alertmanager))
    for path in ("/", "/dashboard", "/dashboard/"):
        page = board.web(path)
        assert page is not None and page.status == 200 and b"AgentLink health" in page.body
    api = board.web("/api/dashboard?x=1")
    assert api is not None and api.content_type == "application/json"
    assert set(json.loads(api.body)) >= {"agents", "machines", "history", "alerts", "counts"}
    assert board.web("/health-ish") is None
