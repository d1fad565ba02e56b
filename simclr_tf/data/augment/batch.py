"""SimCLR's augmentations on whole batches, one stateless seed per image.

Image i of a batch gets exactly what augment.py's per-image function gives
it with seeds[i] (bit-identical random draws: tf.cond becomes a per-image
tf.where; only float32 summation order differs). A view is made in two
stages, `crop_and_flip_batch` then `distort_batch` (colour, grayscale, blur),
so the second can run in the train step (--augment_on_device).
"""

from __future__ import annotations

import tensorflow as tf

from simclr_tf.data.augment import crop
from simclr_tf.data.augment import image as augment
from simclr_tf.data.augment import randomness as random_ops


def _per_image(values: tf.Tensor) -> tf.Tensor:
    """[B] -> [B, 1, 1, 1], to broadcast one value per image."""
    return tf.reshape(values, [-1, 1, 1, 1])


def _select(mask: tf.Tensor, chosen: tf.Tensor, other: tf.Tensor) -> tf.Tensor:
    """Per image: `chosen` where mask [B] is true, else `other`."""
    return tf.where(_per_image(mask), chosen, other)


def _adjust_hsv_batch(
    images: tf.Tensor, saturation: tf.Tensor, hue: tf.Tensor
) -> tf.Tensor:
    """adjust_saturation (s x factor, clipped) and adjust_hue (h + delta).

    For RGB [B, H, W, 3] with per-image factors [B, 1, 1, 1].
    """
    h, s, v = tf.unstack(tf.image.rgb_to_hsv(images), axis=-1)
    h = tf.math.floormod(h + hue[..., 0], 1.0)
    s = tf.clip_by_value(s * saturation[..., 0], 0.0, 1.0)
    return tf.image.hsv_to_rgb(tf.stack([h, s, v], axis=-1))


def color_jitter_batch(
    images: tf.Tensor,
    strength: float,
    seeds: tf.Tensor,
    *,
    brightness_impl: augment.BrightnessImpl = "v2",
    random_order: bool = True,
) -> tf.Tensor:
    """`color_jitter` per image: image i as color_jitter(images[i], seeds[i]).

    Each of the four positions evaluates every op on the whole batch and
    keeps, per image, the one that image's order puts there.

    Args:
      images: [B, H, W, C] uint8 0..255 or float 0..1, C in {1, 3}.
      strength: s in [0, 1.25], Python float.
      seeds: int32 [B, 2] stateless seeds.
      brightness_impl: "v2" multiplicative (GR default) or "v1" additive.
      random_order: shuffle the op order per image.

    Returns:
      [B, H, W, C] float32 in [0, 1].

    Raises:
      ValueError: if strength is outside [0, 1.25] or impl is unknown.
    """
    augment.check_strength(strength)
    images = tf.clip_by_value(random_ops.as_float(images), 0.0, 1.0)
    if strength == 0:
        return images
    # color_jitter's five seeds, all drawn from in one call: [B, 5, 4].
    seeds = random_ops.stateless_split(random_ops.as_seed(seeds), 5)
    units = tf.unstack(random_ops.uniform_batch(seeds, 4), axis=1)
    factors = []
    for op in range(4):
        low, high = augment.jitter_range(op, strength, brightness_impl)
        # As random_ops.uniform(seed, (), low, high) computes it.
        factors.append(_per_image(low + (high - low) * units[op][:, 0]))
    rgb = random_ops.channels(images) == 3  # else saturation, hue: identity
    order = tf.range(4) + tf.zeros_like(units[4], tf.int32)  # [B, 4]
    if random_order:
        order = tf.argsort(units[4], axis=-1)
    for position in range(4):
        chosen = _per_image(order[:, position])
        result = images
        if rgb:
            # One HSV round trip serves both saturation (op 2) and hue
            # (op 3): each image gets its own op's factor, the other op's
            # identity, which is what that op alone computes.
            saturation = tf.where(chosen == 2, factors[2], 1.0)
            hue = tf.where(chosen == 3, factors[3], 0.0)
            jittered = _adjust_hsv_batch(images, saturation, hue)
            result = tf.where(
                chosen >= 2, tf.clip_by_value(jittered, 0, 1), result
            )
        jittered = augment.adjust_contrast(images, factors[1])
        result = tf.where(chosen == 1, tf.clip_by_value(jittered, 0, 1), result)
        jittered = augment.adjust_brightness(
            images, factors[0], brightness_impl
        )
        result = tf.where(chosen == 0, tf.clip_by_value(jittered, 0, 1), result)
        images = result
    return images


