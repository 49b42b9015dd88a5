"""Readiness end to end: checkpoints written slowly by a background thread while a real watch polls them.

Each test checks that only complete checkpoints are evaluated, and each version exactly once. The
writer threads pause between chunks to act like a slow trainer. The tests themselves never sleep: they
wait for conditions or for a number of polls, with deadlines.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

from conftest import wait_for

from assayer import records
from assayer.diff import Pending
from assayer.jobs import watch_job

POLLING = "--polling_interval=1"
SETTLED_POLLS = 3
"""Polls to wait so that a checkpoint unchanged since the first of them has settled and had its chance.

With `--polling_interval=1` the settle time is 1 s. RQ's scheduler checks for due jobs once a second and
stores due times in whole seconds, so polls start about 1 s apart and 3 of them span about 3 s."""


class Writer(threading.Thread):
    """Runs `steps` one after another in a background thread, as a trainer saves while the watch polls."""

    def __init__(self, *steps):
        super().__init__(daemon=True)
        self.steps = steps
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for step in self.steps:
                step()
        except BaseException as error:  # Reported by `finish` in the test thread.
            self.error = error


def start_writers(*writers: Writer) -> list[Writer]:
    for writer in writers:
        writer.start()
    return list(writers)


def finish(*writers: Writer) -> None:
    """Wait for the writer threads to end and fail the test if one of them raised."""
    for writer in writers:
        wait_for(lambda: not writer.is_alive(), 30, message="the writer thread to finish")
        assert writer.error is None, f"writer thread failed: {writer.error!r}"


def write_in_chunks(path: Path, chunks: int = 8, chunk_size: int = 1000, pause: float = 0.5):
    """Return a step that writes `chunks` chunks to `path`, unbuffered, pausing after each one."""

    def step() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb", buffering=0) as file:
            for index in range(chunks):
                file.write(bytes([index % 256]) * chunk_size)
                time.sleep(pause)

    return step


def write_now(path: Path, data: bytes = b"weights"):
    def step() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    return step


def write(path: Path, data: bytes = b"weights") -> None:
    write_now(path, data)()


def watch_of(connection, directory: Path):
    """Return the config and status fields of the watch of `directory`, or (None, {}) before it exists."""
    for config, fields in records.load_watches(connection):
        if config.directory == str(directory):
            return config, fields
    return None, {}


def poll_count(connection, directory: Path) -> int:
    """Return how many polls the watch of `directory` has committed, read from its chain's sequence number."""
    _, fields = watch_of(connection, directory)
    # The sequence number is 1 when the chain is seeded and grows by one with each committed poll.
    return int(fields.get("seq", 1)) - 1


def wait_polls(connection, directory: Path, count: int) -> None:
    target = poll_count(connection, directory) + count
    wait_for(lambda: poll_count(connection, directory) >= target, 10 + 3 * count, message=f"{count} more polls")


def watch_records(connection, directory: Path) -> list[dict]:
    config, _ = watch_of(connection, directory)
    return records.load_all(connection, config.watch_id) if config else []


def evaluated(watcher, count: int):
    """Return a condition that is true once the evaluator has run `count` times, and returns its log lines."""

    def condition():
        lines = watcher.evaluations()
        return lines if len(lines) >= count else None

    return condition


def sizes_by_path(watcher) -> dict[str, list[int]]:
    result: dict[str, list[int]] = {}
    for line in watcher.evaluations():
        result.setdefault(os.path.relpath(line["path"], watcher.directory), []).append(line["size"])
    return result


def test_slow_files_evaluated_once(watcher, connection):
    watcher.watch(POLLING)
    wait_polls(connection, watcher.directory, 1)
    finish(*start_writers(Writer(write_in_chunks(watcher.directory / "model_epoch1.pt"))))
    lines = wait_for(evaluated(watcher, 1), 20, message="the first file evaluated")
    assert lines[0]["size"] == 8000

    names = ["model_epoch2.pt", "model_epoch3.pt", "model_epoch4.pt"]
    finish(*start_writers(*[Writer(write_in_chunks(watcher.directory / name)) for name in names]))
    wait_for(evaluated(watcher, 4), 20, message="the three files evaluated")
    wait_polls(connection, watcher.directory, SETTLED_POLLS)
    expected = {name: [8000] for name in ["model_epoch1.pt", *names]}
    assert sizes_by_path(watcher) == expected


def held_incomplete(connection, directory: Path, relative: str) -> bool:
    """Return whether the watch keeps `relative` pending because it settled but its format marks it as incomplete."""
    config, _ = watch_of(connection, directory)
    raw = connection.hget(watch_job.pending_key(config.watch_id), relative)
    return raw is not None and Pending.loads(raw).reported


def files_by_path(watcher) -> dict[str, list[str]]:
    return {line["path"]: line["files"] for line in watcher.evaluations()}


