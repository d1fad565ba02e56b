"""Class-balanced label fractions for semi-supervised fine-tuning.

`label_fraction_source` turns a labelled `source_lib.Source` into one holding a
fixed, seeded fraction of each class (SimCLRv2's 1% / 10% settings on any
dataset). ImageNet's published subsets need no code here: they are the tfds
builder configs "imagenet2012_subset/1pct" and "/10pct" (registry.open_source).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from simclr_tf.data.sources import base as source_lib

# Labels are read in batches of this many: one numpy copy per batch.
_LABEL_BATCH = 4096


def _check_fraction(fraction: float) -> None:
    """Raises ValueError unless 0 < fraction <= 1 (NaN fails too)."""
    valid = isinstance(fraction, (int, float, np.floating, np.integer))
    if not valid or isinstance(fraction, bool) or not 0 < fraction <= 1:
        raise ValueError(
            f"--label_fraction={fraction!r} must be a number in (0, 1]: the "
            f"share of each class's labelled examples to keep; use e.g. "
            f"--label_fraction=0.01 for 1%, 0.1 for 10%, 1 for all labels."
        )


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(
            f"--seed={seed!r} must be an integer >= 0 to pick the "
            f"--label_fraction subset; pass e.g. --seed=0."
        )
    if seed < 0:
        raise ValueError(
            f"--seed={seed} must be >= 0 to pick the --label_fraction "
            f"subset (numpy seeds are non-negative); pass e.g. --seed=0."
        )


def _check_labels(labels: np.ndarray, num_classes: int) -> None:
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels {labels.shape} {labels.dtype} must be a [N] integer "
            f"array for --label_fraction."
        )
    if labels.size and not 0 <= labels.min() <= labels.max() < num_classes:
        raise ValueError(
            f"--label_fraction needs labels in [0, {num_classes}); these "
            f"range over [{labels.min()}, {labels.max()}] (-1 marks an "
            f"unlabelled dataset). Use a labelled dataset, or drop "
            f"--label_fraction."
        )


def class_balanced_indices(
    labels: np.ndarray | Sequence[int],
    fraction: float,
    num_classes: int,
    seed: int,
) -> np.ndarray:
    """Indices of a seeded, class-balanced fraction of labelled examples.

    Class c with n_c > 0 examples keeps max(1, round(fraction * n_c)) of
    them (Python's round: halves go to the even integer), so per-class
    counts are proportional to class sizes and every present class keeps at
    least one example; 1% of Fashion-MNIST's train split (6000 a class) is
    60 a class. Class c's examples are chosen by a numpy permutation seeded
    with (seed, c): the same seed always picks the same examples, another
    seed others, and one class's choice does not depend on other classes.

    Args:
      labels: [N] integer labels in [0, num_classes).
      fraction: share of each class to keep, in (0, 1]; 1 keeps all.
      num_classes: number of classes.
      seed: integer >= 0.

    Returns:
      Sorted int64 indices into `labels`.

    Raises:
      ValueError: fraction outside (0, 1], a negative or non-integer seed,
        or labels that are not [N] integers in [0, num_classes).
    """
    _check_fraction(fraction)
    _check_seed(seed)
    labels = np.asarray(labels)
    _check_labels(labels, num_classes)
    if fraction == 1:
        return np.arange(len(labels), dtype=np.int64)
    chosen = []
    for label in range(num_classes):
        members = np.flatnonzero(labels == label)
        if members.size == 0:
            continue
        keep = min(members.size, max(1, round(fraction * members.size)))
        order = np.random.default_rng((int(seed), label)).permutation(
            members.size
        )
        chosen.append(members[order[:keep]])
    if not chosen:
        return np.zeros([0], np.int64)
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def read_labels(source: source_lib.Source) -> np.ndarray:
    """All labels of `source`, in its fixed (unshuffled) order.

    One pass over `source.dataset()`; images are still read and decoded, so
    this costs one epoch of input pipeline (seconds for in-memory data).

    Returns:
      [N] int64 labels.
    """
    data = source.dataset().map(lambda image, label: label)
    batches = list(data.batch(_LABEL_BATCH).as_numpy_iterator())
    if not batches:
        return np.zeros([0], np.int64)
    return np.concatenate(batches).astype(np.int64)


def _subset_reader(
    source: source_lib.Source, indices: np.ndarray, num_read: int
) -> source_lib.Reader:
    """A Reader yielding source examples at `indices`, in index order.

    Host i of n keeps subset positions i::n (as the array sources shard).
    Every host reads the whole source's records in their fixed order and
    filters them, so no order seed applies here (pipeline.py's shuffle
    buffer mixes the examples).
    """

    def records(
        input_context: tf.distribute.InputContext | None,
        order_seed: tf.Tensor | None,
    ) -> tf.data.Dataset:
        # The order must be the one the labels were read in.
        del order_seed
        first, stride = source_lib.host_share(input_context)
        keep = np.zeros([num_read], bool)
        keep[indices[first::stride]] = True
        keep = tf.constant(keep)
        stop = int(indices[-1]) + 1 if indices.size else 0
        data = source.records().take(stop).enumerate()
        data = data.filter(lambda index, record: tf.gather(keep, index))
        return data.map(lambda index, record: record)

    return source_lib.Reader(
        records=records,
        decode=source.reader.decode,
        count=lambda context: source_lib.strided_count(indices.size, context),
        decode_may_fail=source.reader.decode_may_fail,
    )


def label_fraction_source(
    source: source_lib.Source, fraction: float, seed: int | None
) -> source_lib.Source:
    """`source` reduced to a class-balanced fraction of its examples.

    Reads the labels once (`read_labels`), picks examples with
    `class_balanced_indices`, and returns a Source that yields exactly those
    examples in their original order. With an input context, host i of n
    yields subset examples i::n: disjoint, covering, sizes differing by at
    most one. Each host reads the full source in its fixed order (its
    shuffle_files is ignored) and drops the rest, so an epoch of the subset
    costs a pass over the source up to the last selected example; for
    ImageNet use the tfds configs "imagenet2012_subset/1pct" / "/10pct".

    Args:
      source: a labelled Source (labels in [0, num_classes)).
      fraction: share of each class to keep, in (0, 1], as --label_fraction.
      seed: picks the examples, as --seed; None means 0, because a label
        fraction must be the same in every run for results to compare.

    Returns:
      A Source with split "<split>(label_fraction=<f>,seed=<s>)" and
      num_examples the subset size; other facts as in `source`.

    Raises:
      ValueError: fraction outside (0, 1], a negative seed, or a source
        without labels.
    """
    _check_fraction(fraction)
    seed = 0 if seed is None else seed
    _check_seed(seed)
    if source.num_classes < 1:
        raise ValueError(
            f"--label_fraction={fraction!r} needs labels, but dataset "
            f"{source.name!r} split {source.split!r} is unlabelled "
            f"(num_classes=0); use a labelled dataset or drop it."
        )
    labels = read_labels(source)
    indices = class_balanced_indices(labels, fraction, source.num_classes, seed)
    return dataclasses.replace(
        source,
        split=f"{source.split}(label_fraction={fraction:g},seed={seed})",
        num_examples=int(indices.size),
        reader=_subset_reader(source, indices, len(labels)),
    )
