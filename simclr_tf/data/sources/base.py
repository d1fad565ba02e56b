"""What every dataset source is: the Source type, in-memory arrays, splits.

A `Source` is one split: its size, classes, image shape and a `Reader`
that yields this host's undecoded records, in a fixed order or in an order
drawn from a stateless seed, decodes them to (uint8 image, int64 label)
pairs, and counts them. Reading and decoding are apart so that a training
pipeline can shuffle and skip cheap records (indices, paths, serialized
examples) and decode only what it keeps. The concrete sources
(fashion_mnist, synthetic, tfds, folder, tfrecord) build on this module;
registry.open_source picks one by name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import tensorflow as tf
from absl import logging

# split="auto" (the eval split) is the first of these the dataset has.
AUTO_SPLIT = "auto"

EVAL_SPLIT_PREFERENCE = ("validation", "test")


class Reader(NamedTuple):
    """How a Source reads one host's share of its split.

    Attributes:
      records: records(input_context, order_seed) -> this host's undecoded
        records (indices, file paths, serialized examples), each example
        once: in a fixed order when order_seed is None, else in the order
        an int32 [2] stateless seed draws (a permutation of the examples,
        or of the files for file-backed sources). Host i of n reads a
        disjoint share; input_context None reads the whole split.
      decode: decode(*record) -> (image [H, W, C] uint8, label [] int64).
      count: count(input_context) -> the number of records that host's
        records() yields.
      decode_may_fail: decoding may meet a file broken after the source
        was opened; such examples are dropped with a logged warning.
    """

    records: Callable[
        [tf.distribute.InputContext | None, tf.Tensor | None], tf.data.Dataset
    ]
    decode: Callable[..., tuple[tf.Tensor, tf.Tensor]]
    count: Callable[[tf.distribute.InputContext | None], int]
    decode_may_fail: bool = False


def host_share(
    input_context: tf.distribute.InputContext | None,
) -> tuple[int, int]:
    """(first index, stride) of a host that takes every n-th item, as
    Dataset.shard does; (0, 1) without an input context."""
    if input_context is None:
        return 0, 1
    return input_context.input_pipeline_id, input_context.num_input_pipelines


def strided_count(
    count: int, input_context: tf.distribute.InputContext | None
) -> int:
    """How many of `count` items a host taking every n-th one gets."""
    first, stride = host_share(input_context)
    return len(range(first, count, stride))


def permute(values: tf.Tensor, order_seed: tf.Tensor | None) -> tf.Tensor:
    """values in a seeded random order along axis 0 (unchanged for None).

    tf.random.experimental.stateless_shuffle: the same seed gives the same
    permutation in any process, eagerly and inside tf.data.
    """
    if order_seed is None:
        return values
    return tf.random.experimental.stateless_shuffle(values, order_seed)


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
    reader: Reader | None = dataclasses.field(
        default=None, repr=False, compare=False
    )

    def skip_counts(self) -> dict[str, int]:
        """reason -> number of files skipped for it."""
        return {
            reason: int(self.skipped_counts.get(reason, len(paths)))
            for reason, paths in self.skipped.items()
        }

    # Plain graph code: tf.data need not rewrite it with autograph (see
    # pipeline._unconverted).
    @tf.autograph.experimental.do_not_convert
    def dataset(
        self,
        input_context: tf.distribute.InputContext | None = None,
        *,
        order_seed: tf.Tensor | None = None,
    ) -> tf.data.Dataset:
        """Unbatched (image, label) pairs, this host's shard only.

        Args:
          input_context: with it, host `input_pipeline_id` of
            `num_input_pipelines` reads a disjoint shard (in-memory sources
            take every n-th example; tfds reads contiguous ranges from
            tfds.even_splits, any number of files); None reads all.
          order_seed: int32 [2]: read in the order this seed draws (see
            Reader.records); None: the fixed order.

        Returns:
          A dataset of (image [H, W, C] uint8, label [] int64).
        """
        return self.decode(self.records(input_context, order_seed))

    def records(
        self,
        input_context: tf.distribute.InputContext | None = None,
        order_seed: tf.Tensor | None = None,
    ) -> tf.data.Dataset:
        """This host's undecoded records (Reader.records)."""
        return self._checked_reader().records(input_context, order_seed)

    def decode(self, records: tf.data.Dataset) -> tf.data.Dataset:
        """records -> (image, label) pairs in the same order.

        Decoding runs in parallel but keeps the order; records whose file
        broke after the source was opened are dropped with a warning.
        """
        reader = self._checked_reader()
        data = records.map(
            reader.decode,
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        if reader.decode_may_fail:
            data = data.ignore_errors(log_warning=True)
        return data

    def host_count(
        self, input_context: tf.distribute.InputContext | None = None
    ) -> int:
        """Examples this host reads in one pass (all, without a context)."""
        return self._checked_reader().count(input_context)

    def _checked_reader(self) -> Reader:
        if self.reader is None:
            raise ValueError(f"Source {self.name!r} has no reader.")
        return self.reader


def array_reader(images: np.ndarray, labels: np.ndarray) -> Reader:
    """A Reader over in-memory arrays; host i of n takes examples i::n.

    Records are example indices, so an order seed permutes every example
    of the host's share, not only a window of them.
    """
    count = len(labels)
    # The arrays become tensors once, on first use: creating them when the
    # source is opened would start TensorFlow before the strategy is made
    # (MultiWorkerMirroredStrategy must configure collectives first).
    tables: list[tf.Tensor] = []

    def records(
        input_context: tf.distribute.InputContext | None,
        order_seed: tf.Tensor | None,
    ) -> tf.data.Dataset:
        first, stride = host_share(input_context)
        indices = tf.range(first, count, stride, dtype=tf.int64)
        return tf.data.Dataset.from_tensor_slices(permute(indices, order_seed))

    def decode(index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        if not tables:
            with tf.init_scope():  # eager tensors, captured by the map
                tables.extend((tf.constant(images), tf.constant(labels)))
        return tf.gather(tables[0], index), tf.gather(tables[1], index)

    return Reader(
        records=records,
        decode=decode,
        count=lambda input_context: strided_count(count, input_context),
    )


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
        reader=array_reader(images, labels.astype(np.int64)),
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
