"""Secrets at run time: CURVE keys between agent hosts, and passwords read from files.

Every agent host (one per group) has a CURVE keypair; so does the operator, whose commands
and tests call agents from the controller. Keys are ZeroMQ certificate files as pyzmq's
`zmq.auth` writes them: `<name>.key` (public) and `<name>.key_secret` (both halves). A server
accepts a client only if the client's public key is among the known ones; a client knows a
server by the group it serves. Secrets reach a container as read-only files mounted under
CONTAINER_SECRETS, never as environment variables or image layers.
"""

from __future__ import annotations

import io
import os
import secrets
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

CONTAINER_SECRETS = "/run/agentlink"
OPERATOR = "operator"  # the controller's identity: the CLI, tests and benchmarks
AGENTS_USER = "agents"  # Redis ACL user of agent hosts and the operator (roles/redis)

# Every password of a deployment, one file each in the controller's secrets directory. Redis
# users by role (roles/redis): admin (the role's own commands), agents, monitoring (the
# exporter), sentinel (Sentinels watching Redis), replication (replicas syncing); Sentinel's
# own password; Grafana's admin.
PASSWORDS = ("redis-admin", f"redis-{AGENTS_USER}", "redis-monitoring", "redis-sentinel",
             "redis-replication", "sentinel", "grafana-admin")

# What an agent host's startup config says, and where its container finds each file.
CONTAINER_REDIS_AUTH = {"username": AGENTS_USER,
                        "password_file": f"{CONTAINER_SECRETS}/redis.password",
                        "sentinel_password_file": f"{CONTAINER_SECRETS}/sentinel.password"}
CONTAINER_CURVE = {"secret_file": f"{CONTAINER_SECRETS}/keys/host.key_secret",
                   "public_dir": f"{CONTAINER_SECRETS}/keys/public"}


class SecretError(Exception):
    """A secret the configuration names is missing or unreadable."""


@dataclass(frozen=True)
class CurveKeys:
    """This process's keypair and every known host's public key, by name."""

    public: bytes
    secret: bytes
    known: dict[str, bytes]
    known_dir: str

    @classmethod
    def load(cls, secret_file: str, public_dir: str) -> CurveKeys:
        try:
            public, secret = zmq.auth.load_certificate(secret_file)
            known = {path.name.removesuffix(".key"): zmq.auth.load_certificate(path)[0]
                     for path in sorted(Path(public_dir).glob("*.key"))}
        except (OSError, ValueError) as err:
            raise SecretError(f"CURVE keys: {err}") from err
        if secret is None:
            raise SecretError(f"{secret_file} holds no secret key")
        return cls(public, secret, known, public_dir)

    @classmethod
    def from_settings(cls, settings: dict[str, str] | None) -> CurveKeys | None:
        """`{"secret_file", "public_dir"}` from a startup config; None: CURVE is off."""
        if not settings:
            return None
        return cls.load(settings["secret_file"], settings["public_dir"])

    def server_key(self, name: str) -> bytes:
        try:
            return self.known[name]
        except KeyError:
            raise SecretError(f"no public key for {name!r} in {self.known_dir}") from None

    def make_client(self, sock: zmq.Socket[bytes], server: str) -> None:
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = self.server_key(server)

    def make_server(self, sock: zmq.Socket[bytes]) -> None:
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True

    def authenticator(self, context: zmq.Context[zmq.Socket[bytes]]) -> ThreadAuthenticator:
        """The ZAP handler that admits only clients with a known public key."""
        auth = ThreadAuthenticator(context)
        auth.start()
        auth.configure_curve(domain="*", location=self.known_dir)
        return auth


def create_secrets(directory: str, key_names: list[str]) -> list[str]:
    """Create what is missing in a secrets directory (0700): every password (0600) and a
    CURVE keypair per name. Returns what it created; an existing secret is never replaced,
    so a second run creates nothing."""
    Path(directory).mkdir(parents=True, exist_ok=True, mode=0o700)
    Path(directory).chmod(0o700)
    created = [name for name in PASSWORDS if _create_password(Path(directory, name))]
    return created + _create_keys(directory, key_names)


def _create_password(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_urlsafe(24) + "\n")  # 32 characters, no shell specials
    return True


def _create_keys(directory: str, names: list[str]) -> list[str]:
    """Public keys in `public/`, secret ones in `private/` (0600)."""
    public, private = Path(directory, "public"), Path(directory, "private")
    for folder in (public, private):
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    created = []
    for name in names:
        if (private / f"{name}.key_secret").exists():
            continue
        public_file, secret_file = zmq.auth.create_certificates(str(private), name)
        Path(secret_file).chmod(0o600)
        Path(public_file).replace(public / f"{name}.key")
        created.append(f"{name}.key")
    return created


