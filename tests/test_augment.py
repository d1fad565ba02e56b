"""Tests for simclr_tf.data.augment against numpy references and TF ops."""

from __future__ import annotations

import colorsys
import math

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.data import augment

NUM_CROP_DRAWS = 2000


def _image(height, width, channels, dtype, seed=0):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, channels))
    if dtype == "uint8":
        return tf.constant(pixels, tf.uint8)
    return tf.constant(pixels / 255.0, tf.float32)


def _seed(value):
    return tf.constant([value, 17], tf.int32)


def _augment_fn(size=32):
    def view(image, seed):
        return augment.simclr_augment(
            image, size, color_jitter_strength=1.0, blur=True, seed=seed
        )

    return view


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
@pytest.mark.parametrize("channels", [1, 3])
def test_simclr_augment_shape_dtype_and_range(dtype, channels):
    image = _image(40, 52, channels, dtype)
    for seed in [_seed(1), _seed(2), None]:
        view = augment.simclr_augment(
            image, 32, color_jitter_strength=1.0, blur=True, seed=seed
        )
        assert view.shape == (32, 32, channels)
        assert view.dtype == tf.float32
        assert 0.0 <= float(tf.reduce_min(view))
        assert float(tf.reduce_max(view)) <= 1.0


def test_simclr_augment_handles_dynamic_image_size_in_tf_data():
    images = [_image(40, 52, 3, "uint8"), _image(36, 30, 3, "uint8")]
    dataset = tf.data.Dataset.from_generator(
        lambda: iter(images),
        output_signature=tf.TensorSpec([None, None, 3], tf.uint8),
    )
    view = _augment_fn()
    mapped = dataset.map(lambda image: view(image, _seed(9)))
    assert mapped.element_spec.shape == (32, 32, 3)  # static despite H, W
    for image, from_data in zip(images, mapped, strict=True):
        # Same kernels on both paths: only op-placement rounding may differ.
        np.testing.assert_allclose(from_data, view(image, _seed(9)), atol=1e-6)


def test_simclr_augment_same_seed_repeats_and_seeds_differ():
    image = _image(40, 52, 3, "uint8")
    first = _augment_fn()(image, _seed(5))
    again = _augment_fn()(image, _seed(5))
    other = _augment_fn()(image, _seed(6))
    np.testing.assert_array_equal(first.numpy(), again.numpy())
    assert float(tf.reduce_max(tf.abs(first - other))) > 0.05


def test_simclr_augment_eager_tf_data_and_xla_agree():
    image = _image(40, 52, 3, "uint8")
    seeds = tf.constant([[seed, 3] for seed in range(8)], tf.int32)
    view = _augment_fn()
    eager = np.stack([view(image, seed).numpy() for seed in seeds])
    dataset = tf.data.Dataset.from_tensor_slices(seeds)
    mapped = dataset.map(lambda seed: view(image, seed)).batch(8)
    from_data = next(iter(mapped)).numpy()
    compiled = tf.function(view, jit_compile=True)
    from_xla = np.stack([compiled(image, seed).numpy() for seed in seeds])
    # Random draws are bit-identical on all paths; only float rounding of the
    # HSV and matmul kernels differs (observed < 1e-6), amplified at most by
    # contrast/saturation factors <= 1.8 in each of four steps.
    np.testing.assert_allclose(from_data, eager, atol=1e-5)
    np.testing.assert_allclose(from_xla, eager, atol=1e-5)


def _kernel_crop_numpy(height, width, rng, area_range=(0.08, 1.0)):
    """One draw of TF's sample_distorted_bounding_box, written from its C++.

    Whole image as the only box, aspect (3/4, 4/3), min_object_covered 0.1,
    100 attempts. Returns (crop_height, crop_width).
    """
    f32 = np.float32
    min_area = f32(area_range[0]) * f32(width) * f32(height)
    max_area = f32(area_range[1]) * f32(width) * f32(height)
    for _ in range(100):
        aspect = f32(rng.random() * (4 / 3 - 3 / 4) + 3 / 4)
        h = int(np.rint(np.sqrt(f32(min_area / aspect))))
        max_h = int(np.rint(np.sqrt(f32(max_area / aspect))))
        if np.rint(f32(max_h * aspect)) > width:
            max_h = int((width + 0.5 - 1e-7) / aspect)
            if np.rint(f32(max_h * aspect)) > width:
                max_h -= 1
        max_h = min(max_h, height)
        h = min(h, max_h)
        if h < max_h:
            h += int(rng.integers(0, max_h - h + 1))
        w = int(np.rint(f32(h * aspect)))
        area = w * h
        if area < min_area:
            h += 1
            w = int(np.rint(f32(h * aspect)))
            area = w * h
        if area > max_area:
            h -= 1
            w = int(np.rint(f32(h * aspect)))
            area = w * h
        fits = 0 < w <= width and 0 < h <= height
        if min_area <= area <= max_area and fits:
            if area >= 1 and area / (width * height) >= 0.1:
                return h, w
    return height, width


