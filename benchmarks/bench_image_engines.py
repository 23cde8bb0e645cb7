"""Inference-only comparison of the ways to run MobileNetV2 (128 px, alpha 1.0) on the CPU.

No decoding is timed: every variant runs the same batches, either random
values in [-1, 1] or, with ``--source brain-mri``, evenly spaced
``brain-mri-4class`` slices decoded and resized as the Keras pipeline does
(differences of about 1e-4 show only on real images). Keras variants:
``model.predict``, ``predict_on_batch``, an eager call with
``training=False`` and a ``tf.function`` with an open batch dimension, under
TensorFlow's default threads and under one intra-op and one inter-op thread.
ONNX Runtime variants: basic against all graph optimizations, all of them
but the two batch-norm folds mmdx leaves out
(:data:`mmdx.embed.engines.ONNX_DISABLED_OPTIMIZERS`), one or two intra-op
threads, and mmdx's split of each batch into one part per core
(:func:`mmdx.embed.engines.onnx_runner`), at batch sizes 16, 32 and 64.
Where installed, OpenVINO (float32 precision hint) and TensorFlow Lite with
XNNPACK run the same graph on one thread. Each engine family runs in its own
process. Within a process, the variants are interleaved over the repeats
and the median is reported, with each variant's largest absolute difference
from ``predict_on_batch``.

Usage::

    python benchmarks/bench_image_engines.py --images 256 --repeats 3 --record
    python benchmarks/bench_image_engines.py --source brain-mri --images 1024 --repeats 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

IMAGE_SIZE = 128


def build_model():
    from keras.applications import mobilenet_v2

    return mobilenet_v2.MobileNetV2(
        input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3), include_top=False, pooling="avg", weights=str(benchlib.MOBILENET_WEIGHTS)
    )


def time_variants(variants: dict, data: np.ndarray, batch_sizes: list[int], repeats: int, reference: np.ndarray) -> list[dict]:
    """Run every (variant, batch size) ``repeats`` times, interleaved; return median images/s, CPU ms/image and max difference."""
    results = {}
    for _ in range(repeats):
        for name, run in variants.items():
            for batch_size in batch_sizes:
                run(data[:batch_size])  # warm-up: tracing, session first run
                started, cpu_started = time.perf_counter(), time.process_time()
                outputs = [run(data[i : i + batch_size]) for i in range(0, len(data), batch_size)]
                seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
                entry = results.setdefault((name, batch_size), {"rates": [], "cpu": [], "diff": 0.0})
                entry["rates"].append(len(data) / seconds)
                entry["cpu"].append(cpu / len(data) * 1000)
                entry["diff"] = max(entry["diff"], float(np.max(np.abs(np.concatenate(outputs) - reference))))
    return [
        {
            "variant": name,
            "batch": batch_size,
            "rate": benchlib.median(entry["rates"]),
            "cpu_ms": benchlib.median(entry["cpu"]),
            "diff": entry["diff"],
        }
        for (name, batch_size), entry in results.items()
    ]


def load_inputs(source: str, n_images: int) -> np.ndarray:
    """Return ``n_images`` network inputs: random values, or brain-mri slices prepared as the Keras pipeline does."""
    if source == "random":
        return np.random.default_rng(0).uniform(-1.0, 1.0, (n_images, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    import tensorflow as tf
    from keras.applications import mobilenet_v2

    files = sorted((benchlib.DATA / "brain-mri-4class").rglob("*.jpg"))
    chosen = files[:: max(1, len(files) // n_images)][:n_images]
    images = [
        tf.image.resize(tf.io.decode_image(tf.io.read_file(str(path)), channels=3, expand_animations=False), (IMAGE_SIZE, IMAGE_SIZE))
        for path in chosen
    ]
    return mobilenet_v2.preprocess_input(np.stack([image.numpy() for image in images])).astype(np.float32)


def child(kind: str, n_images: int, repeats: int, source: str) -> list[dict]:
    import tensorflow as tf

    if kind == "keras-1-thread":
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    model = build_model()
    data = load_inputs(source, n_images)
    n_images = len(data)
    reference = np.concatenate([model.predict_on_batch(data[i : i + 32]) for i in range(0, n_images, 32)])

    if kind.startswith("keras"):
        from mmdx.embed.engines import keras_runner

        suffix = " (1 intra, 1 inter thread)" if kind == "keras-1-thread" else ""
        variants = {
            f"keras predict{suffix}": lambda batch: model.predict(batch, verbose=0, batch_size=len(batch)),
            f"keras predict_on_batch{suffix}": model.predict_on_batch,
            f"keras call training=False{suffix}": lambda batch: model(batch, training=False).numpy(),
            f"keras tf.function{suffix}": keras_runner(model),
        }
        return time_variants(variants, data, [32], repeats, reference)

    from mmdx.embed.engines import ONNX_DISABLED_OPTIMIZERS, available_cpus, onnx_model_bytes, onnx_runner

    model_bytes = onnx_model_bytes(model)
    if kind == "openvino":
        return openvino_variants(model_bytes, data, repeats, reference)
    if kind == "tflite":
        return tflite_variants(model, data, repeats, reference)

    import onnxruntime as ort

    def session_runner(level, threads: int, disabled=()):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        options.inter_op_num_threads = 1
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(
            model_bytes, options, providers=["CPUExecutionProvider"], disabled_optimizers=list(disabled)
        )
        name = session.get_inputs()[0].name
        return lambda batch: session.run(None, {name: batch})[0]

    basic, full = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    variants = {
        "onnx basic optimizations, 2 threads": session_runner(basic, 2),
        "onnx all optimizations, 1 thread": session_runner(full, 1),
        "onnx all but the batch-norm folds, 1 thread": session_runner(full, 1, ONNX_DISABLED_OPTIMIZERS),
        "onnx all optimizations, 2 intra-op threads": session_runner(full, 2),
        f"onnx all but the batch-norm folds, batch split in {available_cpus()} (mmdx)": onnx_runner(model_bytes),
    }
    return time_variants(variants, data, [16, 32, 64], repeats, reference)


def openvino_variants(model_bytes: bytes, data: np.ndarray, repeats: int, reference: np.ndarray) -> list[dict]:
    """Time OpenVINO on the converted ONNX graph (float32, one stream per hint), or return no rows if absent."""
    try:
        import openvino
    except ImportError:
        print("openvino not installed (pip install openvino); its rows are left out", file=sys.stderr)
        return []
    core = openvino.Core()
    with tempfile.TemporaryDirectory(prefix="mmdx-bench-openvino-") as folder:
        path = Path(folder) / "model.onnx"
        path.write_bytes(model_bytes)
        variants = {}
        for hint in ("LATENCY", "THROUGHPUT"):
            compiled = core.compile_model(str(path), "CPU", {"PERFORMANCE_HINT": hint, "INFERENCE_PRECISION_HINT": "f32"})
            request = compiled.create_infer_request()
            variants[f"openvino f32, {hint.lower()} hint"] = lambda batch, request=request: request.infer({0: batch})[0].copy()
        return time_variants(variants, data, [16], repeats, reference)


def tflite_variants(model, data: np.ndarray, repeats: int, reference: np.ndarray) -> list[dict]:
    """Time TensorFlow Lite (XNNPACK delegate, one thread) on the Keras model converted in memory."""
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_content=tf.lite.TFLiteConverter.from_keras_model(model).convert(), num_threads=1)
    input_index = interpreter.get_input_details()[0]["index"]
    output_index = interpreter.get_output_details()[0]["index"]

    def run(batch: np.ndarray) -> np.ndarray:
        interpreter.resize_tensor_input(input_index, list(batch.shape))
        interpreter.allocate_tensors()
        interpreter.set_tensor(input_index, batch)
        interpreter.invoke()
        return interpreter.get_tensor(output_index).copy()

    return time_variants({"tflite xnnpack, 1 thread": run}, data, [16], repeats, reference)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256, help="random images per timed pass")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--source", choices=["random", "brain-mri"], default="random", help="network inputs: random values or real slices")
    parser.add_argument("--record", action="store_true", help="write the section of docs/benchmarks.md")
    args = parser.parse_args()

    header = benchlib.header_lines()
    rows = []
    with tempfile.TemporaryDirectory(prefix="mmdx-bench-engines-") as temporary:
        env = {"MMDX_CACHE": temporary}
        for kind in ("keras", "keras-1-thread", "onnx", "openvino", "tflite"):
            argv = [sys.executable, __file__, "child", kind, str(args.images), str(args.repeats), args.source]
            run = benchlib.run_child(argv, env=env)
            for entry in run.result["rows"]:
                print(
                    f"{entry['variant']:55s} batch {entry['batch']:3d} {entry['rate']:7.1f} images/s "
                    f"{entry['cpu_ms']:5.2f} CPU ms/image, max diff {entry['diff']:.1e}",
                    flush=True,
                )
                rows.append(
                    [entry["variant"], entry["batch"], f"{entry['rate']:.1f}", f"{entry['cpu_ms']:.2f}", f"{entry['diff']:.1e}"]
                )

    table = benchlib.markdown_table(["variant", "batch", "images/s", "CPU ms/image", "max abs diff vs predict_on_batch"], rows)
    body = (
        f"{header}\n"
        f"Inference only, {args.images} {'random images' if args.source == 'random' else 'brain-mri-4class slices'} per pass, "
        f"median of {args.repeats} interleaved passes.\n\n{table}\n"
    )
    print()
    print(table)
    if args.record:
        benchlib.record_section("Image engines, inference only", body)
        print(f"recorded in {benchlib.RESULTS_PAGE}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        benchlib.child_report({"rows": child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])})
    else:
        main()
