"""The two gradients of an NHWC conv2d, each in several formulations.

For y[b, o] = sum_t x_p[b, s o + t] w[t] (x_p: the input padded as SAME or
VALID asks; o, t: 2-D output and tap positions; s: stride), the input
gradient is dx_p[i] = sum_{s o + t = i} dy[o] w[t], a convolution of dy
with the flipped, in/out-transposed kernel, and the filter gradient is
dw[t] = sum_{b, o} x_p[b, s o + t] dy[b, o], a product of image patches
with dy. Each function here computes one of them from forward convolutions,
matmuls and TensorFlow's own backprop kernels; models/conv.py picks one per
kernel size and stride. Shapes must be static except the batch.
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf

INPUT_METHODS = ("tensorflow", "conv", "phases", "dilated")
FILTER_METHODS = ("tensorflow", "patches", "swapped")


class Axis(NamedTuple):
    """One spatial axis of a convolution.

    size: input side n; kernel: k; stride: s; padding: "SAME" or "VALID";
    before, after: zero rows padded on each side (SAME's split, or 0 for
    VALID); output: the output side, (n + before + after - k) // s + 1.
    """

    size: int
    kernel: int
    stride: int
    padding: str
    before: int
    after: int
    output: int


def axis(size: int, kernel: int, stride: int, padding: str) -> Axis:
    """TensorFlow's padding arithmetic for one spatial axis.

    Args:
      size: input side >= 1.
      kernel: kernel side >= 1.
      stride: stride >= 1.
      padding: "SAME" (output ceil(size / stride), the padding split with
        the odd row after) or "VALID" (no padding).

    Returns:
      The Axis.
    """
    if padding == "SAME":
        output = -(-size // stride)
        total = max((output - 1) * stride + kernel - size, 0)
        before, after = total // 2, total - total // 2
        return Axis(size, kernel, stride, padding, before, after, output)
    output = (size - kernel) // stride + 1
    return Axis(size, kernel, stride, padding, 0, 0, output)


def _flip_transpose(kernel: tf.Tensor) -> tf.Tensor:
    """[kh, kw, ci, co] -> [kh, kw, co, ci], reversed along kh and kw."""
    return tf.transpose(tf.reverse(kernel, [0, 1]), [0, 1, 3, 2])


def _interleave(phases: list[list[tf.Tensor]], rows: Axis, cols: Axis):
    """Phase (r, c) images [B, Q, P, C] -> [B, size_h, size_w, C] with
    pixel (s q + r - before_h, s p + c - before_w) from phase (r, c)."""
    stacked = tf.stack([tf.stack(row, axis=3) for row in phases], axis=2)
    shape = tf.shape(stacked)  # [B, Q, s, P, s, C]
    merged = tf.reshape(
        stacked,
        [shape[0], shape[1] * shape[2], shape[3] * shape[4], shape[5]],
    )
    return merged[
        :,
        rows.before : rows.before + rows.size,
        cols.before : cols.before + cols.size,
    ]


def _matmul_channels(values: tf.Tensor, matrix: tf.Tensor) -> tf.Tensor:
    """[B, H, W, C] @ [C, D] -> [B, H, W, D] as one 2-D matmul."""
    shape = tf.shape(values)
    flat = tf.reshape(values, [-1, values.shape[-1]])
    product = tf.matmul(flat, matrix)
    return tf.reshape(
        product, tf.concat([shape[:3], [matrix.shape[-1]]], axis=0)
    )


def _phase_conv(dy, kernel, rows: Axis, cols: Axis, r: int, c: int):
    """Phase (r, c) of dx_p: rows s q + r, q < Q; Q = ceil((before +
    size) / s) (rows past before + size are never read).

    dx_p[s q + r] = sum_m dy[q - m] w[s m + r] (per axis): a stride-1
    "full" convolution of dy with the flipped sub-kernel w[r::s].
    """
    sub = kernel[r :: rows.stride, c :: cols.stride]
    batch = tf.shape(dy)[0]
    q_rows = -(-(rows.before + rows.size) // rows.stride)
    q_cols = -(-(cols.before + cols.size) // cols.stride)
    if sub.shape[0] == 0 or sub.shape[1] == 0:
        return tf.zeros([batch, q_rows, q_cols, kernel.shape[2]], dy.dtype)
    if sub.shape[0] == 1 and sub.shape[1] == 1:
        product = _matmul_channels(dy, tf.transpose(sub[0, 0]))
        return tf.pad(
            product,
            [[0, 0], [0, q_rows - rows.output], [0, q_cols - cols.output]]
            + [[0, 0]],
        )
    padding = [
        [0, 0],
        [sub.shape[0] - 1, q_rows - rows.output],
        [sub.shape[1] - 1, q_cols - cols.output],
        [0, 0],
    ]
    return tf.nn.conv2d(dy, _flip_transpose(sub), 1, padding)


def input_gradient(
    dy: tf.Tensor,
    kernel: tf.Tensor,
    rows: Axis,
    cols: Axis,
    method: str,
) -> tf.Tensor:
    """dL/dx of y = conv2d(x, kernel) given dL/dy.

    Methods: "tensorflow" (Conv2DBackpropInput); "conv" (stride 1: one
    forward conv with the flipped, transposed kernel; stride s: all s x s
    phases in one conv with ceil(k/s)^2 taps (zero taps padded) and
    depth_to_space); "phases" (one conv per phase, or a matmul where the
    phase has one tap, interleaved; no zero taps; a 1x1 kernel is one
    matmul dy @ w^T placed on every s-th pixel); "dilated" (zeros inserted
    between dy's pixels, then one stride-1 conv: s^2 x the FLOPs).

    Args:
      dy: [B, rows.output, cols.output, co] float.
      kernel: [kh, kw, ci, co] of dy's dtype.
      rows, cols: the conv's axes (`axis`, one padding), strides equal for
        "conv".
      method: one of INPUT_METHODS.

    Returns:
      [B, rows.size, cols.size, ci] of dy's dtype.
    """
    if method == "tensorflow":
        return _tensorflow_input_gradient(dy, kernel, rows, cols)
    if method == "dilated":
        return _dilated_input_gradient(dy, kernel, rows, cols)
    one_by_one = rows.kernel == cols.kernel == 1
    if rows.stride == cols.stride == 1:
        if method == "phases" and one_by_one:
            return _matmul_channels(dy, tf.transpose(kernel[0, 0]))
        padding = [
            [0, 0],
            [rows.kernel - 1 - rows.before, rows.kernel - 1 - rows.after],
            [cols.kernel - 1 - cols.before, cols.kernel - 1 - cols.after],
            [0, 0],
        ]
        return tf.nn.conv2d(dy, _flip_transpose(kernel), 1, padding)
    if method == "conv":
        return _polyphase_input_gradient(dy, kernel, rows, cols)
    phases = [
        [_phase_conv(dy, kernel, rows, cols, r, c) for c in range(cols.stride)]
        for r in range(rows.stride)
    ]
    return _interleave(phases, rows, cols)


def _tensorflow_input_gradient(dy, kernel, rows: Axis, cols: Axis):
    """TensorFlow's kernel, called as TensorFlow's Conv2D gradient does."""
    batch = tf.shape(dy)[0]
    sizes = tf.stack([batch, rows.size, cols.size, kernel.shape[2]])
    return tf.raw_ops.Conv2DBackpropInput(
        input_sizes=sizes,
        filter=kernel,
        out_backprop=dy,
        strides=[1, rows.stride, cols.stride, 1],
        padding=rows.padding,
    )


def _polyphase_input_gradient(dy, kernel, rows: Axis, cols: Axis):
    """All s x s phases as output channels of one conv, depth_to_space."""
    stride = rows.stride
    kh, kw, ci, co = kernel.shape
    taps_h, taps_w = -(-kh // stride), -(-kw // stride)
    padded = tf.pad(
        kernel,
        [[0, taps_h * stride - kh], [0, taps_w * stride - kw]] + [[0, 0]] * 2,
    )
    # Tap s m + r -> [m, r]; flip m; phases (r, c) then ci on the channels.
    padded = tf.reshape(padded, [taps_h, stride, taps_w, stride, ci, co])
    padded = tf.reverse(padded, [0, 2])
    padded = tf.transpose(padded, [0, 2, 5, 1, 3, 4])
    phases_kernel = tf.reshape(padded, [taps_h, taps_w, co, stride**2 * ci])
    q_rows = -(-(rows.before + rows.size) // stride)
    q_cols = -(-(cols.before + cols.size) // stride)
    padding = [
        [0, 0],
        [taps_h - 1, q_rows - rows.output],
        [taps_w - 1, q_cols - cols.output],
        [0, 0],
    ]
    phases = tf.nn.conv2d(dy, phases_kernel, 1, padding)
    merged = tf.nn.depth_to_space(phases, stride)
    return merged[
        :,
        rows.before : rows.before + rows.size,
        cols.before : cols.before + cols.size,
    ]


def _dilated(values: tf.Tensor, rows: Axis, cols: Axis) -> tf.Tensor:
    """[B, H, W, C] -> [B, s H, s W, C], pixel (i, j) at (s i, s j)."""
    shape = tf.shape(values)
    spread = values[:, :, None, :, None, :]
    spread = tf.pad(
        spread,
        [[0, 0], [0, 0], [0, rows.stride - 1], [0, 0], [0, cols.stride - 1]]
        + [[0, 0]],
    )
    return tf.reshape(
        spread,
        [shape[0], shape[1] * rows.stride, shape[2] * cols.stride, shape[3]],
    )


def _dilated_input_gradient(dy, kernel, rows: Axis, cols: Axis):
    """Zeros between dy's pixels, then a stride-1 full conv."""
    dilated = _dilated(dy, rows, cols)
    padding, ends = [[0, 0]], []
    for ax in (rows, cols):
        before = ax.kernel - 1 - ax.before
        # Output side = dilated side + before + after - k + 1 = ax.size.
        after = ax.size + ax.kernel - 1 - ax.output * ax.stride - before
        ends.append(ax.output * ax.stride + min(after, 0))
        padding.append([before, max(after, 0)])
    padding.append([0, 0])
    dilated = dilated[:, : ends[0], : ends[1]]
    return tf.nn.conv2d(dilated, _flip_transpose(kernel), 1, padding)


def filter_gradient(
    x: tf.Tensor,
    dy: tf.Tensor,
    kernel_shape: tuple[int, int, int, int],
    rows: Axis,
    cols: Axis,
    method: str,
) -> tf.Tensor:
    """dL/dw of y = conv2d(x, w) given dL/dy.

    Methods: "tensorflow" (Conv2DBackpropFilter); "patches" (image patches
    [B Ho Wo, kh kw ci] from tf.image.extract_patches, times dy [B Ho Wo,
    co], one matmul; for a 1x1 kernel, x itself or every s-th pixel);
    "swapped" (a forward conv of x with batch and channels swapped, [ci, H,
    W, B], by dy as a [Ho, Wo, B, co] kernel dilated by the stride).

    Args:
      x: [B, rows.size, cols.size, ci] float.
      dy: [B, rows.output, cols.output, co] of x's dtype.
      kernel_shape: (kh, kw, ci, co).
      rows, cols: the conv's axes (`axis`, one padding).
      method: one of FILTER_METHODS.

    Returns:
      [kh, kw, ci, co] of x's dtype.
    """
    kh, kw, ci, co = kernel_shape
    if method == "tensorflow":
        return tf.raw_ops.Conv2DBackpropFilter(
            input=x,
            filter_sizes=kernel_shape,
            out_backprop=dy,
            strides=[1, rows.stride, cols.stride, 1],
            padding=rows.padding,
        )
    padded = x
    if rows.before or rows.after or cols.before or cols.after:
        padded = tf.pad(
            x,
            [[0, 0], [rows.before, rows.after], [cols.before, cols.after]]
            + [[0, 0]],
        )
    if method == "swapped":
        swapped = tf.nn.conv2d(
            tf.transpose(padded, [3, 1, 2, 0]),  # [ci, Hp, Wp, B]
            tf.transpose(dy, [1, 2, 0, 3]),  # [Ho, Wo, B, co]
            strides=1,
            padding="VALID",
            dilations=[rows.stride, cols.stride],
        )  # [ci, >= kh, >= kw, co]
        return tf.transpose(swapped[:, :kh, :kw], [1, 2, 0, 3])
    patches = padded
    if (kh, kw, rows.stride, cols.stride) != (1, 1, 1, 1):
        patches = tf.image.extract_patches(
            padded,
            sizes=[1, kh, kw, 1],
            strides=[1, rows.stride, cols.stride, 1],
            rates=[1, 1, 1, 1],
            padding="VALID",
        )  # [B, Ho, Wo, kh kw ci], taps in (kh, kw, ci) order.
    product = tf.matmul(
        tf.reshape(patches, [-1, kh * kw * ci]),
        tf.reshape(dy, [-1, co]),
        transpose_a=True,
    )
    return tf.reshape(product, kernel_shape)
