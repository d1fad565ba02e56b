"""Inception-style random crop and bicubic resize, per image and batched.

The crop box follows TF's sample_distorted_bounding_box kernel; the resize is
two matmuls with TF's half-pixel bicubic weights, so boxes may be dynamic
under XLA. Colour, flip and blur live in augment.py.
"""

from __future__ import annotations

import tensorflow as tf

from simclr_tf.data.augment import randomness as random_ops

Box = tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]
_CUBIC_TABLE_SIZE = 1024  # TF's bicubic kernel quantises positions to 1/1024.
_KEYS_CUBIC_A = -0.5  # Keys cubic, as TF's half-pixel ResizeBicubic.
# The paper's least crop area (fraction of the image, App. A).
MIN_AREA = 0.08
# Batched crops draw this many attempts first (see sample_crop_boxes).
_QUICK_ATTEMPTS = 8


def sample_crop_box(
    height: tf.Tensor,
    width: tf.Tensor,
    seed: tf.Tensor,
    *,
    area_range: tuple[float, float] = (MIN_AREA, 1.0),
    aspect_ratio_range: tuple[float, float] = (3 / 4, 4 / 3),
    min_object_covered: float = 0.1,
    max_attempts: int = 100,
) -> Box:
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
    aspect_seed, height_seed, y_seed, x_seed = random_ops.split(seed, 4)
    shape = (max_attempts,)
    draws = (
        random_ops.uniform(aspect_seed, shape, *aspect_ratio_range),
        random_ops.uniform(height_seed, shape),
        random_ops.uniform(y_seed, shape),
        random_ops.uniform(x_seed, shape),
    )
    box, _ = _first_accepted_box(
        height, width, draws, area_range, min_object_covered
    )
    return box


def sample_crop_boxes(
    height: tf.Tensor,
    width: tf.Tensor,
    seeds: tf.Tensor,
    *,
    area_range: tuple[float, float] = (MIN_AREA, 1.0),
    aspect_ratio_range: tuple[float, float] = (3 / 4, 4 / 3),
    min_object_covered: float = 0.1,
    max_attempts: int = 100,
) -> Box:
    """`sample_crop_box` for many seeds at once, box i from seeds[i].

    Attempt j's draws do not depend on how many attempts are drawn, and an
    attempt is rejected with probability ~0.07 (SimCLR's ranges), so the
    first _QUICK_ATTEMPTS decide almost every box; only if some image has
    none accepted are all max_attempts drawn for the batch. The boxes are
    the same either way, at a sixth of the random-number cost.

    Args:
      height: int scalar, image height H > 0 (shared by the batch).
      width: int scalar, image width W > 0.
      seeds: int32 [B, 2] stateless seeds.
      area_range: as in sample_crop_box.
      aspect_ratio_range: as in sample_crop_box.
      min_object_covered: as in sample_crop_box.
      max_attempts: as in sample_crop_box.

    Returns:
      (offset_y, offset_x, crop_height, crop_width), int32 [B] each, equal
      to sample_crop_box(height, width, seeds[i]) row by row.
    """
    # The four per-image seeds of sample_crop_box, drawn from in one call.
    draw_seeds = random_ops.stateless_split(random_ops.as_seed(seeds), 4)
    low, high = aspect_ratio_range

    def attempt(count: int) -> tuple[Box, tf.Tensor]:
        units = tf.unstack(random_ops.uniform_batch(draw_seeds, count), axis=1)
        # As random_ops.uniform(aspect_seed, shape, low, high) computes it.
        units[0] = low + (high - low) * units[0]
        return _first_accepted_box(
            height, width, tuple(units), area_range, min_object_covered
        )

    quick, found = attempt(min(_QUICK_ATTEMPTS, max_attempts))
    return tf.cond(
        tf.reduce_all(found),
        lambda: quick,
        lambda: attempt(max_attempts)[0],
    )


