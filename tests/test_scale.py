"""Scale acceptance tests: many watches on one worker, large trees, idle traffic, large backfills.

The bounds are fixed and generous, so that a loaded two-core CI machine passes them. The benchmarks in
tests/benchmarks measure the same paths more closely.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import Watcher, start_redis_server, stop_everything, stop_process, wait_for
from rq import Queue

from assayer import records, workers
from assayer.jobs import watch_job

OLD_SECONDS = 3600
"""How far in the past pre-existing checkpoints are dated, so a backfill finds them settled."""


@pytest.fixture
def private_watcher(state_home, tmp_path):
    """A watcher on a redis-server of its own, whose traffic counters then count this test's processes only."""
    folder = tmp_path / "redis"
    folder.mkdir()
    process, settings = start_redis_server(folder)
    yield Watcher(settings, tmp_path)
    stop_everything(settings)
    stop_process(process)


def write(path, data: bytes = b"weights") -> float:
    """Write a checkpoint file and return the time it was written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return time.time()


def write_old_checkpoints(directory, count: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    when = time.time() - OLD_SECONDS
    for step in range(count):
        path = directory / f"model_step{step}.pt"
        path.write_bytes(b"w")
        os.utime(path, (when, when))


def write_other_files(directory, count: int, per_folder: int = 100) -> None:
    """Write `count` empty files that are not checkpoints, `per_folder` to a folder."""
    for first in range(0, count, per_folder):
        folder = directory / "samples" / f"batch{first // per_folder}"
        folder.mkdir(parents=True)
        for index in range(min(per_folder, count - first)):
            (folder / f"sample_{index}.json").touch()


def watch_of(connection, directory) -> tuple:
    """Return the (config, status fields) of the watch of `directory`."""
    (found,) = [item for item in records.load_watches(connection) if item[0].directory == str(directory)]
    return found


def polls_committed(connection, watch_id: str) -> int:
    """Return how many polls the watch has committed: its chain's sequence number minus one."""
    return int(connection.hget(records.watch_key(watch_id), "seq") or 1) - 1


def finished_records(connection, count: int):
    """Return a condition that returns the finished records of all watches once there are `count` of them."""

    def condition():
        rows = [
            row
            for config, _ in records.load_watches(connection)
            for row in records.load_all(connection, config.watch_id)
            if row["state"] == records.FINISHED
        ]
        return rows if len(rows) >= count else None

    return condition


def test_forty_watches_one_worker(watcher, connection):
    directories = [watcher.root / f"experiment{index}" for index in range(40)]
    for directory in directories:
        directory.mkdir()
    watcher.watch("--polling_interval=1", "--num_watch_workers=1", "--num_eval_workers=4", directory=directories[0])

    def join_running_workers(directory):
        return watcher.watch(
            "--polling_interval=1", "--num_watch_workers=0", "--num_eval_workers=0", directory=directory, check=False
        )

    # Four commands at a time, since they share no state: most of each one's time is Python's start-up.
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(join_running_workers, directories[1:]))
    for result in results:
        assert result.returncode == 0, result.stderr
    assert len(workers.running_pools(connection)) == 2
    watch_ids = [watch_of(connection, directory)[0].watch_id for directory in directories]
    wait_for(
        lambda: all(polls_committed(connection, watch_id) >= 2 for watch_id in watch_ids),
        30,
        message="two polls of every watch",
    )

    for directory in directories:
        write(directory / "model_step1.pt")
    rows = wait_for(finished_records(connection, 40), 10, message="40 evaluations within 10 s of the writes")

    assert sorted(row["path"] for row in rows) == sorted(str(directory / "model_step1.pt") for directory in directories)


def test_large_tree_latency(watcher, connection):
    interval, settle = 1.0, 1.0
    bound = interval + settle + 1.5
    write_other_files(watcher.directory, 20_000)
    watcher.watch(f"--polling_interval={interval:g}", f"--settle_seconds={settle:g}", "--num_eval_workers=1")
    config, _ = watch_of(connection, watcher.directory)
    wait_for(lambda: polls_committed(connection, config.watch_id) >= 2, 20, message="the first polls")

    latencies = []
    for attempt in range(8):
        written_at = write(watcher.directory / "checkpoints" / f"model_step{attempt}.pt")
        rows = wait_for(finished_records(connection, attempt + 1), 30, message=f"evaluation {attempt + 1}")
        (row,) = [row for row in rows if row["name"] == f"checkpoints/model_step{attempt}.pt"]
        latencies.append(row["ended_at"] - written_at)

    assert max(latencies) <= bound, f"seconds from write to evaluated: {[round(value, 2) for value in latencies]}"


def test_idle_poll_traffic(private_watcher):
    watcher = private_watcher
    connection = watcher.settings.connect()
    write_old_checkpoints(watcher.directory, 2000)
    watcher.watch("--polling_interval=1", "--num_watch_workers=1", "--num_eval_workers=0")
    config, _ = watch_of(connection, watcher.directory)
    wait_for(lambda: polls_committed(connection, config.watch_id) >= 2, 30, message="the first polls")
    assert connection.hlen(watch_job.known_key(config.watch_id)) == 2000

    # Everything the private server receives in the window counts, heartbeats and these reads included.
    polls_before = polls_committed(connection, config.watch_id)
    bytes_before = int(connection.info("stats")["total_net_input_bytes"])

    def five_more_polls():
        polls = polls_committed(connection, config.watch_id) - polls_before
        return polls if polls >= 5 else None

    polls = wait_for(five_more_polls, 20, interval=0.5, message="five idle polls")
    received = int(connection.info("stats")["total_net_input_bytes"]) - bytes_before

    assert received / polls <= 20_000, f"{received} bytes received in {polls} idle polls"
    assert connection.hlen(watch_job.pending_key(config.watch_id)) == 0


def test_backfill_queued_quickly(watcher, connection):
    write_old_checkpoints(watcher.directory, 3000)
    evaluation_queue = Queue("evaluation", connection=connection)
    began = time.monotonic()
    watcher.watch("--eval_existing", "--polling_interval=1", "--num_watch_workers=1", "--num_eval_workers=0")
    config, _ = watch_of(connection, watcher.directory)

    def all_queued() -> bool:
        return evaluation_queue.count >= 3000 and connection.zcard(records.index_key(config.watch_id)) >= 3000

    wait_for(all_queued, max(0.0, 10 - (time.monotonic() - began)), message="3000 evaluations queued")

    assert time.monotonic() - began <= 10
    assert evaluation_queue.count == 3000
    assert connection.zcard(records.index_key(config.watch_id)) == 3000
