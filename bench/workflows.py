"""Workflow figures on the deployed lab (`make bench-workflows`, after `make deploy`).

1. Time to initialize a workflow: `workflows/transcript.yml` submitted one after another;
   the engine's own time (request in, record acknowledged, first steps queued) and the
   caller's round trip.
2. Throughput of that 5-step workflow with WINDOW workflows in flight, beside a baseline
   measured in the same run: the same five calls made by the caller itself, in the same
   order and with the same parallelism, payloads and idempotency key, with no engine and
   no state kept. The tracker waits for each workflow's end in Redis (wait_ended). For
   both: the CPU time per workflow of every lab container and of this process, and for the
   engine how much of the run the coordinators throttled agents (ResourceManager reporting
   the machines over their CPU limit: on the lab, this bench's own load counts too).
3. Completion of 10,000 workflows while the pc2 coordinator replica's host is killed (at
   20% submitted) and pc2 is cut off the LAN for CUT_S seconds (at 50%).

A workflow counts once its submission was acknowledged; it completes when its record says
succeeded. Prints a table and writes docs/benchmarks-workflows.json and the workflows
section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import sys
import threading
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import docker
import psutil
import yaml
from docs_section import write_section
from ha import lab_sentinels
from keymetrics import machine
from prometheus_client.parser import text_string_to_metric_families

from agentlink.runtime.client import FailoverClient, operator_registry
from agentlink.runtime.registry import REDIS_ERRORS, redis_client
from agentlink.runtime.workflow.engine import record_key, wait_ended
from agentlink.security import operator_settings

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "workflows" / "transcript.yml"
DOCS = ROOT / "docs"
COORDINATOR = "RequestCoordinator"
WINDOW = 32
CUT_S = 15.0
ENDED = ("succeeded", "failed")
# How long one wait for a workflow's end blocks in Redis: below the client's socket timeout.
WAIT_S = 0.4
THROTTLED = "agentlink_workflow_agents_throttled"  # a coordinator's gauge


class Tracker:
    """Submits workflows WINDOW at a time and follows their records in Redis."""

    def __init__(self, client: FailoverClient, document: dict[str, Any]) -> None:
        self.client = client
        self.document = document
        self.redis = redis_client(operator_settings({"sentinels": lab_sentinels(),
                                                     "service": "agentlink"}))
        self.acknowledged = 0
        self.refused = 0  # submissions not acknowledged (and sent again)
        self.outcomes: dict[str, str] = {}
        self._lock = threading.Lock()

    def submit(self) -> str:
        while True:
            try:
                reply = self.client.call(COORDINATOR, {"op": "workflow.run",
                                                       "workflow": self.document})
            except Exception:  # not acknowledged: nothing to lose, send it again
                with self._lock:
                    self.refused += 1
                time.sleep(0.1)
                continue
            with self._lock:
                self.acknowledged += 1
            return str(reply["id"])

    def wait(self, workflow_id: str, timeout: float) -> str:
        """Wait in Redis for the workflow's end (wait_ended); its record is read only when
        that wait times out, as a check."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                state = wait_ended(self.redis, workflow_id, WAIT_S) or self.stored(workflow_id)
            except REDIS_ERRORS:  # a failover: wait for the new primary
                time.sleep(WAIT_S)
                continue
            if state in ENDED:
                return state
        return "stuck"

    def stored(self, workflow_id: str) -> str:
        text = self.redis.get(record_key(workflow_id))
        return str(json.loads(text)["state"]) if text else "running"

    def one(self, timeout: float) -> None:
        workflow_id = self.submit()
        outcome = self.wait(workflow_id, timeout)
        with self._lock:
            self.outcomes[workflow_id] = outcome

    def run(self, count: int, timeout: float = 180.0) -> dict[str, Any]:
        started = time.monotonic()
        with ThreadPoolExecutor(WINDOW) as pool:
            for _ in range(count):
                pool.submit(self.one, timeout)
        seconds = time.monotonic() - started
        tally = {k: list(self.outcomes.values()).count(k) for k in (*ENDED, "stuck")}
        return {"workflows": count, "seconds": round(seconds, 2),
                "per_second": round(count / seconds, 1), "acknowledged": self.acknowledged,
                "refused_and_resent": self.refused, **tally,
                "completion_percent": round(100 * tally["succeeded"] / max(count, 1), 3)}


def cpu_seconds(engine: docker.DockerClient) -> dict[str, float]:
    """CPU time so far of each lab container's processes, and of this one."""
    used = {"bench": sum(os.times()[:2])}
    for container in engine.containers.list(filters={"name": "agentlink-"}):
        try:
            top = psutil.Process(container.attrs["State"]["Pid"])
            used[container.name] = sum(sum(p.cpu_times()[:2])
                                       for p in [top, *top.children(recursive=True)])
        except psutil.Error:  # gone meanwhile: left out of the sum
            continue
    return used


