"""Tests for simclr_tf.data.augment ops and views against numpy references.

Each op is checked against a numpy formula (grayscale, brightness,
contrast, saturation and hue through colorsys, the blur kernel, flip), its
random draws against their laws and probabilities, and the views for
eager / tf.data / XLA agreement, repeatability and per-image draws.
"""

from __future__ import annotations

import colorsys
import math

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.data.augment import ops, views

SEED = tf.constant([5, 17], tf.int32)


def _images(count, height, width, channels, dtype="float32", seed=0):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(count, height, width, channels))
    if dtype == "uint8":
        return tf.constant(pixels, tf.uint8)
    return tf.constant(pixels / 255.0, tf.float32)


def _view(images, seed, size=24, **options):
    options = {"color_jitter_strength": 1.0, "blur": True, **options}
    return views.simclr_augment_batch(images, size, seed=seed, **options)


def _ks_uniform(values, low, high):
    """Kolmogorov-Smirnov distance of the sample to U[low, high]."""
    values = np.sort((np.asarray(values, np.float64) - low) / (high - low))
    count = len(values)
    above = np.arange(1, count + 1) / count - values
    return max(above.max(), (values - np.arange(count) / count).max())


def _ks_limit(count, alpha=1e-3):
    """Asymptotic one-sample KS critical value at level alpha."""
    return math.sqrt(-math.log(alpha / 2) / 2) / math.sqrt(count)


def _binomial_tolerance(p, count):
    """4 standard deviations of a Binomial(count, p) proportion."""
    return 4 * math.sqrt(p * (1 - p) / count)


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
@pytest.mark.parametrize("channels", [1, 3])
def test_simclr_augment_shape_dtype_and_range(dtype, channels):
    images = _images(6, 40, 52, channels, dtype)
    batch = _view(images, SEED, 32)
    assert batch.shape == (6, 32, 32, channels)
    one = views.simclr_augment(
        images[0], 32, color_jitter_strength=1.0, blur=True
    )
    assert one.shape == (32, 32, channels)
    for view in (batch, one):
        assert view.dtype == tf.float32
        assert 0.0 <= float(tf.reduce_min(view))
        assert float(tf.reduce_max(view)) <= 1.0


def test_simclr_augment_is_a_batch_of_one():
    image = _images(1, 40, 52, 3, "uint8")[0]
    one = views.simclr_augment(
        image, 24, color_jitter_strength=1.0, blur=True, seed=SEED
    )
    np.testing.assert_array_equal(one.numpy(), _view(image[None], SEED)[0])


def test_simclr_augment_handles_dynamic_image_size_in_tf_data():
    images = [_images(1, h, w, 3, "uint8")[0] for h, w in ((40, 52), (36, 30))]
    dataset = tf.data.Dataset.from_generator(
        lambda: iter(images),
        output_signature=tf.TensorSpec([None, None, 3], tf.uint8),
    )

    def view(image):
        return views.simclr_augment(
            image, 32, color_jitter_strength=1.0, blur=True, seed=SEED
        )

    mapped = dataset.map(view)
    assert mapped.element_spec.shape == (32, 32, 3)  # static despite H, W
    for image, from_data in zip(images, mapped, strict=True):
        # Same kernels on both paths: only op-placement rounding may differ.
        np.testing.assert_allclose(from_data, view(image), atol=1e-6)


def test_simclr_augment_batch_eager_tf_data_and_xla_agree():
    images = _images(8, 30, 34, 3, "uint8")
    eager = _view(images, SEED).numpy()
    data = tf.data.Dataset.from_tensors((images, SEED)).map(_view)
    compiled = tf.function(_view, jit_compile=True)
    # The random draws are equal on all paths (test_random_ops); XLA fuses
    # the float arithmetic differently (measured max 1e-6), amplified at
    # most by contrast / saturation factors <= 1.8 in each of four steps.
    np.testing.assert_allclose(next(iter(data)).numpy(), eager, atol=1e-5)
    np.testing.assert_allclose(compiled(images, SEED).numpy(), eager, atol=1e-5)


def test_simclr_augment_batch_seed_repeats_and_seeds_differ():
    images = _images(4, 30, 34, 3, "uint8")
    first = _view(images, SEED).numpy()
    np.testing.assert_array_equal(_view(images, SEED).numpy(), first)
    other = _view(images, SEED + 1).numpy()
    assert np.abs(first - other).max(axis=(1, 2, 3)).min() > 0.05


