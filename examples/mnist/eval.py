"""Evaluate an MNIST checkpoint on the test images: the evaluator that assayer runs on each checkpoint.

Use it as `--evaluator examples/mnist/eval.py:eval_from_checkpoint`. assayer puts this file's folder on
sys.path, so `from train import Net` finds the training script beside it.

The test images are read from the folder in the environment variable MNIST_DATA_DIR, by default the
`data` folder beside this file. Set it in the environment of the assayer workers.
"""

from __future__ import annotations

import contextlib
import json
import os

import torch
from torch.nn import functional
from train import Net, load_mnist, to_tensors

DATA_DIR_VARIABLE = "MNIST_DATA_DIR"
DEFAULT_DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
BATCH_SIZE = 1000


def eval_from_checkpoint(checkpoint_path: str) -> dict[str, float]:
    """Score one checkpoint on the MNIST test images, write its metrics as JSON and return them.

    Returns the mean cross-entropy `loss` and the `accuracy`. The JSON goes to
    `<parent of the checkpoint folder>/evals/<checkpoint stem>.json`, outside the watched folder, so
    assayer does not take it for a checkpoint.

    Raises:
        FileNotFoundError: the checkpoint or a test file is missing.
    """
    model = Net()
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    model.load_state_dict(checkpoint["model_state_dict"])
    images, labels = load_test_set()
    metrics = evaluate(model, images, labels)
    write_json(eval_path(checkpoint_path), {"checkpoint": os.path.abspath(checkpoint_path), **metrics})
    return metrics


def load_test_set() -> tuple[torch.Tensor, torch.Tensor]:
    # Read at call time, so setting the variable after this module is imported still takes effect.
    data_dir = os.environ.get(DATA_DIR_VARIABLE, DEFAULT_DATA_DIR)
    try:
        return to_tensors(*load_mnist(data_dir, "test"))
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"MNIST test file {error.filename} not found: set {DATA_DIR_VARIABLE} to the --data_dir that "
            "train.py used, because train.py downloads the files there"
        ) from error


def evaluate(model: Net, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Return the mean cross-entropy `loss` and the `accuracy` of `model` as plain floats."""
    model.eval()
    total_loss = 0.0
    correct = 0
    with torch.no_grad():
        for start in range(0, len(labels), BATCH_SIZE):
            logits = model(images[start : start + BATCH_SIZE])
            batch_labels = labels[start : start + BATCH_SIZE]
            total_loss += functional.cross_entropy(logits, batch_labels, reduction="sum").item()
            correct += (logits.argmax(dim=1) == batch_labels).sum().item()
    return {"accuracy": correct / len(labels), "loss": total_loss / len(labels)}


def eval_path(checkpoint_path: str) -> str:
    """Return `<parent of the checkpoint folder>/evals/<checkpoint stem>.json`."""
    checkpoint_dir = os.path.dirname(os.path.abspath(checkpoint_path))
    stem = os.path.splitext(os.path.basename(checkpoint_path))[0]
    return os.path.join(os.path.dirname(checkpoint_dir), "evals", f"{stem}.json")


def write_json(path: str, data: dict) -> None:
    """Write `data` to `path` through a `.tmp` file and os.replace, so readers never see half a file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temporary, "w") as file:
            json.dump(data, file, indent=2)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
