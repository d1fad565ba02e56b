"""Tests for tfds datasets through simclr_tf.data.sources.open_source.

Two offline stand-ins, never the network (a socket guard makes any attempt
fail at once): tfds.testing.mock_data for cifar10 and imagenet2012 (random
examples; it ignores split names and read configs), and `TinyTfds`, a small
builder prepared for real into tmp_path, for splits, slicing and sharding.
"""

from __future__ import annotations

import re
import socket

import numpy as np
import pytest
import requests
import tensorflow as tf
import tensorflow_datasets as tfds

from simclr_tf.data import pipeline
from simclr_tf.data.sources import fashion_mnist, registry

MOCK = tfds.testing.MockPolicy.USE_CODE
TINY_SPLITS = {
    "full": {"train": 40, "validation": 6, "test": 8},
    "no_validation": {"train": 40, "test": 8},
    "train_only": {"train": 40},
}
TINY_FILES = 4  # shards per split, set at preparation


class TinyTfds(tfds.core.GeneratorBasedBuilder):
    """Example i has every pixel equal to i and label i % 3."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=n) for n in TINY_SPLITS]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(4, 4, 3)),
                    "label": tfds.features.ClassLabel(num_classes=3),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        sizes = TINY_SPLITS[self.builder_config.name]
        return {split: self._generate_examples(n) for split, n in sizes.items()}

    def _generate_examples(self, count):
        for index in range(count):
            image = np.full((4, 4, 3), index, np.uint8)
            yield index, {"image": image, "label": index % 3}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection attempt raises at once (urllib3 would retry minutes)."""

    def refuse(*args, **kwargs):
        raise RuntimeError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tfds data_dir with every TinyTfds config prepared, 4 files a split."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    config = tfds.download.DownloadConfig(num_shards=TINY_FILES)
    for name in TINY_SPLITS:
        builder = tfds.builder(f"tiny_tfds/{name}", data_dir=data_dir)
        builder.download_and_prepare(download_config=config)
    return data_dir


def example_ids(data: tf.data.Dataset) -> list[int]:
    """Each TinyTfds example's index, read from its pixels, in order."""
    return [int(image[0, 0, 0]) for image, _ in data.as_numpy_iterator()]


def host_context(host: int, hosts: int) -> tf.distribute.InputContext:
    return tf.distribute.InputContext(
        num_input_pipelines=hosts, input_pipeline_id=host
    )


@pytest.mark.parametrize("name", ["cifar10", "imagenet2012"])
def test_open_source_mock_facts_come_from_builder_info(name):
    features = tfds.builder(name).info.features
    with tfds.testing.mock_data(num_examples=5, policy=MOCK):
        source = registry.open_source(name, "train")
        first = next(source.dataset().as_numpy_iterator())
    assert source.num_classes == features["label"].num_classes
    assert source.class_names == tuple(features["label"].names)
    assert source.image_shape == features["image"].shape
    # Mock info has no splits, so the size is counted: num_examples.
    assert source.num_examples == 5
    assert first[0].dtype == np.uint8 and first[1].dtype == np.int64


def test_open_source_mock_imagenet2012_images_vary_in_size():
    with tfds.testing.mock_data(num_examples=6, policy=MOCK):
        source = registry.open_source("imagenet2012", "validation")
        shapes = {image.shape for image, _ in source.dataset()}
    assert source.image_shape == (None, None, 3)
    # Random sizes per example, as ImageNet's JPEGs have.
    assert len(shapes) > 1 and all(shape[2] == 3 for shape in shapes)


@pytest.mark.parametrize(
    "name, num_classes", [("cifar10", 10), ("imagenet2012", 1000)]
)
def test_pretrain_input_fn_mock_tfds_batches(name, num_classes):
    with tfds.testing.mock_data(num_examples=8, policy=MOCK):
        source = registry.open_source(name, "train")
        input_fn = pipeline.pretrain_input_fn(
            source,
            global_batch_size=8,
            image_size=32,
            color_jitter_strength=0.5,
            blur=False,
            seed=0,
        )
        data = input_fn(tf.distribute.InputContext())
        batch = next(data.as_numpy_iterator())
    for view in ("view1", "view2"):
        assert batch[view].shape == (8, 32, 32, 3)
        assert batch[view].dtype == np.float32
        assert batch[view].min() >= 0.0 and batch[view].max() <= 1.0
    assert batch["label"].dtype == np.int64 and batch["label"].shape == (8,)
    assert np.all((batch["label"] >= 0) & (batch["label"] < num_classes))
    # Two independent augmentations of the same images differ.
    assert not np.array_equal(batch["view1"], batch["view2"])