def test_simclr_augment_batch_draws_differ_between_images():
    # One image repeated 8 times, one seed: every view is its own draw.
    images = tf.repeat(_images(1, 30, 34, 3, "uint8"), 8, axis=0)
    batch = _view(images, SEED).numpy()
    for i in range(8):
        for j in range(i):
            assert np.abs(batch[i] - batch[j]).max() > 0.05, (i, j)


def test_to_grayscale_matches_numpy_luma():
    images = _images(2, 5, 6, 3).numpy()
    luma = images @ np.array([0.2989, 0.5870, 0.1140])
    expected = np.repeat(luma[..., None], 3, axis=-1)
    ours = ops.to_grayscale(tf.constant(images)).numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-6)  # float32 rounding
    one_channel = _images(2, 5, 6, 1)
    np.testing.assert_array_equal(ops.to_grayscale(one_channel), one_channel)


def test_adjust_brightness_v1_adds_and_v2_multiplies():
    images = _images(2, 4, 5, 3)
    values = tf.constant([0.3, 1.4])
    expected = images.numpy() * values.numpy()[:, None, None, None]
    np.testing.assert_allclose(
        ops.adjust_brightness(images, values, "v2"), expected, atol=1e-7
    )
    expected = images.numpy() + values.numpy()[:, None, None, None]
    np.testing.assert_allclose(
        ops.adjust_brightness(images, values, "v1"), expected, atol=1e-7
    )


def _contrast_numpy(image, factor):
    mean = image.mean(axis=(0, 1), keepdims=True)  # per channel
    return (image - mean) * factor + mean


def _hsv_numpy(image, saturation, hue):
    """colorsys per pixel: s <- clip(s x saturation), h <- h + hue mod 1."""
    result = np.empty_like(image)
    for index in np.ndindex(image.shape[:2]):
        h, s, v = colorsys.rgb_to_hsv(*image[index])
        s = min(max(s * saturation, 0.0), 1.0)
        result[index] = colorsys.hsv_to_rgb((h + hue) % 1.0, s, v)
    return result


def test_adjust_contrast_matches_numpy():
    images = _images(3, 6, 7, 3)
    factors = np.array([0.2, 1.0, 1.8], np.float32)
    ours = ops.adjust_contrast(images, factors).numpy()
    for index, factor in enumerate(factors):
        expected = _contrast_numpy(images[index].numpy(), factor)
        np.testing.assert_allclose(ours[index], expected, atol=1e-6)


def test_adjust_saturation_and_hue_match_colorsys():
    images = _images(3, 6, 7, 3)
    saturation = np.array([0.2, 1.0, 1.8], np.float32)
    hue = np.array([0.0, -0.2, 0.13], np.float32)
    ours = ops.adjust_saturation_and_hue(images, saturation, hue).numpy()
    for index in range(3):
        expected = _hsv_numpy(
            images[index].numpy().astype(np.float64),
            saturation[index],
            hue[index],
        )
        # float32 HSV round trip against float64 colorsys.
        np.testing.assert_allclose(ours[index], expected, atol=2e-6)
    gray = _images(2, 4, 4, 1)
    np.testing.assert_array_equal(
        ops.adjust_saturation_and_hue(gray, saturation[:2], hue[:2]), gray
    )


@pytest.mark.parametrize("strength, impl", [(1.0, "v2"), (0.5, "v1")])
def test_jitter_draws_follow_their_laws(strength, impl):
    count = 4000
    factors, order = ops.jitter_draws(SEED, count, strength, impl)
    # GR: brightness max(0, 1 - 0.8 s)..1 + 0.8 s (v1: +-0.8 s), contrast
    # and saturation 1 -+ 0.8 s, hue +-0.2 s.
    brightness = (-0.8 * strength, 0.8 * strength)
    if impl == "v2":
        brightness = (max(0.0, 1 - 0.8 * strength), 1 + 0.8 * strength)
    laws = [
        brightness,
        (1 - 0.8 * strength, 1 + 0.8 * strength),
        (1 - 0.8 * strength, 1 + 0.8 * strength),
        (-0.2 * strength, 0.2 * strength),
    ]
    for op, (low, high) in enumerate(laws):
        values = factors[:, op].numpy()
        assert values.min() >= low and values.max() <= high
        assert _ks_uniform(values, low, high) < _ks_limit(count), op
    # A uniform permutation per image: 24 orders, Pearson chi-square with
    # 23 degrees of freedom below its 0.1% quantile 49.73.
    codes = order.numpy() @ np.array([64, 16, 4, 1])
    counts = np.unique(codes, return_counts=True)[1]
    assert len(counts) == 24
    expected = count / 24
    assert ((counts - expected) ** 2 / expected).sum() < 49.73