def machine_bundle(directory: str, groups: Iterable[str], passwords: Iterable[str]) -> bytes:
    """What one machine gets of a secrets directory, as one tar rooted at the machine's
    secrets directory: every public key, the secret keys of its own agent hosts (`groups`)
    and `passwords`. Files are 0444 (only root reaches the 0700 directory above them).

    One archive means one task per machine instead of one per file; the same secrets give
    the same bytes (owner root, mtime 0, sorted), so nothing is rewritten without drift."""
    base = Path(directory)
    members: list[tuple[str, int, Path | None]] = [("public", 0o755, None)]
    members += [(f"public/{key.name}", 0o444, key) for key in sorted(base.glob("public/*.key"))]
    members.append(("private", 0o700, None))
    members += [(f"private/{group}.key_secret", 0o444, base / "private" / f"{group}.key_secret")
                for group in sorted(groups)]
    members += [(name, 0o444, base / name) for name in sorted(passwords)]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, mode, source in members:
            info = tarfile.TarInfo(name)
            info.mode, info.uname, info.gname = mode, "root", "root"
            if source is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
                continue
            data = source.read_bytes()
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def write_machine_bundles(directory: str, machine_groups: dict[str, list[str]],
                          passwords: Iterable[str]) -> list[str]:
    """`<directory>/machines/<machine>.tar` (0600) for each machine; returns the machines
    whose bundle was new or different."""
    folder = Path(directory, "machines")
    folder.mkdir(exist_ok=True, mode=0o700)
    written = []
    for machine, groups in sorted(machine_groups.items()):
        bundle, path = machine_bundle(directory, groups, passwords), folder / f"{machine}.tar"
        if path.exists() and path.read_bytes() == bundle:
            continue
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(bundle)
        written.append(machine)
    return written


def read_secret(path: str) -> str:
    """A password kept in a file (one line); the error names the file, never its content."""
    try:
        return Path(path).read_text().strip()
    except OSError as err:
        raise SecretError(f"cannot read the secret in {path}: {err.strerror}") from err


def container_mounts(secret_dir: str, group: str) -> dict[str, str]:
    """Machine path -> container path of the secrets one agent host gets: its own secret
    key (no other group's), every public key, and the agents' Redis and Sentinel passwords.
    The layout of `secret_dir` is what roles/secrets writes on each machine."""
    return {f"{secret_dir}/private/{group}.key_secret": CONTAINER_CURVE["secret_file"],
            f"{secret_dir}/public": CONTAINER_CURVE["public_dir"],
            f"{secret_dir}/redis-{AGENTS_USER}": CONTAINER_REDIS_AUTH["password_file"],
            f"{secret_dir}/sentinel": CONTAINER_REDIS_AUTH["sentinel_password_file"]}


def secret_mount(item: dict[str, str], secret_dir: str, mount: str) -> dict[str, Any]:
    """A Docker bind mount, read-only, of one file of a machine's secrets directory:
    `{"key": file, "value": name under mount}` (an Ansible dict2items entry)."""
    return {"type": "bind", "source": f"{secret_dir}/{item['key']}",
            "target": f"{mount}/{item['value']}", "read_only": True}


def operator_secrets_dir() -> Path:
    """Where the controller keeps an inventory's secrets (roles/secrets): AGENTLINK_SECRETS,
    else the lab's."""
    default = Path.home() / ".agentlink" / "secrets" / "lab"
    return Path(os.environ.get("AGENTLINK_SECRETS") or default)


def operator_settings(settings: dict[str, Any], secrets_dir: Path | None = None
                      ) -> dict[str, Any]:
    """Redis settings with the operator's credentials, when the secrets exist (a deployed
    inventory); unchanged otherwise (a local run, whose Redis has no users)."""
    where = secrets_dir or operator_secrets_dir()
    if not (where / f"redis-{AGENTS_USER}").exists():
        return settings
    return {**settings, "username": AGENTS_USER,
            "password_file": str(where / f"redis-{AGENTS_USER}"),
            "sentinel_password_file": str(where / "sentinel")}


def operator_redis_auth(sentinel: bool = False, secrets_dir: Path | None = None
                        ) -> dict[str, str]:
    """redis.Redis keyword arguments of the operator: the agents' user on a Redis, the
    Sentinel password on a Sentinel; none when nothing was deployed with secrets."""
    settings = operator_settings({}, secrets_dir)
    if not settings:
        return {}
    if sentinel:
        return {"password": read_secret(settings["sentinel_password_file"])}
    return {"username": settings["username"], "password": read_secret(settings["password_file"])}


def operator_keys(secrets_dir: Path | None = None) -> CurveKeys | None:
    where = secrets_dir or operator_secrets_dir()
    secret = where / "private" / f"{OPERATOR}.key_secret"
    return CurveKeys.load(str(secret), str(where / "public")) if secret.exists() else None
