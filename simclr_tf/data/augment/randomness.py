"""Stateless random helpers shared by the augmentations, per image and batched.

Per image: seeds are int32 [2] and the draws come from TF's stateless ops.
Batched: seeds are int32 [..., 2] and Philox-4x32-10 is evaluated here with
integer ops, bit-identical to those stateless ops row by row (a vectorised
map over TF's kernels would fall back to a loop). No image ops live here.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

# Philox-4x32-10 (Salmon et al. 2011) constants, as in TF's philox_random.h.
_PHILOX_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
_PHILOX_KEY_STEPS = (0x9E3779B9, 0xBB67AE85)
_PHILOX_ROUNDS = 10
# TF's GenerateKey scrambles a seed by one Philox call under this key.
_SEED_SCRAMBLE_KEY = (0x3EC8F720, 0x02461E29)
_LOW_32_BITS = 0xFFFFFFFF


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


def as_seed(seed: tf.Tensor | None) -> tf.Tensor:
    """A non-negative int32 [..., 2] seed; None draws one [2] at random.

    XLA accepts only int32 seeds and extends negative ones differently from
    TF's kernels (the draws disagree), so the sign bit is cleared.
    """
    if seed is None:
        return tf.random.uniform([2], maxval=tf.int32.max, dtype=tf.int32)
    return tf.bitwise.bitwise_and(tf.cast(seed, tf.int32), 0x7FFFFFFF)


def split(seed: tf.Tensor, count: int) -> list[tf.Tensor]:
    """`count` independent int32 [2] seeds derived from `seed`."""
    seeds = tf.random.experimental.stateless_split(as_seed(seed), count)
    return tf.unstack(seeds, num=count)


def _bits_to_unit(bits: tf.Tensor) -> tf.Tensor:
    """int32 random bits -> exact float32 in [0, 1) from the top 24 bits."""
    mantissa = tf.bitwise.bitwise_and(tf.bitwise.right_shift(bits, 8), 0xFFFFFF)
    return tf.cast(mantissa, tf.float32) * (2.0**-24)


def uniform(
    seed: tf.Tensor,
    shape: tuple[int, ...] = (),
    minval: float | tf.Tensor = 0.0,
    maxval: float | tf.Tensor = 1.0,
) -> tf.Tensor:
    """Stateless float32 U[minval, maxval), bit-identical on every path.

    XLA turns random bits into floats differently from TF's kernels (the
    stateless float draws disagree), while the integer bits agree, so the
    top 24 bits are mapped to an exact float32 in [0, 1) here.
    """
    bits = tf.random.stateless_uniform(
        shape, as_seed(seed), minval=None, maxval=None, dtype=tf.int32
    )
    return minval + (maxval - minval) * _bits_to_unit(bits)


def random_index(unit: tf.Tensor, count: tf.Tensor) -> tf.Tensor:
    """Integer in [0, count) from `unit` in [0, 1); 0 when count <= 0."""
    index = tf.cast(tf.floor(unit * tf.cast(count, tf.float32)), tf.int32)
    return tf.clip_by_value(index, 0, tf.maximum(count - 1, 0))


def apply_with_probability(
    transform: Callable[[tf.Tensor], tf.Tensor],
    image: tf.Tensor,
    seed: tf.Tensor,
    p: float,
) -> tf.Tensor:
    """transform(image) with probability p, else image (GR random_apply)."""
    return tf.cond(uniform(seed) < p, lambda: transform(image), lambda: image)


def _philox(counter: tf.Tensor, key: tf.Tensor) -> tf.Tensor:
    """Philox-4x32-10 on uint32 words held in uint64 tensors.

    Args:
      counter: [..., 4] uint64, each word < 2^32.
      key: [..., 2] uint64 broadcastable against counter's words.

    Returns:
      [..., 4] uint64 output words (< 2^32).

    A product of two 32-bit words fits in 64 bits, so each round's multiply
    high and low halves come from one uint64 product. The rounds run in a
    tf.while_loop: unrolled, each draw would add hundreds of ops that tf.data
    and XLA then spend seconds optimising.
    """
    multipliers = tf.constant(_PHILOX_MULTIPLIERS, tf.uint64)
    key_steps = tf.constant(_PHILOX_KEY_STEPS, tf.uint64)
    low_mask = tf.constant(_LOW_32_BITS, tf.uint64)
    shift = tf.constant(32, tf.uint64)

    def one_round(index: tf.Tensor, counter: tf.Tensor, key: tf.Tensor):
        products = counter[..., ::2] * multipliers  # c0 M0, c2 M1
        high = tf.bitwise.right_shift(products, shift)
        low = tf.bitwise.bitwise_and(products, low_mask)
        # (hi1 ^ c1 ^ k0, hi0 ^ c3 ^ k1)
        mixed = tf.reverse(high, axis=[-1]) ^ counter[..., 1::2] ^ key
        counter = tf.stack(
            [mixed[..., 0], low[..., 1], mixed[..., 1], low[..., 0]], axis=-1
        )
        key = tf.bitwise.bitwise_and(key + key_steps, low_mask)
        return index + 1, counter, key

    _, counter, _ = tf.while_loop(
        lambda index, *_: index < _PHILOX_ROUNDS,
        one_round,
        (tf.constant(0), counter, key),
        maximum_iterations=_PHILOX_ROUNDS,
    )
    return counter


def stateless_bits(seeds: tf.Tensor, count: int) -> tf.Tensor:
    """Random int32 bits per seed, as TF's stateless ops draw them.

    Row i equals tf.random.stateless_uniform([count], seeds[i], dtype=
    tf.int32, minval=None, maxval=None) on CPU, whose auto-selected algorithm
    is Philox: the seed is scrambled into a key and counter (TF's
    GenerateKey; int32 seeds are sign-extended to 64 bits) and output j is
    word j % 4 of Philox(counter + j // 4). So the first n draws do not
    depend on count.

    Args:
      seeds: int32 [..., 2] stateless seeds.
      count: draws per seed.

    Returns:
      [..., count] int32.
    """
    seeds = tf.cast(tf.cast(seeds, tf.int64), tf.uint64)  # sign-extends
    low_mask = tf.constant(_LOW_32_BITS, tf.uint64)
    high = tf.bitwise.right_shift(seeds, tf.constant(32, tf.uint64))
    low = tf.bitwise.bitwise_and(seeds, low_mask)
    words = tf.stack(
        [low[..., 0], high[..., 0], low[..., 1], high[..., 1]], axis=-1
    )
    mixed = _philox(words, tf.constant(_SEED_SCRAMBLE_KEY, tf.uint64))
    blocks = -(-count // 4)
    block_zero = tf.zeros_like(mixed[..., :1]) + tf.zeros([blocks], tf.uint64)
    block_index = tf.cast(tf.range(blocks), tf.uint64) + block_zero
    counter = tf.stack(
        [
            block_index,
            block_zero,
            block_zero + mixed[..., 2:3],
            block_zero + mixed[..., 3:4],
        ],
        axis=-1,
    )  # [..., blocks, 4]
    output = _philox(counter, mixed[..., None, :2])
    output = tf.reshape(
        output, tf.concat([tf.shape(output)[:-2], [blocks * 4]], 0)
    )
    return tf.bitcast(tf.cast(output[..., :count], tf.uint32), tf.int32)


def stateless_split(seeds: tf.Tensor, count: int) -> tf.Tensor:
    """tf.random.experimental.stateless_split for each of many seeds.

    Args:
      seeds: int32 [..., 2] stateless seeds.
      count: new seeds per seed.

    Returns:
      [..., count, 2] int32; row i equals stateless_split(seeds[i], count).
    """
    bits = stateless_bits(seeds, 2 * count)
    return tf.reshape(bits, tf.concat([tf.shape(bits)[:-1], [count, 2]], 0))


def split_batch(seeds: tf.Tensor, count: int) -> list[tf.Tensor]:
    """`split` for each of many seeds: `count` tensors of int32 [..., 2]."""
    return tf.unstack(stateless_split(as_seed(seeds), count), count, axis=-2)


def uniform_batch(
    seeds: tf.Tensor,
    count: int | None = None,
    minval: float | tf.Tensor = 0.0,
    maxval: float | tf.Tensor = 1.0,
) -> tf.Tensor:
    """`uniform` for each of many seeds, bit-identical to it row by row.

    Args:
      seeds: int32 [..., 2] stateless seeds.
      count: draws per seed; None draws one scalar per seed.
      minval: lower bound, broadcastable to the result.
      maxval: upper bound, broadcastable to the result.

    Returns:
      [..., count] float32, or [...] when count is None.
    """
    bits = stateless_bits(as_seed(seeds), 1 if count is None else count)
    if count is None:
        bits = bits[..., 0]
    return minval + (maxval - minval) * _bits_to_unit(bits)
