"""library/agent_launch.py as Ansible runs it: JSON arguments in, JSON result out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from agentlink.deploy import rollout
from agentlink.topology import load

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "library" / "agent_launch.py"
TOPOLOGY = ROOT / "topology" / "agents.yml"
NO_ENGINE = "unix:///nonexistent/docker.sock"


def machine(**overrides: Any) -> dict[str, Any]:
    return {"image": "agentlink/mainpc:0-test", "config_dir": "/etc/agentlink",
            "address": "mainpc.test", "docker_host": NO_ENGINE, **overrides}


def run_module(args: dict[str, Any], tmp_path: Path, check: bool = False) -> dict[str, Any]:
    args_file = tmp_path / "args.json"
    args_file.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": {**args,
                                                              "_ansible_check_mode": check}}))
    result = subprocess.run([sys.executable, str(MODULE), str(args_file)],
                            capture_output=True, text=True, check=False)
    return dict(json.loads(result.stdout))


def test_machines_is_required(tmp_path: Path) -> None:
    result = run_module({"topology": str(TOPOLOGY)}, tmp_path)
    assert result["failed"]
    assert "machines" in result["msg"]


def test_state_must_be_started_or_absent(tmp_path: Path) -> None:
    result = run_module({"topology": str(TOPOLOGY), "machines": {}, "state": "paused"},
                        tmp_path)
    assert result["failed"]
    assert "started" in result["msg"] and "absent" in result["msg"]


def test_an_invalid_topology_fails_with_every_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text("machines: {m: {}}\nagents:\n"
                   "  - {name: A, class: 'x:A', machine: m, group: g, port: 7000,"
                   " depends_on: [B]}\n"
                   "  - {name: B, class: 'x:B', machine: m, group: g, port: 7000,"
                   " depends_on: [A]}\n"
                   "  - {name: C, class: 'x:C', machine: m, group: h, port: 7001}\n")
    result = run_module({"topology": str(bad), "machines": {"m": machine()}}, tmp_path)
    assert result["failed"]
    assert "dependency cycle: A -> B -> A" in result["msg"]
    assert any("7001" in problem for problem in result["problems"])


def test_a_machine_missing_from_the_inventory_is_named(tmp_path: Path) -> None:
    result = run_module({"topology": str(TOPOLOGY), "machines": {"mainpc": machine()}},
                        tmp_path)
    assert result["failed"]
    assert "pc2" in result["msg"] and "inventory" in result["msg"]


def test_an_unreachable_docker_engine_is_a_clear_failure(tmp_path: Path) -> None:
    machines = {"mainpc": machine(), "pc2": machine(address="pc2.test")}
    result = run_module({"topology": str(TOPOLOGY), "machines": machines}, tmp_path,
                        check=True)
    assert result["failed"]
    assert "Docker engine" in result["msg"] and "ensure-docker" in result["msg"]


def test_machine_specs_take_only_the_topology_machines() -> None:
    topology = load(TOPOLOGY)
    specs = rollout.machine_specs({"mainpc": machine(), "pc2": machine(),
                                  "witness": machine()}, topology)
    assert set(specs) == {"mainpc", "pc2"}
    assert specs["mainpc"].network_mode == "host"  # the default for a real machine


@pytest.mark.parametrize("changed", ["image", "env", "config_checksum", "network_mode",
                                     "hardening"])
def test_any_input_of_a_container_changes_its_digest(changed: str) -> None:
    from agentlink.deploy.docker_backend import LABEL_DIGEST, DockerBackend
    from agentlink.deploy.launch import plan

    topology = load(TOPOLOGY)
    unit = plan(topology)[0][0]
    base = {"mainpc": machine(), "pc2": machine()}
    value = {"image": "agentlink/mainpc:0-other", "env": {"MAIN_PC_HOST": "moved"},
             "config_checksum": "new", "network_mode": "container:other",
             "hardening": {"read_only": True}}[changed]
    changed_machines = {m: machine(**{changed: value}) for m in base}

    def digest(machines: dict[str, Any]) -> str:
        backend = DockerBackend(rollout.machine_specs(machines, topology))
        return str(backend.desired(unit)["labels"][LABEL_DIGEST])

    assert digest(base) == digest(dict(base))
    assert digest(base) != digest(changed_machines)


def test_agent_hosts_get_the_hardening_every_container_of_the_inventory_gets() -> None:
    from agentlink.deploy.docker_backend import DockerBackend
    from agentlink.deploy.launch import plan

    shared = yaml.safe_load((ROOT / "playbooks" / "group_vars" / "all" / "agentlink.yml")
                            .read_text())["agentlink_container_hardening"]
    topology = load(TOPOLOGY)
    machines = {m: machine(hardening=shared) for m in ("mainpc", "pc2")}
    run = DockerBackend(rollout.machine_specs(machines, topology)).desired(plan(topology)[0][0])
    assert run["read_only"] is True
    assert run["cap_drop"] == ["ALL"]
    assert run["security_opt"] == ["no-new-privileges"]
    assert run["tmpfs"] == {"/tmp": "size=16m,mode=1777"} and run["pids_limit"] == 256


def test_a_misspelt_hardening_option_fails_before_anything_starts(tmp_path: Path) -> None:
    machines = {m: machine(hardening={"readonly": True}) for m in ("mainpc", "pc2")}
    result = run_module({"topology": str(TOPOLOGY), "machines": machines}, tmp_path)
    assert result["failed"]
    assert "readonly" in result["msg"] and "read_only" in result["msg"]
