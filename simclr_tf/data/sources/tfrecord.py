"""Reading image datasets stored as TFRecord shards of encoded images.

The shards and their dataset_info.json are written by
`python -m simclr_tf.tools.make_tfrecords`; this module holds the shared
format (file names, feature keys, version) and `open_tfrecord`, which opens
one split as a `base.Source`. Decoding is decode.py's `decode_rgb`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

import tensorflow as tf
from absl import logging

from simclr_tf import file_io
from simclr_tf.data.sources import base, decode, folder

FORMAT_VERSION = 1
INFO_FILE = "dataset_info.json"
# tf.train.Example features of one image.
ENCODED_KEY = "image/encoded"  # the original file's bytes, not re-encoded
LABEL_KEY = "image/class/label"  # int64, 0-based; -1 when unlabelled
FILENAME_KEY = "image/filename"  # path below the split root, "/"-separated
SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")
_READ_BUFFER_BYTES = 8 << 20  # per open shard
_MAX_OPEN_SHARDS = 16  # fixed, so the interleaved order is the same anywhere
_TOOL = "python -m simclr_tf.tools.make_tfrecords"


def shard_name(split: str, index: int, num_shards: int) -> str:
    """`<split>-00003-of-00016.tfrecord` for shard index 3 of 16."""
    return f"{split}-{index:05d}-of-{num_shards:05d}.tfrecord"


def shard_pattern(split: str) -> re.Pattern:
    """Matches the names of `split`'s shards (any count), nothing else."""
    return re.compile(rf"^{re.escape(split)}-\d{{5}}-of-\d{{5}}\.tfrecord$")


def read_info(data_dir: str) -> dict:
    """The parsed dataset_info.json of a shard directory.

    Raises:
      ValueError: the file is missing (with the command that writes it), is
        not JSON, or has a format version this code does not read.
    """
    path = file_io.join(data_dir, INFO_FILE)
    if not file_io.exists(path):
        where = "" if file_io.isdir(data_dir) else " (no such directory)"
        raise ValueError(
            f"--data_dir={data_dir}{where} has no {INFO_FILE}, so it is not a "
            f"TFRecord dataset. Write one from an image folder with `{_TOOL} "
            f"--input_dir=<image folder> --output_dir={data_dir}`, or use "
            f"--dataset=folder to read the images directly."
        )
    try:
        info = file_io.read_json(path)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} is not valid JSON ({error}); rewrite it with {_TOOL} "
            f"--overwrite."
        ) from None
    version = info.get("format_version") if isinstance(info, dict) else None
    if version != FORMAT_VERSION or not isinstance(info.get("splits"), dict):
        raise ValueError(
            f"{path} has format_version={version!r}; this simclr_tf reads "
            f"version {FORMAT_VERSION}. Rewrite the shards with this "
            f"version's {_TOOL} --overwrite."
        )
    return info


def _resolve_split(data_dir: str, split: str, splits: Mapping) -> str:
    """The split name; "auto" is the first of folder.EVAL_SPLIT_FOLDERS."""
    described = ", ".join(
        f"{name} ({entry['num_examples']})" for name, entry in splits.items()
    )
    if "[" in split or "]" in split:
        raise ValueError(
            f"split={split!r}: --dataset=tfrecord does not slice splits (its "
            f"splits: {described}). Write the slice as its own split, e.g. "
            f"`{_TOOL} --input_dir=<image folder> --output_dir={data_dir} "
            f"--splits=train=train[:90%],validation=train[90%:]`, then name it."
        )
    if split == base.AUTO_SPLIT:
        for name in folder.EVAL_SPLIT_FOLDERS:
            if name in splits:
                return name
    elif split in splits:
        return split
    wanted = "/".join(folder.EVAL_SPLIT_FOLDERS) if split == "auto" else split
    raise ValueError(
        f"split={split!r}: --data_dir={data_dir} has no {wanted} split; its "
        f"splits are {described or 'none'}. Name one of them, or write the "
        f"split with `{_TOOL} --input_dir=<image folder> "
        f"--output_dir={data_dir} --splits={wanted.split('/')[0]}`."
    )


def _shard_paths(
    data_dir: str, split: str, entry: Mapping
) -> tuple[list[str], list[int]]:
    """The split's shard files, sorted, and their example counts; raises
    if any is missing."""
    names = [shard["file"] for shard in entry["shards"]]
    missing = [
        name
        for name in names
        if not file_io.exists(file_io.join(data_dir, name))
    ]
    if missing:
        raise FileNotFoundError(
            f"--data_dir={data_dir} split={split!r}: {len(missing)} of "
            f"{len(names)} shard files listed in {INFO_FILE} are missing: "
            f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}. "
            f"Copy them there, or rewrite the split with {_TOOL} --overwrite."
        )
    shards = sorted(
        (file_io.join(data_dir, shard["file"]), int(shard["num_examples"]))
        for shard in entry["shards"]
    )
    return [path for path, _ in shards], [count for _, count in shards]


