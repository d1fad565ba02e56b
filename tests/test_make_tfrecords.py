"""Tests for tools/make_tfrecords.py and data/tfrecord.py: write, then read.

A tiny image folder (noise PNGs and JPEGs in three class folders, plus
planted broken files) is written once by the tool in a subprocess; the
shards are checked against the files themselves and against the folder
source, which reads the same images without TFRecords.
"""

from __future__ import annotations

import collections
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from simclr_tf.data import run_data
from simclr_tf.data.sources import folder, registry, tfrecord
from simclr_tf.tools import make_tfrecords

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("ant", "bee", "cat")
IMAGES_PER_CLASS = {"train": 5, "validation": 2}
NUM_SHARDS = 3
# Planted in train/: reason -> files, relative to train/.
BROKEN = {
    "empty": ["ant/empty.png"],
    "undecodable": ["bee/cut.jpg", "cat/text.png"],
    "outside_class_folder": ["README.txt"],
    "unsupported_extension": ["cat/notes.txt"],
}


def _encoded(seed: int, fmt: str) -> bytes:
    rng = np.random.default_rng(seed)
    size = (int(rng.integers(6, 12)), int(rng.integers(6, 12)), 3)
    pixels = rng.integers(0, 256, size, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def _build_folder(root) -> None:
    seed = 0
    for split, count in IMAGES_PER_CLASS.items():
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
            for index in range(count):
                fmt, ext = ("JPEG", "jpg") if index % 2 else ("PNG", "png")
                path = root / split / name / f"{index}.{ext}"
                path.write_bytes(_encoded(seed, fmt))
                seed += 1
    train = root / "train"
    jpeg = (train / "bee" / "1.jpg").read_bytes()
    (train / "ant" / "empty.png").write_bytes(b"")
    (train / "bee" / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (train / "cat" / "text.png").write_text("not an image")
    (train / "README.txt").write_text("notes")
    (train / "cat" / "notes.txt").write_text("notes")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """(input_dir, output_dir, tool stderr) after one run of the tool."""
    base = tmp_path_factory.mktemp("tfrecords")
    _build_folder(base / "images")
    input_dir, output_dir = str(base / "images"), str(base / "shards")
    environment = dict(os.environ, PYTHONPATH=REPOSITORY)
    environment["TF_CPP_MIN_LOG_LEVEL"] = "2"
    process = subprocess.run(
        [
            sys.executable,
            "-m",
            "simclr_tf.tools.make_tfrecords",
            f"--input_dir={input_dir}",
            f"--output_dir={output_dir}",
            "--splits=train,validation",
            f"--num_shards={NUM_SHARDS}",
            "--num_workers=2",
        ],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.returncode == 0, process.stderr
    return input_dir, output_dir, process.stderr


def _info(output_dir: str) -> dict:
    with open(os.path.join(output_dir, tfrecord.INFO_FILE)) as file:
        return json.load(file)


def _records(path: str) -> list[dict]:
    """The raw features of a shard's records, in file order."""
    found = []
    for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
        example = tf.train.Example.FromString(record).features.feature
        found.append(
            {
                "encoded": example[tfrecord.ENCODED_KEY].bytes_list.value[0],
                "label": example[tfrecord.LABEL_KEY].int64_list.value[0],
                "filename": example[tfrecord.FILENAME_KEY]
                .bytes_list.value[0]
                .decode(),
            }
        )
    return found


def _multiset(data: tf.data.Dataset) -> collections.Counter:
    return collections.Counter(
        (int(label), image.shape, image.tobytes())
        for image, label in data.as_numpy_iterator()
    )


def _order(data: tf.data.Dataset) -> list[bytes]:
    return [image.tobytes() for image, _ in data.as_numpy_iterator()]


def test_make_tfrecords_writes_named_shards_only(written):
    _, output_dir, stderr = written
    expected = {
        tfrecord.shard_name(split, k, NUM_SHARDS)
        for split in IMAGES_PER_CLASS
        for k in range(NUM_SHARDS)
    }
    assert set(os.listdir(output_dir)) == expected | {tfrecord.INFO_FILE}
    assert "train-00002-of-00003.tfrecord" in expected
    assert "files/s" in stderr


def test_make_tfrecords_info_records_splits_and_exact_skips(written):
    input_dir, output_dir, _ = written
    info = _info(output_dir)
    assert info["format_version"] == tfrecord.FORMAT_VERSION
    train = info["splits"]["train"]
    assert train["num_examples"] == 3 * IMAGES_PER_CLASS["train"]
    assert info["splits"]["validation"]["num_examples"] == 6
    assert train["class_names"] == list(CLASSES)
    assert train["num_classes"] == len(CLASSES)
    root = os.path.join(input_dir, "train")
    expected = {
        reason: {
            "count": len(files),
            "examples": sorted(os.path.join(root, f) for f in files),
        }
        for reason, files in BROKEN.items()
    }
    assert train["skipped"] == expected
    sizes = [shard["num_examples"] for shard in train["shards"]]
    assert sum(sizes) == train["num_examples"]
    assert max(sizes) - min(sizes) <= 1  # spread evenly


def test_make_tfrecords_records_hold_original_bytes_in_listing_order(written):
    input_dir, output_dir, _ = written
    listing = folder.list_folder(input_dir, "train")
    records = [
        record
        for k in range(NUM_SHARDS)
        for record in _records(
            os.path.join(output_dir, tfrecord.shard_name("train", k, 3))
        )
    ]
    root = os.path.join(input_dir, "train")
    assert [os.path.join(root, r["filename"]) for r in records] == list(
        listing.paths
    )
    for record in records:
        path = os.path.join(root, record["filename"])
        with open(path, "rb") as file:
            assert record["encoded"] == file.read()
        class_name = record["filename"].split("/")[0]
        assert record["label"] == CLASSES.index(class_name)


def test_open_tfrecord_equals_folder_source(written):
    input_dir, output_dir, _ = written
    for split in IMAGES_PER_CLASS:
        records = tfrecord.open_tfrecord(output_dir, split)
        images = folder.open_folder(input_dir, split)
        assert records.num_examples == images.num_examples
        assert records.num_classes == images.num_classes == len(CLASSES)
        # The class-folder names travel through dataset_info.json.
        assert records.class_names == images.class_names == CLASSES
        assert _multiset(records.dataset()) == _multiset(images.dataset())
        assert records.skip_counts() == images.skip_counts()


@pytest.mark.parametrize("hosts", [2, 3])
def test_open_tfrecord_hosts_read_own_files(written, hosts):
    _, output_dir, _ = written
    source = tfrecord.open_tfrecord(output_dir, "train")
    whole = _multiset(source.dataset())
    shard_files = [
        tf.data.TFRecordDataset(
            os.path.join(output_dir, tfrecord.shard_name("train", k, 3))
        ).map(tfrecord._parse)
        for k in range(NUM_SHARDS)
    ]
    union = collections.Counter()
    for index in range(hosts):
        context = tf.distribute.InputContext(
            num_input_pipelines=hosts, input_pipeline_id=index
        )
        part = _multiset(source.dataset(context))
        expected = sum(
            map(_multiset, shard_files[index::hosts]), collections.Counter()
        )
        assert part == expected  # whole files i::n
        assert not union & part  # disjoint from earlier hosts
        union += part
    assert union == whole


def test_open_tfrecord_fewer_files_than_hosts_splits_records(written, tmp_path):
    input_dir, _, _ = written
    listing = folder.list_folder(input_dir, "validation")
    entry = make_tfrecords.write_split(listing, str(tmp_path), 1)
    make_tfrecords.update_info(str(tmp_path), {"validation": entry})
    source = tfrecord.open_tfrecord(str(tmp_path), "validation")
    union = collections.Counter()
    for index in range(3):
        context = tf.distribute.InputContext(3, index)
        part = _multiset(source.dataset(context, order_seed=[3, index]))
        assert sum(part.values()) == 2 == source.host_count(context)
        assert not union & part
        union += part
    assert union == _multiset(source.dataset())


def test_open_tfrecord_order_seed_permutes_files_and_repeats(written):
    _, output_dir, _ = written

    def order(seed):
        source = tfrecord.open_tfrecord(output_dir, "train")
        return _order(source.dataset(order_seed=seed))

    assert order([7, 0]) == order([7, 0])
    plain = order(None)
    # 3 files: 6 orders; five seeds all giving the plain one is ~1e-4.
    assert any(order([seed, 0]) != plain for seed in range(5))
    assert sorted(order([7, 0])) == sorted(plain)


def test_open_tfrecord_auto_is_validation(written):
    _, output_dir, _ = written
    assert tfrecord.open_tfrecord(output_dir, "auto").split == "validation"


def test_open_tfrecord_errors_name_the_fix(written, tmp_path):
    _, output_dir, _ = written
    with pytest.raises(ValueError, match=r"needs --data_dir=\.\.\."):
        tfrecord.open_tfrecord(None, "train")
    with pytest.raises(ValueError, match=r"make_tfrecords --input_dir="):
        tfrecord.open_tfrecord(str(tmp_path), "train")
    with pytest.raises(ValueError, match=r"train \(15\), validation \(6\)"):
        tfrecord.open_tfrecord(output_dir, "test")
    with pytest.raises(ValueError, match=r"--splits=train=train\[:90%\]"):
        tfrecord.open_tfrecord(output_dir, "train[:50%]")


def test_open_tfrecord_missing_shard_is_named(written, tmp_path):
    _, output_dir, _ = written
    copy = shutil.copytree(output_dir, tmp_path / "copy")
    os.remove(copy / "train-00001-of-00003.tfrecord")
    with pytest.raises(FileNotFoundError, match="train-00001-of-00003"):
        tfrecord.open_tfrecord(str(copy), "train")


def test_make_tfrecords_refuses_existing_shards(written):
    input_dir, output_dir, _ = written
    with pytest.raises(ValueError, match="--overwrite"):
        make_tfrecords.make_tfrecords(input_dir, output_dir, "validation")


def test_make_tfrecords_missing_input_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="--input_dir="):
        make_tfrecords.make_tfrecords(str(tmp_path / "no"), str(tmp_path))


def test_write_split_overwrite_replaces_old_shards(written, tmp_path):
    input_dir, _, _ = written
    listing = folder.list_folder(input_dir, "validation")
    make_tfrecords.write_split(listing, str(tmp_path), 3)
    make_tfrecords.write_split(listing, str(tmp_path), 2, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == [
        "validation-00000-of-00002.tfrecord",
        "validation-00001-of-00002.tfrecord",
    ]


def test_write_split_interruption_leaves_no_shard(
    written, tmp_path, monkeypatch
):
    input_dir, _, _ = written
    listing = folder.list_folder(input_dir, "validation")
    real, calls = make_tfrecords._example, []

    def fail_on_third(*args):
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(make_tfrecords, "_example", fail_on_third)
    with pytest.raises(KeyboardInterrupt):
        make_tfrecords.write_split(listing, str(tmp_path), 1)
    pattern = tfrecord.shard_pattern("validation")
    assert not [name for name in os.listdir(tmp_path) if pattern.match(name)]


def test_write_split_unlabelled_folder_writes_minus_one(tmp_path):
    (tmp_path / "flat").mkdir()
    for seed in range(3):
        (tmp_path / "flat" / f"{seed}.png").write_bytes(_encoded(seed, "PNG"))
    listing = folder.list_folder(str(tmp_path / "flat"), "train")
    entry = make_tfrecords.write_split(listing, str(tmp_path / "out"), 1)
    assert entry["num_classes"] == 0 and entry["class_names"] == []
    shard = tmp_path / "out" / tfrecord.shard_name("train", 0, 1)
    records = _records(str(shard))
    assert sorted(r["filename"] for r in records) == ["0.png", "1.png", "2.png"]
    assert {r["label"] for r in records} == {-1}


def test_open_tfrecord_counts_skips_beyond_the_recorded_examples(tmp_path):
    """The info keeps 10 example paths per reason but the full count."""
    (tmp_path / "images").mkdir()
    for index in range(2):
        path = tmp_path / "images" / f"{index}.png"
        path.write_bytes(_encoded(index, "PNG"))
    for index in range(12):
        (tmp_path / "images" / f"empty{index}.jpg").write_bytes(b"")
    listing = folder.list_folder(str(tmp_path / "images"), "train")
    entry = make_tfrecords.write_split(listing, str(tmp_path / "out"), 1)
    make_tfrecords.update_info(str(tmp_path / "out"), {"train": entry})
    source = tfrecord.open_tfrecord(str(tmp_path / "out"), "train")
    assert source.skip_counts() == {"empty": 12}
    assert len(source.skipped["empty"]) == 10
    assert run_data.skipped_files(source)["data/skipped_files"] == 12


def test_open_source_dataset_tfrecord_reads_the_shards(written):
    """--dataset=tfrecord goes through registry.open_source to the shards."""
    _, output_dir, _ = written
    source = registry.open_source("tfrecord", "auto", data_dir=output_dir)
    assert (source.name, source.split) == ("tfrecord", "validation")
    assert source.num_examples == IMAGES_PER_CLASS["validation"] * len(CLASSES)
    with pytest.raises(ValueError, match="--dataset=tfrecord needs --data_dir"):
        registry.open_source("tfrecord", "train")
