"""The Keras-compatible pixel functions against TensorFlow and Pillow themselves."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mmdx.embed.pixels import apply_exif_orientation, resize_bilinear_like_keras


@pytest.mark.parametrize(
    "height, width, size",
    [(512, 512, 128), (256, 240, 128), (130, 97, 128), (128, 128, 128), (33, 400, 32), (7, 9, 224), (1, 1, 32), (90, 1000, 224)],
)
def test_resize_equals_tf_image_resize(height, width, size):
    import tensorflow as tf

    pixels = np.random.default_rng(height * width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    expected = tf.image.resize(pixels, (size, size), method="bilinear", antialias=False).numpy()

    resized = resize_bilinear_like_keras(pixels, size)

    assert resized.dtype == np.float32
    assert resized.shape == (size, size, 3)
    assert np.array_equal(resized, expected)


def test_resize_does_not_antialias():
    # A 1-pixel checkerboard shrunk 3x: each output pixel samples exactly one
    # source pixel (half-pixel centres land on 3k + 1), so the pattern's
    # black and white survive, where an antialiasing filter gives grey.
    board = (np.indices((63, 63)).sum(axis=0) % 2 * 255).astype(np.uint8)[:, :, None].repeat(3, axis=2)

    resized = resize_bilinear_like_keras(board, 21)

    assert set(np.unique(resized).tolist()) == {0.0, 255.0}


@pytest.mark.parametrize(
    "orientation, method",
    [
        (2, Image.Transpose.FLIP_LEFT_RIGHT),
        (3, Image.Transpose.ROTATE_180),
        (4, Image.Transpose.FLIP_TOP_BOTTOM),
        (5, Image.Transpose.TRANSPOSE),
        (6, Image.Transpose.ROTATE_270),
        (7, Image.Transpose.TRANSVERSE),
        (8, Image.Transpose.ROTATE_90),
    ],
)
def test_exif_orientation_matches_pillow(orientation, method):
    pixels = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(pixels).transpose(method))

    assert np.array_equal(apply_exif_orientation(pixels, orientation), expected)


@pytest.mark.parametrize("orientation", [None, 0, 1, 9])
def test_exif_orientation_ignores_upright_and_unknown(orientation):
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)

    assert np.array_equal(apply_exif_orientation(pixels, orientation), pixels)
