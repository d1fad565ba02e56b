"""Tests for simclr_tf.data.augment.crop: crop boxes and bicubic resize.

Boxes are checked against the empirical law of TF's own
sample_distorted_bounding_box (the kernel GR crops with) and the uniform
law of their offsets; resizes against tf.image.resize.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.data.augment import crop

NUM_BOXES = 4000
NUM_KERNEL_BOXES = 2000


def _image(height, width, channels, seed=0):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, channels))
    return tf.constant(pixels / 255.0, tf.float32)


def _our_boxes(height, width, count=NUM_BOXES, seed=(11, 3), **options):
    boxes = crop.sample_crop_boxes(
        height, width, count, tf.constant(seed), **options
    )
    return np.stack([box.numpy() for box in boxes], 1)  # [count, 4] y x h w


def _kernel_boxes(height, width, area_range, count=NUM_KERNEL_BOXES):
    """Boxes of tf.image.stateless_sample_distorted_bounding_box, GR's
    call: the whole image as the object, min_object_covered 0.1, aspect
    (3/4, 4/3), 100 attempts."""

    @tf.function
    def draw(seeds):
        def one(seed):
            begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
                [height, width, 3],
                tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
                seed=seed,
                min_object_covered=0.1,
                aspect_ratio_range=(3 / 4, 4 / 3),
                area_range=area_range,
                max_attempts=100,
            )
            return tf.concat([begin[:2], size[:2]], 0)

        return tf.map_fn(one, seeds)

    seeds = tf.stack([tf.range(count), tf.fill([count], 5)], axis=1)
    return draw(seeds).numpy()


def _ks_two_sample(first, second):
    """Two-sample Kolmogorov-Smirnov distance of two samples."""
    values = np.concatenate([first, second])
    cdf_first = np.searchsorted(np.sort(first), values, "right") / len(first)
    cdf_second = np.searchsorted(np.sort(second), values, "right")
    return np.abs(cdf_first - cdf_second / len(second)).max()


def _ks_two_sample_limit(count, other, alpha=1e-3):
    """Asymptotic critical value at level alpha (conservative for the
    discrete areas and aspects here)."""
    scale = math.sqrt((count + other) / (count * other))
    return math.sqrt(-math.log(alpha / 2) / 2) * scale


@pytest.mark.parametrize(
    "height, width, area_range",
    [(48, 64, (0.08, 1.0)), (28, 28, (0.25, 1.0)), (224, 160, (0.08, 1.0))],
)
def test_sample_crop_boxes_follow_the_tf_kernel_law(height, width, area_range):
    ours = _our_boxes(height, width, area_range=area_range)
    kernel = _kernel_boxes(height, width, area_range)
    for name, statistic in {
        "area": lambda boxes: boxes[:, 2] * boxes[:, 3],
        "aspect": lambda boxes: boxes[:, 3] / boxes[:, 2],
        "height": lambda boxes: boxes[:, 2],
    }.items():
        # Same law: the KS distance stays below its 0.1% critical value
        # (~0.053 for 4000 vs 2000 boxes).
        distance = _ks_two_sample(statistic(ours), statistic(kernel))
        limit = _ks_two_sample_limit(len(ours), len(kernel))
        assert distance < limit, (name, distance, limit)
    # Whole-image boxes (full crops and fallbacks) are as frequent: within
    # 4 standard errors of the difference of two proportions.
    whole = [
        np.mean(b[:, 2] * b[:, 3] == height * width) for b in (ours, kernel)
    ]
    pooled = (whole[0] * len(ours) + whole[1] * len(kernel)) / (
        len(ours) + len(kernel)
    )
    error = math.sqrt(pooled * (1 - pooled) * (1 / len(ours) + 1 / len(kernel)))
    assert abs(whole[0] - whole[1]) <= 4 * error + 1e-9


def test_sample_crop_boxes_respect_area_aspect_and_image_bounds():
    height, width = 48, 64
    offset_y, offset_x, crop_h, crop_w = _our_boxes(height, width).T
    area_fraction = crop_h * crop_w / (height * width)
    assert area_fraction.min() >= 0.1  # min_object_covered (> 0.08)
    assert area_fraction.max() <= 1.0
    # w = round(h a), so w / h may leave [3/4, 4/3] by at most 0.5 / h.
    aspect = crop_w / crop_h
    assert np.all(aspect >= 3 / 4 - 0.5 / crop_h)
    assert np.all(aspect <= 4 / 3 + 0.5 / crop_h)
    assert offset_y.min() >= 0 and offset_x.min() >= 0
    assert np.all(offset_y + crop_h <= height)
    assert np.all(offset_x + crop_w <= width)


def test_sample_crop_box_offsets_are_uniform_on_the_free_range():
    height, width = 48, 64
    boxes = _our_boxes(height, width)
    for offset, side, extent in ((0, 2, height), (1, 3, width)):
        free = extent - boxes[:, side]  # offset ~ U{0, ..., free}
        moving = free > 0
        position = boxes[moving, offset] / free[moving]
        # Discrete U{0..n} / n has mean 1/2 and variance (n + 2) / (12 n).
        variance = ((free[moving] + 2) / (12 * free[moving])).sum()
        z = (position - 0.5).sum() / math.sqrt(variance)
        assert abs(z) < 4
        # The last position is reachable (the kernel's never is).
        assert np.mean(position == 1.0) > 0.01


def test_sample_crop_boxes_fall_back_to_the_whole_image():
    # 1 x 100: no crop of aspect in [3/4, 4/3] covers 8% (8 pixels) in one
    # row, so every attempt fails and the box is the whole image.
    boxes = _our_boxes(1, 100, count=16)
    np.testing.assert_array_equal(boxes, np.tile([0, 0, 1, 100], (16, 1)))
    # Area range [1, 1]: the only box is the image itself.
    boxes = _our_boxes(28, 28, count=16, area_range=(1.0, 1.0))
    np.testing.assert_array_equal(boxes, np.tile([0, 0, 28, 28], (16, 1)))


def test_sample_crop_boxes_are_the_same_eagerly_in_tf_data_and_xla():
    seed = tf.constant([7, 9])

    def boxes(seed):
        return tf.stack(crop.sample_crop_boxes(37, 51, 256, seed), 1)

    eager = boxes(seed).numpy()
    from_data = next(iter(tf.data.Dataset.from_tensors(seed).map(boxes)))
    compiled = tf.function(boxes, jit_compile=True)(seed)
    # The same integer draws and float32 arithmetic: equal boxes.
    np.testing.assert_array_equal(from_data.numpy(), eager)
    np.testing.assert_array_equal(compiled.numpy(), eager)
    assert len({tuple(box) for box in eager}) > 200  # per-image draws


BOXES = [(0, 0, 37, 51), (3, 5, 20, 30), (10, 2, 7, 9), (36, 50, 1, 1)]


def _reference_resizes(image, size, flip=None):
    flip = flip or (False,) * len(BOXES)
    resized = []
    for box, mirrored in zip(BOXES, flip, strict=True):
        view = tf.image.resize(
            tf.image.crop_to_bounding_box(image, *box),
            [size, size],
            method="bicubic",
            antialias=False,
        )
        resized.append(tf.reverse(view, axis=[1]) if mirrored else view)
    return np.stack(resized)


def _batched_boxes():
    return tuple(tf.constant(values) for values in zip(*BOXES, strict=True))


@pytest.mark.parametrize("size", [16, 48])
@pytest.mark.parametrize("channels", [1, 3])
def test_crop_and_resize_matches_tf_image_resize(size, channels):
    image = _image(37, 51, channels)
    images = tf.stack([image] * len(BOXES))
    ours = crop.crop_and_resize(images, _batched_boxes(), size)
    # Same weights (Keys a=-0.5, 1/1024 table, renormalised borders); only
    # the float32 summation order differs: a few ulp of values <= ~1.2.
    np.testing.assert_allclose(
        ours.numpy(), _reference_resizes(image, size), atol=2e-6
    )


def test_crop_and_resize_flip_mirrors_the_view():
    image = _image(37, 51, 3)
    flip = (True, False, True, True)
    ours = crop.crop_and_resize(
        tf.stack([image] * len(BOXES)),
        _batched_boxes(),
        24,
        flip=tf.constant(flip),
    )
    reference = _reference_resizes(image, 24, flip)
    np.testing.assert_allclose(ours.numpy(), reference, atol=2e-6)


def test_crop_and_resize_with_dynamic_boxes_compiles_under_xla():
    image = _image(37, 51, 3)
    compiled = tf.function(
        lambda images, boxes: crop.crop_and_resize(images, boxes, 24),
        jit_compile=True,
    )
    ours = compiled(tf.stack([image] * len(BOXES)), _batched_boxes())
    # Summation order only, as above.
    np.testing.assert_allclose(
        ours.numpy(), _reference_resizes(image, 24), atol=2e-6
    )
