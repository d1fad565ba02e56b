"""Tests for simclr_tf.data.augment against numpy references and TF ops."""

from __future__ import annotations

import colorsys
import math

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.data.augment import batch as augment_batch
from simclr_tf.data.augment import image as augment


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


def _batch(count, height, width, channels, dtype):
    return tf.stack(
        [_image(height, width, channels, dtype, seed=i) for i in range(count)]
    )


def _batch_seeds(count, salt=0):
    # Mixed signs: any int32 seed must give per-image parity.
    rng = np.random.default_rng(salt)
    return tf.constant(rng.integers(-(2**31), 2**31, (count, 2)), tf.int32)


# Per-image parity: the random draws are bit-identical, so only float32
# summation order differs (batched matmuls and means, HSV conversion; about
# 2e-6 observed), amplified by at most four jitter factors <= 2.
PARITY_ATOL = 1e-5


@pytest.mark.parametrize(
    "channels, dtype, size, options",
    [
        (1, "uint8", 28, {"color_jitter_strength": 0.5, "blur": False}),
        (3, "uint8", 24, {"color_jitter_strength": 1.0, "blur": True}),
        (
            3,
            "float32",
            20,
            {
                "color_jitter_strength": 1.25,
                "blur": True,
                "brightness_impl": "v1",
            },
        ),
        (1, "float32", 20, {"color_jitter_strength": 0.0, "blur": True}),
        (
            3,
            "uint8",
            16,
            {
                "color_jitter_strength": 1.0,
                "blur": False,
                "color_distort": False,
            },
        ),
    ],
)
def test_simclr_augment_batch_equals_per_image(channels, dtype, size, options):
    images = _batch(12, 30, 34, channels, dtype)
    seeds = _batch_seeds(12)
    batched = augment_batch.simclr_augment_batch(
        images, size, seeds=seeds, **options
    )
    assert batched.shape == (12, size, size, channels)
    single = np.stack(
        [
            augment.simclr_augment(images[i], size, seed=seeds[i], **options)
            for i in range(12)
        ]
    )
    np.testing.assert_allclose(batched.numpy(), single, atol=PARITY_ATOL)


def test_simclr_augment_batch_under_xla_equals_per_image():
    images = _batch(8, 30, 30, 3, "uint8")
    seeds = _batch_seeds(8, salt=1)
    compiled = tf.function(
        lambda images, seeds: augment_batch.simclr_augment_batch(
            images, 24, color_jitter_strength=1.0, blur=True, seeds=seeds
        ),
        jit_compile=True,
    )
    view = _augment_fn(24)
    single = np.stack([view(images[i], seeds[i]) for i in range(8)])
    np.testing.assert_allclose(
        compiled(images, seeds).numpy(), single, atol=PARITY_ATOL
    )


def test_color_jitter_batch_fixed_order_equals_per_image():
    images = _batch(6, 10, 12, 3, "float32")
    seeds = _batch_seeds(6, salt=2)
    batched = augment_batch.color_jitter_batch(
        images, 1.0, seeds, random_order=False
    )
    for index in range(6):
        single = augment.color_jitter(
            images[index], 1.0, seeds[index], random_order=False
        )
        np.testing.assert_allclose(batched[index], single, atol=PARITY_ATOL)


def test_gaussian_blur_batch_equals_per_image_blur():
    images = _batch(3, 14, 11, 3, "float32")
    sigma = tf.constant([0.3, 1.0, 2.0])
    batched = augment_batch.gaussian_blur_batch(images, sigma, 5)
    for index in range(3):
        single = augment.gaussian_blur(images[index], sigma[index], 5)
        # Banded matmul vs depthwise conv: summation order only.
        np.testing.assert_allclose(batched[index], single, atol=2e-6)


def test_simclr_augment_batch_rejects_unbatched_seeds():
    images = _batch(2, 8, 8, 3, "uint8")
    with pytest.raises(ValueError, match=r"\[B, 2\]"):
        augment_batch.simclr_augment_batch(
            images, 8, color_jitter_strength=0.5, blur=False, seeds=_seed(1)
        )
