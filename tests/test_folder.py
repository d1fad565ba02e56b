"""Tests for decode.py and folder.py: decoding, listing, skipping, sharding.

Folders are built in tmp_path with PIL and raw bytes; expected pixels come
from the arrays written (lossless formats) or PIL's own decoder (JPEG).
"""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from simclr_tf.data.sources import decode, folder

# TF's and PIL's libjpeg-turbo builds both run the accurate integer IDCT
# here (exact in practice); one level allows another build's rounding.
JPEG_TOLERANCE = 1


def _noise(height: int, width: int, channels: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (height, width, channels) if channels > 1 else (height, width)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _png16(array: np.ndarray) -> bytes:
    """A 16-bit PNG of [H, W, C] uint16 (C 1..4), written by hand."""
    height, width, channels = array.shape
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = [b"\0" + row.astype(">u2").tobytes() for row in array]  # filter 0

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"".join(rows)))
        + chunk(b"IEND", b"")
    )


def _scale16(array: np.ndarray) -> np.ndarray:
    """round(v * 255 / 65535) in float64; v / 257 never ties at .5."""
    return np.round(array.astype(np.float64) * 255 / 65535).astype(np.uint8)


def _write(path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def _rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def _decode(data: bytes) -> np.ndarray:
    return decode.decode_rgb(tf.constant(data)).numpy()


@pytest.mark.parametrize(
    "mode, fmt",
    [
        ("L", "PNG"),
        ("LA", "PNG"),
        ("RGBA", "PNG"),
        ("P", "PNG"),
        ("RGB", "BMP"),
        ("L", "BMP"),
        ("P", "BMP"),
        ("RGBA", "BMP"),
        ("P", "GIF"),
        ("L", "GIF"),
    ],
)
def test_decode_rgb_lossless_formats_match_pil(mode, fmt):
    image = Image.fromarray(_noise(13, 17, 4, seed=1), "RGBA").convert(mode)
    np.testing.assert_array_equal(_decode(_encode(image, fmt)), _rgb(image))


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_decode_rgb_jpeg_close_to_pil(mode):
    image = Image.fromarray(_noise(21, 30, 3, seed=2)).convert(mode)
    data = _encode(image, "JPEG", quality=90)
    expected = _rgb(Image.open(io.BytesIO(data))).astype(int)
    difference = np.abs(_decode(data).astype(int) - expected)
    assert difference.max() <= JPEG_TOLERANCE


def test_decode_image_truncates_png16_so_we_scale_ourselves():
    # Guards the reason decode_rgb has its own 16-bit path: TF keeps v >> 8.
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256, 1)
    data = _png16(values)
    tf_value = tf.io.decode_image(data, expand_animations=False).numpy()
    np.testing.assert_array_equal(tf_value, values >> 8)
    assert (tf_value != _scale16(values)).any()


def test_decode_rgb_png16_gray_rounds_every_value():
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256, 1)
    expected = np.repeat(_scale16(values), 3, axis=-1)
    np.testing.assert_array_equal(_decode(_png16(values)), expected)


def test_decode_rgb_png16_rgba_drops_alpha():
    rng = np.random.default_rng(3)
    values = rng.integers(0, 65536, (5, 9, 4), dtype=np.uint16)
    expected = _scale16(values[..., :3])
    np.testing.assert_array_equal(_decode(_png16(values)), expected)


def test_decode_rgb_gif_gives_first_frame():
    frames = [
        Image.fromarray(_noise(8, 6, 3, seed=s)).convert("P") for s in (4, 5)
    ]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(data)).n_frames == 2  # really animated
    np.testing.assert_array_equal(_decode(data), _rgb(frames[0]))


def test_decode_rgb_runs_in_tf_data_map():
    images = [
        Image.fromarray(_noise(7 + k, 5, 3, seed=k)).convert("P")
        for k in range(3)
    ]
    encoded = [
        _encode(image, fmt)
        for image, fmt in zip(images, ["PNG", "BMP", "GIF"], strict=True)
    ]
    data = tf.data.Dataset.from_tensor_slices(encoded).map(decode.decode_rgb)
    assert data.element_spec.shape.as_list() == [None, None, 3]
    for image, decoded in zip(images, data.as_numpy_iterator(), strict=True):
        np.testing.assert_array_equal(decoded, _rgb(image))