class Measured:
    """CPU per workflow over a run (all lab processes and this one), and the share of the
    run during which a coordinator had agents throttled (sampled from its metrics)."""

    def __init__(self, client: FailoverClient, count: int) -> None:
        self.engine = docker.from_env()
        self.count = count
        self.metrics = [f"{rec.http}/metrics"
                        for rec in client.registry.records(COORDINATOR)]
        self.samples: list[bool] = []
        self._stop = threading.Event()
        self._watch = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> Measured:
        self.before = cpu_seconds(self.engine)
        self._watch.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._watch.join()
        after = cpu_seconds(self.engine)
        self.cpu_ms = round(sum(after[k] - self.before[k] for k in after if k in self.before)
                            * 1000 / self.count, 2)

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            throttled = 0.0
            for url in self.metrics:
                with contextlib.suppress(OSError), \
                        urllib.request.urlopen(url, timeout=2) as response:
                    throttled += sum(
                        sample.value
                        for family in text_string_to_metric_families(response.read().decode())
                        if family.name == THROTTLED for sample in family.samples)
            self.samples.append(throttled > 0)

    def figures(self) -> dict[str, float]:
        share = sum(self.samples) / len(self.samples) if self.samples else 0.0
        return {"cpu_ms_per_workflow": self.cpu_ms, "throttled_share": round(share, 2)}


def init_times(client: FailoverClient, document: dict[str, Any], count: int
               ) -> dict[str, float]:
    engine_ms, round_trip_ms = [], []
    for _ in range(count):
        began = time.perf_counter()
        reply = client.call(COORDINATOR, {"op": "workflow.run", "workflow": document})
        round_trip_ms.append((time.perf_counter() - began) * 1000)
        engine_ms.append(float(reply["init_ms"]))
    return {"engine_p50_ms": percentile(engine_ms, 50),
            "engine_p99_ms": percentile(engine_ms, 99),
            "round_trip_p50_ms": percentile(round_trip_ms, 50),
            "round_trip_p99_ms": percentile(round_trip_ms, 99)}


def percentile(samples: list[float], pct: int) -> float:
    return round(statistics.quantiles(samples, n=100)[pct - 1], 2)


def by_hand(client: FailoverClient, document: dict[str, Any], count: int) -> dict[str, Any]:
    """The baseline: the caller makes the five calls itself (words and intent at once),
    with the same payloads and the same idempotency key on the write."""
    text = document["input"]["text"]

    def one() -> None:
        with ThreadPoolExecutor(2) as pair:
            words = pair.submit(client.call, "Executor", {"text": text})
            intent = pair.submit(client.call, "NLUAgent", {"text": text})
            plan = client.call("ChainOfThoughtAgent", {
                "text": f"{intent.result()['result']} {words.result()['result'][0][0]}"})
        client.call("SystemDigitalTwin", {"op": "observe", "source": "by-hand",
                                          "value": plan["result"]})
        # The workflow's own idempotency key: "at most once" costs the memory host a claim.
        run = uuid.uuid4().hex
        client.call("MemoryOrchestratorService", {"op": "put", "key": f"transcript-{run}",
                                                  "value": {"words": words.result()["result"],
                                                            "plan": plan["result"]}},
                    idempotency_key=f"{run}-keep")

    started = time.monotonic()
    with ThreadPoolExecutor(WINDOW) as pool:
        for future in [pool.submit(one) for _ in range(count)]:
            future.result()
    seconds = time.monotonic() - started
    return {"workflows": count, "seconds": round(seconds, 2),
            "per_second": round(count / seconds, 1)}


