"""SimCLR's per-image augmentations as pure, stateless TensorFlow functions.

Random crop + bicubic resize, flip, colour jitter, grayscale, Gaussian blur
(paper App. A, google-research/simclr "GR") and the eval centre crop. Every
function runs eagerly, inside tf.data and under XLA, and the same int32 [2]
seed gives the same output in all three. Batching and views: pipeline.py.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal

import tensorflow as tf

BrightnessImpl = Literal["v1", "v2"]
MAX_COLOR_JITTER_STRENGTH = 1.25  # 1 - 0.8 s must stay >= 0.
LUMA_WEIGHTS = (0.2989, 0.5870, 0.1140)  # tf.image.rgb_to_grayscale's.
_CUBIC_TABLE_SIZE = 1024  # TF's bicubic kernel quantises positions to 1/1024.
_KEYS_CUBIC_A = -0.5  # Keys cubic, as TF's half-pixel ResizeBicubic.


def _as_float(image: tf.Tensor) -> tf.Tensor:
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


def _channels(image: tf.Tensor) -> int:
    """Static channel count, which must be 1 or 3."""
    channels = image.shape[-1]
    if channels not in (1, 3):
        raise ValueError(
            f"image has {channels} channels (shape {image.shape}); it must "
            "have a static last dimension of 1 or 3, e.g. decode with "
            "tf.io.decode_image(..., channels=3, expand_animations=False)."
        )
    return channels


def _as_seed(seed: tf.Tensor | None) -> tf.Tensor:
    """A non-negative int32 [2] seed; None draws one non-deterministically.

    XLA accepts only int32 seeds and extends negative ones differently from
    TF's kernels (the draws disagree), so the sign bit is cleared.
    """
    if seed is None:
        return tf.random.uniform([2], maxval=tf.int32.max, dtype=tf.int32)
    return tf.bitwise.bitwise_and(tf.cast(seed, tf.int32), 0x7FFFFFFF)


def _split(seed: tf.Tensor, count: int) -> list[tf.Tensor]:
    """`count` independent int32 [2] seeds derived from `seed`."""
    seeds = tf.random.experimental.stateless_split(_as_seed(seed), count)
    return tf.unstack(seeds, num=count)


def _uniform(
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
        shape, _as_seed(seed), minval=None, maxval=None, dtype=tf.int32
    )
    mantissa = tf.bitwise.bitwise_and(tf.bitwise.right_shift(bits, 8), 0xFFFFFF)
    unit = tf.cast(mantissa, tf.float32) * (2.0**-24)
    return minval + (maxval - minval) * unit


def _random_index(unit: tf.Tensor, count: tf.Tensor) -> tf.Tensor:
    """Integer in [0, count) from `unit` in [0, 1); 0 when count <= 0."""
    index = tf.cast(tf.floor(unit * tf.cast(count, tf.float32)), tf.int32)
    return tf.clip_by_value(index, 0, tf.maximum(count - 1, 0))


def _apply_with_probability(
    transform: Callable[[tf.Tensor], tf.Tensor],
    image: tf.Tensor,
    seed: tf.Tensor,
    p: float,
) -> tf.Tensor:
    """transform(image) with probability p, else image (GR random_apply)."""
    return tf.cond(_uniform(seed) < p, lambda: transform(image), lambda: image)


def _check_strength(strength: float) -> None:
    if not 0.0 <= strength <= MAX_COLOR_JITTER_STRENGTH:
        raise ValueError(
            f"color_jitter_strength={strength} must be in [0, "
            f"{MAX_COLOR_JITTER_STRENGTH}] so that contrast and saturation "
            "factors U[1 - 0.8 s, 1 + 0.8 s] stay >= 0; use e.g. 1.0 "
            "(ImageNet) or 0.5 (CIFAR-10)."
        )


def sample_crop_box(
    height: tf.Tensor,
    width: tf.Tensor,
    seed: tf.Tensor,
    *,
    area_range: tuple[float, float] = (0.08, 1.0),
    aspect_ratio_range: tuple[float, float] = (3 / 4, 4 / 3),
    min_object_covered: float = 0.1,
    max_attempts: int = 100,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """Samples a crop box as TF's sample_distorted_bounding_box kernel does.

    Per attempt, as in the kernel (whole-image box, use_image_if_no_boxes):
    aspect a = w / h ~ U[aspect_ratio_range]; h_min = round(sqrt(min_area /
    a)), h_max = round(sqrt(max_area / a)) shrunk until round(h_max a) <= W
    and capped at H; h ~ integer U[h_min, h_max]; w = round(h a); one +1 / -1
    step on h if rounding left the area outside area_range; reject if still
    outside, off the image, or covering < min_object_covered of the image.
    y ~ U{0 .. H-h-1} and x ~ U{0 .. W-w-1} (the kernel's Uniform(n) never
    reaches the last offset unless the crop spans the side). The first
    accepted of max_attempts is returned, else the whole image.

    Differences from the kernel: all attempts are drawn at once (XLA needs no
    loop) from our own stateless stream, so the distribution is the
    kernel's but not its exact draws; the kernel computes one width bound in
    double, here float32 (a 1e-7 epsilon vanishes; the kernel's subtract-one
    fix-up that follows covers it). GR passes the aspect range scaled by the
    *output* width / height, which is 1 for SimCLR's square outputs.

    Args:
      height: int scalar, image height H > 0.
      width: int scalar, image width W > 0.
      seed: int32 [2] stateless seed.
      area_range: crop area as a fraction of H W.
      aspect_ratio_range: crop width / height range.
      min_object_covered: least fraction of the image the crop must cover.
      max_attempts: number of candidate boxes before falling back.

    Returns:
      (offset_y, offset_x, crop_height, crop_width), int32 scalars.
    """
    height = tf.cast(height, tf.int32)
    width = tf.cast(width, tf.int32)
    height_f = tf.cast(height, tf.float32)
    width_f = tf.cast(width, tf.float32)
    aspect_seed, height_seed, y_seed, x_seed = _split(seed, 4)
    shape = (max_attempts,)
    aspect = _uniform(aspect_seed, shape, *aspect_ratio_range)
    min_area = area_range[0] * width_f * height_f
    max_area = area_range[1] * width_f * height_f
    crop_height, max_height = _crop_height_bounds(
        aspect, min_area, max_area, height, width
    )
    crop_height += _random_index(
        _uniform(height_seed, shape), max_height - crop_height + 1
    )
    crop_height, crop_width, area = _fix_rounded_area(
        crop_height, aspect, min_area, max_area
    )
    accepted = (
        (area >= min_area)
        & (area <= max_area)
        & (crop_width <= width)
        & (crop_height <= height)
        & (crop_width > 0)
        & (crop_height > 0)
        & (area >= 1.0)
        & (area / (width_f * height_f) >= min_object_covered)
    )
    offset_y = _random_index(_uniform(y_seed, shape), height - crop_height)
    offset_x = _random_index(_uniform(x_seed, shape), width - crop_width)
    first = tf.argmax(tf.cast(accepted, tf.int32), output_type=tf.int32)
    found = tf.reduce_any(accepted)
    # gather, not [first]: XLA would treat a slice start as a compile-time
    # constant and recompile for every seed.
    return (
        tf.where(found, tf.gather(offset_y, first), 0),
        tf.where(found, tf.gather(offset_x, first), 0),
        tf.where(found, tf.gather(crop_height, first), height),
        tf.where(found, tf.gather(crop_width, first), width),
    )


def _round_to_int(value: tf.Tensor) -> tf.Tensor:
    """lrintf: round half to even, to int32."""
    return tf.cast(tf.round(value), tf.int32)


def _crop_height_bounds(
    aspect: tf.Tensor,
    min_area: tf.Tensor,
    max_area: tf.Tensor,
    height: tf.Tensor,
    width: tf.Tensor,
) -> tuple[tf.Tensor, tf.Tensor]:
    """The kernel's [min height, max height] per attempt, int32 [A] each."""
    min_height = _round_to_int(tf.sqrt(min_area / aspect))
    max_height = _round_to_int(tf.sqrt(max_area / aspect))

    def rounded_width(rows: tf.Tensor) -> tf.Tensor:
        return _round_to_int(tf.cast(rows, tf.float32) * aspect)

    width_f = tf.cast(width, tf.float32)
    width_limited = tf.cast(tf.floor((width_f + 0.5) / aspect), tf.int32)
    width_limited -= tf.cast(rounded_width(width_limited) > width, tf.int32)
    max_height = tf.where(
        rounded_width(max_height) > width, width_limited, max_height
    )
    max_height = tf.minimum(max_height, height)
    return tf.minimum(min_height, max_height), max_height