def _broken_files(directory) -> dict[str, str]:
    """Reason -> path of one broken file of each kind."""
    jpeg = _encode(Image.fromarray(_noise(40, 40, 3, seed=6)), "JPEG")
    png = _encode(Image.fromarray(_noise(40, 40, 3, seed=7)), "PNG")
    return {
        "good": _write(directory / "good.png", png),
        "empty": _write(directory / "empty.jpg", b""),
        "truncated_jpeg": _write(directory / "cut.jpg", jpeg[: len(jpeg) // 2]),
        "truncated_png": _write(directory / "cut.png", png[: len(png) // 2]),
        "text": _write(directory / "text.png", b"this is not an image\n"),
    }


def test_check_decodable_marks_only_good_files(tmp_path):
    files = _broken_files(tmp_path)
    mask = decode.check_decodable(list(files.values()))
    assert mask.tolist() == [name == "good" for name in files]


# --- image folders ----------------------------------------------------------


def _labelled_folder(root) -> tuple[dict[str, tuple[np.ndarray, int]], dict]:
    """Builds a two-class folder with every kind of odd file.

    Returns:
      path -> (expected RGB pixels, tolerance) of kept images, and reason ->
      set of paths that must be skipped.
    """
    ant, bee = root / "ant", root / "bee"
    rgb = Image.fromarray(_noise(20, 30, 3, seed=10))
    gray = Image.fromarray(_noise(17, 9, 1, seed=11), "L")
    rgba = Image.fromarray(_noise(12, 12, 4, seed=12), "RGBA")
    palette = Image.fromarray(_noise(10, 6, 3, seed=13)).convert("P")
    wide16 = np.random.default_rng(14).integers(0, 65536, (6, 11, 1))
    rgba16 = np.random.default_rng(15).integers(0, 65536, (9, 4, 4))
    jpeg = _encode(rgb, "JPEG")
    png = _encode(rgb, "PNG")
    kept = {
        _write(ant / "a.jpg", jpeg): (
            _rgb(Image.open(io.BytesIO(jpeg))),
            JPEG_TOLERANCE,
        ),
        _write(ant / "b.png", _encode(gray, "PNG")): (_rgb(gray), 0),
        _write(ant / "sub" / "c.png", _encode(rgba, "PNG")): (_rgb(rgba), 0),
        _write(ant / "d.bmp", _encode(rgb, "BMP")): (_rgb(rgb), 0),
        _write(ant / "e.GIF", _encode(palette, "GIF")): (_rgb(palette), 0),
        _write(ant / "f.PNG", _png16(wide16.astype(np.uint16))): (
            np.repeat(_scale16(wide16), 3, axis=-1),
            0,
        ),
        _write(ant / "png_named.jpg", png): (_rgb(rgb), 0),
        _write(bee / "g.png", _png16(rgba16.astype(np.uint16))): (
            _scale16(rgba16[..., :3]),
            0,
        ),
        _write(bee / "h.bmp", _encode(palette, "BMP")): (_rgb(palette), 0),
        _write(bee / "i.jpeg", _encode(gray, "JPEG")): (
            _rgb(Image.open(io.BytesIO(_encode(gray, "JPEG")))),
            JPEG_TOLERANCE,
        ),
    }
    skipped = {
        "outside_class_folder": {
            _write(root / "loose.jpg", jpeg),
            _write(root / "readme.md", b"# notes\n"),
        },
        "unsupported_extension": {_write(ant / "notes.txt", b"hello")},
        "empty": {_write(ant / "empty.jpg", b"")},
        "undecodable": {
            _write(ant / "cut.jpg", jpeg[: len(jpeg) // 2]),
            _write(bee / "cut.png", png[: len(png) // 2]),
            _write(bee / "text.png", b"not a png"),
        },
    }
    _write(ant / ".DS_Store", b"\0\1")  # hidden: ignored, not counted
    _write(root / ".cache" / "x.jpg", jpeg)
    return kept, skipped


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelled")
    kept, skipped = _labelled_folder(root)
    return str(root), kept, skipped


def _flat_folder(root, count: int) -> list[str]:
    """`count` 4x4 PNGs, image k filled with value 10 k + 5."""
    return [
        _write(
            root / f"img{k:02d}.png",
            _encode(
                Image.fromarray(np.full((4, 4, 3), 10 * k + 5, np.uint8)), "PNG"
            ),
        )
        for k in range(count)
    ]


def _values(data: tf.data.Dataset) -> list[int]:
    """The fill value of each image of a flat folder, in dataset order."""
    return [int(image[0, 0, 0]) for image, _ in data.as_numpy_iterator()]


def test_list_folder_counts_each_skip_reason(labelled):
    root, kept, skipped = labelled
    listing = folder.list_folder(root, "train")
    assert {r: set(p) for r, p in listing.skipped.items()} == skipped
    assert sorted(listing.paths) == sorted(kept)


def test_open_folder_pixels_match_reference(labelled):
    root, kept, _ = labelled
    source = folder.open_folder(root, "train")
    listing = folder.list_folder(root, "train")
    images = [image for image, _ in source.dataset().as_numpy_iterator()]
    assert source.num_examples == len(kept) == len(images)
    for path, image in zip(listing.paths, images, strict=True):
        expected, tolerance = kept[path]
        assert image.shape == expected.shape, path
        difference = np.abs(image.astype(int) - expected.astype(int)).max()
        assert difference <= tolerance, path


def test_open_folder_labels_follow_sorted_class_names(labelled):
    root, _, _ = labelled
    listing = folder.list_folder(root, "train")
    source = folder.open_folder(root, "train")
    assert listing.class_names == ("ant", "bee")
    assert source.num_classes == 2
    assert source.class_names == ("ant", "bee")  # shown in eval reports
    expected = [
        listing.class_names.index(os.path.relpath(p, root).split(os.sep)[0])
        for p in listing.paths
    ]
    labels = [int(label) for _, label in source.dataset().as_numpy_iterator()]
    assert labels == expected
    assert source.dataset().element_spec[1].dtype == tf.int64


def test_open_folder_flat_folder_is_unlabelled(tmp_path):
    _flat_folder(tmp_path, 3)
    source = folder.open_folder(str(tmp_path), "train")
    labels = [int(label) for _, label in source.dataset().as_numpy_iterator()]
    assert (source.num_classes, labels) == (0, [-1, -1, -1])
    assert source.image_shape == (None, None, 3)


def test_open_folder_resolves_split_subfolders(tmp_path):
    for split, count in (("train", 3), ("val", 2)):
        _flat_folder(tmp_path / split / "cls", count)
    assert folder.open_folder(str(tmp_path), "train").num_examples == 3
    assert folder.open_folder(str(tmp_path), "val").num_examples == 2
    auto = folder.open_folder(str(tmp_path), "auto")
    assert (auto.num_examples, auto.origin) == (2, str(tmp_path / "val"))


def test_open_folder_missing_split_lists_subfolders(tmp_path):
    for split in ("train", "val"):
        _flat_folder(tmp_path / split / "cls", 1)
    with pytest.raises(ValueError, match=r"validation.*\['train', 'val'\]"):
        folder.open_folder(str(tmp_path), "validation")


def test_open_folder_slices_are_disjoint_and_cover(tmp_path):
    _flat_folder(tmp_path, 10)
    whole = folder.list_folder(str(tmp_path), "train").paths
    head = folder.list_folder(str(tmp_path), "train[:33%]").paths
    tail = folder.list_folder(str(tmp_path), "train[33%:]").paths
    assert len(head) == 3  # round(0.33 * 10)
    assert head + tail == whole
    middle = folder.list_folder(str(tmp_path), "train[2:5]").paths
    assert middle == whole[2:5]


def test_list_folder_slice_mixes_classes(tmp_path):
    for name in ("a", "b"):
        _flat_folder(tmp_path / name, 10)
    listing = folder.list_folder(str(tmp_path), "train[:50%]")
    assert sorted(set(listing.labels.tolist())) == [0, 1]


def test_list_folder_rejects_malformed_slice(tmp_path):
    _flat_folder(tmp_path, 2)
    with pytest.raises(ValueError, match="slice bound"):
        folder.list_folder(str(tmp_path), "train[:ten%]")


def test_open_folder_without_data_dir_raises():
    with pytest.raises(ValueError, match="--dataset=folder needs --data_dir"):
        folder.open_folder(None, "train")


def test_open_folder_missing_directory_raises(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=missing):
        folder.open_folder(missing, "train")


def test_open_folder_empty_folder_raises(tmp_path):
    with pytest.raises(ValueError, match="no readable image.*no files"):
        folder.open_folder(str(tmp_path), "train")


def test_open_folder_all_broken_raises_with_counts(tmp_path):
    files = _broken_files(tmp_path)
    os.remove(files["good"])
    _write(tmp_path / "notes.txt", b"x")
    pattern = "1 unsupported_extension, 1 empty, 3 undecodable"
    with pytest.raises(ValueError, match=f"{tmp_path}.*{pattern}"):
        folder.open_folder(str(tmp_path), "train")


def test_open_folder_shards_are_disjoint_and_cover(tmp_path):
    _flat_folder(tmp_path, 10)
    source = folder.open_folder(str(tmp_path), "train")
    whole = _values(source.dataset())
    shards = [
        _values(source.dataset(tf.distribute.InputContext(3, index, 1)))
        for index in range(3)
    ]
    for index, shard in enumerate(shards):
        assert shard == whole[index::3]
    assert sorted(sum(shards, [])) == sorted(whole) == list(range(5, 100, 10))


def test_open_folder_order_seed_permutes_every_file_and_repeats(tmp_path):
    _flat_folder(tmp_path, 10)
    first = folder.open_folder(str(tmp_path), "train")
    second = folder.open_folder(str(tmp_path), "train")
    order = _values(first.dataset(order_seed=[7, 1]))
    assert order == _values(second.dataset(order_seed=[7, 1]))
    assert sorted(order) == sorted(_values(first.dataset()))
    assert order != _values(first.dataset())
    assert order != _values(first.dataset(order_seed=[7, 2]))


def test_open_folder_loader_drops_file_broken_after_listing(tmp_path):
    paths = _flat_folder(tmp_path, 4)
    source = folder.open_folder(str(tmp_path), "train")
    with open(paths[1], "wb") as handle:
        handle.write(b"overwritten")
    assert sorted(_values(source.dataset())) == [5, 25, 35]
