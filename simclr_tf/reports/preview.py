"""A picture of the augmented views the training pipeline makes.

One grid row per source image: the image, then K SimCLR views made by
augment.simclr_augment with seeds derived from --seed, captioned with the
flags that made them; written as PNG and as a TensorBoard image. It does not
train or read the pipeline's shuffle order (the first N images are shown).
"""

from __future__ import annotations

import math
import posixpath
from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow as tf
from absl import logging
from PIL import Image, ImageDraw, ImageFont

from simclr_tf import file_io
from simclr_tf.config import schema as config_lib
from simclr_tf.data.augment import views as augment
from simclr_tf.data.sources import base as source_lib

PAD_COLOR = (128, 128, 128)  # mid grey: neutral against dark and bright views
CAPTION_MIN_WIDTH = 256  # grids narrower than this are upscaled for the text
CAPTION_MARGIN = 4  # pixels around the caption text
CAPTION_LINE_SPACING = 2  # pixels between caption lines
PREVIEW_FILENAME = "augmentations.png"


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float [0, 1] -> uint8 0..255 by round(255 x), clipped first."""
    values = np.clip(np.asarray(images, np.float64), 0.0, 1.0)
    return np.round(values * 255.0).astype(np.uint8)


def resize_nearest(image: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of [H, W, C] to [size, size, C].

    Output pixel (r, c) is input pixel (r H // size, c W // size): the
    identity when H == W == size, and exact pixel values, no blending.
    """
    height, width = image.shape[:2]
    rows = np.arange(size) * height // size
    cols = np.arange(size) * width // size
    return image[rows][:, cols]


def _check_grid_inputs(images: np.ndarray, views: np.ndarray, pad: int) -> None:
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(
            f"images {images.shape} {images.dtype} must be [N, H, W, C] "
            "uint8; convert floats with preview.to_uint8."
        )
    if views.ndim != 5 or views.shape[2] != views.shape[3]:
        raise ValueError(
            f"views {views.shape} must be [N, K, S, S, C] floats in [0, 1]."
        )
    if views.shape[0] != images.shape[0] or views.shape[4] != images.shape[3]:
        raise ValueError(
            f"images {images.shape} and views {views.shape} must have the "
            "same N and C (C 1 or 3); pass the views made from these images."
        )
    if images.shape[3] not in (1, 3):
        raise ValueError(f"images have C={images.shape[3]}; use 1 or 3.")
    if pad < 0:
        raise ValueError(f"pad={pad} must be >= 0 pixels; use e.g. 2.")


def augmentation_grid(
    images: np.ndarray, views: np.ndarray, *, pad: int = 2
) -> np.ndarray:
    """Tiles each source image and its views into one RGB picture.

    Row i is images[i] (nearest-neighbour resized to S x S, see
    resize_nearest) then views[i, 0..K-1], with `pad` pixels of PAD_COLOR
    between tiles and around the border. Grayscale is repeated to RGB.

    Args:
      images: [N, H, W, C] uint8 source images, C in {1, 3}.
      views: [N, K, S, S, C] float views in [0, 1] (clipped), quantised by
        to_uint8.
      pad: gap between tiles in pixels, >= 0.

    Returns:
      uint8 [N S + (N + 1) pad, (K + 1) S + (K + 2) pad, 3].

    Raises:
      ValueError: for shapes, dtypes or pad outside the above.
    """
    images, views = np.asarray(images), np.asarray(views)
    _check_grid_inputs(images, views, pad)
    count, per_image, size = views.shape[:3]
    height = count * size + (count + 1) * pad
    width = (per_image + 1) * size + (per_image + 2) * pad
    grid = np.empty((height, width, 3), np.uint8)
    grid[...] = PAD_COLOR
    for row in range(count):
        tiles = [resize_nearest(images[row], size), *to_uint8(views[row])]
        top = pad + row * (size + pad)
        for column, tile in enumerate(tiles):
            left = pad + column * (size + pad)
            # [S, S, 1 or 3] broadcasts to RGB: grey becomes 3 equal channels.
            grid[top : top + size, left : left + size] = tile
    return grid


def caption_scale(width: int) -> int:
    """Integer upscale factor so the grid is >= CAPTION_MIN_WIDTH pixels.

    ceil(CAPTION_MIN_WIDTH / width), at least 1: a 28-px Fashion-MNIST grid
    (152 px wide with 4 views) doubles, a 224-px ImageNet grid stays.
    """
    if width < 1:
        raise ValueError(f"grid width={width} must be >= 1 pixel.")
    return max(1, math.ceil(CAPTION_MIN_WIDTH / width))


