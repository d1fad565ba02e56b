"""Tests for simclr_tf.file_io on TensorFlow's in-memory ram:// filesystem.

ram:// stands in for gs://: a filesystem only tf.io.gfile knows, where
Python's os and open() would create a local folder named "ram:" instead.
Fixture files are written with tf.io.gfile itself, the reference.
"""

from __future__ import annotations

import uuid

import pytest
import tensorflow as tf

from simclr_tf import file_io


def _ram_dir() -> str:
    return f"ram://file_io_{uuid.uuid4().hex[:8]}"


def _write(path: str, data: bytes) -> None:
    tf.io.gfile.makedirs(path.rsplit("/", 1)[0])
    with tf.io.gfile.GFile(path, "wb") as file:
        file.write(data)


def _files_below(root: str) -> dict[str, bytes]:
    """{path below root: bytes} of every file, listed with gfile.walk."""
    found = {}
    for directory, _, files in tf.io.gfile.walk(root):
        for name in files:
            path = f"{directory.rstrip('/')}/{name}"
            with tf.io.gfile.GFile(path, "rb") as file:
                found[path[len(root) + 1 :]] = file.read()
    return found


def test_path_parts_keep_the_scheme():
    # posixpath.normpath would give "gs:/b/run", a local relative path.
    assert file_io.dirname("gs://b/run/ckpt-1") == "gs://b/run"
    assert file_io.dirname("gs://b/run/") == "gs://b"
    assert file_io.basename("gs://b/run/") == "run"
    assert (
        file_io.join("ram://x", "saved_model", "3") == "ram://x/saved_model/3"
    )
    assert file_io.relative("gs://b/d/c/x.png", "gs://b/d/") == "c/x.png"
    assert file_io.is_remote("gs://b") and not file_io.is_remote("/tmp/gs")
    with pytest.raises(ValueError, match="not below"):
        file_io.relative("gs://b/dd/x.png", "gs://b/d")


def test_walk_lists_every_file_and_prunes_in_place():
    root = _ram_dir()
    files = {
        "a.png": b"1",
        "cat/b.png": b"2",
        "cat/deep/c.png": b"3",
        ".hidden/d.png": b"4",
    }
    for name, data in files.items():
        _write(f"{root}/{name}", data)
    seen = []
    for directory, folders, names in file_io.walk(root):
        folders[:] = [name for name in folders if not name.startswith(".")]
        seen += [file_io.relative(f"{directory}/{n}", root) for n in names]
    assert sorted(seen) == ["a.png", "cat/b.png", "cat/deep/c.png"]


def test_move_tree_moves_every_file_byte_for_byte():
    root = _ram_dir()
    files = {"saved_model.pb": b"pb", "variables/variables.index": b"ix"}
    for name, data in files.items():
        _write(f"{root}/source/{name}", data)
    moved = file_io.move_tree(f"{root}/source", f"{root}/3")
    assert moved == sorted(files)
    assert _files_below(f"{root}/3") == files
    assert _files_below(f"{root}/source") == {}


def test_json_round_trip_and_sizes_on_ram():
    root = _ram_dir()
    path = file_io.write_json(f"{root}/run/result.json", {"top_1": 0.5})
    assert file_io.read_json(path) == {"top_1": 0.5}
    # Written whole under a temporary name, then renamed: nothing else left.
    assert tf.io.gfile.listdir(f"{root}/run") == ["result.json"]
    assert file_io.size(path) == len(file_io.read_bytes(path))


def test_missing_file_is_file_not_found():
    with pytest.raises(FileNotFoundError, match="no such file"):
        file_io.read_bytes(f"{_ram_dir()}/missing.json")