def test_folders_wait_until_complete(watcher, connection):
    # The regex matches the *.pt files inside checkpoint-7 too: the folder still counts as one checkpoint.
    watcher.watch(POLLING, r"--regex_filter=^.*(\.pt|checkpoint-\d+)$")
    orbax = watcher.root / "orbax"
    # A second watch, with a ready marker, served by the first command's workers.
    watcher.watch(
        POLLING,
        r"--regex_filter=^\d+$",
        "--ready_marker=commit_success.txt",
        "--num_watch_workers=0",
        "--num_eval_workers=0",
        directory=orbax,
    )
    wait_polls(connection, watcher.directory, 1)
    wait_polls(connection, orbax, 1)
    plain = watcher.directory / "checkpoint-7"
    distcp = watcher.directory / "checkpoint-100"
    sharded = watcher.directory / "checkpoint-200"
    marked = orbax / "10"
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = {"metadata": {"total_size": 2000}, "weight_map": {"embed.weight": shards[0], "head.weight": shards[1]}}
    writers = start_writers(
        # One file starts every second and is written in two halves, so the folder changes every 0.5 s for 3.5 s.
        Writer(*[write_in_chunks(plain / f"part{index}.pt", chunks=2, chunk_size=500) for index in range(4)]),
        Writer(write_in_chunks(distcp / "__0_0.distcp", chunks=2), write_in_chunks(distcp / "__1_0.distcp", chunks=2)),
        Writer(
            write_now(sharded / "config.json", b"{}"),
            write_now(sharded / "model.safetensors.index.json", json.dumps(index).encode()),
            write_in_chunks(sharded / shards[0], chunks=2),
        ),
        Writer(
            write_in_chunks(marked / "_CHECKPOINT_METADATA", chunks=2),
            write_in_chunks(marked / "default" / "array.bin", chunks=2),
        ),
    )
    finish(*writers)
    wait_for(
        lambda: held_incomplete(connection, watcher.directory, "checkpoint-100"), 20, message="the distcp folder held"
    )
    wait_for(
        lambda: held_incomplete(connection, watcher.directory, "checkpoint-200"), 20, message="the sharded folder held"
    )
    wait_for(lambda: held_incomplete(connection, orbax, "10"), 20, message="the unmarked folder held")
    wait_for(evaluated(watcher, 1), 20, message="the complete folder evaluated")
    wait_polls(connection, watcher.directory, SETTLED_POLLS)
    lines = watcher.evaluations()
    assert len(lines) == 1
    assert lines[0]["path"] == str(plain)
    assert lines[0]["files"] == ["part0.pt", "part1.pt", "part2.pt", "part3.pt"]
    assert lines[0]["size"] == 4000

    write(distcp / ".metadata")
    write(sharded / shards[1], b"x" * 1000)
    write(marked / "commit_success.txt")
    wait_for(evaluated(watcher, 4), 20, message="the completed folders evaluated")
    wait_polls(connection, watcher.directory, SETTLED_POLLS)
    assert len(watcher.evaluations()) == 4
    assert files_by_path(watcher) == {
        str(plain): ["part0.pt", "part1.pt", "part2.pt", "part3.pt"],
        str(distcp): [".metadata", "__0_0.distcp", "__1_0.distcp"],
        str(sharded): sorted(["config.json", "model.safetensors.index.json", *shards]),
        str(marked): ["_CHECKPOINT_METADATA", "commit_success.txt", "default"],
    }


def test_replaced_file_evaluated_per_version(watcher, connection):
    watcher.watch(POLLING)
    wait_polls(connection, watcher.directory, 1)
    last = watcher.directory / "last.ckpt"
    finish(*start_writers(Writer(write_in_chunks(last, chunks=2))))
    wait_for(evaluated(watcher, 1), 20, message="the first version evaluated")
    finish(*start_writers(Writer(write_in_chunks(last, chunks=3))))
    wait_for(evaluated(watcher, 2), 20, message="the second version evaluated")
    wait_polls(connection, watcher.directory, SETTLED_POLLS)
    assert sizes_by_path(watcher) == {"last.ckpt": [2000, 3000]}
    rows = watch_records(connection, watcher.directory)
    assert [row["state"] for row in rows] == [records.FINISHED, records.FINISHED]
    assert rows[0]["fingerprint"] != rows[1]["fingerprint"]


