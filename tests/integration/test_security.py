"""Security of the deployed system (lab or two machines): Redis and Sentinel refuse anonymous
clients, ZeroMQ refuses clients without a known key, every container runs with least
privilege, the Docker API is not on TCP, and no secret is in an image, a container's settings
or logs, or a play's output."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
import redis
import zmq
from docker.models.images import Image

from agentlink.runtime import protocol
from agentlink.runtime.pool import Pool, RequestTimeout
from agentlink.security import PASSWORDS, CurveKeys, operator_keys, operator_secrets_dir

from .conftest import Deployment

GROUP = "mainpc-core"


def endpoint(deployed: Deployment, group: str = GROUP) -> str:
    spec = deployed.topology.groups[group]
    return f"tcp://{deployed.addresses[spec.machine]}:{spec.port}"


def ask(deployed: Deployment, keys: CurveKeys | None) -> list[bytes]:
    """A reply of any kind (an error reply too) means the connection was accepted."""
    pool = Pool()
    pool.keys = keys
    agent = deployed.topology.groups[GROUP].instances[0].agent.name
    try:
        return pool.request(endpoint(deployed), protocol.encode_request(agent, {}), timeout=2.0,
                            server=GROUP)
    finally:
        pool.close()


def test_redis_and_sentinel_refuse_clients_without_credentials(deployed: Deployment) -> None:
    address = deployed.addresses["mainpc"]
    for port in (6379, 26379):
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host=address, port=port).ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host=address, port=6379, username="default", password="").ping()
    assert deployed.redis(address).ping()  # the same with the operator's credentials


def test_each_redis_user_can_do_only_its_role(deployed: Deployment) -> None:
    agents = deployed.redis(deployed.addresses["mainpc"])
    for command in (("CONFIG", "GET", "bind"), ("FLUSHALL",), ("KEYS", "*"),
                    ("GET", "not-ours")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            agents.execute_command(*command)
    password = (operator_secrets_dir() / "redis-monitoring").read_text().strip()
    monitoring = redis.Redis(host=deployed.addresses["mainpc"], port=6379, username="monitoring",
                             password=password)
    assert monitoring.info("server")["redis_version"]
    with pytest.raises(redis.exceptions.NoPermissionError):
        monitoring.set("agentlink:probe", "1")


def test_redis_listens_only_on_the_machine_address_and_loopback(deployed: Deployment) -> None:
    """The machine has another address (the lab anchor's machine network; a real machine's
    docker0): Redis is not reachable there, from the machine itself."""
    host, address = deployed.host("mainpc"), deployed.addresses["mainpc"]
    if deployed.lab:
        anchor = deployed.container("agentlink-mainpc").attrs["NetworkSettings"]["Networks"]
        others = [anchor["agentlink-mainpc-net"]["IPAddress"]]
    else:
        others = [a.split("/")[0] for a in host.check_output(
            "ip -4 -o addr show | awk '{print $4}'").split()]
        others = [a for a in others if a != address and not a.startswith("127.")]
    assert others

    def answers(at: str) -> bool:
        return host.run(f"timeout 2 bash -c '</dev/tcp/{at}/6379'").rc == 0

    assert answers(address)  # the probe works: Redis is there
    assert not any(answers(other) for other in others), others


def test_zeromq_serves_only_clients_with_a_known_key(deployed: Deployment) -> None:
    operator = operator_keys()
    assert operator is not None, f"no operator key in {operator_secrets_dir()}"
    assert ask(deployed, operator)  # known: answered
    with pytest.raises(RequestTimeout):
        ask(deployed, None)  # plain TCP: the CURVE handshake never completes
    public, secret = zmq.curve_keypair()
    with pytest.raises(RequestTimeout):
        ask(deployed, CurveKeys(public, secret, operator.known, operator.known_dir))


def test_every_container_runs_with_least_privilege(deployed: Deployment) -> None:
    containers = deployed.containers()
    assert len(containers) > 10
    for container in containers:
        config, host = container.attrs["Config"], container.attrs["HostConfig"]
        assert config["User"] not in ("", "0", "root"), container.name
        assert host["ReadonlyRootfs"], container.name
        assert host["CapDrop"] == ["ALL"] and not host["CapAdd"], container.name
        assert "no-new-privileges" in host["SecurityOpt"], container.name
        assert host["PidsLimit"] and host["Memory"], container.name
        assert not host["Privileged"], container.name


def test_writing_to_a_root_filesystem_fails_and_tmp_works(deployed: Deployment) -> None:
    container = deployed.container(f"agentlink-{GROUP}")
    denied = container.exec_run(["touch", "/opt/probe"])
    assert denied.exit_code != 0 and b"Read-only file system" in denied.output
    assert container.exec_run(["touch", "/tmp/probe"]).exit_code == 0


def test_the_docker_api_is_not_on_tcp() -> None:
    """Every dockerd here listens on its unix socket, or on TCP only with TLS verified."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and Path(argv[0].decode(errors="replace")).name == "dockerd":
            tcp = [a for a in argv if b"tcp://" in a]
            assert not tcp or b"--tlsverify" in argv, argv


