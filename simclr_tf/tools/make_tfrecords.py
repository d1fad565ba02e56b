"""Writes an image folder as TFRecord shards of encoded images.

`python -m simclr_tf.tools.make_tfrecords --input_dir=PATH --output_dir=OUT`
lists each split with folder.list_folder (unreadable files are skipped and
counted), writes `<split>-00000-of-000NN.tfrecord` shards of the original
file bytes and records every split in OUT/dataset_info.json, which
data/tfrecord.py reads. The writing functions take plain arguments; flags are
defined and parsed only when this module runs as a program.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow as tf
from absl import app, flags, logging

from simclr_tf import file_io
from simclr_tf.data.sources import folder, tfrecord

_MAX_EXAMPLE_PATHS = 10  # skipped paths recorded per reason


def _example(data: bytes, label: int, filename: str) -> tf.train.Example:
    feature = tf.train.Feature
    return tf.train.Example(
        features=tf.train.Features(
            feature={
                tfrecord.ENCODED_KEY: feature(
                    bytes_list=tf.train.BytesList(value=[data])
                ),
                tfrecord.LABEL_KEY: feature(
                    int64_list=tf.train.Int64List(value=[label])
                ),
                tfrecord.FILENAME_KEY: feature(
                    bytes_list=tf.train.BytesList(value=[filename.encode()])
                ),
            }
        )
    )


def _write_shard(
    items: Sequence[tuple[str, int]], root: str, path: str
) -> tuple[int, list[str]]:
    """Writes one shard under a temporary name, then renames it to `path`.

    An interrupted write leaves only `<path>.tmp`, which no reader or shard
    pattern matches. A file that can no longer be read (removed or made
    unreadable after listing) is left out and returned.

    Returns:
      (examples written, paths that could not be read).
    """
    temporary, unreadable, written = path + ".tmp", [], 0
    try:
        with tf.io.TFRecordWriter(temporary) as writer:
            for file_path, label in items:
                try:
                    data = file_io.read_bytes(file_path)
                except (OSError, tf.errors.OpError) as error:
                    logging.warning("cannot read %s: %s", file_path, error)
                    unreadable.append(file_path)
                    continue
                relative = file_io.relative(file_path, root)
                writer.write(
                    _example(data, int(label), relative).SerializeToString()
                )
                written += 1
        file_io.rename(temporary, path)
    finally:
        if file_io.exists(temporary):
            file_io.remove(temporary)
    return written, unreadable


def existing_shards(output_dir: str, split: str) -> list[str]:
    """Names of `split`'s shard files (and leftover .tmp) in output_dir."""
    if not file_io.isdir(output_dir):
        return []
    pattern = tfrecord.shard_pattern(split)
    return sorted(
        name
        for name in file_io.listdir(output_dir)
        if pattern.match(name.removesuffix(".tmp"))
    )


def check_output(output_dir: str, split: str, overwrite: bool) -> None:
    """Raises unless output_dir can take `split`'s shards.

    Raises:
      ValueError: shards of the split exist and overwrite is False.
    """
    found = existing_shards(output_dir, split)
    if found and not overwrite:
        raise ValueError(
            f"--output_dir={output_dir} already holds {len(found)} shard "
            f"file(s) of split {split!r} (e.g. {found[0]}). Pass --overwrite "
            f"to replace them, or choose another --output_dir."
        )


def _skipped_record(skipped: Mapping[str, Sequence[str]]) -> dict:
    return {
        reason: {
            "count": len(paths),
            "examples": list(paths[:_MAX_EXAMPLE_PATHS]),
        }
        for reason, paths in skipped.items()
        if paths
    }


def _log_progress(
    split: str, done: int, total: int, shards: int, count: int, start: float
) -> None:
    elapsed = max(time.monotonic() - start, 1e-9)
    rate = done / elapsed
    eta = (total - done) / max(rate, 1e-9)
    logging.info(
        "%s: %d/%d files in %d/%d shards (%.0f files/s, eta %s)",
        split,
        done,
        total,
        shards,
        count,
        rate,
        datetime.timedelta(seconds=round(eta)),
    )