def _blur_matrix(taps: tf.Tensor, side: int) -> tf.Tensor:
    """[B, side, side] banded matrix of per-image taps [B, K], zero padded."""
    radius = taps.shape[-1] // 2
    position = tf.range(side)
    tap = position[None, :] - position[:, None] + radius  # [out, in]
    valid = (tap >= 0) & (tap <= 2 * radius)
    matrix = tf.gather(taps, tf.clip_by_value(tap, 0, 2 * radius), axis=1)
    return tf.where(valid, matrix, 0.0)


def gaussian_blur_batch(
    images: tf.Tensor, sigma: tf.Tensor, kernel_size: int
) -> tf.Tensor:
    """`gaussian_blur` with one sigma per image, as two banded matmuls.

    Args:
      images: [B, H, W, C] float with static H and W.
      sigma: [B] float > 0, in pixels.
      kernel_size: odd tap count (blur_kernel_size).

    Returns:
      [B, H, W, C] float32, image i equal to gaussian_blur(images[i],
      sigma[i], kernel_size) up to float32 summation order.
    """
    radius = kernel_size // 2
    offsets = tf.range(-radius, radius + 1, dtype=tf.float32)
    taps = tf.exp(-tf.square(offsets) / (2.0 * tf.square(sigma[:, None])))
    taps /= tf.reduce_sum(taps, axis=-1, keepdims=True)
    rows = _blur_matrix(taps, images.shape[1])
    columns = _blur_matrix(taps, images.shape[2])
    blurred = tf.einsum("bpw,bhwc->bhpc", columns, images)
    return tf.einsum("boh,bhwc->bowc", rows, blurred)


def _random_blur_batch(images: tf.Tensor, seeds: tf.Tensor) -> tf.Tensor:
    """random_blur per image: p = 0.5, sigma ~ U[0.1, 2.0], seeds [B, 2]."""
    seeds = random_ops.stateless_split(random_ops.as_seed(seeds), 2)
    apply, unit = tf.unstack(random_ops.uniform_batch(seeds), 2, axis=1)
    sigma = 0.1 + (2.0 - 0.1) * unit  # as random_ops.uniform(, (), 0.1, 2.0)
    kernel_size = augment.blur_kernel_size(images.shape[1])
    blurred = gaussian_blur_batch(images, sigma, kernel_size)
    return _select(apply < 0.5, blurred, images)


def _check_seeds(images: tf.Tensor, seeds: tf.Tensor) -> None:
    if images.shape.rank != 4 or seeds.shape.rank != 2 or seeds.shape[1] != 2:
        raise ValueError(
            f"images {images.shape} and seeds {seeds.shape} must be "
            "[B, H, W, C] and [B, 2]; for one image use augment.simclr_augment."
        )


def crop_and_flip_batch(
    images: tf.Tensor,
    size: int,
    seeds: tf.Tensor,
    *,
    crop_min_area: float = crop.MIN_AREA,
) -> tf.Tensor:
    """`augment.crop_and_flip` per image: the first stage of a view.

    Args:
      images: [B, H, W, C] uint8 0..255 or float 0..1, one H and W for the
        batch (may be dynamic outside XLA).
      size: output side in pixels.
      seeds: int32 [B, 2] stateless seeds, one per view.
      crop_min_area: least crop area as a fraction of the image.

    Returns:
      [B, size, size, C] float32, approximately in [0, 1].
    """
    images = random_ops.as_float(images)
    seeds = tf.convert_to_tensor(seeds)
    _check_seeds(images, seeds)
    crop_seed, flip_seed, _, _ = random_ops.split_batch(seeds, 4)
    flip = random_ops.uniform_batch(flip_seed) < 0.5
    return crop.random_crop_with_resize_batch(
        images, size, crop_seed, flip=flip, min_area=crop_min_area
    )


