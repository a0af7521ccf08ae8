"""Fixtures: one real redis-server for the session, flushed before every test."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from agentlink.devtools.redis_server import RedisServer
from agentlink.runtime.registry import Registry, redis_client

ROOT = Path(__file__).resolve().parents[2]


def eventually(predicate: Callable[[], object], timeout: float = 10.0,
               what: str = "condition") -> None:
    """Poll until predicate() is true; fail naming what never happened."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:g}s")
        time.sleep(0.02)


class Traffic:
    """Calls `call()` in a loop on a thread; keeps every answer and every failure."""

    def __init__(self, call: Callable[[], str]) -> None:
        self.call = call
        self.answers: list[str] = []
        self.failures: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.answers.append(self.call())
            except BaseException as err:
                self.failures.append(err)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def more_than(self, extra: int) -> None:
        """Wait until `extra` more requests have been answered from now."""
        seen = len(self.answers)
        eventually(lambda: len(self.answers) > seen + extra, what=f"{extra} more answers")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    if redis_server.process is None:  # a test stopped it and failed before restarting
        redis_server.start()
    redis.Redis.from_url(redis_server.url).flushall()
    return redis_server.url


@pytest.fixture
def registry(redis_url: str) -> Registry:
    return Registry(redis_client({"url": redis_url}), ttl=3.0)
