"""The `agentlink` command: validate and inspect topologies, run hosts, run a local lab."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agentlink import topology as topo

if TYPE_CHECKING:
    from agentlink.load import LoadSpec

DEFAULT_TOPOLOGY = os.environ.get("AGENTLINK_TOPOLOGY", "topology/agents.yml")
EXIT_INVALID = 2


def _home(args: argparse.Namespace) -> Path:
    return Path(args.home or os.environ.get("AGENTLINK_HOME", ".agentlink"))


def _say(message: str) -> None:
    print(message, flush=True)


def _load(path: str) -> topo.Topology | None:
    try:
        return topo.load(path)
    except topo.TopologyError as err:
        print(err, file=sys.stderr)
        print(f"{len(err.problems)} problem(s) in {path}", file=sys.stderr)
        return None


def cmd_validate(args: argparse.Namespace) -> int:
    topology = _load(args.file)
    if topology is None:
        return EXIT_INVALID
    _say(f"{args.file}: ok ({len(topology.agents)} agents, {len(topology.instances)} instances, "
         f"{len(topology.groups)} host processes, {len(topology.layers())} layers)")
    return 0


def cmd_layers(args: argparse.Namespace) -> int:
    topology = _load(args.file)
    if topology is None:
        return EXIT_INVALID
    for index, names in enumerate(topology.layers()):
        _say(f"layer {index}: {', '.join(names)}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from agentlink.config import ConfigError, load_host_config
    from agentlink.host import run

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_host_config(args.config, args.group)
    except (OSError, ConfigError) as err:
        print(f"agentlink run: {err}", file=sys.stderr)
        return EXIT_INVALID
    return run(config)


def cmd_up(args: argparse.Namespace) -> int:
    from agentlink.launch import LaunchError
    from agentlink.local import LocalLab, check_ports_free

    topology = _load(args.file)
    if topology is None:
        return EXIT_INVALID
    clashes = check_ports_free(topology)
    if clashes:
        print("\n".join(clashes), file=sys.stderr)
        return EXIT_INVALID
    try:
        report = LocalLab(_home(args)).up(topology, args.redis_url, _say)
    except LaunchError as err:
        print(f"agentlink up failed: {err}", file=sys.stderr)
        return 1
    _say(f"{len(topology.instances)} instances of {len(topology.agents)} agents healthy "
         f"in {report.seconds:.2f}s ({len(report.layers)} layers); "
         "`agentlink status` lists them, `agentlink down` stops them")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from agentlink.local import LocalLab

    stopped = LocalLab(_home(args)).down(_say)
    _say(f"stopped {stopped} agent host(s)")
    return 0


def _redis_settings(args: argparse.Namespace, state: dict[str, Any],
                    command: str) -> dict[str, Any] | None:
    """Where the registry is: --sentinel, --redis-url, or the local lab's own Redis."""
    redis_url = args.redis_url or state.get("redis_url")
    if args.sentinel:
        return {"sentinels": args.sentinel, "service": args.service}
    if redis_url:
        return {"url": redis_url}
    print(f"agentlink {command}: no local lab here; give --redis-url or --sentinel",
          file=sys.stderr)
    return None


def _load_spec(args: argparse.Namespace) -> LoadSpec:
    from agentlink.load import DEFAULT_TARGETS, LoadSpec

    return LoadSpec(rate=args.rate, duration=args.duration, workers=args.workers,
                    timeout=args.timeout, targets=tuple(args.target or DEFAULT_TARGETS))


def _say_load(report: dict[str, Any]) -> None:
    lat = {name: "-" if ms is None else ms for name, ms in report["latency_ms"].items()}
    _say(f"sent {report['sent']} of {report['scheduled']} in {report['seconds']:g}s "
         f"({report['rate']}/s, {report['late']} late): {report['succeeded']} succeeded, "
         f"{report['failed']} failed")
    _say(f"latency ms: p50 {lat['p50']}, p90 {lat['p90']}, p99 {lat['p99']}, "
         f"max {lat['max']}")
    _say(f"state: {report['acknowledged']} writes acknowledged, {report['verified']} "
         f"read back, {report['lost']} lost")
    for reason, count in report["failures"].items():
        _say(f"  failed {count}x: {reason} (e.g. {report['failure_examples'][reason]})")
    for key, why in report["lost_keys"].items():
        _say(f"  lost {key}: {why}")


