"""Fold assignment and fold metrics computed with NumPy, checked against scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn import metrics
from sklearn.model_selection import StratifiedKFold

from mmdx.train.cv import binary_metrics
from mmdx.train.folds import patient_folds, stratified_fold_numbers


@pytest.mark.parametrize("n_samples", [24, 37, 268, 1001])
@pytest.mark.parametrize("n_folds", [2, 5, 10])
@pytest.mark.parametrize("seed", [0, 1, 42, 2**31 - 1])
@pytest.mark.parametrize("positive_share", [0.5, 0.2, 0.92])
def test_fold_numbers_equal_stratified_kfold(n_samples, n_folds, seed, positive_share):
    rng = np.random.default_rng(n_samples + seed)
    y = (rng.random(n_samples) < positive_share).astype(int)
    # At least n_folds samples of each class, placed at random positions.
    places = rng.permutation(n_samples)[: 2 * n_folds]
    y[places[:n_folds]] = 0
    y[places[n_folds:]] = 1
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    expected = np.empty(n_samples, dtype=int)
    for k, (_, test) in enumerate(splitter.split(np.zeros(n_samples), y)):
        expected[test] = k

    fold_of = stratified_fold_numbers(y, n_folds, seed)

    assert np.array_equal(fold_of, expected)


def test_fold_numbers_ignore_label_values():
    # The first sample's class is numbered first, whatever its value, so a
    # split of [1, 0, ...] and of its flipped labels draws the same shuffles.
    y = np.array([1, 0, 0, 1, 1, 0, 1, 0, 0, 1, 1, 0])

    assert np.array_equal(stratified_fold_numbers(y, 3, 7), stratified_fold_numbers(1 - y, 3, 7))


def test_patient_folds_match_sklearn_split():
    labels = {f"P{index:03d}": int(index % 3 == 0) for index in range(60)}
    ids = sorted(labels)
    y = np.array([labels[patient_id] for patient_id in ids])
    splitter = StratifiedKFold(n_splits=4, shuffle=True, random_state=3)
    expected = [([ids[i] for i in train], [ids[i] for i in test]) for train, test in splitter.split(np.zeros(60), y)]

    assert patient_folds(labels, 4, 3) == expected


def sklearn_metrics(y, probability, threshold=0.5):
    prediction = (probability >= threshold).astype(int)
    both = len(np.unique(y)) == 2
    return {
        "accuracy": metrics.accuracy_score(y, prediction),
        "precision": metrics.precision_score(y, prediction, zero_division=0),
        "recall": metrics.recall_score(y, prediction, zero_division=0),
        "f1": metrics.f1_score(y, prediction, zero_division=0),
        "roc_auc": metrics.roc_auc_score(y, probability) if both else math.nan,
        "balanced_accuracy": metrics.balanced_accuracy_score(y, prediction) if both else math.nan,
    }


@pytest.mark.parametrize("case", range(40))
def test_binary_metrics_equal_sklearn(case):
    rng = np.random.default_rng(case)
    n = int(rng.integers(2, 200))
    y = (rng.random(n) < rng.uniform(0.05, 0.95)).astype(int)
    # Scores rounded to a few levels make ties, and some cases predict one class only.
    probability = np.round(rng.random(n).astype(np.float32), int(rng.integers(1, 4))) * rng.choice([1.0, 0.4])
    expected = sklearn_metrics(y, probability)

    got = binary_metrics(y, probability)

    assert set(got) == set(expected)
    for name, value in expected.items():
        if math.isnan(value):
            assert math.isnan(got[name]), name
        else:
            assert got[name] == pytest.approx(value, abs=1e-12), name


@pytest.mark.parametrize(
    "y, probability",
    [
        (np.array([1, 1, 1]), np.array([0.2, 0.7, 0.9])),  # one class: AUC and balanced accuracy undefined
        (np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.4])),  # nothing predicted positive
        (np.array([0, 1, 0, 1]), np.full(4, 0.5)),  # all tied at the threshold
    ],
)
def test_binary_metrics_edge_cases_equal_sklearn(y, probability):
    expected = sklearn_metrics(y, probability)

    got = binary_metrics(y, probability)

    for name, value in expected.items():
        if math.isnan(value):
            assert math.isnan(got[name]), name
        else:
            assert got[name] == pytest.approx(value, abs=1e-12), name
