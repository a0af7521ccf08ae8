"""docs/protocol.md is enough to write a client: its plain pyzmq client, taken from the page
as it is, against a real agent host, without CURVE (local mode) and with it (deployed)."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentlink.devtools.testing import AgentSpec, host_config, wait_healthy
from agentlink.runtime.host import AgentHost
from agentlink.security import OPERATOR, create_secrets

from .conftest import ROOT

DOC = ROOT / "docs" / "protocol.md"
ECHO = "tests.unit.agents:Echo"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The page's example client, written to a file exactly as the page shows it."""
    found = re.search(r"<!-- example-client -->\n```python\n(.*?)```\n<!-- /example-client -->",
                      DOC.read_text(), re.DOTALL)
    assert found, f"no example client in {DOC}"
    path = tmp_path_factory.mktemp("client") / "client.py"
    path.write_text(found.group(1))
    return path


def run_client(client: Path, endpoint: str, agent: str, request: object,
               *keys: str) -> subprocess.CompletedProcess[str]:
    # A plain interpreter: the client must not need agentlink (-I ignores the project).
    return subprocess.run([sys.executable, "-I", str(client), endpoint, agent,
                           json.dumps(request), *keys], capture_output=True, text=True,
                          timeout=30, check=False)


@pytest.fixture
def plain_host(redis_url: str) -> Iterator[AgentHost]:
    host = AgentHost(host_config("plain", [AgentSpec("Echo", ECHO)], redis_url))
    host.start()
    try:
        wait_healthy(host)
        yield host
    finally:
        host.stop()


@pytest.fixture
def curve_host(redis_url: str, tmp_path: Path) -> Iterator[tuple[AgentHost, Path]]:
    secrets = tmp_path / "secrets"
    create_secrets(str(secrets), ["curved", OPERATOR])
    config = dataclasses.replace(
        host_config("curved", [AgentSpec("Echo", ECHO)], redis_url),
        curve={"secret_file": str(secrets / "private" / "curved.key_secret"),
               "public_dir": str(secrets / "public")})
    host = AgentHost(config)
    host.start()
    try:
        wait_healthy(host)
        yield host, secrets
    finally:
        host.stop()


def endpoint(host: AgentHost) -> str:
    return f"tcp://127.0.0.1:{host.config.port}"


def test_the_page_s_client_gets_an_agent_s_reply(client: Path, plain_host: AgentHost) -> None:
    run = run_client(client, endpoint(plain_host), "Echo", {"text": "hello"})
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {"echo": {"text": "hello"}, "by": "Echo-1"}


def test_the_page_s_client_gets_the_error_code_the_page_lists(client: Path,
                                                              plain_host: AgentHost) -> None:
    run = run_client(client, endpoint(plain_host), "Nobody", {})
    assert run.returncode != 0
    assert "RuntimeError: unknown_agent: Nobody is not served by group plain" in run.stderr
    assert "| `unknown_agent` |" in DOC.read_text()


def test_the_page_s_client_speaks_curve_with_the_files_the_page_names(
        client: Path, curve_host: tuple[AgentHost, Path]) -> None:
    host, secrets = curve_host
    keys = (str(secrets / "private" / f"{OPERATOR}.key_secret"),
            str(secrets / "public" / "curved.key"))
    run = run_client(client, endpoint(host), "Echo", [1, 2], *keys)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["echo"] == [1, 2]
    # Without keys the handshake never completes: a timeout, as the page says.
    refused = run_client(client, endpoint(host), "Echo", [1, 2])
    assert refused.returncode != 0 and "TimeoutError: no reply from" in refused.stderr
