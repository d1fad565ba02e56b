"""SimCLR's colour distortion and blur on [B, H, W, C] batches.

Colour jitter (brightness, contrast, saturation, hue in a random order),
grayscale and Gaussian blur (paper App. A, google-research/simclr "GR").
Each random op takes one int32 [2] seed and draws one value per image from
it; one image is a batch of one. Crop and resize live in crop.py.
"""

from __future__ import annotations

from typing import Literal

import tensorflow as tf

from simclr_tf.data.augment import randomness

BrightnessImpl = Literal["v1", "v2"]
MAX_COLOR_JITTER_STRENGTH = 1.25  # 1 - 0.8 s must stay >= 0.
LUMA_WEIGHTS = (0.2989, 0.5870, 0.1140)  # tf.image.rgb_to_grayscale's.
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # colour jitter's ops


def check_strength(strength: float) -> None:
    """Raises ValueError unless strength is in [0, 1.25]."""
    if not 0.0 <= strength <= MAX_COLOR_JITTER_STRENGTH:
        raise ValueError(
            f"color_jitter_strength={strength} must be in [0, "
            f"{MAX_COLOR_JITTER_STRENGTH}] so that contrast and saturation "
            "factors U[1 - 0.8 s, 1 + 0.8 s] stay >= 0; use e.g. 1.0 "
            "(ImageNet) or 0.5 (CIFAR-10)."
        )


def _per_image(values: tf.Tensor) -> tf.Tensor:
    """[B] -> [B, 1, 1, 1], to broadcast one value per image."""
    return tf.reshape(values, [-1, 1, 1, 1])


def adjust_brightness(
    images: tf.Tensor, factor_or_delta: tf.Tensor, impl: BrightnessImpl
) -> tf.Tensor:
    """Brightness: v2 multiplies by a factor, v1 adds a delta (unclipped).

    Args:
      images: [B, H, W, C] float.
      factor_or_delta: float [B], the factor (v2) or the delta (v1).
      impl: "v2" (GR default, multiplicative) or "v1" (additive).

    Returns:
      [B, H, W, C] float32.

    Raises:
      ValueError: for an unknown impl.
    """
    if impl == "v2":
        return images * _per_image(factor_or_delta)
    if impl == "v1":
        return images + _per_image(factor_or_delta)
    raise ValueError(f"brightness_impl={impl!r} must be 'v1' or 'v2'.")


