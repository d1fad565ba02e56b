"""Dataset sources: Fashion-MNIST from IDX files, synthetic data, and tfds.

`open_source(name, split)` returns a `Source`: the split's size, classes and
image shape, and `dataset()` yielding unbatched (uint8 image, int64 label)
pairs, sharded per host. tfds details live in tfds_source.py; augmentation
and batching in pipeline.py.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import tensorflow as tf
from absl import logging

from simclr_tf.data import tfds_source

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
# Built-in synthetic datasets: name -> (image side, channels).
_SYNTHETIC = {"synthetic": (32, 3), "synthetic_gray": (28, 1)}
_SYNTHETIC_SIZES = {"train": 512, "test": 256}
_SYNTHETIC_SEEDS = {"train": 0, "test": 1}
# split="auto" (the eval split) is the first of these the dataset has.
AUTO_SPLIT = "auto"
EVAL_SPLIT_PREFERENCE = ("validation", "test")

Loader = Callable[..., tf.data.Dataset]


@dataclasses.dataclass(frozen=True)
class Source:
    """One split of a labelled image dataset.

    Attributes:
      name: dataset name as given to `open_source`.
      split: split name, e.g. "train" or "train[:10%]"; never "auto" (the
        resolved name is recorded).
      num_examples: examples in the whole split (all hosts together).
      num_classes: number of label values; labels are in [0, num_classes).
      image_shape: (H, W, C) of the stored images; H and W are None for
        datasets whose images vary in size (e.g. imagenet2012).
      origin: where the data is read from: a directory, "tfds:<data_dir>"
        or "synthetic(seed=...)".
      class_names: the name of each label value (label k is
        class_names[k]) where the dataset has them; empty otherwise.
      skipped: files left out because they could not be read, by reason
        (e.g. "empty", "undecodable", "unsupported_extension") -> their
        paths; empty for sources without files.
      skipped_counts: reason -> count where `skipped` holds only examples
        (TFRecord shards record up to 10 paths); else len(skipped[reason]).
    """

    name: str
    split: str
    num_examples: int
    num_classes: int
    image_shape: tuple[int | None, int | None, int]
    origin: str = ""
    class_names: tuple[str, ...] = dataclasses.field(default=(), compare=False)
    skipped: Mapping[str, tuple[str, ...]] = dataclasses.field(
        default_factory=dict, compare=False
    )
    skipped_counts: Mapping[str, int] = dataclasses.field(
        default_factory=dict, compare=False
    )
    _loader: Loader | None = dataclasses.field(
        default=None, repr=False, compare=False
    )

    def skip_counts(self) -> dict[str, int]:
        """reason -> number of files skipped for it."""
        return {
            reason: int(self.skipped_counts.get(reason, len(paths)))
            for reason, paths in self.skipped.items()
        }

    def dataset(
        self,
        input_context: tf.distribute.InputContext | None = None,
        *,
        shuffle_files: bool = False,
    ) -> tf.data.Dataset:
        """Unbatched (image, label) pairs, this host's shard only.

        Args:
          input_context: with it, host `input_pipeline_id` of
            `num_input_pipelines` reads a disjoint shard (in-memory sources
            take every n-th example; tfds reads contiguous ranges from
            tfds.even_splits, any number of files); None reads all.
          shuffle_files: let tfds read its files in shuffled order (seeded by
            open_source's seed); in-memory sources ignore it.

        Returns:
          A dataset of (image [H, W, C] uint8, label [] int64), in a fixed
          order unless shuffle_files is set.
        """
        if self._loader is None:
            raise ValueError(f"Source {self.name!r} has no loader.")
        return self._loader(input_context, shuffle_files)


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
    with open(path, "rb") as handle:
        data = handle.read()
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


def _array_loader(images: np.ndarray, labels: np.ndarray) -> Loader:
    """A loader over in-memory arrays; hosts take every n-th example."""

    def load(
        input_context: tf.distribute.InputContext | None,
        shuffle_files: bool = False,
    ) -> tf.data.Dataset:
        del shuffle_files  # Nothing to shuffle: one in-memory array.
        x, y = images, labels
        if input_context is not None:
            index = input_context.input_pipeline_id
            step = input_context.num_input_pipelines
            x, y = x[index::step], y[index::step]  # as Dataset.shard does
        return tf.data.Dataset.from_tensor_slices((x, y))

    return load


def from_arrays(
    name: str,
    split: str,
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    origin: str = "memory",
    class_names: Sequence[str] = (),
) -> Source:
    """A Source over in-memory arrays; host i of n takes examples i::n.

    Args:
      name: dataset name to record.
      split: split name to record.
      images: [N, H, W, C] uint8 images.
      labels: [N] integer labels in [0, num_classes).
      num_classes: number of classes.
      origin: where the arrays came from, for logs.
      class_names: optional name per label value.

    Returns:
      The Source.

    Raises:
      ValueError: images are not [N, H, W, C] uint8 or labels not [N].
    """
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(
            f"images {images.shape} {images.dtype} must be [N, H, W, C] "
            f"uint8; add a channel axis with images[..., None] if needed."
        )
    if labels.shape != images.shape[:1]:
        raise ValueError(
            f"labels {labels.shape} must be [N] with N = {len(images)}."
        )
    return Source(
        name=name,
        split=split,
        num_examples=len(labels),
        num_classes=num_classes,
        image_shape=tuple(int(d) for d in images.shape[1:]),
        origin=origin,
        class_names=tuple(class_names),
        _loader=_array_loader(images, labels.astype(np.int64)),
    )


def _find_idx(directory: str | None, stem: str) -> str | None:
    if not directory:
        return None
    for candidate in (stem + ".gz", stem):
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return path
    return None


def _fashion_mnist_from_idx(directory: str | None, split: str) -> Source | None:
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
    return from_arrays(
        "fashion_mnist",
        split,
        images[..., None],
        labels,
        10,
        directory,
        FASHION_MNIST_CLASSES,
    )


def _open_fashion_mnist(
    split: str, data_dir: str | None, seed: int | None
) -> Source:
    split = _resolve_split("fashion_mnist", split, tuple(_FASHION_MNIST_FILES))
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
    return _open_tfds("fashion_mnist", split, data_dir, seed)


# The synthetic dataset's class k is the k-th shape _draw_pattern draws.
SYNTHETIC_CLASSES = (
    "horizontal stripes",
    "vertical stripes",
    "diagonal stripes",
    "antidiagonal stripes",
    "checkerboard",
    "disk",
    "ring",
    "plus",
    "X",
    "square frame",
)


def _draw_pattern(
    label: int, size: int, rng: np.random.Generator
) -> np.ndarray:
    """A [size, size] float mask in {0, 1} of class `label`'s shape."""
    rows, cols = np.mgrid[0:size, 0:size] / max(size - 1, 1) - 0.5
    period = rng.uniform(0.2, 0.3)  # stripe period, in patch sides
    phase = rng.uniform(0, 2 * np.pi)
    radius = np.hypot(rows, cols)
    if label < 4:  # horizontal, vertical, two diagonal stripes
        along = (rows, cols, rows + cols, rows - cols)[label]
        mask = np.sin(2 * np.pi * along / period + phase) > 0
    elif label == 4:  # checkerboard
        wave = np.sin(2 * np.pi * rows / period)
        mask = wave * np.sin(2 * np.pi * cols / period) > 0
    elif label == 5:  # disk
        mask = radius < 0.35
    elif label == 6:  # ring
        mask = (radius > 0.25) & (radius < 0.42)
    elif label == 7:  # plus
        mask = (np.abs(rows) < 0.1) | (np.abs(cols) < 0.1)
    elif label == 8:  # X
        mask = (np.abs(rows - cols) < 0.12) | (np.abs(rows + cols) < 0.12)
    else:  # square frame
        mask = np.maximum(np.abs(rows), np.abs(cols)) > 0.32
    return mask.astype(np.float64)


def synthetic_arrays(
    num_examples: int,
    image_size: int,
    channels: int,
    num_classes: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of the synthetic dataset (see `synthetic`).

    Returns:
      images [N, S, S, C] uint8 and labels [N] int64, balanced over classes.
    """
    if not 1 <= num_classes <= len(SYNTHETIC_CLASSES):
        raise ValueError(
            f"num_classes={num_classes}: synthetic data has "
            f"{len(SYNTHETIC_CLASSES)} patterns; use "
            f"1..{len(SYNTHETIC_CLASSES)}."
        )
    if image_size < 8 or channels not in (1, 3) or num_examples < 1:
        raise ValueError(
            f"synthetic(num_examples={num_examples}, image_size={image_size}, "
            f"channels={channels}) needs >= 1 example, image_size >= 8 and "
            f"channels 1 or 3."
        )
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(num_examples) % num_classes)
    images = np.empty((num_examples, image_size, image_size, channels))
    for index, label in enumerate(labels):
        background = rng.uniform(0.0, 0.4, size=channels)
        canvas = background + rng.normal(0, 0.08, (image_size, image_size, 1))
        side = int(rng.integers(image_size // 2, image_size * 3 // 4 + 1))
        top, left = rng.integers(0, image_size - side + 1, size=2)
        mask = _draw_pattern(int(label), side, rng)[..., None]
        color = rng.uniform(0.6, 1.0, size=channels)
        patch = canvas[top : top + side, left : left + side]
        canvas[top : top + side, left : left + side] = (
            mask * color + (1 - mask) * patch
        )
        images[index] = canvas
    images = np.clip(np.round(images * 255), 0, 255).astype(np.uint8)
    return images, labels.astype(np.int64)


def synthetic(
    num_examples: int = 512,
    image_size: int = 32,
    channels: int = 3,
    num_classes: int = 10,
    seed: int = 0,
    *,
    name: str = "synthetic",
    split: str = "train",
) -> Source:
    """A small deterministic labelled dataset for tests and smoke runs.

    Class k is one of ten shapes (horizontal, vertical and two diagonal
    stripes, checkerboard, disk, ring, plus, X, square frame) drawn in a
    random bright colour on a square patch (1/2 to 3/4 of the side) at a
    random position, over a dark noisy background. Shape, not colour, carries
    the class, so a model must learn it; the same arguments always give the
    same arrays.

    Args:
      num_examples: N, examples in the split.
      image_size: S, image side in pixels (>= 8).
      channels: C, 1 or 3.
      num_classes: 1..10 classes, balanced (N // num_classes each, +1 for
        the first N % num_classes).
      seed: numpy seed of the content; different seeds give different data.
      name: dataset name recorded in the Source.
      split: split name recorded in the Source.

    Returns:
      A Source of (uint8 [S, S, C], int64) pairs.

    Raises:
      ValueError: for arguments outside the ranges above.
    """
    images, labels = synthetic_arrays(
        num_examples, image_size, channels, num_classes, seed
    )
    return from_arrays(
        name,
        split,
        images,
        labels,
        num_classes,
        f"synthetic(seed={seed})",
        SYNTHETIC_CLASSES[:num_classes],
    )


def _open_synthetic(name: str, split: str) -> Source:
    split = _resolve_split(name, split, tuple(_SYNTHETIC_SIZES))
    if split not in _SYNTHETIC_SIZES:
        raise ValueError(
            f'split={split!r}: {name} has splits "train" '
            f'({_SYNTHETIC_SIZES["train"]}) and "test" '
            f"({_SYNTHETIC_SIZES['test']}); use one of them."
        )
    image_size, channels = _SYNTHETIC[name]
    return synthetic(
        _SYNTHETIC_SIZES[split],
        image_size,
        channels,
        10,
        _SYNTHETIC_SEEDS[split],
        name=name,
        split=split,
    )


def _resolve_split(dataset: str, split: str, available: Sequence[str]) -> str:
    """`split`, or for "auto" the first of EVAL_SPLIT_PREFERENCE available.

    Args:
      dataset: the dataset name, for the error message.
      split: a split name, a tfds slice, or "auto".
      available: the dataset's split names; empty when unknown (tfds under
        tfds.testing.mock_data, which serves any split name): then "auto"
        is "validation", the first preference.

    Raises:
      ValueError: "auto" and the dataset has neither split.
    """
    if split != AUTO_SPLIT:
        return split
    if not available:
        logging.warning(
            '%s: split names unknown (tfds mock data?); split="auto" -> '
            '"validation"',
            dataset,
        )
        return EVAL_SPLIT_PREFERENCE[0]
    for name in EVAL_SPLIT_PREFERENCE:
        if name in available:
            return name
    raise ValueError(
        f'split="auto": {dataset} has no "validation" or "test" split, only '
        f"{', '.join(available)}; name one, or hold out a slice such as "
        f"'train[:10%]' for eval (and 'train[10%:]' for training)."
    )


def _open_tfds(
    name: str, split: str, data_dir: str | None, seed: int | None
) -> Source:
    """A Source over a tfds builder: facts from its info, prepared first."""
    other_names = ["fashion_mnist", *_SYNTHETIC]
    builder = tfds_source.builder(name, data_dir, other_names)
    image_shape, class_names = tfds_source.features(name, builder.info)
    tfds_source.prepare(builder)
    split = _resolve_split(name, split, tfds_source.split_names(builder))
    load = tfds_source.loader(builder, split, seed)
    num_examples = tfds_source.num_examples(builder, split, load)
    logging.info(
        "%s %s: %d examples in %s", name, split, num_examples, builder.data_dir
    )
    return Source(
        name=name,
        split=split,
        num_examples=num_examples,
        num_classes=len(class_names),
        image_shape=image_shape,
        origin=f"tfds:{builder.data_dir}",
        class_names=class_names,
        _loader=load,
    )


def open_source(
    dataset: str,
    split: str,
    *,
    data_dir: str | None = None,
    seed: int | None = None,
    verify_images: bool = True,
) -> Source:
    """Opens one split of a dataset by name.

    "folder" reads a directory of images (folder.py: class sub-folders or a
    flat unlabelled folder, split sub-folders); "tfrecord" reads shards
    written by `python -m simclr_tf.tools.make_tfrecords` (tfrecord.py).

    Names: "fashion_mnist" (IDX files from data_dir, else
    /usr/share/datasets/fashion-mnist, else tfds; splits train/test),
    "synthetic" (512 train / 256 test images of 32x32x3) and "synthetic_gray"
    (the same counts at 28x28x1), both with 10 classes, see `synthetic`; any
    other name is a tfds builder with "image" and "label" features, prepared
    with download_and_prepare if data_dir does not hold it yet. A tfds
    dataset's classes, image shape, split names and sizes come from its
    builder info.

    Args:
      dataset: the name, as --dataset.
      split: the split, as --train_split / --eval_split: a name, "auto" (the
        first of "validation", "test" the dataset has), or for tfds a slice
        such as "train[:10%]", "train[10%:]" or "test[:500]"
        (num_examples is then the slice's size).
      data_dir: the folder or shard directory for folder / tfrecord, the
        IDX directory for fashion_mnist, the tfds data_dir otherwise.
      seed: seeds file shuffling; None shuffles differently each run.
      verify_images: folder only: decode every image once when opening, so
        that unreadable files are counted exactly (Source.skipped).

    Returns:
      The Source, with the resolved split name.

    Raises:
      ValueError: an unknown dataset (with close names), a split it does not
        have or an empty slice (with its splits), a dataset without
        image/label features, or a tfds dataset that is not prepared and
        cannot be: it needs a manual download, or the download failed.
    """
    # Imported here: these modules build on Source.
    if dataset == "folder":
        from simclr_tf.data import folder

        return folder.open_folder(
            data_dir, split, seed=seed, verify=verify_images
        )
    if dataset == "tfrecord":
        from simclr_tf.data import tfrecord

        return tfrecord.open_tfrecord(data_dir, split, seed=seed)
    if dataset == "fashion_mnist":
        return _open_fashion_mnist(split, data_dir, seed)
    if dataset in _SYNTHETIC:
        return _open_synthetic(dataset, split)
    return _open_tfds(dataset, split, data_dir, seed)
