"""The `agentlink` command: validate and inspect topologies, run hosts, run a local lab."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agentlink import topology as topo

if TYPE_CHECKING:
    from agentlink.devtools.load import LoadSpec
    from agentlink.runtime.client import FailoverClient
    from agentlink.runtime.workflow.definition import Workflow

DEFAULT_TOPOLOGY = os.environ.get("AGENTLINK_TOPOLOGY", "topology/agents.yml")
EXIT_INVALID = 2
COORDINATOR = "RequestCoordinator"


def _home(args: argparse.Namespace) -> Path:
    return Path(args.home or os.environ.get("AGENTLINK_HOME", ".agentlink"))


def _say(message: str) -> None:
    print(message, flush=True)


def _load(path: str, classes: bool = False) -> topo.Topology | None:
    """The topology, or None once every problem is printed; with `classes`, an agent class
    that does not import is one (what would otherwise fail layers into a start)."""
    try:
        topology = topo.load(path)
        problems = topo.import_problems(topology) if classes else []
        if problems:
            raise topo.TopologyError(path, problems)
    except topo.TopologyError as err:
        print(err, file=sys.stderr)
        print(f"{len(err.problems)} problem(s) in {path}", file=sys.stderr)
        return None
    return topology


def cmd_validate(args: argparse.Namespace) -> int:
    topology = _load(args.file, classes=True)
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
    from agentlink.runtime.host import run
    from agentlink.runtime.startup_config import ConfigError, load_host_config

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_host_config(args.config, args.group)
    except (OSError, ConfigError) as err:
        print(f"agentlink run: {err}", file=sys.stderr)
        return EXIT_INVALID
    return run(config)


def cmd_up(args: argparse.Namespace) -> int:
    from agentlink.deploy.launch import LaunchError
    from agentlink.devtools.local import LocalLab, check_ports_free

    topology = _load(args.file, classes=True)
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
    from agentlink.devtools.local import LocalLab

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
    from agentlink.devtools.load import DEFAULT_TARGETS, LoadSpec

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
    from agentlink.devtools.load import MEMORY, LoadReport, run_load
    from agentlink.devtools.local import LocalLab
    from agentlink.runtime.client import FailoverClient, operator_registry

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

    client = FailoverClient(operator_registry(settings), stateful={MEMORY})
    report = run_load(client, spec, progress)
    if args.json:
        _say(json.dumps(report.summary(), indent=2))
    else:
        _say_load(report.summary())
    return 0 if report.ok else 1


def cmd_status(args: argparse.Namespace) -> int:
    from agentlink.devtools.local import LocalLab
    from agentlink.runtime import status
    from agentlink.runtime.client import operator_registry
    from agentlink.runtime.registry import REDIS_ERRORS
    from agentlink.runtime.status import fetch_health

    state = LocalLab(_home(args)).state()
    file = args.file or state.get("topology") or DEFAULT_TOPOLOGY
    settings = _redis_settings(args, state, "status")
    if settings is None:
        return EXIT_INVALID
    topology = _load(file)
    if topology is None:
        return EXIT_INVALID
    try:
        rows = status.collect(topology, operator_registry(settings), fetch_health)
    except REDIS_ERRORS as err:
        print(f"agentlink status: registry unreachable ({settings}): {err}", file=sys.stderr)
        return 1
    _say(json.dumps(status.as_json(rows), indent=2) if args.json else status.as_table(rows))
    return 0 if all(r.serving for r in rows) else 1


def cmd_call(args: argparse.Namespace) -> int:
    """One request to an agent, by name, through the failover client; its reply as JSON."""
    from agentlink.devtools.local import LocalLab
    from agentlink.runtime.client import FailoverClient, NoInstance, operator_registry
    from agentlink.runtime.protocol import BAD_REQUEST, RemoteError

    try:
        payload = json.loads(args.payload)
    except ValueError as err:
        print(f"agentlink call: the request is not JSON: {err}", file=sys.stderr)
        return EXIT_INVALID
    settings = _redis_settings(args, LocalLab(_home(args)).state(), "call")
    if settings is None:
        return EXIT_INVALID
    client = FailoverClient(operator_registry(settings))
    try:
        result = client.call(args.agent, payload, key=args.key, timeout=args.timeout)
    except RemoteError as err:
        print(f"agentlink call: {args.agent} answered {err.code}: {err.message}",
              file=sys.stderr)
        return EXIT_INVALID if err.code == BAD_REQUEST else 1
    except NoInstance as err:
        print(f"agentlink call: {err} (is it running? `agentlink status` lists every "
              "instance)", file=sys.stderr)
        return 1
    _say(json.dumps(result, indent=2))
    return 0


def cmd_secrets(args: argparse.Namespace) -> int:
    from agentlink.security import OPERATOR, create_secrets, write_machine_bundles

    topology = _load(args.topology)
    if topology is None:
        return EXIT_INVALID
    created = create_secrets(args.dir, [*sorted(topology.groups), OPERATOR])
    groups_of = {machine: [g.name for g in topology.groups_on(machine)]
                 for machine in args.machine}
    bundled = write_machine_bundles(args.dir, groups_of, args.password) if args.machine else []
    done = ([f"created: {', '.join(created)}"] if created else []) + (
        [f"bundled: {', '.join(bundled)}"] if bundled else [])
    _say("; ".join(done) or "nothing to create")
    return 0


def _coordinator(args: argparse.Namespace, command: str) -> FailoverClient | None:
    """A failover client to the RequestCoordinator replicas, or None (said why)."""
    from agentlink.devtools.local import LocalLab
    from agentlink.runtime.client import FailoverClient, operator_registry

    settings = _redis_settings(args, LocalLab(_home(args)).state(), command)
    return None if settings is None else FailoverClient(operator_registry(settings))


def _workflow_errors(call: Callable[[], int], command: str) -> int:
    """The coordinator's refusal or absence as one line on stderr and an exit code."""
    from agentlink.runtime.client import NoInstance
    from agentlink.runtime.protocol import BAD_REQUEST, RemoteError

    try:
        return call()
    except RemoteError as err:
        print(f"agentlink {command}: {err.message}", file=sys.stderr)
        return EXIT_INVALID if err.code == BAD_REQUEST else 1
    except NoInstance as err:
        print(f"agentlink {command}: {err} (is the system up?)", file=sys.stderr)
        return 1


