"""Checks only two real machines have (molecule scenario dual, on the harness's hosts)."""

from tests.integration.conftest import Deployment, deployed

__all__ = ["Deployment", "deployed"]
