"""The Docker backend of the launcher against the real engine and the built runtime image.

Containers use host networking on free ports and a test Redis on this host, so these tests
are independent of the deployed lab; they need the images (build/images.json).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
import yaml

from agentlink.deploy import rollout
from agentlink.deploy.docker_backend import DockerBackend
from agentlink.deploy.launch import LaunchError, plan
from agentlink.deploy.render import render_startup_config, write_startup_config
from agentlink.devtools.redis_server import RedisServer
from agentlink.devtools.testing import free_ports
from agentlink.topology import Topology, load

ROOT = Path(__file__).resolve().parents[2]
WORKER = "agentlink.runtime.reference.workers:Worker"
# What every container of a deployment gets (the shared group_vars the agents role passes on).
HARDENING = yaml.safe_load((ROOT / "playbooks" / "group_vars" / "all" / "agentlink.yml")
                           .read_text())["agentlink_container_hardening"]


def _image() -> str:
    try:
        refs = json.loads((ROOT / "build" / "images.json").read_text())["images"]
        docker.from_env().images.get(refs["mainpc"])
    except (OSError, KeyError, docker.errors.DockerException) as err:
        if os.environ.get("AGENTLINK_REQUIRE_LAB"):
            pytest.fail(f"the images are required here but missing: {err}")
        pytest.skip(f"no built images ({err}); run make deploy first")
    return str(refs["mainpc"])


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    # Containers on the host network reach it on loopback; the server binds 127.0.0.1.
    yield server.url
    server.stop()


def make_lab(tmp_path: Path, redis_url: str, second_class: str,
             env: dict[str, str] | None = None) -> tuple[Topology, DockerBackend]:
    first, second = free_ports(2)[0], free_ports(2)[0]
    topology_file = tmp_path / "topology.yml"
    topology_file.write_text(yaml.safe_dump({"machines": {"solo": {}}, "agents": [
        {"name": "Base", "class": WORKER, "machine": "solo", "group": "t-base", "port": first},
        {"name": "Upper", "class": second_class, "machine": "solo", "group": "t-upper",
         "port": second, "depends_on": ["Base"], "health_timeout": 20},
    ]}))
    topology = load(topology_file)
    config_dir = tmp_path / "config"
    write_startup_config(render_startup_config(topology, "solo", {"solo": "127.0.0.1"},
                                               {"url": redis_url}),
                         config_dir / "startup_config.yaml")
    config_dir.chmod(0o755)
    machines = {"solo": {"image": _image(), "config_dir": str(config_dir),
                         "address": "127.0.0.1", "network_mode": "host", "env": env or {},
                         "config_checksum": "1", "hardening": HARDENING}}
    return topology, DockerBackend(rollout.machine_specs(machines, topology),
                                   prefix=f"agentlink-test-{tmp_path.name[-8:]}")


def names(backend: DockerBackend) -> set[str]:
    client = docker.from_env()
    return {c.name for c in client.containers.list(all=True)
            if c.name.startswith(backend.prefix)}


def test_a_crash_at_start_rolls_back_and_names_the_agent(tmp_path: Path, redis_url: str
                                                         ) -> None:
    topology, backend = make_lab(tmp_path, redis_url, "agentlink.runtime.reference.workers:Missing")
    with pytest.raises(LaunchError) as failure:
        rollout.launch(topology, backend)
    err = failure.value
    assert err.instance == "Upper-1"
    assert "exited during start" in err.reason
    assert any("Missing" in line for line in err.log_lines)  # the crash, from its log
    assert set(err.stopped) == {"t-upper", "t-base"}
    assert names(backend) == set()  # nothing this run started is left behind


def test_unchanged_is_left_alone_and_drift_recreates(tmp_path: Path, redis_url: str) -> None:
    topology, backend = make_lab(tmp_path, redis_url, WORKER)
    try:
        first = rollout.launch(topology, backend)
        assert first["changed"]
        assert rollout.plan(topology, backend) == {"changed": False, "would_start": {},
                                                  "would_remove": []}
        second = rollout.launch(topology, backend)
        assert not second["changed"]
        assert all(not layer["started"] for layer in second["layers"])
        spec = backend.machines["solo"]
        moved = DockerBackend({"solo": dataclasses.replace(spec, env={"EXTRA": "1"})},
                              prefix=backend.prefix)
        planned = rollout.plan(topology, moved)["would_start"]
        units = [unit for layer in plan(topology) for unit in layer]
        assert set(planned) == {backend.name(u) for u in units}
    finally:
        rollout.remove(topology, backend)
    assert names(backend) == set()