def _say_workflow(record: dict[str, Any]) -> None:
    took = record.get("finished", time.time()) - record["created"]
    _say(f"workflow {record['name']} {record['id']}: {record['state']} "
         f"({took:.2f}s, run by {record['owner']})")
    for sid, step in record["steps"].items():
        detail = step.get("error") or json.dumps(step.get("result"))[:70]
        _say(f"  {sid:<16} {step['state']:<10} attempts {step['attempts']}  "
             f"{'' if step['state'] == 'pending' else detail}")
    if record.get("error"):
        _say(record["error"])


def _checked_workflow(args: argparse.Namespace) -> Workflow | None:
    """The workflow file checked against the topology, or None with every problem said."""
    from agentlink.runtime.workflow.definition import WorkflowError, load

    topology = _load(args.topology)
    if topology is None:
        return None
    try:
        workflow = load(args.workflow, topology.agents)
    except WorkflowError as err:
        print(err, file=sys.stderr)
        print(f"{len(err.problems)} problem(s) in {args.workflow}", file=sys.stderr)
        return None
    _say(f"{args.workflow}: ok ({len(workflow.steps)} steps)")
    return workflow


def cmd_workflow_validate(args: argparse.Namespace) -> int:
    return EXIT_INVALID if _checked_workflow(args) is None else 0


def cmd_workflow_run(args: argparse.Namespace) -> int:
    workflow = _checked_workflow(args)
    if workflow is None:
        return EXIT_INVALID
    try:
        inputs = json.loads(args.input) if args.input else {}
    except ValueError as err:
        print(f"agentlink workflow run: --input is not JSON: {err}", file=sys.stderr)
        return EXIT_INVALID
    client = _coordinator(args, "workflow run")
    if client is None:
        return EXIT_INVALID
    document = json.loads(workflow.document)  # the file as checked, read once

    def run() -> int:
        started = client.call(COORDINATOR, {"op": "workflow.run", "workflow": document,
                                            "input": inputs})
        _say(f"started {started['id']} on {started['owner']} "
             f"(initialized in {started['init_ms']} ms)")
        return _wait_workflow(client, started["id"], args.timeout) if args.wait else 0

    return _workflow_errors(run, "workflow run")


