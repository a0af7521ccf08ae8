"""Configs rendered through the real agent_config role, for both inventories: every address
in them is one the inventory supplied, written as ${VAR:-address}."""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agentlink.runtime.startup_config import expand, load_host_config
from agentlink.topology import load

ROOT = Path(__file__).resolve().parents[2]
IPV4 = re.compile(r"(?<![\d.])(\d{1,3}(?:\.\d{1,3}){3})(?![\d.])")


def literal_ips(text: str) -> set[str]:
    found = set()
    for candidate in IPV4.findall(text):
        try:
            found.add(str(ipaddress.IPv4Address(candidate)))
        except ValueError:
            continue
    return found


def inventory_ips(inventory: Path) -> set[str]:
    return set().union(*(literal_ips(p.read_text()) for p in inventory.rglob("*.yml")))


@pytest.fixture(scope="module", params=["lab", "dual"])
def rendered(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[Path, Path]:
    """Run playbooks/config.yml with the inventory, locally, into a temporary directory."""
    inventory = ROOT / "inventory" / request.param
    out = tmp_path_factory.mktemp(request.param)
    playbook = Path(sys.executable).parent / "ansible-playbook"
    result = subprocess.run(
        [str(playbook), "-i", str(inventory), str(ROOT / "playbooks" / "config.yml"),
         "-c", "local", "-e", f"agentlink_config_dir={out}/{{{{ inventory_hostname }}}}",
         "-e", "ansible_python_interpreter={{ ansible_playbook_python }}"],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "ANSIBLE_NOCOLOR": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    return inventory, out


def test_every_machine_gets_a_startup_config_and_nothing_else(rendered: tuple[Path, Path]
                                                              ) -> None:
    _, out = rendered
    topology = load(ROOT / "topology" / "agents.yml")
    for machine in topology.machines:
        # The one carrier of addresses: no env file beside it that could disagree.
        assert sorted(p.name for p in (out / machine).iterdir()) == ["startup_config.yaml"]
        config = yaml.safe_load((out / machine / "startup_config.yaml").read_text())
        groups = {g.name for g in topology.groups.values() if g.machine == machine}
        assert set(config["groups"]) == groups


def test_no_ip_literal_that_the_inventory_did_not_supply(rendered: tuple[Path, Path]) -> None:
    inventory, out = rendered
    allowed = inventory_ips(inventory)
    assert allowed, "the inventory names its machines' addresses"
    for path in out.rglob("*"):
        if path.is_file():
            assert literal_ips(path.read_text()) <= allowed, path


def test_addresses_are_environment_variables_with_inventory_defaults(
        rendered: tuple[Path, Path]) -> None:
    _, out = rendered
    text = (out / "pc2" / "startup_config.yaml").read_text()
    assert re.search(r"advertise_host: \$\{PC2_HOST:-[^}]+\}", text)
    assert "${MAIN_PC_HOST:-" in text  # Sentinel on mainpc, for the registry
    assert "${WITNESS_HOST:-" in text  # and on the witness, which runs only a Sentinel
    # The environment overrides the inventory's default: a moved machine needs no re-render.
    moved = {"PC2_HOST": "pc2.example.internal"}
    group = next(iter(yaml.safe_load(text)["groups"]))
    config = load_host_config(out / "pc2" / "startup_config.yaml", group, moved)
    assert config.advertise_host == "pc2.example.internal"
    assert expand("${PC2_HOST:-x}", {}) == "x"
