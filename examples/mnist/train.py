"""Train a small convolutional network on MNIST with PyTorch and save a checkpoint after every epoch.

Each checkpoint is `<checkpoint_dir>/model_epoch{N}.pt`, written by torch.save as
{"epoch": N, "model_state_dict": ...}.
The MNIST files are read from `--data_dir` and downloaded there first when any is missing.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import os
import struct
import time
import urllib.request

import numpy as np
import torch
from absl import app, flags
from torch import nn
from torch.nn import functional

FILE_NAMES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# MD5 sums of the original MNIST files, checked after each download.
MD5_SUMS = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
# Mirrors of the original MNIST files, tried in order.
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
DOWNLOAD_TIMEOUT_SECONDS = 60
IDX_UNSIGNED_BYTE = 0x08
# Mean and standard deviation of the MNIST training pixels scaled to [0, 1].
PIXEL_MEAN = 0.1307
PIXEL_STD = 0.3081
SEED = 0
LEARNING_RATE = 1e-3

FLAGS = flags.FLAGS


def define_flags() -> None:
    # Flags are defined only when this file runs as a script, because eval.py imports it inside
    # assayer's processes, which define flags of their own.
    flags.DEFINE_string(
        "data_dir",
        "data",
        "Folder with the four MNIST .gz files; missing ones are downloaded into it. A relative path starts "
        "at the working directory.",
    )
    flags.DEFINE_string(
        "checkpoint_dir",
        "checkpoints",
        "Folder for the model_epoch{N}.pt files, created if missing. A relative path starts at the working directory.",
    )
    flags.DEFINE_integer("epochs", 3, "Number of passes over the training images.", lower_bound=1)
    flags.DEFINE_integer("batch_size", 64, "Number of images per optimizer step.", lower_bound=1)
    flags.DEFINE_integer(
        "limit_train", 0, "Train on only the first N training images; 0 uses all of them.", lower_bound=0
    )


class Net(nn.Module):
    """A network of two convolution and max-pooling stages and two fully connected layers.

    It maps normalized images of shape (n, 1, 28, 28) to logits of shape (n, 10).
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3)
        # 28x28 input: conv 26x26, pool 13x13, conv 11x11, pool 5x5.
        self.fc1 = nn.Linear(32 * 5 * 5, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        hidden = functional.max_pool2d(functional.relu(self.conv1(images)), 2)
        hidden = functional.max_pool2d(functional.relu(self.conv2(hidden)), 2)
        hidden = functional.relu(self.fc1(torch.flatten(hidden, 1)))
        return self.fc2(hidden)


def read_idx(path: str) -> np.ndarray:
    """Read a gzip-compressed IDX file of unsigned bytes, MNIST's format, into a uint8 array.

    Raises:
        ValueError: the header is not that of an unsigned-byte IDX file, or the data is short.
    """
    with gzip.open(path, "rb") as file:
        content = file.read()
    zero, element_type, ndim = struct.unpack_from(">HBB", content)
    if zero != 0 or element_type != IDX_UNSIGNED_BYTE:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes: header {content[:4].hex()}")
    shape = struct.unpack_from(f">{ndim}I", content, 4)
    data = np.frombuffer(content, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path} has {data.size} data bytes, but its header gives the shape {shape}")
    return data.reshape(shape)


def load_mnist(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Return the images (n x 28 x 28) and labels (n) of the "train" or "test" split as uint8 arrays.

    Raises:
        FileNotFoundError: a file of the split is missing from `data_dir`.
        ValueError: a file is malformed, or the image and label counts differ.
    """
    images_name, labels_name = FILE_NAMES[split]
    images = read_idx(os.path.join(data_dir, images_name))
    labels = read_idx(os.path.join(data_dir, labels_name))
    if len(images) != len(labels):
        raise ValueError(f"{data_dir}: {images_name} has {len(images)} images but {labels_name} has {len(labels)}")
    return images, labels


def to_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Return normalized float images of shape (n, 1, 28, 28) and int64 labels, as the network takes them."""
    pixels = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return (pixels - PIXEL_MEAN) / PIXEL_STD, torch.from_numpy(labels.astype(np.int64))


def download_missing(data_dir: str) -> None:
    """Download each MNIST file missing from `data_dir`, checking its MD5 sum before moving it in place.

    Raises:
        RuntimeError: no mirror returned a file with the expected MD5 sum.
    """
    # NOTE: the tests never run this function, because they must not use the network.
    os.makedirs(data_dir, exist_ok=True)
    for name, md5 in MD5_SUMS.items():
        path = os.path.join(data_dir, name)
        if not os.path.exists(path):
            download_file(name, md5, path)


def download_file(name: str, md5: str, path: str) -> None:
    failures = []
    for mirror in MIRRORS:
        url = mirror + name
        print(f"downloading {url}", flush=True)
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_SECONDS) as response:
                content = response.read()
        except (OSError, http.client.HTTPException) as error:  # URLError and timeouts are OSErrors.
            failures.append(f"{url}: {error}")
            continue
        digest = hashlib.md5(content, usedforsecurity=False).hexdigest()
        if digest != md5:
            failures.append(f"{url}: MD5 sum {digest}, expected {md5}")
            continue
        write_atomically(path, content)
        return
    raise RuntimeError(f"downloading {name} failed from every mirror: {'; '.join(failures)}")


def write_atomically(path: str, content: bytes) -> None:
    """Write `content` to a `.tmp` file beside `path` and rename it, so readers see all or nothing.

    assayer skips names ending in `.tmp`, so a watcher never evaluates a half-written file.
    """
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temporary, "wb") as file:
            file.write(content)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def save_checkpoint(model: Net, epoch: int, checkpoint_dir: str) -> str:
    """Save the model's weights to `model_epoch{epoch}.pt` in `checkpoint_dir` atomically and return its path."""
    path = os.path.join(checkpoint_dir, f"model_epoch{epoch}.pt")
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        torch.save({"epoch": epoch, "model_state_dict": model.state_dict()}, temporary)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    return path


def train_epoch(model: Net, optimizer: torch.optim.Optimizer, batches: torch.utils.data.DataLoader) -> float:
    """Run one pass over `batches` and return the mean training loss per image."""
    model.train()
    total_loss = 0.0
    for images, labels in batches:
        optimizer.zero_grad()
        loss = functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(labels)
    return total_loss / len(batches.dataset)


def train(data_dir: str, checkpoint_dir: str, epochs: int, batch_size: int, limit_train: int) -> None:
    """Train for `epochs` epochs, saving a checkpoint and printing one line after each."""
    download_missing(data_dir)
    images, labels = load_mnist(data_dir, "train")
    if limit_train:
        images, labels = images[:limit_train], labels[:limit_train]
    dataset = torch.utils.data.TensorDataset(*to_tensors(images, labels))
    torch.manual_seed(SEED)
    batches = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True)
    model = Net()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    os.makedirs(checkpoint_dir, exist_ok=True)
    for epoch in range(1, epochs + 1):
        started = time.monotonic()
        loss = train_epoch(model, optimizer, batches)
        path = save_checkpoint(model, epoch, checkpoint_dir)
        seconds = time.monotonic() - started
        print(
            f"epoch {epoch}/{epochs}: train loss {loss:.4f} on {len(dataset)} images in {seconds:.1f} s, saved {path}",
            flush=True,
        )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    train(FLAGS.data_dir, FLAGS.checkpoint_dir, FLAGS.epochs, FLAGS.batch_size, FLAGS.limit_train)


if __name__ == "__main__":
    define_flags()
    app.run(main)
