"""SimCLR views of batches: crop + flip, then colour, grayscale and blur.

A view is made in two stages, `crop_and_flip` and `distort`, so that the
second can run in the train step (--augment_on_device, `distort_views`).
Every function takes one int32 [2] seed per batch; one image is a batch of
one (`simclr_augment`). Also the eval centre crop.
"""

from __future__ import annotations

import tensorflow as tf

from simclr_tf.data.augment import crop, ops, randomness


def crop_and_flip(
    images: tf.Tensor,
    size: int,
    seed: tf.Tensor,
    *,
    crop_min_area: float = crop.MIN_AREA,
) -> tf.Tensor:
    """The first stage of a view: random crop + bicubic resize, then flip.

    Crop boxes as crop.sample_crop_boxes (area [crop_min_area, 1], aspect
    [3/4, 4/3]); each image is mirrored left-right with p = 0.5.

    Args:
      images: [B, H, W, C] uint8 0..255 or float 0..1, C in {1, 3}; one H
        and W for the batch (dynamic unless under XLA).
      size: output side in pixels.
      seed: int32 [2] stateless seed for the batch.
      crop_min_area: least crop area as a fraction of the image (paper
        0.08).

    Returns:
      [B, size, size, C] float32, approximately in [0, 1] (bicubic
      ringing; `distort` clips).
    """
    images = randomness.as_float(images)
    count = randomness.batch_size(images)
    box_seed, flip_seed = randomness.split(seed, 2)
    shape = tf.shape(images)
    boxes = crop.sample_crop_boxes(
        shape[1], shape[2], count, box_seed, area_range=(crop_min_area, 1.0)
    )
    flip = randomness.bernoulli(flip_seed, count, 0.5)
    return crop.crop_and_resize(images, boxes, size, flip=flip)


def distort(
    images: tf.Tensor,
    seed: tf.Tensor,
    *,
    color_jitter_strength: float,
    blur: bool,
    brightness_impl: ops.BrightnessImpl = "v2",
    color_distort: bool = True,
) -> tf.Tensor:
    """The second stage of a view: colour jitter, grayscale, blur, clip.

    Colour jitter (p = 0.8) then grayscale (p = 0.2) if color_distort,
    then Gaussian blur (p = 0.5) if blur, each drawn per image.

    Args:
      images: [B, S, S, C] float crops (crop_and_flip), static S.
      seed: int32 [2] stateless seed for the batch.
      color_jitter_strength: s in [0, 1.25].
      blur: apply the random Gaussian blur.
      brightness_impl: "v2" multiplicative (GR default) or "v1" additive.
      color_distort: apply colour jitter and grayscale.

    Returns:
      [B, S, S, C] float32 in [0, 1].

    Raises:
      ValueError: for a strength outside [0, 1.25].
    """
    images = tf.clip_by_value(randomness.as_float(images), 0.0, 1.0)
    color_seed, blur_seed = randomness.split(seed, 2)
    if color_distort:
        images = ops.random_color_distortion(
            images,
            color_jitter_strength,
            color_seed,
            brightness_impl=brightness_impl,
        )
    if blur:
        images = ops.random_blur(images, blur_seed)
    return tf.clip_by_value(images, 0.0, 1.0)