# --- no secret anywhere it could leak -----------------------------------------------------

def secret_values() -> list[bytes]:
    where = operator_secrets_dir()
    values = [(where / name).read_bytes().strip() for name in PASSWORDS]
    keys = [CurveKeys.load(str(p), str(where / "public")).secret
            for p in sorted((where / "private").glob("*.key_secret"))]
    assert len(values) == len(PASSWORDS) and keys
    return values + [zmq.utils.z85.encode(k) for k in keys]


def chunks(stream: Iterator[bytes], overlap: int = 64) -> Iterator[bytes]:
    """The stream in pieces that overlap, so a secret across two reads is still found."""
    tail = b""
    for piece in stream:
        yield tail + piece
        tail = piece[-overlap:]


@pytest.fixture(scope="module")
def secrets() -> list[bytes]:
    return secret_values()


def assert_clean(what: str, stream: Iterator[bytes], secrets: list[bytes]) -> None:
    for piece in chunks(stream):
        found = [n for n, s in enumerate(secrets) if s in piece]
        assert not found, f"secret #{found[0]} found in {what}"


def test_the_scan_finds_a_planted_secret(secrets: list[bytes]) -> None:
    planted = iter([b"a" * 100, b"b" * 30 + secrets[-1][:10], secrets[-1][10:] + b"c"])
    with pytest.raises(AssertionError, match="found in planted"):
        assert_clean("planted", planted, secrets)


def test_no_secret_in_any_image(deployed: Deployment, secrets: list[bytes]) -> None:
    """Every image every machine runs, read from that machine's engine."""
    for machine in deployed.machines:
        client = deployed.engine(machine)
        for image in {c.image.id: c.image for c in deployed.containers(machine)}.values():
            assert_image_clean(client, image, secrets)


def assert_image_clean(client: docker.DockerClient, image: Image, secrets: list[bytes]) -> None:
    assert_clean(f"{image.tags} settings", iter([repr(image.attrs).encode(),
                                                repr(image.history()).encode()]), secrets)
    # Every file of every layer, as `docker export` of a container of it gives them.
    probe = client.containers.create(image.id, command=["true"])
    try:
        assert_clean(f"{image.tags} files", probe.export(chunk_size=1 << 20), secrets)
    finally:
        probe.remove()


def test_no_secret_in_container_settings_or_logs(deployed: Deployment,
                                                secrets: list[bytes]) -> None:
    for container in deployed.containers():
        assert_clean(f"{container.name} settings", iter([repr(container.attrs).encode()]),
                     secrets)
        assert_clean(f"{container.name} logs", iter([container.logs()]), secrets)


def test_no_secret_in_the_plays_output(secrets: list[bytes]) -> None:
    """The converge and idempotence runs, with --diff, as molecule logged them."""
    log = os.environ.get("ANSIBLE_LOG_PATH")
    if not log:
        pytest.skip("no play log here (molecule verify sets ANSIBLE_LOG_PATH)")
    text = Path(log).read_bytes()
    assert b"Create what is missing of this inventory's secrets" in text  # the plays ran
    assert_clean(log, iter([text]), secrets)
