"""Real kills of store writers, and readers running while a writer commits and compacts.

The kill harness lives in ``benchmarks/kill_store.py``, which runs the same
cycles a few hundred times; here a few dozen keep the suite fast.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mmdx.store import FeatureStore
from mmdx.store.format import list_shards

REPO_ROOT = Path(__file__).resolve().parents[1]


def load_harness():
    spec = importlib.util.spec_from_file_location("kill_store", REPO_ROOT / "benchmarks" / "kill_store.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


harness = load_harness()


def test_killed_writer_keeps_committed_rows(tmp_path):
    summary = harness.run_kill_cycles(tmp_path, kills=12, n_items=36, batch=3, compact_every=3, seed=1)

    assert summary.failures == []
    assert summary.kills == 12
    assert summary.restarts_to_finish >= 1
    assert summary.committed_checked > 0


def test_harness_catches_lost_rows(tmp_path):
    # The check must fail on a store that lost a row the writer reported as committed.
    store = tmp_path / "s.h5"
    done = subprocess.run(harness.writer_command(store, 6, 3, 0, 0.0), capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    expected = harness.expected_rows(6)
    assert harness.check_store(store, {"p0000", "p0005"}, expected) == []

    with FeatureStore(store, mode="a") as writer:
        writer.remove_set(writer.list_sets()[0].name)
    problems = harness.check_store(store, {"p0000"}, expected)
    assert problems == ["no feature set, but 1 rows were committed"]


def test_reader_sees_growing_rows_during_writes(tmp_path):
    store = tmp_path / "s.h5"
    n_items = 60
    writer = subprocess.Popen(
        harness.writer_command(store, n_items, batch=2, compact_every=2, pause=0.005),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    expected = harness.expected_rows(n_items)
    counts, reads = [0], 0
    try:
        while writer.poll() is None or reads == 0:
            if not list_shards(store) and not store.exists():  # nothing committed yet
                time.sleep(0.005)
                continue
            sets = FeatureStore(store).list_sets()
            if not sets:
                time.sleep(0.005)
                continue
            rows = FeatureStore(store).read(sets[0].name).rows
            reads += 1
            assert len(rows) >= counts[-1]
            counts.append(len(rows))
            for i, key in enumerate(rows.keys()):
                assert np.array_equal(rows.vectors[i], expected[key]), key
    finally:
        writer.kill()
        _, stderr = writer.communicate()
    assert writer.returncode == 0, stderr.decode()[-500:]
    assert counts[-1] <= n_items
    assert len(FeatureStore(store).read(sets[0].name).rows) == n_items
    assert len(set(counts)) > 2  # the reads saw the store at several sizes


@pytest.mark.slow
def test_killed_embed_texts_matches_uninterrupted(tmp_path):
    summary = harness.run_embed_texts_kills(tmp_path, kills=2, n_rows=60, batch_size=4, seed=3)

    assert summary.failures == []
    assert summary.kills == 2
    assert summary.max_abs_difference <= harness.TOLERANCE
