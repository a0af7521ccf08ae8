"""The Docker API over SSH: the forward's command line, and a real forward through a real sshd
on loopback to this machine's engine, its errors, and its end when its owner ends."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import psutil
import pytest

from agentlink.deploy import rollout
from agentlink.deploy.docker_backend import DockerBackend, MachineSpec
from agentlink.deploy.docker_ssh import SSHForward, SSHForwardError, forward_argv

from .conftest import ROOT, eventually

TOPOLOGY = ROOT / "topology" / "agents.yml"


def test_the_forward_uses_the_url_s_user_port_and_socket_and_the_machine_s_options() -> None:
    argv = forward_argv("ssh://admin@10.0.0.5:2222/run/docker.sock", "/tmp/l.sock",
                        "-i /keys/id -o 'UserKnownHostsFile=/k nown'")
    assert argv[:2] == ["ssh", "-T"]
    assert argv[argv.index("-p") + 1] == "2222" and argv[argv.index("-l") + 1] == "admin"
    assert argv[argv.index("-i"):argv.index("-i") + 4] == \
        ["-i", "/keys/id", "-o", "UserKnownHostsFile=/k nown"]
    assert argv[argv.index("-L") + 1] == "/tmp/l.sock:/run/docker.sock"
    assert argv[-3:] == ["--", "10.0.0.5", "cat >/dev/null"]
    assert "BatchMode=yes" in argv and "ExitOnForwardFailure=yes" in argv


def test_a_url_without_a_socket_path_forwards_the_default_one() -> None:
    argv = forward_argv("ssh://10.0.0.5", "/tmp/l.sock")
    assert argv[argv.index("-L") + 1] == "/tmp/l.sock:/var/run/docker.sock"
    assert "-p" not in argv and "-l" not in argv


def test_only_ssh_urls_are_forwarded() -> None:
    with pytest.raises(ValueError, match="not an ssh://"):
        forward_argv("unix:///var/run/docker.sock", "/tmp/l.sock")


@dataclass
class Sshd:
    url: str
    ssh_args: str


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """A real sshd on loopback that lets this machine's root in with a key made here."""
    if shutil.which("/usr/sbin/sshd") is None or os.geteuid() != 0:
        pytest.skip("needs Debian's openssh-server and root (make unit installs it)")
    if not Path("/var/run/docker.sock").exists():
        pytest.skip("needs this machine's Docker engine (make unit starts it)")
    where = tmp_path_factory.mktemp("sshd")
    where.chmod(0o700)
    for name in ("client", "host"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                        str(where / name)], check=True)
    (where / "authorized_keys").write_text((where / "client.pub").read_text())
    port = free_port()
    (where / "sshd_config").write_text(textwrap.dedent(f"""\
        ListenAddress 127.0.0.1:{port}
        HostKey {where / 'host'}
        PidFile {where / 'sshd.pid'}
        AuthorizedKeysFile {where / 'authorized_keys'}
        PermitRootLogin prohibit-password
        PasswordAuthentication no
        UsePAM no
        # pytest's directories are under /tmp, which anyone may write to
        StrictModes no
        """))
    host_key = " ".join((where / "host.pub").read_text().split()[:2])
    (where / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key}\n")
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    daemon = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(where / "sshd_config")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    eventually(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, what="sshd")
    yield Sshd(f"ssh://root@127.0.0.1:{port}",
               f"-i {where / 'client'} -o UserKnownHostsFile={where / 'known_hosts'}")
    daemon.terminate()
    daemon.wait(10)


def test_the_engine_answers_through_the_forward_and_it_closes(sshd: Sshd) -> None:
    forward = SSHForward(sshd.url, sshd.ssh_args)
    client = docker.DockerClient(base_url=forward.open())
    try:
        assert client.version()["ApiVersion"] == docker.from_env().version()["ApiVersion"]
    finally:
        client.close()
        forward.close()
    assert not Path(forward.local).exists()


def test_the_backend_reaches_an_ssh_machine_through_its_options(sshd: Sshd) -> None:
    spec = MachineSpec(name="far", image="", config_dir="", address="127.0.0.1",
                       docker_host=sshd.url, ssh_args=sshd.ssh_args)
    with DockerBackend({"far": spec}) as backend:
        assert backend.client("far").ping()
        assert backend.client("far") is backend.client("far")  # one connection per engine


def test_a_forward_the_network_dropped_is_made_again(sshd: Sshd) -> None:
    spec = MachineSpec(name="far", image="", config_dir="", address="127.0.0.1",
                       docker_host=sshd.url, ssh_args=sshd.ssh_args)
    with DockerBackend({"far": spec}) as backend:
        assert backend.client("far").ping()
        for ssh in psutil.Process().children():  # what a LAN drop does to it: it ends
            if ssh.name() == "ssh":
                ssh.kill()
                ssh.wait(5)
        assert backend.client("far").ping()


def test_a_refused_key_names_the_machine_and_the_command_to_try(sshd: Sshd) -> None:
    known_hosts = sshd.ssh_args.split()[-1]  # the host is known; the key is not given
    forward = SSHForward(sshd.url, f"-o {known_hosts} -o IdentitiesOnly=yes -i /dev/null")
    with pytest.raises(SSHForwardError) as failure:
        forward.open()
    message = str(failure.value)
    assert sshd.url in message and "Permission denied" in message
    assert "docker version" in message and "ansible_ssh_" in message
    assert not Path(forward.local).parent.exists()  # its socket's directory is gone too


def test_a_module_s_deployment_closes_its_forwards_when_the_block_ends(sshd: Sshd) -> None:
    # Over Mitogen the module's interpreter lives on after the module: nothing may wait
    # for its exit. exit_json ends a module with SystemExit.
    far = {"image": "", "config_dir": "", "address": "127.0.0.1", "docker_host": sshd.url,
           "ssh_args": sshd.ssh_args}
    with pytest.raises(SystemExit), \
            rollout.open_deployment(str(TOPOLOGY), {"mainpc": far, "pc2": far},
                                    "agentlink") as (_, backend):
        assert backend.client("mainpc").ping()
        sockets = [f.local for f in backend._forwards.values()]
        assert sockets and all(Path(s).exists() for s in sockets)
        raise SystemExit(0)
    assert not any(Path(s).parent.exists() for s in sockets)
    assert not [c for c in psutil.Process().children() if c.name() == "ssh"]


def test_the_forward_ends_when_the_process_that_opened_it_is_killed(sshd: Sshd) -> None:
    owner = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""\
        import os, sys, time
        from agentlink.deploy.docker_ssh import SSHForward
        forward = SSHForward({sshd.url!r}, {sshd.ssh_args!r})
        forward.open()
        print(os.getpid(), forward.local, flush=True)
        time.sleep(600)
        """)], stdout=subprocess.PIPE, text=True)
    assert owner.stdout is not None
    pid_text, local = owner.stdout.readline().split()
    pid = int(pid_text)
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    assert children, "ssh was not started"
    os.kill(pid, signal.SIGKILL)
    owner.wait()
    deadline = time.monotonic() + 10
    while any(running(child) for child in children):
        assert time.monotonic() < deadline, "ssh outlived the process that started it"
        time.sleep(0.1)
    shutil.rmtree(Path(local).parent)  # a killed process cleans up nothing


def running(pid: str) -> bool:
    """Alive and not a zombie (whoever adopted it may not have reaped it yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
