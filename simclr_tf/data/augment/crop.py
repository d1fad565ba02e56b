"""Inception-style random crop boxes and the bicubic crop-and-resize.

The boxes follow the law of TF's sample_distorted_bounding_box, which GR
uses, drawn for a whole batch from one seed; the resize is two matmuls
with TF's half-pixel bicubic weights, so boxes may be dynamic under XLA.
Colour and blur live in ops.py.
"""

from __future__ import annotations

import tensorflow as tf

from simclr_tf.data.augment import randomness

Box = tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]
_CUBIC_TABLE_SIZE = 1024  # TF's bicubic kernel quantises positions to 1/1024.
_KEYS_CUBIC_A = -0.5  # Keys cubic, as TF's half-pixel ResizeBicubic.
# The paper's least crop area (fraction of the image, App. A).
MIN_AREA = 0.08


def round_to_int(value: tf.Tensor) -> tf.Tensor:
    """lrintf: round half to even, to int32."""
    return tf.cast(tf.round(value), tf.int32)


def sample_crop_boxes(
    height: tf.Tensor,
    width: tf.Tensor,
    count: tf.Tensor,
    seed: tf.Tensor,
    *,
    area_range: tuple[float, float] = (MIN_AREA, 1.0),
    aspect_ratio_range: tuple[float, float] = (3 / 4, 4 / 3),
    min_object_covered: float = 0.1,
    max_attempts: int = 100,
) -> Box:
    """`count` random crop boxes of an H x W image, one seed for all.

    The law of TF's sample_distorted_bounding_box with the whole image as
    the object (GR's distorted_bounding_box_crop). Per attempt: aspect
    a = w / h ~ U[aspect_ratio_range]; h ~ uniform integer between
    round(sqrt(min_area / a)) and the largest height whose area, width
    round(h a) and height fit; w = round(h a); one step of h up (area too
    small) then down (too large) if rounding left the area outside
    area_range; rejected if it still is, if it does not fit, or if it
    covers less than min_object_covered of the image. The first accepted
    of max_attempts is kept, else the whole image. Offsets are uniform on
    every position that fits (the kernel never picks the last one).

    All [count, max_attempts] attempts are drawn at once: no loop, so XLA
    compiles it and H, W may be dynamic.

    Args:
      height: int scalar, image height H > 0.
      width: int scalar, image width W > 0.
      count: B, boxes to draw.
      seed: int32 [2] stateless seed.
      area_range: crop area as a fraction of H W.
      aspect_ratio_range: crop width / height range.
      min_object_covered: least fraction of the image the crop must cover.
      max_attempts: candidate boxes per image before falling back.

    Returns:
      (offset_y, offset_x, crop_height, crop_width), int32 [B] each.
    """
    draws = randomness.uniform(seed, [count, max_attempts, 4])
    aspect_unit, height_unit, y_unit, x_unit = tf.unstack(draws, axis=-1)
    low, high = aspect_ratio_range
    aspect = low + (high - low) * aspect_unit  # [B, A]
    height = tf.cast(height, tf.int32)
    width = tf.cast(width, tf.int32)
    image_area = tf.cast(height * width, tf.float32)
    min_area, max_area = area_range[0] * image_area, area_range[1] * image_area
    # round(h a) <= W holds for h <= (W + 0.5) / a.
    width_bound = tf.cast((tf.cast(width, tf.float32) + 0.5) / aspect, tf.int32)
    max_height = round_to_int(tf.sqrt(max_area / aspect))
    max_height = tf.minimum(tf.minimum(max_height, width_bound), height)
    min_height = tf.minimum(
        round_to_int(tf.sqrt(min_area / aspect)), max_height
    )
    crop_height = min_height + randomness.random_index(
        height_unit, max_height - min_height + 1
    )
    crop_height, crop_width, area = _fix_rounded_area(
        crop_height, aspect, min_area, max_area
    )
    accepted = (
        (area >= min_area)
        & (area <= max_area)
        & (area >= min_object_covered * image_area)
        & (crop_height > 0)
        & (crop_width > 0)
        & (crop_height <= height)
        & (crop_width <= width)
    )
    offset_y = randomness.random_index(y_unit, height - crop_height + 1)
    offset_x = randomness.random_index(x_unit, width - crop_width + 1)
    return _first_accepted(
        accepted,
        (offset_y, offset_x, crop_height, crop_width),
        (0, 0, height, width),
    )