def test_deletions_do_not_end_watch(watcher, connection):
    # No evaluation worker yet, so the evaluation stays queued while the checkpoint is deleted.
    watcher.watch(POLLING, "--num_eval_workers=0")
    wait_polls(connection, watcher.directory, 1)
    doomed = watcher.directory / "model_epoch1.pt"
    write(doomed, b"x" * 10)
    stat = doomed.stat()
    wait_for(lambda: watch_records(connection, watcher.directory), 20, message="the evaluation queued")
    doomed.unlink()
    result = watcher.watch(POLLING, "--num_watch_workers=0", "--num_eval_workers=1")
    assert "already watching" in result.stdout

    def skipped():
        rows = watch_records(connection, watcher.directory)
        return rows if rows and rows[0]["state"] == records.SKIPPED else None

    rows = wait_for(skipped, 20, message="the deleted checkpoint skipped")
    config, _ = watch_of(connection, watcher.directory)
    fingerprint = f"{stat.st_size}:{stat.st_mtime_ns}"
    expected = {
        "watch": config.watch_id,
        "path": str(doomed),
        "name": "model_epoch1.pt",
        "fingerprint": fingerprint,
        "state": records.SKIPPED,
        "reason": "deleted before its evaluation started",
        "step": 1,
        "attempts": 1,
        "job_id": records.eval_job_id(config.watch_id, records.version_of("model_epoch1.pt", fingerprint)),
        "worker": rows[0]["worker"],
        "enqueued_at": rows[0]["enqueued_at"],
        "started_at": rows[0]["started_at"],
        "ended_at": rows[0]["ended_at"],
    }
    assert rows == [expected]
    assert rows[0]["worker"].startswith("assayer-eval-")
    assert rows[0]["enqueued_at"] <= rows[0]["started_at"] <= rows[0]["ended_at"]
    assert watcher.evaluations() == []

    write(watcher.directory / "model_epoch2.pt")
    wait_for(evaluated(watcher, 1), 20, message="the next checkpoint evaluated")
    shutil.rmtree(watcher.directory)

    def missing_polls() -> int:
        return int(watch_of(connection, watcher.directory)[1].get("missing", 0))

    wait_for(lambda: missing_polls() >= 2, 20, message="two polls of the deleted folder")
    write(watcher.directory / "model_epoch3.pt")
    wait_for(evaluated(watcher, 2), 20, message="a checkpoint in the recreated folder evaluated")
    assert watcher.evaluated_paths() == ["model_epoch2.pt", "model_epoch3.pt"]


def test_replaced_before_evaluation_skipped(watcher, connection):
    # No evaluation worker yet, so the first version is still queued when the trainer rewrites the file.
    watcher.watch(POLLING, "--num_eval_workers=0")
    wait_polls(connection, watcher.directory, 1)
    write(watcher.directory / "last.ckpt", b"a" * 2000)
    wait_for(lambda: len(watch_records(connection, watcher.directory)) == 1, 20, message="version 1 queued")
    write(watcher.directory / "last.ckpt", b"b" * 3000)
    wait_for(lambda: len(watch_records(connection, watcher.directory)) == 2, 20, message="version 2 queued")
    watcher.watch(POLLING, "--num_watch_workers=0", "--num_eval_workers=1")

    def settled():
        rows = watch_records(connection, watcher.directory)
        return rows if all(row["state"] in (records.SKIPPED, records.FINISHED) for row in rows) else None

    rows = wait_for(settled, 20, message="both versions handled")
    assert [row["state"] for row in rows] == [records.SKIPPED, records.FINISHED]
    assert rows[0]["reason"] == (
        "replaced by a newer version before its evaluation started; the newer version is evaluated instead"
    )
    assert sizes_by_path(watcher) == {"last.ckpt": [3000]}


def test_temporary_names_wait_for_rename(watcher, connection):
    # Every top-level name matches, so only the temporary-name rules keep the staged names out.
    watcher.watch(POLLING, "--regex_filter=^[^/]+$")
    wait_polls(connection, watcher.directory, 1)
    staged = {
        "x.pt.tmp": "x.pt",
        ".hidden.pt": "hidden.pt",
        "tmp-checkpoint-5": "checkpoint-5",
        "10.orbax-checkpoint-tmp-123": "10",
    }
    hf_staging = watcher.directory / "tmp-checkpoint-5"
    orbax_staging = watcher.directory / "10.orbax-checkpoint-tmp-123"
    writers = start_writers(
        Writer(write_in_chunks(watcher.directory / "x.pt.tmp", chunks=2)),
        Writer(write_in_chunks(watcher.directory / ".hidden.pt", chunks=2)),
        Writer(write_in_chunks(hf_staging / "model.safetensors", chunks=2), write_now(hf_staging / "config.json")),
        Writer(
            write_in_chunks(orbax_staging / "default" / "array.bin", chunks=2),
            write_now(orbax_staging / "_CHECKPOINT_METADATA"),
        ),
    )
    finish(*writers)
    wait_polls(connection, watcher.directory, SETTLED_POLLS)
    assert watcher.evaluations() == []

    for temporary, final in staged.items():
        os.rename(watcher.directory / temporary, watcher.directory / final)
    wait_for(evaluated(watcher, 4), 20, message="the renamed checkpoints evaluated")
    wait_polls(connection, watcher.directory, SETTLED_POLLS)
    assert watcher.evaluated_paths() == sorted(staged.values())
