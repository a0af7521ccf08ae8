#!/usr/bin/env python3
"""Hosts that behave like real machines, made on this one: the harness of molecule `dual`.

Every host of the harness inventory (molecule/dual/inventory/hosts.yml: mainpc, pc2 and
the witness) gets
  - a network namespace with its inventory address on a bridge that the three share with
    this machine (the controller), which takes the first address of the /24;
  - a mount namespace in which /var/lib/docker, /var/tmp, /tmp and /run (so the Docker
    socket) are its own, /etc is this machine's with the host's own changes over it (an
    overlay: /etc/agentlink made there is the host's, and can be removed), and the project
    and /root (the controller's) are hidden; and a hostname of its own;
  - its own dockerd and sshd, detached, logging to <root>/hosts/<host>/log/.
Ansible and the Docker SDK reach the hosts over real SSH, as root, with a key made here.

    dual_hosts.py up          (re)create every host; on a failure, remove what it made
    dual_hosts.py down        remove everything: daemons by pid, namespaces, links, files
    dual_hosts.py status      each host's address and daemons
    dual_hosts.py cut HOST    pull the host's cable (its bridge port down); heal HOST again
    dual_hosts.py slow HOST   5% loss (and 50 ms delay, with netem) on what it sends; fast HOST
    dual_hosts.py inside HOST -- COMMAND...   run COMMAND in the host's network

Root only. <root> is where the inventory's SSH key lives, two levels up
(/var/lib/agentlink-dual).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
INVENTORY = ROOT / "molecule" / "dual" / "inventory" / "hosts.yml"
BRIDGE = "agl-dual0"
# Paths a real machine has of its own; each is bind-mounted from <root>/hosts/<host>/.
OWN_DIRS = ("/var/lib/docker", "/var/tmp")
# Mounts of this machine that a host must not hold on to (they would pin this machine's
# containers, and /run holds this machine's Docker socket).
HIDDEN_MOUNTS = ("/run", "/var/lib/docker")
# What only the controller has: the project and its venv, root's home (the controller's
# secrets, pyenv). Hidden on the hosts, so a task that runs on the controller by mistake, or a
# host that would need the controller's files, fails here as it would on a real machine.
CONTROLLER_ONLY = (str(ROOT), "/root")
TOOLS = ("ip", "unshare", "nsenter", "findmnt", "iptables", "tc", "dockerd", "docker",
         "/usr/sbin/sshd", "ssh", "ssh-keygen")
DEADLINE_S = 60.0
# A slow LAN: 5% of packets lost (iptables, in any kernel) and 50 ms more on each (netem,
# in kernels that have it; some, as this kind of machine's, do not).
SLOW_LOSS = ("-m", "statistic", "--mode", "random", "--probability", "0.05")
SLOW_DELAY = ("netem", "delay", "50ms")


class HarnessError(Exception):
    pass


@dataclass(frozen=True)
class Host:
    name: str
    address: str
    root: Path  # the harness's state directory

    @property
    def netns(self) -> str:
        return f"agl-{self.name}"

    @property
    def veth(self) -> str:  # this machine's end of the host's cable, on the bridge
        return f"agl-{self.name}-h"

    @property
    def home(self) -> Path:
        return self.root / "hosts" / self.name

    def ns_file(self, kind: str) -> Path:
        return self.root / "ns" / f"{self.name}.{kind}"

    @property
    def cgroup(self) -> str:
        return f"agentlink-dual-{self.name}"

    def pid_file(self, daemon: str) -> Path:
        return self.home / f"{daemon}.pid"

    def nsenter(self, *argv: str) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.netns}", f"--mount={self.ns_file('mnt')}",
                f"--uts={self.ns_file('uts')}", *argv]


@dataclass(frozen=True)
class Plan:
    root: Path
    key: Path
    known_hosts: Path
    hosts: list[Host]

    @property
    def controller(self) -> str:
        """This machine's address on the bridge: the first of the hosts' /24."""
        network = ipaddress.ip_network(f"{self.hosts[0].address}/24", strict=False)
        return f"{next(network.hosts())}/24"


def read_plan(inventory: Path = INVENTORY) -> Plan:
    doc = yaml.safe_load(inventory.read_text())
    key = Path(doc["all"]["vars"]["ansible_ssh_private_key_file"])
    root = key.parent.parent
    hosts: list[Host] = []

    def walk(group: dict) -> None:
        for name, host_vars in (group.get("hosts") or {}).items():
            if host_vars and "ansible_host" in host_vars:
                hosts.append(Host(name, str(host_vars["ansible_host"]), root))
        for child in (group.get("children") or {}).values():
            walk(child or {})

    walk(doc["all"])
    return Plan(root, key, key.parent / "known_hosts", hosts)


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise HarnessError(f"{' '.join(argv)} failed: {result.stderr.strip()}")
    return result


def say(message: str) -> None:
    print(f"dual-hosts: {message}", flush=True)


# --- up ---------------------------------------------------------------------------------

def up(plan: Plan) -> None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        raise HarnessError(f"missing {', '.join(missing)}: install Debian's iproute2, "
                           "util-linux, iptables, docker.io and openssh-server (make does)")
    down(plan, quiet=True)
    (plan.root / "ns").mkdir(parents=True)
    plan.key.parent.mkdir(mode=0o700)
    run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "agentlink-dual-operator",
        "-f", str(plan.key))
    # A namespace can be kept in a file only below a private mount.
    run("mount", "--bind", str(plan.root / "ns"), str(plan.root / "ns"))
    run("mount", "--make-private", str(plan.root / "ns"))
    make_bridge(plan)
    for host in plan.hosts:
        make_host(plan, host)
    known = [f"{h.address} {read_pub(h.home / 'ssh_host_ed25519_key.pub')}" for h in plan.hosts]
    plan.known_hosts.write_text("\n".join(known) + "\n")
    for host in plan.hosts:
        wait_for_host(plan, host)
    say(f"{len(plan.hosts)} hosts up: " + ", ".join(f"{h.name} {h.address}" for h in plan.hosts))


def make_bridge(plan: Plan) -> None:
    run("ip", "link", "add", BRIDGE, "type", "bridge")
    run("ip", "addr", "add", plan.controller, "dev", BRIDGE)
    run("ip", "link", "set", BRIDGE, "up")
    # This machine's Docker drops forwarded bridge traffic (FORWARD policy DROP with
    # br_netfilter): let the hosts talk to each other.
    run("iptables", "-I", "FORWARD", "1", "-i", BRIDGE, "-o", BRIDGE, "-j", "ACCEPT")


def make_host(plan: Plan, host: Host) -> None:
    say(f"making {host.name} at {host.address}")
    for sub in ("log", "etc-upper", "etc-work", *(own_dir(d) for d in OWN_DIRS)):
        (host.home / sub).mkdir(parents=True, exist_ok=True)
    make_network(plan, host)
    make_namespaces(host)
    make_sshd(plan, host)
    start(host, "dockerd", "dockerd", "--data-root", "/var/lib/docker",
          "--exec-root", "/run/docker", "--pidfile", "/run/docker.pid",
          "-H", "unix:///var/run/docker.sock", "--cgroup-parent", f"/{host.cgroup}",
          "--shutdown-timeout", "5")
    start(host, "sshd", "/usr/sbin/sshd", "-D", "-e", "-f", str(host.home / "sshd_config"))


def own_dir(path: str) -> str:
    return path.strip("/").replace("/", "-")


def make_network(plan: Plan, host: Host) -> None:
    gateway = plan.controller.split("/")[0]
    run("ip", "netns", "add", host.netns)
    run("ip", "link", "add", host.veth, "type", "veth", "peer", "name", "eth0",
        "netns", host.netns)
    run("ip", "link", "set", host.veth, "master", BRIDGE, "up")
    for argv in (("addr", "add", f"{host.address}/24", "dev", "eth0"),
                 ("link", "set", "eth0", "up"), ("link", "set", "lo", "up"),
                 ("route", "add", "default", "via", gateway)):
        run("ip", "-n", host.netns, *argv)


def make_namespaces(host: Host) -> None:
    """A mount namespace (kept in a file) with the host's own directories, and a UTS one."""
    for kind in ("mnt", "uts"):
        host.ns_file(kind).touch()
    hidden = "|".join(HIDDEN_MOUNTS)
    binds = "\n".join(f"mount --bind {host.home / own_dir(d)} {d}" for d in OWN_DIRS)
    # A project under /tmp is gone already with the host's own /tmp.
    hides = "\n".join(f"if [ -d {d} ]; then mount -t tmpfs -o mode=0700 tmpfs {d}; fi"
                       for d in CONTROLLER_ONLY)
    etc = f"lowerdir=/etc,upperdir={host.home / 'etc-upper'},workdir={host.home / 'etc-work'}"
    script = f"""set -e
findmnt -rn -o TARGET | grep -E '^({hidden})(/|$)' | sort -r | xargs -r -n1 umount -l
umount -l {host.root / 'ns'}
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/sshd /run/docker
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t overlay overlay -o {etc} /etc
{binds}
{hides}
hostname {host.name}
"""
    run("unshare", f"--mount={host.ns_file('mnt')}", f"--uts={host.ns_file('uts')}",
        "--propagation", "private", "sh", "-c", script)


