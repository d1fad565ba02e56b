"""Every file simclr_tf reads or writes, through tf.io.gfile.

So that a --model_dir, --data_dir, --checkpoint or --teacher on gs:// (or
any filesystem TensorFlow knows, ram:// in tests) works like a local path.
Python's open() and os.makedirs would create a local folder named "gs:".
Writes that must not leave a half-written file (config.json, result.json)
go to a temporary name first and are renamed over the target; on object
stores the rename is a copy, still never a partial file under the name.
"""

from __future__ import annotations

import json
import posixpath
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import tensorflow as tf


def join(*parts: str) -> str:
    """Joins path parts with "/" (what gs:// and local POSIX paths use)."""
    return posixpath.join(*parts)


def dirname(path: str) -> str:
    """The directory part of path ("gs://b/run/ckpt-1" -> "gs://b/run")."""
    return posixpath.dirname(path.rstrip("/"))


def basename(path: str) -> str:
    """The last part of path, ignoring a trailing "/"."""
    return posixpath.basename(path.rstrip("/"))


def is_remote(path: str) -> bool:
    """Whether path names a filesystem by scheme (gs://, ram://, ...)."""
    return "://" in path


def relative(path: str, root: str) -> str:
    """path below root, "/"-separated ("gs://b/d/c/x.png", "gs://b/d" ->
    "c/x.png"). No normalisation, which would turn "gs://" into "gs:/".

    Raises:
      ValueError: path is not below root.
    """
    prefix = root.rstrip("/") + "/"
    if not path.startswith(prefix):
        raise ValueError(f"{path!r} is not below {root!r}")
    return path[len(prefix) :]


def exists(path: str) -> bool:
    """Whether a file or directory exists at path."""
    return tf.io.gfile.exists(path)


def isdir(path: str) -> bool:
    """Whether path is a directory (a prefix with objects on gs://)."""
    return tf.io.gfile.isdir(path)


def makedirs(path: str) -> None:
    """Creates path and its parents; nothing if it exists."""
    tf.io.gfile.makedirs(path)


def listdir(path: str) -> list[str]:
    """Entry names of a directory, sorted, without trailing slashes."""
    return sorted(name.rstrip("/") for name in tf.io.gfile.listdir(path))


def glob(pattern: str) -> list[str]:
    """Paths matching a glob pattern, sorted."""
    return sorted(tf.io.gfile.glob(pattern))


def walk(top: str) -> Iterator[tuple[str, list[str], list[str]]]:
    """Like os.walk (top down; prune by editing the folder list in place).

    Yields:
      (directory, folder names, file names), names without trailing "/".
    """
    for directory, folders, files in tf.io.gfile.walk(top):
        stripped = [name.rstrip("/") for name in folders]
        folders[:] = stripped  # gfile.walk descends into this same list
        yield directory.rstrip("/"), folders, [f.rstrip("/") for f in files]


def size(path: str) -> int:
    """A file's size in bytes."""
    return tf.io.gfile.stat(path).length


def remove(path: str) -> None:
    """Deletes a file."""
    tf.io.gfile.remove(path)


def rename(source: str, destination: str) -> None:
    """Renames a file, replacing destination (a copy on object stores)."""
    tf.io.gfile.rename(source, destination, overwrite=True)


def move_tree(source: str, destination: str) -> list[str]:
    """Moves every file below source to the same place below destination.

    File by file, as directories cannot be renamed on ram:// and are not
    renamed atomically on gs://; source's empty folders are left behind.

    Returns:
      The moved files' paths below destination, sorted.
    """
    moved = []
    for directory, _, files in walk(source):
        target = destination
        if directory != source.rstrip("/"):
            target = join(destination, relative(directory, source))
        makedirs(target)
        for name in files:
            rename(join(directory, name), join(target, name))
            moved.append(relative(join(target, name), destination))
    return sorted(moved)


def rmtree(path: str) -> None:
    """Deletes a directory and everything in it, if it exists."""
    if tf.io.gfile.exists(path):
        tf.io.gfile.rmtree(path)


def read_bytes(path: str) -> bytes:
    """The whole file as bytes.

    Raises:
      FileNotFoundError: no file at path (gfile's NotFoundError, as the
        OSError that open() would raise).
    """
    try:
        with tf.io.gfile.GFile(path, "rb") as file:
            return file.read()
    except tf.errors.NotFoundError as error:
        raise FileNotFoundError(f"{path}: no such file") from error


def read_text(path: str) -> str:
    """The whole file as text (UTF-8); FileNotFoundError as read_bytes."""
    return read_bytes(path).decode("utf-8")


def read_json(path: str) -> Any:
    """The JSON value stored at path."""
    return json.loads(read_text(path))


def write_bytes(path: str, data: bytes) -> str:
    """Writes data to path atomically (temporary name, then rename)."""
    temporary = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with tf.io.gfile.GFile(temporary, "wb") as file:
        file.write(data)
    rename(temporary, path)
    return path


def write_text(path: str, text: str) -> str:
    """Writes text (UTF-8) to path atomically; returns path."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str, value: Mapping[str, Any] | list) -> str:
    """Writes indented, key-sorted JSON atomically; returns path.

    Values JSON does not know (numpy scalars, paths) are written as str.
    """
    text = json.dumps(value, indent=2, sort_keys=True, default=str)
    return write_text(path, text + "\n")


def write_result(
    model_dir: str, result: Mapping[str, Any], name: str = "result.json"
) -> str:
    """Writes a run's result (result.json, result_<step>.json) atomically
    into model_dir; returns its path."""
    return write_json(join(model_dir, name), result)