def adjust_contrast(images: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """(x - mean) factor + mean, per image and channel mean, unclipped.

    Args:
      images: [B, H, W, C] float.
      factor: float [B] >= 0.

    Returns:
      [B, H, W, C] float32.
    """
    mean = tf.reduce_mean(images, axis=[1, 2], keepdims=True)
    return (images - mean) * _per_image(factor) + mean


def adjust_saturation_and_hue(
    images: tf.Tensor, saturation: tf.Tensor, hue: tf.Tensor
) -> tf.Tensor:
    """HSV: s <- clip(s x saturation, 0, 1), h <- (h + hue) mod 1.

    As tf.image.adjust_saturation and adjust_hue (hue in turns) in one HSV
    round trip; the identity for 1-channel images (no colour to change).

    Args:
      images: [B, H, W, C] float in [0, 1], C in {1, 3}.
      saturation: float [B] factors >= 0 (1: unchanged).
      hue: float [B] deltas in turns (0: unchanged).

    Returns:
      [B, H, W, C] float32.
    """
    if randomness.channels(images) == 1:
        return images
    h, s, v = tf.unstack(tf.image.rgb_to_hsv(images), axis=-1)
    h = tf.math.floormod(h + _per_image(hue)[..., 0], 1.0)
    s = tf.clip_by_value(s * _per_image(saturation)[..., 0], 0.0, 1.0)
    return tf.image.hsv_to_rgb(tf.stack([h, s, v], axis=-1))


def jitter_range(
    op: int, strength: float, impl: BrightnessImpl = "v2"
) -> tuple[float, float]:
    """(low, high) of the uniform draw of jitter op 0..3 (B, C, S, H).

    GR: brightness factor U[max(0, 1 - 0.8 s), 1 + 0.8 s] (v2) or delta
    U[-0.8 s, 0.8 s] (v1); contrast and saturation U[1 - 0.8 s, 1 + 0.8 s];
    hue U[-0.2 s, 0.2 s] turns.
    """
    if op == BRIGHTNESS:
        bound = 0.8 * strength
        if impl == "v1":
            return -bound, bound
        return max(0.0, 1.0 - bound), 1.0 + bound
    if op in (CONTRAST, SATURATION):
        bound = 0.8 * strength
        return 1 - bound, 1 + bound
    bound = 0.2 * strength
    return -bound, bound


def jitter_draws(
    seed: tf.Tensor,
    count: tf.Tensor,
    strength: float,
    impl: BrightnessImpl = "v2",
    random_order: bool = True,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Colour jitter's random values for `count` images.

    Returns:
      factors: float32 [B, 4], image i's brightness, contrast, saturation
        and hue values (jitter_range's laws);
      order: int32 [B, 4], the op at each position: a uniform random
        permutation per image (argsort of 4 uniforms), or 0, 1, 2, 3.
    """
    factor_seed, order_seed = randomness.split(seed, 2)
    ranges = [jitter_range(op, strength, impl) for op in range(4)]
    low = tf.constant([low for low, _ in ranges])
    high = tf.constant([high for _, high in ranges])
    factors = randomness.per_image(factor_seed, [count, 4], low, high)
    if random_order:
        order = tf.argsort(randomness.uniform(order_seed, [count, 4]), axis=-1)
    else:
        order = tf.zeros([count, 4], tf.int32) + tf.range(4)
    return factors, order


def color_jitter(
    images: tf.Tensor,
    strength: float,
    seed: tf.Tensor,
    *,
    brightness_impl: BrightnessImpl = "v2",
    random_order: bool = True,
) -> tf.Tensor:
    """Brightness, contrast, saturation and hue jitter (paper App. A).

    Per image, the four ops run in a random order (jitter_draws) and the
    image is clipped to [0, 1] after each, as GR does. Each position
    computes every op on the batch and keeps, per image, the one its order
    puts there; one HSV round trip serves saturation and hue. For
    1-channel images saturation and hue are the identity. At strength 0
    nothing changes, as in GR.

    Args:
      images: [B, H, W, C] float in [0, 1], C in {1, 3}.
      strength: s in [0, 1.25], Python float; 1.0 ImageNet, 0.5 CIFAR.
      seed: int32 [2] stateless seed for the batch.
      brightness_impl: "v2" multiplicative (GR default) or "v1" additive.
      random_order: shuffle the op order per image.

    Returns:
      [B, H, W, C] float32 in [0, 1].

    Raises:
      ValueError: if strength is outside [0, 1.25] or impl is unknown.
    """
    check_strength(strength)
    images = tf.clip_by_value(randomness.as_float(images), 0.0, 1.0)
    if strength == 0:
        return images
    count = randomness.batch_size(images)
    factors, order = jitter_draws(
        seed, count, strength, brightness_impl, random_order
    )
    factors = tf.unstack(factors, axis=1)
    for position in range(4):
        chosen = order[:, position]
        saturation = tf.where(chosen == SATURATION, factors[SATURATION], 1.0)
        hue = tf.where(chosen == HUE, factors[HUE], 0.0)
        candidates = {
            BRIGHTNESS: adjust_brightness(
                images, factors[BRIGHTNESS], brightness_impl
            ),
            CONTRAST: adjust_contrast(images, factors[CONTRAST]),
            # Saturation or hue: the other one's factor is its identity.
            SATURATION: adjust_saturation_and_hue(images, saturation, hue),
        }
        # Clipped before the select: XLA then keeps each position's result
        # instead of recomputing earlier ones in later ones (measured on a
        # CPU: 51 ms instead of 72 ms for 512 x 32 x 32 x 3).
        clipped = {
            op: tf.clip_by_value(candidate, 0.0, 1.0)
            for op, candidate in candidates.items()
        }
        images = clipped[SATURATION]
        for op in (CONTRAST, BRIGHTNESS):
            images = randomness.select(chosen == op, clipped[op], images)
    return images


def to_grayscale(images: tf.Tensor) -> tf.Tensor:
    """Luma 0.2989 R + 0.5870 G + 0.1140 B, repeated to 3 channels.

    Args:
      images: [..., C] float, C in {1, 3}; C == 1 is returned unchanged.

    Returns:
      A float tensor shaped like `images`.
    """
    if randomness.channels(images) == 1:
        return images
    weights = tf.constant(LUMA_WEIGHTS)
    gray = tf.reduce_sum(images * weights, -1, keepdims=True)
    return tf.concat([gray, gray, gray], axis=-1)


def random_color_distortion(
    images: tf.Tensor,
    strength: float,
    seed: tf.Tensor,
    *,
    brightness_impl: BrightnessImpl = "v2",
) -> tf.Tensor:
    """Colour jitter with p = 0.8, then grayscale with p = 0.2, per image.

    GR's random_color_jitter. Args as color_jitter; seed: int32 [2].

    Returns:
      [B, H, W, C] float32 in [0, 1].
    """
    jitter_seed, apply_seed, gray_seed = randomness.split(seed, 3)
    images = tf.clip_by_value(randomness.as_float(images), 0.0, 1.0)
    count = randomness.batch_size(images)
    jittered = color_jitter(
        images, strength, jitter_seed, brightness_impl=brightness_impl
    )
    jitter = randomness.bernoulli(apply_seed, count, 0.8)
    images = randomness.select(jitter, jittered, images)
    gray = randomness.bernoulli(gray_seed, count, 0.2)
    return randomness.select(gray, to_grayscale(images), images)


def blur_kernel_size(image_size: int) -> int:
    """Blur taps 2 floor(side / 20) + 1, GR's kernel of 10% of the side.

    Args:
      image_size: side in pixels (> 0).

    Returns:
      Odd tap count: 23 at 224, 3 at 32 and 28.
    """
    if image_size <= 0:
        raise ValueError(f"image_size={image_size} must be a positive int.")
    return 2 * (image_size // 20) + 1


def _blur_matrix(taps: tf.Tensor, side: int) -> tf.Tensor:
    """[B, side, side] banded matrix of per-image taps [B, K], zero padded."""
    radius = taps.shape[-1] // 2
    position = tf.range(side)
    tap = position[None, :] - position[:, None] + radius  # [out, in]
    valid = (tap >= 0) & (tap <= 2 * radius)
    matrix = tf.gather(taps, tf.clip_by_value(tap, 0, 2 * radius), axis=1)
    return tf.where(valid, matrix, 0.0)


def gaussian_blur(
    images: tf.Tensor, sigma: tf.Tensor, kernel_size: int
) -> tf.Tensor:
    """Separable Gaussian blur, one sigma per image, as two banded matmuls.

    Normalised taps exp(-x^2 / (2 sigma^2)), x in [-r, r], and SAME zero
    padding, which darkens the borders as GR's depthwise convolution does.

    Args:
      images: [B, H, W, C] float with static H and W.
      sigma: float [B] > 0, in pixels.
      kernel_size: odd tap count 2r + 1 (blur_kernel_size).

    Returns:
      [B, H, W, C] float32.
    """
    radius = kernel_size // 2
    offsets = tf.range(-radius, radius + 1, dtype=tf.float32)
    sigma = tf.reshape(tf.cast(sigma, tf.float32), [-1, 1])
    taps = tf.exp(-tf.square(offsets) / (2.0 * tf.square(sigma)))
    taps /= tf.reduce_sum(taps, axis=-1, keepdims=True)  # [B, K]
    rows = _blur_matrix(taps, images.shape[1])
    columns = _blur_matrix(taps, images.shape[2])
    blurred = tf.einsum("bpw,bhwc->bhpc", columns, images)
    return tf.einsum("boh,bhwc->bowc", rows, blurred)


def random_blur(
    images: tf.Tensor, seed: tf.Tensor, p: float = 0.5
) -> tf.Tensor:
    """Gaussian blur with probability p, sigma ~ U[0.1, 2.0] per image.

    blur_kernel_size(H) taps. GR's TF2 code blurs on the device with one
    sigma per view per replica batch (each image still blurred with
    p = 0.5); a sigma per image is what the paper describes.

    Args:
      images: [B, H, W, C] float with static H and W, C in {1, 3}.
      seed: int32 [2] stateless seed for the batch.
      p: probability of blurring an image.

    Returns:
      [B, H, W, C] float32.

    Raises:
      ValueError: if H or W is not static.
    """
    if None in images.shape[1:3]:
        raise ValueError(
            f"random_blur needs static image sides (got {images.shape}) to "
            "size its kernel; crop and resize first or tf.ensure_shape."
        )
    apply_seed, sigma_seed = randomness.split(seed, 2)
    count = randomness.batch_size(images)
    sigma = randomness.per_image(sigma_seed, [count], 0.1, 2.0)
    kernel_size = blur_kernel_size(images.shape[1])
    blurred = gaussian_blur(images, sigma, kernel_size)
    return randomness.select(
        randomness.bernoulli(apply_seed, count, p), blurred, images
    )
