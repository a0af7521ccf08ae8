"""The upgrade tests run against the deployed lab (molecule scenario `upgrade`)."""

from tests.integration.conftest import Lab, lab

__all__ = ["Lab", "lab"]
