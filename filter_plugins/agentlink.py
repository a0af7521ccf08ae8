"""Jinja2 filters for the toolkit: shims into agentlink, no logic here."""

from agentlink.deploy.dashboards import dashboards, grafana_provisioning, validate_dashboard
from agentlink.deploy.monitoring import scrape_targets
from agentlink.deploy.render import startup_config_for
from agentlink.security import secret_mount
from agentlink.topology import load_once


class FilterModule:
    def filters(self) -> dict[str, object]:
        return {
            "agentlink_startup_config": startup_config_for,
            "agentlink_grafana_dashboards": lambda path: dashboards(load_once(path)),
            "agentlink_grafana_provisioning": grafana_provisioning,
            "agentlink_grafana_problems": validate_dashboard,
            "agentlink_scrape_targets": scrape_targets,
            "agentlink_secret_mount": secret_mount,
        }
