"""What the controller runs to bring machines to the topology, behind the Ansible modules
and filters: startup configs rendered per machine, the layered launcher and its Docker
backend, upgrades, the image plan, scrape targets and Grafana dashboards. Never in the
runtime image."""
