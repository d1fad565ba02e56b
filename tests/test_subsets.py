"""Tests for simclr_tf.data.subsets: class-balanced label fractions.

Expected per-class counts are worked out by hand from the rule
max(1, round(fraction * n_c)); subset contents are checked against the
source's own numpy arrays. tfds runs only under tfds.testing.mock_data, with
a socket guard so that any network attempt fails at once.
"""

from __future__ import annotations

import socket

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from simclr_tf.data import subsets
from simclr_tf.data.sources import base as source_lib
from simclr_tf.data.sources import registry, synthetic

# Class sizes 200, 57, 13, 3, 0, 1 (class 4 empty): at 10% they keep
# 20, round(5.7)=6, round(1.3)=1, and 1 each for the classes smaller than
# 1 / 0.1 = 10 examples; the empty class keeps nothing.
UNBALANCED_SIZES = (200, 57, 13, 3, 0, 1)
UNBALANCED_EXPECTED = {0: 20, 1: 6, 2: 1, 3: 1, 5: 1}


def _unbalanced_labels() -> np.ndarray:
    labels = np.repeat(np.arange(len(UNBALANCED_SIZES)), UNBALANCED_SIZES)
    return np.random.default_rng(7).permutation(labels)  # interleave classes


def _numbered_source(num_examples: int, num_classes: int) -> source_lib.Source:
    """Example i has every pixel i (< 256) and label i % num_classes."""
    index = np.arange(num_examples)
    images = np.broadcast_to(
        index[:, None, None, None], (num_examples, 2, 2, 1)
    )
    return source_lib.from_arrays(
        "numbered",
        "train",
        images.astype(np.uint8),
        index % num_classes,
        num_classes,
    )


def _first_pixels(data: tf.data.Dataset) -> np.ndarray:
    return np.array([int(image[0, 0, 0]) for image, _ in data], np.int64)


def test_class_balanced_indices_counts_follow_rule_on_unbalanced_labels():
    labels = _unbalanced_labels()
    indices = subsets.class_balanced_indices(labels, 0.1, 6, seed=0)
    classes, counts = np.unique(labels[indices], return_counts=True)
    kept = dict(zip(classes.tolist(), counts.tolist(), strict=True))
    assert kept == UNBALANCED_EXPECTED


def test_class_balanced_indices_are_sorted_unique_int64():
    indices = subsets.class_balanced_indices(_unbalanced_labels(), 0.1, 6, 3)
    assert indices.dtype == np.int64
    np.testing.assert_array_equal(indices, np.unique(indices))


def test_class_balanced_indices_one_percent_of_equal_classes_is_equal():
    # Fashion-MNIST's shape scaled down: 10 classes of 600 -> 1% is 6 each.
    labels = np.random.default_rng(1).permutation(np.arange(6000) % 10)
    indices = subsets.class_balanced_indices(labels, 0.01, 10, seed=0)
    _, counts = np.unique(labels[indices], return_counts=True)
    np.testing.assert_array_equal(counts, np.full(10, 6))


def test_class_balanced_indices_repeat_for_same_seed():
    labels = _unbalanced_labels()
    first = subsets.class_balanced_indices(labels, 0.1, 6, seed=5)
    second = subsets.class_balanced_indices(labels.copy(), 0.1, 6, seed=5)
    np.testing.assert_array_equal(first, second)


def test_class_balanced_indices_differ_for_another_seed():
    labels = _unbalanced_labels()
    first = subsets.class_balanced_indices(labels, 0.1, 6, seed=0)
    other = subsets.class_balanced_indices(labels, 0.1, 6, seed=1)
    # 20 of 200 and 6 of 57 drawn twice: equal by chance with negligible
    # probability (< 1e-20).
    assert not np.array_equal(first, other)


def test_class_balanced_indices_fraction_one_keeps_all():
    labels = _unbalanced_labels()
    indices = subsets.class_balanced_indices(labels, 1.0, 6, seed=0)
    np.testing.assert_array_equal(indices, np.arange(len(labels)))


@pytest.mark.parametrize("fraction", [0, 0.0, -0.1, 1.5, float("nan"), "0.1"])
def test_class_balanced_indices_bad_fraction_names_flag(fraction):
    with pytest.raises(ValueError, match=r"--label_fraction=.*\(0, 1\]"):
        subsets.class_balanced_indices(_unbalanced_labels(), fraction, 6, 0)