def _our_crop_boxes(height, width, count):
    seeds = tf.stack([tf.range(count), tf.fill([count], 11)], axis=1)

    @tf.function(jit_compile=True)
    def draw(seeds):
        return tf.map_fn(
            lambda seed: tf.stack(augment.sample_crop_box(height, width, seed)),
            seeds,
        )

    return draw(seeds).numpy()  # [count, 4] offset_y, offset_x, h, w


def test_sample_crop_box_respects_area_aspect_and_image_bounds():
    height, width = 48, 64
    boxes = _our_crop_boxes(height, width, NUM_CROP_DRAWS)
    offset_y, offset_x, crop_h, crop_w = boxes.T
    area_fraction = crop_h * crop_w / (height * width)
    assert area_fraction.min() >= 0.1  # min_object_covered
    assert area_fraction.max() <= 1.0
    # w = round(h * a), so w / h may leave (3/4, 4/3) by at most 0.5 / h.
    aspect = crop_w / crop_h
    assert np.all(aspect >= 3 / 4 - 0.5 / crop_h)
    assert np.all(aspect <= 4 / 3 + 0.5 / crop_h)
    assert offset_y.min() >= 0 and offset_x.min() >= 0
    assert np.all(offset_y + crop_h <= height)
    assert np.all(offset_x + crop_w <= width)


def test_sample_crop_box_mean_area_matches_kernel_simulation():
    height, width = 48, 64
    boxes = _our_crop_boxes(height, width, NUM_CROP_DRAWS)
    ours = boxes[:, 2] * boxes[:, 3] / (height * width)
    rng = np.random.default_rng(0)
    draws = [_kernel_crop_numpy(height, width, rng) for _ in range(8000)]
    reference = np.array([h * w for h, w in draws]) / (height * width)
    # Area fractions have std ~0.27: the standard error of the difference of
    # means (2000 vs 8000 draws) is ~0.0068; 0.03 is ~4.4 of them.
    assert abs(ours.mean() - reference.mean()) < 0.03
    # The whole-image share (fallbacks and full crops) agrees within ~4 s.e.
    assert abs(np.mean(ours == 1.0) - np.mean(reference == 1.0)) < 0.03


def test_sample_crop_box_mean_area_matches_tf_kernel():
    height, width = 48, 64
    boxes = _our_crop_boxes(height, width, NUM_CROP_DRAWS)
    ours = boxes[:, 2] * boxes[:, 3] / (height * width)
    whole_image = tf.constant([[[0.0, 0.0, 1.0, 1.0]]])
    kernel = []
    for index in range(NUM_CROP_DRAWS):
        _, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            [height, width, 3],
            whole_image,
            seed=[index, 5],
            min_object_covered=0.1,
            aspect_ratio_range=(3 / 4, 4 / 3),
            area_range=(0.08, 1.0),
            max_attempts=100,
        )
        kernel.append(int(size[0]) * int(size[1]) / (height * width))
    # Two samples of 2000 with std ~0.27: s.e. of the difference ~0.0085.
    assert abs(ours.mean() - np.mean(kernel)) < 0.035


@pytest.mark.parametrize(
    "box", [(0, 0, 37, 51), (3, 5, 20, 30), (10, 2, 7, 9), (36, 50, 1, 1)]
)
@pytest.mark.parametrize("size", [16, 48])
@pytest.mark.parametrize("channels", [1, 3])
def test_crop_and_resize_matches_tf_image_resize(box, size, channels):
    image = _image(37, 51, channels, "float32")
    reference = tf.image.resize(
        tf.image.crop_to_bounding_box(image, *box),
        [size, size],
        method="bicubic",
        antialias=False,
    )
    ours = augment.crop_and_resize(image, box, size)
    # Same weights (Keys a=-0.5, 1/1024 table, renormalised borders); only
    # the float32 summation order differs: a few ulp of values <= ~1.2.
    np.testing.assert_allclose(ours.numpy(), reference.numpy(), atol=2e-6)


def test_crop_and_resize_with_dynamic_box_compiles_under_xla():
    image = _image(37, 51, 3, "float32")
    box = (3, 5, 20, 30)
    compiled = tf.function(
        lambda image, *box: augment.crop_and_resize(image, box, 24),
        jit_compile=True,
    )
    reference = tf.image.resize(
        tf.image.crop_to_bounding_box(image, *box), [24, 24], method="bicubic"
    )
    boxes = [tf.constant(value) for value in box]
    # Summation order only, as above.
    np.testing.assert_allclose(
        compiled(image, *boxes).numpy(), reference.numpy(), atol=2e-6
    )


