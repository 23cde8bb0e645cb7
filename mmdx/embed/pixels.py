"""Pixel preparation that reproduces the standard Keras image pipeline.

``keras.utils.image_dataset_from_directory`` decodes with
``tf.io.decode_image(..., channels=3)`` and resizes with
``tf.image.resize(image, size, method="bilinear")``. Two details set its
pixels apart from Pillow's:

* TensorFlow decodes JPEG with libjpeg-turbo's fast integer DCT, Pillow with
  the accurate one, so the decoded values differ by a few grey levels.
* ``tf.image.resize`` samples the four nearest source pixels at half-pixel
  centres and does not widen the filter when it shrinks an image, and its
  output stays float32. Pillow's bilinear filter averages over the whole
  footprint when it shrinks (it antialiases) and rounds to uint8.

On ``brain-mri-4class`` the two pipelines give MobileNetV2 vectors up to
about 4 apart. :func:`decode_jpeg_like_keras` and
:func:`resize_bilinear_like_keras` give the Keras pipeline's pixels exactly;
``mmdx embed images --preprocessing keras`` (the default) uses them.
"""

from __future__ import annotations

import functools
import re

import numpy as np

__all__ = ["PREPROCESSING_CHOICES", "apply_exif_orientation", "decode_jpeg_like_keras", "resize_bilinear_like_keras"]

PREPROCESSING_CHOICES = ("keras", "pillow")

# EXIF orientation (tag 0x0112) -> operations that bring the image upright,
# the same as PIL.ImageOps.exif_transpose.
_ORIENTATION_STEPS = {
    2: ("flip_lr",),
    3: ("rot180",),
    4: ("flip_ud",),
    5: ("transpose",),
    6: ("rot270",),
    7: ("transverse",),
    8: ("rot90",),
}


def decode_jpeg_like_keras(data: bytes) -> np.ndarray:
    """Decode JPEG bytes to ``HxWx3`` uint8 RGB with TensorFlow, as ``image_dataset_from_directory`` does.

    Raises
    ------
    ValueError
        When TensorFlow cannot decode the data (truncated or corrupt JPEG).
    """
    from mmdx.embed.images import import_tensorflow

    tf = import_tensorflow()
    try:
        return tf.io.decode_jpeg(data, channels=3).numpy()
    except tf.errors.InvalidArgumentError as exc:
        raise ValueError(f"truncated or corrupt JPEG data ({_plain_tf_message(exc)})") from None


def _plain_tf_message(exc) -> str:
    """Return the first line of a TensorFlow error without its ``{{function_node ...}}`` and ``[Op:...]`` parts."""
    lines = (exc.message or str(exc)).strip().splitlines() or [""]
    text = re.sub(r"\{\{[^}]*\}\}|\[Op:[^\]]*\]", "", lines[0])
    return " ".join(text.split()) or type(exc).__name__


def resize_bilinear_like_keras(image: np.ndarray, size: int) -> np.ndarray:
    """Resize ``HxWxC`` pixels to ``size x size x C`` float32 as ``tf.image.resize(method="bilinear")`` does.

    Half-pixel centres, no antialiasing, float32 arithmetic in TensorFlow's
    order, so the result equals TensorFlow's (tested). The aspect ratio is
    not kept.
    """
    image = np.asarray(image)
    height, width = image.shape[:2]
    channels = image.shape[2] if image.ndim == 3 else 1
    lower_rows, upper_rows, lerp_y, lower_columns, upper_columns, lerp_x = _plan(height, width, channels, int(size))
    # Rows are flattened to width * channels values so that every operation
    # runs over long contiguous runs. The neighbours are gathered before any
    # conversion, and the ufuncs cast to float32 as they go, so only
    # size x size pixels are ever converted. The operations and their order
    # are TensorFlow's, so the rounding is too.
    flat = image.reshape(height, width * channels)
    above, below = flat[lower_rows], flat[upper_rows]
    top = _lerp(np.take(above, lower_columns, axis=1), np.take(above, upper_columns, axis=1), lerp_x)
    bottom = _lerp(np.take(below, lower_columns, axis=1), np.take(below, upper_columns, axis=1), lerp_x)
    resized = _lerp(top, bottom, lerp_y)
    return resized.reshape((size, size) + image.shape[2:])


def _lerp(start: np.ndarray, end: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Return ``start + (end - start) * weight`` in float32."""
    step = np.subtract(end, start, dtype=np.float32)
    step *= weight
    return np.add(start, step, dtype=np.float32)


@functools.lru_cache(maxsize=64)
def _plan(height: int, width: int, channels: int, size: int) -> tuple[np.ndarray, ...]:
    """Return the source rows, flattened source columns and weights of a resize (cached: slices share sizes)."""
    lower_rows, upper_rows, lerp_y = _interpolation(height, size)
    lower, upper, lerp = _interpolation(width, size)
    offsets = np.arange(channels)
    lower_columns = (lower[:, None] * channels + offsets).ravel()
    upper_columns = (upper[:, None] * channels + offsets).ravel()
    return lower_rows, upper_rows, lerp_y[:, None], lower_columns, upper_columns, np.repeat(lerp, channels)[None, :]


def _interpolation(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return the lower and upper source index and the weight of the upper one for each output position."""
    scale = np.float32(in_size) / np.float32(out_size)
    position = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    floor = np.floor(position)
    lower = np.maximum(floor, 0).astype(np.intp)
    upper = np.minimum(np.ceil(position), in_size - 1).astype(np.intp)
    return lower, upper, (position - floor).astype(np.float32)


def apply_exif_orientation(pixels: np.ndarray, orientation: int | None) -> np.ndarray:
    """Turn ``HxW[xC]`` pixels upright by their EXIF orientation, as ``PIL.ImageOps.exif_transpose``."""
    for step in _ORIENTATION_STEPS.get(int(orientation or 1), ()):
        if step == "flip_lr":
            pixels = pixels[:, ::-1]
        elif step == "flip_ud":
            pixels = pixels[::-1]
        elif step == "rot180":
            pixels = pixels[::-1, ::-1]
        elif step == "rot90":  # 90 degrees counter-clockwise
            pixels = np.rot90(pixels, 1)
        elif step == "rot270":
            pixels = np.rot90(pixels, -1)
        elif step == "transpose":
            pixels = np.swapaxes(pixels, 0, 1)
        elif step == "transverse":
            pixels = np.swapaxes(pixels[::-1, ::-1], 0, 1)
    return np.ascontiguousarray(pixels)
