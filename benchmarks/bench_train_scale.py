"""Trainer scale: ``mmdx train-head`` wall time and peak memory on synthetic stores of 1k to 100k patients.

Each store contains one 1280-d image vector (the MobileNetV2 width) and one
768-d text vector (the BERT-base width) per patient, drawn from two
Gaussian classes that differ slightly in their means, and a labels CSV. For
each size, ``mmdx train-head`` runs 5 folds with ``--modality image``,
``text`` and ``hybrid`` as a separate process, whose wall time and peak RSS
(``ru_maxrss`` from ``wait4``) are recorded. Building the stores is not
timed. The script also times ``mmdx --help``.

Usage::

    python benchmarks/bench_train_scale.py --sizes 1000,10000,100000 --record
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

IMAGE_WIDTH = 1280
TEXT_WIDTH = 768
CHUNK = 10_000
MODALITIES = ("image", "text", "hybrid")
HELP_RUNS = 5


def build_store(folder: Path, n_patients: int, seed: int = 0) -> tuple[Path, Path]:
    """Write a synthetic store and labels CSV with ``n_patients`` patients; return their paths."""
    from mmdx.store import FeatureStore

    rng = np.random.default_rng(seed)
    store_path = folder / f"synthetic-{n_patients}.h5"
    labels_path = folder / f"labels-{n_patients}.csv"
    patient_ids = [f"P{index:06d}" for index in range(n_patients)]
    labels = rng.integers(0, 2, n_patients)
    with open(labels_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patient_id", "label"])
        writer.writerows(zip(patient_ids, labels.tolist()))

    with FeatureStore(store_path, mode="a") as store:
        for modality, encoder, width in (("image", "synthetic-image", IMAGE_WIDTH), ("text", "synthetic-text", TEXT_WIDTH)):
            header = store.ensure_set(modality, encoder, {"weights": f"synthetic seed {seed}"}, width, {"note": "benchmark"})
            shift = rng.normal(0.0, 0.05, width).astype(np.float32)
            for start in range(0, n_patients, CHUNK):
                stop = min(start + CHUNK, n_patients)
                vectors = rng.normal(0.0, 1.0, (stop - start, width)).astype(np.float32)
                vectors += labels[start:stop, None].astype(np.float32) * shift
                ids = patient_ids[start:stop]
                store.commit(header, ids, [f"{modality} 1"] * len(ids), [f"h{pid}" for pid in ids], vectors)
    return store_path, labels_path


def mmdx_command() -> list[str]:
    return [sys.executable, "-m", "mmdx"]


def time_help() -> list[float]:
    return [benchlib.run_child([*mmdx_command(), "--help"]).wall for _ in range(HELP_RUNS)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000", help="comma-separated numbers of patients")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--record", action="store_true", help="write the section of docs/benchmarks.md")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]

    header = benchlib.header_lines()
    help_times = time_help()
    print(f"mmdx --help: median {benchlib.median(help_times):.2f} s over {HELP_RUNS} runs", flush=True)

    rows = []
    with tempfile.TemporaryDirectory(prefix="mmdx-bench-train-") as temporary:
        folder = Path(temporary)
        for size in sizes:
            store_path, labels_path = build_store(folder, size)
            size_mb = sum(path.stat().st_size for path in folder.rglob(f"synthetic-{size}.h5*") if path.is_file()) / 2**20
            print(f"{size} patients: store {size_mb:.0f} MB", flush=True)
            for modality in MODALITIES:
                argv = [
                    *mmdx_command(), "train-head", "--store", str(store_path), "--labels", str(labels_path),
                    "--label-column", "label", "--modality", modality, "--folds", str(args.folds),
                    "--out", str(folder / f"out-{size}-{modality}"),
                ]
                run = benchlib.run_child(argv)
                print(
                    f"  {modality:6s} {run.wall:7.2f} s wall, {run.cpu:7.2f} s CPU, peak RSS {run.peak_rss_mb:7.0f} MB "
                    f"(load {benchlib.load_average():.1f})",
                    flush=True,
                )
                rows.append([f"{size:,}", modality, f"{run.wall:.2f}", f"{run.cpu:.2f}", f"{run.peak_rss_mb:.0f}"])
            for path in folder.glob(f"synthetic-{size}.h5*"):
                shutil.rmtree(path) if path.is_dir() else path.unlink()

    table = benchlib.markdown_table(["patients", "modality", "wall s", "CPU s", "peak RSS MB"], rows)
    body = (
        f"{header}\n"
        f"`mmdx train-head`, {args.folds} folds, default head (concat for hybrid), on synthetic stores with one "
        f"{IMAGE_WIDTH}-d image vector and one {TEXT_WIDTH}-d text vector per patient; each run is its own process. "
        f"`mmdx --help`: median {benchlib.median(help_times):.2f} s wall over {HELP_RUNS} runs "
        f"(min {min(help_times):.2f} s).\n\n{table}\n"
    )
    print()
    print(table)
    if args.record:
        benchlib.record_section("Trainer scale", body)
        print(f"recorded in {benchlib.RESULTS_PAGE}")


if __name__ == "__main__":
    main()
