"""Security figures, measured side by side in one run on this machine.

1. The cost of CURVE: the pooled request round trip to a real agent host process with CURVE
   on and to one with it off, in interleaved rounds, as a ratio.
2. Hostile input: messages of each hostile kind sent at a real agent host process (malformed
   frames, wrong JSON, unknown agents, oversized messages, a flood, clients without a key).
   After each kind, a valid request must still be answered; a crash is a host process that
   died or stopped answering (goal 0).

Run: `make bench-security` (or `.venv/bin/python bench/security.py [--no-docs]`); writes
docs/benchmarks-security.json and the security section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import urllib.request
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path
from typing import Any

import psutil
import zmq
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_section import write_section
from runtime import REQUEST, agent_host, per_call_us

from agentlink.devtools.redis_server import RedisServer
from agentlink.runtime import protocol
from agentlink.runtime.host.server import MAX_MESSAGE_BYTES
from agentlink.runtime.pool import Pool, RequestTimeout
from agentlink.security import OPERATOR, CurveKeys, create_secrets, operator_keys

DOCS = Path(__file__).resolve().parent.parent / "docs"
AGENT = "Worker0"
VALID = protocol.encode_request(AGENT, REQUEST)


def curve_settings(secrets: Path) -> dict[str, Any]:
    return {"curve": {"secret_file": str(secrets / "private" / "bench.key_secret"),
                      "public_dir": str(secrets / "public")}}


def round_trip_ratio(plain: str, curve: str, secrets: Path, count: int, rounds: int
                     ) -> dict[str, float]:
    """µs per pooled request to each host, interleaved so that drift hits both alike."""
    plain_pool, curve_pool = Pool(), Pool()
    curve_pool.keys = operator_keys(secrets)
    calls = {"off": lambda: plain_pool.request(plain, VALID),
             "on": lambda: curve_pool.request(curve, VALID, server="bench")}
    for call in calls.values():
        per_call_us(call, 100)  # warm up: connections, the CURVE handshake
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            samples[name].append(per_call_us(call, count))
    result = {f"curve_{name}_us": round(statistics.median(v), 1) for name, v in samples.items()}
    result["ratio"] = round(result["curve_on_us"] / result["curve_off_us"], 3)
    return result


# --- hostile input ----------------------------------------------------------------------

def hostile_kinds(rng: random.Random, count: int) -> dict[str, Callable[[], Iterator[list[bytes]]]]:
    """Each kind of hostile input: a generator of messages (frames after the envelope)."""
    def blob(limit: int = 64) -> bytes:
        return rng.randbytes(rng.randint(0, limit))

    def malformed() -> Iterator[list[bytes]]:
        for _ in range(count):
            yield [blob() for _ in range(rng.choice((0, 1, 2, 4, 5, 6)))] or [b""]

    def wrong_json() -> Iterator[list[bytes]]:
        bodies = [b"{", b"null", b"[]", b"1e999", b'"x"', b"[" * 100_000, b"\xff\xfe",
                  b'{"text": 5}', b'{"hops": -1}', b'{"hops": "x"}']
        for n in range(count):
            yield [AGENT.encode(), bodies[n % len(bodies)] if n % 2 else blob()]

    def unknown_agents() -> Iterator[list[bytes]]:
        for _ in range(count):
            yield [blob(rng.choice((8, 300, 100_000))), b"{}"]

    def oversized() -> Iterator[list[bytes]]:
        for _ in range(max(count // 100, 5)):
            yield [AGENT.encode(), b"x" * (MAX_MESSAGE_BYTES + 1)]

    def flood() -> Iterator[list[bytes]]:
        for _ in range(count * 20):
            yield VALID

    return {"malformed frames": malformed, "wrong JSON": wrong_json,
            "unknown agent names": unknown_agents, "oversized messages": oversized,
            "flood of valid requests": flood}


def send_all(endpoint: str, messages: Iterator[list[bytes]]) -> int:
    """Send without waiting for replies, as an attacker would; the number sent."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.connect(endpoint)
    sent = 0
    for frames in messages:
        sock.send_multipart([b"", *frames])
        sent += 1
    sock.close(linger=2000)
    ctx.term()
    return sent