def _fix_rounded_area(
    crop_height: tf.Tensor,
    aspect: tf.Tensor,
    min_area: tf.Tensor,
    max_area: tf.Tensor,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """The kernel's one-step repair of an area that rounding pushed out."""

    def width_and_area(rows: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        columns = round_to_int(tf.cast(rows, tf.float32) * aspect)
        return columns, tf.cast(columns * rows, tf.float32)

    _, area = width_and_area(crop_height)
    crop_height += tf.cast(area < min_area, tf.int32)
    _, area = width_and_area(crop_height)
    crop_height -= tf.cast(area > max_area, tf.int32)
    crop_width, area = width_and_area(crop_height)
    return crop_height, crop_width, area


def _first_accepted(accepted: tf.Tensor, box: Box, whole: tuple) -> Box:
    """Per row of accepted [B, A], the first accepted box, else `whole`."""
    first = tf.argmax(tf.cast(accepted, tf.int32), -1, output_type=tf.int32)
    found = tf.reduce_any(accepted, axis=-1)
    # gather, not a slice: XLA would make a slice start a compile-time
    # constant and recompile for every seed.
    return tuple(
        tf.where(found, tf.gather(values, first, axis=1, batch_dims=1), other)
        for values, other in zip(box, whole, strict=True)
    )


def _keys_cubic(distance: tf.Tensor) -> tf.Tensor:
    """Keys cubic kernel (a = -0.5) for |distance| in [0, 2]."""
    a = _KEYS_CUBIC_A
    near = ((a + 2.0) * distance - (a + 3.0)) * distance * distance + 1.0
    far = ((a * distance - 5.0 * a) * distance + 8.0 * a) * distance - 4.0 * a
    return tf.where(distance <= 1.0, near, far)


def _resize_matrix(
    offset: tf.Tensor, length: tf.Tensor, in_size: tf.Tensor, out_size: int
) -> tf.Tensor:
    """[B, out_size, in_size] bicubic weights resampling [offset, +length).

    offset and length are int [B] (one window per image). Follows TF's
    ResizeBicubic with half_pixel_centers: source position (o + 0.5)
    length / out_size - 0.5, its fraction rounded to 1/1024, taps outside
    the crop get weight 0 and the rest are renormalised.
    """
    offset = tf.cast(offset, tf.int32)[:, None, None]
    length = tf.cast(length, tf.int32)[:, None]
    scale = tf.cast(length, tf.float32) / float(out_size)
    centre = (tf.range(out_size, dtype=tf.float32) + 0.5) * scale - 0.5
    start = tf.floor(centre)
    table = _CUBIC_TABLE_SIZE
    fraction = tf.round((centre - start) * table) / table  # [B, out]
    steps = tf.constant([-1.0, 0.0, 1.0, 2.0])
    weights = _keys_cubic(tf.abs(fraction[..., None] - steps))  # [B, out, 4]
    taps = tf.cast(start, tf.int32)[..., None] + tf.cast(steps, tf.int32)
    length = length[..., None]
    inside = (taps >= 0) & (taps < length)
    weights = tf.where(inside, weights, 0.0)
    total = tf.reduce_sum(weights, axis=-1, keepdims=True)
    weights = tf.math.divide_no_nan(weights, total)
    columns = offset + tf.clip_by_value(taps, 0, length - 1)
    one_hot = tf.one_hot(columns, tf.cast(in_size, tf.int32))  # [B, o, 4, i]
    return tf.einsum("bok,boki->boi", weights, one_hot)


def crop_and_resize(
    images: tf.Tensor,
    boxes: Box,
    size: int,
    *,
    flip: tf.Tensor | None = None,
) -> tf.Tensor:
    """Crops box i of image i and resizes it bicubically to [size, size].

    Equals tf.image.resize(crop, [size, size], "bicubic", antialias=False)
    up to float32 summation order (about 1e-6); boxes may be dynamic and
    the output shape is static, so XLA compiles it. The result may
    overshoot [0, 1] slightly (cubic ringing), as GR's does; callers clip
    at the end. On GPUs with TF32 matmuls the error grows to about 1e-3.
    A left-right flip reverses the column matrix's rows: free, and exactly
    tf.reverse of the unflipped view.

    Args:
      images: [B, H, W, C] uint8 0..255 or float 0..1, C in {1, 3}.
      boxes: (offset_y, offset_x, crop_height, crop_width) int32 [B] each.
      size: output side in pixels.
      flip: bool [B], mirror image i left-right where true; None: never.

    Returns:
      [B, size, size, C] float32.
    """
    images = randomness.as_float(images)
    channels = randomness.channels(images)
    offset_y, offset_x, crop_height, crop_width = boxes
    shape = tf.shape(images)
    rows = _resize_matrix(offset_y, crop_height, shape[1], size)
    columns = _resize_matrix(offset_x, crop_width, shape[2], size)
    if flip is not None:
        flip = tf.reshape(flip, [-1, 1, 1])
        columns = tf.where(flip, tf.reverse(columns, axis=[1]), columns)
    resized = tf.einsum("boh,bhwc->bowc", rows, images)
    resized = tf.einsum("bpw,bowc->bopc", columns, resized)
    return tf.ensure_shape(resized, [images.shape[0], size, size, channels])
