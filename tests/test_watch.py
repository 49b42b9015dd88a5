"""The watch command end to end: real Redis, real worker pools, files written while the watch runs."""

from __future__ import annotations

import os
import signal

from conftest import stays_true, wait_for
from rq import Queue, Worker

from assayer import records, workers


def write(path, data: bytes = b"weights") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def poll_count(connection, watcher) -> int:
    """Return how many polls the watch has committed, read from its chain's sequence number."""
    for config, fields in records.load_watches(connection):
        if config.directory == str(watcher.directory):
            # The chain's sequence number is 1 when it is seeded and grows by one with each committed poll.
            return int(fields.get("seq", 1)) - 1
    return 0


def finished(connection, count: int):
    def condition():
        rows = [
            row
            for config, _ in records.load_watches(connection)
            for row in records.load_all(connection, config.watch_id)
        ]
        done = [row for row in rows if row["state"] in (records.FINISHED, records.FAILED, records.SKIPPED)]
        return done if len(done) >= count else None

    return condition


def test_new_checkpoints_evaluated_once(watcher, connection):
    write(watcher.directory / "model_epoch0.pt")
    result = watcher.watch()
    assert "already present, and left alone on a new watch: 1 checkpoint;" in result.stdout
    wait_for(lambda: poll_count(connection, watcher) >= 2, 20, message="the first polls")
    write(watcher.directory / "model_epoch1.pt")
    write(watcher.directory / "run" / "deep" / "model_epoch2.ckpt")
    write(watcher.directory / "notes.txt")
    write(watcher.directory / "model_epoch3.pt.bak")
    wait_for(finished(connection, 2), 30, message="two evaluations")
    polls = poll_count(connection, watcher)
    wait_for(lambda: poll_count(connection, watcher) >= polls + 4, 20, message="four more polls")
    assert watcher.evaluated_paths() == ["model_epoch1.pt", "run/deep/model_epoch2.ckpt"]
    for line in watcher.evaluations():
        assert os.path.isabs(line["path"])
        assert line["label"] == "from-helper"


def test_eval_existing_evaluates_present(watcher, connection):
    write(watcher.directory / "model_epoch1.pt")
    write(watcher.directory / "sub" / "model_epoch2.pt")
    result = watcher.watch("--eval_existing")
    assert "already present, and evaluated unless they have a record (--eval_existing): 2 checkpoints" in result.stdout
    wait_for(finished(connection, 2), 30, message="both existing checkpoints evaluated")
    assert watcher.evaluated_paths() == ["model_epoch1.pt", "sub/model_epoch2.pt"]


def test_module_evaluator_from_working_dir(watcher, connection):
    package = watcher.elsewhere / "mypackage"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "evals.py").write_text(
        "import json, os\ndef score(path):\n    return {'bytes': os.path.getsize(path)}\n"
    )
    watcher.watch(evaluator="mypackage.evals.score")
    wait_for(lambda: poll_count(connection, watcher) >= 1, 20, message="the first poll")
    write(watcher.directory / "model_epoch7.pt", b"12345")
    rows = wait_for(finished(connection, 1), 30, message="one evaluation")
    assert rows[0]["state"] == records.FINISHED
    assert rows[0]["result"] == {"bytes": 5}
    assert rows[0]["step"] == 7


def test_missing_directory_is_watched(watcher, connection):
    result = watcher.watch()
    assert f"{watcher.directory} does not exist yet; watching it anyway" in result.stdout
    wait_for(lambda: poll_count(connection, watcher) >= 2, 20, message="polls of the missing folder")
    write(watcher.directory / "model_epoch1.pt")
    wait_for(finished(connection, 1), 30, message="the first checkpoint evaluated")
    assert watcher.evaluated_paths() == ["model_epoch1.pt"]


def test_evaluation_jobs_have_no_time_limit(watcher, connection):
    watcher.watch()
    wait_for(lambda: poll_count(connection, watcher) >= 1, 20, message="the first poll")
    write(watcher.directory / "model_epoch1.pt")
    rows = wait_for(finished(connection, 1), 30, message="one evaluation")
    job = Queue("evaluation", connection=connection).fetch_job(rows[0]["job_id"])
    assert job.timeout == -1


def test_shutdown_leaves_nothing_running(watcher, connection):
    watcher.watch()
    wait_for(lambda: poll_count(connection, watcher) >= 2, 20, message="the first polls")
    pool_pids = [pool["pid"] for pool in workers.running_pools(connection).values()]
    worker_pids = [worker.pid for worker in Worker.all(connection=connection)]
    assert len(pool_pids) == 2
    assert len(worker_pids) == 3
    result = watcher.shutdown()
    assert result.returncode == 0, result.stderr
    assert "none is running now" in result.stdout
    for pid in pool_pids + worker_pids:
        assert not process_exists(pid), f"process {pid} still runs"
    assert Worker.all(connection=connection) == []
    watch_queue = Queue("watch", connection=connection)

    def chain_is_gone():
        return watch_queue.count == 0 and watch_queue.scheduled_job_registry.count == 0

    assert chain_is_gone()
    stays_true(chain_is_gone, 3, message="an empty watch queue")
    write(watcher.directory / "model_epoch1.pt")
    stays_true(lambda: watcher.evaluations() == [], 2, message="no evaluation after shutdown")


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, signal.SIG_DFL)
    except ProcessLookupError:
        return False
    return True


def test_rerun_updates_settings(watcher, connection, settings):
    first = watcher.watch()
    assert f"results: python -m assayer.status --redis_url {settings.url}" in first.stdout
    second = watcher.watch("--polling_interval=2", "--num_eval_workers=0", "--num_watch_workers=0")
    assert "already watching" in second.stdout
    assert "settings of the running watch updated; they apply from its next poll" in second.stdout
    ((config, _),) = records.load_watches(connection)
    assert config.polling_interval == 2
    third = watcher.watch("--polling_interval=2", "--num_eval_workers=0", "--num_watch_workers=0")
    assert "settings of the running watch updated" not in third.stdout
