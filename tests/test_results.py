"""Evaluation records made by real watches: kept without expiry, shown by status, written to TensorBoard."""

from __future__ import annotations

import csv
import io
import json

from conftest import run_command, wait_for
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from assayer import records, tensorboard

METRICS_EVALUATOR = """
import os

import numpy


def evaluate(checkpoint_path):
    size = os.path.getsize(checkpoint_path)
    return {"accuracy": numpy.float64(size / 1000), "eval": {"loss": numpy.float32(0.5)}, "shape": (2, 3)}


def opaque(checkpoint_path):
    return object()
"""


def evaluated(connection, count: int):
    def condition():
        rows = [
            row
            for config, _ in records.load_watches(connection)
            for row in records.load_all(connection, config.watch_id)
        ]
        done = [row for row in rows if row["state"] == records.FINISHED]
        return sorted(done, key=lambda row: row["step"]) if len(done) >= count else None

    return condition


def start_metrics_watch(watcher, function: str, *args: str):
    source = watcher.evaluator_dir / "metrics.py"
    source.write_text(METRICS_EVALUATOR)
    watcher.directory.mkdir()
    watcher.watch(*args, evaluator=f"{source}:{function}")


def test_records_shown_by_status(watcher, connection, settings):
    tensorboard_dir = watcher.root / "tb"
    start_metrics_watch(watcher, "evaluate", f"--tensorboard_dir={tensorboard_dir}")
    wait_for(lambda: connection.hget(records.watch_key(_watch_id(connection)), "digest"), 20, message="a first poll")
    for step in (100, 200, 300):
        (watcher.directory / f"ckpt_{step}.pt").write_bytes(b"x" * step * 2)
    rows = wait_for(evaluated(connection, 3), 30, message="three evaluations")

    watch_id = _watch_id(connection)
    first = rows[0]
    assert set(first) == {
        "watch",
        "path",
        "name",
        "fingerprint",
        "state",
        "enqueued_at",
        "attempts",
        "job_id",
        "step",
        "started_at",
        "worker",
        "ended_at",
        "duration",
        "result",
    }
    assert first["watch"] == watch_id
    assert first["path"] == str(watcher.directory / "ckpt_100.pt")
    assert first["name"] == "ckpt_100.pt"
    assert first["step"] == 100
    assert first["attempts"] == 1
    assert first["worker"].startswith("assayer-eval-")
    assert first["result"] == {"accuracy": 0.2, "eval": {"loss": 0.5}, "shape": [2, 3]}
    assert first["enqueued_at"] <= first["started_at"] <= first["ended_at"]
    assert 0 <= first["duration"] <= first["ended_at"] - first["started_at"]
    for key in connection.scan_iter("assayer:record:*"):
        assert connection.ttl(key) == -1

    table = run_command("assayer.status", f"--redis_url={settings.url}")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].startswith(
        f"watch {watcher.directory}  evaluator {watcher.evaluator_dir}/metrics.py:evaluate  3 finished"
    )
    assert lines[1].split() == ["step", "name", "state", "duration", "accuracy", "eval.loss", "note"]
    assert [line.split()[:3] for line in lines[2:5]] == [
        ["100", "ckpt_100.pt", "finished"],
        ["200", "ckpt_200.pt", "finished"],
        ["300", "ckpt_300.pt", "finished"],
    ]
    assert lines[4].split()[4] == "0.6*"
    assert lines[2].split()[5] == "0.5*"

    as_json = json.loads(run_command("assayer.status", f"--redis_url={settings.url}", "--format=json").stdout)
    assert [row["step"] for row in as_json[0]["records"]] == [100, 200, 300]
    assert [row["metrics"]["accuracy"] for row in as_json[0]["records"]] == [0.2, 0.4, 0.6]

    as_csv = run_command("assayer.status", f"--redis_url={settings.url}", "--format=csv").stdout
    rows_csv = list(csv.DictReader(io.StringIO(as_csv)))
    assert [row["step"] for row in rows_csv] == ["100", "200", "300"]
    assert [float(row["accuracy"]) for row in rows_csv] == [0.2, 0.4, 0.6]

    accumulator = EventAccumulator(tensorboard.run_dir(str(tensorboard_dir), records.load_watches(connection)[0][0]))
    accumulator.Reload()
    assert sorted(accumulator.Tags()["scalars"]) == ["accuracy", "eval.loss"]
    assert sorted((event.step, round(event.value, 4)) for event in accumulator.Scalars("accuracy")) == [
        (100, 0.2),
        (200, 0.4),
        (300, 0.6),
    ]

    stopped = watcher.shutdown()
    assert stopped.returncode == 0, stopped.stderr
    after = run_command("assayer.status", f"--redis_url={settings.url}", "--format=json")
    assert [row["state"] for row in json.loads(after.stdout)[0]["records"]] == ["finished"] * 3


def test_unserializable_result_kept_as_repr(watcher, connection):
    start_metrics_watch(watcher, "opaque")
    wait_for(lambda: connection.hget(records.watch_key(_watch_id(connection)), "digest"), 20, message="a first poll")
    (watcher.directory / "ckpt_5.pt").write_bytes(b"x")
    rows = wait_for(evaluated(connection, 1), 30, message="one evaluation")
    assert rows[0]["result"].startswith("<object object at 0x")


def _watch_id(connection) -> str:
    watches = records.load_watches(connection)
    return watches[0][0].watch_id if watches else "none"