def make_sshd(plan: Plan, host: Host) -> None:
    key = host.home / "ssh_host_ed25519_key"
    run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", host.name, "-f", str(key))
    authorized = host.home / "authorized_keys"
    authorized.write_text(Path(f"{plan.key}.pub").read_text())
    authorized.chmod(0o600)
    (host.home / "sshd_config").write_text(f"""\
ListenAddress {host.address}
HostKey {key}
PidFile /run/sshd.pid
AuthorizedKeysFile {authorized}
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
AllowStreamLocalForwarding yes
MaxSessions 64
MaxStartups 64:30:128
Subsystem sftp internal-sftp
""")


def start(host: Host, daemon: str, *argv: str) -> None:
    """Start a daemon inside the host, detached, its output in the host's log directory."""
    log = (host.home / "log" / f"{daemon}.log").open("ab")
    process = subprocess.Popen(host.nsenter(*argv), stdin=subprocess.DEVNULL, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    host.pid_file(daemon).write_text(f"{process.pid}\n")  # nsenter execs: the daemon's pid


def read_pub(path: Path) -> str:
    return " ".join(path.read_text().split()[:2])


def wait_for_host(plan: Plan, host: Host) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while True:
        problem = host_problem(plan, host)
        if problem is None:
            return
        if time.monotonic() > deadline:
            raise HarnessError(f"{host.name} did not come up within {DEADLINE_S:g}s: "
                               f"{problem} (logs in {host.home / 'log'})")
        time.sleep(0.5)


def host_problem(plan: Plan, host: Host) -> str | None:
    """Why the host is not usable yet (a daemon gone, Docker or SSH not answering)."""
    for daemon in ("dockerd", "sshd"):
        if not alive(host, daemon):
            return f"its {daemon} exited"
    docker = host.nsenter("docker", "version", "--format", "{{.Server.Version}}")
    if subprocess.run(docker, capture_output=True, check=False).returncode != 0:
        return "its Docker engine does not answer"
    if ssh(plan, host, "true").returncode != 0:
        return f"SSH to root@{host.address} fails"
    return None


def ssh(plan: Plan, host: Host, command: str) -> subprocess.CompletedProcess[str]:
    return run("ssh", "-i", str(plan.key), "-o", f"UserKnownHostsFile={plan.known_hosts}",
               "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", f"root@{host.address}",
               command, check=False)


def alive(host: Host, daemon: str) -> bool:
    pid = read_pid(host, daemon)
    return pid is not None and Path(f"/proc/{pid}").exists()


def read_pid(host: Host, daemon: str) -> int | None:
    try:
        return int(host.pid_file(daemon).read_text())
    except (OSError, ValueError):
        return None


# --- down -------------------------------------------------------------------------------

def down(plan: Plan, quiet: bool = False) -> None:
    """Remove whatever `up` made, also after a failed or partial `up`; each step tolerates
    what is already gone."""
    for host in plan.hosts:
        remove_host(host)
    delete_link(BRIDGE)
    while run("iptables", "-D", "FORWARD", "-i", BRIDGE, "-o", BRIDGE, "-j", "ACCEPT",
              check=False).returncode == 0:
        pass
    if mounted(plan.root / "ns"):
        run("umount", str(plan.root / "ns"))
    if plan.root.exists():
        shutil.rmtree(plan.root)
    if not quiet:
        say("every host removed")


def remove_host(host: Host) -> None:
    # dockerd stops its containers and containerd when it is asked to stop.
    stop(read_pid(host, "dockerd"), 30.0)
    stop(read_pid(host, "sshd"), 5.0)
    for pid in stragglers(host):
        stop(pid, 0.0)
    for kind in ("mnt", "uts"):
        if mounted(host.ns_file(kind)):
            run("umount", str(host.ns_file(kind)))
    if Path(f"/run/netns/{host.netns}").exists():
        run("ip", "netns", "del", host.netns)
    # The namespace goes away in the background, its end of the cable with it: remove the
    # cable now, so that a new host of the same name can have one.
    delete_link(host.veth)
    for controller in Path("/sys/fs/cgroup").glob(f"*/{host.cgroup}"):
        if controller.exists():  # cpu and cpuacct may be one hierarchy under two names
            remove_cgroup(controller)


def delete_link(name: str) -> None:
    """Delete a network link, or find it gone: a veth whose namespace was just deleted can
    vanish between a look and a delete (CI once failed `down` on exactly that)."""
    deleted = run("ip", "link", "del", name, check=False)
    if deleted.returncode != 0 and run("ip", "link", "show", name, check=False).returncode == 0:
        raise HarnessError(f"ip link del {name} failed: {deleted.stderr.strip()}")


def mounted(path: Path) -> bool:
    """Whether path is a mount point (also a file with a namespace bound to it, which
    Path.is_mount does not see)."""
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return str(path) in (line.split()[4] for line in lines)


def stragglers(host: Host) -> set[int]:
    """Processes still in the host's network namespace or cgroups (containers' shims)."""
    pids: set[int] = set()
    if Path(f"/run/netns/{host.netns}").exists():
        pids |= {int(p) for p in run("ip", "netns", "pids", host.netns, check=False)
                 .stdout.split()}
    for tasks in Path("/sys/fs/cgroup").glob(f"*/{host.cgroup}/**/tasks"):
        pids |= {int(p) for p in tasks.read_text().split()}
    return pids


def stop(pid: int | None, grace: float) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds."""
    if pid is None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not Path(f"/proc/{pid}").exists() or is_zombie(pid):
                return
            time.sleep(0.1)


def is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def remove_cgroup(path: Path) -> None:
    for child in sorted((p for p in path.rglob("*") if p.is_dir()), reverse=True):
        child.rmdir()
    path.rmdir()


# --- faults -----------------------------------------------------------------------------

def cut(host: Host) -> None:
    """Pull the host's cable: its port on the bridge goes down, packets are dropped, TCP
    connections hang as over a real partition (no reset)."""
    run("ip", "link", "set", host.veth, "down")


def heal(host: Host) -> None:
    run("ip", "link", "set", host.veth, "up")


def slow(host: Host) -> None:
    """Loss, and delay where the kernel has netem, on what the host sends onto the LAN
    (slow every host for a slow LAN)."""
    in_host = ("ip", "netns", "exec", host.netns)
    run(*in_host, "iptables", "-I", "OUTPUT", "-o", "eth0", *SLOW_LOSS, "-j", "DROP")
    run(*in_host, "tc", "qdisc", "replace", "dev", "eth0", "root", *SLOW_DELAY, check=False)


def fast(host: Host) -> None:
    in_host = ("ip", "netns", "exec", host.netns)
    run(*in_host, "iptables", "-D", "OUTPUT", "-o", "eth0", *SLOW_LOSS, "-j", "DROP",
        check=False)
    run(*in_host, "tc", "qdisc", "del", "dev", "eth0", "root", check=False)


def inside(host: Host, argv: list[str]) -> int:
    """Run a command of this machine in the host's network only (its files stay this
    machine's): a client on the host's side of a partition."""
    return subprocess.run(["nsenter", f"--net=/run/netns/{host.netns}", *argv],
                          check=False).returncode


def status(plan: Plan) -> int:
    bad = 0
    for host in plan.hosts:
        problem = host_problem(plan, host) if plan.root.exists() else "not made"
        bad += problem is not None
        print(f"{host.name:8} {host.address:15} {problem or 'up (dockerd, sshd, SSH)'}")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["up", "down", "status", "cut", "heal", "slow",
                                           "fast", "inside"])
    parser.add_argument("host", nargs="?")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="for inside: -- COMMAND...")
    parser.add_argument("--inventory", type=Path, default=INVENTORY)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("dual-hosts: namespaces need root: run it as root", file=sys.stderr)
        return 2
    plan = read_plan(args.inventory)
    try:
        if args.action in ("cut", "heal", "slow", "fast", "inside"):
            host = next((h for h in plan.hosts if h.name == args.host), None)
            if host is None:
                parser.error(f"name a host: {', '.join(h.name for h in plan.hosts)}")
            if args.action == "inside":
                command = args.command[1:] if args.command[:1] == ["--"] else args.command
                return inside(host, command or ["true"])
            {"cut": cut, "heal": heal, "slow": slow, "fast": fast}[args.action](host)
            return 0
        if args.action == "status":
            return status(plan)
        if args.action == "down":
            down(plan)
            return 0
        try:
            up(plan)
        except BaseException:
            say("up failed: removing what it made")
            down(plan, quiet=True)
            raise
    except HarnessError as err:
        print(f"dual-hosts: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
