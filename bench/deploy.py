"""Deployment benchmarks, measured in one run on this machine.

1. Image sizes: base, runtime, each machine image, Redis; and the bytes stored for all of
   them together (shared layers count once), from Docker's own accounting.
2. `ansible-playbook site.yml -i inventory/lab` from no containers: cold (no images, so
   debootstrap and builds included; only with --cold) and with images cached.
3. The same playbook again with nothing changed (must report changed=0).
With --dual, the same on the dual harness's hosts (scripts/dual_hosts.py: two machines and
the witness, over SSH, each with its own engine), whose three deploys are: new machines (the
images shipped to them), the images already there (after playbooks/down.yml), no change.
Each deploy also reports the launcher's own time, first container start to all healthy.

Run: `make bench-deploy` (or `.venv/bin/python bench/deploy.py [--cold | --dual]
[--json FILE]`). It leaves the lab (or the dual hosts) deployed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import docker

ROOT = Path(__file__).resolve().parent.parent
PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"
LAB = "inventory/lab"
DUAL = "molecule/dual/inventory"
MB = 1_000_000


def playbook(name: str, *extra_vars: str, inventory: str = LAB) -> dict[str, Any]:
    """Run a playbook with the JSON callback; wall time, changes, launch result.
    `extra_vars` are `key=value` settings, each passed with -e."""
    env = {**os.environ, "ANSIBLE_STDOUT_CALLBACK": "ansible.posix.json",
           "ANSIBLE_LOAD_CALLBACK_PLUGINS": "1"}
    started = time.monotonic()
    settings = [arg for var in extra_vars for arg in ("-e", var)]
    proc = subprocess.run([str(PLAYBOOK), "-i", inventory, name, *settings], cwd=ROOT,
                          env=env, capture_output=True, text=True, check=False)
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}"
                         f"\n{proc.stderr[-2000:]}")
    report = json.loads(proc.stdout)
    launch = next((task["hosts"]["localhost"] for play in report["plays"]
                   for task in play["tasks"]
                   if "Start the agent hosts" in task["task"]["name"]
                   and "localhost" in task["hosts"]), {})
    changed = sum(stats["changed"] for stats in report["stats"].values())
    return {"seconds": seconds, "changed": changed, "launch_seconds": launch.get("seconds"),
            "layers": [(layer["layer"], layer["seconds"]) for layer in launch.get("layers", [])]}


def image_sizes(machines: Iterable[str] = ()) -> dict[str, Any]:
    """Each image's size and all of them stored together; with `machines`, also what those
    machines' images and the images they are built on take together."""
    with (ROOT / "build" / "images.json").open() as manifest:
        built = json.load(manifest)
    refs: dict[str, str] = built["images"]
    client = docker.from_env()
    sizes = {name: client.images.get(ref).attrs["Size"] / MB for name, ref in refs.items()}
    result = {"images_mb": sizes, "stored_mb": stored_mb(client, refs.values())}
    lineage = set()
    for name in machines:
        while name:
            lineage.add(name)
            name = built["details"][name]["parent"]
    if lineage:
        result["agent_images_stored_mb"] = stored_mb(client, [refs[n] for n in lineage])
    return result


def stored_mb(client: docker.DockerClient, refs: Iterable[str]) -> float:
    """Bytes these images take together, shared layers once, from Docker's own accounting."""
    ids = {client.images.get(ref).id for ref in refs}
    entries = [i for i in client.df()["Images"] if i["Id"] in ids]
    shared = max((i["SharedSize"] for i in entries), default=0)
    return (sum(i["Size"] - i["SharedSize"] for i in entries) + shared) / MB


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cold", action="store_true",
                        help="also remove the project's images first and time a cold build")
    parser.add_argument("--dual", action="store_true",
                        help="deploy to the dual harness's hosts instead (made anew)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    runs = dual() if args.dual else lab(args.cold)
    sizes = image_sizes()
    report(runs, sizes, DUAL if args.dual else LAB)
    if args.json:
        args.json.write_text(json.dumps({"deploys": runs, **sizes}, indent=2))
    return 0


def dual() -> dict[str, dict[str, Any]]:
    """New hosts, then the three deploys; the images are built (or cached) on this machine."""
    print("making the dual hosts anew ...", flush=True)
    subprocess.run([sys.executable, str(ROOT / "scripts" / "dual_hosts.py"), "up"], check=True)
    runs = {}
    print("deploying to new machines (images shipped) ...", flush=True)
    runs["new machines: images shipped"] = playbook("site.yml", inventory=DUAL)
    playbook("playbooks/down.yml", inventory=DUAL)
    print("deploying with the images on the machines ...", flush=True)
    runs["images on the machines"] = playbook("site.yml", inventory=DUAL)
    print("deploying again, nothing changed ...", flush=True)
    runs["second run, no change"] = playbook("site.yml", inventory=DUAL)
    return runs


def lab(cold: bool) -> dict[str, dict[str, Any]]:
    runs: dict[str, dict[str, Any]] = {}
    print("removing the lab ...", flush=True)
    playbook("playbooks/down.yml")
    if cold:
        client = docker.from_env()
        for image in client.images.list(name="agentlink/*"):
            for tag in image.tags:  # untag; the layers go with the prune below
                client.images.remove(tag)
        client.images.prune(filters={"dangling": False, "label": "io.agentlink.stage=builder"})
        client.images.prune(filters={"dangling": True})
        print("deploying cold (debootstrap, builds) ...", flush=True)
        runs["cold, images built"] = playbook("site.yml")
        playbook("playbooks/down.yml")
    print("deploying with images cached ...", flush=True)
    runs["images cached"] = playbook("site.yml")
    print("deploying again, nothing changed ...", flush=True)
    runs["second run, no change"] = playbook("site.yml")
    return runs


def report(runs: dict[str, dict[str, Any]], sizes: dict[str, Any], inventory: str) -> None:
    print("\n| image | MB |\n|---|---:|")
    for name, mb in sizes["images_mb"].items():
        print(f"| {name} | {mb:.1f} |")
    print(f"| all images, shared layers stored once | {sizes['stored_mb']:.1f} |")
    print(f"\n| site.yml -i {inventory} | wall s | launch to all healthy s | changed |")
    print("|---|---:|---:|---:|")
    for name, run in runs.items():
        launch = f"{run['launch_seconds']:.2f}" if run["launch_seconds"] is not None else "-"
        print(f"| {name} | {run['seconds']:.1f} | {launch} | {run['changed']} |")
    first = next(iter(runs.values()))["layers"]
    print(f"\nper layer ({next(iter(runs))}): "
          + ", ".join(f"layer {n}: {s:.2f}s" for n, s in first))


if __name__ == "__main__":
    raise SystemExit(main())
