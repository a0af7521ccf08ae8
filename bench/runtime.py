"""Runtime benchmarks, measured side by side in one run on this machine.

1. Request round trip to a real agent host process, three ways: the pooled failover client,
   a raw pyzmq REQ socket kept open, and a new context and socket per request (the old
   pattern); plus raw REQ/REP against a bare echo server, the floor of pyzmq itself.
2. Resident memory of one agent host process hosting 1, 10 and 40 agents.
3. `agentlink up` of the reference topology to all instances healthy, and its memory.

Run: `make bench-runtime` (or `.venv/bin/python bench/runtime.py [--json FILE]`).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import yaml
import zmq

from agentlink.deploy.render import render_startup_config, write_startup_config
from agentlink.devtools.local import LocalLab
from agentlink.devtools.redis_server import RedisServer
from agentlink.devtools.testing import free_ports
from agentlink.runtime import protocol
from agentlink.runtime.client import FailoverClient
from agentlink.runtime.registry import Registry, redis_client
from agentlink.runtime.status import fetch_health
from agentlink.topology import load

ROOT = Path(__file__).resolve().parent.parent
WORKER = "agentlink.runtime.reference.workers:Worker"
REQUEST = {"text": "the quick brown fox jumps over the lazy dog", "hops": 0}
RAW = "raw pyzmq REQ socket, kept open"
POOLED = "pooled socket (agentlink.runtime.pool)"
CLIENT = "pooled failover client, by agent name"
NEW = "new context and socket per request (old)"


def _echo_server(port: int) -> None:
    sock = zmq.Context().socket(zmq.REP)
    sock.bind(f"tcp://127.0.0.1:{port}")
    while True:
        sock.send_multipart(sock.recv_multipart())


@contextmanager
def agent_host(workdir: Path, redis_url: str, agents: int,
               security: dict[str, Any] | None = None) -> Iterator[tuple[psutil.Process, str]]:
    """One real `agentlink run` process hosting `agents` workers, group `bench`; yields it and
    its endpoint. `security` goes into its startup config as is (CURVE keys' files)."""
    port = free_ports(2)[0]
    topology_file = workdir / f"bench-{agents}.yml"
    topology_file.write_text(yaml.safe_dump({
        "machines": {"bench": {}},
        "agents": [{"name": f"Worker{n}", "class": WORKER, "machine": "bench", "group": "bench",
                    "port": port, "options": {"kind": "stats"}} for n in range(agents)]}))
    config = workdir / f"bench-{agents}-{port}.yaml"
    startup = render_startup_config(load(topology_file), "bench", {"bench": "127.0.0.1"},
                                    {"url": redis_url})
    write_startup_config({**startup, "security": security or {}}, config)
    log = (workdir / f"bench-{agents}.log").open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "agentlink", "run", "--config", str(config),
                             "--group", "bench"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while (fetch_health(f"http://127.0.0.1:{port + 1}") or {}).get("state") != "healthy":
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"bench host with {agents} agents did not start: see {log.name}")
            time.sleep(0.05)
        yield psutil.Process(proc.pid), f"tcp://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()