def test_class_balanced_indices_unlabelled_raises():
    with pytest.raises(ValueError, match="--label_fraction needs labels"):
        subsets.class_balanced_indices(np.full(8, -1), 0.5, 2, 0)


def test_class_balanced_indices_negative_seed_names_flag():
    with pytest.raises(ValueError, match="--seed=-1"):
        subsets.class_balanced_indices(_unbalanced_labels(), 0.1, 6, -1)


def test_label_fraction_source_yields_examples_at_indices():
    source = synthetic.synthetic(60, 8, 1, num_classes=3, seed=4)
    images, labels = synthetic.synthetic_arrays(60, 8, 1, 3, seed=4)
    subset = subsets.label_fraction_source(source, 0.25, seed=2)
    indices = subsets.class_balanced_indices(labels, 0.25, 3, seed=2)
    got = list(subset.dataset().as_numpy_iterator())
    assert subset.num_examples == len(indices) == len(got)
    got_images = np.stack([image for image, _ in got])
    np.testing.assert_array_equal(got_images, images[indices])
    np.testing.assert_array_equal([y for _, y in got], labels[indices])


def test_label_fraction_source_records_fraction_and_seed():
    subset = subsets.label_fraction_source(_numbered_source(40, 4), 0.1, 3)
    assert subset.split == "train(label_fraction=0.1,seed=3)"
    assert (subset.name, subset.num_classes) == ("numbered", 4)


def test_label_fraction_source_seed_none_is_seed_zero():
    source = _numbered_source(100, 5)
    unseeded = subsets.label_fraction_source(source, 0.2, None)
    seeded = subsets.label_fraction_source(source, 0.2, 0)
    assert unseeded.split == seeded.split
    np.testing.assert_array_equal(
        _first_pixels(unseeded.dataset()), _first_pixels(seeded.dataset())
    )


def test_label_fraction_source_two_hosts_disjoint_and_covering():
    source = _numbered_source(200, 4)
    subset = subsets.label_fraction_source(source, 0.3, seed=1)
    everything = _first_pixels(subset.dataset())
    shards = [
        _first_pixels(subset.dataset(tf.distribute.InputContext(2, host, 1)))
        for host in range(2)
    ]
    # Host i takes subset examples i::2, like the in-memory sources.
    for host, shard in enumerate(shards):
        np.testing.assert_array_equal(shard, everything[host::2])
    assert not set(shards[0]) & set(shards[1])
    assert sorted([*shards[0], *shards[1]]) == everything.tolist()


def test_label_fraction_source_bad_fraction_names_flag():
    with pytest.raises(ValueError, match="--label_fraction=1.01"):
        subsets.label_fraction_source(_numbered_source(10, 2), 1.01, 0)


def test_label_fraction_source_unlabelled_source_raises():
    unlabelled = source_lib.from_arrays(
        "flat", "train", np.zeros((4, 2, 2, 1), np.uint8), np.full(4, -1), 0
    )
    with pytest.raises(ValueError, match="unlabelled"):
        subsets.label_fraction_source(unlabelled, 0.5, 0)


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt raises at once (urllib3 would retry minutes)."""

    def refuse(*args, **kwargs):
        raise RuntimeError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.mark.parametrize("config", ["1pct", "10pct"])
def test_open_source_imagenet_subset_under_mock_data(
    config, no_network, tmp_path
):
    # SimCLRv2's ImageNet label subsets are tfds builder configs; the mock
    # serves random examples from the builder's features, never the network.
    policy = tfds.testing.MockPolicy.USE_CODE
    with tfds.testing.mock_data(num_examples=3, policy=policy):
        source = registry.open_source(
            f"imagenet2012_subset/{config}", "train", data_dir=str(tmp_path)
        )
        examples = list(source.dataset().as_numpy_iterator())
    assert (source.num_classes, source.image_shape) == (1000, (None, None, 3))
    assert source.num_examples == len(examples) == 3
    for image, label in examples:
        assert image.dtype == np.uint8 and image.ndim == 3
        assert image.shape[-1] == 3
        assert label.dtype == np.int64 and 0 <= label < 1000
