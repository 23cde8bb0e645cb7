"""Memory while embedding: peak RSS of ``mmdx embed texts`` and ``mmdx embed images`` on 1k against 50k items.

Texts: the encoder is a small random BERT (1 layer, 384-d, 8 heads, a
60-word vocabulary) saved to a temporary folder, so 50k texts embed in about
a minute. Its 384-d vectors make a whole-data-set array noticeable: 50k of
them take 77 MB. Texts are 6 to 12 random words.

Images: a flat temporary folder of 64x64 greyscale PNG files, each with its
own random 16x16 patch on a shared gradient, so every file has its own
content hash. The file stem is the patient ID. They are embedded by a
MobileNetV2 with random weights (no download), alpha 0.35, at 32x32 pixels.
Its 1280-d vectors take 244 MB at 50k images.

Peak RSS is the child's ``ru_maxrss`` from ``wait4``. With streamed,
per-batch commits the two peaks of a modality should be about equal. What
does grow with the input is the item list (and, for texts, the token
lengths planned up front).

NOTE: both peaks grow by about 60 MB from 1k to 50k items (about 1.2 kB
per item): the item list, the stored keys read to skip finished items, and
the compaction's key index. Vectors are streamed; listing the source in
chunks would make the peak flat.

Usage::

    python benchmarks/bench_embed_memory.py --modality both --sizes 1000,50000 --record
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

WORDS = [f"word{index}" for index in range(50)]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TEXT_WIDTH = 384
IMAGE_WIDTH = 1280  # MobileNetV2 keeps its last 1280 channels for every alpha up to 1.0.
IMAGE_PIXELS = 64
PATCH_PIXELS = 16
MODALITIES = ("texts", "images")


def build_tiny_bert(folder: Path) -> Path:
    """Save a random 1-layer BERT with a word-level vocabulary and its tokenizer to ``folder``."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + WORDS) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)
    config = BertConfig(
        vocab_size=len(SPECIAL) + len(WORDS), hidden_size=TEXT_WIDTH, num_hidden_layers=1, num_attention_heads=8,
        intermediate_size=TEXT_WIDTH, max_position_embeddings=64,
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


def write_images(folder: Path, n_images: int, seed: int = 0, threads: int = 2) -> None:
    """Write ``n_images`` distinct 64x64 greyscale PNG files named ``P000000.png`` and on to ``folder``.

    Each image is a shared gradient with a random 16x16 patch at a random
    place, drawn from a generator seeded by ``seed`` and the image's index,
    so the files are reproducible, distinct and about 0.6 kB each.
    """
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    ramp = np.linspace(0, 200, IMAGE_PIXELS, dtype=np.float32)
    gradient = (ramp[:, None] + ramp[None, :]) / 2

    def write_one(index: int) -> None:
        rng = np.random.default_rng([seed, index])
        pixels = gradient.astype(np.uint8)
        row, column = rng.integers(0, IMAGE_PIXELS - PATCH_PIXELS, size=2)
        pixels[row : row + PATCH_PIXELS, column : column + PATCH_PIXELS] = rng.integers(
            0, 256, size=(PATCH_PIXELS, PATCH_PIXELS), dtype=np.uint8
        )
        Image.fromarray(pixels, mode="L").save(folder / f"P{index:06d}.png")

    # Two threads, one per core of the benchmark machine. 50k files take an estimated 16 s.
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in pool.map(write_one, range(n_images), chunksize=256):
            pass


def measure(modality: str, size: int, argv: list[str], width: int) -> list[str]:
    """Run one ``mmdx embed`` child, print its peak RSS and wall time, and return its table row."""
    run = benchlib.run_child(argv)
    print(
        f"{size:6d} {modality}: peak RSS {run.peak_rss_mb:.0f} MB, {run.wall:.1f} s wall "
        f"(load {benchlib.load_average():.1f})",
        flush=True,
    )
    return [modality, f"{size:,}", f"{run.peak_rss_mb:.0f}", f"{run.wall:.1f}", f"{size * width * 4 / 2**20:.0f}"]


def measure_texts(folder: Path, sizes: list[int]) -> list[list[str]]:
    """Embed ``sizes`` synthetic texts, one child process per size, and return the table rows."""
    model = build_tiny_bert(folder / "tiny-bert")
    rows = []
    for size in sizes:
        source = folder / f"texts-{size}.csv"
        write_texts(source, size)
        argv = [
            sys.executable, "-m", "mmdx", "embed", "texts", str(source), "--store", str(folder / f"store-{size}.h5"),
            "--text-column", "text", "--model", str(model), "--pooling", "mean", "--quiet",
        ]
        rows.append(measure("texts", size, argv, TEXT_WIDTH))
    return rows


def measure_images(folder: Path, sizes: list[int]) -> list[list[str]]:
    """Embed ``sizes`` synthetic images, one child process per size, and return the table rows."""
    rows = []
    for size in sizes:
        source = folder / f"images-{size}"
        write_images(source, size)
        argv = [
            sys.executable, "-m", "mmdx", "embed", "images", str(source), "--store", str(folder / f"store-images-{size}.h5"),
            "--weights", "random", "--alpha", "0.35", "--image-size", "32", "--quiet",
        ]
        rows.append(measure("images", size, argv, IMAGE_WIDTH))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,50000", help="comma-separated numbers of texts and of images")
    parser.add_argument("--modality", choices=("texts", "images", "both"), default="both", help="what to embed")
    parser.add_argument("--record", action="store_true", help="write the section of docs/benchmarks.md")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    modalities = MODALITIES if args.modality == "both" else (args.modality,)

    header = benchlib.header_lines()
    rows = []
    with tempfile.TemporaryDirectory(prefix="mmdx-bench-memory-") as temporary:
        folder = Path(temporary)
        if "texts" in modalities:
            rows += measure_texts(folder, sizes)
        if "images" in modalities:
            rows += measure_images(folder, sizes)

    table = benchlib.markdown_table(["modality", "items", "peak RSS MB", "wall s", "all vectors would take MB"], rows)
    parts = []
    if "texts" in modalities:
        parts.append("`mmdx embed texts` with a random 1-layer 384-d BERT on synthetic 6-12-word texts")
    if "images" in modalities:
        parts.append(
            "`mmdx embed images` with a random-weight MobileNetV2 (alpha 0.35, 32x32 input, 1280-d vectors) "
            f"on distinct synthetic {IMAGE_PIXELS}x{IMAGE_PIXELS} greyscale PNG files in one flat folder"
        )
    body = f"{header}\n" + "; ".join(parts) + ". One process per modality and size.\n\n" + f"{table}\n"
    print()
    print(table)
    if args.record:
        benchlib.record_section("Memory while embedding", body)
        print(f"recorded in {benchlib.RESULTS_PAGE}")


if __name__ == "__main__":
    main()