@pytest.mark.parametrize(
    "name, num_classes", [("cifar10", 10), ("imagenet2012", 1000)]
)
def test_eval_dataset_mock_tfds_one_pass(name, num_classes):
    with tfds.testing.mock_data(num_examples=7, policy=MOCK):
        source = registry.open_source(name, "auto")
        data = pipeline.eval_dataset(source, batch_size=4, image_size=32)
        batches = list(data.as_numpy_iterator())
    # 7 examples in batches of 4: one full batch and the remainder.
    assert [len(b["label"]) for b in batches] == [4, 3]
    images = np.concatenate([b["image"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    assert images.shape == (7, 32, 32, 3) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert np.all((labels >= 0) & (labels < num_classes))


def test_open_source_mock_auto_split_without_split_info_is_validation():
    # Mock info lists no splits and mock data serves any split name, so
    # "auto" takes the first preference (documented in sources).
    with tfds.testing.mock_data(num_examples=2, policy=MOCK):
        assert registry.open_source("cifar10", "auto").split == "validation"


@pytest.mark.parametrize(
    "config, expected",
    [("full", ("validation", 6)), ("no_validation", ("test", 8))],
)
def test_open_source_tfds_auto_split_prefers_validation(
    tiny_dir, config, expected
):
    source = registry.open_source(
        f"tiny_tfds/{config}", "auto", data_dir=tiny_dir
    )
    assert (source.split, source.num_examples) == expected


def test_open_source_tfds_auto_split_without_eval_split_lists_splits(
    tiny_dir,
):
    with pytest.raises(ValueError, match=r'split="auto".*only train;'):
        registry.open_source("tiny_tfds/train_only", "auto", data_dir=tiny_dir)


@pytest.mark.parametrize(
    "name, split", [("synthetic", "test"), ("synthetic_gray", "test")]
)
def test_open_source_auto_split_of_synthetic_is_test(name, split):
    source = registry.open_source(name, "auto")
    assert (source.split, source.num_examples) == (split, 256)


def test_open_source_auto_split_of_fashion_mnist_is_test(tmp_path, monkeypatch):
    # No IDX files anywhere, so fashion_mnist falls back to (mock) tfds.
    monkeypatch.setattr(
        fashion_mnist, "FASHION_MNIST_SYSTEM_DIR", str(tmp_path / "absent")
    )
    with tfds.testing.mock_data(num_examples=3, policy=MOCK):
        source = registry.open_source(
            "fashion_mnist", "auto", data_dir=str(tmp_path)
        )
    assert source.split == "test" and source.origin.startswith("tfds:")


@pytest.mark.parametrize(
    "split, count, split_size",
    [
        ("train[:10%]", 4, 40),  # 10% of 40
        ("train[10%:]", 36, 40),
        ("test[:5]", 5, 8),
        ("train[-3:]", 3, 40),
    ],
)
def test_open_source_tfds_slice_counts_and_reads_slice(
    tiny_dir, split, count, split_size
):
    source = registry.open_source("tiny_tfds/full", split, data_dir=tiny_dir)
    ids = example_ids(source.dataset())
    assert source.split == split
    assert source.num_examples == count == len(ids)
    # Distinct examples of the sliced split (tfds shuffled them on writing,
    # so which ones is not known).
    assert len(set(ids)) == count and set(ids) <= set(range(split_size))


def test_open_source_tfds_slice_and_complement_partition_split(tiny_dir):
    head, tail = (
        example_ids(
            registry.open_source(
                "tiny_tfds/full", split, data_dir=tiny_dir
            ).dataset()
        )
        for split in ("train[:10%]", "train[10%:]")
    )
    assert sorted(head + tail) == list(range(40))


@pytest.mark.parametrize("split", ["train", "train[5:]"])
@pytest.mark.parametrize("hosts", [2, 3, TINY_FILES + 1])
def test_source_dataset_tfds_host_shards_partition_split(
    tiny_dir, hosts, split
):
    source = registry.open_source("tiny_tfds/full", split, data_dir=tiny_dir)
    shards = [
        example_ids(
            source.dataset(host_context(host, hosts), order_seed=[3, host])
        )
        for host in range(hosts)
    ]
    whole = example_ids(source.dataset())
    merged = [index for shard in shards for index in shard]
    # Disjoint and covering: together exactly the split's examples, once.
    assert sorted(merged) == sorted(whole)
    assert len(whole) == source.num_examples
    # Balanced: sizes differ by at most one (tfds.even_splits), even with
    # more hosts than files, where per-file sharding cannot work.
    sizes = [len(shard) for shard in shards]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == [
        source.host_count(host_context(host, hosts)) for host in range(hosts)
    ]


def test_source_dataset_tfds_order_seed_permutes_files_and_repeats(tiny_dir):
    source = registry.open_source("tiny_tfds/full", "train", data_dir=tiny_dir)

    def order(seed):
        return example_ids(source.dataset(order_seed=[seed, 0]))

    first = order(0)
    assert order(0) == first
    # The seed must matter: 4 files have 24 orders, so among 4 other seeds
    # at least one gives another order unless the seed is ignored
    # (chance (1/24)^4 that all four agree by luck).
    assert any(order(seed) != first for seed in (1, 2, 3, 4))
    assert sorted(first) == list(range(40))


def test_source_dataset_tfds_fixed_order_is_tfds_own_order(tiny_dir):
    # The real-data path reads TFRecord file parts itself; without an
    # order seed it must give exactly what tfds's as_dataset gives.
    source = registry.open_source("tiny_tfds/full", "train", data_dir=tiny_dir)
    builder = tfds.builder("tiny_tfds/full", data_dir=tiny_dir)
    expected = builder.as_dataset(split="train", shuffle_files=False)
    images = [int(e["image"][0, 0, 0]) for e in expected.as_numpy_iterator()]
    assert example_ids(source.dataset()) == images
    for hosts in (2, 3):
        for host in range(hosts):
            context = host_context(host, hosts)
            ids = example_ids(source.dataset(context))
            assert len(ids) == source.host_count(context)


@pytest.mark.parametrize("split", ["foo", "foo[:10%]", "train[:10"])
def test_open_source_tfds_bad_split_lists_splits(tiny_dir, split):
    message = (
        rf"split='{re.escape(split)}'.*"
        r"train \(40\), validation \(6\), test \(8\);.*train\[:10%\]"
    )
    with pytest.raises(ValueError, match=message) as error:
        registry.open_source("tiny_tfds/full", split, data_dir=tiny_dir)
    assert "\n" not in str(error.value)


def test_open_source_tfds_empty_slice_is_rejected(tiny_dir):
    with pytest.raises(ValueError, match=r"'train\[:0\]'.*selects no examples"):
        registry.open_source("tiny_tfds/full", "train[:0]", data_dir=tiny_dir)


def test_open_source_tfds_prepares_unprepared_builder_offline(tmp_path):
    source = registry.open_source(
        "tiny_tfds/train_only", "train", data_dir=str(tmp_path)
    )
    assert source.num_examples == 40 and source.num_classes == 3
    assert sorted(example_ids(source.dataset())) == list(range(40))


def test_open_source_unknown_tfds_name_suggests_close_name():
    with pytest.raises(
        ValueError, match=r"'cifar_10' is not a known.*did you mean .*cifar10"
    ):
        registry.open_source("cifar_10", "train")


def test_open_source_imagenet2012_unprepared_explains_manual_download(
    tmp_path,
):
    manual = str(tmp_path / "downloads" / "manual")
    with pytest.raises(ValueError, match="manual download") as error:
        registry.open_source("imagenet2012", "train", data_dir=str(tmp_path))
    message = str(error.value)
    assert f"Put the files in {manual}" in message
    assert "ILSVRC2012_img_train.tar" in message  # tfds's instructions
    assert "tfds build imagenet2012" in message and "\n" not in message


def test_open_source_tfds_failed_download_names_cause_and_fix(
    tmp_path, monkeypatch
):
    def fail(self, *args, **kwargs):
        raise requests.exceptions.ConnectionError("Max retries exceeded")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fail)
    with pytest.raises(
        ValueError,
        match=r"'cifar10' is not prepared.*downloading it failed "
        r"\(ConnectionError: Max retries exceeded\).*tfds build cifar10",
    ):
        registry.open_source("cifar10", "train", data_dir=str(tmp_path))