def distort_batch(
    images: tf.Tensor,
    seeds: tf.Tensor,
    *,
    color_jitter_strength: float,
    blur: bool,
    brightness_impl: augment.BrightnessImpl = "v2",
    color_distort: bool = True,
) -> tf.Tensor:
    """The second stage of a view: colour jitter, grayscale, blur, clip.

    With the seeds given to `crop_and_flip_batch`, completes the views
    `simclr_augment_batch` makes. Cheap to run in the train step (batched,
    static shapes, XLA-friendly): that is --augment_on_device.

    Args:
      images: [B, S, S, C] float views from crop_and_flip_batch.
      seeds: int32 [B, 2], the same per-view seeds.
      color_jitter_strength: s in [0, 1.25].
      blur: apply the random Gaussian blur.
      brightness_impl: "v2" multiplicative (GR default) or "v1" additive.
      color_distort: apply colour jitter and grayscale.

    Returns:
      [B, S, S, C] float32 in [0, 1].
    """
    images = tf.cast(images, tf.float32)
    seeds = tf.convert_to_tensor(seeds)
    _check_seeds(images, seeds)
    if color_distort:
        augment.check_strength(color_jitter_strength)
    _, _, color_seed, blur_seed = random_ops.split_batch(seeds, 4)
    if color_distort:
        jitter_seed, apply_seed, gray_seed = random_ops.split_batch(
            color_seed, 3
        )
        jittered = color_jitter_batch(
            images,
            color_jitter_strength,
            jitter_seed,
            brightness_impl=brightness_impl,
        )
        apply, gray = tf.unstack(
            random_ops.uniform_batch(tf.stack([apply_seed, gray_seed], 1)), 2, 1
        )
        images = _select(apply < 0.8, jittered, images)
        images = _select(gray < 0.2, augment.to_grayscale(images), images)
    if blur:
        images = _random_blur_batch(images, blur_seed)
    return tf.clip_by_value(images, 0.0, 1.0)


def simclr_augment_batch(
    images: tf.Tensor,
    size: int,
    *,
    color_jitter_strength: float,
    blur: bool,
    seeds: tf.Tensor,
    brightness_impl: augment.BrightnessImpl = "v2",
    color_distort: bool = True,
    crop_min_area: float = crop.MIN_AREA,
) -> tf.Tensor:
    """`augment.simclr_augment` for a batch, one seed per image.

    Output i equals simclr_augment(images[i], size, ..., seed=seeds[i]):
    the random draws are bit-identical and only float32 summation order
    (matmuls, means, HSV conversion) differs, below 1e-5. Runs eagerly, in
    tf.data and under XLA (static B, H, W, C). It is `crop_and_flip_batch`
    followed by `distort_batch` with the same seeds.

    Args:
      images: [B, H, W, C] uint8 0..255 or float 0..1, C in {1, 3}; one H
        and W for the whole batch (may be dynamic outside XLA).
      size: output side in pixels.
      color_jitter_strength: s in [0, 1.25].
      blur: apply the random Gaussian blur.
      seeds: int32 [B, 2] stateless seeds, one per image.
      brightness_impl: "v2" multiplicative (GR default) or "v1" additive.
      color_distort: apply colour jitter and grayscale.
      crop_min_area: least crop area as a fraction of the image.

    Returns:
      [B, size, size, C] float32 in [0, 1].

    Raises:
      ValueError: for a strength outside [0, 1.25], a bad channel count or
        images / seeds that are not [B, H, W, C] / [B, 2].
    """
    if color_distort:
        augment.check_strength(color_jitter_strength)
    views = crop_and_flip_batch(
        images, size, seeds, crop_min_area=crop_min_area
    )
    return distort_batch(
        views,
        seeds,
        color_jitter_strength=color_jitter_strength,
        blur=blur,
        brightness_impl=brightness_impl,
        color_distort=color_distort,
    )


def distort_views(
    views: tf.Tensor,
    view_seeds: tf.Tensor,
    *,
    color_jitter_strength: float,
    blur: bool,
    brightness_impl: str = "v2",
) -> tuple[tf.Tensor, tf.Tensor]:
    """Completes cropped views: colour jitter, grayscale, blur, clip.

    The train step calls it under --augment_on_device, the pipeline
    otherwise; the values are the same.

    Args:
      views: ([b, S, S, C], [b, S, S, C]) float crops, view1 and view2.
      view_seeds: int32 [b, 2, 2], image i's two view seeds.
      color_jitter_strength: s in [0, 1.25].
      blur: apply the random Gaussian blur.
      brightness_impl: "v2" multiplicative (GR default) or "v1" additive.

    Returns:
      (view1, view2), each [b, S, S, C] float32 in [0, 1].
    """
    images = tf.concat(list(views), axis=0)
    seeds = tf.concat([view_seeds[:, 0], view_seeds[:, 1]], axis=0)
    distorted = distort_batch(
        images,
        seeds,
        color_jitter_strength=color_jitter_strength,
        blur=blur,
        brightness_impl=brightness_impl,
    )
    view1, view2 = tf.split(distorted, 2, axis=0)
    return view1, view2