def per_call_us(call: Callable[[], Any], count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        call()
    return (time.perf_counter() - started) / count * 1e6


def round_trips(workdir: Path, redis_url: str, count: int, rounds: int
                ) -> dict[str, dict[str, float]]:
    """µs per request for each client pattern, against a bare echo server and an agent host."""
    echo_port = free_ports(1)[0]
    echo = multiprocessing.Process(target=_echo_server, args=(echo_port,), daemon=True)
    echo.start()
    frames = protocol.encode_request("Worker0", REQUEST)
    with agent_host(workdir, redis_url, 1) as (_, host_endpoint):
        servers = {"bare echo server": f"tcp://127.0.0.1:{echo_port}",
                   "agent host": host_endpoint}
        ctx = zmq.Context()
        client = FailoverClient(Registry(redis_client({"url": redis_url})))
        pool = client.pool
        calls: dict[tuple[str, str], Callable[[], Any]] = {}
        for server, endpoint in servers.items():
            kept = ctx.socket(zmq.REQ)
            kept.connect(endpoint)
            calls[RAW, server] = lambda s=kept: (s.send_multipart(frames), s.recv_multipart())
            calls[NEW, server] = lambda e=endpoint: _new_context_request(e, frames)
            calls[POOLED, server] = lambda e=endpoint: pool.request(e, frames)
        calls[CLIENT, "agent host"] = lambda: client.call("Worker0", REQUEST)
        for call in calls.values():  # warm every path up first
            per_call_us(call, 50)
        samples: dict[tuple[str, str], list[float]] = {key: [] for key in calls}
        for _ in range(rounds):  # interleaved, so drift hits every pattern alike
            for key, call in calls.items():
                samples[key].append(per_call_us(call, count))
        ctx.destroy(linger=0)
    echo.terminate()
    table: dict[str, dict[str, float]] = {}
    for (pattern, server), values in samples.items():
        table.setdefault(pattern, {})[server] = statistics.median(values)
    return table


def _new_context_request(endpoint: str, frames: list[bytes]) -> None:
    """The old pattern: a context and a socket for every request."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    sock.connect(endpoint)
    sock.send_multipart(frames)
    sock.recv_multipart()
    sock.close(linger=0)
    ctx.term()


def host_memory(workdir: Path, redis_url: str, sizes: tuple[int, ...]) -> dict[int, float]:
    client = FailoverClient(Registry(redis_client({"url": redis_url})))
    result = {}
    for size in sizes:
        with agent_host(workdir, redis_url, size) as (proc, _):
            for n in range(size):  # touch every agent's request path once
                client.call(f"Worker{n}", REQUEST)
            result[size] = proc.memory_info().rss / 2**20
    return result


def reference_up(workdir: Path, redis_url: str) -> dict[str, float]:
    topology = load(ROOT / "topology" / "agents.yml")
    lab = LocalLab(workdir / "lab")
    try:
        report = lab.up(topology, redis_url, progress=lambda _: None)
        pids = [json.loads(p.read_text())["pid"] for p in (lab.home / "run").glob("*.json")]
        rss = sum(psutil.Process(pid).memory_info().rss for pid in pids) / 2**20
    finally:
        started = time.perf_counter()
        lab.down(progress=lambda _: None)
        down_s = time.perf_counter() - started
    return {"seconds": report.seconds, "processes": len(pids), "rss_mb": rss,
            "instances": len(topology.instances), "agents": len(topology.agents),
            "down_seconds": down_s}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=500, help="requests per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="agentlink-bench-") as tmp:
        workdir = Path(tmp)
        redis = RedisServer(workdir / "redis")
        redis.start()
        try:
            print("measuring round trips ...", flush=True)
            trips = round_trips(workdir, redis.url, args.count, args.rounds)
            print("measuring host memory ...", flush=True)
            memory = host_memory(workdir, redis.url, (1, 10, 40))
            print("starting the reference system ...", flush=True)
            up = reference_up(workdir, redis.url)
        finally:
            redis.stop()
    report(trips, memory, up)
    if args.json:
        args.json.write_text(json.dumps({"round_trip_us": trips, "host_rss_mb": memory,
                                         "reference_up": up}, indent=2))
    return 0


def report(trips: dict[str, dict[str, float]], memory: dict[int, float],
           up: dict[str, float]) -> None:
    servers = ("bare echo server", "agent host")
    print(f"\nRound trip in µs ({psutil.cpu_count()} cores, median of rounds), "
          "and the ratio to a raw REQ socket against the same server:\n")
    print("| client | " + " | ".join(servers) + " |\n|---|---:|---:|")
    for pattern, row in trips.items():
        cells = [f"{row[s]:.0f} ({row[s] / trips[RAW][s]:.2f}x)" if s in row else "-"
                 for s in servers]
        print(f"| {pattern} | " + " | ".join(cells) + " |")
    host = "agent host"
    print(f"\npooled socket vs the old pattern, against the agent host: "
          f"{trips[NEW][host] / trips[POOLED][host]:.1f}x faster; failover client: "
          f"{trips[NEW][host] / trips[CLIENT][host]:.1f}x")
    print("the agent host's own cost: a pooled round trip to it is "
          f"{trips[POOLED][host] / trips[POOLED]['bare echo server']:.2f}x the bare echo "
          f"server's, a raw socket's {trips[RAW][host] / trips[RAW]['bare echo server']:.2f}x")
    per_agent = (memory[max(memory)] - memory[min(memory)]) / (max(memory) - min(memory))
    print("\n| agents in one host process | resident MB |\n|---:|---:|")
    for size, mb in memory.items():
        print(f"| {size} | {mb:.1f} |")
    print(f"\nmarginal memory per co-hosted agent: {per_agent:.2f} MB")
    print(f"\nagentlink up of the reference system: {up['instances']:.0f} instances of "
          f"{up['agents']:.0f} agents in {up['processes']:.0f} processes healthy in "
          f"{up['seconds']:.2f} s; their resident memory {up['rss_mb']:.0f} MB; "
          f"agentlink down stopped them in {up['down_seconds']:.2f} s")


if __name__ == "__main__":
    raise SystemExit(main())
