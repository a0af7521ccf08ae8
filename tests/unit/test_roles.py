"""Every role documents its public variables: defaults/ and meta/argument_specs.yml agree."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ROLES = sorted((ROOT / "roles").iterdir())


@pytest.mark.parametrize("role", ROLES, ids=lambda r: r.name)
def test_defaults_and_argument_specs_have_the_same_keys(role: Path) -> None:
    defaults = yaml.safe_load((role / "defaults" / "main.yml").read_text()) or {}
    specs = yaml.safe_load((role / "meta" / "argument_specs.yml").read_text())
    entry_points = specs["argument_specs"]
    assert "main" in entry_points
    # Every default is an option of some entry point (main, or e.g. agents' upgrade_host).
    assert set(defaults) == {name for spec in entry_points.values() for name in spec["options"]}
    for entry, spec in entry_points.items():
        for name, option in spec["options"].items():
            assert option.get("description"), f"{role.name}/{entry}: {name} is not described"
            assert option.get("type"), f"{role.name}/{entry}: {name} has no type"


@pytest.mark.parametrize("role", ROLES, ids=lambda r: r.name)
def test_public_variables_carry_the_role_prefix(role: Path) -> None:
    defaults = yaml.safe_load((role / "defaults" / "main.yml").read_text()) or {}
    assert all(name.startswith(f"{role.name}_") for name in defaults)


TOOLKIT_YAML = [ROOT / "site.yml", *sorted(
    path for folder in ("roles", "playbooks", "inventory", "molecule", ".config", "topology")
    for path in (ROOT / folder).rglob("*.yml"))]


@pytest.mark.parametrize("path", TOOLKIT_YAML, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_toolkit_yaml_file_parses(path: Path) -> None:
    yaml.safe_load(path.read_text())


def test_playbooks_pass_ansible_syntax_check() -> None:
    playbook = Path(sys.executable).parent / "ansible-playbook"
    for name in ("site.yml", "playbooks/down.yml"):
        result = subprocess.run([str(playbook), "--syntax-check", name], cwd=ROOT,
                                capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stdout + result.stderr


SHARED_FACTS = ROOT / "playbooks" / "group_vars" / "all" / "agentlink.yml"
# A fact the roles share has one home (SHARED_FACTS): its value written anywhere else in the
# toolkit's Ansible files would drift from it.
SHARED_LITERALS = re.compile(r"\b(?:26379|9090|9093)\b|no-new-privileges|cap_drop: \[ALL\]")


def test_shared_facts_are_written_once() -> None:
    files = [ROOT / "site.yml", *(p for folder in ("roles", "playbooks", "inventory")
                                  for p in (ROOT / folder).rglob("*") if p.is_file())]
    repeated = [str(p.relative_to(ROOT)) for p in files
                if p != SHARED_FACTS and SHARED_LITERALS.search(p.read_text(errors="replace"))]
    assert repeated == []
    assert SHARED_LITERALS.search(SHARED_FACTS.read_text())
