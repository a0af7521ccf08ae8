"""Secrets and CURVE between agent hosts: created once and kept private, only known clients
served, each container given only its own secret key."""

from __future__ import annotations

import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from agentlink.deploy.render import startup_config_for, write_startup_config
from agentlink.devtools.testing import AgentSpec, host_config, wait_healthy
from agentlink.runtime import protocol
from agentlink.runtime.client import FailoverClient
from agentlink.runtime.host import AgentHost
from agentlink.runtime.pool import Pool, RequestTimeout, get_pool
from agentlink.runtime.registry import redis_client
from agentlink.runtime.startup_config import load_host_config
from agentlink.security import (
    CONTAINER_CURVE,
    OPERATOR,
    PASSWORDS,
    CurveKeys,
    SecretError,
    container_mounts,
    create_secrets,
    operator_keys,
    operator_settings,
    write_machine_bundles,
)

ROOT = Path(__file__).resolve().parents[2]
ECHO = "tests.unit.agents:Echo"


@pytest.fixture
def secrets_dir(tmp_path: Path) -> Path:
    create_secrets(str(tmp_path), ["test", OPERATOR])
    return tmp_path


@pytest.fixture
def curve_host(secrets_dir: Path, redis_url: str) -> Iterator[AgentHost]:
    config = host_config("test", [AgentSpec("A", ECHO)], redis_url)
    config.curve = {"secret_file": str(secrets_dir / "private" / "test.key_secret"),
                    "public_dir": str(secrets_dir / "public")}
    host = AgentHost(config)
    host.start()
    try:
        wait_healthy(host)
        yield host
    finally:
        host.stop()
        get_pool().keys = None  # the process's pool: later tests talk plain TCP


def ask(pool: Pool, host: AgentHost, timeout: float = 2.0) -> object:
    try:
        return protocol.decode_reply(pool.request(
            f"tcp://127.0.0.1:{host.config.port}", protocol.encode_request("A", {"n": 1}),
            timeout=timeout, server="test"))
    finally:
        pool.close()


def test_secrets_are_created_once_private_and_never_replaced(tmp_path: Path) -> None:
    created = create_secrets(str(tmp_path), ["g1", OPERATOR])
    assert created == [*PASSWORDS, "g1.key", f"{OPERATOR}.key"]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o700
    for name in PASSWORDS:
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
        assert len((tmp_path / name).read_text().strip()) == 32
    assert stat.S_IMODE((tmp_path / "private" / "g1.key_secret").stat().st_mode) == 0o600
    assert create_secrets(str(tmp_path), ["g1", OPERATOR]) == []
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert len({(tmp_path / n).read_text() for n in PASSWORDS}) == len(PASSWORDS)


def test_a_machine_s_bundle_holds_every_public_key_and_only_its_own_secret_keys(
        tmp_path: Path) -> None:
    controller, machine = tmp_path / "controller", tmp_path / "machine"
    create_secrets(str(controller), ["m1-core", "m2-core", OPERATOR])
    groups = {"m1": ["m1-core"], "witness": []}
    assert write_machine_bundles(str(controller), groups, ["redis-admin"]) == ["m1", "witness"]
    machine.mkdir()
    bundle = controller / "machines" / "m1.tar"
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o600
    subprocess.run(["tar", "--extract", "-C", machine, "-f", bundle], check=True)
    unpacked = {str(p.relative_to(machine)): stat.S_IMODE(p.stat().st_mode)
                for p in machine.rglob("*")}
    assert unpacked == {"public": 0o755, "private": 0o700, "redis-admin": 0o444,
                        "private/m1-core.key_secret": 0o444, "public/m1-core.key": 0o444,
                        "public/m2-core.key": 0o444, f"public/{OPERATOR}.key": 0o444}
    assert (machine / "redis-admin").read_bytes() == (controller / "redis-admin").read_bytes()
    # What `ansible.builtin.unarchive` asks before it unpacks: nothing differs.
    assert subprocess.run(["tar", "--diff", "-C", machine, "-f", bundle]).returncode == 0
    assert write_machine_bundles(str(controller), groups, ["redis-admin"]) == []
    create_secrets(str(controller), ["m1-core", "m1-speech"])
    assert write_machine_bundles(str(controller), groups, ["redis-admin"]) == ["m1", "witness"]
    assert subprocess.run(["tar", "--diff", "-C", machine, "-f", bundle],
                          capture_output=True).returncode == 1


