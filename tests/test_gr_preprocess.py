"""Evaluation preprocessing against google-research/simclr's (GR) own.

GR's data_util.preprocess_image(image, size, size, is_training=False,
test_crop=size > 32) runs in a subprocess on uint8 images of several
sizes and aspect ratios (ImageNet-like, odd sides, smaller than the
output, CIFAR's 32 x 32); views.preprocess_for_eval (data/augment)
must give the same pixels: GR crops the central 87.5% of the shorter side
(rint, half to even) and resizes it bicubically with tf.image.resize; we
crop the same box and resize with two matmuls of the same bicubic
weights. Tolerance 2e-6 on [0, 1] pixels: the two sum the same 16 terms
per pixel in another order (float32; measured 3.6e-7 at 224 px, 2.4e-7 at
64, 0 at 32); a crop one pixel off or a bilinear resize differs by more
than 1e-2.
"""

from __future__ import annotations

import os
import subprocess
import sys

import gr_reference
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.data.augment import views

TOLERANCE = 2e-6
# (height, width) of the test images: ImageNet-like portrait and
# landscape, odd sides, a square, one smaller than the output.
SHAPES = [(375, 500), (500, 333), (256, 256), (91, 37), (301, 300), (150, 200)]

# Inputs are keyed "<size>/<name>": one process for every case (GR's
# code under tf_keras takes ~3 s to start).
_GR_SIDE = """
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import data_util
import tensorflow as tf
inputs = np.load(sys.argv[2])
outputs = {}
for key, image in inputs.items():
    size = int(key.split("/")[0])
    outputs[key] = data_util.preprocess_image(
        tf.constant(image), size, size, is_training=False,
        test_crop=size > 32,
    ).numpy()
np.savez(sys.argv[3], **outputs)
"""
# At 32 px GR neither crops nor resizes (CIFAR): the image only scales.
CASES = {224: SHAPES, 64: SHAPES, 32: [(32, 32)]}


def _images(shapes, seed=0) -> dict[str, np.ndarray]:
    """Smooth gradients plus noise and a sharp square: uint8 [H, W, 3]."""
    rng = np.random.default_rng(seed)
    images = {}
    for height, width in shapes:
        rows = np.linspace(0.0, 1.0, height)[:, None, None]
        columns = np.linspace(0.0, 1.0, width)[None, :, None]
        image = 0.5 * rows + 0.3 * columns * np.array([1.0, 0.5, 0.2])
        image = image + rng.normal(0.0, 0.1, (height, width, 3))
        image[height // 4 : height // 2, width // 3 : width // 2] = 0.9
        images[f"{height}x{width}"] = np.clip(image * 255, 0, 255).astype(
            np.uint8
        )
    return images


@pytest.fixture(scope="module")
def gr_outputs(tmp_path_factory) -> dict[str, np.ndarray]:
    """GR's preprocessing of every case's images, keyed "<size>/<name>"."""
    gr_reference.require()
    images = {
        f"{size}/{name}": image
        for size, shapes in CASES.items()
        for name, image in _images(shapes).items()
    }
    tmp_path = tmp_path_factory.mktemp("gr_preprocess")
    inputs, outputs = tmp_path / "inputs.npz", tmp_path / "outputs.npz"
    np.savez(inputs, **images)
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _GR_SIDE,
            gr_reference.GR_REFERENCE_DIR,
            str(inputs),
            str(outputs),
        ],
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-4000:])
    return dict(np.load(outputs))


@pytest.mark.parametrize("size", list(CASES))
def test_preprocess_for_eval_is_grs(gr_outputs, size):
    for name, image in _images(CASES[size]).items():
        expected = gr_outputs[f"{size}/{name}"]
        ours = views.preprocess_for_eval(tf.constant(image), size)
        assert ours.shape == expected.shape == (size, size, 3)
        difference = float(np.max(np.abs(ours.numpy() - expected)))
        assert difference <= TOLERANCE, (name, difference)