def cmd_load(args: argparse.Namespace) -> int:
    from agentlink.client import FailoverClient
    from agentlink.load import MEMORY, LoadReport, run_load
    from agentlink.local import LocalLab
    from agentlink.registry import Registry, redis_client

    settings = _redis_settings(args, LocalLab(_home(args)).state(), "load")
    if settings is None:
        return EXIT_INVALID
    try:
        spec = _load_spec(args)
    except ValueError as err:
        print(f"agentlink load: {err}", file=sys.stderr)
        return EXIT_INVALID

    def progress(report: LoadReport) -> None:
        print(f"sent {report.sent}, ok {report.succeeded}, failed {report.failed}",
              file=sys.stderr, flush=True)

    client = FailoverClient(Registry(redis_client(settings)), stateful={MEMORY})
    report = run_load(client, spec, progress)
    if args.json:
        _say(json.dumps(report.summary(), indent=2))
    else:
        _say_load(report.summary())
    return 0 if report.ok else 1


def cmd_status(args: argparse.Namespace) -> int:
    from agentlink import status
    from agentlink.local import LocalLab
    from agentlink.registry import REDIS_ERRORS, Registry, redis_client
    from agentlink.status import fetch_health

    state = LocalLab(_home(args)).state()
    file = args.file or state.get("topology") or DEFAULT_TOPOLOGY
    settings = _redis_settings(args, state, "status")
    if settings is None:
        return EXIT_INVALID
    topology = _load(file)
    if topology is None:
        return EXIT_INVALID
    try:
        rows = status.collect(topology, Registry(redis_client(settings)), fetch_health)
    except REDIS_ERRORS as err:
        print(f"agentlink status: registry unreachable ({settings}): {err}", file=sys.stderr)
        return 1
    _say(json.dumps(status.as_json(rows), indent=2) if args.json else status.as_table(rows))
    return 0 if all(r.serving for r in rows) else 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agentlink", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, func: object, help: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help)
        cmd.set_defaults(func=func)
        return cmd

    for name, func, text in (("validate", cmd_validate, "check a topology, every problem"),
                             ("layers", cmd_layers, "print the start layers of a topology")):
        command(name, func, text).add_argument("file", nargs="?", default=DEFAULT_TOPOLOGY)
    run = command("run", cmd_run, "run one group of agents (one agent host process)")
    run.add_argument("--config", required=True, help="startup_config.yaml of this machine")
    run.add_argument("--group", required=True)
    up = command("up", cmd_up, "start the topology as local processes with a local Redis")
    up.add_argument("file", nargs="?", default=DEFAULT_TOPOLOGY)
    up.add_argument("--redis-url", help="use this Redis instead of starting one")
    status = command("status", cmd_status, "every instance with machine, layer and health")
    status.add_argument("--json", action="store_true")
    status.add_argument("--file", help="topology (default: the running lab's)")
    down = command("down", cmd_down, "stop what `agentlink up` started")
    load = command("load", cmd_load, "requests at a set rate for a set time; exit 1 on any "
                   "failed or unsent request or lost acknowledged write")
    load.add_argument("--rate", type=float, default=50.0, help="requests per second")
    load.add_argument("--duration", type=float, default=10.0, help="seconds")
    load.add_argument("--workers", type=int, default=4)
    load.add_argument("--timeout", type=float, default=5.0, help="each request's deadline")
    load.add_argument("--target", action="append", metavar="KIND[=WEIGHT]",
                      help="coordinator, twin, memory or agent:<Name>, weight 1 unless given "
                           "(repeat; default the first three)")
    load.add_argument("--json", action="store_true")
    for cmd in (status, load):
        cmd.add_argument("--redis-url")
        cmd.add_argument("--sentinel", action="append", metavar="HOST:PORT",
                         help="find the registry through Sentinel (repeat for each)")
        cmd.add_argument("--service", default="agentlink", help="Sentinel's name of the primary")
    for cmd in (up, status, down, load):
        cmd.add_argument("--home", help="state directory (default $AGENTLINK_HOME or .agentlink)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.func(args))
