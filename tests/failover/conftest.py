"""The failover tests run against the deployed lab (molecule scenario `failover`)."""

from tests.integration.conftest import Lab, lab

__all__ = ["Lab", "lab"]
