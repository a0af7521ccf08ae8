"""A machine's Docker API over SSH: its socket forwarded to a local one by one `ssh -L`.

The controller reaches a real machine's engine the way Ansible reaches the machine: the
same user, port, key and options (`ansible_ssh_private_key_file`, `ansible_ssh_common_args`,
...), which the inventory hands over as `ssh_args`. The Docker SDK then talks to a local
socket, so it needs neither paramiko nor the SSH options it cannot take, and every request
rides one SSH connection instead of a new `ssh` per connection of its pool.
"""

from __future__ import annotations

import shlex
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

REMOTE_SOCKET = "/var/run/docker.sock"
# Runs on the machine while the forward is up and ends when its stdin does: this process
# holds that stdin, so ssh ends with it, however it ends (even killed, from any thread).
_HOLD = "cat >/dev/null"
# ssh's own guards: no prompt, fail when the forward cannot be made, notice a dead peer.
_SSH_OPTIONS = ("BatchMode=yes", "ExitOnForwardFailure=yes", "StreamLocalBindUnlink=yes",
                "ServerAliveInterval=5", "ServerAliveCountMax=3", "ConnectTimeout=10")


class SSHForwardError(OSError):
    pass


def forward_argv(url: str, local: str, ssh_args: Sequence[str] | str = ()) -> list[str]:
    """The ssh command line that forwards the engine of `url` (ssh://[user@]host[:port]
    [/path/of/docker.sock]) to the local socket path `local`."""
    parts = urlsplit(url)
    if parts.scheme != "ssh" or not parts.hostname:
        raise ValueError(f"not an ssh:// Docker host: {url!r}")
    extra = shlex.split(ssh_args) if isinstance(ssh_args, str) else list(ssh_args)
    argv = ["ssh", "-T"]
    for option in _SSH_OPTIONS:
        argv += ["-o", option]
    if parts.port:
        argv += ["-p", str(parts.port)]
    if parts.username:
        argv += ["-l", parts.username]
    remote = parts.path if parts.path not in ("", "/") else REMOTE_SOCKET
    return [*argv, *extra, "-L", f"{local}:{remote}", "--", parts.hostname, _HOLD]


class SSHForward:
    """One `ssh -L` from a local socket to a machine's Docker socket, for this process's
    lifetime at most."""

    def __init__(self, url: str, ssh_args: Sequence[str] | str = (), timeout: float = 20.0
                 ) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="agentlink-ssh-")
        self.local = str(Path(self._dir.name) / "docker.sock")
        self._stderr = Path(self._dir.name) / "ssh.err"
        self.url = url
        self._argv = forward_argv(url, self.local, ssh_args)
        self._timeout = timeout
        self._process: subprocess.Popen[bytes] | None = None

    def probe_argv(self) -> list[str]:
        """The same connection, running `docker version` instead of forwarding."""
        at = self._argv.index("-L")
        return [*self._argv[:at], *self._argv[at + 2:-1], "docker version"]

    @property
    def base_url(self) -> str:
        return f"unix://{self.local}"

    def open(self) -> str:
        """Start ssh and wait until the local socket accepts; the Docker base URL."""
        with self._stderr.open("wb") as stderr:
            self._process = subprocess.Popen(self._argv, stdin=subprocess.PIPE,
                                             stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + self._timeout
        while not self._accepts():
            if self._process.poll() is not None:
                said = self._stderr.read_text(errors="replace").strip().rstrip(".")
                said = said or f"exit {self._process.returncode}"
                self.close()
                raise SSHForwardError(
                    f"ssh to {self.url} for its Docker socket failed: {said}. Check that "
                    f"`{shlex.join(self.probe_argv())}` works from this controller: it "
                    "uses the machine's ansible_ssh_* settings from the inventory")
            if time.monotonic() > deadline:
                self.close()
                raise SSHForwardError(f"ssh to {self.url} did not connect within "
                                      f"{self._timeout:g}s")
            time.sleep(0.05)
        return self.base_url

    def alive(self) -> bool:
        """ssh still runs: it ends when the machine stops answering (ServerAlive) or the
        connection drops."""
        return self._process is not None and self._process.poll() is None

    def _accepts(self) -> bool:
        if not Path(self.local).exists():
            return False
        with socket.socket(socket.AF_UNIX) as probe:
            return probe.connect_ex(self.local) == 0

    def close(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            if process.stdin:
                process.stdin.close()  # the remote hold ends; ssh follows
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._dir.cleanup()
