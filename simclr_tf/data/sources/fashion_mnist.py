"""Fashion-MNIST from its IDX files (Debian's dataset-fashion-mnist), with
tfds as the fallback.
"""

from __future__ import annotations

import gzip

import numpy as np
from absl import logging

from simclr_tf import file_io
from simclr_tf.data.sources import base, tfds

# Where Debian's dataset-fashion-mnist package installs the IDX files.
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"

_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


# Label k's name (the dataset's documentation; tfds names them the same).
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


# IDX type byte -> big-endian numpy dtype (yann.lecun.com/exdb/mnist).
_IDX_DTYPES = {
    0x08: ">u1",
    0x09: ">i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


def read_idx(path: str) -> np.ndarray:
    """Reads an IDX file (as used by MNIST), gzip-compressed or not.

    Args:
      path: an IDX file; gzip is detected from its first bytes.

    Returns:
      The array, in the file's shape and native byte order.

    Raises:
      FileNotFoundError: path does not exist.
      ValueError: the magic number, type byte or size is not valid IDX.
    """
    data = file_io.read_bytes(path)
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < 4 or data[0:2] != b"\x00\x00":
        raise ValueError(
            f"{path} is not an IDX file: its magic number starts with "
            f"{data[0:2].hex() or 'nothing'}, IDX files start with 0000; "
            f"pass an (optionally gzipped) IDX file."
        )
    type_byte, ndim = data[2], data[3]
    if type_byte not in _IDX_DTYPES:
        raise ValueError(
            f"{path} has IDX type byte 0x{type_byte:02x}; valid ones are "
            f"{', '.join(f'0x{t:02x}' for t in _IDX_DTYPES)}."
        )
    header = 4 + 4 * ndim
    shape = tuple(
        int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)
    )
    dtype = np.dtype(_IDX_DTYPES[type_byte])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(
            f"{path}: header says shape {shape} ({expected} bytes) but the "
            f"file holds {len(data)} bytes; the file is truncated or corrupt."
        )
    array = np.frombuffer(data, dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def _find_idx(directory: str | None, stem: str) -> str | None:
    if not directory:
        return None
    for candidate in (stem + ".gz", stem):
        path = file_io.join(directory, candidate)
        if file_io.exists(path) and not file_io.isdir(path):
            return path
    return None


def _fashion_mnist_from_idx(
    directory: str | None, split: str
) -> base.Source | None:
    """Fashion-MNIST read from IDX files in `directory`, or None if absent."""
    image_stem, label_stem = _FASHION_MNIST_FILES[split]
    image_path = _find_idx(directory, image_stem)
    label_path = _find_idx(directory, label_stem)
    if image_path is None or label_path is None:
        return None
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(
            f"{image_path} {images.shape} and {label_path} {labels.shape} "
            f"must hold [N, H, W] images and [N] labels with the same N."
        )
    if labels.size and not 0 <= labels.min() <= labels.max() < 10:
        raise ValueError(f"{label_path} has labels outside 0..9.")
    logging.info("fashion_mnist %s: read %s", split, image_path)
    return base.from_arrays(
        "fashion_mnist",
        split,
        images[..., None],
        labels,
        10,
        directory,
        FASHION_MNIST_CLASSES,
    )


def open_fashion_mnist(split: str, data_dir: str | None) -> base.Source:
    split = base.resolve_split(
        "fashion_mnist", split, tuple(_FASHION_MNIST_FILES)
    )
    if split not in _FASHION_MNIST_FILES:
        hint = ' use "test"' if split == "validation" else ""
        raise ValueError(
            f"split={split!r}: fashion_mnist has splits "
            f'"train" (60000) and "test" (10000);{hint or " pick one"}.'
        )
    for directory in (data_dir, FASHION_MNIST_SYSTEM_DIR):
        source = _fashion_mnist_from_idx(directory, split)
        if source is not None:
            return source
    logging.info(
        "fashion_mnist IDX files not in data_dir=%s nor %s; using tfds",
        data_dir,
        FASHION_MNIST_SYSTEM_DIR,
    )
    return tfds.open_tfds("fashion_mnist", split, data_dir)