def _skipped(entry: Mapping) -> tuple[dict, dict]:
    """(reason -> example paths, reason -> count) from the split's info.

    The writer records each reason's count and up to 10 example paths.
    """
    records = entry.get("skipped", {})
    examples = {r: tuple(record["examples"]) for r, record in records.items()}
    counts = {r: int(record["count"]) for r, record in records.items()}
    return examples, counts


def _parse(record: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    features = tf.io.parse_single_example(
        record,
        {
            ENCODED_KEY: tf.io.FixedLenFeature([], tf.string),
            LABEL_KEY: tf.io.FixedLenFeature([], tf.int64, default_value=-1),
        },
    )
    return decode.decode_rgb(features[ENCODED_KEY]), features[LABEL_KEY]


def _host_files(
    paths: list[str],
    counts: list[int],
    input_context: tf.distribute.InputContext | None,
) -> tuple[list[str], list[int], bool]:
    """(this host's files, their example counts, whether records must be
    sharded instead: every host reads every file and keeps records i::n)."""
    hosts = 1 if input_context is None else input_context.num_input_pipelines
    if hosts == 1:
        return paths, counts, False
    if len(paths) >= hosts:
        first, stride = base.host_share(input_context)
        return paths[first::stride], counts[first::stride], False
    logging.warning(
        "tfrecord: %d shard file(s) for %d hosts, so every host reads all "
        "files and keeps every %d-th record; write at least %d shards "
        "(--num_shards) to read only a host's own files",
        len(paths),
        hosts,
        hosts,
        hosts,
    )
    return paths, counts, True


def _tfrecord_reader(paths: list[str], counts: list[int]) -> base.Reader:
    """A Reader over shard files (records: serialized examples); host i of
    n reads files i::n; an order seed permutes the host's files."""

    def records(
        input_context: tf.distribute.InputContext | None,
        order_seed: tf.Tensor | None,
    ) -> tf.data.Dataset:
        files, _, by_record = _host_files(paths, counts, input_context)
        if by_record:
            # Records are disjoint across hosts only if every host reads
            # the same order, which a per-host seed would not give.
            order_seed = None
        files = base.permute(tf.constant(files), order_seed)
        data = tf.data.Dataset.from_tensor_slices(files).interleave(
            lambda path: tf.data.TFRecordDataset(
                path, buffer_size=_READ_BUFFER_BYTES
            ),
            cycle_length=min(len(paths), _MAX_OPEN_SHARDS),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        if by_record:
            first, stride = base.host_share(input_context)
            data = data.shard(stride, first)
        return data

    def count(input_context: tf.distribute.InputContext | None) -> int:
        _, host_counts, by_record = _host_files(paths, counts, input_context)
        if by_record:
            return base.strided_count(sum(counts), input_context)
        return sum(host_counts)

    return base.Reader(
        records=records,
        decode=_parse,
        count=count,
        # A corrupt record or image is dropped with a logged warning.
        decode_may_fail=True,
    )


def open_tfrecord(data_dir: str | None, split: str) -> base.Source:
    """Opens one split of a TFRecord shard directory as a Source.

    Every fact (example count, classes, files skipped when the shards were
    written) comes from dataset_info.json; nothing is scanned.

    Args:
      data_dir: the directory holding dataset_info.json and the shards, as
        --data_dir; local or any tf.io.gfile path (gs://...).
      split: a split name in dataset_info.json, or "auto": the first of
        validation, val, test it has. Slices are not supported.

    Returns:
      A Source named "tfrecord" yielding (image [H, W, 3] uint8, label []
      int64; -1 when unlabelled), image_shape (None, None, 3). Host i of n
      reads shard files i::n of the sorted list when there are at least n
      files, else every file and records i::n.

    Raises:
      ValueError: data_dir unset, no (readable) dataset_info.json, a split
        it does not have, or a slice.
      FileNotFoundError: shard files listed in dataset_info.json are missing.
    """
    if not data_dir:
        raise ValueError(
            f"--dataset=tfrecord needs --data_dir=... (got {data_dir!r}): the "
            f"directory written by `{_TOOL} --input_dir=<image folder> "
            f"--output_dir=<data_dir>`."
        )
    info = read_info(data_dir)
    name = _resolve_split(data_dir, split, info["splits"])
    entry = info["splits"][name]
    paths, counts = _shard_paths(data_dir, name, entry)
    skipped, skipped_counts = _skipped(entry)
    logging.info(
        "tfrecord %s split %s: %d images in %d shards, %d classes, %d files "
        "skipped when written",
        data_dir,
        name,
        entry["num_examples"],
        len(paths),
        entry["num_classes"],
        sum(skipped_counts.values()),
    )
    return base.Source(
        name="tfrecord",
        split=name,
        num_examples=int(entry["num_examples"]),
        num_classes=int(entry["num_classes"]),
        image_shape=(None, None, 3),
        origin=data_dir,
        class_names=tuple(str(n) for n in entry.get("class_names", ())),
        skipped=skipped,
        skipped_counts=skipped_counts,
        reader=_tfrecord_reader(paths, counts),
    )
