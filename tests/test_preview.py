"""Tests for simclr_tf.preview: grid layout, caption, views, PNG and summary."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageFont

from simclr_tf.config import schema as config_lib
from simclr_tf.data.augment import views as augment
from simclr_tf.data.sources import registry, synthetic
from simclr_tf.reports import preview

# Jitter, blur and no blur are all exercised by the options below.
OPTIONS = dict(color_jitter_strength=0.5, blur=True, brightness_impl="v2")


def _tile(grid: np.ndarray, row: int, column: int, size: int, pad: int):
    """Tile (row, column) of a grid, located from the layout written out."""
    top = pad + row * (size + pad)
    left = pad + column * (size + pad)
    return grid[top : top + size, left : left + size]


def _views(channels: int, seed: int, num_images: int = 2, views: int = 2):
    source = synthetic.synthetic(
        num_examples=16, image_size=32, channels=channels
    )
    return preview.make_views(
        source,
        num_images=num_images,
        views_per_image=views,
        image_size=32,
        seed=seed,
        **OPTIONS,
    )


@pytest.mark.parametrize("pad", [0, 2, 5])
def test_augmentation_grid_has_documented_size(pad):
    images = np.zeros((3, 10, 12, 3), np.uint8)
    views = np.zeros((3, 4, 8, 8, 3), np.float32)
    grid = preview.augmentation_grid(images, views, pad=pad)
    # N S + (N + 1) pad by (K + 1) S + (K + 2) pad, RGB uint8.
    assert grid.shape == (3 * 8 + 4 * pad, 5 * 8 + 6 * pad, 3)
    assert grid.dtype == np.uint8


def test_augmentation_grid_source_tile_is_nearest_resize():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    views = rng.uniform(size=(2, 1, 8, 8, 3))
    grid = preview.augmentation_grid(images, views, pad=2)
    for index in range(2):
        expected = np.empty((8, 8, 3), np.uint8)
        for r in range(8):  # nearest: output r samples input floor(r H / S)
            for c in range(8):
                expected[r, c] = images[index, r * 5 // 8, c * 7 // 8]
        np.testing.assert_array_equal(_tile(grid, index, 0, 8, 2), expected)


def test_augmentation_grid_views_are_rounded_and_pad_is_neutral():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (2, 6, 6, 3), dtype=np.uint8)
    views = rng.uniform(-0.1, 1.1, size=(2, 3, 6, 6, 3))  # clipped to [0, 1]
    grid = preview.augmentation_grid(images, views, pad=1)
    mask = np.ones(grid.shape[:2], bool)
    for row in range(2):
        for view in range(3):
            expected = np.round(np.clip(views[row, view], 0, 1) * 255)
            tile = _tile(grid, row, view + 1, 6, 1)
            np.testing.assert_array_equal(tile, expected.astype(np.uint8))
        for column in range(4):
            _tile(mask, row, column, 6, 1)[...] = False
    assert np.all(grid[mask] == preview.PAD_COLOR)


def test_augmentation_grid_grayscale_gives_three_equal_channels():
    images, views = _views(channels=1, seed=0)
    grid = preview.augmentation_grid(images, views)
    assert grid.shape[-1] == 3
    np.testing.assert_array_equal(grid[..., 0], grid[..., 1])
    np.testing.assert_array_equal(grid[..., 0], grid[..., 2])
    # The grey source tile is the source image in all three channels.
    raw, _ = synthetic.synthetic_arrays(16, 32, 1, 10, 0)
    tile = _tile(grid, 1, 0, 32, 2).astype(int)
    # preprocess_for_eval at 32 x 32 is a bicubic identity: rounding only.
    assert np.abs(tile - raw[1]).max() <= 1


def test_augmentation_grid_rejects_mismatched_views():
    images = np.zeros((2, 8, 8, 3), np.uint8)
    views = np.zeros((3, 1, 8, 8, 3), np.float32)
    with pytest.raises(ValueError, match="same N and C"):
        preview.augmentation_grid(images, views)


def test_make_views_source_tile_matches_source_image():
    images, views = _views(channels=3, seed=0)
    raw, _ = synthetic.synthetic_arrays(16, 32, 3, 10, 0)
    grid = preview.augmentation_grid(images, views)
    for index in range(2):
        tile = _tile(grid, index, 0, 32, 2).astype(int)
        # Eval resize of a 32 x 32 image to 32 is the identity up to the
        # float round trip, so at most 1 grey level off.
        assert np.abs(tile - raw[index]).max() <= 1


def test_make_views_match_simclr_augment_with_documented_seeds():
    seed = 7
    images, views = _views(channels=3, seed=seed, num_images=2, views=2)
    raw, _ = synthetic.synthetic_arrays(16, 32, 3, 10, 0)
    grid = preview.augmentation_grid(images, views)
    for index in range(2):
        for view in range(2):
            # Documented seed: [seed mod 2^31, image_index K + view_index].
            expected = augment.simclr_augment(
                tf.constant(raw[index]),
                32,
                color_jitter_strength=0.5,
                blur=True,
                seed=tf.constant([seed, index * 2 + view], tf.int32),
                brightness_impl="v2",
            ).numpy()
            expected = np.round(expected * 255)
            tile = _tile(grid, index, view + 1, 32, 2).astype(int)
            # Same function and seed; 1 level covers rounding at .5.
            assert np.abs(tile - expected).max() <= 1


def test_make_views_views_of_one_image_differ():
    _, views = _views(channels=3, seed=0, num_images=1, views=2)
    # Two random crops/jitters of one image are never pixel-identical.
    assert np.abs(views[0, 0] - views[0, 1]).max() > 0.05


def test_make_views_same_seed_gives_identical_png(tmp_path):
    paths = []
    for name in ("a", "b"):
        images, views = _views(channels=3, seed=3)
        grid = preview.augmentation_grid(images, views)
        paths.append(preview.write_preview(str(tmp_path / f"{name}.png"), grid))
    with open(paths[0], "rb") as first, open(paths[1], "rb") as second:
        assert first.read() == second.read()


def test_make_views_different_seed_gives_different_views():
    images_a, views_a = _views(channels=3, seed=3, num_images=1)
    images_b, views_b = _views(channels=3, seed=4, num_images=1)
    np.testing.assert_array_equal(images_a, images_b)  # same sources
    assert np.abs(views_a - views_b).max() > 0.05


def test_write_preview_creates_directory_and_round_trips(tmp_path):
    grid = np.random.default_rng(2).integers(0, 256, (9, 13, 3), np.uint8)
    path = str(tmp_path / "new" / "dir" / "grid.png")
    assert preview.write_preview(path, grid) == path
    np.testing.assert_array_equal(np.asarray(Image.open(path)), grid)


def _expected_caption_height(grid_height: int, grid_width: int, lines: int):
    """The documented rule, written out: scale, then margins + line heights."""
    scale = max(1, math.ceil(256 / grid_width))
    ascent, descent = ImageFont.load_default().getmetrics()
    return scale, scale * grid_height + 2 * 4 + lines * (ascent + descent + 2)


def test_caption_image_png_has_documented_size(tmp_path):
    images, views = _views(channels=1, seed=0, num_images=2, views=4)
    grid = preview.augmentation_grid(images, views)  # 70 x 172: scale 2
    lines = ["--image_size=32", "--use_blur=True"]  # each fits on one line
    captioned = preview.caption_image(grid, lines)
    path = preview.write_preview(str(tmp_path / "c.png"), captioned)
    width, height = Image.open(path).size
    scale, expected_height = _expected_caption_height(*grid.shape[:2], 2)
    assert scale == 2
    assert (height, width) == (expected_height, 2 * grid.shape[1])


def test_caption_image_keeps_upscaled_grid_and_draws_text():
    grid = np.random.default_rng(3).integers(0, 256, (20, 30, 3), np.uint8)
    captioned = preview.caption_image(grid, ["--seed=1"])
    scale = 9  # ceil(256 / 30)
    upscaled = np.kron(grid, np.ones((scale, scale, 1), np.uint8))
    np.testing.assert_array_equal(captioned[: 20 * scale], upscaled)
    strip = captioned[20 * scale :]
    assert strip.min() < 128  # dark text on the white strip


def test_caption_image_wraps_long_lines_to_width():
    grid = np.zeros((40, 300, 3), np.uint8)  # wide enough: no upscale
    words = [f"--flag_{index}=value" for index in range(30)]
    font = ImageFont.load_default()
    wrapped = preview.wrap_lines([" ".join(words)], 300 - 8, font)
    assert len(wrapped) > 1
    assert all(font.getlength(line) <= 292 for line in wrapped)
    assert " ".join(wrapped).split() == words  # nothing lost or reordered
    captioned = preview.caption_image(grid, [" ".join(words)])
    _, expected_height = _expected_caption_height(40, 300, len(wrapped))
    assert captioned.shape == (expected_height, 300, 3)


def test_preview_lines_formats_flags_in_order():
    settings = {"dataset": "synthetic", "image_size": 32, "use_blur": True}
    assert preview.preview_lines(settings) == [
        "--dataset=synthetic",
        "--image_size=32",
        "--use_blur=True",
    ]


def test_summary_image_is_one_uint8_image_for_tf_summary(tmp_path):
    grid = np.random.default_rng(4).integers(0, 256, (6, 10, 3), np.uint8)
    image = preview.summary_image(grid)
    assert image.dtype == tf.uint8
    np.testing.assert_array_equal(image.numpy(), grid[None])
    writer = tf.summary.create_file_writer(str(tmp_path))
    with writer.as_default():
        assert tf.summary.image("augmentations", image, step=0)


def test_run_preview_writes_model_dir_png(tmp_path):
    run_config = config_lib.Config(
        model_dir=str(tmp_path / "run"),
        data=config_lib.Data(
            dataset="synthetic",
            image_size=32,
            color_jitter_strength=0.5,
            use_blur=False,
        ),
        train=config_lib.Train(seed=5),
    )
    source = registry.open_source("synthetic", "train")
    path = preview.run_preview(
        run_config, source, num_images=2, views_per_image=3
    )
    assert path == os.path.join(str(tmp_path / "run"), "augmentations.png")
    picture = np.asarray(Image.open(path))
    # Grid 2 x 32 + 3 x 2 = 70 high, 4 x 32 + 5 x 2 = 138 wide: scale 2.
    assert picture.shape[1] == 2 * 138
    assert picture.shape[0] > 2 * 70
    # The grid part equals make_views with the config's seed and options.
    images, views = preview.make_views(
        source,
        num_images=2,
        views_per_image=3,
        image_size=32,
        color_jitter_strength=0.5,
        blur=False,
        brightness_impl="v2",
        seed=5,
    )
    grid = preview.augmentation_grid(images, views)
    np.testing.assert_array_equal(picture[:140:2, ::2], grid)
