"""PIL pictures of evaluation results; nothing here computes a metric.

The confusion-matrix heat map, the labelled 2-D scatter plot, the
nearest-neighbour retrieval grid and the projector sprite, with the layout
and colour constants they share. eval_reports computes what they show.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# matplotlib's tab20 palette; its even entries are tab10. Cycles past 20.
PALETTE_20 = (
    (31, 119, 180), (174, 199, 232), (255, 127, 14), (255, 187, 120),
    (44, 160, 44), (152, 223, 138), (214, 39, 40), (255, 152, 150),
    (148, 103, 189), (197, 176, 213), (140, 86, 75), (196, 156, 148),
    (227, 119, 194), (247, 182, 210), (127, 127, 127), (199, 199, 199),
    (188, 189, 34), (219, 219, 141), (23, 190, 207), (158, 218, 229),
)  # fmt: skip
PALETTE_10 = PALETTE_20[0::2]
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
DARK_BLUE = (8, 48, 107)  # the dark end of the heat map; 1.0 of a row
MATCH_COLOR = (0, 170, 0)  # green border: neighbour label == query label
MISMATCH_COLOR = (220, 0, 0)  # red border: labels differ
QUERY_BORDER_COLOR = (128, 128, 128)
GRID_PAD = 4  # background pixels around every retrieval cell
GRID_BORDER = 3  # coloured border width around every retrieval tile
MIN_TILE = 64  # retrieval tiles are upscaled to at least this many pixels
MAX_MATRIX_PIXELS = 1200  # the heat map's cells shrink to fit this
MAX_COUNT_CLASSES = 20  # counts are written in cells up to this many classes
SPRITE_THUMB = 28  # projector thumbnail side in pixels
MAX_SPRITE_PIXELS = 8192  # the projector rejects larger sprite images
CONFUSION_TITLE = "confusion matrix (rows: true, columns: predicted)"
EMBEDDING_TITLE = "t-SNE of encoder features"


def class_label(index: int, class_names: Sequence[str] | None) -> str:
    """A class as "<index> <name>", or "<index>" when it has no name.

    A name that is just the index ("3", as tfds names unnamed classes) is
    not repeated.
    """
    if class_names is not None and index < len(class_names):
        name = str(class_names[index])
        if name != str(index):
            return f"{index} {name}"
    return str(index)


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def _text_size(font: ImageFont.FreeTypeFont, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return int(right - left), int(bottom)


def _heat_color(value: float) -> tuple[int, int, int]:
    """Linear white (0.0) to dark blue (1.0)."""
    return tuple(
        round(white + (blue - white) * value)
        for white, blue in zip(WHITE, DARK_BLUE, strict=True)
    )


def confusion_matrix_image(
    matrix: np.ndarray, class_names: Sequence[str] | None = None
) -> Image.Image:
    """A row-normalised heat map of a confusion matrix.

    Each cell's shade is its count over its row's total (recall per cell),
    white at 0 and dark blue at 1; counts are written in cells when C <= 20.
    Cells shrink so the matrix fits in about MAX_MATRIX_PIXELS.

    Args:
      matrix: [C, C] non-negative counts, rows true and columns predicted.
      class_names: optional name per class; indices are used otherwise.

    Returns:
      An RGB PIL image.

    Raises:
      ValueError: if matrix is not square 2-D.
    """
    matrix = np.asarray(matrix)
    if (
        matrix.ndim != 2
        or matrix.shape[0] != matrix.shape[1]
        or not matrix.size
    ):
        raise ValueError(
            f"matrix must be [C, C] with C >= 1; got {matrix.shape}."
        )
    num_classes = matrix.shape[0]
    font = _font()
    cell = max(1, min(56, MAX_MATRIX_PIXELS // num_classes))
    _, text_height = _text_size(font, "Ag")
    step = math.ceil((text_height + 2) / cell)  # label every step-th class
    names = [
        class_names[i] if class_names is not None else str(i)
        for i in range(num_classes)
    ]
    label_width = max(_text_size(font, name)[0] for name in names[::step]) + 8
    title_width = _text_size(font, CONFUSION_TITLE)[0]
    top = text_height + 12 + label_width  # title, then rotated column labels
    width = max(label_width + num_classes * cell + 8, title_width + 16)
    image = Image.new("RGB", (width, top + num_classes * cell + 8), WHITE)
    draw = ImageDraw.Draw(image)
    draw.text((8, 4), CONFUSION_TITLE, fill=BLACK, font=font)
    _draw_cells(draw, matrix, (label_width, top), cell, font)
    for index in range(0, num_classes, step):
        offset = index * cell + (cell - text_height) // 2
        draw.text((4, top + offset), names[index], fill=BLACK, font=font)
        text = Image.new("RGB", (label_width, text_height + 2), WHITE)
        ImageDraw.Draw(text).text((4, 0), names[index], fill=BLACK, font=font)
        image.paste(
            text.rotate(90, expand=True),
            (label_width + offset, top - label_width),
        )
    return image


def _draw_cells(
    draw: ImageDraw.ImageDraw,
    matrix: np.ndarray,
    origin: tuple[int, int],
    cell: int,
    font: ImageFont.FreeTypeFont,
) -> None:
    """Fills each cell by its row fraction and writes counts if C <= 20."""
    rows = matrix.sum(axis=1, keepdims=True).astype(np.float64)
    fractions = np.zeros(matrix.shape, np.float64)  # 0 for an empty row
    np.divide(matrix, rows, out=fractions, where=rows != 0)
    left, top = origin
    for row, column in np.ndindex(matrix.shape):
        x, y = left + column * cell, top + row * cell
        value = float(fractions[row, column])
        draw.rectangle(
            [x, y, x + cell - 1, y + cell - 1], fill=_heat_color(value)
        )
        if matrix.shape[0] <= MAX_COUNT_CLASSES:
            text = str(int(matrix[row, column]))
            text_width, text_height = _text_size(font, text)
            color = WHITE if value > 0.5 else BLACK
            position = (
                x + (cell - text_width) // 2,
                y + (cell - text_height) // 2,
            )
            draw.text(position, text, fill=color, font=font)


def embedding_map_image(
    coords: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str] | None = None,
    size: int = 800,
) -> Image.Image:
    """A scatter plot of 2-D points coloured by label, with a legend.

    Args:
      coords: [m, 2] float point positions (any scale; fitted to the plot).
      labels: [m] non-negative integer class per point.
      class_names: optional name per class for the legend.
      size: side of the square plot area in pixels, >= 64.

    Returns:
      An RGB PIL image titled EMBEDDING_TITLE.

    Raises:
      ValueError: on mismatched shapes or a size below 64.
    """
    coords = np.asarray(coords, np.float64)
    labels = np.asarray(labels).astype(np.int64)
    if (
        coords.ndim != 2
        or coords.shape[1] != 2
        or labels.shape != coords[:, 0].shape
    ):
        raise ValueError(
            f"coords {coords.shape} must be [m, 2] and labels "
            f"{labels.shape} [m]."
        )
    if size < 64:
        raise ValueError(f"size={size} must be >= 64 pixels.")
    font = _font()
    classes = np.unique(labels)
    palette = PALETTE_10 if classes.size and classes.max() < 10 else PALETTE_20
    _, text_height = _text_size(font, "Ag")
    names = [class_label(int(label), class_names) for label in classes]
    legend_width = max([_text_size(font, name)[0] for name in names] + [0]) + 40
    top = text_height + 12
    image = Image.new("RGB", (size + legend_width, size + top), WHITE)
    draw = ImageDraw.Draw(image)
    draw.text((8, 4), EMBEDDING_TITLE, fill=BLACK, font=font)
    draw.rectangle([0, top, size - 1, top + size - 1], outline=(200, 200, 200))
    pixels = _fit_to_box(coords, size, margin=12)
    radius = 3 if len(coords) <= 2000 else 2
    order = np.random.default_rng(0).permutation(len(coords))  # no class on top
    for x, y, label in zip(
        pixels[order, 0], pixels[order, 1], labels[order], strict=True
    ):
        color = palette[label % len(palette)]
        draw.ellipse(
            [x - radius, top + y - radius, x + radius, top + y + radius],
            fill=color,
        )
    _draw_legend(draw, classes, names, palette, (size + 8, top + 8), size)
    return image


def _draw_legend(
    draw: ImageDraw.ImageDraw,
    classes: np.ndarray,
    names: Sequence[str],
    palette: Sequence[tuple[int, int, int]],
    origin: tuple[int, int],
    height: int,
) -> None:
    """Colour swatch and name per class; '+N more' past the plot's height."""
    font = _font()
    _, text_height = _text_size(font, "Ag")
    line = text_height + 6
    fits = max(1, (height - 16) // line)
    shown = len(classes) if len(classes) <= fits else fits - 1
    left, top = origin
    for row in range(shown):
        y = top + row * line
        color = palette[classes[row] % len(palette)]
        box = [left, y, left + text_height, y + text_height]
        draw.rectangle(box, fill=color)
        draw.text(
            (left + 8 + text_height, y), names[row], fill=BLACK, font=font
        )
    if shown < len(classes):
        more = f"+{len(classes) - shown} more classes"
        draw.text((left, top + shown * line), more, fill=BLACK, font=font)


def _fit_to_box(coords: np.ndarray, size: int, margin: int) -> np.ndarray:
    """Maps [m, 2] coords into [margin, size - margin] keeping aspect ratio."""
    if not len(coords):
        return np.zeros((0, 2))
    low, high = coords.min(axis=0), coords.max(axis=0)
    span = float(max((high - low).max(), 1e-12))
    scale = (size - 2 * margin) / span
    centred = (coords - (low + high) / 2.0) * scale
    pixels = centred + size / 2.0
    pixels[:, 1] = size - pixels[:, 1]  # image y grows downwards
    return np.round(pixels).astype(np.int64)


def _to_rgb_uint8(images: np.ndarray, name: str) -> np.ndarray:
    """[..., H, W, C] float [0, 1] or uint8, C in {1, 3} -> uint8 RGB."""
    images = np.asarray(images)
    if images.ndim < 3 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"{name} {images.shape} must end in [H, W, C] with C = 1 or 3."
        )
    if images.dtype != np.uint8:
        images = np.round(np.clip(images.astype(np.float64), 0, 1) * 255)
        images = images.astype(np.uint8)
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return images