def test_a_known_client_is_served_over_curve(curve_host: AgentHost, secrets_dir: Path) -> None:
    pool = Pool()
    pool.keys = operator_keys(secrets_dir)
    assert ask(pool, curve_host) == {"echo": {"n": 1}, "by": "A-1"}
    # The failover client passes each instance's group, whose key the pool expects.
    client = FailoverClient(curve_host.registry, pool)
    assert client.call("A", {"n": 2})["echo"] == {"n": 2}


def test_a_client_without_curve_gets_no_answer(curve_host: AgentHost) -> None:
    with pytest.raises(RequestTimeout):
        ask(Pool(), curve_host, timeout=1.0)


def test_a_client_with_an_unknown_key_is_refused(curve_host: AgentHost,
                                                 secrets_dir: Path) -> None:
    known = CurveKeys.load(str(secrets_dir / "private" / "test.key_secret"),
                           str(secrets_dir / "public"))
    public, secret = zmq.curve_keypair()
    pool = Pool()
    pool.keys = CurveKeys(public, secret, known.known, known.known_dir)
    with pytest.raises(RequestTimeout):
        ask(pool, curve_host, timeout=1.0)


def test_a_client_expecting_another_server_key_does_not_talk(curve_host: AgentHost,
                                                             secrets_dir: Path) -> None:
    operator = operator_keys(secrets_dir)
    assert operator is not None
    pool = Pool()  # a known client, told the wrong key for the server: an impostor's view
    pool.keys = CurveKeys(operator.public, operator.secret,
                          {"test": operator.known[OPERATOR]}, operator.known_dir)
    with pytest.raises(RequestTimeout):
        ask(pool, curve_host, timeout=1.0)


def test_missing_keys_stop_the_host_with_the_file_named(tmp_path: Path, redis_url: str) -> None:
    config = host_config("test", [AgentSpec("A", ECHO)], redis_url)
    config.curve = {"secret_file": str(tmp_path / "none.key_secret"),
                    "public_dir": str(tmp_path)}
    with pytest.raises(SecretError, match=r"none\.key_secret"):
        AgentHost(config)


def test_a_container_gets_its_own_secret_key_and_no_other() -> None:
    mounts = container_mounts("/s", "mainpc-core")
    assert mounts["/s/private/mainpc-core.key_secret"] == CONTAINER_CURVE["secret_file"]
    assert [m for m in mounts if "/private/" in m] == ["/s/private/mainpc-core.key_secret"]


def test_a_secured_startup_config_names_files_never_secrets(tmp_path: Path) -> None:
    config = startup_config_for(str(ROOT / "topology" / "agents.yml"), "mainpc",
                                {"mainpc": "10.0.0.1", "pc2": "10.0.0.2"}, 26379, "agentlink")
    path = tmp_path / "startup_config.yaml"
    write_startup_config(config, path)
    host = load_host_config(path, "mainpc-core")
    assert host.curve == CONTAINER_CURVE
    assert host.redis["username"] == "agents"
    assert set(host.redis) >= {"password_file", "sentinel_password_file"}
    assert "password" not in host.redis


def test_redis_reads_its_passwords_from_files(secrets_dir: Path) -> None:
    settings = operator_settings({"url": "redis://127.0.0.1:1/0"}, secrets_dir)
    client = redis_client(settings)
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["username"] == "agents"
    assert kwargs["password"] == (secrets_dir / "redis-agents").read_text().strip()
    # Nothing deployed with secrets: a local run's Redis, untouched.
    assert operator_settings({"url": "x"}, secrets_dir / "none") == {"url": "x"}