def test_to_grayscale_matches_numpy_luma():
    image = _image(5, 6, 3, "float32").numpy()
    luma = 0.2989 * image[..., 0] + 0.5870 * image[..., 1]
    luma += 0.1140 * image[..., 2]
    expected = np.repeat(luma[..., None], 3, axis=-1)
    ours = augment.to_grayscale(tf.constant(image)).numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-6)  # float32 rounding


def test_to_grayscale_is_identity_for_one_channel():
    image = _image(5, 6, 1, "float32")
    np.testing.assert_array_equal(augment.to_grayscale(image), image)


@pytest.mark.parametrize("side, taps", [(224, 23), (32, 3), (28, 3)])
def test_blur_kernel_size_is_ten_percent_of_side(side, taps):
    # GR: kernel_size = side // 10, radius = kernel_size // 2, taps 2r + 1.
    assert augment.blur_kernel_size(side) == taps


def test_gaussian_blur_impulse_gives_normalised_gaussian():
    sigma, taps = 1.3, 7
    image = np.zeros((15, 15, 1), np.float32)
    image[7, 7, 0] = 1.0
    blurred = augment.gaussian_blur(tf.constant(image), sigma, taps).numpy()
    offsets = np.arange(taps) - taps // 2
    kernel = np.exp(-(offsets**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    expected = np.zeros((15, 15))
    expected[4:11, 4:11] = np.outer(kernel, kernel)
    np.testing.assert_allclose(blurred[..., 0], expected, atol=1e-6)
    assert abs(blurred.sum() - 1.0) < 1e-5  # the taps sum to 1


def test_gaussian_blur_keeps_constant_image_away_from_borders():
    image = tf.fill([20, 20, 3], 0.6)
    blurred = augment.gaussian_blur(image, 2.0, 7).numpy()
    np.testing.assert_allclose(blurred[3:-3, 3:-3], 0.6, atol=1e-6)
    assert blurred[0, 0, 0] < 0.6 - 0.1  # SAME zero padding darkens edges


def _draws(function, count=200):
    return np.array([function(_seed(index)) for index in range(count)])


def _assert_within_and_spread(values, low, high):
    # 200 uniform draws: each end is approached within 5% of the range
    # with probability 1 - 0.95**200 > 0.9999.
    tolerance = 1e-5  # float32 rounding of the inferred value
    assert values.min() >= low - tolerance
    assert values.max() <= high + tolerance
    assert values.min() < low + 0.05 * (high - low)
    assert values.max() > high - 0.05 * (high - low)


@pytest.mark.parametrize("strength", [0.5, 1.0, 1.25])
def test_random_brightness_v2_factor_within_bounds(strength):
    image = tf.fill([2, 2, 3], 0.5)
    factors = _draws(
        lambda seed: (
            augment.random_brightness(image, strength, seed, "v2")[0, 0, 0]
            / 0.5
        )
    )
    low = max(0.0, 1 - 0.8 * strength)
    _assert_within_and_spread(factors, low, 1 + 0.8 * strength)


def test_random_brightness_v1_delta_within_bounds():
    image = tf.fill([2, 2, 3], 0.5)
    deltas = _draws(
        lambda seed: (
            augment.random_brightness(image, 0.5, seed, "v1")[0, 0, 0] - 0.5
        )
    )
    _assert_within_and_spread(deltas, -0.4, 0.4)


def test_random_contrast_factor_within_bounds():
    # Two halves at 0.25 and 0.75: mean 0.5, so out = 0.5 + 0.25 * factor.
    image = tf.constant([[[0.25]], [[0.75]]]) * tf.ones([2, 2, 3])
    factors = _draws(
        lambda seed: (
            (augment.random_contrast(image, 1.0, seed)[1, 0, 0] - 0.5) / 0.25
        )
    )
    _assert_within_and_spread(factors, 0.2, 1.8)


def _hsv(pixel):
    return colorsys.rgb_to_hsv(*[float(value) for value in pixel])


def test_random_saturation_factor_within_bounds():
    colour = (0.8, 0.6, 0.5)  # saturation 0.375; 1.8x stays below 1
    image = tf.constant(colour) * tf.ones([2, 2, 3])
    saturation = _hsv(colour)[1]
    factors = _draws(
        lambda seed: (
            _hsv(augment.random_saturation(image, 1.0, seed)[0, 0])[1]
            / saturation
        )
    )
    _assert_within_and_spread(factors, 0.2, 1.8)


def test_random_hue_delta_within_bounds():
    colour = (0.8, 0.6, 0.5)
    image = tf.constant(colour) * tf.ones([2, 2, 3])
    hue = _hsv(colour)[0]

    def delta(seed):
        shifted = _hsv(augment.random_hue(image, 1.0, seed)[0, 0])[0]
        return (shifted - hue + 0.5) % 1.0 - 0.5  # wrap to [-0.5, 0.5)

    _assert_within_and_spread(_draws(delta), -0.2, 0.2)


def test_saturation_and_hue_leave_grayscale_input_unchanged():
    image = _image(6, 6, 1, "float32")
    for seed in [_seed(1), _seed(2)]:
        np.testing.assert_array_equal(
            augment.random_saturation(image, 1.0, seed), image
        )
        np.testing.assert_array_equal(
            augment.random_hue(image, 1.0, seed), image
        )


def test_color_jitter_changes_grayscale_input_by_brightness_or_contrast():
    image = _image(6, 6, 1, "float32")
    jittered = augment.color_jitter(image, 1.0, _seed(3))
    assert jittered.shape == (6, 6, 1)
    assert float(tf.reduce_max(tf.abs(jittered - image))) > 0.01


def test_adjust_brightness_v1_adds_and_v2_multiplies():
    image = _image(4, 5, 3, "float32")
    np.testing.assert_allclose(
        augment.adjust_brightness(image, 0.3, "v1"), image.numpy() + 0.3
    )
    np.testing.assert_allclose(
        augment.adjust_brightness(image, 0.3, "v2"), image.numpy() * 0.3
    )


def test_color_jitter_rejects_strength_above_limit():
    image = _image(4, 4, 3, "float32")
    with pytest.raises(ValueError, match="color_jitter_strength=2.0"):
        augment.color_jitter(image, 2.0, _seed(0))
    with pytest.raises(ValueError, match="color_jitter_strength=2.0"):
        augment.simclr_augment(
            image, 8, color_jitter_strength=2.0, blur=False, seed=_seed(0)
        )


@pytest.mark.parametrize(
    "transform, p",
    [
        (lambda image, seed: augment.random_flip(image, seed), 0.5),
        (lambda image, seed: augment.random_grayscale(image, seed), 0.2),
        (lambda image, seed: augment.random_blur(image, seed), 0.5),
    ],
)
def test_random_transforms_apply_with_their_probability(transform, p):
    image = _image(40, 40, 3, "float32")  # 40 px: a 5-tap blur kernel
    count = 400
    changed = [
        bool(tf.reduce_any(transform(image, _seed(index)) != image))
        for index in range(count)
    ]
    # Binomial(400, p): 4 standard deviations is at most 0.1.
    assert abs(np.mean(changed) - p) < 4 * math.sqrt(p * (1 - p) / count)


def test_preprocess_for_eval_centre_crops_like_gr():
    image = _image(60, 80, 3, "uint8")
    side = int(np.rint(0.875 * 60))  # 52: rint rounds 52.5 half to even
    offset_y, offset_x = (60 - side + 1) // 2, (80 - side + 1) // 2
    crop = tf.image.crop_to_bounding_box(
        tf.image.convert_image_dtype(image, tf.float32),
        offset_y,
        offset_x,
        side,
        side,
    )
    reference = tf.clip_by_value(
        tf.image.resize(crop, [48, 48], method="bicubic"), 0.0, 1.0
    )
    ours = augment.preprocess_for_eval(image, 48)
    # Summation order only (see test_crop_and_resize_matches_tf_image_resize).
    np.testing.assert_allclose(ours.numpy(), reference.numpy(), atol=2e-6)


def test_preprocess_for_eval_is_identity_at_32_pixels():
    image = _image(32, 32, 3, "uint8")
    ours = augment.preprocess_for_eval(image, 32)
    # No crop at <= 32 px and a same-size bicubic resize has weights 0/1.
    np.testing.assert_array_equal(
        ours.numpy(), tf.image.convert_image_dtype(image, tf.float32).numpy()
    )


def test_simclr_augment_without_color_distort_keeps_pixel_colours():
    # Crop + flip only: a constant-colour image stays that colour.
    image = tf.constant([0.2, 0.5, 0.9]) * tf.ones([40, 40, 3])
    view = augment.simclr_augment(
        image,
        16,
        color_jitter_strength=1.0,
        blur=False,
        seed=_seed(4),
        color_distort=False,
    )
    np.testing.assert_allclose(
        view.numpy(), np.broadcast_to([0.2, 0.5, 0.9], (16, 16, 3)), atol=1e-6
    )
