"""Write a tiny MNIST look-alike in MNIST's own file format, for trying the example and testing it offline.

The images are scikit-learn's bundled 8x8 handwritten digits, scaled up threefold and centred in a 28x28
frame with pixels 0 to 255, so a network can learn them as it learns MNIST.

    python tiny_data.py --output_dir data
"""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
from absl import app, flags
from sklearn.datasets import load_digits

IDX_UNSIGNED_BYTE = 0x08
IMAGE_SIZE = 28
DIGITS_PIXEL_MAX = 16  # load_digits() pixels are integers 0 to 16.
SCALE = 3
FILE_NAMES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

FLAGS = flags.FLAGS


def define_flags() -> None:
    # Defined only when run as a script, so importing this module adds no flags to the importer's.
    flags.DEFINE_string("output_dir", "data", "Folder for the four .gz files, created if missing.")
    flags.DEFINE_integer("n_train", 256, "Number of training images.")
    flags.DEFINE_integer("n_test", 64, "Number of test images.")
    flags.DEFINE_integer("seed", 0, "Seed of the random choice of digits.")


def write_idx(path: str, array: np.ndarray) -> None:
    """Write a uint8 array as a gzip-compressed IDX file.

    The IDX header is two zero bytes, the element type (0x08 for unsigned bytes), the number of dimensions,
    and then each dimension as a big-endian uint32.
    """
    if array.dtype != np.uint8:
        raise ValueError(f"write_idx({path!r}): expected a uint8 array, got {array.dtype}")
    header = struct.pack(">BBBB", 0, 0, IDX_UNSIGNED_BYTE, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as file:
        file.write(header)
        file.write(array.tobytes())


def upscale(images: np.ndarray) -> np.ndarray:
    """Turn 8x8 images with pixels 0 to 16 into 28x28 uint8 images with pixels 0 to 255."""
    blocks = np.kron(images, np.ones((1, SCALE, SCALE)))
    margin = (IMAGE_SIZE - blocks.shape[1]) // 2
    framed = np.pad(blocks, ((0, 0), (margin, margin), (margin, margin)))
    return np.rint(framed * 255 / DIGITS_PIXEL_MAX).astype(np.uint8)


def write_tiny_mnist(folder: str, n_train: int = 256, n_test: int = 64, seed: int = 0) -> None:
    """Write the four MNIST files to `folder` with `n_train` and `n_test` distinct random digits.

    Raises:
        ValueError: a count is below 1, or together they exceed the 1797 digits scikit-learn ships.
    """
    digits = load_digits()
    available = len(digits.target)
    if n_train < 1 or n_test < 1 or n_train + n_test > available:
        raise ValueError(
            f"n_train={n_train} and n_test={n_test} are invalid: each must be at least 1 and their sum "
            f"at most {available}"
        )
    order = np.random.default_rng(seed).permutation(available)
    images = upscale(digits.images)
    labels = digits.target.astype(np.uint8)
    os.makedirs(folder, exist_ok=True)
    for split, indices in (("train", order[:n_train]), ("test", order[n_train : n_train + n_test])):
        images_name, labels_name = FILE_NAMES[split]
        write_idx(os.path.join(folder, images_name), images[indices])
        write_idx(os.path.join(folder, labels_name), labels[indices])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    write_tiny_mnist(FLAGS.output_dir, FLAGS.n_train, FLAGS.n_test, FLAGS.seed)
    print(f"wrote {FLAGS.n_train} training and {FLAGS.n_test} test images to {FLAGS.output_dir}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
