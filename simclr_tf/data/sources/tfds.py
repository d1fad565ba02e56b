"""Reading tfds image classification datasets: lookup, preparation, splits.

Every per-dataset fact (classes, image shape, split names and sizes) comes
from the tfds builder's info; `open_tfds` turns these pieces into a
`base.Source`. This module knows nothing of fashion_mnist IDX files or
synthetic data.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from simclr_tf.data.sources import base

# Errors a failed download raises: requests' ConnectionError and Timeout are
# OSErrors; tfds raises DownloadError for HTTP errors.
_DOWNLOAD_ERRORS = (OSError, tfds.download.DownloadError)


def builder(
    name: str, data_dir: str | None, other_names: Sequence[str] = ()
) -> tfds.core.DatasetBuilder:
    """The tfds builder for `name` ("cifar10", "imagenet2012/5.1.0", ...).

    Args:
      name: a tfds name, as --dataset.
      data_dir: tfds data_dir; None is tfds's default (~/tensorflow_datasets
        or $TFDS_DATA_DIR).
      other_names: names simclr_tf opens without tfds, offered in the error.

    Returns:
      The builder (not necessarily prepared).

    Raises:
      ValueError: tfds has no dataset of that name; the message suggests
        close names.
    """
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        known = tfds.list_builders(with_community_datasets=False)
        close = difflib.get_close_matches(name, [*other_names, *known], n=3)
        raise ValueError(
            f"--dataset={name!r} is not a known dataset. Use "
            f"{', '.join(other_names)} or a tfds image classification "
            f"dataset (tfds.list_builders())"
            + (f"; did you mean {', '.join(close)}?" if close else ".")
        ) from None


def features(
    name: str, info: tfds.core.DatasetInfo
) -> tuple[tuple[int | None, ...], tuple[str, ...]]:
    """(image shape, class names) from the builder's features.

    A ClassLabel defined by its number of classes alone names them "0",
    "1", ...; those names are kept (they are what tfds shows).

    Raises:
      ValueError: no tfds Image feature "image" or ClassLabel "label".
    """
    found = info.features
    image = found["image"] if "image" in found else None
    label = found["label"] if "label" in found else None
    if not isinstance(image, tfds.features.Image) or not isinstance(
        label, tfds.features.ClassLabel
    ):
        raise ValueError(
            f"--dataset={name!r} has features {list(found)}; simclr_tf needs "
            f"an 'image' Image and an integer 'label' ClassLabel feature "
            f"(image classification); pick such a dataset."
        )
    return tuple(image.shape), tuple(str(name_) for name_ in label.names)


def prepare(builder_: tfds.core.DatasetBuilder) -> None:
    """Runs tfds download_and_prepare if the data is not prepared yet.

    Args:
      builder_: the builder.

    Raises:
      ValueError: the dataset needs a manual download (e.g. imagenet2012),
        or the download failed (network, proxy, checksum).
    """
    if builder_.is_prepared():
        return
    name, root = builder_.name, builder_.data_dir_root
    logging.warning(
        "%s is not prepared in %s; running tfds download_and_prepare "
        "(this may download the dataset)",
        name,
        root,
    )
    try:
        builder_.download_and_prepare()
    except AssertionError as error:  # tfds's "Manual directory ... empty"
        if "manual" not in str(error).lower():
            raise
        manual_dir = f"{root}/downloads/manual"
        needs = " ".join(str(builder_.MANUAL_DOWNLOAD_INSTRUCTIONS).split())
        raise ValueError(
            f"--dataset={name!r} is not prepared in --data_dir={root} and "
            f"tfds cannot download it: it needs a manual download ({needs}). "
            f"Put the files in {manual_dir} and run `tfds build {name} "
            f"--data_dir={root} --manual_dir={manual_dir}`, or point "
            f"--data_dir at a directory holding a prepared copy."
        ) from error
    except _DOWNLOAD_ERRORS as error:
        cause = str(error).strip().splitlines()[0] if str(error) else ""
        raise ValueError(
            f"--dataset={name!r} is not prepared in --data_dir={root} and "
            f"downloading it failed ({type(error).__name__}: {cause}). Check "
            f"the network or proxy, or prepare it elsewhere with `tfds build "
            f"{name} --data_dir=DIR` and point --data_dir at DIR."
        ) from error


def split_names(builder_: tfds.core.DatasetBuilder) -> tuple[str, ...]:
    """The prepared split names; empty when unknown (under tfds mock_data)."""
    return tuple(builder_.info.splits)


def _describe_splits(builder_: tfds.core.DatasetBuilder) -> str:
    return ", ".join(
        f"{name} ({info.num_examples})"
        for name, info in builder_.info.splits.items()
    )


def num_examples(
    builder_: tfds.core.DatasetBuilder, split: str, read: base.Reader
) -> int:
    """Examples in `split`, a split name or a slice such as "train[:10%]".

    From the builder's split info, which tfds resolves for slices too; when
    the info has no splits (only under tfds.testing.mock_data, whose data
    ignores the split), one pass of the reader's records is counted.

    Raises:
      ValueError: the split (or the split a slice names) does not exist, the
        slice does not parse, or it selects no examples.
    """
    if split_names(builder_):
        try:
            count = int(builder_.info.splits[split].num_examples)
        except (KeyError, ValueError) as error:
            cause = str(error).strip().splitlines()[0].rstrip(".")
            raise ValueError(
                f"split={split!r}: {builder_.name} has splits "
                f"{_describe_splits(builder_)}; use one of them or a slice "
                f"such as 'train[:10%]' or 'test[:500]' ({cause})."
            ) from None
    else:
        count = read.count(None)
    if count == 0:
        raise ValueError(
            f"split={split!r} of {builder_.name} selects no examples; widen "
            f"the slice (splits: {_describe_splits(builder_) or 'unknown'})."
        )
    return count


def _host_split(split: str, input_context: tf.distribute.InputContext | None):
    """This host's part of `split`: all of it, or with n > 1 pipelines
    host i's `tfds.even_splits(split, n)[i]`: contiguous, disjoint example
    ranges of equal size (+-1) covering the split, whatever the number of
    files. (tfds's per-file sharding through ReadConfig(input_context=...)
    fails with fewer files than hosts, e.g. cifar10's single train file,
    and gives unequal shards otherwise.)"""
    if input_context is None or input_context.num_input_pipelines == 1:
        return split
    shards = tfds.even_splits(split, n=input_context.num_input_pipelines)
    return shards[input_context.input_pipeline_id]


def _file_instructions(
    builder_: tfds.core.DatasetBuilder, read_split: object
) -> list | None:
    """(file, skip, take) of each file part of read_split, or None where
    tfds must read it itself: under mock_data (no split info) or for a
    file format other than TFRecord."""
    if not split_names(builder_):
        return None
    if builder_.info.file_format != tfds.core.FileFormat.TFRECORD:
        return None
    return list(builder_.info.splits[read_split].file_instructions)


def reader(builder_: tfds.core.DatasetBuilder, split: str) -> base.Reader:
    """A Reader over `split` of a prepared builder.

    Records are the serialized examples of the split's TFRecord files, read
    file part by file part as tfds's file instructions say (tfds's own
    as_dataset reads them the same way); an order seed permutes those parts
    and interleaves 16 of them, as tfds's shuffle_files does, but from a
    stateless seed, so that an epoch's order is a function of the seed.
    Under tfds.testing.mock_data (and for other file formats) tfds reads
    in its fixed order and the split is ignored by the mock.
    """
    features_ = builder_.info.features

    def records(
        input_context: tf.distribute.InputContext | None,
        order_seed: tf.Tensor | None,
    ) -> tf.data.Dataset:
        read_split = _host_split(split, input_context)
        parts = _file_instructions(builder_, read_split)
        if parts is None:
            return builder_.as_dataset(split=read_split, shuffle_files=False)
        order = base.permute(tf.range(len(parts)), order_seed)
        columns = (
            tf.constant([part.filename for part in parts], tf.string),
            tf.constant([part.skip for part in parts], tf.int64),
            tf.constant([part.take for part in parts], tf.int64),
        )
        table = tf.data.Dataset.from_tensor_slices(
            tuple(tf.gather(column, order) for column in columns)
        )
        return table.interleave(
            lambda path, skip, take: (
                tf.data.TFRecordDataset(path).skip(skip).take(take)
            ),
            cycle_length=1 if order_seed is None else min(len(parts), 16),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )

    def decode(record: tf.Tensor | dict) -> tuple[tf.Tensor, tf.Tensor]:
        example = record
        if not isinstance(record, dict):
            example = features_.deserialize_example(record)
        return example["image"], tf.cast(example["label"], tf.int64)

    def count(input_context: tf.distribute.InputContext | None) -> int:
        read_split = _host_split(split, input_context)
        if split_names(builder_):
            return int(builder_.info.splits[read_split].num_examples)
        data = records(input_context, None)  # mock data: count one pass
        return int(data.reduce(np.int64(0), lambda n, _: n + 1))

    return base.Reader(records=records, decode=decode, count=count)


def open_tfds(name: str, split: str, data_dir: str | None) -> base.Source:
    """A Source over a tfds builder: facts from its info, prepared first."""
    other_names = ["fashion_mnist", "synthetic", "synthetic_gray"]
    builder_ = builder(name, data_dir, other_names)
    image_shape, class_names = features(name, builder_.info)
    prepare(builder_)
    split = base.resolve_split(name, split, split_names(builder_))
    read = reader(builder_, split)
    count = num_examples(builder_, split, read)
    logging.info(
        "%s %s: %d examples in %s", name, split, count, builder_.data_dir
    )
    return base.Source(
        name=name,
        split=split,
        num_examples=count,
        num_classes=len(class_names),
        image_shape=image_shape,
        origin=f"tfds:{builder_.data_dir}",
        class_names=class_names,
        reader=read,
    )
