"""Image embedding throughput: mmdx against the standard Keras pipeline, same weights, same images.

The standard pipeline is what a Keras user writes:
``keras.utils.image_dataset_from_directory(..., image_size=(128, 128))``
(TensorFlow JPEG decoding, bilinear resize without antialiasing),
``mobilenet_v2.preprocess_input`` and ``MobileNetV2(include_top=False,
pooling="avg", weights=<file>).predict``. It is compared with

* ``mmdx-library``: ``mmdx.embed.images.embed_images`` with its defaults
  (``preprocessing="keras"``, ``engine="auto"``) into a fresh store,
  vectors read back from the store;
* ``mmdx-pillow``: the same with ``preprocessing="pillow"`` (Pillow
  decoding and antialiased resize), which shows why the Keras-compatible
  preprocessing is the default;
* ``onnx-reference``: the same TensorFlow decoding and resize in two
  threads, one batch ahead of :func:`mmdx.embed.engines.select_image_engine`
  with ``engine="onnx"``, which shows what the engine gives on its own.

Each pipeline runs in its own process; repeats are interleaved. Throughput and
CPU time (all threads) count from the end of the imports to the vectors in
hand, so they include building the model (and, for mmdx, loading the cached
ONNX file and writing the store). The ONNX conversion is done once beforehand and timed on
its own. Vectors are matched by file stem.

Usage::

    python benchmarks/bench_images.py --limit 1000 --repeats 2 --record
    python benchmarks/bench_images.py child keras SUBSET OUT.npz   # one run
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

DATASET = benchlib.DATA / "brain-mri-4class"
IMAGE_SIZE = 128
BATCH_SIZE = 32
PIPELINES = ("keras-standard", "mmdx-library", "mmdx-pillow", "onnx-reference")
TOLERANCE = 1e-4


def make_subset(limit: int | None, folder: Path) -> int:
    """Link an evenly spaced subset of the data set's JPEG files into ``folder``, keeping the class folders."""
    files = sorted(DATASET.rglob("*.jpg"))
    if limit is not None and limit < len(files):
        step = len(files) / limit
        files = [files[int(i * step)] for i in range(limit)]
    for path in files:
        target = folder / path.relative_to(DATASET)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(path, target)
    return len(files)


# ---------------------------------------------------------------- child runs


def child_keras(subset: Path, out: Path) -> dict:
    import keras
    from keras.applications import mobilenet_v2

    started, cpu_started = time.perf_counter(), time.process_time()
    model = mobilenet_v2.MobileNetV2(
        input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3), include_top=False, pooling="avg", weights=str(benchlib.MOBILENET_WEIGHTS)
    )
    dataset = keras.utils.image_dataset_from_directory(
        subset, labels=None, image_size=(IMAGE_SIZE, IMAGE_SIZE), batch_size=BATCH_SIZE, shuffle=False, verbose=False
    )
    paths = dataset.file_paths
    vectors = model.predict(dataset.map(mobilenet_v2.preprocess_input), verbose=0)
    seconds = time.perf_counter() - started
    np.savez(out, keys=np.array([Path(p).stem for p in paths]), vectors=vectors)
    return {"seconds": seconds, "cpu": time.process_time() - cpu_started, "n": len(paths), "engine": "keras predict"}


