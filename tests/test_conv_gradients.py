"""Tests for simclr_tf.models.conv_gradients against TensorFlow's autodiff
gradient of tf.nn.conv2d and against numpy sums written from the definition.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.models import conv, conv_gradients

# (H, W, kernel, stride, padding): every conv shape of the ResNets (the
# strided ones run VALID on an input padded by (k - 1) // 2 before and the
# rest after: 28 -> 30, 14 -> 16, 7 -> 9; 1x1 shortcuts unpadded, odd
# sides 7 -> 4), the 7x7/2 ImageNet stem, 5x5 kernels, and SAME with
# strides on even and odd sides, non-square sides and kernels.
SHAPES = [
    (28, 28, 3, 1, "SAME"),
    (30, 30, 3, 2, "VALID"),
    (28, 28, 1, 2, "VALID"),
    (14, 14, 3, 1, "SAME"),
    (16, 16, 3, 2, "VALID"),
    (14, 14, 1, 2, "VALID"),
    (7, 7, 3, 1, "SAME"),
    (9, 9, 3, 2, "VALID"),
    (7, 7, 1, 2, "VALID"),
    (7, 7, 1, 1, "SAME"),
    (4, 4, 3, 1, "SAME"),
    (19, 19, 7, 2, "VALID"),
    (14, 14, 7, 2, "SAME"),
    (7, 7, 5, 1, "SAME"),
    (8, 8, 5, 2, "SAME"),
    (8, 8, 3, 2, "SAME"),
    (7, 7, 3, 2, "SAME"),
    (6, 5, 3, 1, "VALID"),
    (9, 6, 3, 2, "VALID"),
]
BATCH, IN_CHANNELS, OUT_CHANNELS = 2, 3, 5
# Float32, one relative tolerance: the same products summed in another
# order (eps 6e-8, sums of at most ~1000 terms here).
RELATIVE_TOLERANCE = 1e-5


def _autodiff(shape, seed=0):
    """x, kernel, dy (float32) and TensorFlow's (dx, dw) for one SHAPES
    entry, computed in float64: Eigen's kernels, which oneDNN never
    replaces (its AVX2 filter gradient of 1x1 stride-2 convs with few input
    channels was wrong on a Zen 3, benchmarks/RESULTS.md)."""
    height, width, kernel_size, stride, padding = shape
    rng = np.random.default_rng(seed)
    x_shape = (BATCH, height, width, IN_CHANNELS)
    x = tf.cast(rng.normal(size=x_shape), tf.float32)
    kernel_shape = (kernel_size, kernel_size, IN_CHANNELS, OUT_CHANNELS)
    kernel = tf.cast(rng.normal(size=kernel_shape), tf.float32)
    wide_x, wide_kernel = tf.cast(x, tf.float64), tf.cast(kernel, tf.float64)
    with tf.GradientTape() as tape:
        tape.watch([wide_x, wide_kernel])
        y = tf.nn.conv2d(wide_x, wide_kernel, stride, padding)
    dy = tf.cast(rng.normal(size=y.shape), tf.float32)
    dx, dw = tape.gradient(
        y, [wide_x, wide_kernel], output_gradients=tf.cast(dy, tf.float64)
    )
    return x, kernel, dy, tf.cast(dx, tf.float32), tf.cast(dw, tf.float32)


def _axes(shape):
    height, width, kernel_size, stride, padding = shape
    return (
        conv_gradients.axis(height, kernel_size, stride, padding),
        conv_gradients.axis(width, kernel_size, stride, padding),
    )


def _assert_close(actual, expected, tolerance=RELATIVE_TOLERANCE):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    scale = np.abs(expected).max()
    assert np.abs(actual - expected).max() <= tolerance * scale


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_axis_output_and_padding_match_tensorflow(shape):
    x, kernel, dy, _, _ = _autodiff(shape)
    rows, cols = _axes(shape)
    assert (rows.output, cols.output) == tuple(dy.shape[1:3])
    # Zero-padding by (before, after) then VALID gives TensorFlow's output.
    padded = tf.pad(
        x,
        [[0, 0], [rows.before, rows.after], [cols.before, cols.after]]
        + [[0, 0]],
    )
    expected = tf.nn.conv2d(x, kernel, shape[3], shape[4])
    actual = tf.nn.conv2d(padded, kernel, shape[3], "VALID")
    _assert_close(actual, expected)


@pytest.mark.parametrize("method", conv_gradients.INPUT_METHODS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_input_gradient_equals_autodiff(shape, method):
    _, kernel, dy, dx, _ = _autodiff(shape)
    rows, cols = _axes(shape)
    actual = conv_gradients.input_gradient(dy, kernel, rows, cols, method)
    _assert_close(actual, dx)


@pytest.mark.parametrize("method", conv_gradients.FILTER_METHODS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_filter_gradient_equals_autodiff(shape, method):
    _, _, kernel_size, stride, _ = shape
    if method == "tensorflow" and conv.tensorflow_filter_gradient_is_wrong(
        kernel_size, stride, IN_CHANNELS
    ):
        pytest.skip("oneDNN's AVX2 filter gradient is wrong here (conv.py)")
    x, kernel, dy, _, dw = _autodiff(shape)
    rows, cols = _axes(shape)
    actual = conv_gradients.filter_gradient(
        x, dy, tuple(kernel.shape), rows, cols, method
    )
    _assert_close(actual, dw)


def _numpy_gradients(x, kernel, dy, stride, before):
    """dx and dw from the definition y[o] = sum_t x_p[s o + t] w[t],
    as loops over output pixels and taps (x_p: x zero-padded by `before`
    rows/columns in front and enough behind)."""
    batch, height, width, _ = x.shape
    k = kernel.shape[0]
    _, out_h, out_w, _ = dy.shape
    size_h = max(height + before, stride * (out_h - 1) + k)
    size_w = max(width + before, stride * (out_w - 1) + k)
    padded = np.zeros((batch, size_h, size_w, x.shape[3]))
    padded[:, before : before + height, before : before + width] = x
    dx_padded, dw = np.zeros_like(padded), np.zeros(kernel.shape)
    for i in range(out_h):
        for j in range(out_w):
            for a in range(k):
                for b in range(k):
                    row, col = stride * i + a, stride * j + b
                    dx_padded[:, row, col] += dy[:, i, j] @ kernel[a, b].T
                    dw[a, b] += padded[:, row, col].T @ dy[:, i, j]
    return dx_padded[:, before : before + height, before : before + width], dw


@pytest.mark.parametrize("shape", [(9, 9, 3, 2, "VALID"), (7, 7, 3, 2, "SAME")])
def test_default_formulations_match_numpy_definition(shape):
    x, kernel, dy, _, _ = _autodiff(shape, seed=1)
    rows, cols = _axes(shape)
    dx, dw = _numpy_gradients(
        np.asarray(x, np.float64),
        np.asarray(kernel, np.float64),
        np.asarray(dy, np.float64),
        shape[3],
        rows.before,
    )
    for method in ("conv", "phases"):
        actual = conv_gradients.input_gradient(dy, kernel, rows, cols, method)
        _assert_close(actual, dx)
    actual = conv_gradients.filter_gradient(
        x, dy, tuple(kernel.shape), rows, cols, "patches"
    )
    _assert_close(actual, dw)


def test_same_padding_puts_the_odd_row_after():
    # TensorFlow's SAME: 8 rows, k=3, s=2 -> 4 outputs need 9 rows: 0 / 1.
    assert conv_gradients.axis(8, 3, 2, "SAME")[4:] == (0, 1, 4)
    assert conv_gradients.axis(7, 3, 2, "SAME")[4:] == (1, 1, 4)
    assert conv_gradients.axis(9, 3, 2, "VALID")[4:] == (0, 0, 4)