def retrieval_grid_image(
    query_images: np.ndarray,
    neighbour_images: np.ndarray,
    query_labels: np.ndarray,
    neighbour_labels: np.ndarray,
) -> Image.Image:
    """One row per query: the query, then its k neighbours, framed by label.

    Layout (pixels): every cell is a tile framed by GRID_BORDER px and has
    GRID_PAD px of white on each side; the query column is followed by an
    extra GRID_PAD gap. Query frames are grey; neighbour frames are green
    (MATCH_COLOR) when the label equals the query's and red otherwise. Tiles
    are nearest-neighbour upscaled by an integer factor to >= MIN_TILE px.

    Args:
      query_images: [q, H, W, C] float in [0, 1] or uint8, C = 1 or 3.
      neighbour_images: [q, k, H, W, C], same format.
      query_labels: [q] integer labels.
      neighbour_labels: [q, k] integer labels.

    Returns:
      An RGB PIL image with a one-line caption below the grid.

    Raises:
      ValueError: on inconsistent shapes.
    """
    queries = _to_rgb_uint8(query_images, "query_images")
    neighbours = _to_rgb_uint8(neighbour_images, "neighbour_images")
    count, k = _check_retrieval_shapes(
        queries, neighbours, query_labels, neighbour_labels
    )
    same = np.asarray(neighbour_labels) == np.asarray(query_labels)[:, None]
    height, width = queries.shape[1:3]
    factor = max(1, math.ceil(MIN_TILE / min(height, width)))
    cell_w = width * factor + 2 * GRID_BORDER
    cell_h = height * factor + 2 * GRID_BORDER
    font = _font()
    caption = "left: query; frame green = same label as query, red = different"
    _, text_height = _text_size(font, caption)
    grid_w = (k + 1) * (cell_w + GRID_PAD) + 2 * GRID_PAD
    grid_h = count * (cell_h + GRID_PAD) + GRID_PAD
    image_w = max(grid_w, _text_size(font, caption)[0] + 2 * GRID_PAD)
    image = Image.new("RGB", (image_w, grid_h + text_height + 8), WHITE)
    for row in range(count):
        y = GRID_PAD + row * (cell_h + GRID_PAD)
        _paste_tile(
            image, queries[row], (GRID_PAD, y), factor, QUERY_BORDER_COLOR
        )
        for column in range(k):
            x = 2 * GRID_PAD + (column + 1) * (cell_w + GRID_PAD)
            color = MATCH_COLOR if same[row, column] else MISMATCH_COLOR
            _paste_tile(image, neighbours[row, column], (x, y), factor, color)
    ImageDraw.Draw(image).text(
        (GRID_PAD, grid_h + 2), caption, fill=BLACK, font=font
    )
    return image


