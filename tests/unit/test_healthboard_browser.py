"""The health dashboard in a real headless browser, over the whole reference system run as
local processes (`agentlink up`): 85 agents, and one host stopped shows its agents down."""

from __future__ import annotations

import json
import os
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver import Chrome

from .browser import headless_chromium, require_chromium
from .conftest import ROOT, eventually
from .test_launch_local import agentlink

TOPOLOGY = ROOT / "topology" / "agents.yml"
DASHBOARD = "http://127.0.0.1:7211"  # SystemHealthManager's host, pc2-monitoring
VICTIM = "pc2-vision"


@pytest.fixture
def browser() -> Iterator[Chrome]:
    require_chromium()
    with headless_chromium() as driver:
        yield driver


@pytest.fixture
def reference_system(tmp_path: Path, redis_url: str) -> Iterator[Path]:
    home = tmp_path / "lab"
    up = agentlink("up", str(TOPOLOGY), "--redis-url", redis_url, home=home)
    try:
        assert up.returncode == 0, up.stderr
        yield home
    finally:
        agentlink("down", home=home)


def host_pid(home: Path, group: str) -> int:
    return int(json.loads((home / "run" / f"{group}.json").read_text())["pid"])


def tiles(driver: Chrome) -> dict[str, str]:
    """Agent -> state as drawn; read in one script, as the page redraws every 2 s."""
    return dict(driver.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('.tile[data-agent]')]"
        ".map(t => [t.dataset.agent, t.dataset.state]))"))


def api() -> dict[str, Any]:
    with urllib.request.urlopen(f"{DASHBOARD}/api/dashboard", timeout=5) as response:
        return dict(json.load(response))


def header_counts(driver: Chrome) -> dict[str, str]:
    return dict(driver.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('[data-count]')]"
        ".map(c => [c.dataset.count, c.textContent]))"))


# browser first: where Chromium is missing the test skips before starting 89 instances
def test_dashboard_shows_every_agent_and_a_stopped_host(browser: Chrome,
                                                        reference_system: Path) -> None:
    victims = {i["agent"] for i in api()["instances"] if i["group"] == VICTIM}
    browser.get(f"{DASHBOARD}/dashboard")
    eventually(lambda: len(tiles(browser)) == 85, what="85 agent tiles")
    eventually(lambda: header_counts(browser) == {"healthy": "85 healthy"}, what="85 healthy")
    machines = browser.execute_script(
        "return [...document.querySelectorAll('.machine')].map(m => m.dataset.machine)")
    assert sorted(machines) == ["mainpc", "pc2"]

    os.kill(host_pid(reference_system, VICTIM), signal.SIGKILL)
    eventually(lambda: all(tiles(browser)[a] == "down" for a in victims),
               what=f"{VICTIM}'s agents shown down")
    others = {a: s for a, s in tiles(browser).items() if a not in victims}
    assert set(others.values()) <= {"healthy", "degraded"}  # their callers still serve

    doc = api()
    assert {a["name"] for a in doc["agents"] if a["state"] == "down"} == victims
    assert {h["agent"] for h in doc["history"] if h["to"] == "down"} == victims
    assert doc["alerts"]["note"] == "no Alertmanager configured"  # agentlink up has none
