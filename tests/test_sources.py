"""Tests for simclr_tf.data.sources: IDX files, Fashion-MNIST, synthetic, tfds.

tfds is only used under tfds.testing.mock_data: a real tfds.load without the
data prepared would try the network for minutes.
"""

from __future__ import annotations

import gzip
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from simclr_tf.data.sources import base as source_lib
from simclr_tf.data.sources import fashion_mnist, registry, synthetic

SYSTEM_DIR = fashion_mnist.FASHION_MNIST_SYSTEM_DIR
needs_system_fashion_mnist = pytest.mark.skipif(
    not os.path.isfile(os.path.join(SYSTEM_DIR, "train-images-idx3-ubyte.gz")),
    reason="Debian's dataset-fashion-mnist is not installed",
)


def write_idx(path, array: np.ndarray, type_byte: int, compress: bool):
    """Writes an IDX file from the format's definition (big-endian)."""
    header = bytes([0, 0, type_byte, array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    big_endian = array.astype(array.dtype.newbyteorder(">"))
    data = header + big_endian.tobytes()
    with open(path, "wb") as handle:
        handle.write(gzip.compress(data) if compress else data)


def as_arrays(source: source_lib.Source) -> tuple[np.ndarray, np.ndarray]:
    return next(source.dataset().batch(source.num_examples).as_numpy_iterator())


@pytest.mark.parametrize(
    "dtype, type_byte, compress",
    [(np.uint8, 0x08, True), (np.int32, 0x0C, False), (np.float32, 0x0D, True)],
)
def test_read_idx_round_trips_written_array(
    tmp_path, dtype, type_byte, compress
):
    rng = np.random.default_rng(0)
    array = (rng.uniform(-1000, 1000, size=(3, 4, 5)) % 256).astype(dtype)
    path = tmp_path / "array.idx"
    write_idx(path, array, type_byte, compress)
    result = fashion_mnist.read_idx(str(path))
    assert result.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(result, array)


def test_read_idx_rejects_bad_magic(tmp_path):
    path = tmp_path / "bad.idx"
    path.write_bytes(b"\x12\x34\x08\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match="not an IDX file"):
        fashion_mnist.read_idx(str(path))


def test_read_idx_rejects_unknown_type_byte(tmp_path):
    path = tmp_path / "bad_type.idx"
    path.write_bytes(b"\x00\x00\x07\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match="type byte 0x07"):
        fashion_mnist.read_idx(str(path))


def test_read_idx_rejects_truncated_file(tmp_path):
    path = tmp_path / "short.idx"
    write_idx(path, np.zeros((2, 3), np.uint8), 0x08, compress=False)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match="truncated"):
        fashion_mnist.read_idx(str(path))


@needs_system_fashion_mnist
@pytest.mark.parametrize("split, size", [("train", 60000), ("test", 10000)])
def test_fashion_mnist_system_split_sizes(split, size):
    source = registry.open_source("fashion_mnist", split)
    assert source.num_examples == size
    assert source.image_shape == (28, 28, 1)
    assert source.num_classes == 10
    assert source.origin == SYSTEM_DIR
    spec = source.dataset().element_spec
    assert spec[0].dtype == tf.uint8 and spec[1].dtype == tf.int64


@needs_system_fashion_mnist
def test_fashion_mnist_train_class_balance_and_pixel_mean():
    source = registry.open_source("fashion_mnist", "train")
    images, labels = next(
        source.dataset().batch(source.num_examples).as_numpy_iterator()
    )
    # Published: 6000 training images per class.
    np.testing.assert_array_equal(np.bincount(labels), [6000] * 10)
    # Published train mean 0.2860 (4 digits) x 255 = 72.93 +- 0.013.
    assert abs(images.mean() - 0.2860 * 255) < 0.02


def write_fashion_mnist_dir(directory, split_prefix, images, labels):
    write_idx(
        directory / f"{split_prefix}-images-idx3-ubyte.gz",
        images,
        0x08,
        compress=True,
    )
    write_idx(
        directory / f"{split_prefix}-labels-idx1-ubyte.gz",
        labels,
        0x08,
        compress=True,
    )


def test_fashion_mnist_reads_idx_from_data_dir(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(5, 4, 6), dtype=np.uint8)
    labels = np.array([3, 0, 9, 3, 1], np.uint8)
    write_fashion_mnist_dir(tmp_path, "t10k", images, labels)
    source = registry.open_source(
        "fashion_mnist", "test", data_dir=str(tmp_path)
    )
    assert source.num_examples == 5 and source.image_shape == (4, 6, 1)
    assert source.origin == str(tmp_path)
    # The IDX files hold no names; ours must be tfds's for the same data.
    tfds_names = tfds.builder("fashion_mnist").info.features["label"].names
    assert source.class_names == tuple(tfds_names)
    got_images, got_labels = as_arrays(source)
    np.testing.assert_array_equal(got_images, images[..., None])
    np.testing.assert_array_equal(got_labels, labels.astype(np.int64))


def test_fashion_mnist_validation_split_suggests_test():
    with pytest.raises(ValueError, match='use "test"'):
        registry.open_source("fashion_mnist", "validation")


def test_fashion_mnist_falls_back_to_tfds_without_idx_files(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(
        fashion_mnist, "FASHION_MNIST_SYSTEM_DIR", str(tmp_path / "absent")
    )
    with tfds.testing.mock_data(
        num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE
    ):
        source = registry.open_source(
            "fashion_mnist", "train", data_dir=str(tmp_path)
        )
        assert source.origin.startswith("tfds:")
        # Under mock info.splits is empty, so the size is counted.
        assert source.num_examples == 6
        assert source.image_shape == (28, 28, 1)
        assert len(list(source.dataset())) == 6
        assert source.class_names[0] == "T-shirt/top"  # from the tfds info


def test_synthetic_is_deterministic_and_splits_differ():
    train_a = as_arrays(registry.open_source("synthetic", "train"))
    train_b = as_arrays(registry.open_source("synthetic", "train"))
    test = as_arrays(registry.open_source("synthetic", "test"))
    np.testing.assert_array_equal(train_a[0], train_b[0])
    np.testing.assert_array_equal(train_a[1], train_b[1])
    assert train_a[0].shape == (512, 32, 32, 3)
    assert test[0].shape == (256, 32, 32, 3)
    assert not np.array_equal(train_a[0][:256], test[0])


def test_synthetic_gray_shape_and_balanced_labels():
    source = registry.open_source("synthetic_gray", "train")
    assert source.image_shape == (28, 28, 1) and source.num_classes == 10
    _, labels = as_arrays(source)
    # 512 = 10 x 51 + 2: two classes get one extra example.
    assert sorted(np.bincount(labels)) == [51] * 8 + [52] * 2


def fourier_features(images: np.ndarray) -> np.ndarray:
    """Translation-invariant features: |FFT| of the centred gray image."""
    gray = images.astype(np.float64).mean(-1)
    gray -= gray.mean(axis=(1, 2), keepdims=True)
    spectrum = np.abs(np.fft.fft2(gray)).reshape(len(gray), -1)
    return spectrum / np.linalg.norm(spectrum, axis=1, keepdims=True)


def test_synthetic_classes_are_learnable_from_shape():
    train_images, train_labels = synthetic.synthetic_arrays(512, 32, 3, 10, 0)
    test_images, test_labels = synthetic.synthetic_arrays(256, 32, 3, 10, 1)
    train, test = fourier_features(train_images), fourier_features(test_images)
    centroids = np.stack([train[train_labels == k].mean(0) for k in range(10)])
    accuracy = np.mean(np.argmax(test @ centroids.T, 1) == test_labels)
    # Patterns sit at random positions, so a nearest-centroid classifier on
    # |FFT| must beat chance (0.1) by far if the shape carries the class.
    assert accuracy > 0.5


def test_synthetic_rejects_too_many_classes():
    with pytest.raises(ValueError, match="num_classes=11"):
        synthetic.synthetic(num_examples=20, num_classes=11)


def test_source_dataset_shards_by_input_context():
    source = synthetic.synthetic(num_examples=7, image_size=8, channels=1)
    _, labels = as_arrays(source)
    shards = [
        [
            int(label)
            for _, label in source.dataset(
                tf.distribute.InputContext(
                    num_input_pipelines=2, input_pipeline_id=index
                )
            ).as_numpy_iterator()
        ]
        for index in range(2)
    ]
    # Host i of 2 reads examples i, i + 2, ... (Dataset.shard semantics).
    assert shards == [list(labels[0::2]), list(labels[1::2])]


def test_tfds_mock_cifar10_source():
    with tfds.testing.mock_data(
        num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE
    ):
        source = registry.open_source("cifar10", "train")
        assert source.num_classes == 10
        assert source.image_shape == (32, 32, 3)
        assert source.num_examples == 5
        image, label = next(iter(source.dataset()))
        assert image.dtype == tf.uint8 and label.dtype == tf.int64


def test_open_source_unknown_dataset_names_it():
    with pytest.raises(ValueError, match="'fashion_mnst'.*fashion_mnist"):
        registry.open_source("fashion_mnst", "train")
