"""Confidence intervals and paired tests for comparing heads on the same patients.

Three tools, all on out-of-fold predictions keyed by the same patients:

- :func:`t_interval`: mean and t-based confidence interval of a metric over
  folds and repeats.
- :func:`paired_bootstrap`: resample patients with replacement and recompute
  a metric for two sets of predictions on the same resample, so that the
  difference keeps the pairing. With several repeats the difference is
  averaged over repeats inside each resample.
- :func:`delong_test`: DeLong's asymptotic test for two correlated ROC AUCs,
  computed with midranks (Sun and Xu, "Fast implementation of DeLong's
  algorithm for comparing the areas under correlated receiver operating
  characteristic curves", IEEE Signal Processing Letters 21(11), 2014).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np

__all__ = [
    "PairedResult",
    "delong_auc_variance",
    "delong_test",
    "paired_bootstrap",
    "roc_auc",
    "t_interval",
]


@dataclass
class PairedResult:
    """The difference ``a - b`` of one metric between two heads, with its interval and p-value."""

    method: str
    metric: str
    value_a: float
    value_b: float
    difference: float
    ci_low: float
    ci_high: float
    p_value: float
    n_patients: int

    def to_dict(self) -> dict:
        return asdict(self)


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Return the mean and the Student-t confidence interval of ``values``.

    The interval treats the values (one per fold and repeat) as independent,
    which they are not quite: folds of one repeat share training patients, so
    the interval is somewhat too narrow. NaN values are dropped. With one
    value the interval is ``(mean, mean)``.
    """
    from scipy import stats

    array = np.asarray(values, dtype=float)
    array = array[np.isfinite(array)]
    if array.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(array.mean())
    if array.size == 1:
        return mean, mean, mean
    half = float(stats.t.ppf(0.5 + confidence / 2, df=array.size - 1) * array.std(ddof=1) / math.sqrt(array.size))
    return mean, mean - half, mean + half


def _midranks(values: np.ndarray) -> np.ndarray:
    """Rank along the last axis (1-based), giving tied values the mean of their ranks."""
    order = np.argsort(values, axis=-1, kind="mergesort")
    sorted_values = np.take_along_axis(values, order, axis=-1)
    n = values.shape[-1]
    ranks_sorted = np.empty(values.shape, dtype=float)
    flat_sorted = sorted_values.reshape(-1, n)
    flat_ranks = ranks_sorted.reshape(-1, n)
    for row, out in zip(flat_sorted, flat_ranks):
        # Each run of equal values gets the mean of the 1-based ranks it spans.
        starts = np.flatnonzero(np.r_[True, row[1:] != row[:-1]])
        ends = np.r_[starts[1:], n]
        out[:] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    ranks = np.empty(values.shape, dtype=float)
    np.put_along_axis(ranks, order, ranks_sorted, axis=-1)
    return ranks


def roc_auc(y: np.ndarray, scores: np.ndarray) -> np.ndarray | float:
    """ROC AUC from ranks (the Mann-Whitney statistic), NaN when one class is absent.

    ``y`` and ``scores`` may carry leading batch axes (for example one row per
    bootstrap resample); the AUC is computed along the last axis.
    """
    y = np.asarray(y, dtype=bool)
    scores = np.asarray(scores, dtype=float)
    y = np.broadcast_to(y, scores.shape)
    n_pos = y.sum(axis=-1)
    n_neg = y.shape[-1] - n_pos
    ranks = _midranks(scores)
    rank_sum = np.where(y, ranks, 0.0).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    auc = np.where((n_pos == 0) | (n_neg == 0), np.nan, auc)
    return float(auc) if np.ndim(auc) == 0 else auc


