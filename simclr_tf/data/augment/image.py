"""SimCLR's augmentations as pure, stateless TensorFlow functions.

Random crop + bicubic resize (crop.py), flip, colour jitter, grayscale,
Gaussian blur (paper App. A, google-research/simclr "GR") and the eval centre
crop, per image (int32 [2] seed) and batched (`*_batch`, int32 [B, 2] seeds,
bit-identical draws: tf.cond becomes a per-image tf.where). All run eagerly,
in tf.data and under XLA alike. Views and batching: pipeline.py.
"""

from __future__ import annotations

import functools
from typing import Literal

import tensorflow as tf

from simclr_tf.data.augment import crop
from simclr_tf.data.augment import randomness as random_ops

BrightnessImpl = Literal["v1", "v2"]
MAX_COLOR_JITTER_STRENGTH = 1.25  # 1 - 0.8 s must stay >= 0.
LUMA_WEIGHTS = (0.2989, 0.5870, 0.1140)  # tf.image.rgb_to_grayscale's.


def check_strength(strength: float) -> None:
    if not 0.0 <= strength <= MAX_COLOR_JITTER_STRENGTH:
        raise ValueError(
            f"color_jitter_strength={strength} must be in [0, "
            f"{MAX_COLOR_JITTER_STRENGTH}] so that contrast and saturation "
            "factors U[1 - 0.8 s, 1 + 0.8 s] stay >= 0; use e.g. 1.0 "
            "(ImageNet) or 0.5 (CIFAR-10)."
        )


