"""The alert rules, unit-tested by promtool (Debian's prometheus package) for firing and not."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from .conftest import ROOT

RULES = ROOT / "roles" / "monitoring" / "files" / "rules" / "agentlink.rules.yml"
RULE_TESTS = ROOT / "tests" / "rules" / "agentlink.test.yml"


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: make test installs Debian's prometheus package")
    return path


def alert_names() -> set[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule}


def test_rules_are_valid(promtool: str) -> None:
    result = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_pass(promtool: str) -> None:
    result = subprocess.run([promtool, "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    cases = [case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
             for case in test.get("alert_rule_test", [])]
    firing = {c["alertname"] for c in cases if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    names = alert_names()
    assert names - firing == set(), "alerts with no test where they fire"
    assert names - quiet == set(), "alerts with no test where they stay quiet"