def _color_jitter_numpy(image, factors, order, impl="v2"):
    """GR's color_jitter_rand for one image with the given draws."""
    rgb = image.shape[-1] == 3
    for op in order:
        if op == ops.BRIGHTNESS:
            image = image * factors[0] if impl == "v2" else image + factors[0]
        elif op == ops.CONTRAST:
            image = _contrast_numpy(image, factors[1])
        elif op == ops.SATURATION and rgb:
            image = _hsv_numpy(image, factors[2], 0.0)
        elif op == ops.HUE and rgb:
            image = _hsv_numpy(image, 1.0, factors[3])
        image = np.clip(image, 0.0, 1.0)
    return image


@pytest.mark.parametrize("channels, impl", [(3, "v2"), (3, "v1"), (1, "v2")])
def test_color_jitter_matches_numpy_in_the_drawn_order(channels, impl):
    images = _images(6, 6, 6, channels)
    ours = ops.color_jitter(images, 1.0, SEED, brightness_impl=impl).numpy()
    factors, order = ops.jitter_draws(SEED, 6, 1.0, impl)
    for index in range(6):
        expected = _color_jitter_numpy(
            images[index].numpy().astype(np.float64),
            factors[index].numpy().astype(np.float64),
            order[index].numpy(),
            impl,
        )
        # float32 against float64, over four steps with factors <= 1.8.
        np.testing.assert_allclose(ours[index], expected, atol=1e-5)


@pytest.mark.parametrize("side, taps", [(224, 23), (32, 3), (28, 3)])
def test_blur_kernel_size_is_ten_percent_of_side(side, taps):
    # GR: kernel_size = side // 10, radius = kernel_size // 2, taps 2r + 1.
    assert ops.blur_kernel_size(side) == taps


