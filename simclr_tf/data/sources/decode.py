"""Decoding encoded image bytes to RGB uint8, in graph mode for tf.data.

`decode_rgb` is shared by the image-folder reader and record readers;
`check_decodable` finds files that do not decode with one parallel tf.data
pass. Listing folders and building datasets live in folder.py.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import tensorflow as tf
from absl import logging

_HEADER_BYTES = 64  # enough for the PNG IHDR and the BMP info header
_PNG_SIGNATURE = (137, 80, 78, 71, 13, 10, 26, 10)
# Channel count C (1..4) -> source channel of R, G, B: gray and gray+alpha
# repeat channel 0; RGB and RGBA keep 0, 1, 2 (alpha is dropped, as
# PIL's convert("RGB") does).
_RGB_CHANNELS = ((0, 0, 0), (0, 0, 0), (0, 1, 2), (0, 1, 2))


def _header(encoded: tf.Tensor) -> tf.Tensor:
    """The first _HEADER_BYTES bytes as int64 [64], zero-padded if shorter."""
    head = tf.strings.substr(encoded, 0, _HEADER_BYTES)  # clipped, never fails
    padded = tf.strings.join([head, b"\0" * _HEADER_BYTES])
    head = tf.strings.substr(padded, 0, _HEADER_BYTES)
    return tf.cast(tf.io.decode_raw(head, tf.uint8), tf.int64)


def _little_endian(head: tf.Tensor, offset: int, size: int) -> tf.Tensor:
    """The unsigned little-endian integer of head[offset:offset + size]."""
    weights = tf.constant([256**k for k in range(size)], tf.int64)
    return tf.reduce_sum(head[offset : offset + size] * weights)


def _is_png16(head: tf.Tensor) -> tf.Tensor:
    """True for a PNG whose IHDR bit depth (byte 24) is 16."""
    signature = tf.reduce_all(head[:8] == tf.constant(_PNG_SIGNATURE, tf.int64))
    return tf.logical_and(signature, tf.equal(head[24], 16))


def _is_jpeg(head: tf.Tensor) -> tf.Tensor:
    """True for bytes starting with the JPEG SOI marker FF D8 FF."""
    return tf.reduce_all(head[:3] == tf.constant((255, 216, 255), tf.int64))


def _decode_jpeg(encoded: tf.Tensor) -> tf.Tensor:
    """A JPEG as RGB with the accurate integer IDCT, [H, W, 3].

    tf.io.decode_image uses the fast IDCT, up to ~5 levels away from
    libjpeg's default (and PIL's) on detailed images; the accurate one
    matches them. CMYK and gray JPEGs are converted to RGB by the decoder.
    """
    return tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE")


def _is_palette_bmp(head: tf.Tensor) -> tf.Tensor:
    """True for an uncompressed 8-bit BMP with a BITMAPINFOHEADER or later."""
    magic = tf.logical_and(tf.equal(head[0], ord("B")), tf.equal(head[1], 77))
    return tf.reduce_all(
        tf.stack(
            [
                magic,
                _little_endian(head, 14, 4) >= 40,  # info header size
                tf.equal(_little_endian(head, 28, 2), 8),  # bits per pixel
                tf.equal(_little_endian(head, 30, 4), 0),  # BI_RGB
            ]
        )
    )


def _decode_png16(encoded: tf.Tensor) -> tf.Tensor:
    """A 16-bit PNG as uint8 round(v * 255 / 65535), [H, W, C].

    tf.io.decode_png(dtype=uint8) and tf.io.decode_image keep only the high
    byte (v >> 8), which is up to one level low for about a quarter of the
    values, so the image is decoded at 16 bits and scaled here. v / 257 is
    never exactly k + 1/2 (257 is odd), so floor((v + 128) / 257) rounds.
    """
    image = tf.cast(tf.io.decode_png(encoded, dtype=tf.uint16), tf.int32)
    return tf.cast((image + 128) // 257, tf.uint8)


def _decode_palette_bmp(encoded: tf.Tensor, head: tf.Tensor) -> tf.Tensor:
    """An 8-bit palette BMP looked up in its colour table, [H, W, 3].

    TensorFlow's BMP decoder returns the 8-bit palette indices as if they
    were gray levels; that is right only for an identity gray palette.
    """
    info_size = _little_endian(head, 14, 4)
    colors = _little_endian(head, 46, 4)
    colors = tf.where(tf.equal(colors, 0), tf.constant(256, tf.int64), colors)
    table = tf.strings.substr(
        encoded,
        tf.cast(14 + info_size, tf.int32),
        tf.cast(4 * colors, tf.int32),
    )
    table = tf.reshape(tf.io.decode_raw(table, tf.uint8), [-1, 4])
    table = table[:, 2::-1]  # [colors, 3]: BGRX quads -> RGB
    indices = tf.io.decode_bmp(encoded, channels=0)[..., 0]  # [H, W]
    return tf.gather(table, tf.cast(indices, tf.int32))  # fails if >= colors


def decode_rgb(encoded: tf.Tensor) -> tf.Tensor:
    """Decodes a JPEG, PNG, BMP or GIF to RGB uint8, by content.

    The format is read from the bytes, never from a file name, so a PNG
    named .jpg decodes. Gray images repeat their channel, alpha is dropped
    (as in PIL's convert("RGB")), a GIF gives its first frame, JPEGs use the
    accurate IDCT (as PIL does), 16-bit PNGs are scaled to
    round(v * 255 / 65535) and 8-bit palette BMPs are looked up in their
    colour table (the last three differ in tf.io.decode_image). 1- and
    4-bit BMPs are not supported by TensorFlow and fail. WebP and JPEG XL
    decode too where tf.io.decode_image supports them. Uses tf ops only, so
    it runs inside tf.data and tf.function.

    Args:
      encoded: scalar tf.string, the file's bytes.

    Returns:
      [H, W, 3] uint8 image; H and W are dynamic.

    Raises:
      tf.errors.InvalidArgumentError: when run on bytes that are empty,
        truncated or not a supported image.
    """
    encoded = tf.convert_to_tensor(encoded, tf.string)
    head = _header(encoded)
    image = tf.case(
        [
            (_is_jpeg(head), lambda: _decode_jpeg(encoded)),
            (_is_png16(head), lambda: _decode_png16(encoded)),
            (_is_palette_bmp(head), lambda: _decode_palette_bmp(encoded, head)),
        ],
        default=lambda: tf.io.decode_image(encoded, expand_animations=False),
    )
    image = tf.ensure_shape(image, [None, None, None])
    channels = tf.shape(image)[-1]
    source = tf.gather(tf.constant(_RGB_CHANNELS, tf.int32), channels - 1)
    image = tf.gather(image, source, axis=-1)
    image.set_shape([None, None, 3])
    return image


def _decoded_shape(
    index: tf.Tensor, path: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """(index, [3] shape) of the decoded file at `path`; raises if it fails.

    The shape is returned, not dropped: a decode that no output depends on
    (even through a control dependency) is pruned from the graph.
    """
    return index, tf.shape(decode_rgb(tf.io.read_file(path)))


def check_decodable(
    paths: Sequence[str], *, log_every: int = 10_000, batch_size: int = 256
) -> np.ndarray:
    """Which files decode with `decode_rgb`, in one parallel tf.data pass.

    Each file is read and fully decoded (so truncated files are caught, not
    only bad headers) by a parallel, non-deterministic map; errors drop the
    element (ignore_errors) and the indices that come through are marked.
    Progress is logged every `log_every` decoded images.

    Args:
      paths: file paths, as strings.
      log_every: log a progress line every this many decoded images.
      batch_size: indices collected per Python step (only a speed knob).

    Returns:
      [len(paths)] bool numpy array, True where the file decodes.
    """
    decodable = np.zeros(len(paths), dtype=bool)
    if not len(paths):
        return decodable
    data = tf.data.Dataset.from_tensor_slices(tf.constant(list(paths)))
    data = data.enumerate().map(
        _decoded_shape, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False
    )
    data = data.ignore_errors().batch(batch_size)
    start, next_log, done = time.monotonic(), log_every, 0
    for indices, _ in data.as_numpy_iterator():
        decodable[indices] = True
        done += len(indices)
        if done >= next_log:
            elapsed = time.monotonic() - start
            logging.info(
                "checked images: %d/%d decode (%.0f img/s)",
                done,
                len(paths),
                done / max(elapsed, 1e-9),
            )
            next_log += log_every * (1 + (done - next_log) // log_every)
    logging.info(
        "checked %d images in %.1f s: %d do not decode",
        len(paths),
        time.monotonic() - start,
        len(paths) - done,
    )
    return decodable
