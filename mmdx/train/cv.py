"""Patient-level cross-validation of a head over :class:`~mmdx.train.data.PatientData`.

The folds come from :func:`~mmdx.train.folds.patient_folds` over every
labelled patient, then each fold keeps the patients that have vectors for the
modalities in use. So image, text and hybrid runs with one seed test each
patient in the same fold, and a patient is never in the training and test
part of one fold.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import sys
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from mmdx.errors import InputError
from mmdx.train.data import PatientData
from mmdx.train.folds import patient_folds
from mmdx.train.heads import HeadFactory
from mmdx.train.stats import roc_auc

__all__ = [
    "METRIC_NAMES",
    "THRESHOLD",
    "CVResult",
    "binary_metrics",
    "cross_validate",
    "restricted_folds",
    "summarize",
]

logger = logging.getLogger(__name__)

METRIC_NAMES = ("accuracy", "precision", "recall", "f1", "roc_auc", "balanced_accuracy")
THRESHOLD = 0.5


@dataclass
class CVResult:
    """Out-of-fold predictions and metrics of one cross-validation.

    Attributes
    ----------
    predictions
        Column name to array, one entry per (repeat, patient): ``patient_id``,
        ``label``, ``probability``, ``prediction``, ``fold``, ``repeat``.
    fold_metrics
        One dict per (repeat, fold): ``repeat``, ``fold``, ``n_train``
        (patients), ``n_train_rows`` (rows incl. augmented views), ``n_test``
        and every name in :data:`METRIC_NAMES`.
    metrics
        Metric name to ``{"mean": ..., "std": ...}`` over all folds and repeats.
    """

    predictions: dict[str, np.ndarray]
    fold_metrics: list[dict] = field(default_factory=list)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)


def binary_metrics(y: np.ndarray, probability: np.ndarray, threshold: float = THRESHOLD) -> dict[str, float]:
    """Compute the metrics of :data:`METRIC_NAMES` for one test part.

    ROC AUC and balanced accuracy are NaN when the test part has one class
    only. Precision, recall and F1 are 0 where undefined (no predicted or no
    actual positives). Computed with NumPy, equal to scikit-learn's metric
    functions (tested), so that train-head does not pay the 0.8 s import of
    scikit-learn.
    """
    y = np.asarray(y, dtype=int)
    probability = np.asarray(probability, dtype=np.float64)
    prediction = (probability >= threshold).astype(int)
    both_classes = len(np.unique(y)) == 2
    true_positive = int(np.sum((prediction == 1) & (y == 1)))
    predicted_positive = int(np.sum(prediction == 1))
    actual_positive = int(np.sum(y == 1))
    precision = true_positive / predicted_positive if predicted_positive else 0.0
    recall = true_positive / actual_positive if actual_positive else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    if both_classes:
        specificity = float(np.mean(prediction[y == 0] == 0))
        balanced_accuracy = (recall + specificity) / 2
        auc = roc_auc(y, probability)  # midranks, equal to sklearn's roc_auc_score (tested)
    else:
        balanced_accuracy = auc = math.nan
    return {
        "accuracy": float(np.mean(prediction == y)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "roc_auc": float(auc),
        "balanced_accuracy": float(balanced_accuracy),
    }


def summarize(fold_metrics: list[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Return mean and sample standard deviation (ddof 1) of each metric over folds and repeats.

    NaN values (ROC AUC of a one-class fold) are left out; the std of a single
    value is 0.
    """
    summary = {}
    for name in METRIC_NAMES:
        values = np.asarray([fold[name] for fold in fold_metrics], dtype=float)
        values = values[~np.isnan(values)]
        if len(values) == 0:
            summary[name] = {"mean": math.nan, "std": math.nan}
        else:
            std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
            summary[name] = {"mean": float(np.mean(values)), "std": std}
    return summary