def random_flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Mirrors left-right with probability 0.5.

    Args:
      image: [..., H, W, C] tensor.
      seed: int32 [2] stateless seed.

    Returns:
      A tensor like `image`.
    """
    return random_ops.apply_with_probability(
        lambda x: tf.reverse(x, axis=[-2]), image, seed, 0.5
    )


def adjust_brightness(
    image: tf.Tensor, factor_or_delta: tf.Tensor, impl: BrightnessImpl
) -> tf.Tensor:
    """Brightness: v2 multiplies by a factor, v1 adds a delta (not clipped).

    Args:
      image: [..., H, W, C] float.
      factor_or_delta: float scalar, the factor (v2) or the delta (v1).
      impl: "v2" (GR default, multiplicative) or "v1" (additive).

    Returns:
      A float tensor like `image`.

    Raises:
      ValueError: for an unknown impl.
    """
    if impl == "v2":
        return image * factor_or_delta
    if impl == "v1":
        return image + factor_or_delta
    raise ValueError(f"brightness_impl={impl!r} must be 'v1' or 'v2'.")


def adjust_contrast(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """(x - mean) factor + mean with a per-channel spatial mean, unclipped.

    Args:
      image: [H, W, C] float.
      factor: float scalar >= 0.

    Returns:
      [H, W, C] float32.
    """
    mean = tf.reduce_mean(image, axis=[-3, -2], keepdims=True)
    return (image - mean) * factor + mean


def adjust_saturation(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """Scales HSV saturation; identity for 1-channel (grayscale) images."""
    if random_ops.channels(image) == 1:
        return image
    return tf.image.adjust_saturation(image, factor)


def adjust_hue(image: tf.Tensor, delta: tf.Tensor) -> tf.Tensor:
    """Rotates HSV hue by delta turns; identity for 1-channel images."""
    if random_ops.channels(image) == 1:
        return image
    return tf.image.adjust_hue(image, delta)


def jitter_range(
    op: int, strength: float, impl: BrightnessImpl = "v2"
) -> tuple[float, float]:
    """(low, high) of the uniform draw of jitter op 0..3 (B, C, S, H)."""
    if op == 0:
        bound = 0.8 * strength
        if impl == "v1":
            return -bound, bound
        return max(0.0, 1.0 - bound), 1.0 + bound
    if op in (1, 2):
        bound = 0.8 * strength
        return 1 - bound, 1 + bound
    bound = 0.2 * strength
    return -bound, bound


def random_brightness(
    image: tf.Tensor, strength: float, seed: tf.Tensor, impl: BrightnessImpl
) -> tf.Tensor:
    """v2: x U[max(0, 1 - 0.8 s), 1 + 0.8 s]; v1: x + U[-0.8 s, 0.8 s]."""
    low, high = jitter_range(0, strength, impl)
    return adjust_brightness(
        image, random_ops.uniform(seed, (), low, high), impl
    )


def random_contrast(
    image: tf.Tensor, strength: float, seed: tf.Tensor
) -> tf.Tensor:
    """Contrast factor ~ U[1 - 0.8 s, 1 + 0.8 s]."""
    low, high = jitter_range(1, strength)
    return adjust_contrast(image, random_ops.uniform(seed, (), low, high))


def random_saturation(
    image: tf.Tensor, strength: float, seed: tf.Tensor
) -> tf.Tensor:
    """Saturation factor ~ U[1 - 0.8 s, 1 + 0.8 s]; identity for C == 1."""
    low, high = jitter_range(2, strength)
    return adjust_saturation(image, random_ops.uniform(seed, (), low, high))


def random_hue(image: tf.Tensor, strength: float, seed: tf.Tensor) -> tf.Tensor:
    """Hue delta ~ U[-0.2 s, 0.2 s] turns; identity for C == 1."""
    low, high = jitter_range(3, strength)
    return adjust_hue(image, random_ops.uniform(seed, (), low, high))


def color_jitter(
    image: tf.Tensor,
    strength: float,
    seed: tf.Tensor,
    *,
    brightness_impl: BrightnessImpl = "v2",
    random_order: bool = True,
) -> tf.Tensor:
    """Brightness, contrast, saturation and hue jitter (paper App. A).

    The four ops run in a fresh random order per image (fixed order when
    random_order=False) and the image is clipped to [0, 1] after each, as
    GR does. For 1-channel images (Fashion-MNIST) brightness and contrast
    act while saturation and hue are the identity: there is no colour to
    change. At strength 0 all four are skipped, as in GR.

    Args:
      image: [H, W, C] uint8 0..255 or float 0..1, C in {1, 3}.
      strength: s in [0, 1.25], Python float; 1.0 ImageNet, 0.5 CIFAR.
      seed: int32 [2] stateless seed.
      brightness_impl: "v2" multiplicative (GR default) or "v1" additive.
      random_order: shuffle the op order per image.

    Returns:
      [H, W, C] float32 in [0, 1].

    Raises:
      ValueError: if strength is outside [0, 1.25] or impl is unknown.
    """
    check_strength(strength)
    image = tf.clip_by_value(random_ops.as_float(image), 0.0, 1.0)
    if strength == 0:
        return image
    seeds = random_ops.split(seed, 5)
    ops = [
        functools.partial(
            random_brightness,
            strength=strength,
            seed=seeds[0],
            impl=brightness_impl,
        ),
        functools.partial(random_contrast, strength=strength, seed=seeds[1]),
        functools.partial(random_saturation, strength=strength, seed=seeds[2]),
        functools.partial(random_hue, strength=strength, seed=seeds[3]),
    ]
    if random_order:
        order = tf.argsort(
            random_ops.uniform(seeds[4], (4,))
        )  # a uniform permutation
    else:
        order = tf.range(4)

    # A loop rather than four unrolled switches: XLA compiles each op once.
    def apply_next(position: tf.Tensor, image: tf.Tensor) -> tuple:
        branches = [functools.partial(op, image) for op in ops]
        image = tf.switch_case(tf.gather(order, position), branches)
        return position + 1, tf.clip_by_value(image, 0.0, 1.0)

    _, image = tf.while_loop(
        lambda position, _: position < 4, apply_next, (0, image)
    )
    return image


def to_grayscale(image: tf.Tensor) -> tf.Tensor:
    """Luma 0.2989 R + 0.5870 G + 0.1140 B, repeated to 3 channels.

    Args:
      image: [..., C] float, C in {1, 3}; C == 1 is returned unchanged.

    Returns:
      A float tensor shaped like `image`.
    """
    if random_ops.channels(image) == 1:
        return image
    gray = tf.reduce_sum(image * tf.constant(LUMA_WEIGHTS), -1, keepdims=True)
    return tf.concat([gray, gray, gray], axis=-1)


def random_grayscale(
    image: tf.Tensor, seed: tf.Tensor, p: float = 0.2
) -> tf.Tensor:
    """to_grayscale with probability p (paper: 0.2)."""
    return random_ops.apply_with_probability(to_grayscale, image, seed, p)


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


def gaussian_blur(
    image: tf.Tensor, sigma: tf.Tensor, kernel_size: int
) -> tf.Tensor:
    """Separable Gaussian blur, normalised taps, SAME zero padding.

    Zero padding darkens the borders, as GR's depthwise conv does.

    Args:
      image: [H, W, C] or [N, H, W, C] float.
      sigma: float scalar > 0, in pixels.
      kernel_size: odd tap count (blur_kernel_size).

    Returns:
      A float32 tensor like `image`.
    """
    channels = random_ops.channels(image)
    radius = kernel_size // 2
    offsets = tf.range(-radius, radius + 1, dtype=tf.float32)
    taps = tf.exp(-tf.square(offsets) / (2.0 * tf.square(sigma)))
    taps /= tf.reduce_sum(taps)
    horizontal = tf.tile(tf.reshape(taps, [1, -1, 1, 1]), [1, 1, channels, 1])
    vertical = tf.reshape(horizontal, [-1, 1, channels, 1])
    batched = image if image.shape.rank == 4 else image[None]
    strides = [1, 1, 1, 1]
    blurred = tf.nn.depthwise_conv2d(batched, horizontal, strides, "SAME")
    blurred = tf.nn.depthwise_conv2d(blurred, vertical, strides, "SAME")
    return blurred if image.shape.rank == 4 else blurred[0]


def random_blur(image: tf.Tensor, seed: tf.Tensor, p: float = 0.5) -> tf.Tensor:
    """Gaussian blur with probability p, sigma ~ U[0.1, 2.0] per image.

    The kernel has blur_kernel_size(H) taps. GR's TF2 code instead blurs on
    the device with one sigma per view per replica batch (each image still
    blurred with p = 0.5); a per-image sigma is what the paper describes.

    Args:
      image: [H, W, C] float with static H, C in {1, 3}.
      seed: int32 [2] stateless seed.
      p: probability of blurring.

    Returns:
      [H, W, C] float32.

    Raises:
      ValueError: if H is not static.
    """
    side = image.shape[0]
    if side is None:
        raise ValueError(
            "random_blur needs a static image height to size its kernel; "
            "resize first (random_crop_with_resize) or tf.ensure_shape."
        )
    apply_seed, sigma_seed = random_ops.split(seed, 2)
    sigma = random_ops.uniform(sigma_seed, (), 0.1, 2.0)
    kernel_size = blur_kernel_size(side)
    return random_ops.apply_with_probability(
        lambda x: gaussian_blur(x, sigma, kernel_size), image, apply_seed, p
    )


def crop_and_flip(
    image: tf.Tensor,
    size: int,
    seed: tf.Tensor,
    *,
    crop_min_area: float = crop.MIN_AREA,
) -> tf.Tensor:
    """The first stage of `simclr_augment`: crop + resize, then flip.

    Uses the same two of the view seed's four sub-seeds as simclr_augment,
    so distorting the result with that seed (augment_batch.distort_batch)
    completes the same view.

    Args:
      image: [H, W, C] uint8 0..255 or float 0..1; H and W may be dynamic.
      size: output side in pixels.
      seed: int32 [2] stateless seed of the whole view.
      crop_min_area: least crop area as a fraction of the image.

    Returns:
      [size, size, C] float32, approximately in [0, 1] (bicubic ringing).
    """
    crop_seed, flip_seed, _, _ = random_ops.split(seed, 4)
    image = crop.random_crop_with_resize(
        image, size, crop_seed, min_area=crop_min_area
    )
    return random_flip(image, flip_seed)


def simclr_augment(
    image: tf.Tensor,
    size: int,
    *,
    color_jitter_strength: float,
    blur: bool,
    seed: tf.Tensor | None = None,
    brightness_impl: BrightnessImpl = "v2",
    color_distort: bool = True,
    crop_min_area: float = crop.MIN_AREA,
) -> tf.Tensor:
    """One SimCLR view (paper App. A; GR preprocess_for_train).

    Crop + bicubic resize (p = 1) -> flip (p = 0.5) -> colour jitter
    (p = 0.8) -> grayscale (p = 0.2) -> Gaussian blur (p = 0.5, if blur) ->
    clip to [0, 1]. color_distort=False gives crop + flip only, the
    fine-tune / linear-eval training preprocessing.

    Args:
      image: [H, W, C] uint8 0..255 or float 0..1, C in {1, 3}; H and W may
        be dynamic.
      size: output side in pixels.
      color_jitter_strength: s in [0, 1.25].
      blur: apply the random Gaussian blur.
      seed: int32 [2] stateless seed; None draws one at random.
      brightness_impl: "v2" multiplicative (GR default) or "v1" additive.
      color_distort: apply colour jitter and grayscale.
      crop_min_area: least crop area as a fraction of the image (paper
        0.08).

    Returns:
      [size, size, C] float32 in [0, 1].

    Raises:
      ValueError: for a strength outside [0, 1.25] or a bad channel count.
    """
    if color_distort:
        check_strength(color_jitter_strength)
    seed = random_ops.as_seed(seed)  # None: one random seed for all stages
    _, _, color_seed, blur_seed = random_ops.split(seed, 4)
    image = crop_and_flip(image, size, seed, crop_min_area=crop_min_area)
    if color_distort:
        jitter_seed, apply_seed, gray_seed = random_ops.split(color_seed, 3)
        jitter = functools.partial(
            color_jitter,
            strength=color_jitter_strength,
            seed=jitter_seed,
            brightness_impl=brightness_impl,
        )
        image = random_ops.apply_with_probability(
            jitter, image, apply_seed, 0.8
        )
        image = random_grayscale(image, gray_seed)
    if blur:
        image = random_blur(image, blur_seed)
    return tf.clip_by_value(image, 0.0, 1.0)


def preprocess_for_eval(
    image: tf.Tensor, size: int, *, crop_proportion: float = 0.875
) -> tf.Tensor:
    """Centre crop of crop_proportion of the shorter side + bicubic resize.

    As GR's center_crop for a square output (rint, half to even; offsets
    (side - crop + 1) // 2). At size <= 32 nothing is cropped and the whole
    image is resized (the identity when it is already size x size).

    Args:
      image: [H, W, C] uint8 0..255 or float 0..1, C in {1, 3}.
      size: output side in pixels.
      crop_proportion: fraction of the shorter side kept, in (0, 1].

    Returns:
      [size, size, C] float32 in [0, 1].

    Raises:
      ValueError: if crop_proportion is outside (0, 1].
    """
    if not 0.0 < crop_proportion <= 1.0:
        raise ValueError(
            f"crop_proportion={crop_proportion} must be in (0, 1]; ImageNet "
            "uses 0.875."
        )
    image = random_ops.as_float(image)
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    if size <= 32:
        box = (0, 0, height, width)
    else:
        shorter = tf.cast(tf.minimum(height, width), tf.float32)
        side = crop.round_to_int(crop_proportion * shorter)
        box = ((height - side + 1) // 2, (width - side + 1) // 2, side, side)
    resized = crop.crop_and_resize(image, box, size)
    return tf.clip_by_value(resized, 0.0, 1.0)
