"""Every role documents its public variables: defaults/ and meta/argument_specs.yml agree."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROLES = sorted((Path(__file__).resolve().parents[2] / "roles").iterdir())


@pytest.mark.parametrize("role", ROLES, ids=lambda r: r.name)
def test_defaults_and_argument_specs_have_the_same_keys(role: Path) -> None:
    defaults = yaml.safe_load((role / "defaults" / "main.yml").read_text()) or {}
    specs = yaml.safe_load((role / "meta" / "argument_specs.yml").read_text())
    options = specs["argument_specs"]["main"]["options"]
    assert set(defaults) == set(options)
    for name, option in options.items():
        assert option.get("description"), f"{role.name}: {name} is not described"
        assert option.get("type"), f"{role.name}: {name} has no type"


@pytest.mark.parametrize("role", ROLES, ids=lambda r: r.name)
def test_public_variables_carry_the_role_prefix(role: Path) -> None:
    defaults = yaml.safe_load((role / "defaults" / "main.yml").read_text()) or {}
    assert all(name.startswith(f"{role.name}_") for name in defaults)
