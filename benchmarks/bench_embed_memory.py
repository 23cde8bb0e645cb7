"""Memory while embedding: peak RSS of ``mmdx embed texts`` on 1k against 50k texts.

The encoder is a small random BERT (1 layer, 384-d, 8 heads, a 60-word
vocabulary) saved to a temporary folder, so 50k texts embed in about a
minute. Its 384-d vectors make a whole-data-set array noticeable: 50k of
them take 77 MB. Texts are 6 to 12 random words. Peak RSS is the child's
``ru_maxrss`` from ``wait4``. With streamed, per-batch commits the two peaks
should be about equal. What does grow with the input is the item list and
the token lengths planned up front, an estimated few MB at 50k.

Usage::

    python benchmarks/bench_embed_memory.py --sizes 1000,50000 --record
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

WORDS = [f"word{index}" for index in range(50)]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_tiny_bert(folder: Path) -> Path:
    """Save a random 1-layer BERT with a word-level vocabulary and its tokenizer to ``folder``."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + WORDS) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)
    config = BertConfig(
        vocab_size=len(SPECIAL) + len(WORDS), hidden_size=384, num_hidden_layers=1, num_attention_heads=8,
        intermediate_size=384, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_texts(path: Path, n_texts: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patient_id", "text"])
        for index in range(n_texts):
            writer.writerow([f"P{index:06d}", " ".join(rng.choices(WORDS, k=rng.randint(6, 12)))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,50000", help="comma-separated numbers of texts")
    parser.add_argument("--record", action="store_true", help="write the section of docs/benchmarks.md")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]

    header = benchlib.header_lines()
    rows = []
    with tempfile.TemporaryDirectory(prefix="mmdx-bench-memory-") as temporary:
        folder = Path(temporary)
        model = build_tiny_bert(folder / "tiny-bert")
        for size in sizes:
            source = folder / f"texts-{size}.csv"
            write_texts(source, size)
            argv = [
                sys.executable, "-m", "mmdx", "embed", "texts", str(source), "--store", str(folder / f"store-{size}.h5"),
                "--text-column", "text", "--model", str(model), "--pooling", "mean", "--quiet",
            ]
            run = benchlib.run_child(argv)
            print(
                f"{size:6d} texts: peak RSS {run.peak_rss_mb:.0f} MB, {run.wall:.1f} s wall "
                f"(load {benchlib.load_average():.1f})",
                flush=True,
            )
            rows.append([f"{size:,}", f"{run.peak_rss_mb:.0f}", f"{run.wall:.1f}", f"{size * 384 * 4 / 2**20:.0f}"])

    table = benchlib.markdown_table(["texts", "peak RSS MB", "wall s", "all vectors would take MB"], rows)
    body = (
        f"{header}\n"
        f"`mmdx embed texts` with a random 1-layer 384-d BERT on synthetic 6-12-word texts, one process per size.\n\n"
        f"{table}\n"
    )
    print()
    print(table)
    if args.record:
        benchlib.record_section("Memory while embedding", body)
        print(f"recorded in {benchlib.RESULTS_PAGE}")


if __name__ == "__main__":
    main()