def write_split(
    listing: folder.FolderListing,
    output_dir: str,
    num_shards: int,
    *,
    split_name: str | None = None,
    num_workers: int = 1,
    overwrite: bool = False,
) -> dict:
    """Writes one listed split as shards; returns its dataset_info entry.

    Examples go to shards in the listing's (class-mixed) order: shard k
    holds a contiguous run, sizes differing by at most one. Does not touch
    dataset_info.json (see `update_info`).

    Args:
      listing: the split, from folder.list_folder.
      output_dir: the shard directory (created if absent; gfile paths work).
      num_shards: shard count, >= 1; capped at the number of images.
      split_name: the name to write under; defaults to the listing's split
        (for "auto", its folder's name). Required for slices.
      num_workers: shards written in parallel (threads).
      overwrite: replace existing shards of this split.

    Returns:
      The split's entry: num_examples, num_shards, shards ([{file,
      num_examples}]), class_names, num_classes, skipped ({reason: {count,
      examples}}), source and source_split.

    Raises:
      ValueError: num_shards < 1, a bad or missing split_name, or shards of
        the split exist and overwrite is False.
    """
    name = _split_name(listing, split_name)
    if num_shards < 1:
        raise ValueError(f"--num_shards={num_shards} must be >= 1.")
    check_output(output_dir, name, overwrite)
    for old in existing_shards(output_dir, name):
        file_io.remove(file_io.join(output_dir, old))
    file_io.makedirs(output_dir)
    items = list(zip(listing.paths, listing.labels.tolist(), strict=True))
    count = min(num_shards, len(items))
    parts = np.array_split(np.arange(len(items)), count)
    files = [tfrecord.shard_name(name, k, count) for k in range(count)]
    written, unreadable, done = [0] * count, [], 0
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
        futures = {
            pool.submit(
                _write_shard,
                [items[i] for i in part],
                listing.root,
                file_io.join(output_dir, file),
            ): k
            for k, (part, file) in enumerate(zip(parts, files, strict=True))
        }
        for finished, future in enumerate(
            concurrent.futures.as_completed(futures), 1
        ):
            written[futures[future]], failed = future.result()
            unreadable.extend(failed)
            done += len(parts[futures[future]])
            _log_progress(name, done, len(items), finished, count, start)
    skipped = {reason: list(paths) for reason, paths in listing.skipped.items()}
    if unreadable:
        skipped["unreadable"] = sorted(unreadable)
    return {
        "num_examples": sum(written),
        "num_shards": count,
        "shards": [
            {"file": file, "num_examples": n}
            for file, n in zip(files, written, strict=True)
        ],
        "class_names": list(listing.class_names),
        "num_classes": listing.num_classes,
        "skipped": _skipped_record(skipped),
        "source": listing.root,
        "source_split": listing.split,
    }


def _split_name(listing: folder.FolderListing, split_name: str | None) -> str:
    name = split_name
    if name is None and "[" not in listing.split:
        auto = listing.split == "auto"
        name = file_io.basename(listing.root) if auto else listing.split
    if name is None or not tfrecord.SPLIT_NAME.match(name):
        raise ValueError(
            f"split name {name!r} for split {listing.split!r}: name the "
            f"written split with letters, digits and _, e.g. "
            f"--splits=train=train[:90%],validation=train[90%:]."
        )
    return name


def update_info(output_dir: str, entries: Mapping[str, dict]) -> str:
    """Adds or replaces splits in output_dir/dataset_info.json, atomically.

    Splits already recorded and not in `entries` are kept.

    Returns:
      The path of dataset_info.json.
    """
    path = file_io.join(output_dir, tfrecord.INFO_FILE)
    info = {"splits": {}}
    if file_io.exists(path):
        info = tfrecord.read_info(output_dir)
    info["splits"].update(entries)
    info.update(
        format_version=tfrecord.FORMAT_VERSION,
        writer="simclr_tf.tools.make_tfrecords",
        features={
            tfrecord.ENCODED_KEY: "bytes: the image file, not re-encoded",
            tfrecord.LABEL_KEY: "int64: class index, 0-based; -1 unlabelled",
            tfrecord.FILENAME_KEY: "bytes: path below the split's folder",
        },
    )
    return file_io.write_json(path, info)


def parse_splits(text: str, input_dir: str) -> list[tuple[str, str]]:
    """(name, folder split) pairs from --splits.

    Args:
      text: comma-separated entries, each a folder split ("train", "val",
        "auto") written under its own name, or NAME=SPLIT such as
        "validation=train[90%:]". Empty: "train" plus each of
        folder.EVAL_SPLIT_FOLDERS that is a sub-folder of input_dir.
      input_dir: the image folder.

    Returns:
      The pairs; a name is None where write_split derives it.

    Raises:
      ValueError: an empty entry or a name used twice.
    """
    if not text.strip():
        present = [
            name
            for name in folder.EVAL_SPLIT_FOLDERS
            if file_io.isdir(file_io.join(input_dir, name))
        ]
        return [("train", "train")] + [(name, name) for name in present]
    pairs = []
    for entry in text.split(","):
        name, _, spec = entry.strip().rpartition("=")
        if not spec:
            raise ValueError(f"--splits={text!r} has an empty entry.")
        pairs.append((name or None, spec))
    names = [name or spec for name, spec in pairs]
    if len(set(names)) != len(names):
        raise ValueError(f"--splits={text!r} names a split twice.")
    return pairs


