"""Patient-level stratified folds, shared by train-head, compare and per-fold fine-tuning.

The folds depend only on the labelled patients (sorted IDs and their labels),
the number of folds and the seed, never on which modalities a patient has.
So image, text and hybrid runs with the same seed use the same folds, and a
per-fold text encoder is trained on exactly the patients of that fold's
training part.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from mmdx.errors import InputError

__all__ = ["patient_folds"]


def patient_folds(labels: Mapping[str, int], n_folds: int, seed: int) -> list[tuple[list[str], list[str]]]:
    """Split labelled patients into stratified folds.

    Parameters
    ----------
    labels
        Patient ID to 0/1 label, for every labelled patient.
    n_folds
        Number of folds (at least 2).
    seed
        Seed of the shuffle; one seed gives one fixed split.

    Returns
    -------
    list of (train_ids, test_ids)
        One pair per fold; each patient is in exactly one test part.
    """
    from sklearn.model_selection import StratifiedKFold

    ids = sorted(labels)
    y = np.asarray([labels[i] for i in ids], dtype=int)
    if n_folds < 2:
        raise InputError(f"--folds must be at least 2, got {n_folds}")
    smallest = int(min(np.sum(y == 0), np.sum(y == 1)))
    if smallest < n_folds:
        raise InputError(
            f"--folds {n_folds} needs at least {n_folds} patients of each class, "
            f"but the smaller class has {smallest}; lower --folds"
        )
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    ids_array = np.asarray(ids, dtype=object)
    return [
        (ids_array[train].tolist(), ids_array[test].tolist())
        for train, test in splitter.split(np.zeros(len(ids)), y)
    ]
