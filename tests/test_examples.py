"""Tests of the examples. Training and evaluation run in processes of their own, as a user would run them."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DIGITS = REPO / "examples" / "digits"
MNIST = REPO / "examples" / "mnist"

# Loads an evaluator file the way assayer does, with the file's folder first on sys.path, calls it on one
# checkpoint and prints the metrics with the type name of each value.
EVALUATE = """
import importlib.util, json, os, sys
evaluator_path, checkpoint_path = sys.argv[1], sys.argv[2]
sys.path.insert(0, os.path.dirname(evaluator_path))
spec = importlib.util.spec_from_file_location("eval", evaluator_path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
metrics = module.eval_from_checkpoint(checkpoint_path)
types = {key: type(value).__name__ for key, value in metrics.items()}
print(json.dumps({"metrics": metrics, "types": types}))
"""


def run_python(*args: str, cwd: Path, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    environment = dict(os.environ)
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=environment, timeout=timeout
    )


def evaluate(evaluator: Path, checkpoint: Path, cwd: Path, env: dict | None = None) -> dict:
    """Run `eval_from_checkpoint` of `evaluator` in a new process and return its printed output."""
    result = run_python("-c", EVALUATE, str(evaluator), str(checkpoint), cwd=cwd, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def load_module(name: str, path: Path):
    """Import a file under `name` without adding its folder to sys.path or the module to sys.modules."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    """A run folder after three epochs of digits training: `checkpoints/` inside, and `evals/` later."""
    run = tmp_path_factory.mktemp("digits")
    result = run_python(str(DIGITS / "train.py"), "--checkpoint_dir", "checkpoints", "--epochs", "3", cwd=run)
    assert result.returncode == 0, result.stderr
    return run


def test_digits_train_writes_checkpoints(digits_run):
    names = sorted(os.listdir(digits_run / "checkpoints"))
    assert names == ["model_epoch1.ckpt", "model_epoch2.ckpt", "model_epoch3.ckpt"]


def test_digits_eval_scores_checkpoint(digits_run):
    output = evaluate(DIGITS / "eval.py", digits_run / "checkpoints" / "model_epoch3.ckpt", cwd=digits_run)
    metrics = output["metrics"]
    assert set(metrics) == {"accuracy", "loss"}
    assert output["types"] == {"accuracy": "float", "loss": "float"}
    assert metrics["accuracy"] > 0.8
    assert 0 < metrics["loss"] < 1
    written = json.loads((digits_run / "evals" / "model_epoch3.json").read_text())
    assert written["accuracy"] == metrics["accuracy"]
    assert written["loss"] == metrics["loss"]
    assert written["checkpoint"] == str(digits_run / "checkpoints" / "model_epoch3.ckpt")


def test_digits_loss_falls_with_epochs(digits_run):
    first = evaluate(DIGITS / "eval.py", digits_run / "checkpoints" / "model_epoch1.ckpt", cwd=digits_run)
    third = evaluate(DIGITS / "eval.py", digits_run / "checkpoints" / "model_epoch3.ckpt", cwd=digits_run)
    assert third["metrics"]["loss"] < first["metrics"]["loss"]
    assert third["metrics"]["accuracy"] > first["metrics"]["accuracy"]


def test_digits_train_stretches_epochs(tmp_path):
    result = run_python(
        str(DIGITS / "train.py"),
        "--checkpoint_dir",
        "checkpoints",
        "--epochs",
        "2",
        "--seconds_per_epoch",
        "0.3",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 2
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["model_epoch1.ckpt", "model_epoch2.ckpt"]
    # Epoch 2 starts after checkpoint 1 is written, so the two writes are at least one epoch apart.
    # The margin below 0.3 s allows for the coarse clock of file modification times.
    first = (tmp_path / "checkpoints" / "model_epoch1.ckpt").stat().st_mtime
    second = (tmp_path / "checkpoints" / "model_epoch2.ckpt").stat().st_mtime
    assert second - first >= 0.25


def test_digits_train_rejects_zero_epochs(tmp_path):
    result = run_python(str(DIGITS / "train.py"), "--epochs", "0", cwd=tmp_path)
    assert result.returncode != 0
    assert "--epochs=0" in result.stderr
    assert not (tmp_path / "checkpoints").exists()


@pytest.fixture
def tiny_mnist(tmp_path) -> Path:
    """A folder with 256 training and 64 test images in MNIST's .gz IDX files."""
    tiny_data = load_module("mnist_tiny_data", MNIST / "tiny_data.py")
    folder = tmp_path / "data"
    tiny_data.write_tiny_mnist(str(folder), n_train=256, n_test=64, seed=0)
    return folder


def test_tiny_mnist_reads_back(tiny_mnist):
    pytest.importorskip("torch")
    train = load_module("mnist_train", MNIST / "train.py")
    images, labels = train.load_mnist(str(tiny_mnist), "train")
    assert images.shape == (256, 28, 28)
    assert labels.shape == (256,)
    assert images.dtype.name == "uint8"
    assert images.max() == 255
    assert set(labels.tolist()) == set(range(10))
    test_images, test_labels = train.load_mnist(str(tiny_mnist), "test")
    assert test_images.shape == (64, 28, 28)
    assert test_labels.shape == (64,)


def test_tiny_mnist_rejects_large_counts(tmp_path):
    tiny_data = load_module("mnist_tiny_data", MNIST / "tiny_data.py")
    with pytest.raises(ValueError, match="n_train=1700 and n_test=200"):
        tiny_data.write_tiny_mnist(str(tmp_path), n_train=1700, n_test=200)


def test_mnist_train_and_eval(tmp_path, tiny_mnist):
    pytest.importorskip("torch")
    result = run_python(
        str(MNIST / "train.py"),
        "--data_dir",
        str(tiny_mnist),
        "--checkpoint_dir",
        "checkpoints",
        "--epochs",
        "1",
        "--batch_size",
        "32",
        "--limit_train",
        "200",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "on 200 images" in result.stdout
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["model_epoch1.pt"]

    checkpoint = tmp_path / "checkpoints" / "model_epoch1.pt"
    output = evaluate(MNIST / "eval.py", checkpoint, cwd=tmp_path, env={"MNIST_DATA_DIR": str(tiny_mnist)})
    metrics = output["metrics"]
    assert set(metrics) == {"accuracy", "loss"}
    assert output["types"] == {"accuracy": "float", "loss": "float"}
    assert 0 <= metrics["accuracy"] <= 1
    assert math.isfinite(metrics["loss"])
    assert metrics["loss"] > 0
    written = json.loads((tmp_path / "evals" / "model_epoch1.json").read_text())
    assert written["accuracy"] == metrics["accuracy"]
    assert written["loss"] == metrics["loss"]


def test_mnist_eval_reports_missing_data(tmp_path, tiny_mnist):
    pytest.importorskip("torch")
    result = run_python(
        str(MNIST / "train.py"),
        "--data_dir",
        str(tiny_mnist),
        "--checkpoint_dir",
        "checkpoints",
        "--epochs",
        "1",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_python(
        "-c",
        EVALUATE,
        str(MNIST / "eval.py"),
        str(tmp_path / "checkpoints" / "model_epoch1.pt"),
        cwd=tmp_path,
        env={"MNIST_DATA_DIR": str(empty)},
    )
    assert result.returncode != 0
    assert "FileNotFoundError" in result.stderr
    assert "MNIST_DATA_DIR" in result.stderr
    assert not (tmp_path / "evals").exists()


def test_mnist_watched_while_training(watcher, connection, tiny_mnist):
    pytest.importorskip("torch")
    from conftest import run_command, wait_for

    from assayer import records

    evaluator = f"{MNIST / 'eval.py'}:eval_from_checkpoint"
    result = run_command(
        "assayer.watch",
        f"--redis_url={watcher.settings.url}",
        f"--directory={watcher.directory}",
        f"--evaluator={evaluator}",
        "--polling_interval=1",
        "--num_eval_workers=1",
        env={"MNIST_DATA_DIR": str(tiny_mnist)},
        cwd=watcher.elsewhere,
    )
    assert result.returncode == 0, result.stderr
    trained = run_python(
        str(MNIST / "train.py"),
        "--data_dir",
        str(tiny_mnist),
        "--checkpoint_dir",
        str(watcher.directory),
        "--epochs",
        "2",
        "--batch_size",
        "32",
        cwd=watcher.root,
    )
    assert trained.returncode == 0, trained.stderr

    def finished():
        rows = [
            row
            for config, _ in records.load_watches(connection)
            for row in records.load_all(connection, config.watch_id)
        ]
        done = [row for row in rows if row["state"] in (records.FINISHED, records.FAILED)]
        return sorted(done, key=lambda row: row["step"]) if len(done) == 2 else None

    rows = wait_for(finished, 90, message="both epochs evaluated")
    assert [row["name"] for row in rows] == ["model_epoch1.pt", "model_epoch2.pt"]
    assert [row["state"] for row in rows] == [records.FINISHED, records.FINISHED]
    for row in rows:
        assert set(row["result"]) == {"accuracy", "loss"}
        assert (watcher.root / "evals" / f"{row['name'][:-3]}.json").exists()
