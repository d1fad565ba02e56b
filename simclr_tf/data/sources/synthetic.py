"""A small deterministic labelled dataset of drawn shapes, for tests and
smoke runs: "synthetic" (32x32x3) and "synthetic_gray" (28x28x1).
"""

from __future__ import annotations

import numpy as np

from simclr_tf.data.sources import base

# Built-in synthetic datasets: name -> (image side, channels).
DATASETS = {"synthetic": (32, 3), "synthetic_gray": (28, 1)}

_SYNTHETIC_SIZES = {"train": 512, "test": 256}

_SYNTHETIC_SEEDS = {"train": 0, "test": 1}


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
) -> base.Source:
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
    return base.from_arrays(
        name,
        split,
        images,
        labels,
        num_classes,
        f"synthetic(seed={seed})",
        SYNTHETIC_CLASSES[:num_classes],
    )


def open_synthetic(name: str, split: str) -> base.Source:
    split = base.resolve_split(name, split, tuple(_SYNTHETIC_SIZES))
    if split not in _SYNTHETIC_SIZES:
        raise ValueError(
            f'split={split!r}: {name} has splits "train" '
            f'({_SYNTHETIC_SIZES["train"]}) and "test" '
            f"({_SYNTHETIC_SIZES['test']}); use one of them."
        )
    image_size, channels = DATASETS[name]
    return synthetic(
        _SYNTHETIC_SIZES[split],
        image_size,
        channels,
        10,
        _SYNTHETIC_SEEDS[split],
        name=name,
        split=split,
    )
