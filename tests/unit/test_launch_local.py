"""The layered launcher on local processes: `agentlink up / status / down`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import psutil
import pytest
import redis
import yaml

from agentlink.deploy.render import render_startup_config, write_startup_config
from agentlink.devtools.local import running
from agentlink.devtools.testing import free_ports
from agentlink.runtime.client import FailoverClient
from agentlink.runtime.host import EXIT_DIED
from agentlink.runtime.registry import Registry, redis_client
from agentlink.runtime.status import fetch_health
from agentlink.topology import load

from .conftest import ROOT, Traffic, eventually

ECHO = "tests.unit.agents:Echo"


def agentlink(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # hosts import the test agents
    return subprocess.run([sys.executable, "-m", "agentlink", *args, "--home", str(home)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
                          check=False)


def topology_file(tmp_path: Path, agents: list[dict[str, Any]]) -> Path:
    path = tmp_path / "topology.yml"
    path.write_text(yaml.safe_dump({"machines": {"m1": {}, "m2": {}}, "agents": agents}))
    return path


def ports(count: int) -> Iterator[int]:
    return iter(free_ports(2 * count)[::2])


def host_pids(home: Path) -> list[int]:
    return [json.loads(p.read_text())["pid"] for p in (home / "run").glob("*.json")]


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "home"
    yield path
    agentlink("down", home=path)


def test_up_starts_layers_in_order_and_status_lists_every_instance(
        tmp_path: Path, home: Path, redis_url: str) -> None:
    p = ports(3)
    first, second, third = next(p), next(p), next(p)
    path = topology_file(tmp_path, [
        {"name": "Base", "class": ECHO, "machine": "m1", "group": "base", "port": first},
        {"name": "Mid", "class": ECHO, "machine": "m2", "group": "mid", "port": second,
         "depends_on": ["Base"]},
        {"name": "Twin", "class": ECHO, "depends_on": ["Mid"], "replicas": 2, "placement": [
            {"machine": "m1", "group": "base", "port": first},
            {"machine": "m2", "group": "top", "port": third}]},
    ])
    up = agentlink("up", str(path), "--redis-url", redis_url, home=home)
    assert up.returncode == 0, up.stderr
    lines = up.stdout.splitlines()
    assert lines[0].startswith("layer 0: 1 agent(s), started 1 host(s)")
    gated = [line.split(":")[0] for line in lines
             if line.startswith("layer") and "healthy in" in line]
    assert gated == ["layer 0", "layer 1", "layer 2"]
    assert lines[-1].startswith("4 instances of 3 agents healthy in")
    status = agentlink("status", "--json", "--redis-url", redis_url, "--file", str(path),
                       home=home)
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["healthy"] and report["total"] == 4
    assert {(i["instance"], i["layer"], i["machine"]) for i in report["instances"]} == {
        ("Base-1", 0, "m1"), ("Mid-1", 1, "m2"), ("Twin-1", 2, "m1"), ("Twin-2", 2, "m2")}
    again = agentlink("up", str(path), "--redis-url", redis_url, home=home)
    assert "started 0 host(s), 1 unchanged" in again.stdout  # nothing restarted
    pids = host_pids(home)
    down = agentlink("down", home=home)
    assert down.returncode == 0 and "stopped 3 agent host(s)" in down.stdout
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"
                   for pid in pids)


def test_an_agent_never_healthy_rolls_the_run_back(tmp_path: Path, home: Path,
                                                    redis_url: str) -> None:
    p = ports(2)
    path = topology_file(tmp_path, [
        {"name": "Base", "class": ECHO, "machine": "m1", "group": "base", "port": next(p)},
        {"name": "Sick", "class": "tests.unit.agents:NeverHealthy", "machine": "m2",
         "group": "sick", "port": next(p), "depends_on": ["Base"], "health_timeout": 2},
    ])
    up = agentlink("up", str(path), "--redis-url", redis_url, home=home)
    assert up.returncode == 1
    assert "agent Sick-1 (group sick on m2) did not become healthy within 2s" in up.stderr
    assert "model_loaded" in up.stderr  # its last health answer
    assert "group sick serving 1 agent(s)" in up.stderr  # its last log lines
    assert "stopped what this run started: sick, base" in up.stderr
    assert host_pids(home) == []


def test_an_agent_that_crashes_at_start_is_named(tmp_path: Path, home: Path,
                                                  redis_url: str) -> None:
    path = topology_file(tmp_path, [{"name": "Broken",
                                     "class": "tests.unit.agents:CrashesAtStart",
                                     "machine": "m1", "group": "b", "port": next(ports(1))}])
    up = agentlink("up", str(path), "--redis-url", redis_url, home=home)
    assert up.returncode == 1
    assert "agent Broken-1 (group b on m1) exited during start" in up.stderr
    assert "the model file is missing" in up.stderr


def test_a_probe_that_reads_back_its_own_request_is_no_answer() -> None:
    # what a probe of a port nobody listens on reads when the kernel connects it to itself
    with socket.create_server(("127.0.0.1", 0)) as listener:
        def echo() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.sendall(conn.recv(4096))

        thread = threading.Thread(target=echo, daemon=True)
        thread.start()
        assert fetch_health(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout=5) is None
        thread.join(timeout=5)


def test_the_launcher_names_the_agent_whose_check_answers_none_not_its_group_mate(
        tmp_path: Path, home: Path, redis_url: str) -> None:
    port = next(ports(1))
    path = topology_file(tmp_path, [
        {"name": "Mate", "class": ECHO, "machine": "m1", "group": "pair", "port": port,
         "health_timeout": 2},
        {"name": "Odd", "class": "tests.unit.agents:OddAnswer", "machine": "m1",
         "group": "pair", "port": port, "health_timeout": 2},
    ])
    up = agentlink("up", str(path), "--redis-url", redis_url, home=home)
    assert up.returncode == 1
    assert "agent Odd-1 (group pair on m1) did not become healthy within 2s" in up.stderr
    assert "returned NoneType None, not a dict of named checks" in up.stderr


def test_a_host_whose_supervisor_dies_exits_non_zero(tmp_path: Path, redis_url: str) -> None:
    """A Redis user that may not write (an ACL changed under a running system): the host
    cannot keep its registry entries, its supervisor fails, and the process must end."""
    admin = redis.Redis.from_url(redis_url)
    admin.acl_setuser("reader", enabled=True, passwords=["+reads"], keys=["*"],
                      commands=["+@read", "+@connection", "+info"])
    try:
        port = next(ports(1))
        topology = load(topology_file(tmp_path, [
            {"name": "A", "class": ECHO, "machine": "m1", "group": "g", "port": port}]))
        config = render_startup_config(topology, "m1", {"m1": "127.0.0.1", "m2": "127.0.0.1"},
                                       {"url": redis_url, "username": "reader",
                                        "password": "reads"})
        write_startup_config(config, tmp_path / "startup_config.yaml")
        run = subprocess.run([sys.executable, "-m", "agentlink", "run", "--config",
                              str(tmp_path / "startup_config.yaml"), "--group", "g"],
                             capture_output=True, text=True, timeout=60, check=False,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    finally:
        admin.acl_deluser("reader")
    assert run.returncode == EXIT_DIED, run.stderr[-2000:]
    assert "its supervisor thread failed: NoPermissionError" in run.stderr


def test_a_failed_up_stops_the_redis_it_started(tmp_path: Path, home: Path) -> None:
    path = topology_file(tmp_path, [
        {"name": "Sick", "class": "tests.unit.agents:NeverHealthy", "machine": "m1",
         "group": "sick", "port": next(ports(1)), "health_timeout": 1}])
    up = agentlink("up", str(path), home=home)  # no --redis-url: it starts its own
    assert up.returncode == 1
    assert "stopped what this run started: sick, redis-server" in up.stderr
    assert redis_servers_of(home) == []
    assert not (home / "state.json").exists()


def redis_servers_of(home: Path) -> list[int]:
    """The live redis-servers of this home. psutil gives a process that ends while it is
    listed (a zombie, or gone) no cmdline, and `running` says no for it."""
    return [p.pid for p in psutil.process_iter(["name", "cmdline"])
            if p.info["name"] == "redis-server"
            and str(home) in " ".join(p.info["cmdline"] or ()) and running(p.pid)]


def test_local_hosts_listen_on_loopback_only(tmp_path: Path, home: Path,
                                             redis_url: str) -> None:
    path = topology_file(tmp_path, [{"name": "A", "class": ECHO, "machine": "m1",
                                     "group": "a", "port": next(ports(1))}])
    assert agentlink("up", str(path), "--redis-url", redis_url, home=home).returncode == 0
    [pid] = host_pids(home)
    listening = {c.laddr for c in psutil.Process(pid).net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN}
    assert len(listening) == 2  # its ROUTER and HTTP ports
    assert {address.ip for address in listening} == {"127.0.0.1"}


def test_call_prints_an_agent_s_reply_and_exits_by_its_outcome(
        tmp_path: Path, home: Path, redis_url: str) -> None:
    port = next(ports(1))
    path = topology_file(tmp_path, [
        {"name": "A", "class": ECHO, "machine": "m1", "group": "a", "port": port},
        {"name": "Picky", "class": "tests.unit.agents:Strict", "machine": "m1", "group": "a",
         "port": port}])
    assert agentlink("up", str(path), "--redis-url", redis_url, home=home).returncode == 0
    reply = agentlink("call", "A", '{"text": "hi"}', home=home)
    assert reply.returncode == 0, reply.stderr
    assert json.loads(reply.stdout) == {"echo": {"text": "hi"}, "by": "A-1"}
    refused = agentlink("call", "Picky", '{"n": "one"}', home=home)
    assert refused.returncode == 2
    assert "Picky answered bad_request: expected {\"n\": <int>}" in refused.stderr
    nobody = agentlink("call", "Nobody", "{}", "--timeout", "0.5", home=home)
    assert nobody.returncode == 1 and "Nobody: no instance answered" in nobody.stderr
    not_json = agentlink("call", "A", "{text}", home=home)
    assert not_json.returncode == 2 and "the request is not JSON" in not_json.stderr


def test_an_invalid_topology_starts_nothing(tmp_path: Path, home: Path) -> None:
    path = topology_file(tmp_path, [{"name": "A", "class": ECHO, "machine": "m1",
                                     "group": "a", "port": 7000, "depends_on": ["A"]}])
    up = agentlink("up", str(path), home=home)
    assert up.returncode == 2
    assert "dependency cycle: A -> A" in up.stderr
    assert not (home / "run").exists()


def test_sigterm_stops_gracefully_after_in_flight_work(tmp_path: Path, home: Path,
                                                        redis_url: str) -> None:
    port = next(ports(1))
    path = topology_file(tmp_path, [{"name": "Slow", "class": "tests.unit.agents:Slow",
                                     "machine": "m1", "group": "slow", "port": port}])
    assert agentlink("up", str(path), "--redis-url", redis_url, home=home).returncode == 0
    client = FailoverClient(Registry(redis_client({"url": redis_url})))
    result: dict[str, Any] = {}
    call = threading.Thread(target=lambda: result.update(
        client.call("Slow", {"sleep": 1.0}, timeout=10)))
    call.start()
    metrics = f"http://127.0.0.1:{port + 1}/metrics"
    eventually(lambda: "agentlink_requests_in_flight 1.0" in urlopen(metrics).read().decode(),
               what="the request in flight")
    pid = host_pids(home)[0]
    process = psutil.Process(pid)
    os.kill(pid, signal.SIGTERM)
    eventually(lambda: client.registry.records("Slow") == [], what="deregistered at stop")
    call.join(10)
    assert result == {"slept": 1.0, "by": "Slow-1"}  # the in-flight request finished
    process.wait(15)  # not our child: its exit code is not ours to read, its log is
    assert not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    assert "group slow stopped" in (home / "logs" / "slow.log").read_text()


def test_a_replica_killed_mid_traffic_loses_no_request(tmp_path: Path, home: Path,
                                                        redis_url: str) -> None:
    p = ports(2)
    path = topology_file(tmp_path, [{"name": "Twin", "class": ECHO, "replicas": 2,
                                     "placement": [
                                         {"machine": "m1", "group": "t1", "port": next(p)},
                                         {"machine": "m2", "group": "t2", "port": next(p)}]}])
    assert agentlink("up", str(path), "--redis-url", redis_url, home=home).returncode == 0
    client = FailoverClient(Registry(redis_client({"url": redis_url})))
    with Traffic(lambda: client.call("Twin", {}, timeout=5)["by"]) as traffic:
        eventually(lambda: {"Twin-1", "Twin-2"} <= set(traffic.answers), what="both answer")
        victim = json.loads((home / "run" / "t2.json").read_text())["pid"]
        os.kill(victim, signal.SIGKILL)  # no goodbye: the registry lists it for a while
        traffic.more_than(100)
    assert traffic.failures == []
    assert set(traffic.answers[-20:]) == {"Twin-1"}


def test_the_reference_system_comes_up_healthy(tmp_path: Path, home: Path,
                                                redis_url: str) -> None:
    reference = ROOT / "topology" / "agents.yml"
    up = agentlink("up", str(reference), "--redis-url", redis_url, home=home)
    assert up.returncode == 0, up.stderr
    status = agentlink("status", "--json", home=home)
    report = json.loads(status.stdout)
    instances = len(load(reference).instances)
    assert report["healthy"] and report["total"] == instances == report["serving"]
    client = FailoverClient(Registry(redis_client({"url": redis_url})))
    routed = client.call("RequestCoordinator", {"agent": "RecallAgent", "payload": {
        "text": "one two two", "hops": 3}})
    assert routed["agent"] == "RecallAgent"
    hops = routed["result"]["calls"]
    assert next(iter(hops.values()))["calls"]  # the request travelled further down
    health = client.call("SystemHealthManager", {})
    assert health["resources"]["machine"] == "pc2"
