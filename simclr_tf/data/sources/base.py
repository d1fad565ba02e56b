"""What every dataset source is: the Source type, in-memory arrays, splits.

A `Source` is one split: its size, classes, image shape and a loader that
yields unbatched (uint8 image, int64 label) pairs, sharded per host. The
concrete sources (fashion_mnist, synthetic, tfds, folder, tfrecord) build on
this module; registry.open_source picks one by name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import tensorflow as tf
from absl import logging

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


def resolve_split(dataset: str, split: str, available: Sequence[str]) -> str:
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
