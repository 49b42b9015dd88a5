"""Tests of writing evaluation metrics as TensorBoard scalars, read back with TensorBoard's own reader."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from assayer import tensorboard
from assayer.config import WatchConfig
from assayer.errors import UsageError

REPO = Path(__file__).resolve().parent.parent
CONFIG = WatchConfig(directory="/runs/exp1/ckpts", evaluator="/runs/eval.py:evaluate")

# Writes the metrics of one step from a process of its own, as an evaluation job on a worker does.
WRITE_ONE_STEP = """
import sys
from assayer import tensorboard
from assayer.config import WatchConfig
config = WatchConfig(directory="/runs/exp1/ckpts", evaluator="/runs/eval.py:evaluate")
step = int(sys.argv[2])
tensorboard.write_scalars(sys.argv[1], config, step, {"acc": step / 100, "eval": {"loss": 1 / step}})
"""


def read_scalars(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Return every scalar in the event files of `run_dir` as (step, value) pairs per tag, sorted by step."""
    accumulator = EventAccumulator(run_dir)
    accumulator.Reload()
    return {
        tag: sorted((event.step, event.value) for event in accumulator.Scalars(tag))
        for tag in accumulator.Tags()["scalars"]
    }


def test_write_scalars_tags_steps_values(tmp_path):
    tensorboard.write_scalars(str(tmp_path), CONFIG, 100, {"acc": 0.5, "eval": {"loss": 1.25}, "note": "ok"})
    tensorboard.write_scalars(str(tmp_path), CONFIG, 200, {"acc": 0.75, "eval": {"loss": 0.5}, "note": "ok"})

    scalars = read_scalars(tensorboard.run_dir(str(tmp_path), CONFIG))

    assert scalars == {"acc": [(100, 0.5), (200, 0.75)], "eval.loss": [(100, 1.25), (200, 0.5)]}


def test_write_scalars_run_name(tmp_path):
    tensorboard.write_scalars(str(tmp_path), CONFIG, 1, {"acc": 0.5})

    assert os.listdir(tmp_path) == [f"ckpts-{CONFIG.watch_id}"]


def test_write_scalars_odd_basename(tmp_path):
    odd = WatchConfig(directory="/runs/my run\n2/", evaluator="/runs/eval.py:evaluate")

    tensorboard.write_scalars(str(tmp_path), odd, 1, {"acc": 0.5})

    assert os.listdir(tmp_path) == [f"my_run_2-{odd.watch_id}"]


def test_write_scalars_numpy_and_bare_values(tmp_path):
    bare = WatchConfig(directory="/runs/exp2/ckpts", evaluator="/runs/eval.py:evaluate")
    result = {"acc": np.float32(0.5), "count": np.int64(3), "passed": np.bool_(True), "eval": {"f1": np.float64(0.25)}}

    tensorboard.write_scalars(str(tmp_path), CONFIG, 7, result)
    tensorboard.write_scalars(str(tmp_path), bare, 7, np.float32(2.5))

    assert read_scalars(tensorboard.run_dir(str(tmp_path), CONFIG)) == {
        "acc": [(7, 0.5)],
        "count": [(7, 3.0)],
        "passed": [(7, 1.0)],
        "eval.f1": [(7, 0.25)],
    }
    assert read_scalars(tensorboard.run_dir(str(tmp_path), bare)) == {"result": [(7, 2.5)]}


@pytest.mark.parametrize(
    ("step", "result"),
    [(None, {"acc": 0.5}), (3, {"note": "no numbers"}), (3, [0.1, 0.2]), (3, None)],
)
def test_write_scalars_writes_nothing(tmp_path, step, result):
    tensorboard.write_scalars(str(tmp_path), CONFIG, step, result)

    assert os.listdir(tmp_path) == []


def test_write_scalars_from_concurrent_processes(tmp_path):
    environment = dict(os.environ, PYTHONPATH=str(REPO))
    steps = range(1, 9)
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", WRITE_ONE_STEP, str(tmp_path), str(step)],
            env=environment,
            stderr=subprocess.PIPE,
            text=True,
        )
        for step in steps
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr

    scalars = read_scalars(tensorboard.run_dir(str(tmp_path), CONFIG))

    assert sorted(scalars) == ["acc", "eval.loss"]
    assert scalars["acc"] == [(step, pytest.approx(step / 100)) for step in steps]
    assert scalars["eval.loss"] == [(step, pytest.approx(1 / step)) for step in steps]


def test_check_available():
    tensorboard.check_available()


def test_missing_tensorboardx(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    message = "--tensorboard_dir needs tensorboardX; pip install tensorboardX"

    with pytest.raises(UsageError) as from_check:
        tensorboard.check_available()
    with pytest.raises(UsageError) as from_write:
        tensorboard.write_scalars(str(tmp_path), CONFIG, 1, {"acc": 0.5})

    assert str(from_check.value) == message
    assert str(from_write.value) == message