def caption_line_height(font: ImageFont.ImageFont) -> int:
    """Pixels per caption line: font ascent + descent + line spacing."""
    ascent, descent = font.getmetrics()
    return ascent + descent + CAPTION_LINE_SPACING


def _split_word(
    word: str, width: float, font: ImageFont.ImageFont
) -> list[str]:
    """Breaks one word wider than `width` into pieces that fit."""
    pieces, current = [], ""
    for character in word:
        if current and font.getlength(current + character) > width:
            pieces.append(current)
            current = ""
        current += character
    return [*pieces, current] if current else pieces


def wrap_lines(
    lines: Sequence[str], width: float, font: ImageFont.ImageFont
) -> list[str]:
    """Greedy word wrap of each line to at most `width` pixels of `font`.

    Words break at spaces; a word wider than `width` alone is split between
    characters. An empty line stays one empty line.

    Args:
      lines: paragraphs of text.
      width: available width in pixels.
      font: a Pillow font (getlength measures the text).

    Returns:
      The wrapped lines, in order.
    """
    wrapped = []
    for line in lines:
        current = ""
        for word in line.split():
            candidate = f"{current} {word}" if current else word
            if font.getlength(candidate) <= width:
                current = candidate
                continue
            if current:
                wrapped.append(current)
            *full, current = _split_word(word, width, font) or [""]
            wrapped.extend(full)
        wrapped.append(current)
    return wrapped


def caption_image(grid: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    """Upscales a grid for legibility and adds a caption strip below it.

    The grid is enlarged by caption_scale(width) (pixel repetition). Below
    it, a white strip holds the lines wrapped to the width (wrap_lines,
    less CAPTION_MARGIN each side) in black, in ImageFont.load_default():
    height 2 CAPTION_MARGIN + n caption_line_height(font) for n wrapped
    lines.

    Args:
      grid: uint8 [h, w, 3] picture, e.g. from augmentation_grid.
      lines: caption paragraphs.

    Returns:
      uint8 [f h + strip, f w, 3] with f = caption_scale(w).

    Raises:
      ValueError: if grid is not [h, w, 3] uint8.
    """
    grid = np.asarray(grid)
    if grid.ndim != 3 or grid.shape[2] != 3 or grid.dtype != np.uint8:
        raise ValueError(
            f"grid {grid.shape} {grid.dtype} must be [h, w, 3] uint8, as "
            "augmentation_grid returns."
        )
    scale = caption_scale(grid.shape[1])
    grid = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)
    height, width = grid.shape[:2]
    font = ImageFont.load_default()
    wrapped = wrap_lines(lines, width - 2 * CAPTION_MARGIN, font)
    line_height = caption_line_height(font)
    strip = 2 * CAPTION_MARGIN + len(wrapped) * line_height
    picture = Image.new("RGB", (width, height + strip), (255, 255, 255))
    picture.paste(Image.fromarray(grid), (0, 0))
    draw = ImageDraw.Draw(picture)
    for index, text in enumerate(wrapped):
        top = height + CAPTION_MARGIN + index * line_height
        draw.text((CAPTION_MARGIN, top), text, fill=(0, 0, 0), font=font)
    return np.asarray(picture)


def preview_lines(settings: Mapping[str, object]) -> list[str]:
    """The settings as flags, "--name=value", in the mapping's order.

    Args:
      settings: flag name -> value, e.g. {"image_size": 32}.

    Returns:
      One "--name=value" string per setting (bools as True/False).
    """
    return [f"--{name}={value}" for name, value in settings.items()]


def view_seed(
    seed: int, image_index: int, view_index: int, views: int
) -> list[int]:
    """The stateless seed of view j of image i: [seed mod 2^31, i K + j].

    Distinct for every (i, j) of one preview and a pure function of --seed.
    """
    return [seed % 2**31, image_index * views + view_index]


