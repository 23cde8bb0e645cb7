"""Random affine augmentation of images, reproducible per image and view.

The transforms follow Keras ``ImageDataGenerator`` (in Keras 3.15 it lives
in ``keras.src.legacy.preprocessing.image``). The rotation angle is drawn
from [-rotation, rotation] degrees and the shifts from up to ``shift``
times the height and width. The shear angle is drawn from [-shear, shear]
in *degrees*, so the usual ``shear_range=0.2`` shears by at most 0.2
degrees. Zoom factors for the two axes are drawn independently from
[1 - zoom, 1 + zoom], and the image is flipped horizontally with
probability 0.5. Points that fall outside the image are filled by ``fill``
(a ``scipy.ndimage`` mode), and interpolation is bilinear (spline order 1,
the Keras default). For given parameters the result equals Keras's
``ImageDataGenerator.apply_transform``, which a test checks.

Every view draws its parameters from its own generator, seeded by the
augmentation seed, the image's content hash, the view index and the slice
index. A view therefore does not depend on batch order or on which other
images are embedded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from mmdx.errors import InputError

__all__ = ["FILL_MODES", "AugmentSettings", "apply_transform", "augment_image", "draw_transform", "view_generator"]

# Fill modes of ImageDataGenerator, passed to scipy.ndimage unchanged as Keras does.
FILL_MODES = ("nearest", "constant", "reflect", "wrap")


@dataclass(frozen=True)
class AugmentSettings:
    """Ranges of the random transforms; the defaults are those of the MR training recipe."""

    rotation: float = 40.0
    shift: float = 0.2
    shear: float = 0.2
    zoom: float = 0.2
    flip: bool = True
    fill: str = "nearest"

    def __post_init__(self) -> None:
        checks = [
            ("rotation", 0 <= self.rotation <= 180, "between 0 and 180 degrees"),
            ("shift", 0 <= self.shift < 1, "a fraction in [0, 1)"),
            ("shear", 0 <= self.shear <= 90, "between 0 and 90 degrees"),
            ("zoom", 0 <= self.zoom < 1, "a fraction in [0, 1)"),
        ]
        for name, valid, expected in checks:
            if not valid:
                raise InputError(f"--{name} must be {expected}, got {getattr(self, name)}")
        if self.fill not in FILL_MODES:
            raise InputError(f"--fill must be one of {', '.join(FILL_MODES)}, got {self.fill!r}")

    def config(self, seed: int) -> dict:
        """Describe the settings and seed for a feature set config (everything that changes the views)."""
        return {
            **asdict(self),
            "seed": int(seed),
            "shear_unit": "degrees",
            "interpolation": "bilinear (scipy.ndimage spline order 1)",
            "applied_to": "the resized RGB image, before preprocess_input",
            "generator": "numpy PCG64 seeded by (seed, content SHA-256, view, slice)",
        }


def view_generator(seed: int, content_hash: str, view: int, index: int | None = None) -> np.random.Generator:
    """Return the random generator of one view of one image (or one slice of a multi-image file)."""
    hash_words = [int(content_hash[i : i + 8], 16) for i in range(0, len(content_hash), 8)]
    slice_word = 0 if index is None else int(index) + 1
    return np.random.default_rng(np.random.SeedSequence([int(seed), *hash_words, int(view), slice_word]))


def draw_transform(settings: AugmentSettings, rng: np.random.Generator, height: int, width: int) -> dict:
    """Draw one set of transform parameters, named as ``ImageDataGenerator.apply_transform`` takes them.

    ``tx`` is drawn as a fraction of the height and ``ty`` of the width, as
    Keras draws them. All values are drawn whatever the ranges, so changing
    one range leaves the other draws unchanged.
    """
    theta = rng.uniform(-settings.rotation, settings.rotation)
    tx = rng.uniform(-settings.shift, settings.shift) * height
    ty = rng.uniform(-settings.shift, settings.shift) * width
    shear = rng.uniform(-settings.shear, settings.shear)
    zx, zy = rng.uniform(1 - settings.zoom, 1 + settings.zoom, 2)
    flip = bool(rng.random() < 0.5) and settings.flip
    return {
        "theta": float(theta),
        "tx": float(tx),
        "ty": float(ty),
        "shear": float(shear),
        "zx": float(zx),
        "zy": float(zy),
        "flip_horizontal": flip,
    }


def _affine_matrix(params: dict, height: int, width: int) -> np.ndarray:
    """Build the 3x3 matrix from output to input (row, col) coordinates, as Keras builds it.

    Keras composes rotation, shift, shear and zoom in (x, y) order about the
    point (height / 2 - 0.5, width / 2 - 0.5) and then swaps the two axes.
    On the square images embedded here that point is the image centre.
    """
    theta = np.deg2rad(params["theta"])
    shear = np.deg2rad(params["shear"])
    rotation = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    shift = np.array([[1, 0, params["tx"]], [0, 1, params["ty"]], [0, 0, 1]])
    shearing = np.array([[1, -np.sin(shear), 0], [0, np.cos(shear), 0], [0, 0, 1]])
    zoom = np.array([[params["zx"], 0, 0], [0, params["zy"], 0], [0, 0, 1]])
    matrix = rotation @ shift @ shearing @ zoom

    centre_x, centre_y = height / 2 - 0.5, width / 2 - 0.5
    to_centre = np.array([[1, 0, centre_x], [0, 1, centre_y], [0, 0, 1]])
    from_centre = np.array([[1, 0, -centre_x], [0, 1, -centre_y], [0, 0, 1]])
    matrix = to_centre @ matrix @ from_centre

    matrix[:, [0, 1]] = matrix[:, [1, 0]]
    matrix[[0, 1]] = matrix[[1, 0]]
    return matrix


def apply_transform(image: np.ndarray, params: dict, fill: str = "nearest") -> np.ndarray:
    """Apply drawn parameters to an ``HxWxC`` image; return float32 in the input's value range."""
    from scipy import ndimage

    height, width = image.shape[:2]
    matrix = _affine_matrix(params, height, width)
    pixels = image.astype(np.float32)
    channels = [
        ndimage.affine_transform(pixels[:, :, channel], matrix[:2, :2], offset=matrix[:2, 2], order=1, mode=fill, cval=0.0)
        for channel in range(pixels.shape[2])
    ]
    transformed = np.stack(channels, axis=2)
    if params["flip_horizontal"]:
        transformed = transformed[:, ::-1, :]
    return np.ascontiguousarray(transformed, dtype=np.float32)


def augment_image(image: np.ndarray, settings: AugmentSettings, rng: np.random.Generator) -> np.ndarray:
    """Return a randomly transformed copy of an ``HxWxC`` image as float32 in the input's value range."""
    params = draw_transform(settings, rng, image.shape[0], image.shape[1])
    return apply_transform(image, params, settings.fill)
