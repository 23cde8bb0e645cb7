"""Tests for confidence intervals, DeLong's test and the paired bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mmdx.train.stats import delong_auc_variance, delong_test, paired_bootstrap, roc_auc, t_interval


def _scores(n=200, seed=0, noise=1.0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    good = y + rng.normal(scale=noise, size=n)
    return y, good, rng


def test_roc_auc_matches_sklearn_with_ties():
    y, good, _ = _scores()
    tied = np.round(good, 1)

    assert roc_auc(y, tied) == pytest.approx(roc_auc_score(y, tied))


def test_roc_auc_batched_rows():
    y, good, rng = _scores()
    rows = np.vstack([good, rng.normal(size=y.size)])

    batched = roc_auc(y, rows)

    assert batched[0] == pytest.approx(roc_auc_score(y, rows[0]))
    assert batched[1] == pytest.approx(roc_auc_score(y, rows[1]))


def test_roc_auc_one_class_is_nan():
    assert np.isnan(roc_auc(np.ones(5, dtype=int), np.arange(5.0)))


def test_delong_variance_hand_example():
    # Positives 0.8, 0.6, 0.4 and negatives 0.5, 0.3. Per positive, the share
    # of negatives it outranks is V10 = (1, 1, 0.5); per negative, the share of
    # positives above it is V01 = (2/3, 1). AUC = mean(V10) = 5/6 and
    # var = var(V10)/3 + var(V01)/2 = (1/12)/3 + (1/18)/2 = 1/18.
    y = np.array([1, 1, 1, 0, 0])
    scores = np.array([0.8, 0.6, 0.4, 0.5, 0.3])

    auc, variance = delong_auc_variance(y, scores)

    assert auc == pytest.approx(5 / 6)
    assert variance == pytest.approx(1 / 18)


def test_delong_identical_predictions():
    y, good, _ = _scores()

    result = delong_test(y, good, good)

    assert result.difference == 0.0
    assert result.p_value == pytest.approx(1.0)


def test_delong_clearly_better_predictor():
    y, good, rng = _scores(n=300, noise=0.5)
    worse = good + rng.normal(scale=2.0, size=y.size)

    result = delong_test(y, good, worse)

    assert result.difference > 0.1
    assert result.p_value < 0.001
    assert result.ci_low > 0


def test_bootstrap_identical_predictions():
    y, good, _ = _scores()

    result = paired_bootstrap(y, good, good, n_resamples=300)

    assert result.difference == 0.0
    assert result.p_value == pytest.approx(1.0)
    assert result.ci_low == 0.0 and result.ci_high == 0.0


def test_bootstrap_clearly_better_predictor():
    y, good, rng = _scores(n=300, noise=0.5)
    worse = good + rng.normal(scale=2.0, size=y.size)

    result = paired_bootstrap(y, good, worse, n_resamples=500)

    assert result.difference > 0.1
    assert result.p_value < 0.01
    assert result.ci_low > 0


def test_bootstrap_averages_repeats():
    y, good, rng = _scores()
    worse = good + rng.normal(scale=2.0, size=y.size)
    a = np.vstack([good, worse])
    b = np.vstack([worse, worse])

    result = paired_bootstrap(y, a, b, n_resamples=200)

    expected = (roc_auc(y, good) - roc_auc(y, worse)) / 2
    assert result.difference == pytest.approx(expected)


def test_bootstrap_rejects_mismatched_shapes():
    y, good, _ = _scores()

    with pytest.raises(ValueError, match="shape"):
        paired_bootstrap(y, good, good[:-1])


def test_t_interval_known_values():
    # mean 0.6, sd 0.1, n 3: half width = t(0.975, 2) * 0.1 / sqrt(3) = 4.3027 * 0.057735
    mean, low, high = t_interval([0.5, 0.6, 0.7])

    assert mean == pytest.approx(0.6)
    assert high - mean == pytest.approx(4.302653 * 0.1 / np.sqrt(3), rel=1e-5)
    assert mean - low == pytest.approx(high - mean)


def test_t_interval_ignores_nan_and_single_value():
    assert t_interval([0.7, float("nan")]) == (0.7, 0.7, 0.7)