def restricted_folds(data: PatientData, n_folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Return ``(train_index, test_index)`` per fold, as positions in ``data.patient_ids``.

    The folds split every labelled patient (``data.labels``); each fold then
    keeps the patients present in ``data``. Patients of one group in
    ``data.fold_groups`` share a fold.
    """
    folds = []
    present = set(data.patient_ids.tolist())
    for k, (train_ids, test_ids) in enumerate(patient_folds(data.labels, n_folds, seed, data.fold_groups)):
        train = data.index_of([patient_id for patient_id in train_ids if patient_id in present])
        test = data.index_of([patient_id for patient_id in test_ids if patient_id in present])
        if len(test) == 0 or len(train) == 0:
            raise InputError(
                f"fold {k} (seed {seed}) has {len(train)} training and {len(test)} test patients with "
                f"{' and '.join(data.modalities)} vectors; lower --folds or embed more patients"
            )
        if len(np.unique(data.y[train])) < 2:
            raise InputError(
                f"fold {k} (seed {seed}) has training patients of one class only; lower --folds"
            )
        folds.append((np.sort(train), np.sort(test)))
    return folds


def cross_validate(
    data: PatientData,
    head_factory: HeadFactory,
    n_folds: int = 5,
    seed: int = 0,
    repeats: int = 1,
    threshold: float = THRESHOLD,
    on_fold_done: Callable[[dict], None] | None = None,
    n_jobs: int = 1,
) -> CVResult:
    """Train a fresh head per fold and collect out-of-fold predictions.

    Parameters
    ----------
    data
        Per-patient inputs from :func:`~mmdx.train.data.load_patient_data`.
    head_factory
        Called with ``data.widths`` once per fold; returns an untrained head
        with ``fit(x_by_modality, y, rng)`` and ``predict_proba(x_by_modality)``.
    n_folds, seed, repeats
        Repeat ``r`` splits with seed ``seed + r``. The head of fold ``k`` in
        repeat ``r`` gets ``numpy.random.default_rng([seed + r, k])``.
    threshold
        Probability at or above which a patient is predicted positive.
    on_fold_done
        Called with each fold's metrics dict as soon as it is known (progress).
    n_jobs
        Folds trained at once, in forked worker processes that share ``data``
        with this process. The results do not depend on it. Where ``fork``
        is not available (Windows, or macOS where it is unsafe) folds run one
        after another.

    Returns
    -------
    CVResult
    """
    if repeats < 1:
        raise InputError(f"--repeats must be at least 1, got {repeats}")
    tasks = []
    for repeat in range(repeats):
        for k, (train, test) in enumerate(restricted_folds(data, n_folds, seed + repeat)):
            tasks.append((repeat, k, train, test))

    global _SHARED
    _SHARED = (data, head_factory, seed, threshold, tasks)
    try:
        outcomes = []
        for record, probability in _map_tasks(len(tasks), n_jobs):
            logger.info(
                "repeat %d fold %d: %s",
                record["repeat"],
                record["fold"],
                {name: round(record[name], 4) for name in METRIC_NAMES},
            )
            if on_fold_done is not None:
                on_fold_done(record)
            outcomes.append((record, probability))
    finally:
        _SHARED = None

    columns: dict[str, list] = {name: [] for name in ("patient_id", "label", "probability", "fold", "repeat")}
    for (repeat, k, _, test), (_, probability) in zip(tasks, outcomes):
        columns["patient_id"].extend(data.patient_ids[test].tolist())
        columns["label"].append(data.y[test])
        columns["probability"].append(probability)
        columns["fold"].append(np.full(len(test), k))
        columns["repeat"].append(np.full(len(test), repeat))
    predictions = {
        "patient_id": np.asarray(columns["patient_id"], dtype=object),
        **{name: np.concatenate(columns[name]) for name in ("label", "probability", "fold", "repeat")},
    }
    predictions["prediction"] = (predictions["probability"] >= threshold).astype(np.int64)
    fold_metrics = [record for record, _ in outcomes]
    return CVResult(predictions, fold_metrics, summarize(fold_metrics))


# State shared with the fold workers. Forked workers inherit it, so neither the data
# nor the head factory (often a closure) has to be pickled.
_SHARED: tuple | None = None


def _map_tasks(n_tasks: int, n_jobs: int):
    """Yield ``_run_task(i)`` for every task in order, in worker processes when ``n_jobs`` > 1."""
    n_jobs = min(int(n_jobs), n_tasks)
    if n_jobs > 1 and sys.platform.startswith("linux"):
        context = multiprocessing.get_context("fork")
        with context.Pool(n_jobs) as pool:
            yield from pool.imap(_run_task, range(n_tasks))
        return
    for index in range(n_tasks):
        yield _run_task(index)


def _run_task(index: int) -> tuple[dict, np.ndarray]:
    """Train and test the head of one (repeat, fold)."""
    data, head_factory, seed, threshold, tasks = _SHARED
    repeat, k, train, test = tasks[index]
    x_train, y_train = data.training_rows(train, fold=k)
    x_test, y_test = data.test_rows(test, fold=k)
    head = head_factory(data.widths)
    head.fit(x_train, y_train, np.random.default_rng([seed + repeat, k]))
    probability = np.asarray(head.predict_proba(x_test), dtype=np.float32)
    record = {
        "repeat": repeat,
        "fold": k,
        "n_train": int(len(train)),
        "n_train_rows": int(len(y_train)),
        "n_test": int(len(test)),
        **binary_metrics(y_test, probability, threshold),
    }
    return record, probability