def _wait_workflow(client: FailoverClient, workflow_id: str, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    seen: dict[str, str] = {}
    while True:
        record = client.call(COORDINATOR, {"op": "workflow.status", "id": workflow_id})
        for sid, step in record["steps"].items():
            if step["state"] in ("succeeded", "failed") and seen.get(sid) != step["state"]:
                seen[sid] = step["state"]
                print(f"  step {sid}: {step['state']}", file=sys.stderr, flush=True)
        if record["state"] != "running":
            _say_workflow(record)
            return 0 if record["state"] == "succeeded" else 1
        if time.monotonic() > deadline:
            print(f"agentlink workflow run: {workflow_id} still running after {timeout:g}s; "
                  f"`agentlink workflow status {workflow_id}` follows it", file=sys.stderr)
            return 1
        time.sleep(0.1)


def cmd_workflow_status(args: argparse.Namespace) -> int:
    client = _coordinator(args, "workflow status")
    if client is None:
        return EXIT_INVALID

    def status() -> int:
        record = client.call(COORDINATOR, {"op": "workflow.status", "id": args.id})
        if args.json:
            _say(json.dumps(record, indent=2))
        else:
            _say_workflow(record)
        return {"succeeded": 0, "running": 0}.get(record["state"], 1)

    return _workflow_errors(status, "workflow status")


def _workflow_parser(sub: Any, registry_options: Callable[[argparse.ArgumentParser], None]
                     ) -> None:
    workflow = sub.add_parser("workflow", help="run workflows through RequestCoordinator")
    steps = workflow.add_subparsers(dest="workflow_command", required=True)
    for name, func, text in (
            ("validate", cmd_workflow_validate, "check a workflow file against the topology"),
            ("run", cmd_workflow_run, "start a workflow; --wait follows it to the end")):
        cmd = steps.add_parser(name, help=text)
        cmd.set_defaults(func=func)
        cmd.add_argument("workflow", metavar="FILE")
        cmd.add_argument("--topology", default=DEFAULT_TOPOLOGY)
    run = steps.choices["run"]
    run.add_argument("--input", help="JSON object over the file's input defaults")
    run.add_argument("--wait", action="store_true", help="exit 0 when it succeeds, 1 if not")
    run.add_argument("--timeout", type=float, default=300.0, help="seconds --wait waits")
    status = steps.add_parser("status", help="a workflow's state and every step's")
    status.set_defaults(func=cmd_workflow_status)
    status.add_argument("id")
    status.add_argument("--json", action="store_true")
    for cmd in (run, status):
        registry_options(cmd)


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
    call = command("call", cmd_call, "send one request to an agent by name and print its "
                   "reply (exit 1 on an error reply or no instance, 2 on a bad request)")
    call.add_argument("agent", help="the agent's name, as in the topology")
    call.add_argument("payload", metavar="JSON", help="the request, e.g. '{\"text\": \"hi\"}'")
    call.add_argument("--key", help="routing key, for a stateful agent's sticky replica")
    call.add_argument("--timeout", type=float, default=5.0, help="seconds, failovers included")
    secrets = command("secrets", cmd_secrets, "create the passwords and CURVE keys that a "
                      "deployment lacks (never replaces one)")
    secrets.add_argument("dir", help="the controller's secrets directory (made 0700)")
    secrets.add_argument("--topology", default=DEFAULT_TOPOLOGY,
                         help="a keypair for each of its groups, and the operator's")
    secrets.add_argument("--machine", action="append", default=[],
                         help="also write machines/<MACHINE>.tar: what that machine gets "
                              "(repeatable)")
    secrets.add_argument("--password", action="append", default=[],
                         help="a password every machine's bundle holds (repeatable)")
    for cmd in (status, load, call):
        _registry_options(cmd)
    for cmd in (up, down):
        _home_option(cmd)
    _workflow_parser(sub, _registry_options)
    return p


def _home_option(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--home", help="state directory (default $AGENTLINK_HOME or .agentlink)")


def _registry_options(cmd: argparse.ArgumentParser) -> None:
    """Where the registry is: the local lab's (--home), --redis-url or --sentinel."""
    cmd.add_argument("--redis-url")
    cmd.add_argument("--sentinel", action="append", metavar="HOST:PORT",
                     help="find the registry through Sentinel (repeat for each)")
    cmd.add_argument("--service", default="agentlink", help="Sentinel's name of the primary")
    _home_option(cmd)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.func(args))