def shard_count(
    listing: folder.FolderListing, num_shards: int, shard_size_mb: float
) -> int:
    """num_shards if > 0, else enough shards of ~shard_size_mb each."""
    if num_shards > 0:
        return num_shards
    if shard_size_mb <= 0:
        raise ValueError(
            f"--shard_size_mb={shard_size_mb} must be > 0 when --num_shards "
            f"is not given; e.g. 128."
        )
    total = sum(file_io.size(path) for path in listing.paths)
    return max(1, math.ceil(total / (shard_size_mb * 2**20)))


def _check_dirs(input_dir: str, output_dir: str) -> None:
    if not input_dir or not file_io.isdir(input_dir):
        raise FileNotFoundError(
            f"--input_dir={input_dir!r} is not a directory; pass the image "
            f"folder (class sub-folders, or train/ and val/ split folders)."
        )
    if not output_dir:
        raise ValueError("--output_dir is required: where to write shards.")
    if _is_inside(output_dir, input_dir):
        raise ValueError(
            f"--output_dir={output_dir} is inside --input_dir={input_dir}, "
            f"where it would be read as a class or split folder; write the "
            f"shards outside it."
        )


def _is_inside(path: str, directory: str) -> bool:
    """Whether path is directory or below it (local: symbolic links
    resolved; gs:// and other schemes: by prefix)."""
    if file_io.is_remote(path) or file_io.is_remote(directory):
        inside, outside = path.rstrip("/") + "/", directory.rstrip("/") + "/"
    else:
        inside = os.path.realpath(path) + os.sep
        outside = os.path.realpath(directory) + os.sep
    return inside.startswith(outside)


def make_tfrecords(
    input_dir: str,
    output_dir: str,
    splits: str = "",
    *,
    num_shards: int = 0,
    shard_size_mb: float = 128.0,
    num_workers: int = 4,
    overwrite: bool = False,
) -> dict[str, dict]:
    """Lists and writes every requested split; updates dataset_info.json.

    Args:
      input_dir: the image folder (as --data_dir for --dataset=folder).
      output_dir: the shard directory.
      splits: as --splits (see `parse_splits`).
      num_shards: shards per split; 0 sizes them by shard_size_mb.
      shard_size_mb: target shard size in MiB when num_shards is 0.
      num_workers: shards written in parallel.
      overwrite: replace shards of the same split names.

    Returns:
      split name -> its dataset_info entry.

    Raises:
      FileNotFoundError: input_dir is not a directory.
      ValueError: a bad --splits, existing shards without overwrite, or a
        split the folder does not have or that holds no readable image.
    """
    _check_dirs(input_dir, output_dir)
    pairs = parse_splits(splits, input_dir)
    for name, _ in pairs:  # before the slow listing
        if name is not None:
            check_output(output_dir, name, overwrite)
    entries = {}
    for name, spec in pairs:
        listing = folder.list_folder(input_dir, spec, verify=True)
        count = shard_count(listing, num_shards, shard_size_mb)
        entry = write_split(
            listing,
            output_dir,
            count,
            split_name=name,
            num_workers=num_workers,
            overwrite=overwrite,
        )
        entries[_split_name(listing, name)] = entry
        update_info(output_dir, entries)
    return entries


def _define_flags() -> None:
    flags.DEFINE_string("input_dir", None, "Image folder to convert.")
    flags.DEFINE_string("output_dir", None, "Directory for the shards.")
    flags.DEFINE_string(
        "splits",
        "",
        "Comma-separated splits: folder splits (train, val, auto) or "
        "NAME=SPLIT (validation=train[90%:]). Default: train and each of "
        "validation/, val/, test/ present.",
    )
    flags.DEFINE_integer("num_shards", 0, "Shards per split; 0: by size.")
    flags.DEFINE_float("shard_size_mb", 128.0, "Target shard size (MiB).")
    flags.DEFINE_integer("num_workers", 4, "Shards written in parallel.")
    flags.DEFINE_bool("overwrite", False, "Replace shards of the splits.")


def main(argv: Sequence[str]) -> None:
    """Entry point: flags -> make_tfrecords; user errors exit with a message."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {list(argv[1:])}.")
    values = flags.FLAGS
    try:
        entries = make_tfrecords(
            values.input_dir,
            values.output_dir,
            values.splits,
            num_shards=values.num_shards,
            shard_size_mb=values.shard_size_mb,
            num_workers=values.num_workers,
            overwrite=values.overwrite,
        )
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"make_tfrecords: {error}")
    for name, entry in entries.items():
        logging.info(
            "%s: %d images in %d shards, %d skipped",
            name,
            entry["num_examples"],
            entry["num_shards"],
            sum(record["count"] for record in entry["skipped"].values()),
        )


if __name__ == "__main__":
    _define_flags()
    app.run(main)
