"""Synthetic feature stores with a known label signal, for tests and benchmarks of heads."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np

from mmdx.store.api import FeatureStore

__all__ = ["write_synthetic_store"]


def write_synthetic_store(
    store_path: str | Path,
    labels_path: str | Path,
    n_patients: int = 200,
    widths: dict[str, int] | None = None,
    signal: dict[str, float] | None = None,
    images_per_patient: int = 2,
    augmented_views: int = 0,
    seed: int = 0,
    text_config: dict | None = None,
    patient_ids: Sequence[str] | None = None,
) -> dict[str, int]:
    """Write a store with one image and one text set, and a labels CSV, for the same patients.

    Each vector is standard normal noise. For modality ``m``, the first 8
    dimensions of positive patients are shifted by ``signal[m]``, so 0 means
    the modality carries no label signal. Image rows: ``images_per_patient``
    plain rows per patient and, per image, ``augmented_views`` augmented
    views (views 1..k) that carry the same shift. Text: one row per patient.

    Returns
    -------
    dict
        Patient ID to 0/1 label, as written to ``labels_path`` (columns
        ``patient_id,label,group`` where group is ``pos``/``neg``).
    """
    widths = widths or {"image": 32, "text": 16}
    signal = {"image": 1.0, "text": 0.0, **(signal or {})}
    rng = np.random.default_rng(seed)
    ids = list(patient_ids) if patient_ids is not None else [f"P{i:05d}" for i in range(n_patients)]
    labels = {patient_id: int(rng.random() < 0.4) for patient_id in ids}
    y = np.asarray([labels[patient_id] for patient_id in ids], dtype=np.float32)

    with FeatureStore(store_path, mode="a") as store:
        if "image" in widths:
            header = store.ensure_set("image", "synthetic-image", {"seed": seed}, widths["image"])
            patients, items, views = [], [], []
            for patient_id in ids:
                for image in range(images_per_patient):
                    for view in range(augmented_views + 1):
                        patients.append(patient_id)
                        items.append(f"{patient_id}_img{image}.png")
                        views.append(view)
            shift = np.asarray([labels[patient_id] for patient_id in patients], dtype=np.float32)
            store.commit(
                header,
                patients,
                items,
                [f"hash-{item}" for item in items],
                _vectors(rng, shift, widths["image"], signal["image"]),
                views,
            )
        if "text" in widths:
            config = {"seed": seed, **(text_config or {})}
            header = store.ensure_set("text", "synthetic-text", config, widths["text"])
            store.commit(
                header,
                ids,
                ["report"] * len(ids),
                [f"hash-text-{patient_id}" for patient_id in ids],
                _vectors(rng, y, widths["text"], signal["text"]),
            )

    with open(labels_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patient_id", "label", "group"])
        for patient_id in ids:
            writer.writerow([patient_id, labels[patient_id], "pos" if labels[patient_id] else "neg"])
    return labels


def _vectors(rng: np.random.Generator, shift: np.ndarray, width: int, strength: float) -> np.ndarray:
    vectors = rng.standard_normal((len(shift), width)).astype(np.float32)
    vectors[:, : min(8, width)] += (strength * shift)[:, None]
    return vectors
