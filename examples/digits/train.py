"""Train a small neural network on scikit-learn's handwritten digits and save a checkpoint after every epoch.

Each checkpoint is `<checkpoint_dir>/model_epoch{N}.ckpt`, a pickle of {"model": MLPClassifier, "epoch": N}.
The data ships with scikit-learn, so nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import time

import numpy as np
from absl import app, flags
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

SEED = 0
TEST_FRACTION = 0.25
# Each load_digits() pixel counts the set pixels in a 4x4 block of a 32x32 scan, so it is an integer 0 to 16.
PIXEL_MAX = 16.0
CLASSES = np.arange(10)

FLAGS = flags.FLAGS


def define_flags() -> None:
    # Flags are defined only when this file runs as a script, because eval.py imports it inside
    # assayer's processes, which define flags of their own.
    flags.DEFINE_string(
        "checkpoint_dir",
        "checkpoints",
        "Folder for the model_epoch{N}.ckpt files, created if missing. A relative path starts at the "
        "working directory.",
    )
    flags.DEFINE_integer("epochs", 5, "Number of passes over the training split.", lower_bound=1)
    flags.DEFINE_float(
        "seconds_per_epoch",
        0.0,
        "Minimum duration of an epoch in seconds. The script sleeps for the rest to look like slower "
        "training, and 0 never sleeps.",
        lower_bound=0.0,
    )


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return (x_train, x_test, y_train, y_test), pixels scaled to [0, 1] and split with a fixed seed.

    The split is the same on every call, so eval.py scores each checkpoint on images it never trained on.
    """
    digits = load_digits()
    features = digits.data / PIXEL_MAX
    return train_test_split(features, digits.target, test_size=TEST_FRACTION, random_state=SEED, stratify=digits.target)


def new_model() -> MLPClassifier:
    return MLPClassifier(hidden_layer_sizes=(64,), learning_rate_init=3e-3, batch_size=32, random_state=SEED)


def save_checkpoint(model: MLPClassifier, epoch: int, checkpoint_dir: str) -> str:
    """Pickle the model to `model_epoch{epoch}.ckpt` in `checkpoint_dir` atomically and return its path.

    The bytes go to a `.tmp` file in the same folder, which os.replace then renames. assayer skips names
    ending in `.tmp`, so it never evaluates a half-written checkpoint.
    """
    path = os.path.join(checkpoint_dir, f"model_epoch{epoch}.ckpt")
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temporary, "wb") as file:
            pickle.dump({"model": model, "epoch": epoch}, file)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    return path


def train(checkpoint_dir: str, epochs: int, seconds_per_epoch: float) -> None:
    """Train for `epochs` epochs, saving a checkpoint and printing one line after each."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    x_train, _, y_train, _ = load_split()
    model = new_model()
    for epoch in range(1, epochs + 1):
        started = time.monotonic()
        # One partial_fit call is one shuffled pass over the training split in mini-batches.
        model.partial_fit(x_train, y_train, classes=CLASSES)
        remaining = seconds_per_epoch - (time.monotonic() - started)
        if remaining > 0:
            time.sleep(remaining)
        path = save_checkpoint(model, epoch, checkpoint_dir)
        print(f"epoch {epoch}/{epochs}: train loss {model.loss_:.4f}, saved {path}", flush=True)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    train(FLAGS.checkpoint_dir, FLAGS.epochs, FLAGS.seconds_per_epoch)


if __name__ == "__main__":
    define_flags()
    app.run(main)