def make_views(
    source: source_lib.Source,
    *,
    num_images: int,
    views_per_image: int,
    image_size: int,
    color_jitter_strength: float,
    blur: bool,
    brightness_impl: str,
    seed: int,
    crop_min_area: float = 0.08,
) -> tuple[np.ndarray, np.ndarray]:
    """The first num_images of a source and their training views.

    View j of image i is augment.simclr_augment(image, image_size, ...) with
    seed int32 view_seed(seed, i, j, views_per_image), the same function
    (and options) the training pipeline applies.

    Args:
      source: the split to read, in its fixed order (no file shuffling).
      num_images: N >= 1; fewer if the source holds fewer.
      views_per_image: K >= 1.
      image_size: S, view side in pixels.
      color_jitter_strength: s in [0, 1.25].
      blur: apply the random Gaussian blur.
      brightness_impl: "v1" or "v2".
      seed: any int; the same seed gives the same views.
      crop_min_area: least crop area as a fraction of the image.

    Returns:
      images: uint8 [N, S, S, C], each source image through
        augment.preprocess_for_eval(image, S) (bicubic; centre crop for
        S > 32), quantised by to_uint8.
      views: float32 [N, K, S, S, C] in [0, 1].

    Raises:
      ValueError: for num_images or views_per_image < 1, or an empty source.
    """
    if num_images < 1 or views_per_image < 1:
        raise ValueError(
            f"num_images={num_images} and views_per_image={views_per_image} "
            "must be >= 1; use e.g. 8 and 4."
        )
    # Traced once (per image shape): run eagerly, the augmentation's ~100
    # ops per view made 8 x 4 views take 3.5 s, traced 1.5 s.
    view_of = tf.function(
        lambda image, view_seed: augment.simclr_augment(
            image,
            image_size,
            color_jitter_strength=color_jitter_strength,
            blur=blur,
            seed=view_seed,
            brightness_impl=brightness_impl,
            crop_min_area=crop_min_area,
        ),
        autograph=False,
        reduce_retracing=True,
    )
    images, views = [], []
    for index, (image, _) in enumerate(source.dataset().take(num_images)):
        images.append(augment.preprocess_for_eval(image, image_size).numpy())
        views.append(
            [
                view_of(
                    image,
                    tf.constant(
                        view_seed(seed, index, view, views_per_image), tf.int32
                    ),
                ).numpy()
                for view in range(views_per_image)
            ]
        )
    if not images:
        raise ValueError(
            f"source {source.name}/{source.split} yielded no images; check "
            "--dataset, --train_split and --data_dir."
        )
    return to_uint8(np.stack(images)), np.asarray(views, np.float32)


def write_preview(path: str, grid: np.ndarray) -> str:
    """Writes a uint8 [h, w, 3] picture as PNG, creating its directory.

    Through file_io, so path may be a gs:// or other tf.io.gfile URL.

    Args:
      path: the .png file to write.
      grid: uint8 [h, w, 3] (or [h, w, 1]) picture.

    Returns:
      path.
    """
    directory = posixpath.dirname(path)
    if directory:
        file_io.makedirs(directory)
    png = tf.io.encode_png(np.asarray(grid, np.uint8)).numpy()
    return file_io.write_bytes(path, png)


def summary_image(grid: np.ndarray) -> tf.Tensor:
    """The picture as uint8 [1, h, w, 3], ready for tf.summary.image."""
    return tf.constant(np.asarray(grid, np.uint8)[None])


def preview_grid(
    config: config_lib.Config,
    source: source_lib.Source,
    *,
    num_images: int = 8,
    views_per_image: int = 4,
) -> np.ndarray:
    """The captioned grid of `source`'s first images and their views.

    Uses config.data (image_size, color_jitter_strength, use_blur,
    brightness_impl, crop_min_area) and config.train.seed (None previews
    with seed 0); the caption lists these as flags.

    Returns:
      uint8 [h, w, 3], see augmentation_grid and caption_image.
    """
    data = config.data
    seed = 0 if config.train.seed is None else config.train.seed
    images, views = make_views(
        source,
        num_images=num_images,
        views_per_image=views_per_image,
        image_size=data.image_size,
        color_jitter_strength=data.color_jitter_strength,
        blur=data.use_blur,
        brightness_impl=data.brightness_impl,
        seed=seed,
        crop_min_area=data.crop_min_area,
    )
    settings = {
        "dataset": data.dataset,
        "train_split": source.split,
        "image_size": data.image_size,
        "color_jitter_strength": data.color_jitter_strength,
        "use_blur": data.use_blur,
        "brightness_impl": data.brightness_impl,
        "crop_min_area": data.crop_min_area,
        "seed": seed,
    }
    caption = [
        f"Each row: a {source.split} image (eval resize), then "
        f"{views_per_image} training views.",
        " ".join(preview_lines(settings)),
    ]
    return caption_image(augmentation_grid(images, views), caption)


def run_preview(
    config: config_lib.Config, source: source_lib.Source, **kwargs: int
) -> str:
    """Writes <model_dir>/augmentations.png of the source's views.

    Args:
      config: the run's Config; model_dir must be set.
      source: the training split (run_data.open_train_source).
      **kwargs: num_images and views_per_image of `preview_grid`.

    Returns:
      The written PNG's path.
    """
    picture = preview_grid(config, source, **kwargs)
    path = file_io.join(config.model_dir, PREVIEW_FILENAME)
    write_preview(path, picture)
    logging.info("Wrote the augmentation preview to %s", path)
    return path