def _gaussian_numpy(sigma, taps):
    offsets = np.arange(taps) - taps // 2
    kernel = np.exp(-(offsets**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def test_gaussian_blur_impulse_gives_each_image_its_gaussian():
    sigmas, taps = [0.7, 1.3], 7
    images = np.zeros((2, 15, 15, 1), np.float32)
    images[:, 7, 7, 0] = 1.0
    ours = ops.gaussian_blur(tf.constant(images), tf.constant(sigmas), taps)
    for index, sigma in enumerate(sigmas):
        kernel = _gaussian_numpy(sigma, taps)
        expected = np.zeros((15, 15))
        expected[4:11, 4:11] = np.outer(kernel, kernel)
        np.testing.assert_allclose(ours[index, ..., 0], expected, atol=1e-6)


def test_gaussian_blur_keeps_constant_image_away_from_borders():
    images = tf.fill([1, 20, 20, 3], 0.6)
    blurred = ops.gaussian_blur(images, tf.constant([2.0]), 7).numpy()[0]
    np.testing.assert_allclose(blurred[3:-3, 3:-3], 0.6, atol=1e-6)
    # SAME zero padding: the corner keeps the kernel's inner quarter.
    kernel = _gaussian_numpy(2.0, 7)
    corner = 0.6 * kernel[3:].sum() ** 2
    np.testing.assert_allclose(blurred[0, 0], corner, atol=1e-6)


def test_random_blur_sigma_is_uniform_on_its_range():
    # Impulses at 41 px (5 taps): the blurred centre is c(sigma)^2 with
    # c the normalised centre tap, decreasing in sigma, so each image's
    # sigma can be read back. Below 0.5 c is too close to 1 in float32,
    # so the law checked is sigma | sigma >= 0.5 ~ U[0.5, 2.0].
    count = 2000
    images = np.zeros((count, 41, 41, 1), np.float32)
    images[:, 20, 20, 0] = 1.0
    centre = ops.random_blur(tf.constant(images), SEED).numpy()[:, 20, 20, 0]
    grid = np.linspace(0.05, 2.05, 40001)
    taps = np.exp(-(np.arange(-2, 3)[:, None] ** 2) / (2 * grid**2))
    centre_of_sigma = (1.0 / taps.sum(axis=0)) ** 2  # decreasing in sigma
    blurred = centre < 1.0
    sigma = np.interp(centre[blurred], centre_of_sigma[::-1], grid[::-1])
    assert abs(blurred.mean() - 0.5) < _binomial_tolerance(0.5, count)
    assert sigma.min() >= 0.1 - 1e-3 and sigma.max() <= 2.0 + 1e-3
    upper = sigma[sigma >= 0.5]
    assert _ks_uniform(upper, 0.5, 2.0) < _ks_limit(len(upper))
    # P(sigma >= 0.5) = 1.5 / 1.9 of the blurred images.
    share = len(upper) / blurred.sum()
    assert abs(share - 1.5 / 1.9) < _binomial_tolerance(1.5 / 1.9, 1000)


def _fraction(mask):
    return float(np.mean(mask))


def test_random_ops_apply_with_their_probability():
    count = 2000
    colour = _images(count, 8, 8, 3)
    gray = _images(count, 8, 8, 1)
    # 40 px: a 5-tap blur (at 8 px the kernel is 1 tap, the identity).
    large = _images(count, 40, 40, 1)
    changed = np.abs(ops.random_blur(large, SEED) - large).max(axis=(1, 2, 3))
    # Strength 0: no jitter, so only grayscale (p = 0.2) acts.
    grayed = ops.random_color_distortion(colour, 0.0, SEED).numpy()
    is_gray = np.all(grayed == grayed[..., :1], axis=(1, 2, 3))
    # 1-channel images: grayscale is the identity, jitter (p = 0.8) acts.
    jittered = ops.random_color_distortion(gray, 1.0, SEED) - gray
    # Whole-image crops: a view is the image or its mirror (p = 0.5).
    crops = views.crop_and_flip(colour, 8, SEED, crop_min_area=1.0).numpy()
    mirrored = np.abs(crops - colour.numpy()[:, :, ::-1]).max(axis=(1, 2, 3))
    unchanged = np.abs(crops - colour.numpy()).max(axis=(1, 2, 3))
    assert np.all(np.minimum(mirrored, unchanged) < 1e-6)
    for hits, p in [
        (changed > 0, 0.5),
        (is_gray, 0.2),
        (np.abs(jittered).max(axis=(1, 2, 3)) > 0, 0.8),
        (mirrored < 1e-6, 0.5),
    ]:
        assert abs(_fraction(hits) - p) < _binomial_tolerance(p, count), p


def test_color_jitter_rejects_strength_above_limit():
    images = _images(1, 4, 4, 3)
    with pytest.raises(ValueError, match="color_jitter_strength=2.0"):
        ops.color_jitter(images, 2.0, SEED)
    with pytest.raises(ValueError, match="color_jitter_strength=2.0"):
        _view(images, SEED, 8, color_jitter_strength=2.0)


def test_views_reject_per_image_seeds():
    images = _images(2, 8, 8, 3)
    with pytest.raises(ValueError, match=r"one int32 \[2\] stateless seed"):
        _view(images, tf.zeros([2, 2], tf.int32), 8)


def test_simclr_augment_without_color_distort_keeps_pixel_colours():
    # Crop + flip only: a constant-colour image stays that colour.
    image = tf.constant([0.2, 0.5, 0.9]) * tf.ones([40, 40, 3])
    view = views.simclr_augment(
        image,
        16,
        color_jitter_strength=1.0,
        blur=False,
        seed=SEED,
        color_distort=False,
    )
    np.testing.assert_allclose(
        view.numpy(), np.broadcast_to([0.2, 0.5, 0.9], (16, 16, 3)), atol=1e-6
    )


def test_preprocess_for_eval_centre_crops_like_gr():
    image = _images(1, 60, 80, 3, "uint8")[0]
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
    ours = views.preprocess_for_eval(image, 48)
    # Summation order only (see test_crop_and_resize_matches_tf_image_resize).
    np.testing.assert_allclose(ours.numpy(), reference.numpy(), atol=2e-6)


def test_preprocess_for_eval_is_identity_at_32_pixels():
    image = _images(1, 32, 32, 3, "uint8")[0]
    ours = views.preprocess_for_eval(image, 32)
    # No crop at <= 32 px and a same-size bicubic resize has weights 0/1.
    np.testing.assert_array_equal(
        ours.numpy(), tf.image.convert_image_dtype(image, tf.float32).numpy()
    )
