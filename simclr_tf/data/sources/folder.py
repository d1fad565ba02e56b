"""Image-folder datasets: list a directory of images, open it as a Source.

`list_folder` resolves a split to a directory, finds the images and their
labels and checks that they decode; `open_folder` wraps that listing in a
`base.Source`. Decoding itself lives in decode.py.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import re
from collections.abc import Mapping

import numpy as np
import tensorflow as tf
from absl import logging

from simclr_tf import file_io
from simclr_tf.data.sources import base, decode

# Candidate images, by lower-cased extension; the format is then read from
# the bytes, so a PNG named .jpg is kept.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
# Why a file was left out, in the order they are checked.
SKIP_REASONS = (
    "outside_class_folder",  # a file next to the class folders
    "unsupported_extension",  # not one of IMAGE_EXTENSIONS
    "empty",  # an image extension, zero bytes
    "undecodable",  # an image extension, does not decode (decode_rgb)
)
EVAL_SPLIT_FOLDERS = ("validation", "val", "test")  # tried by split="auto"
_MAX_EXAMPLES_LOGGED = 10
_SLICE = re.compile(
    r"^(?P<name>[^\[\]]+)\[(?P<start>[^:\]]*):(?P<stop>[^\]]*)\]$"
)
_BOUND = re.compile(r"^-?\d+%?$")


@dataclasses.dataclass(frozen=True, eq=False)  # labels is an array
class FolderListing:
    """The images of one split of an image folder.

    Attributes:
      root: the split's directory.
      split: the split as asked for, e.g. "train[:90%]".
      paths: the kept images, in the listing order (see `list_folder`).
      labels: [len(paths)] int64 class indices; all -1 when unlabelled.
      class_names: sorted class-folder names (label k is class_names[k]);
        empty for a flat, unlabelled folder.
      skipped: reason (one of SKIP_REASONS) -> sorted paths left out.
    """

    root: str
    split: str
    paths: tuple[str, ...]
    labels: np.ndarray
    class_names: tuple[str, ...]
    skipped: Mapping[str, tuple[str, ...]]

    @property
    def num_classes(self) -> int:
        """0 for an unlabelled folder."""
        return len(self.class_names)


def _visible(names: list[str]) -> list[str]:
    """Sorted names without hidden ones (.DS_Store, .ipynb_checkpoints)."""
    return sorted(name for name in names if not name.startswith("."))


def _subfolders(directory: str) -> list[str]:
    return [
        name
        for name in _visible(file_io.listdir(directory))
        if file_io.isdir(file_io.join(directory, name))
    ]


def _resolve_root(data_dir: str, name: str, split: str) -> str:
    """The directory holding split `name` (the part before any slice)."""
    present = _subfolders(data_dir)
    if name == "auto":
        for candidate in EVAL_SPLIT_FOLDERS:
            if candidate in present:
                return file_io.join(data_dir, candidate)
    elif name in present:
        return file_io.join(data_dir, name)
    elif name == "train":
        clash = [f for f in EVAL_SPLIT_FOLDERS if f in present]
        if clash:
            logging.warning(
                "--data_dir=%s has no train/ folder, so it is the train split "
                "itself and %s are read as class folders; if they are splits, "
                "move the training classes into %s",
                data_dir,
                clash,
                file_io.join(data_dir, "train"),
            )
        return data_dir
    wanted = "/".join(EVAL_SPLIT_FOLDERS) if name == "auto" else name
    raise ValueError(
        f"split={split!r}: --data_dir={data_dir} has no {wanted}/ sub-folder "
        f"(its sub-folders: {present or 'none'}). Put the split's images in "
        f"{file_io.join(data_dir, name if name != 'auto' else 'val')}/, name "
        f"an existing sub-folder as the split, or slice one folder, e.g. "
        f"'train[:90%]' and 'train[90%:]'."
    )


def _walk_files(directory: str) -> list[str]:
    """All visible files below `directory`, recursively, sorted by path.

    Local symbolic links to folders are followed (as gfile's isdir does).
    """
    found = []
    for parent, folders, files in file_io.walk(directory):
        folders[:] = _visible(folders)  # prune hidden folders in place
        found.extend(file_io.join(parent, name) for name in _visible(files))
    return sorted(found)


def _list_candidates(
    root: str,
) -> tuple[list[tuple[str, int]], tuple[str, ...], dict[str, list[str]]]:
    """(path, label) of image-extension files, class names, skipped files."""
    skipped = collections.defaultdict(list)
    class_names = tuple(_subfolders(root))
    if class_names:
        groups = [
            (_walk_files(file_io.join(root, name)), label)
            for label, name in enumerate(class_names)
        ]
        for name in _visible(file_io.listdir(root)):
            if name not in class_names:
                skipped["outside_class_folder"].append(file_io.join(root, name))
    else:
        groups = [(_walk_files(root), -1)]
    candidates = []
    for paths, label in groups:
        for path in paths:
            if _extension(path) in IMAGE_EXTENSIONS:
                candidates.append((path, label))
            else:
                skipped["unsupported_extension"].append(path)
    return candidates, class_names, skipped


def _extension(path: str) -> str:
    """The lower-cased extension of path's last part, e.g. ".png"."""
    name = file_io.basename(path)
    dot = name.rfind(".")
    return name[dot:].lower() if dot > 0 else ""


def _order_key(root: str, path: str) -> str:
    """A fixed pseudo-random position: SHA-1 of the path below the root.

    Sorting by it (not by name) mixes the classes, so a slice such as
    train[90%:] holds about 10% of every class, and it does not depend on
    where the folder is mounted or on the platform's path separator.
    """
    relative = file_io.relative(path, root)
    return hashlib.sha1(relative.encode("utf-8")).hexdigest()


def _bound(text: str, count: int, split: str) -> int | None:
    """One slice bound: '' -> None, 'k' -> k, 'k%' -> round(k% of count)."""
    if not text:
        return None
    if not _BOUND.match(text):
        raise ValueError(
            f"split={split!r}: slice bound {text!r} must be an integer or a "
            f"percentage, e.g. 'train[:90%]', 'train[90%:]', 'train[100:200]'."
        )
    if not text.endswith("%"):
        return int(text)
    percent = int(text[:-1])
    if abs(percent) > 100:
        raise ValueError(f"split={split!r}: {text} is outside -100%..100%.")
    offset = (abs(percent) * count + 50) // 100  # rounded, half up
    return offset if percent >= 0 else count - offset


def _parse_split(split: str) -> tuple[str, str, str] | tuple[str, None, None]:
    match = _SLICE.match(split)
    if match is None:
        if "[" in split or "]" in split:
            raise ValueError(
                f"split={split!r} is not NAME or NAME[START:STOP]; use e.g. "
                f"'train', 'train[:90%]' or 'train[100:200]'."
            )
        return split, None, None
    return match["name"], match["start"], match["stop"]


def _log_skipped(root: str, skipped: Mapping[str, tuple[str, ...]]) -> None:
    for reason, paths in skipped.items():
        logging.warning(
            "image folder %s: skipped %d file(s) (%s), e.g. %s",
            root,
            len(paths),
            reason,
            ", ".join(paths[:_MAX_EXAMPLES_LOGGED]),
        )


def _no_images_error(
    data_dir: str, root: str, split: str, skipped: Mapping[str, tuple]
) -> ValueError:
    found = ", ".join(f"{len(p)} {r}" for r, p in skipped.items()) or "no files"
    return ValueError(
        f"--data_dir={data_dir} split={split!r}: no readable image in {root} "
        f"(found: {found}). Put {'/'.join(IMAGE_EXTENSIONS)} images in one "
        f"sub-folder per class (or directly in the folder, for pretraining "
        f"without labels), or point --data_dir at the right directory."
    )


def _check_data_dir(data_dir: str | None) -> str:
    if not data_dir:
        raise ValueError(
            f"--dataset=folder needs --data_dir=PATH (got {data_dir!r}): a "
            f"directory with one sub-folder of images per class, or split "
            f"sub-folders (train/, val/) each holding class sub-folders."
        )
    if not file_io.isdir(data_dir):
        raise FileNotFoundError(
            f"--data_dir={data_dir} is not a directory; pass the folder "
            f"that holds the images (or their class sub-folders)."
        )
    return data_dir


def _drop_unreadable(
    candidates: list[tuple[str, int]],
    skipped: dict[str, list[str]],
    verify: bool,
) -> list[tuple[str, int]]:
    """Candidates that are not empty and (if verify) decode; records others."""
    kept = []
    for path, label in candidates:
        if file_io.size(path) == 0:
            skipped["empty"].append(path)
        else:
            kept.append((path, label))
    if not verify:
        return kept
    decodable = decode.check_decodable([path for path, _ in kept])
    for (path, _), ok in zip(kept, decodable, strict=True):
        if not ok:
            skipped["undecodable"].append(path)
    return [item for item, ok in zip(kept, decodable, strict=True) if ok]


def list_folder(
    data_dir: str | None, split: str, *, verify: bool = True
) -> FolderListing:
    """Lists one split of an image folder: paths, labels and skipped files.

    Split: `<data_dir>/<split>` if that directory exists; "auto" is the first
    of validation/, val/, test/; otherwise "train" is data_dir itself. A
    slice "NAME[START:STOP]" (integers or percentages, as in tfds) takes
    that part of NAME's candidate images, so one folder can give both
    'train[:90%]' and 'train[90%:]', which are disjoint and cover it.

    Layout: sub-folders of the split root are classes, labelled by their
    sorted names' indices, with images found recursively inside; files next
    to class folders are skipped ("outside_class_folder"). A root without
    sub-folders is unlabelled (labels -1, for pretraining). Hidden files and
    folders (names starting with ".") are ignored and not counted.

    Order: candidates (files with an image extension, any case) are sorted
    by the SHA-1 of their path below the root, a fixed order that mixes the
    classes; slicing happens in this order, before empty and undecodable
    files are dropped, so only the slice's files are read.

    Args:
      data_dir: the folder, as --data_dir.
      split: split name, "auto", or a slice of one.
      verify: decode every image of the slice once (check_decodable) to drop
        undecodable ones; False skips that pass, and files that fail later
        are dropped by the loader (so num_examples may overcount).

    Returns:
      The FolderListing; skipped counts every left-out file once.

    Raises:
      ValueError: data_dir unset, an unknown split, a malformed slice, or no
        readable image.
      FileNotFoundError: data_dir is not a directory.
    """
    data_dir = _check_data_dir(data_dir)
    name, start, stop = _parse_split(split)
    root = _resolve_root(data_dir, name, split)
    candidates, class_names, skipped = _list_candidates(root)
    candidates.sort(key=lambda item: _order_key(root, item[0]))
    if start is not None:
        count = len(candidates)
        part = slice(_bound(start, count, split), _bound(stop, count, split))
        candidates = candidates[part]
    kept = _drop_unreadable(candidates, skipped, verify)
    skipped = {r: tuple(sorted(skipped[r])) for r in SKIP_REASONS if skipped[r]}
    _log_skipped(root, skipped)
    if not kept:
        raise _no_images_error(data_dir, root, split, skipped)
    return FolderListing(
        root=root,
        split=split,
        paths=tuple(path for path, _ in kept),
        labels=np.array([label for _, label in kept], dtype=np.int64),
        class_names=class_names,
        skipped=skipped,
    )


def _read_example(path: tf.Tensor, label: tf.Tensor) -> tuple:
    return decode.decode_rgb(tf.io.read_file(path)), label


def _folder_reader(listing: FolderListing) -> base.Reader:
    """A Reader over the listing: records are (path, label); host i of n
    reads files i::n; an order seed permutes all of the host's files."""
    count = len(listing.paths)

    def records(
        input_context: tf.distribute.InputContext | None,
        order_seed: tf.Tensor | None,
    ) -> tf.data.Dataset:
        first, stride = base.host_share(input_context)
        paths = tf.constant(list(listing.paths[first::stride]), tf.string)
        labels = tf.constant(listing.labels[first::stride], tf.int64)
        # One permutation of the positions keeps paths and labels together.
        order = base.permute(tf.range(tf.size(labels)), order_seed)
        return tf.data.Dataset.from_tensor_slices(
            (tf.gather(paths, order), tf.gather(labels, order))
        )

    return base.Reader(
        records=records,
        decode=_read_example,
        count=lambda input_context: base.strided_count(count, input_context),
        # Files changed or broken after list_folder checked them are
        # dropped with a logged warning instead of stopping the run.
        decode_may_fail=True,
    )


def open_folder(
    data_dir: str | None,
    split: str,
    *,
    verify: bool = True,
) -> base.Source:
    """Opens one split of an image folder as a Source (see `list_folder`).

    Args:
      data_dir: the folder, as --data_dir.
      split: split name, "auto", or a slice such as "train[:90%]".
      verify: decode every image once now to drop undecodable ones.

    Returns:
      A Source named "folder" yielding (image [H, W, 3] uint8, label []
      int64) with image_shape (None, None, 3); num_classes is 0 and labels
      are -1 for a flat folder. Host i of n reads files i::n.

    Raises:
      ValueError: data_dir unset, an unknown split, a malformed slice, or no
        readable image.
      FileNotFoundError: data_dir is not a directory.
    """
    listing = list_folder(data_dir, split, verify=verify)
    logging.info(
        "image folder %s split %s: %d images, %d classes, %d skipped",
        listing.root,
        split,
        len(listing.paths),
        listing.num_classes,
        sum(len(paths) for paths in listing.skipped.values()),
    )
    if split == base.AUTO_SPLIT:  # record the folder it resolved to
        split = file_io.basename(listing.root)
    return base.Source(
        name="folder",
        split=split,
        num_examples=len(listing.paths),
        num_classes=listing.num_classes,
        image_shape=(None, None, 3),
        origin=listing.root,
        class_names=listing.class_names,
        skipped=listing.skipped,
        reader=_folder_reader(listing),
    )