def _first_accepted_box(
    height: tf.Tensor,
    width: tf.Tensor,
    draws: tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor],
    area_range: tuple[float, float],
    min_object_covered: float,
) -> tuple[Box, tf.Tensor]:
    """The kernel's attempts from draws [..., A]; first accepted per row.

    draws: the aspect ratios and U[0, 1) units for the height, y and x.
    Returns the box (the whole image where none is accepted) and whether
    one was, bool [...].
    """
    aspect, height_unit, y_unit, x_unit = draws
    height = tf.cast(height, tf.int32)
    width = tf.cast(width, tf.int32)
    height_f = tf.cast(height, tf.float32)
    width_f = tf.cast(width, tf.float32)
    min_area = area_range[0] * width_f * height_f
    max_area = area_range[1] * width_f * height_f
    crop_height, max_height = _crop_height_bounds(
        aspect, min_area, max_area, height, width
    )
    crop_height += random_ops.random_index(
        height_unit, max_height - crop_height + 1
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
    offset_y = random_ops.random_index(y_unit, height - crop_height)
    offset_x = random_ops.random_index(x_unit, width - crop_width)
    first = tf.argmax(tf.cast(accepted, tf.int32), -1, output_type=tf.int32)
    found = tf.reduce_any(accepted, axis=-1)

    # gather, not [first]: XLA would treat a slice start as a compile-time
    # constant and recompile for every seed.
    def pick(values: tf.Tensor) -> tf.Tensor:
        return tf.gather(values, first, axis=-1, batch_dims=first.shape.rank)

    box = (
        tf.where(found, pick(offset_y), 0),
        tf.where(found, pick(offset_x), 0),
        tf.where(found, pick(crop_height), height),
        tf.where(found, pick(crop_width), width),
    )
    return box, found


def round_to_int(value: tf.Tensor) -> tf.Tensor:
    """lrintf: round half to even, to int32."""
    return tf.cast(tf.round(value), tf.int32)


def _crop_height_bounds(
    aspect: tf.Tensor,
    min_area: tf.Tensor,
    max_area: tf.Tensor,
    height: tf.Tensor,
    width: tf.Tensor,
) -> tuple[tf.Tensor, tf.Tensor]:
    """The kernel's [min height, max height] per attempt, int32 [..., A]."""
    min_height = round_to_int(tf.sqrt(min_area / aspect))
    max_height = round_to_int(tf.sqrt(max_area / aspect))

    def rounded_width(rows: tf.Tensor) -> tf.Tensor:
        return round_to_int(tf.cast(rows, tf.float32) * aspect)

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
        columns = round_to_int(tf.cast(rows, tf.float32) * aspect)
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
    """[..., out_size, in_size] bicubic weights resampling [offset, +length).

    offset and length are int scalars or [...] (one window per row). Follows
    TF's ResizeBicubic with half_pixel_centers: source position (o + 0.5)
    length / out_size - 0.5, its fraction rounded to 1/1024, taps outside
    the crop get weight 0 and the rest are renormalised.
    """
    offset = tf.cast(offset, tf.int32)[..., None, None]
    length = tf.cast(length, tf.int32)[..., None]
    scale = tf.cast(length, tf.float32) / float(out_size)
    centre = (tf.range(out_size, dtype=tf.float32) + 0.5) * scale - 0.5
    start = tf.floor(centre)
    table = _CUBIC_TABLE_SIZE
    fraction = tf.round((centre - start) * table) / table  # [..., out]
    steps = tf.constant([-1.0, 0.0, 1.0, 2.0])
    weights = _keys_cubic(tf.abs(fraction[..., None] - steps))  # [..., out, 4]
    taps = tf.cast(start, tf.int32)[..., None] + tf.cast(steps, tf.int32)
    length = length[..., None]
    inside = (taps >= 0) & (taps < length)
    weights = tf.where(inside, weights, 0.0)
    total = tf.reduce_sum(weights, axis=-1, keepdims=True)
    weights = tf.math.divide_no_nan(weights, total)
    columns = offset + tf.clip_by_value(taps, 0, length - 1)
    one_hot = tf.one_hot(columns, tf.cast(in_size, tf.int32))  # [.., o, 4, i]
    return tf.einsum("...ok,...oki->...oi", weights, one_hot)


def crop_and_resize(image: tf.Tensor, box: Box, size: int) -> tf.Tensor:
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
    image = random_ops.as_float(image)
    channels = random_ops.channels(image)
    offset_y, offset_x, crop_height, crop_width = box
    shape = tf.shape(image)
    rows = _resize_matrix(offset_y, crop_height, shape[0], size)
    columns = _resize_matrix(offset_x, crop_width, shape[1], size)
    resized = tf.einsum("oh,hwc->owc", rows, image)
    resized = tf.einsum("pw,owc->opc", columns, resized)
    return tf.ensure_shape(resized, [size, size, channels])


def crop_and_resize_batch(
    images: tf.Tensor,
    boxes: Box,
    size: int,
    *,
    flip: tf.Tensor | None = None,
) -> tf.Tensor:
    """`crop_and_resize` per image with per-image boxes, optionally mirrored.

    A left-right flip of the output reverses the rows of the column matrix,
    so it costs nothing and moves no value: the flipped view is exactly
    tf.reverse(crop_and_resize(...), axis=[1]).

    Args:
      images: [B, H, W, C] uint8 0..255 or float 0..1, C in {1, 3}.
      boxes: (offset_y, offset_x, crop_height, crop_width) int32 [B] each.
      size: output side in pixels.
      flip: bool [B], mirror image i left-right where true; None: never.

    Returns:
      [B, size, size, C] float32.
    """
    images = random_ops.as_float(images)
    channels = random_ops.channels(images)
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


def random_crop_with_resize(
    image: tf.Tensor,
    size: int,
    seed: tf.Tensor,
    *,
    min_area: float = MIN_AREA,
) -> tf.Tensor:
    """Inception-style random crop (sample_crop_box) resized to [size, size].

    Args:
      image: [H, W, C] uint8 0..255 or float 0..1, C in {1, 3}.
      size: output side in pixels.
      seed: int32 [2] stateless seed.
      min_area: least crop area as a fraction of the image (area range
        [min_area, 1]).

    Returns:
      [size, size, C] float32, approximately in [0, 1] (bicubic ringing).
    """
    image = random_ops.as_float(image)
    shape = tf.shape(image)
    box = sample_crop_box(shape[0], shape[1], seed, area_range=(min_area, 1.0))
    return crop_and_resize(image, box, size)


def random_crop_with_resize_batch(
    images: tf.Tensor,
    size: int,
    seeds: tf.Tensor,
    *,
    flip: tf.Tensor | None = None,
    min_area: float = MIN_AREA,
) -> tf.Tensor:
    """`random_crop_with_resize` per image, then an optional flip.

    Args:
      images: [B, H, W, C] uint8 0..255 or float 0..1, C in {1, 3}.
      size: output side in pixels.
      seeds: int32 [B, 2] stateless seeds, one per image.
      flip: bool [B], mirror image i left-right where true; None: never.
      min_area: least crop area as a fraction of the image.

    Returns:
      [B, size, size, C] float32; image i equals
      random_crop_with_resize(images[i], size, seeds[i]) (mirrored if
      flip[i]) up to float32 summation order.
    """
    images = random_ops.as_float(images)
    shape = tf.shape(images)
    boxes = sample_crop_boxes(
        shape[1], shape[2], seeds, area_range=(min_area, 1.0)
    )
    return crop_and_resize_batch(images, boxes, size, flip=flip)
