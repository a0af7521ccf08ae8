"""Jinja2 filters for the toolkit: shims into agentlink, no logic here.

Ansible loads every filter plugin in each forked task worker the first time the task's
templates use any filter. Each shim imports its agentlink module only when it runs:
importing them all here (zmq, cryptography, the topology) cost every task of a run that
changes nothing about 0.1 s of CPU.
"""

from collections.abc import Callable
from importlib import import_module
from typing import Any


def _lazy(module: str, function: str) -> Callable[..., Any]:
    def shim(*args: Any, **kwargs: Any) -> Any:
        return getattr(import_module(module), function)(*args, **kwargs)

    return shim


def _dashboards(topology_path: str) -> Any:
    from agentlink.deploy.dashboards import dashboards
    from agentlink.topology import load_once

    return dashboards(load_once(topology_path))


class FilterModule:
    def filters(self) -> dict[str, object]:
        return {
            "agentlink_startup_config": _lazy("agentlink.deploy.render", "startup_config_for"),
            "agentlink_grafana_dashboards": _dashboards,
            "agentlink_grafana_provisioning": _lazy(
                "agentlink.deploy.dashboards", "grafana_provisioning"),
            "agentlink_grafana_problems": _lazy(
                "agentlink.deploy.dashboards", "validate_dashboard"),
            "agentlink_scrape_targets": _lazy("agentlink.deploy.monitoring", "scrape_targets"),
            "agentlink_secret_mount": _lazy("agentlink.security", "secret_mount"),
        }