def stage_seeds(seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(crop_and_flip seed, distort seed) of a view made with `seed`."""
    crop_seed, distort_seed = randomness.split(seed, 2)
    return crop_seed, distort_seed


def simclr_augment_batch(
    images: tf.Tensor,
    size: int,
    *,
    color_jitter_strength: float,
    blur: bool,
    seed: tf.Tensor,
    brightness_impl: ops.BrightnessImpl = "v2",
    color_distort: bool = True,
    crop_min_area: float = crop.MIN_AREA,
) -> tf.Tensor:
    """One SimCLR view of each image (paper App. A; GR preprocess_for_train).

    Crop + bicubic resize (p = 1) -> flip (p = 0.5) -> colour jitter
    (p = 0.8) -> grayscale (p = 0.2) -> Gaussian blur (p = 0.5, if blur) ->
    clip to [0, 1]: `crop_and_flip` and `distort` with the two seeds of
    `stage_seeds(seed)`. color_distort=False gives crop + flip only, the
    fine-tune / linear-eval training preprocessing.

    Args:
      images: [B, H, W, C] uint8 0..255 or float 0..1, C in {1, 3}; one H
        and W for the batch.
      size: output side in pixels.
      color_jitter_strength: s in [0, 1.25].
      blur: apply the random Gaussian blur.
      seed: int32 [2] stateless seed for the batch.
      brightness_impl: "v2" multiplicative (GR default) or "v1" additive.
      color_distort: apply colour jitter and grayscale.
      crop_min_area: least crop area as a fraction of the image.

    Returns:
      [B, size, size, C] float32 in [0, 1].

    Raises:
      ValueError: for a strength outside [0, 1.25], a bad channel count or
        a seed that is not int32 [2].
    """
    if color_distort:
        ops.check_strength(color_jitter_strength)
    crop_seed, distort_seed = stage_seeds(seed)
    views = crop_and_flip(images, size, crop_seed, crop_min_area=crop_min_area)
    return distort(
        views,
        distort_seed,
        color_jitter_strength=color_jitter_strength,
        blur=blur,
        brightness_impl=brightness_impl,
        color_distort=color_distort,
    )


def simclr_augment(
    image: tf.Tensor,
    size: int,
    *,
    color_jitter_strength: float,
    blur: bool,
    seed: tf.Tensor | None = None,
    brightness_impl: ops.BrightnessImpl = "v2",
    color_distort: bool = True,
    crop_min_area: float = crop.MIN_AREA,
) -> tf.Tensor:
    """One SimCLR view of one image: simclr_augment_batch on a batch of one.

    Args:
      image: [H, W, C] uint8 0..255 or float 0..1, C in {1, 3}; H and W
        may be dynamic.
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
    """
    return simclr_augment_batch(
        tf.convert_to_tensor(image)[None],
        size,
        color_jitter_strength=color_jitter_strength,
        blur=blur,
        seed=randomness.as_seed(seed),
        brightness_impl=brightness_impl,
        color_distort=color_distort,
        crop_min_area=crop_min_area,
    )[0]


def distort_views(
    views: tuple[tf.Tensor, tf.Tensor],
    seed: tf.Tensor,
    *,
    color_jitter_strength: float,
    blur: bool,
    brightness_impl: ops.BrightnessImpl = "v2",
) -> tuple[tf.Tensor, tf.Tensor]:
    """`distort` of both views of a batch as one batch of 2b.

    The pipeline calls it, or under --augment_on_device the train step,
    with the batch's "distort_seed": the same function and seed, so the
    same views.

    Args:
      views: ([b, S, S, C], [b, S, S, C]) float crops, view1 and view2.
      seed: int32 [2], the batch's distort seed.
      color_jitter_strength: s in [0, 1.25].
      blur: apply the random Gaussian blur.
      brightness_impl: "v2" multiplicative (GR default) or "v1" additive.

    Returns:
      (view1, view2), each [b, S, S, C] float32 in [0, 1].
    """
    distorted = distort(
        tf.concat(list(views), axis=0),
        seed,
        color_jitter_strength=color_jitter_strength,
        blur=blur,
        brightness_impl=brightness_impl,
    )
    view1, view2 = tf.split(distorted, 2, axis=0)
    return view1, view2


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
    image = randomness.as_float(image)
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    if size <= 32:
        box = (0, 0, height, width)
    else:
        shorter = tf.cast(tf.minimum(height, width), tf.float32)
        side = crop.round_to_int(crop_proportion * shorter)
        box = ((height - side + 1) // 2, (width - side + 1) // 2, side, side)
    boxes = tuple(tf.reshape(value, [1]) for value in box)
    resized = crop.crop_and_resize(image[None], boxes, size)[0]
    return tf.clip_by_value(resized, 0.0, 1.0)
