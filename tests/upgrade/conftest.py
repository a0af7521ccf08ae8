"""The upgrade tests run against a deployed inventory (molecule scenarios upgrade, dual)."""

from tests.integration.conftest import Deployment, deployed

__all__ = ["Deployment", "deployed"]