def child_onnx_reference(subset: Path, out: Path) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    import tensorflow as tf
    from keras.applications import mobilenet_v2

    from mmdx.embed.engines import select_image_engine

    def load(path: Path) -> np.ndarray:
        image = tf.io.decode_image(tf.io.read_file(str(path)), channels=3, expand_animations=False)
        return tf.image.resize(image, (IMAGE_SIZE, IMAGE_SIZE), method="bilinear", antialias=False).numpy()

    def load_batch(paths: list[Path]) -> np.ndarray:
        return mobilenet_v2.preprocess_input(np.stack([load(path) for path in paths])).astype(np.float32)

    started, cpu_started = time.perf_counter(), time.process_time()
    model = mobilenet_v2.MobileNetV2(
        input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3), include_top=False, pooling="avg", weights=str(benchlib.MOBILENET_WEIGHTS)
    )
    threads = int(os.environ["BENCH_ORT_THREADS"]) if os.environ.get("BENCH_ORT_THREADS") else None
    engine, run = select_image_engine(model, "onnx", threads=threads)
    paths = sorted(subset.rglob("*.jpg"))
    batches = [paths[i : i + BATCH_SIZE] for i in range(0, len(paths), BATCH_SIZE)]
    outputs = []
    with ThreadPoolExecutor(max_workers=2) as pool:
        pending = [pool.submit(load_batch, batch) for batch in batches[:2]]
        for index in range(len(batches)):
            pixels = pending[index].result()
            if index + 2 < len(batches):
                pending.append(pool.submit(load_batch, batches[index + 2]))
            outputs.append(run(pixels))
    vectors = np.concatenate(outputs)
    seconds = time.perf_counter() - started
    np.savez(out, keys=np.array([p.stem for p in paths]), vectors=vectors)
    return {"seconds": seconds, "cpu": time.process_time() - cpu_started, "n": len(paths), "engine": engine}


def child_mmdx_library(subset: Path, out: Path, preprocessing: str | None = None) -> dict:
    import tensorflow  # noqa: F401  (imported before the clock starts, as in the other pipelines)

    from mmdx.embed.images import embed_images
    from mmdx.store import FeatureStore

    options = {"weights": str(benchlib.MOBILENET_WEIGHTS), "image_size": IMAGE_SIZE, "quiet": True}
    if "engine" in inspect.signature(embed_images).parameters:
        options["engine"] = "auto"
    if preprocessing is not None:
        options["preprocessing"] = preprocessing
    store_path = out.with_suffix(".h5")
    started, cpu_started = time.perf_counter(), time.process_time()
    report = embed_images(subset, store_path, **options)
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    feature_set = FeatureStore(store_path, mode="r").read(report.feature_set)
    rows = feature_set.rows
    np.savez(out, keys=np.asarray(rows.patient_ids, dtype=str), vectors=np.asarray(rows.vectors))
    engine = feature_set.header.info.get("engine", "keras") if hasattr(feature_set.header, "info") else "?"
    return {"seconds": seconds, "cpu": cpu, "n": report.n_embedded, "engine": engine}


def child_convert() -> dict:
    from keras.applications import mobilenet_v2

    from mmdx.embed.engines import select_image_engine

    model = mobilenet_v2.MobileNetV2(
        input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3), include_top=False, pooling="avg", weights=str(benchlib.MOBILENET_WEIGHTS)
    )
    started = time.perf_counter()
    engine, _ = select_image_engine(model, "onnx")
    return {"seconds": time.perf_counter() - started, "engine": engine}


def child_mmdx_pillow(subset: Path, out: Path) -> dict:
    return child_mmdx_library(subset, out, preprocessing="pillow")


CHILDREN = {
    "keras-standard": child_keras,
    "mmdx-library": child_mmdx_library,
    "mmdx-pillow": child_mmdx_pillow,
    "onnx-reference": child_onnx_reference,
}


def run_child_mode(argv: list[str]) -> None:
    mode = argv[0]
    if mode == "convert":
        benchlib.child_report(child_convert())
        return
    subset, out = Path(argv[1]), Path(argv[2])
    benchlib.child_report(CHILDREN[mode](subset, out))


# ---------------------------------------------------------------- comparison