class Faults:
    """Kill the pc2 coordinator's host, later cut pc2 off: each once, when due."""

    def __init__(self, tracker: Tracker, count: int) -> None:
        self.tracker = tracker
        self.engine = docker.from_env()
        self.plan = [(count // 5, self.kill_coordinator), (count // 2, self.cut_pc2)]
        self.log: list[str] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Faults:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join()

    def _run(self) -> None:
        for due, fault in self.plan:
            while self.tracker.acknowledged < due:
                time.sleep(0.05)
            fault()

    def kill_coordinator(self) -> None:
        pid = self.engine.containers.get("agentlink-pc2-core").attrs["State"]["Pid"]
        os.kill(pid, signal.SIGKILL)  # a crash: Docker's restart policy brings it back
        self._say("killed pc2-core (RequestCoordinator-2 and its group)")

    def cut_pc2(self) -> None:
        lan = self.engine.networks.get("agentlink-lan")
        anchor = self.engine.containers.get("agentlink-pc2")
        address = anchor.attrs["NetworkSettings"]["Networks"]["agentlink-lan"]["IPAddress"]
        lan.disconnect(anchor)
        self._say(f"cut pc2 off the LAN for {CUT_S:g}s")
        time.sleep(CUT_S)
        lan.connect(anchor, ipv4_address=address, aliases=["pc2"])
        self._say("pc2 back on the LAN")

    def _say(self, what: str) -> None:
        line = f"{what} at {self.tracker.acknowledged} acknowledged"
        self.log.append(line)
        print(f"  {line}", flush=True)


def markdown(result: dict[str, Any]) -> str:
    init, engine, hand, faults = (result[k] for k in ("init", "throughput", "baseline",
                                                        "under_faults"))
    return "\n".join([
        f"Measured {result['date']} on the lab ({result['machine']['cores']} cores), "
        "`make bench-workflows`"
        f" after `make deploy`; the 5-step `workflows/transcript.yml`, {WINDOW} in flight.",
        "",
        "| figure | plan's target | our goal | measured |",
        "|---|---|---|---:|",
        f"| time to initialize (engine), p50 / p99 | < 1 s | ≤ 10 ms | "
        f"{init['engine_p50_ms']} / {init['engine_p99_ms']} ms |",
        f"| time to initialize (caller's round trip), p50 / p99 | | | "
        f"{init['round_trip_p50_ms']} / {init['round_trip_p99_ms']} ms |",
        f"| throughput, 5-step workflows | | | {engine['per_second']}/s "
        f"({engine['workflows']} in {engine['seconds']} s) |",
        f"| baseline: the caller makes the same calls itself | | | {hand['per_second']}/s "
        f"(engine at {result['engine_vs_baseline']}x of it) |",
        f"| CPU per workflow, every lab process and the bench: engine / by hand | | | "
        f"{engine['cpu_ms_per_workflow']} / {hand['cpu_ms_per_workflow']} ms "
        f"({round(hand['cpu_ms_per_workflow'] / engine['cpu_ms_per_workflow'], 2)}x) |",
        f"| completion of {faults['workflows']:,} workflows, coordinator killed and pc2 cut "
        f"off | 99.9% | 100% | {faults['completion_percent']}% |",
        "",
        f"During the engine's run the coordinators throttled agents for "
        f"{engine['throttled_share']:.0%} of it: ResourceManager reported the machines over "
        "their CPU limit (60%; on the lab both are this machine, the bench's own load "
        "included), so those agents' steps ran one at a time.",
        "",
        f"Under faults: {faults['succeeded']} succeeded, {faults['failed']} failed, "
        f"{faults['stuck']} stuck, in {faults['seconds']} s; {faults['refused_and_resent']} "
        "submissions were refused while the faults lasted and sent again (never acknowledged, "
        "so nothing to lose). Faults: " + "; ".join(result["fault_log"]) + ".",
    ])


def write_docs(result: dict[str, Any]) -> None:
    (DOCS / "benchmarks-workflows.json").write_text(json.dumps(result, indent=2) + "\n")
    write_section("workflows", "Workflows", markdown(result))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000, help="workflows under faults")
    parser.add_argument("--throughput-count", type=int, default=1000)
    parser.add_argument("--no-docs", action="store_true", help="print only")
    args = parser.parse_args()
    document = yaml.safe_load(EXAMPLE.read_text())
    client = FailoverClient(operator_registry({"sentinels": lab_sentinels(),
                                               "service": "agentlink"}))
    print("time to initialize: 200 workflows, one after another", flush=True)
    init = init_times(client, document, 200)
    print(f"  {init}\nthroughput: {args.throughput_count} workflows", flush=True)
    with Measured(client, args.throughput_count) as measured:
        throughput = Tracker(client, document).run(args.throughput_count)
    throughput |= measured.figures()
    print(f"  {throughput}\nbaseline: the same calls by hand", flush=True)
    with Measured(client, args.throughput_count) as measured:
        baseline = by_hand(client, document, args.throughput_count)
    baseline["cpu_ms_per_workflow"] = measured.figures()["cpu_ms_per_workflow"]
    print(f"  {baseline}\ncompletion: {args.count} workflows under faults", flush=True)
    tracker = Tracker(client, document)
    with Faults(tracker, args.count) as faults:
        under_faults = tracker.run(args.count)
    print(f"  {under_faults}", flush=True)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine(),
              "init": init, "throughput": throughput, "baseline": baseline,
              "engine_vs_baseline": round(throughput["per_second"] / baseline["per_second"], 2),
              "under_faults": under_faults, "fault_log": faults.log}
    print("\n" + markdown(result))
    if not args.no_docs:
        write_docs(result)
        print("\nwritten: docs/benchmarks-workflows.json, docs/benchmarks.md (workflows)")
    return 0 if under_faults["completion_percent"] == 100 else 1


if __name__ == "__main__":
    sys.exit(main())
