"""Embed images with Keras MobileNetV2 (no top, global average pooling) into a feature store.

Each image is decoded, converted to 3-channel RGB by the rules in
:data:`mmdx.embed.image_sources.COLOUR_RULE`, resized to
``image_size x image_size`` (the aspect ratio is not kept), scaled to
[-1, 1] by ``keras.applications.mobilenet_v2.preprocess_input`` and passed
through the network. ``preprocessing`` picks how it is decoded and resized:

* ``"keras"`` (default): the pixels of the standard Keras pipeline
  (``image_dataset_from_directory``): TensorFlow decodes JPEG, and
  ``tf.image.resize`` samples bilinearly without antialiasing and keeps
  float values. See :mod:`mmdx.embed.pixels`.
* ``"pillow"``: Pillow decodes, and its bilinear filter resizes to uint8,
  widening the filter when it shrinks (it antialiases). This was the only
  mode before 2026-12-05, and its feature sets keep their names.

Decoding runs in a thread pool while the network works on the previous
batch, and batches keep the input order.

With ``augment_views=K`` each image also gets K randomly augmented views
(rows with view 1..K, see :mod:`mmdx.embed.augment`) in the same feature
set as its plain vector (view 0). The augmentation settings and seed are
part of the set's config and K is not, so a re-run with a larger K embeds
only the missing views. A re-run with a smaller K keeps the views above K,
because they are valid vectors of the same config. The run's summary counts
the images that have them.

TensorFlow is imported only inside :func:`build_mobilenet`, and only when
something is left to embed. The feature set config reads the TensorFlow and
Keras versions from the installed package metadata, so a re-run with
nothing new checks the store without loading the model.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import random
import sys
import tempfile
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from mmdx.embed.augment import AugmentSettings, augment_image, view_generator
from mmdx.embed.image_sources import COLOUR_RULE, ImageRef, collect_image_items, load_pixels, to_rgb_uint8
from mmdx.embed.pixels import PREPROCESSING_CHOICES, resize_bilinear_like_keras
from mmdx.embed.runner import EmbedReport, Item, ItemFailure, embed_items, fixed_size_batches
from mmdx.errors import InputError
from mmdx.store import FeatureStore

__all__ = [
    "ENCODER",
    "MOBILENET_ALPHAS",
    "build_mobilenet",
    "embed_images",
    "library_versions",
    "mobilenet_width",
    "prepare_image",
    "preprocess_batch",
]

logger = logging.getLogger(__name__)

ENCODER = "keras.applications.MobileNetV2"
RESIZE_METHOD = "Pillow BILINEAR to image_size x image_size, aspect ratio not kept"
# Config entries of --preprocessing keras. The pillow mode keeps the entries
# it had before the option existed, so its feature sets keep their names.
KERAS_PREPROCESSING_CONFIG = {
    "preprocessing": "keras",
    "resize": "tf.image.resize bilinear, half-pixel centres, no antialiasing, float32; aspect ratio not kept",
    "jpeg_decoder": "tf.io.decode_jpeg(channels=3) for greyscale and RGB JPEG, Pillow for other files",
}
# The JPEG decoder of each --preprocessing choice (see load_pixels).
JPEG_DECODERS = {"keras": "tensorflow", "pillow": "pillow"}
SCALING = "mobilenet_v2.preprocess_input"
# Width multipliers of MobileNetV2 for which Keras publishes ImageNet weights.
# Keras builds other values with random weights, but no published weights
# file fits them, so embed_images rejects them whatever --weights is.
MOBILENET_ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
MIN_IMAGE_SIZE = 32
# Distributions that install the ``tensorflow`` module, tried in this order
# when reading its version from package metadata.
TENSORFLOW_DISTRIBUTIONS = ("tensorflow", "tensorflow-cpu", "tensorflow-intel", "tensorflow-macos", "tf-nightly", "tf-nightly-cpu")

RunFn = Callable[[np.ndarray], np.ndarray]


def embed_images(
    source: str | Path,
    store: str | Path,
    *,
    weights: str | Path = "imagenet",
    image_size: int = 128,
    alpha: float = 1.0,
    batch_size: int = 64,
    random_seed: int = 0,
    augment_views: int = 0,
    augment: AugmentSettings | None = None,
    augment_seed: int = 0,
    engine: str = "auto",
    preprocessing: str = "keras",
    scanner_options=None,
    id_pattern: str | None = None,
    id_column: str = "patient_id",
    path_column: str = "image",
    on_error: str = "fail",
    rejects: str | Path | None = None,
    wait: float | None = 0.0,
    quiet: bool = False,
    workers: int | None = None,
) -> EmbedReport:
    """Embed every image of ``source`` not yet stored and commit the vectors to ``store``.

    Parameters
    ----------
    source
        A folder of images (scanned recursively) or a CSV manifest; see
        :func:`mmdx.embed.image_sources.collect_image_items`.
    store
        The feature store file (created if absent).
    weights
        ``"imagenet"`` (Keras download), ``"random"`` (initialised with
        ``random_seed``) or the path of a Keras weights file for
        ``MobileNetV2(include_top=False)`` with the same ``alpha``.
    image_size
        Height and width the images are resized to, at least 32.
    alpha
        MobileNetV2 width multiplier, one of :data:`MOBILENET_ALPHAS`.
    batch_size
        Images per network call and per store commit.
    random_seed
        Seed of the initial weights with ``weights="random"``; ignored otherwise.
    augment_views
        Number of randomly augmented views stored per image besides the
        plain one (view 0). Views above it stored by an earlier run stay.
    augment
        Ranges of the augmentation; the recipe's defaults when ``None``.
        Part of the feature set config even with ``augment_views=0``.
    augment_seed
        Seed of the augmentation; with the same seed, settings and image
        bytes, view k is the same in every run.
    engine
        ``"auto"``, ``"keras"`` or ``"onnx"``; see
        :func:`mmdx.embed.engines.select_image_engine`. The engine does not
        change the feature set.
    preprocessing
        ``"keras"`` reproduces the standard Keras pipeline's pixels
        (TensorFlow JPEG decoding, ``tf.image.resize`` bilinear without
        antialiasing); ``"pillow"`` decodes and resizes with Pillow
        (antialiased). Part of the feature set config.
    scanner_options
        A :class:`mmdx.embed.scanners.ScannerOptions` for the DICOM and
        NIfTI files of this call (window, slices); the registered defaults
        when None. The options of the formats present join the feature set
        config.
    id_pattern, id_column, path_column
        How patient IDs and image paths are read from the source.
    on_error
        ``"fail"`` stops at the first unreadable image. A manifest row whose
        file is missing stops it too, before the model is loaded. ``"skip"``
        leaves such images out and lists them in ``rejects``. A manifest
        path outside the manifest's folder is an error either way.
    rejects
        CSV of skipped images; defaults to ``<store>.rejects-images.csv``.
    wait
        Seconds to wait for another writer's lock (``None`` waits forever).
    quiet
        Hide the progress bar.
    workers
        Decoding threads; defaults to the number of CPUs, at most 4.

    Returns
    -------
    EmbedReport
        Counts of items found, already stored, embedded and failed.

    Notes
    -----
    The set's ``info`` (source, image count, ``n_skipped_files``,
    ``augment_views``) describes the last run that committed a vector: it
    is written with the first committed batch, so a run that embeds nothing
    new (everything stored, or every item failed) leaves it unchanged.
    """
    resolved_weights = _check_options(weights, image_size, alpha, batch_size, augment_views, engine, on_error, preprocessing)
    augment = augment or AugmentSettings()
    found = collect_image_items(
        source,
        id_pattern=id_pattern,
        id_column=id_column,
        path_column=path_column,
        scanner_options=scanner_options,
        on_missing=on_error,
    )
    # NOTE: each view decodes and resizes its image again (3 ms of CPU per
    # medpix-mr PNG, measured).
    items = [
        Item(item.patient_id, item.name, item.content_hash, view, item.payload)
        for item in found.items
        for view in range(int(augment_views) + 1)
    ]
    store_path = Path(store)
    rejects_path = Path(rejects) if rejects is not None else store_path.with_name(store_path.name + ".rejects-images.csv")

    # The set's identity needs no TensorFlow: the model is built in encode(),
    # and only when some item is not stored yet.
    weights_identity = _weights_identity(resolved_weights, random_seed)
    config = {
        "weights": weights_identity,
        "alpha": float(alpha),
        "image_size": int(image_size),
        "resize": RESIZE_METHOD,
        # With keras preprocessing this replaces "resize" and adds two entries.
        **(KERAS_PREPROCESSING_CONFIG if preprocessing == "keras" else {}),
        "scaling": SCALING,
        "colour": COLOUR_RULE,
        "pooling": "avg",
        "versions": library_versions(),
        "augmentation": augment.config(augment_seed),
        **found.config,  # pixel options of DICOM and NIfTI files, when present
    }
    info = {
        "source": str(source),
        "source_kind": found.kind,
        "n_images": len(found.items),
        "n_skipped_files": found.n_skipped_files,
        "augment_views": int(augment_views),
    }
    if weights_identity["source"] == "file":
        info["weights_path"] = str(resolved_weights)
    width = mobilenet_width(alpha)

    from PIL import Image

    with FeatureStore(store_path, mode="a", wait=wait) as feature_store:
        header = feature_store.ensure_set("image", ENCODER, config, width, info)

        def encode(batches: list[list[Item]]):
            if not batches:
                return iter(())
            engine_name, run = _load_encoder(resolved_weights, weights_identity, image_size, alpha, random_seed, engine, width)
            header.info["engine"] = engine_name  # written with the first committed batch
            load = functools.partial(found.load_pixels, jpeg_decoder=JPEG_DECODERS[preprocessing])
            prepare = functools.partial(
                _prepare_or_reason,
                image_size=image_size,
                augment=augment,
                seed=augment_seed,
                load=load,
                preprocessing=preprocessing,
            )
            return _encode_batches(batches, run, prepare, workers or min(4, os.cpu_count() or 1))

        # Pillow warns for images above MAX_IMAGE_PIXELS and raises above twice
        # that; turning this one warning into an error makes both a per-item
        # failure. The filter is set here, before the decoding threads start.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            report = embed_items(
                feature_store,
                header,
                items,
                lambda todo: fixed_size_batches(todo, batch_size),
                encode,
                on_error=on_error,
                rejects_path=rejects_path,
                progress_label="embedding images",
                quiet=quiet,
                known_failures=found.missing,
            )
        n_extra = _count_images_with_views_above(feature_store, header.name, int(augment_views))
    if found.n_skipped_files:
        report.extra["non-image files skipped"] = found.n_skipped_files
    if augment_views:
        report.extra["images"] = len(found.items)
        report.extra["augmented views per image"] = int(augment_views)
    if n_extra:
        # Kept on purpose, because they are vectors of this same config.
        # train-head --augmented reads every stored view unless --views caps it.
        report.extra[f"images with stored views above {int(augment_views)}"] = n_extra
        logger.info(
            "%s: %d images have stored views above --augment-views %d from an earlier run. "
            "They stay in the feature set and readers see them",
            header.name,
            n_extra,
            int(augment_views),
        )
    return report


def _count_images_with_views_above(feature_store: FeatureStore, name: str, max_view: int) -> int:
    """Count the images of set ``name`` that have a stored view above ``max_view``."""
    return len({(patient_id, item) for patient_id, item, view in feature_store.item_hashes(name) if view > max_view})


def library_versions() -> dict:
    """Return the TensorFlow, Keras and Pillow versions for the feature set config, without importing TensorFlow.

    The TensorFlow and Keras versions come from the installed distributions'
    metadata. TensorFlow is imported only when no known distribution name
    (:data:`TENSORFLOW_DISTRIBUTIONS`) is installed.
    """
    import PIL

    return {
        "tensorflow": _installed_version(TENSORFLOW_DISTRIBUTIONS, "tensorflow"),
        "keras": _installed_version(("keras",), "keras"),
        "pillow": PIL.__version__,
    }


def _installed_version(distributions: tuple[str, ...], module: str) -> str:
    for distribution in distributions:
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    imported = import_tensorflow() if module == "tensorflow" else __import__(module)
    return imported.__version__


def mobilenet_width(alpha: float) -> int:
    """Return the width of MobileNetV2's pooled output for ``alpha``, as Keras 3 builds it.

    The last convolution has 1280 filters, or ``1280 * alpha`` rounded to a
    multiple of 8 (at least 90 % of the exact value) for ``alpha > 1``.
    """
    if float(alpha) <= 1.0:
        return 1280
    exact = 1280 * float(alpha)
    rounded = max(8, int(exact + 4) // 8 * 8)
    if rounded < 0.9 * exact:
        rounded += 8
    return rounded


def _weights_identity(weights: str | Path, random_seed: int) -> dict:
    """Identify the weights for the feature set config: file SHA-256, Keras version for ImageNet, or the seed."""
    if weights == "random":
        return {"source": "random", "seed": int(random_seed)}
    if weights == "imagenet":
        return {"source": "keras-imagenet", "keras_version": _installed_version(("keras",), "keras")}
    return {"source": "file", "sha256": _file_sha256(Path(weights))}


# The last encoder built, so that repeated calls in one process (several
# sources, tests) skip the model build and the tf.function trace.
_last_encoder: dict = {}


def _load_encoder(
    weights: str | Path, identity: dict, image_size: int, alpha: float, random_seed: int, engine: str, width: int
) -> tuple[str, RunFn]:
    """Build the model and pick the engine; return ``(engine_name, run)``, reusing the last one when its inputs match."""
    from mmdx.embed.engines import select_image_engine

    key = (json.dumps(identity, sort_keys=True), int(image_size), float(alpha), engine)
    if _last_encoder.get("key") != key:
        _last_encoder.clear()
        model, _, _ = build_mobilenet(weights, image_size, alpha, random_seed)
        if int(model.output_shape[-1]) != width:
            raise RuntimeError(f"MobileNetV2 with alpha {alpha} returns width {model.output_shape[-1]}, expected {width}")
        _last_encoder.update(key=key, value=select_image_engine(model, engine))
    return _last_encoder["value"]


def _check_options(
    weights, image_size: int, alpha: float, batch_size: int, augment_views: int, engine: str, on_error: str, preprocessing: str
) -> str | Path:
    """Validate options before any model is loaded; return the weights as ``"imagenet"``, ``"random"`` or a Path."""
    from mmdx.embed.engines import ENGINE_CHOICES

    if on_error not in ("fail", "skip"):
        raise InputError(f"--on-error must be fail or skip, got {on_error!r}")
    check_preprocessing(preprocessing)
    if engine not in ENGINE_CHOICES:
        raise InputError(f"--engine must be one of {', '.join(ENGINE_CHOICES)}, got {engine!r}")
    if int(image_size) < MIN_IMAGE_SIZE:
        raise InputError(f"--image-size must be at least {MIN_IMAGE_SIZE} (MobileNetV2's minimum), got {image_size}")
    if int(batch_size) < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    if int(augment_views) < 0:
        raise InputError(f"--augment-views must be 0 or more, got {augment_views}")
    check_alpha(alpha)
    return resolve_weights(weights)


def check_preprocessing(preprocessing: str) -> str:
    """Raise ``InputError`` unless ``preprocessing`` is one of :data:`PREPROCESSING_CHOICES`; return it."""
    if preprocessing not in PREPROCESSING_CHOICES:
        raise InputError(f"--preprocessing must be one of {', '.join(PREPROCESSING_CHOICES)}, got {preprocessing!r}")
    return preprocessing


def check_alpha(alpha: float) -> float:
    """Raise ``InputError`` unless ``alpha`` is one of :data:`MOBILENET_ALPHAS`; return it as a float."""
    if float(alpha) not in MOBILENET_ALPHAS:
        raise InputError(
            f"--alpha {alpha} is not a MobileNetV2 width multiplier with published weights; "
            f"use one of {', '.join(map(str, MOBILENET_ALPHAS))}"
        )
    return float(alpha)


def resolve_weights(weights: str | Path) -> str | Path:
    """Return ``"imagenet"``, ``"random"`` or the Path of an existing weights file; raise ``InputError`` otherwise."""
    if str(weights) in ("imagenet", "random"):
        return str(weights)
    path = Path(weights)
    if not path.is_file():
        raise InputError(
            f"--weights {str(weights)!r}: file not found; give imagenet, random or the path of a "
            "MobileNetV2 no-top Keras weights file (.weights.h5)"
        )
    return path


def build_mobilenet(weights: str | Path, image_size: int, alpha: float, random_seed: int = 0):
    """Build ``MobileNetV2(include_top=False, pooling="avg")`` and load its weights.

    Returns
    -------
    tuple
        ``(model, weights_identity, versions)``: the Keras model, a dict that
        identifies the weights in the feature set config (file SHA-256, Keras
        version for ImageNet, or seed for random weights), and the TensorFlow,
        Keras and Pillow versions.

    Raises
    ------
    InputError
        When the ImageNet download fails or a weights file cannot be loaded.
    """
    tf = import_tensorflow()
    import keras

    versions = library_versions()
    if (versions["tensorflow"], versions["keras"]) != (tf.__version__, keras.__version__):
        logger.warning(
            "package metadata gives TensorFlow %s and Keras %s, but the imported modules are %s and %s; "
            "the feature set config records the metadata versions",
            versions["tensorflow"],
            versions["keras"],
            tf.__version__,
            keras.__version__,
        )
    shape = (int(image_size), int(image_size), 3)

    def build(keras_weights):
        return keras.applications.MobileNetV2(
            input_shape=shape, alpha=float(alpha), include_top=False, pooling="avg", weights=keras_weights
        )

    if weights == "random":
        # Seed Keras for a reproducible initialisation, and put back the Python
        # and NumPy generator states that set_random_seed also changes.
        python_state, numpy_state = random.getstate(), np.random.get_state()
        keras.utils.set_random_seed(int(random_seed))
        try:
            model = build(None)
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
        return model, _weights_identity("random", random_seed), versions

    if weights == "imagenet":
        try:
            model = build("imagenet")
        except Exception as exc:  # Keras raises a bare Exception when the download fails.
            raise InputError(
                f"--weights imagenet: could not download the Keras ImageNet weights ({exc}); "
                "pass --weights PATH to a local MobileNetV2 no-top weights file (.weights.h5) instead"
            ) from exc
        return model, _weights_identity("imagenet", random_seed), versions

    path = Path(weights)
    # Keras warns once per layer it cannot match before it raises; those
    # warnings are held back so that a failed load prints one error line.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = build(str(path))
        except Exception as exc:  # Keras raises ValueError, OSError or KeyError for unusable files.
            first_line = (str(exc).strip().splitlines() or [""])[0][:300]
            raise InputError(
                f"--weights {path}: not loadable as MobileNetV2 no-top weights with alpha {alpha} "
                f"({type(exc).__name__}: {first_line}); "
                "give a Keras .weights.h5 file saved from MobileNetV2(include_top=False) with the same --alpha"
            ) from exc
    for record in caught:
        warnings.warn_explicit(record.message, record.category, record.filename, record.lineno)
    return model, _weights_identity(path, random_seed), versions


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_TF_STARTUP_NOISE = ("All log messages before absl::InitializeLog() is called", "oneDNN custom operations are on")


def import_tensorflow():
    """Import TensorFlow without its start-up log lines; return the module.

    ``TF_CPP_MIN_LOG_LEVEL`` defaults to 2 (errors only) unless the user set
    it. Native code prints a few lines before that setting is read, so
    stderr goes to a temporary file during the import. Afterwards every
    captured line except the known informational ones is written back.
    """
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        stderr_fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        # No real file descriptor (pytest capture, notebooks): import as is.
        import tensorflow

        return tensorflow

    sys.stderr.flush()
    saved_fd = os.dup(stderr_fd)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), stderr_fd)
        try:
            import tensorflow
        finally:
            os.dup2(saved_fd, stderr_fd)
            os.close(saved_fd)
            captured.seek(0)
            for line in captured.read().decode("utf-8", "replace").splitlines(keepends=True):
                if not any(noise in line for noise in _TF_STARTUP_NOISE):
                    sys.stderr.write(line)
    return tensorflow


def prepare_image(
    item: Item, image_size: int, load: Callable[[Item], np.ndarray] | None = None, preprocessing: str = "keras"
) -> np.ndarray:
    """Load, colour-convert and resize one item to ``image_size x image_size x 3`` RGB.

    ``load`` returns the item's pixels; pass :meth:`ImageSource.load_pixels
    <mmdx.embed.image_sources.ImageSource.load_pixels>` for items of a source
    collected with scanner options. The default loader decodes JPEG as the
    chosen ``preprocessing`` does. With ``"keras"`` the result is float32
    (``tf.image.resize``'s values, not rounded); with ``"pillow"`` it is
    uint8.
    """
    check_preprocessing(preprocessing)
    if load is None:
        load = functools.partial(load_pixels, jpeg_decoder=JPEG_DECODERS[preprocessing])
    rgb = to_rgb_uint8(load(item))
    if preprocessing == "keras":
        return resize_bilinear_like_keras(rgb, image_size)

    from PIL import Image

    image = Image.fromarray(rgb, mode="RGB")
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def preprocess_batch(batch: np.ndarray) -> np.ndarray:
    """Scale an NHWC RGB batch with values in 0..255 to float32 in [-1, 1] with ``mobilenet_v2.preprocess_input``."""
    from keras.applications.mobilenet_v2 import preprocess_input

    return np.asarray(preprocess_input(np.asarray(batch, dtype=np.float32)), dtype=np.float32)


def _prepare_or_reason(
    item: Item,
    *,
    image_size: int,
    augment: AugmentSettings,
    seed: int,
    load: Callable[[Item], np.ndarray],
    preprocessing: str,
) -> np.ndarray | str:
    """Return the network input of one item (augmented for views 1..K), or the reason it failed."""
    try:
        image = prepare_image(item, image_size, load, preprocessing)
    except (ValueError, OSError) as exc:
        return str(exc)
    if item.view == 0:
        return image
    index = getattr(item.payload, "index", None)
    return augment_image(image, augment, view_generator(seed, item.content_hash, item.view, index))


def _encode_batches(
    batches: list[list[Item]], run: RunFn, prepare: Callable[[Item], np.ndarray | str], workers: int
) -> Iterator[tuple[list[Item], np.ndarray, list[ItemFailure]]]:
    """Decode batches in a thread pool, one batch ahead of the network, and yield them in order.

    Items with the same content (byte-identical files, same view) are decoded
    and run once. The later ones get a copy of the first one's vector, or
    its failure. Only the vectors of repeated content are kept, so memory
    grows with the number of duplicates, not with the number of items. On
    brain-mri-4class, 426 of 7,019 slices repeat another one.
    """
    counts: dict[tuple, int] = {}
    for batch in batches:
        for item in batch:
            key = _content_key(item)
            counts[key] = counts.get(key, 0) + 1
    repeated = {key for key, count in counts.items() if count > 1}
    outcomes: dict[tuple, np.ndarray | str] = {}  # first result of each repeated content
    submitted: set[tuple] = set()

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mmdx-decode") as pool:
        # Per batch: the items, their content keys, and a decoding future per
        # item (None for a copy of an earlier item's outcome).
        pending: deque[tuple[list[Item], list[tuple], list[Future | None]]] = deque()
        upcoming = iter(batches)

        def submit_next() -> None:
            batch = next(upcoming, None)
            if batch is None:
                return
            keys = [_content_key(item) for item in batch]
            futures: list[Future | None] = []
            for item, key in zip(batch, keys):
                if key in repeated and key in submitted:
                    futures.append(None)
                else:
                    submitted.add(key)
                    futures.append(pool.submit(prepare, item))
            pending.append((batch, keys, futures))

        submit_next()
        submit_next()
        while pending:
            batch, keys, futures = pending.popleft()
            submit_next()
            computed, computed_keys, arrays, failures, copies = [], [], [], [], []
            for item, key, future in zip(batch, keys, futures):
                if future is None:
                    copies.append((item, key))
                    continue
                result = future.result()
                if isinstance(result, str):
                    failures.append(ItemFailure(item, result))
                    if key in repeated:
                        outcomes[key] = result
                else:
                    computed.append(item)
                    computed_keys.append(key)
                    arrays.append(result)
            vectors = run(preprocess_batch(np.stack(arrays))) if arrays else np.empty((0, 0), np.float32)
            for key, vector in zip(computed_keys, vectors):
                if key in repeated:
                    outcomes[key] = vector
            done, rows = list(computed), [vectors] if len(computed) else []
            for item, key in copies:
                outcome = outcomes[key]
                if isinstance(outcome, str):
                    failures.append(ItemFailure(item, outcome))
                else:
                    done.append(item)
                    rows.append(outcome[None, :])
            yield done, np.concatenate(rows) if rows else vectors, failures


def _content_key(item: Item) -> tuple:
    """Return what decides an item's vector within one run: its bytes, view, image index and file type.

    Items that are not files read through :class:`ImageRef` get a key of
    their own, so they are never shared.
    """
    ref = item.payload
    if not isinstance(ref, ImageRef):
        return ("item", item.patient_id, item.name, item.view)
    return (item.content_hash, item.view, ref.index, ref.path.suffix.lower())
