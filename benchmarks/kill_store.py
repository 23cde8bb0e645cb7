"""Kill a process writing a feature store at random moments and check the store after each kill.

The writer is a real subprocess that embeds items through
``mmdx.embed.runner.embed_items`` with a deterministic fake encoder. It
commits a batch at a time and compacts the journal every few commits, so
kills land in commits, compactions, the closing compaction and start-up. After each
kill (SIGKILL, or SIGINT for a share of them) the store must open, pass
``verify_store``, and hold every row the writer reported as committed with
exactly the expected vector. The writer is then restarted until one run
finishes, and the final store must equal that of an uninterrupted run.

Usage::

    python benchmarks/kill_store.py --kills 300
    python benchmarks/kill_store.py writer STORE --items 60 --batch 3   # one writer run

The test ``tests/test_store_kill.py`` runs :func:`run_kill_cycles` with a few
dozen kills.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

WIDTH = 16
CONFIG = {"weights": "fake-encoder-v1", "max_length": 32}
COMMITTED = "committed"


def fake_vector(patient_id: str, text: str, width: int = WIDTH) -> np.ndarray:
    """Return the vector the fake encoder gives ``text``; equal inputs give equal bits."""
    seed = int.from_bytes(hashlib.sha256(f"{patient_id}|{text}".encode()).digest()[:8], "little")
    return np.random.default_rng(seed).standard_normal(width).astype(np.float32)


def item_text(i: int) -> str:
    return f"report {i}: " + "no acute findings " * (i % 5)


# The writer subprocess -------------------------------------------------------


def run_writer(store_path: str, n_items: int, batch: int, compact_every: int, pause: float, wait: float) -> None:
    """Embed ``n_items`` fake texts into ``store_path``, printing each committed key."""
    from mmdx.embed.runner import Item, embed_items, fixed_size_batches, sha256_text
    from mmdx.store import FeatureStore

    items = []
    for i in range(n_items):
        text = item_text(i)
        items.append(Item(f"p{i:04d}", f"row {i + 2}", sha256_text(text), 0, text))

    def encode(batches):
        for chunk in batches:
            time.sleep(pause)
            yield chunk, np.stack([fake_vector(it.patient_id, it.payload) for it in chunk]), []

    with FeatureStore(store_path, mode="a", wait=wait) as store:
        header = store.ensure_set("text", "fake-encoder", CONFIG, WIDTH)
        commit = store.commit
        n_commits = 0

        def commit_and_report(header, patient_ids, *args, **kwargs):
            nonlocal n_commits
            commit(header, patient_ids, *args, **kwargs)
            # Printed only after commit() returned, so every listed key must survive a kill.
            sys.stdout.write(f"{COMMITTED} {' '.join(patient_ids)}\n")
            sys.stdout.flush()
            n_commits += 1
            if compact_every and n_commits % compact_every == 0:
                store.compact()

        store.commit = commit_and_report
        embed_items(store, header, items, lambda todo: fixed_size_batches(todo, batch), encode, quiet=True)


# The harness -------------------------------------------------------------------


@dataclass
class KillSummary:
    """Counts of one kill session; ``failures`` lists what went wrong after which kill."""

    kills: int = 0
    sigint: int = 0
    restarts_to_finish: int = 0
    committed_checked: int = 0  # committed rows checked, summed over kills
    leftovers: dict[str, int] = field(default_factory=dict)  # what the kills left, see kill_phase()
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0


def expected_rows(n_items: int) -> dict[tuple[str, str, int], np.ndarray]:
    return {(f"p{i:04d}", f"row {i + 2}", 0): fake_vector(f"p{i:04d}", item_text(i)) for i in range(n_items)}


def writer_command(store: Path, n_items: int, batch: int, compact_every: int, pause: float) -> list[str]:
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "writer",
        str(store),
        "--items",
        str(n_items),
        "--batch",
        str(batch),
        "--compact-every",
        str(compact_every),
        "--pause",
        str(pause),
    ]


def check_store(store: Path, committed: set[str], expected: dict) -> list[str]:
    """Return the problems found in ``store``: open, verify, committed rows intact."""
    from mmdx.store import FeatureStore
    from mmdx.store.maintenance import verify_store

    problems = []
    if not committed and not store.exists():
        return problems
    try:
        report = verify_store(store)
        problems += [f"verify: {fault}" for fault in report.faults]
        sets = FeatureStore(store).list_sets()
        if not sets:
            if committed:
                problems.append(f"no feature set, but {len(committed)} rows were committed")
            return problems
        rows = FeatureStore(store).read(sets[0].name).rows
    except Exception as exc:  # every failure to open counts, whatever its type
        return problems + [f"open: {type(exc).__name__}: {exc}"]
    stored = {key: rows.vectors[i] for i, key in enumerate(rows.keys())}
    for patient_id in committed:
        key = next((k for k in expected if k[0] == patient_id), None)
        if key not in stored:
            problems.append(f"committed row of patient {patient_id} missing")
    for key, vector in stored.items():
        if key not in expected or not np.array_equal(vector, expected[key]):
            problems.append(f"row {key} differs from the encoder's vector")
    return problems


def kill_phase(store: Path) -> str:
    """Name the step a kill interrupted, judged by the files it left (the next writer deletes them).

    A kill before the next writer opened the store counts the same leftovers
    again, so the counts are an estimate.
    """
    from mmdx.store import format as fmt

    if list(store.parent.glob(f"{store.name}.tmp-*")):
        return "compaction"
    if list(fmt.journal_dir(store).glob("*.tmp")):
        return "shard write"
    if store.exists() and any(fmt.shard_sequence(p) <= fmt.applied_through(store) for p in fmt.list_shards(store)):
        return "shard deletion after compaction"
    return "no leftovers"


def read_committed(output: bytes) -> set[str]:
    committed = set()
    for line in output.decode(errors="replace").splitlines(keepends=True):
        if line.startswith(COMMITTED + " ") and line.endswith("\n"):
            committed.update(line.split()[1:])
    return committed


def run_until_done(command: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, timeout=timeout)


def run_kill_cycles(
    workdir: Path,
    kills: int,
    n_items: int = 60,
    batch: int = 3,
    compact_every: int = 4,
    pause: float = 0.01,
    sigint_share: float = 0.2,
    seed: int = 0,
) -> KillSummary:
    """Run ``kills`` kill-check cycles on stores in ``workdir`` and compare with an uninterrupted run.

    Each store lives until its writer finishes; then a new store starts, so
    kills also hit the first commits of a fresh store.
    """
    rng = random.Random(seed)
    summary = KillSummary()
    started = time.monotonic()
    expected = expected_rows(n_items)

    reference = workdir / "reference.h5"
    startup, duration, returncode = _time_reference(writer_command(reference, n_items, batch, compact_every, pause))
    if returncode != 0:
        summary.failures.append(f"uninterrupted run failed with exit status {returncode}")
        return summary
    problems = check_store(reference, set(), expected)
    summary.failures += [f"uninterrupted run: {p}" for p in problems]

    store_index = 0
    store = workdir / f"store-{store_index}.h5"
    committed: set[str] = set()
    while summary.kills < kills:
        command = writer_command(store, n_items, batch, compact_every, pause)
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # Most kills land after the imports, where the store is touched; some before.
        time.sleep(rng.uniform(startup * 0.7, duration * 1.05))
        use_sigint = rng.random() < sigint_share
        process.send_signal(signal.SIGINT if use_sigint else signal.SIGKILL)
        try:
            output, _ = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
            summary.failures.append(f"kill {summary.kills}: writer ignored SIGINT for 60 s")
        summary.kills += 1
        summary.sigint += use_sigint
        committed |= read_committed(output)
        summary.committed_checked += len(committed)
        phase = kill_phase(store)
        summary.leftovers[phase] = summary.leftovers.get(phase, 0) + 1
        for problem in check_store(store, committed, expected):
            summary.failures.append(f"kill {summary.kills} ({'SIGINT' if use_sigint else 'SIGKILL'}): {problem}")
        if process.returncode == 0:  # the writer finished before the signal
            store_index += 1
            store, committed = workdir / f"store-{store_index}.h5", set()
            continue
        if rng.random() < 0.25 or summary.kills == kills:
            summary.failures += _finish_and_compare(store, reference, command, expected, summary)
            store_index += 1
            store, committed = workdir / f"store-{store_index}.h5", set()
    summary.seconds = time.monotonic() - started
    return summary


def _time_reference(command: list[str]) -> tuple[float, float, int]:
    """Run the writer once; return seconds to its first commit, seconds to exit, exit status."""
    begin = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    first_line = process.stdout.readline()
    startup = time.monotonic() - begin if first_line else 0.0
    process.stdout.read()
    returncode = process.wait()
    return startup, time.monotonic() - begin, returncode


def _finish_and_compare(store: Path, reference: Path, command: list[str], expected: dict, summary) -> list[str]:
    from mmdx.store import FeatureStore

    command = list(command)
    command[3] = str(store)
    done = run_until_done(command)
    summary.restarts_to_finish += 1
    if done.returncode != 0:
        return [f"{store.name}: rerun after kills failed: {done.stderr.decode()[-500:]}"]
    problems = check_store(store, set(), expected)
    ours, theirs = FeatureStore(store), FeatureStore(reference)
    name = theirs.list_sets()[0].name
    a, b = ours.read(name).rows, theirs.read(name).rows
    order_a, order_b = np.argsort([str(k) for k in a.keys()]), np.argsort([str(k) for k in b.keys()])
    if [a.keys()[i] for i in order_a] != [b.keys()[i] for i in order_b]:
        problems.append(f"{store.name}: keys differ from the uninterrupted run")
    elif not np.array_equal(a.vectors[order_a], b.vectors[order_b]):
        problems.append(f"{store.name}: vectors differ from the uninterrupted run")
    elif list(a.hashes[order_a]) != list(b.hashes[order_b]):
        problems.append(f"{store.name}: item hashes differ from the uninterrupted run")
    return problems


# The real `mmdx embed texts` command --------------------------------------------

TEXT_WORDS = ["mass", "left", "right", "lobe", "normal", "study", "scan", "edema", "no", "acute", "findings", "of", "the"]


def build_tiny_bert(folder: Path, seed: int = 0) -> Path:
    """Save a randomly initialised 2-layer BERT (hidden size 32) and its vocabulary to ``folder``."""
    import string

    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *TEXT_WORDS, *string.ascii_lowercase, *".,:"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    BertTokenizer(str(folder / "vocab.txt"), do_lower_case=True, model_max_length=64).save_pretrained(str(folder))
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(str(folder))
    return folder


def write_reports(path: Path, n_rows: int, seed: int = 0) -> Path:
    """Write a CSV of ``n_rows`` reports of 3 to 40 words, one per patient."""
    rng = random.Random(seed)
    lines = ["patient_id,text"]
    for i in range(n_rows):
        lines.append(f"p{i:04d},{' '.join(rng.choice(TEXT_WORDS) for _ in range(rng.randint(3, 40)))}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def embed_texts_command(source: Path, store: Path, model: Path, batch_size: int) -> list[str]:
    return [
        sys.executable, "-m", "mmdx", "embed", "texts", str(source), "--store", str(store),
        "--text-column", "text", "--model", str(model), "--batch-size", str(batch_size),
        "--wait", "60", "--quiet",
    ]  # fmt: skip


@dataclass
class EmbedKillSummary(KillSummary):
    """Counts of a kill session on `mmdx embed texts`, with the largest vector difference seen."""

    max_abs_difference: float = 0.0
    exact: bool = True


def run_embed_texts_kills(workdir: Path, kills: int, n_rows: int = 120, batch_size: int = 4, seed: int = 0):
    """Kill `mmdx embed texts` with a tiny BERT ``kills`` times on one store, then finish it.

    Each kill waits until the run has committed a random number of batches
    (counted as journal shards) and reads the store. It kills within 50 ms
    after that, and the rows read before the kill must survive it. Every row stored after a kill
    must equal the uninterrupted run's vector within ``TOLERANCE``.
    """
    from mmdx.store import FeatureStore
    from mmdx.store import format as fmt

    rng = random.Random(seed)
    summary = EmbedKillSummary()
    started = time.monotonic()
    model = build_tiny_bert(workdir / "tiny-bert")
    source = write_reports(workdir / "reports.csv", n_rows, seed)
    reference = workdir / "reference.h5"
    # The uninterrupted run and the final rerun run in this process, which
    # saves two slow torch imports; only the killed runs need a subprocess.
    _run_inline(embed_texts_command(source, reference, model, batch_size))
    (name,) = [info.name for info in FeatureStore(reference).list_sets()]
    expected = _vectors_by_key(reference, name)
    n_batches = -(-n_rows // batch_size)

    store = workdir / "killed.h5"
    command = embed_texts_command(source, store, model, batch_size)
    for kill in range(kills):
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        shards_before = len(fmt.list_shards(store))
        target = shards_before + rng.randint(1, max(1, n_batches // max(kills, 1)))
        while process.poll() is None and len(fmt.list_shards(store)) < target:
            time.sleep(0.005)
        seen = set(_vectors_by_key(store, name)) if process.poll() is None and _has_set(store, name) else set()
        time.sleep(rng.uniform(0, 0.05))
        use_sigint = rng.random() < 0.3
        process.send_signal(signal.SIGINT if use_sigint else signal.SIGKILL)
        _, stderr = process.communicate(timeout=120)
        summary.kills += 1
        summary.sigint += use_sigint
        summary.committed_checked += len(seen)
        label = f"embed texts kill {kill + 1} ({'SIGINT' if use_sigint else 'SIGKILL'})"
        # 130 is the CLI's own exit status on Ctrl-C; 1 and -SIGINT cover an
        # interrupt before the CLI's handler is in place.
        if use_sigint and process.returncode not in (0, 1, 130, -signal.SIGINT):
            summary.failures.append(f"{label}: exit status {process.returncode}: {stderr.decode()[-300:]}")
        summary.failures += [f"{label}: {p}" for p in _compare_embedded(store, name, expected, seen, summary)]

    _run_inline(command)
    summary.restarts_to_finish += 1
    final = _vectors_by_key(store, name)
    if set(final) != set(expected):
        summary.failures.append("final keys differ from the uninterrupted run")
    summary.failures += [f"final: {p}" for p in _compare_embedded(store, name, expected, set(expected), summary)]
    summary.seconds = time.monotonic() - started
    return summary


# Equal batches give equal bits on one machine; the tolerance only allows for
# a thread count that changes the order of float32 sums between runs.
TOLERANCE = 1e-6


def _run_inline(command: list[str]) -> None:
    """Run an ``mmdx`` command line (as built by :func:`embed_texts_command`) in this process."""
    from mmdx.cli import main

    main.main(args=command[3:], prog_name="mmdx", standalone_mode=False)


def _has_set(store: Path, name: str) -> bool:
    from mmdx.store import FeatureStore

    try:
        return any(info.name == name for info in FeatureStore(store).list_sets())
    except Exception:  # a store not yet created, or one a kill damaged; the check after the kill decides
        return False


def _vectors_by_key(store: Path, name: str) -> dict:
    from mmdx.store import FeatureStore

    rows = FeatureStore(store).read(name).rows
    return {key: rows.vectors[i] for i, key in enumerate(rows.keys())}


def _compare_embedded(store: Path, name: str, expected: dict, must_have: set, summary) -> list[str]:
    from mmdx.store.maintenance import verify_store

    if not store.exists() and not must_have:
        return []
    try:
        problems = [f"verify: {fault}" for fault in verify_store(store).faults]
        stored = _vectors_by_key(store, name) if _has_set(store, name) or must_have else {}
    except Exception as exc:  # every failure to open counts, whatever its type
        return [f"open: {type(exc).__name__}: {exc}"]
    missing = must_have - set(stored)
    if missing:
        problems.append(f"{len(missing)} committed row(s) missing, first {sorted(missing)[0]}")
    for key, vector in stored.items():
        if key not in expected:
            problems.append(f"unexpected row {key}")
            continue
        difference = float(np.max(np.abs(vector - expected[key]))) if vector.size else 0.0
        summary.max_abs_difference = max(summary.max_abs_difference, difference)
        summary.exact &= difference == 0.0
        if difference > TOLERANCE:
            problems.append(f"row {key} differs from the uninterrupted run by {difference:.3g}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    writer = sub.add_parser("writer", help="run one writer (what the harness kills)")
    writer.add_argument("store")
    writer.add_argument("--items", type=int, default=60)
    writer.add_argument("--batch", type=int, default=3)
    writer.add_argument("--compact-every", type=int, default=4, help="commits between compactions (0: only at close)")
    writer.add_argument("--pause", type=float, default=0.01, help="seconds the fake encoder sleeps per batch")
    writer.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the writer lock")
    parser.add_argument("--kills", type=int, default=300)
    parser.add_argument("--items", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="folder for the stores (a temporary folder by default)")
    parser.add_argument(
        "--embed-texts-kills", type=int, default=0, help="also kill the real `mmdx embed texts` this many times"
    )
    args = parser.parse_args(argv)

    if args.command == "writer":
        run_writer(args.store, args.items, args.batch, args.compact_every, args.pause, args.wait)
        return 0
    with tempfile.TemporaryDirectory(prefix="mmdx-kill-") as scratch:
        workdir = Path(args.workdir or scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        summary = run_kill_cycles(workdir, args.kills, n_items=args.items, seed=args.seed)
    print(
        f"kills: {summary.kills} ({summary.sigint} SIGINT, {summary.kills - summary.sigint} SIGKILL), "
        f"stores finished after kills and compared: {summary.restarts_to_finish}, "
        f"committed rows checked (summed over kills): {summary.committed_checked}, "
        f"failures: {len(summary.failures)}, "
        f"time: {summary.seconds:.1f} s"
    )
    print("  kills by the files they left: " + ", ".join(f"{k} {v}" for k, v in sorted(summary.leftovers.items())))
    for failure in summary.failures[:20]:
        print(f"  {failure}")
    failures = len(summary.failures)
    if args.embed_texts_kills:
        with tempfile.TemporaryDirectory(prefix="mmdx-kill-texts-") as scratch:
            texts = run_embed_texts_kills(Path(scratch), args.embed_texts_kills, seed=args.seed)
        print(
            f"mmdx embed texts kills: {texts.kills} ({texts.sigint} SIGINT), committed rows checked (summed): "
            f"{texts.committed_checked}, failures: {len(texts.failures)}, max |difference| from the "
            f"uninterrupted run: {texts.max_abs_difference:.3g} (exact: {texts.exact}), time: {texts.seconds:.1f} s"
        )
        for failure in texts.failures[:20]:
            print(f"  {failure}")
        failures += len(texts.failures)
    return 1 if failures else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