def _delong_components(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return the AUCs and the structural components V10 (positives) and V01 (negatives).

    ``scores`` has shape (k, n): k predictors on the same n patients.
    """
    positives = scores[:, y]
    negatives = scores[:, ~y]
    m, n = positives.shape[1], negatives.shape[1]
    rank_all = _midranks(np.concatenate([positives, negatives], axis=1))
    rank_pos = _midranks(positives)
    rank_neg = _midranks(negatives)
    aucs = (rank_all[:, :m].sum(axis=1) - m * (m + 1) / 2.0) / (m * n)
    v10 = (rank_all[:, :m] - rank_pos) / n
    v01 = 1.0 - (rank_all[:, m:] - rank_neg) / m
    return aucs, v10, v01


def _check_binary(y: np.ndarray) -> np.ndarray:
    y = np.asarray(y)
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    y = y.astype(bool)
    if y.all() or not y.any():
        raise ValueError("labels must contain both classes")
    return y


def delong_auc_variance(y: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Return the ROC AUC of ``scores`` and DeLong's estimate of its variance."""
    y = _check_binary(y)
    aucs, v10, v01 = _delong_components(y, np.asarray(scores, dtype=float)[None, :])
    variance = np.var(v10[0], ddof=1) / v10.shape[1] + np.var(v01[0], ddof=1) / v01.shape[1]
    return float(aucs[0]), float(variance)


def delong_test(y: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray, confidence: float = 0.95) -> PairedResult:
    """Compare the ROC AUCs of two predictors on the same patients (DeLong's test, two-sided).

    Returns the AUC difference ``a - b`` with its normal-approximation
    confidence interval and p-value. Identical predictors give difference 0
    and p-value 1.
    """
    from scipy import stats

    y = _check_binary(y)
    scores = np.vstack([np.asarray(scores_a, dtype=float), np.asarray(scores_b, dtype=float)])
    aucs, v10, v01 = _delong_components(y, scores)
    covariance = np.cov(v10) / v10.shape[1] + np.cov(v01) / v01.shape[1]
    difference = float(aucs[0] - aucs[1])
    variance = float(covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1])
    if variance <= 1e-15:
        # The two predictors rank every positive-negative pair alike.
        p_value, half = 1.0, 0.0
    else:
        z = difference / math.sqrt(variance)
        p_value = float(2 * stats.norm.sf(abs(z)))
        half = float(stats.norm.ppf(0.5 + confidence / 2) * math.sqrt(variance))
    return PairedResult(
        "delong", "roc_auc", float(aucs[0]), float(aucs[1]), difference,
        difference - half, difference + half, p_value, int(y.size),
    )


def paired_bootstrap(
    y: np.ndarray,
    scores_a: np.ndarray,
    scores_b: np.ndarray,
    metric: Callable[[np.ndarray, np.ndarray], np.ndarray | float] = roc_auc,
    metric_name: str = "roc_auc",
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedResult:
    """Compare two predictors by resampling patients with replacement (two-sided).

    Parameters
    ----------
    y
        0/1 labels, one per patient.
    scores_a, scores_b
        Predictions of the two heads, shape (n,) or (repeats, n): one row of
        out-of-fold predictions per repeat, columns in the order of ``y``.
    metric
        ``metric(y, scores)`` computed along the last axis; the default is
        :func:`roc_auc`, which accepts batched rows.
    n_resamples
        Number of bootstrap resamples.

    Returns
    -------
    PairedResult
        ``difference`` is the metric of ``a`` minus that of ``b`` on all
        patients, averaged over repeats. The interval is the percentile
        interval of the resampled differences. The p-value is twice the
        smaller share of resampled differences on either side of zero (a
        difference of exactly zero counts half to each side, and one is
        added to the count and to the number of resamples), capped at 1.
    """
    y = np.asarray(y).astype(int)
    a = np.atleast_2d(np.asarray(scores_a, dtype=float))
    b = np.atleast_2d(np.asarray(scores_b, dtype=float))
    if a.shape != b.shape or a.shape[1] != y.size:
        raise ValueError(f"scores must have shape (repeats, {y.size}) alike, got {a.shape} and {b.shape}")
    value_a = float(np.nanmean([metric(y, row) for row in a]))
    value_b = float(np.nanmean([metric(y, row) for row in b]))

    rng = np.random.default_rng(seed)
    differences = np.empty(n_resamples)
    chunk = 250
    for start in range(0, n_resamples, chunk):
        size = min(chunk, n_resamples - start)
        index = rng.integers(0, y.size, size=(size, y.size))
        y_boot = y[index]
        per_repeat = [np.asarray(metric(y_boot, row[index])) - np.asarray(metric(y_boot, other[index]))
                      for row, other in zip(a, b)]
        differences[start:start + size] = np.mean(per_repeat, axis=0)
    # Resamples holding one class only give NaN for rank metrics and are left out.
    differences = differences[np.isfinite(differences)]

    alpha = 1 - confidence
    low, high = np.quantile(differences, [alpha / 2, 1 - alpha / 2])
    ties = 0.5 * np.sum(differences == 0)
    below = np.sum(differences < 0) + ties
    above = np.sum(differences > 0) + ties
    # Add-one counts keep the p-value above 0: B resamples cannot resolve p below 1 / (B + 1).
    p_value = float(min(1.0, 2 * (min(below, above) + 1) / (differences.size + 1)))
    return PairedResult(
        "paired_bootstrap", metric_name, value_a, value_b, value_a - value_b,
        float(low), float(high), p_value, int(y.size),
    )