def _check_retrieval_shapes(
    queries: np.ndarray,
    neighbours: np.ndarray,
    query_labels: np.ndarray,
    neighbour_labels: np.ndarray,
) -> tuple[int, int]:
    """Returns (q, k) after checking the four inputs agree."""
    query_labels = np.asarray(query_labels)
    neighbour_labels = np.asarray(neighbour_labels)
    count, k = (
        neighbour_labels.shape if neighbour_labels.ndim == 2 else (-1, -1)
    )
    if (
        queries.ndim != 4
        or neighbours.shape != (count, k, *queries.shape[1:])
        or query_labels.shape != (count,)
        or len(queries) != count
    ):
        raise ValueError(
            f"query_images {queries.shape}, neighbour_images "
            f"{neighbours.shape}, query_labels {query_labels.shape} and "
            f"neighbour_labels {neighbour_labels.shape} must be [q, H, W, C], "
            "[q, k, H, W, C], [q] and [q, k]."
        )
    return count, k


def _paste_tile(
    image: Image.Image,
    tile: np.ndarray,
    origin: tuple[int, int],
    factor: int,
    color: tuple[int, int, int],
) -> None:
    """Draws a framed, upscaled tile; origin is the frame's top left."""
    x, y = origin
    big = np.repeat(np.repeat(tile, factor, axis=0), factor, axis=1)
    height, width = big.shape[:2]
    frame = [
        x,
        y,
        x + width + 2 * GRID_BORDER - 1,
        y + height + 2 * GRID_BORDER - 1,
    ]
    ImageDraw.Draw(image).rectangle(frame, fill=color)
    image.paste(Image.fromarray(big), (x + GRID_BORDER, y + GRID_BORDER))


def sprite_image(images: np.ndarray) -> tuple[Image.Image, int]:
    """A projector sprite: a square, row-major grid of square thumbnails.

    Args:
      images: [n, H, W, C] float in [0, 1] or uint8, C = 1 or 3; n >= 1.

    Returns:
      (sprite, thumb): the RGB image, at most MAX_SPRITE_PIXELS a side, and
      the thumbnail side in pixels (<= SPRITE_THUMB).

    Raises:
      ValueError: if images do not end in [H, W, C] with C = 1 or 3.
    """
    images = _to_rgb_uint8(images, "images")
    grid = math.ceil(math.sqrt(len(images)))
    thumb = max(1, min(SPRITE_THUMB, MAX_SPRITE_PIXELS // grid))
    sprite = Image.new("RGB", (grid * thumb, grid * thumb), WHITE)
    for position, pixels in enumerate(images):
        tile = Image.fromarray(pixels).resize((thumb, thumb), Image.BILINEAR)
        row, column = divmod(position, grid)
        sprite.paste(tile, (column * thumb, row * thumb))
    return sprite, thumb
