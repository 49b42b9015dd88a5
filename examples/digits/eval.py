"""Evaluate a digits checkpoint on the held-out split: the evaluator that assayer runs on each checkpoint.

Use it as `--evaluator examples/digits/eval.py:eval_from_checkpoint`. assayer puts this file's folder on
sys.path, so `from train import ...` finds the training script beside it.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle

from sklearn.metrics import accuracy_score, log_loss
from train import load_split


def eval_from_checkpoint(checkpoint_path: str) -> dict[str, float]:
    """Score one checkpoint on the test split, write its metrics as JSON and return them.

    The JSON goes to `<parent of the checkpoint folder>/evals/<checkpoint stem>.json`, outside the watched
    folder, so assayer does not take it for a checkpoint. Unpickling runs code from the file, so
    evaluate only checkpoints you trust.
    """
    with open(checkpoint_path, "rb") as file:
        checkpoint = pickle.load(file)
    model = checkpoint["model"]
    _, x_test, _, y_test = load_split()
    probabilities = model.predict_proba(x_test)
    predictions = model.classes_[probabilities.argmax(axis=1)]
    metrics = {
        "accuracy": float(accuracy_score(y_test, predictions)),
        "loss": float(log_loss(y_test, probabilities, labels=model.classes_)),
    }
    write_json(eval_path(checkpoint_path), {"checkpoint": os.path.abspath(checkpoint_path), **metrics})
    return metrics


def eval_path(checkpoint_path: str) -> str:
    """Return `<parent of the checkpoint folder>/evals/<checkpoint stem>.json`."""
    checkpoint_dir = os.path.dirname(os.path.abspath(checkpoint_path))
    stem = os.path.splitext(os.path.basename(checkpoint_path))[0]
    return os.path.join(os.path.dirname(checkpoint_dir), "evals", f"{stem}.json")


def write_json(path: str, data: dict) -> None:
    """Write `data` to `path` through a temporary file and os.replace, so readers never see half a file."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temporary, "w") as file:
            json.dump(data, file, indent=2)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
