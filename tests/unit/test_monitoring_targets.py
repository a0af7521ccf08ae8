"""Scrape targets come from the topology and inventory, never from a hand-kept list."""

from __future__ import annotations

from pathlib import Path

import yaml

from agentlink.deploy.monitoring import scrape_targets
from agentlink.topology import load

from .conftest import ROOT

TOPOLOGY = str(ROOT / "topology" / "agents.yml")
ADDRESSES = {"mainpc": "10.213.0.10", "pc2": "10.213.0.20"}


def test_every_agent_host_is_a_target_on_its_machine() -> None:
    jobs = scrape_targets(TOPOLOGY, ADDRESSES, {"node": 9100})
    groups = load(TOPOLOGY).groups
    targets = {t["labels"]["group"]: t for t in jobs["agentlink"]}
    assert set(targets) == set(groups)
    for name, group in groups.items():
        assert targets[name]["targets"] == [f"{ADDRESSES[group.machine]}:{group.http_port}"]
        assert targets[name]["labels"]["machine"] == group.machine


def test_each_exporter_is_scraped_on_every_machine() -> None:
    jobs = scrape_targets(TOPOLOGY, ADDRESSES, {"node": 9100, "redis": 9121})
    assert jobs["redis"] == [
        {"targets": ["10.213.0.10:9121"], "labels": {"machine": "mainpc"}},
        {"targets": ["10.213.0.20:9121"], "labels": {"machine": "pc2"}},
    ]
    assert [t["targets"] for t in jobs["node"]] == [["10.213.0.10:9100"], ["10.213.0.20:9100"]]


def test_a_new_group_becomes_a_target(tmp_path: Path) -> None:
    doc = yaml.safe_load(Path(TOPOLOGY).read_text())
    doc["agents"].append({"name": "Extra", "class": "tests.unit.agents:Echo",
                          "machine": "pc2", "group": "pc2-extra", "port": 7300})
    path = tmp_path / "agents.yml"
    path.write_text(yaml.safe_dump(doc))
    jobs = scrape_targets(str(path), ADDRESSES, {})
    assert {"targets": ["10.213.0.20:7301"], "labels": {"machine": "pc2", "group": "pc2-extra"}} \
        in jobs["agentlink"]