def compare(reference: Path, other: Path) -> dict:
    """Match vectors by key and return the max and median absolute difference and the count above tolerance."""
    expected = np.load(reference)
    got = np.load(other)
    by_key = dict(zip(expected["keys"].tolist(), expected["vectors"]))
    differences = []
    for key, vector in zip(got["keys"].tolist(), got["vectors"]):
        differences.append(float(np.max(np.abs(by_key[key] - vector))))
    differences = np.array(differences)
    return {
        "matched": len(differences),
        "max": float(differences.max()),
        "median": float(np.median(differences)),
        "above": int((differences >= TOLERANCE).sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=1000, help="images to use, evenly spaced; 0 for all 7,019")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs of each pipeline")
    parser.add_argument("--pipelines", default=",".join(PIPELINES), help="comma-separated subset of " + ", ".join(PIPELINES))
    parser.add_argument("--record", action="store_true", help="write the section of docs/benchmarks.md")
    args = parser.parse_args()
    pipelines = [name.strip() for name in args.pipelines.split(",") if name.strip()]
    if "keras-standard" not in pipelines:
        parser.error("--pipelines must include keras-standard, the reference for ratios and differences")

    header = benchlib.header_lines()
    with tempfile.TemporaryDirectory(prefix="mmdx-bench-images-") as temporary:
        workdir = Path(temporary)
        subset = workdir / "images"
        n_images = make_subset(args.limit or None, subset)
        env = {"MMDX_CACHE": str(workdir / "cache")}
        print(f"{n_images} images from {DATASET}", flush=True)

        conversion = benchlib.run_child([sys.executable, __file__, "child", "convert"], env=env)
        print(f"ONNX conversion (cold cache): {conversion.result['seconds']:.1f} s, engine {conversion.result['engine']}", flush=True)

        runs: dict[str, list] = {name: [] for name in pipelines}
        for repeat in range(args.repeats):
            for name in pipelines:
                out = workdir / f"{name}-{repeat}.npz"
                if name.startswith("mmdx-"):
                    out.with_suffix(".h5").unlink(missing_ok=True)
                run = benchlib.run_child([sys.executable, __file__, "child", name, str(subset), str(out)], env=env)
                run.result["out"] = out
                runs[name].append(run)
                print(
                    f"repeat {repeat + 1} {name:15s} {run.result['n'] / run.result['seconds']:7.1f} images/s "
                    f"({run.result['seconds']:.1f} s, process {run.wall:.1f} s wall, {run.cpu:.1f} s CPU, "
                    f"engine {run.result['engine']}, load {benchlib.load_average():.1f})",
                    flush=True,
                )

        rows = []
        keras_rate = benchlib.median([r.result["n"] / r.result["seconds"] for r in runs["keras-standard"]])
        keras_cpu = benchlib.median([r.result["cpu"] for r in runs["keras-standard"]])
        for name in pipelines:
            rate = benchlib.median([r.result["n"] / r.result["seconds"] for r in runs[name]])
            cpu = benchlib.median([r.result["cpu"] for r in runs[name]])
            if name == "keras-standard":
                difference = "reference"
            else:
                stats = compare(runs["keras-standard"][0].result["out"], runs[name][0].result["out"])
                difference = f"{stats['max']:.1e} (median {stats['median']:.1e}, {stats['above']} of {stats['matched']} >= {TOLERANCE:g})"
            rows.append(
                [
                    name,
                    runs[name][0].result["engine"],
                    f"{rate:.1f}",
                    f"{rate / keras_rate:.2f}x",
                    f"{cpu / n_images * 1000:.1f}",
                    f"{keras_cpu / cpu:.2f}x",
                    difference,
                ]
            )

    table = benchlib.markdown_table(
        ["pipeline", "engine", "images/s", "vs Keras", "CPU ms/image", "CPU vs Keras", "max abs diff vs Keras"],
        rows,
    )
    body = (
        f"{header}\n"
        f"{n_images} JPEG slices of `brain-mri-4class` at {IMAGE_SIZE}x{IMAGE_SIZE}, MobileNetV2 alpha 1.0 with the "
        f"offline ImageNet weights, batch {BATCH_SIZE}; median of {args.repeats} interleaved runs. "
        f"ONNX conversion on a cold cache: {conversion.result['seconds']:.1f} s (once per weights, size and library versions).\n\n"
        f"{table}\n"
    )
    print()
    print(table)
    if args.record:
        benchlib.record_section("Image embedding throughput", body)
        print(f"recorded in {benchlib.RESULTS_PAGE}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        run_child_mode(sys.argv[2:])
    else:
        main()