def unauthenticated(endpoint: str, count: int) -> int:
    """Clients without a key, or with a key the host does not know, at the CURVE host."""
    for n in range(count):
        pool = Pool()
        if n % 2:
            public, secret = zmq.curve_keypair()
            pool.keys = CurveKeys(public, secret, {"bench": public}, "")
        try:
            pool.request(endpoint, VALID, timeout=0.2, server="bench")
            raise AssertionError("a client without a known key was answered")
        except RequestTimeout:
            pass
        finally:
            pool.close()
            pool.context.destroy(linger=0)
    return count


def answers(endpoint: str, keys: Any = None) -> bool:
    pool = Pool()
    pool.keys = keys
    try:
        protocol.decode_reply(pool.request(endpoint, VALID, timeout=10, server="bench"))
        return True
    except (RequestTimeout, protocol.RemoteError):
        return False
    finally:
        pool.close()
        pool.context.destroy(linger=0)


def hostile(process: psutil.Process, endpoint: str, curve: tuple[str, Any], count: int,
            http: str) -> dict[str, Any]:
    rng = random.Random(8)
    tried: dict[str, int] = {}
    crashes: list[str] = []
    for kind, messages in hostile_kinds(rng, count).items():
        tried[kind] = send_all(endpoint, messages())
        if not (process.is_running() and answers(endpoint)):
            crashes.append(kind)
    tried["clients without a known key"] = unauthenticated(curve[0], max(count // 50, 4))
    if not answers(*curve):
        crashes.append("clients without a known key")
    counted = rejected_by_code(http)
    return {"tried": tried, "total": sum(tried.values()), "crashes": len(crashes),
            "crashed_on": crashes, "host_counted": counted}


def rejected_by_code(http: str) -> dict[str, float]:
    """The host's own count of what it refused, from its /metrics, by error code."""
    with urllib.request.urlopen(f"{http}/metrics", timeout=5) as response:
        text = response.read().decode()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name in ("agentlink_request_errors", "agentlink_requests_rejected"):
            for sample in family.samples:
                code = sample.labels.get("code", "?")
                if sample.name.endswith("_total"):
                    totals[code] = totals.get(code, 0) + sample.value
    return totals


# --- report -------------------------------------------------------------------------------

def markdown(result: dict[str, Any]) -> str:
    trip, bad = result["round_trip"], result["hostile"]
    rows = "\n".join(f"| {kind} | {n:,} |" for kind, n in bad["tried"].items())
    counted = ", ".join(f"{code} {int(n):,}" for code, n in sorted(bad["host_counted"].items()))
    return "\n".join([
        f"Measured {result['date']} on {result['machine']}; `make bench-security`.",
        "",
        "| figure | measured |",
        "|---|---:|",
        f"| pooled round trip, CURVE off | {trip['curve_off_us']} µs |",
        f"| pooled round trip, CURVE on | {trip['curve_on_us']} µs |",
        f"| cost of CURVE (on / off, same run) | **{trip['ratio']}x** |",
        f"| hostile inputs tried | {bad['total']:,} |",
        f"| host crashes (goal 0) | **{bad['crashes']}** |",
        "",
        "| hostile kind | sent |",
        "|---|---:|",
        rows,
        "",
        f"The host counted what it refused, by code: {counted or 'nothing'}.",
    ])


def write_docs(result: dict[str, Any]) -> None:
    (DOCS / "benchmarks-security.json").write_text(json.dumps(result, indent=2) + "\n")
    write_section("security", "Security", markdown(result))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000, help="messages per hostile kind")
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        secrets = workdir / "secrets"
        create_secrets(str(secrets), ["bench", OPERATOR])
        redis = RedisServer(workdir / "redis")
        redis.start()
        try:
            with agent_host(workdir, redis.url, 1) as (process, plain), \
                    agent_host(workdir, redis.url, 1, curve_settings(secrets)) as (_, curve):
                print("round trips, CURVE off and on ...", file=sys.stderr)
                trip = round_trip_ratio(plain, curve, secrets, count=500, rounds=7)
                print("hostile input ...", file=sys.stderr)
                http = plain.replace("tcp://", "http://").rsplit(":", 1)
                bad = hostile(process, plain, (curve, operator_keys(secrets)), args.count,
                              f"{http[0]}:{int(http[1]) + 1}")
        finally:
            redis.stop()
    result = {"date": date.today().isoformat(),
              "machine": f"{os.cpu_count()} cores, {psutil.virtual_memory().total >> 30} GB",
              "round_trip": trip, "hostile": bad}
    print(markdown(result))
    if not args.no_docs:
        write_docs(result)
    return 0 if bad["crashes"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
