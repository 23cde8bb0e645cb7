"""Inference engines for the image encoder: Keras as built, or the same graph in ONNX Runtime.

Both engines take a batch of preprocessed images (``n x height x width x 3``
float32, already scaled by ``mobilenet_v2.preprocess_input``) and return
``n x width`` float32 vectors. The ONNX engine runs the Keras graph after
conversion with tf2onnx. Each converted file is checked against Keras on a
probe batch before use and cached on disk, so later runs skip the
conversion. The two engines give the same vectors within
:data:`ONNX_TOLERANCE`, so the engine is run metadata (a feature set's
``info``), not part of its config.

For texts, :func:`map_in_threads` with :func:`torch_threads` runs whole
batches in parallel threads with one torch thread each. On 2 cores shared
with other jobs that encoded MiniLM texts 1.7 to 2.6 times as fast as one
batch at a time on 2 torch threads, with the same vectors; on a quiet
machine the two ran at the same speed (``benchmarks/bench_texts.py``).

TensorFlow, tf2onnx, onnxruntime and torch are imported inside the functions
that need them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import numpy as np

from mmdx.errors import InputError

__all__ = [
    "ENGINE_CHOICES",
    "ONNX_TOLERANCE",
    "EngineUnavailable",
    "available_cpus",
    "default_cache_dir",
    "keras_runner",
    "map_in_threads",
    "onnx_model_bytes",
    "onnx_model_path",
    "onnx_runner",
    "select_image_engine",
    "torch_threads",
]

logger = logging.getLogger(__name__)

ENGINE_CHOICES = ("auto", "keras", "onnx")
# Largest absolute difference allowed between ONNX Runtime and Keras vectors
# on the probe batch. MobileNetV2 (alpha 1.0, 128 px, ImageNet weights)
# converted by tf2onnx 1.17 differed by 2.4e-5 on random inputs.
ONNX_TOLERANCE = 1e-4
ONNX_OPSET = 17
# Bump when the conversion changes in a way the library versions do not show.
CONVERSION_VERSION = 1
PROBE_BATCH = 2
# ONNX Runtime calls take at most this many images. On 2 cores, MobileNetV2
# at 128 px cost 2.7 CPU ms per image in calls of 16, 3.0 in calls of 32 and
# 3.7 in calls of 64 (benchmarks/bench_image_engines.py).
MAX_PART_SIZE = 16
# ONNX Runtime graph rewrites left out. tf2onnx keeps the batch
# normalisation after each depthwise convolution as a Mul and an Add, and
# these two rewrites fold them into the convolution's weights. TensorFlow
# does not fold them, and with the folded weights 5 of 2,048
# brain-mri-4class slices came out more than 1e-4 from Keras (max 1.7e-4;
# folding in float64 gave the same). Without them: max 7.2e-5, none above,
# for 19 % more CPU per image (2.80 against 2.36 ms).
ONNX_DISABLED_OPTIMIZERS = ("ConvMulFusion", "ConvAddFusion")

BatchRunner = Callable[[np.ndarray], np.ndarray]
Batch = TypeVar("Batch")
Result = TypeVar("Result")


class EngineUnavailable(RuntimeError):
    """The ONNX engine cannot be used here: a package is missing or the conversion failed."""


def select_image_engine(
    keras_model: Any,
    engine: str = "auto",
    cache_dir: str | Path | None = None,
    *,
    threads: int | None = None,
) -> tuple[str, BatchRunner]:
    """Choose the engine that runs ``keras_model`` and return its name and batch function.

    Parameters
    ----------
    keras_model : keras.Model
        A built image encoder with one input ``(None, height, width, 3)``
        and one output ``(None, width)``.
    engine : {"auto", "keras", "onnx"}
        ``"keras"`` runs the model in TensorFlow. ``"onnx"`` converts it and
        runs it in ONNX Runtime, and raises ``InputError`` when that is not
        possible. ``"auto"`` uses ONNX Runtime when onnxruntime and tf2onnx
        are installed and the converted graph matches Keras, else Keras,
        and logs why.
    cache_dir : str or Path, optional
        Folder for converted models; defaults to :func:`default_cache_dir`.
    threads : int, optional
        Number of parts each batch is split into for ONNX Runtime. The parts
        run at the same time, one thread each. Defaults to the CPUs this
        process may use, and the Keras engine ignores it.

    Returns
    -------
    name : str
        ``"keras"`` or ``"onnx"``, the engine actually used.
    run : callable
        ``run(batch)`` maps an ``n x height x width x 3`` float32 array to an
        ``n x width`` float32 array.
    """
    if engine not in ENGINE_CHOICES:
        raise InputError(f"--engine must be one of {', '.join(ENGINE_CHOICES)}, got {engine!r}")
    if engine == "keras":
        return "keras", keras_runner(keras_model)

    try:
        model_bytes = _load_or_convert(keras_model, cache_dir)
        run = onnx_runner(model_bytes, threads=threads)
    except EngineUnavailable as exc:
        if engine == "onnx":
            raise InputError(f"--engine onnx cannot be used: {exc}; fix that or pass --engine keras") from exc
        logger.info("ONNX Runtime engine not used (%s); running the image encoder in Keras", exc)
        return "keras", keras_runner(keras_model)
    logger.info("running the image encoder in ONNX Runtime")
    return "onnx", run


def keras_runner(keras_model: Any) -> BatchRunner:
    """Return a batch function that runs ``keras_model`` in inference mode as one traced graph.

    A ``tf.function`` with an open batch dimension is traced once, so the
    smaller last batch does not trigger a new trace. On 2 cores it ran about
    as fast as ``predict_on_batch`` and 2.5 times as fast as eager calls.
    """
    import tensorflow as tf

    height, width, channels = _input_shape(keras_model)
    signature = [tf.TensorSpec((None, height, width, channels), tf.float32)]

    @tf.function(input_signature=signature)
    def forward(batch):
        return keras_model(batch, training=False)

    def run(batch: np.ndarray) -> np.ndarray:
        return np.asarray(forward(np.ascontiguousarray(batch, dtype=np.float32)), dtype=np.float32)

    return run


def onnx_runner(model: str | Path | bytes, *, threads: int | None = None) -> BatchRunner:
    """Return a batch function that runs an ONNX model (file path or serialized bytes) in ONNX Runtime.

    Each batch is split into at least ``threads`` parts (default: the CPUs
    this process may use) of at most :data:`MAX_PART_SIZE` images, which run
    ``threads`` at a time on one session, each part on one ONNX Runtime
    thread. On MobileNetV2 at 128 px with 2 cores this was about 15% faster
    than one run on two intra-op threads, whose late layers work on 4x4 maps
    too small to share well. All graph optimizations are on because they
    made ONNX Runtime 2.5 times faster than basic ones alone, except the
    rewrites in :data:`ONNX_DISABLED_OPTIMIZERS`, which moved vectors more
    than 1e-4 away from Keras.
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise EngineUnavailable("package onnxruntime is not installed (pip install onnxruntime)") from exc

    threads = available_cpus() if threads is None else threads
    if threads < 1:
        raise InputError(f"ONNX Runtime threads must be at least 1, got {threads}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    options.intra_op_num_threads = 1
    # Idle ORT threads sleep instead of spinning, which leaves the CPU to the
    # decoding threads (and to other processes on a shared machine).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model if isinstance(model, bytes) else str(model)
    try:
        session = ort.InferenceSession(
            source, options, providers=["CPUExecutionProvider"], disabled_optimizers=list(ONNX_DISABLED_OPTIMIZERS)
        )
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable models
        raise EngineUnavailable(f"ONNX Runtime could not load the converted model: {exc}") from exc
    input_name = session.get_inputs()[0].name

    def run_part(part: np.ndarray) -> np.ndarray:
        return session.run(None, {input_name: np.ascontiguousarray(part)})[0].astype(np.float32, copy=False)

    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mmdx-onnx") if threads > 1 else None

    def run(batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        parts = max(min(threads, len(batch)), -(-len(batch) // MAX_PART_SIZE))
        if parts < 2:
            return run_part(batch)
        pieces = np.array_split(batch, parts)
        if pool is None:
            return np.concatenate([run_part(piece) for piece in pieces])
        # InferenceSession.run is thread-safe and releases the GIL.
        return np.concatenate(list(pool.map(run_part, pieces)))

    return run


def available_cpus() -> int:
    """Return the number of CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def default_cache_dir() -> Path:
    """Return ``$MMDX_CACHE`` where set, else ``~/.cache/mmdx``."""
    folder = os.environ.get("MMDX_CACHE")
    return Path(folder) if folder else Path.home() / ".cache" / "mmdx"


def onnx_model_path(keras_model: Any, cache_dir: str | Path | None = None) -> Path:
    """Return the cache path of the converted model for ``keras_model`` (it may not exist yet).

    The file name contains a SHA-256 over the weights, the layer types and
    settings, the input and output shapes, and the versions of TensorFlow,
    Keras, tf2onnx and onnx, so new weights, another image size or alpha,
    or a library upgrade each get a file of their own.
    """
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return folder / "onnx" / f"{keras_model.name}-{_model_key(keras_model)[:24]}.onnx"


def onnx_model_bytes(keras_model: Any, cache_dir: str | Path | None = None) -> bytes:
    """Return ``keras_model`` as a serialized ONNX model, converted and checked on first use, then cached.

    Raises
    ------
    EngineUnavailable
        When tf2onnx or onnx is missing, or the conversion fails or does not
        match Keras within :data:`ONNX_TOLERANCE`.
    """
    return _load_or_convert(keras_model, cache_dir)


def _load_or_convert(keras_model: Any, cache_dir: str | Path | None) -> bytes:
    """Return the serialized ONNX model from the cache, or convert, check and cache it."""
    try:
        path = onnx_model_path(keras_model, cache_dir)
    except ImportError as exc:
        raise EngineUnavailable(f"package {exc.name or exc} is not installed (pip install tf2onnx onnxruntime)") from exc
    if path.is_file():
        logger.debug("using the converted model %s", path)
        return path.read_bytes()

    model_bytes = _convert(keras_model)
    difference = _max_difference(keras_model, model_bytes)
    if not difference <= ONNX_TOLERANCE:
        raise EngineUnavailable(
            f"the converted model differs from Keras by {difference:.2e} on a probe batch (allowed {ONNX_TOLERANCE:g})"
        )
    try:
        _write_atomically(path, model_bytes)
        logger.info("converted the image encoder to ONNX (max difference %.1e), cached at %s", difference, path)
    except OSError as exc:
        logger.warning("could not cache the converted model at %s (%s); it will be converted again next run", path, exc)
    return model_bytes


def _convert(keras_model: Any) -> bytes:
    """Convert ``keras_model`` to a serialized ONNX model with an open batch dimension."""
    try:
        import tensorflow as tf
        import tf2onnx
    except ImportError as exc:
        raise EngineUnavailable(f"package {exc.name or exc} is not installed (pip install tf2onnx onnxruntime)") from exc

    height, width, channels = _input_shape(keras_model)
    signature = (tf.TensorSpec((None, height, width, channels), tf.float32, name="images"),)
    try:
        proto, _ = tf2onnx.convert.from_keras(keras_model, input_signature=signature, opset=ONNX_OPSET)
    except Exception as exc:  # tf2onnx raises many types (ValueError, KeyError, its own) on unsupported graphs
        raise EngineUnavailable(f"tf2onnx could not convert the model: {type(exc).__name__}: {exc}") from exc
    return proto.SerializeToString()


def _max_difference(keras_model: Any, model_bytes: bytes) -> float:
    """Run Keras and ONNX Runtime on a fixed random probe batch and return the largest absolute difference."""
    height, width, channels = _input_shape(keras_model)
    probe = np.random.default_rng(0).uniform(-1.0, 1.0, (PROBE_BATCH, height, width, channels)).astype(np.float32)
    expected = keras_runner(keras_model)(probe)
    got = onnx_runner(model_bytes)(probe)
    if got.shape != expected.shape:
        raise EngineUnavailable(f"the converted model returns shape {got.shape}, Keras returns {expected.shape}")
    return float(np.max(np.abs(got - expected)))


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _model_key(keras_model: Any) -> str:
    """Hash everything that changes the converted graph (see :func:`onnx_model_path`)."""
    import keras
    import onnx
    import tensorflow as tf
    import tf2onnx

    digest = hashlib.sha256()
    header = {
        "conversion": CONVERSION_VERSION,
        "opset": ONNX_OPSET,
        "input": [list(map(_shape_entry, keras_model.input_shape))],
        "output": [list(map(_shape_entry, keras_model.output_shape))],
        "versions": {
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "tf2onnx": tf2onnx.__version__,
            "onnx": onnx.__version__,
        },
        # Layer names are left out: Keras numbers them per process
        # (input_layer, input_layer_1, ...), which would defeat the cache.
        "layers": [[type(layer).__name__, _without_names(layer.get_config())] for layer in keras_model.layers],
    }
    digest.update(json.dumps(header, sort_keys=True, default=str).encode("utf-8"))
    for weight in keras_model.weights:
        array = np.ascontiguousarray(np.asarray(weight))
        digest.update(f"{array.dtype.str}{array.shape}".encode("ascii"))
        digest.update(array.tobytes())
    return digest.hexdigest()


def _without_names(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _without_names(item) for key, item in value.items() if key != "name"}
    if isinstance(value, (list, tuple)):
        return [_without_names(item) for item in value]
    return value


def _shape_entry(size: Any) -> Any:
    return None if size is None else int(size)


def _input_shape(keras_model: Any) -> tuple[int, int, int]:
    shape = tuple(keras_model.input_shape)
    if len(shape) != 4 or any(size is None for size in shape[1:]):
        raise InputError(f"image encoder {keras_model.name!r} needs a fixed input shape (None, H, W, C), has {shape}")
    return int(shape[1]), int(shape[2]), int(shape[3])


def map_in_threads(function: Callable[[Batch], Result], batches: Iterable[Batch], *, workers: int | None = None) -> Iterator[Result]:
    """Apply ``function`` to each batch in ``workers`` threads and yield the results in batch order.

    At most ``workers + 1`` batches are in flight, so memory stays bounded
    however many batches there are. ``function`` must be safe to call from
    several threads at once. A Hugging Face fast tokenizer is not, because
    each call with padding or truncation options changes its state, so
    tokenize under a lock (or before) and run only the model in parallel.
    ``workers`` defaults to the CPUs this process may use. An exception in
    ``function`` is raised here when its batch's turn comes; batches after it
    that already started still finish.
    """
    workers = available_cpus() if workers is None else workers
    if workers < 1:
        raise InputError(f"workers must be at least 1, got {workers}")
    if workers == 1:
        for batch in batches:
            yield function(batch)
        return

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mmdx-batch") as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.submit(function, batch))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Set torch's intra-op threads to ``count`` inside the block and restore the previous number after it.

    Use ``count=1`` around :func:`map_in_threads`: each worker thread then
    runs its batch on one core instead of all workers competing for the
    same intra-op thread pool.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
