"""Real datasets these machines can install offline.

Fashion-MNIST ships in Debian's ``dataset-fashion-mnist`` package as IDX files
(``apt-get install dataset-fashion-mnist``).  The embedded teacher is trained
on it at 16x16: each 28x28 image is zero-padded to 32x32 and 2x2 mean-pooled,
then mapped to [-1, 1].
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
from ..errors import InputError, TTFMError

FASHION_MNIST_DIRS = (
    os.environ.get("TTFM_FASHION_MNIST_DIR", ""),
    "/usr/share/datasets/fashion-mnist",
)
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


class DatasetUnavailable(TTFMError, RuntimeError):
    """A dataset that needs installing first; the message says how."""


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise InputError(f"{path}: not an IDX file (too short)")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise InputError(f"{path}: not an unsigned-byte IDX file")
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise InputError(f"{path}: truncated IDX file ({body.size} of {int(np.prod(dims))} values)")
    return body.reshape(dims)


def find_fashion_mnist() -> Path:
    for d in FASHION_MNIST_DIRS:
        if d and (Path(d) / "train-images-idx3-ubyte.gz").exists():
            return Path(d)
    raise DatasetUnavailable(
        "Fashion-MNIST not found; install it with "
        "'apt-get install dataset-fashion-mnist' or set TTFM_FASHION_MNIST_DIR"
    )


def downsample_28_to_16(images: np.ndarray) -> np.ndarray:
    """``(N, 28, 28)`` uint8 -> ``(N, 16, 16)`` float32 in [0, 1] (pad to 32, 2x2 mean)."""
    x = images.astype(np.float32) / 255.0
    x = np.pad(x, ((0, 0), (2, 2), (2, 2)))
    return x.reshape(-1, 16, 2, 16, 2).mean(axis=(2, 4))


def load_fashion_mnist(split: str = "train", resolution: int = 16):
    """Fashion-MNIST as ``(images, labels)``.

    ``images``: float32 ``(N, 1, R, R)`` in [-1, 1]; ``labels``: int64 ``(N,)``.
    ``resolution``: 16 (the embedded teacher's) or 28 (native).
    """
    root = find_fashion_mnist()
    prefix = {"train": "train", "test": "t10k"}[split]
    images = read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(root / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    if resolution == 16:
        x = downsample_28_to_16(images)
    elif resolution == 28:
        x = images.astype(np.float32) / 255.0
    else:
        raise InputError(f"resolution must be 16 or 28, got {resolution}")
    return (x[:, None] * 2.0 - 1.0).astype(np.float32), labels