def _fix_rounded_area(
    crop_height: tf.Tensor,
    aspect: tf.Tensor,
    min_area: tf.Tensor,
    max_area: tf.Tensor,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """The kernel's one-step repair of an area that rounding pushed out."""

    def width_and_area(rows: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        columns = _round_to_int(tf.cast(rows, tf.float32) * aspect)
        return columns, tf.cast(columns * rows, tf.float32)

    crop_width, area = width_and_area(crop_height)
    crop_height += tf.cast(area < min_area, tf.int32)
    crop_width, area = width_and_area(crop_height)
    crop_height -= tf.cast(area > max_area, tf.int32)
    crop_width, area = width_and_area(crop_height)
    return crop_height, crop_width, area


def _keys_cubic(distance: tf.Tensor) -> tf.Tensor:
    """Keys cubic kernel (a = -0.5) for |distance| in [0, 2]."""
    a = _KEYS_CUBIC_A
    near = ((a + 2.0) * distance - (a + 3.0)) * distance * distance + 1.0
    far = ((a * distance - 5.0 * a) * distance + 8.0 * a) * distance - 4.0 * a
    return tf.where(distance <= 1.0, near, far)


def _resize_matrix(
    offset: tf.Tensor, length: tf.Tensor, in_size: tf.Tensor, out_size: int
) -> tf.Tensor:
    """[out_size, in_size] bicubic weights resampling [offset, +length).

    Follows TF's ResizeBicubic with half_pixel_centers: source position
    (o + 0.5) length / out_size - 0.5, its fraction rounded to 1/1024, taps
    outside the crop get weight 0 and the rest are renormalised.
    """
    length = tf.cast(length, tf.int32)
    scale = tf.cast(length, tf.float32) / float(out_size)
    centre = (tf.range(out_size, dtype=tf.float32) + 0.5) * scale - 0.5
    start = tf.floor(centre)
    table = _CUBIC_TABLE_SIZE
    fraction = tf.round((centre - start) * table) / table  # [out]
    steps = tf.constant([-1.0, 0.0, 1.0, 2.0])
    weights = _keys_cubic(tf.abs(fraction[:, None] - steps))  # [out, 4]
    taps = tf.cast(start, tf.int32)[:, None] + tf.cast(steps, tf.int32)
    inside = (taps >= 0) & (taps < length)
    weights = tf.where(inside, weights, 0.0)
    total = tf.reduce_sum(weights, axis=1, keepdims=True)
    weights = tf.math.divide_no_nan(weights, total)
    columns = offset + tf.clip_by_value(taps, 0, length - 1)
    one_hot = tf.one_hot(columns, tf.cast(in_size, tf.int32))  # [out, 4, in]
    return tf.einsum("ok,oki->oi", weights, one_hot)


def crop_and_resize(
    image: tf.Tensor,
    box: tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor],
    size: int,
) -> tf.Tensor:
    """Crops `box` and resizes it bicubically to [size, size] in two matmuls.

    Equals tf.image.resize(crop, [size, size], "bicubic", antialias=False)
    up to float32 summation order (about 1e-6); the box may be dynamic and
    the output shape is static, so XLA compiles it. The result may overshoot
    [0, 1] slightly (cubic ringing), as GR's does; callers clip at the end.
    On GPUs with TF32 matmuls enabled the error grows to about 1e-3.

    Args:
      image: [H, W, C] uint8 0..255 or float 0..1, C in {1, 3}.
      box: (offset_y, offset_x, crop_height, crop_width) int32 scalars.
      size: output side in pixels.

    Returns:
      [size, size, C] float32.
    """
    image = _as_float(image)
    channels = _channels(image)
    offset_y, offset_x, crop_height, crop_width = box
    shape = tf.shape(image)
    rows = _resize_matrix(offset_y, crop_height, shape[0], size)
    columns = _resize_matrix(offset_x, crop_width, shape[1], size)
    resized = tf.einsum("oh,hwc->owc", rows, image)
    resized = tf.einsum("pw,owc->opc", columns, resized)
    return tf.ensure_shape(resized, [size, size, channels])


def random_crop_with_resize(
    image: tf.Tensor, size: int, seed: tf.Tensor
) -> tf.Tensor:
    """Inception-style random crop (sample_crop_box) resized to [size, size].

    Args:
      image: [H, W, C] uint8 0..255 or float 0..1, C in {1, 3}.
      size: output side in pixels.
      seed: int32 [2] stateless seed.

    Returns:
      [size, size, C] float32, approximately in [0, 1] (bicubic ringing).
    """
    image = _as_float(image)
    shape = tf.shape(image)
    box = sample_crop_box(shape[0], shape[1], seed)
    return crop_and_resize(image, box, size)


def random_flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Mirrors left-right with probability 0.5.

    Args:
      image: [..., H, W, C] tensor.
      seed: int32 [2] stateless seed.

    Returns:
      A tensor like `image`.
    """
    return _apply_with_probability(
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
    if _channels(image) == 1:
        return image
    return tf.image.adjust_saturation(image, factor)


def adjust_hue(image: tf.Tensor, delta: tf.Tensor) -> tf.Tensor:
    """Rotates HSV hue by delta turns; identity for 1-channel images."""
    if _channels(image) == 1:
        return image
    return tf.image.adjust_hue(image, delta)


def random_brightness(
    image: tf.Tensor, strength: float, seed: tf.Tensor, impl: BrightnessImpl
) -> tf.Tensor:
    """v2: x U[max(0, 1 - 0.8 s), 1 + 0.8 s]; v1: x + U[-0.8 s, 0.8 s]."""
    bound = 0.8 * strength
    if impl == "v1":
        return adjust_brightness(image, _uniform(seed, (), -bound, bound), impl)
    low = max(0.0, 1.0 - bound)
    return adjust_brightness(image, _uniform(seed, (), low, 1.0 + bound), impl)


def random_contrast(
    image: tf.Tensor, strength: float, seed: tf.Tensor
) -> tf.Tensor:
    """Contrast factor ~ U[1 - 0.8 s, 1 + 0.8 s]."""
    bound = 0.8 * strength
    return adjust_contrast(image, _uniform(seed, (), 1 - bound, 1 + bound))


def random_saturation(
    image: tf.Tensor, strength: float, seed: tf.Tensor
) -> tf.Tensor:
    """Saturation factor ~ U[1 - 0.8 s, 1 + 0.8 s]; identity for C == 1."""
    bound = 0.8 * strength
    return adjust_saturation(image, _uniform(seed, (), 1 - bound, 1 + bound))


def random_hue(image: tf.Tensor, strength: float, seed: tf.Tensor) -> tf.Tensor:
    """Hue delta ~ U[-0.2 s, 0.2 s] turns; identity for C == 1."""
    bound = 0.2 * strength
    return adjust_hue(image, _uniform(seed, (), -bound, bound))


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
    _check_strength(strength)
    image = tf.clip_by_value(_as_float(image), 0.0, 1.0)
    if strength == 0:
        return image
    seeds = _split(seed, 5)
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
        order = tf.argsort(_uniform(seeds[4], (4,)))  # a uniform permutation
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
    if _channels(image) == 1:
        return image
    gray = tf.reduce_sum(image * tf.constant(LUMA_WEIGHTS), -1, keepdims=True)
    return tf.concat([gray, gray, gray], axis=-1)


def random_grayscale(
    image: tf.Tensor, seed: tf.Tensor, p: float = 0.2
) -> tf.Tensor:
    """to_grayscale with probability p (paper: 0.2)."""
    return _apply_with_probability(to_grayscale, image, seed, p)


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
    channels = _channels(image)
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
    apply_seed, sigma_seed = _split(seed, 2)
    sigma = _uniform(sigma_seed, (), 0.1, 2.0)
    kernel_size = blur_kernel_size(side)
    return _apply_with_probability(
        lambda x: gaussian_blur(x, sigma, kernel_size), image, apply_seed, p
    )


def simclr_augment(
    image: tf.Tensor,
    size: int,
    *,
    color_jitter_strength: float,
    blur: bool,
    seed: tf.Tensor | None = None,
    brightness_impl: BrightnessImpl = "v2",
    color_distort: bool = True,
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

    Returns:
      [size, size, C] float32 in [0, 1].

    Raises:
      ValueError: for a strength outside [0, 1.25] or a bad channel count.
    """
    if color_distort:
        _check_strength(color_jitter_strength)
    crop_seed, flip_seed, color_seed, blur_seed = _split(seed, 4)
    image = random_crop_with_resize(image, size, crop_seed)
    image = random_flip(image, flip_seed)
    if color_distort:
        jitter_seed, apply_seed, gray_seed = _split(color_seed, 3)
        jitter = functools.partial(
            color_jitter,
            strength=color_jitter_strength,
            seed=jitter_seed,
            brightness_impl=brightness_impl,
        )
        image = _apply_with_probability(jitter, image, apply_seed, 0.8)
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
    image = _as_float(image)
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    if size <= 32:
        box = (0, 0, height, width)
    else:
        shorter = tf.cast(tf.minimum(height, width), tf.float32)
        side = _round_to_int(crop_proportion * shorter)
        box = ((height - side + 1) // 2, (width - side + 1) // 2, side, side)
    resized = crop_and_resize(image, box, size)
    return tf.clip_by_value(resized, 0.0, 1.0)
