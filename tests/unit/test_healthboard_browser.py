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

import psutil
import pytest

from .browser import headless_chromium, require_chromium
from .conftest import ROOT, eventually
from .test_launch_local import agentlink

TOPOLOGY = ROOT / "topology" / "agents.yml"
DASHBOARD = "http://127.0.0.1:7211"  # SystemHealthManager's host, pc2-monitoring
VICTIM = "pc2-vision"


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


def tiles(driver: Any) -> dict[str, str]:
    """Agent -> state as drawn; read in one script, as the page redraws every 2 s."""
    return dict(driver.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('.tile[data-agent]')]"
        ".map(t => [t.dataset.agent, t.dataset.state]))"))


def api() -> dict[str, Any]:
    with urllib.request.urlopen(f"{DASHBOARD}/api/dashboard", timeout=5) as response:
        return dict(json.load(response))


def test_dashboard_shows_every_agent_and_a_stopped_host(reference_system: Path) -> None:
    require_chromium()
    victims = {i["agent"] for i in api()["instances"] if i["group"] == VICTIM}
    with headless_chromium() as driver:
        driver.get(f"{DASHBOARD}/dashboard")
        eventually(lambda: len(tiles(driver)) == 85, what="85 agent tiles")
        eventually(lambda: set(tiles(driver).values()) == {"healthy"}, what="all healthy")
        machines = driver.execute_script(
            "return [...document.querySelectorAll('.machine')].map(m => m.dataset.machine)")
        assert sorted(machines) == ["mainpc", "pc2"]

        pid = host_pid(reference_system, VICTIM)
        os.kill(pid, signal.SIGKILL)
        psutil.Process(pid).wait(10)
        eventually(lambda: all(tiles(driver)[a] == "down" for a in victims),
                   what=f"{VICTIM}'s agents shown down")
        others = {a: s for a, s in tiles(driver).items() if a not in victims}
        assert set(others.values()) <= {"healthy", "degraded"}  # their callers still serve

    doc = api()
    assert {a["name"] for a in doc["agents"] if a["state"] == "down"} == victims
    changed = {h["instance"].rsplit("-", 1)[0] for h in doc["history"] if h["to"] == "down"}
    assert changed == victims
    assert doc["alerts"]["note"] == "no Alertmanager configured"
