"""The failover tests run against a deployed inventory (molecule scenarios failover, dual)."""

from tests.integration.conftest import Deployment, deployed

__all__ = ["Deployment", "deployed"]
