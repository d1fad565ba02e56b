"""Stateless randomness for the batched augmentations, and input checks.

A seed is int32 [2]; each op draws [B]-shaped values from its own seed with
TF's stateless ops, so a seed repeats eagerly, in tf.data and under XLA
alike. No image ops live here.
"""

from __future__ import annotations

import tensorflow as tf

# Philox named explicitly, not TF's "auto_select" (Philox on CPU too):
# under XLA, auto_select's draws disagree with the kernels' for negative
# seeds and took 170 ms for 512 x 100 x 4 int32 draws, Philox's 2.4 ms.
_ALGORITHM = "philox"


def as_float(image: tf.Tensor) -> tf.Tensor:
    """uint8 0..255 or float 0..1 [..., H, W, C] -> float32 0..1."""
    image = tf.convert_to_tensor(image)
    if image.dtype == tf.uint8:
        return tf.image.convert_image_dtype(image, tf.float32)
    if not image.dtype.is_floating:
        raise TypeError(
            f"image dtype {image.dtype.name} is not supported; pass uint8 "
            "0..255 or float 0..1 (e.g. tf.image.convert_image_dtype)."
        )
    return tf.cast(image, tf.float32)


def channels(image: tf.Tensor) -> int:
    """Static channel count, which must be 1 or 3."""
    count = image.shape[-1]
    if count not in (1, 3):
        raise ValueError(
            f"image has {count} channels (shape {image.shape}); it must "
            "have a static last dimension of 1 or 3, e.g. decode with "
            "tf.io.decode_image(..., channels=3, expand_animations=False)."
        )
    return count


def batch_size(images: tf.Tensor) -> tf.Tensor:
    """B of [B, H, W, C] images, static where known."""
    if images.shape.rank != 4:
        raise ValueError(
            f"images {images.shape} must be a [B, H, W, C] batch; for one "
            "image use views.simclr_augment or image[None]."
        )
    return images.shape[0] or tf.shape(images)[0]


def as_seed(seed: tf.Tensor | None) -> tf.Tensor:
    """An int32 [2] seed; None draws one at random."""
    if seed is None:
        return tf.random.uniform([2], maxval=tf.int32.max, dtype=tf.int32)
    seed = tf.convert_to_tensor(seed)
    if seed.shape.rank is not None and seed.shape != [2]:
        raise ValueError(
            f"seed {seed.shape} must be one int32 [2] stateless seed per "
            "call (per batch), e.g. tf.constant([0, step])."
        )
    return tf.cast(seed, tf.int32)


def split(seed: tf.Tensor, count: int) -> list[tf.Tensor]:
    """`count` independent int32 [2] seeds derived from `seed`."""
    seeds = tf.random.experimental.stateless_split(
        as_seed(seed), count, alg=_ALGORITHM
    )
    return tf.unstack(seeds, num=count)


def uniform(
    seed: tf.Tensor,
    shape: tf.Tensor | tuple,
    minval: float | tf.Tensor = 0.0,
    maxval: float | tf.Tensor = 1.0,
) -> tf.Tensor:
    """Stateless float32 U[minval, maxval), the same on every path.

    Under XLA, tf.random.stateless_uniform's float draws differ from its
    kernels' (every value, for the same seed and algorithm) while its int32
    bits agree, so the top 24 bits are mapped to an exact float32 in
    [0, 1) here.

    Args:
      seed: int32 [2] stateless seed.
      shape: shape of the draw, e.g. [B] or [B, 4].
      minval: lower bound, broadcastable to shape.
      maxval: upper bound, broadcastable to shape.

    Returns:
      float32 tensor of `shape`.
    """
    bits = tf.random.stateless_uniform(
        shape,
        as_seed(seed),
        minval=None,
        maxval=None,
        dtype=tf.int32,
        alg=_ALGORITHM,
    )
    mantissa = tf.bitwise.bitwise_and(tf.bitwise.right_shift(bits, 8), 0xFFFFFF)
    unit = tf.cast(mantissa, tf.float32) * (2.0**-24)
    return minval + (maxval - minval) * unit


def per_image(
    seed: tf.Tensor,
    shape: tf.Tensor | tuple,
    minval: float | tf.Tensor = 0.0,
    maxval: float | tf.Tensor = 1.0,
) -> tf.Tensor:
    """`uniform` for values an op broadcasts over each image's pixels.

    Through a gather that XLA keeps as its own computation: otherwise XLA
    fuses the whole Philox draw into the [B, H, W, C] consumer and redoes
    it for every pixel (measured on a CPU: distort of 512 x 32 x 32 x 3
    views took 140 ms instead of 70 ms).

    Args:
      seed: int32 [2] stateless seed.
      shape: [B] or [B, K].
      minval: lower bound, broadcastable to shape.
      maxval: upper bound, broadcastable to shape.

    Returns:
      float32 tensor of `shape`, equal to uniform(seed, shape, ...).
    """
    values = uniform(seed, shape, minval, maxval)
    return tf.gather(values, tf.range(tf.shape(values)[0]))


def bernoulli(seed: tf.Tensor, count: tf.Tensor, p: float) -> tf.Tensor:
    """bool [count], each true with probability p."""
    return per_image(seed, [count]) < p


def random_index(unit: tf.Tensor, count: tf.Tensor) -> tf.Tensor:
    """Integer in [0, count) from `unit` in [0, 1); 0 when count <= 0."""
    index = tf.cast(tf.floor(unit * tf.cast(count, tf.float32)), tf.int32)
    return tf.clip_by_value(index, 0, tf.maximum(count - 1, 0))


def select(mask: tf.Tensor, chosen: tf.Tensor, other: tf.Tensor) -> tf.Tensor:
    """Per image: `chosen` where mask [B] is true, else `other`.

    A batched op computes a random transform for every image and keeps it
    where its draw says so (GR's random_apply, per image).
    """
    return tf.where(tf.reshape(mask, [-1, 1, 1, 1]), chosen, other)
