"""filter_plugins/agentlink.py: each filter is its agentlink function, imported only when run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = ROOT / "filter_plugins" / "agentlink.py"

# Loads the plugin as Ansible does, in a fresh interpreter, and prints which agentlink modules
# are imported before and after one filter runs, then that filter's result.
PROBE = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("agentlink_filters", {str(PLUGIN)!r})
plugin = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plugin)
filters = plugin.FilterModule().filters()
print(sorted(name for name in sys.modules if name.startswith("agentlink")))
mount = filters["agentlink_secret_mount"]({{"key": "redis.pass", "value": "pass"}}, "/s", "/run")
print(sorted(name for name in sys.modules if name.startswith("agentlink")))
print(mount)
"""


def test_loading_the_plugin_imports_no_agentlink_module_until_a_filter_runs() -> None:
    before, after, mount = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
    ).stdout.splitlines()
    assert before == "[]"
    assert "'agentlink.security'" in after
    assert mount == str({"type": "bind", "source": "/s/redis.pass", "target": "/run/pass",
                         "read_only": True})
