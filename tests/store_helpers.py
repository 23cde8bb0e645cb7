"""Helpers shared by the store tests: deterministic rows and file hashes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from mmdx.store import FeatureStore

WIDTH = 8
CONFIG = {"weights": "test-weights-sha256", "max_length": 16}


def fake_vector(patient_id: str, item: str, view: int = 0, width: int = WIDTH) -> np.ndarray:
    """A vector that depends only on its key, so reruns reproduce it bit for bit."""
    seed = int.from_bytes(hashlib.sha256(f"{patient_id}|{item}|{view}".encode()).digest()[:8], "little")
    return np.random.default_rng(seed).standard_normal(width).astype(np.float32)


def item_hash(item: str) -> str:
    return hashlib.sha256(item.encode()).hexdigest()


def commit_rows(store: FeatureStore, header, patient_ids, items=None, views=None) -> None:
    items = items or [f"row {p}" for p in patient_ids]
    views = views or [0] * len(patient_ids)
    vectors = np.stack([fake_vector(p, i, v, header.width) for p, i, v in zip(patient_ids, items, views)])
    store.commit(header, patient_ids, items, [item_hash(i) for i in items], vectors, views)


def make_store(path: Path, patient_ids, config=CONFIG, width=WIDTH, batch=2) -> str:
    """Write a store with one text feature set, ``batch`` rows per commit; return the set name."""
    with FeatureStore(path, mode="a") as store:
        header = store.ensure_set("text", "tiny-bert", config, width)
        for start in range(0, len(patient_ids), batch):
            commit_rows(store, header, list(patient_ids[start : start + batch]))
    return header.name


def tree_digest(folder: Path) -> dict[str, str]:
    """SHA-256 of every file below ``folder``, lock files excluded (a writer may create one)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.endswith(".lock")
    }
