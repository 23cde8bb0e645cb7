"""Tests of the NumPy head: gradients, Adam, initialisation and learning."""

from __future__ import annotations

import numpy as np
import pytest

from mmdx.train.heads import ConcatHead, Standardized, adam_step, glorot_uniform


def reference_loss(weights: dict, x: dict, y: np.ndarray) -> float:
    """Mean binary cross-entropy of the concatenation head, computed in float64 from scratch."""
    hidden = []
    for name in x:
        z = x[name].astype(np.float64) @ weights[f"{name}/kernel"] + weights[f"{name}/bias"]
        hidden.append(np.maximum(z, 0.0))
    logits = np.concatenate(hidden, axis=1) @ weights["output/kernel"][:, 0] + weights["output/bias"][0]
    p = 1.0 / (1.0 + np.exp(-logits))
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


@pytest.mark.parametrize("widths", [{"image": 7}, {"image": 7, "text": 5}])
def test_head_gradient_matches_finite_differences(widths):
    rng = np.random.default_rng(1)
    head = ConcatHead(widths, hidden_units=6)
    head.initialize(rng)
    # Non-zero biases make every parameter's gradient informative.
    for key, value in head.params.items():
        if key.endswith("bias"):
            value[:] = rng.normal(0, 0.3, value.shape)
    x = {name: rng.standard_normal((9, width)).astype(np.float32) for name, width in widths.items()}
    y = (rng.random(9) < 0.5).astype(np.float32)

    _, grads = head.loss_and_gradients(x, y)
    analytic = head._views(grads)

    weights = {key: value.astype(np.float64) for key, value in head.get_weights().items()}
    step = 1e-6
    for key, value in weights.items():
        numeric = np.zeros_like(value)
        for position in np.ndindex(value.shape):
            original = value[position]
            value[position] = original + step
            upper = reference_loss(weights, x, y)
            value[position] = original - step
            lower = reference_loss(weights, x, y)
            value[position] = original
            numeric[position] = (upper - lower) / (2 * step)
        np.testing.assert_allclose(analytic[key], numeric, rtol=1e-3, atol=1e-5, err_msg=key)


def test_head_loss_matches_reference():
    rng = np.random.default_rng(2)
    head = ConcatHead({"image": 4, "text": 3}, hidden_units=5)
    head.initialize(rng)
    x = {"image": rng.standard_normal((6, 4)).astype(np.float32), "text": rng.standard_normal((6, 3)).astype(np.float32)}
    y = np.asarray([0, 1, 1, 0, 1, 0], dtype=np.float32)
    loss, _ = head.loss_and_gradients(x, y)
    assert loss == pytest.approx(reference_loss(head.get_weights(), x, y), rel=1e-5)


def test_adam_step_matches_keras_formula():
    rng = np.random.default_rng(3)
    params = rng.standard_normal(50).astype(np.float32)
    expected = params.astype(np.float64).copy()
    m = np.zeros(50, np.float32)
    v = np.zeros(50, np.float32)
    m_ref = np.zeros(50)
    v_ref = np.zeros(50)
    for step in range(1, 6):
        grads = rng.standard_normal(50).astype(np.float32)
        # keras.optimizers.Adam.update_step in Keras 3.
        alpha = 1e-3 * np.sqrt(1 - 0.999**step) / (1 - 0.9**step)
        m_ref += (grads - m_ref) * (1 - 0.9)
        v_ref += (grads.astype(np.float64) ** 2 - v_ref) * (1 - 0.999)
        expected -= m_ref * alpha / (np.sqrt(v_ref) + 1e-7)
        adam_step(params, grads.copy(), m, v, step, 1e-3)
    np.testing.assert_allclose(params, expected, rtol=1e-5, atol=1e-7)


def test_glorot_uniform_limit_and_spread():
    kernel = glorot_uniform(np.random.default_rng(0), 300, 100)
    limit = np.sqrt(6 / 400)
    assert kernel.dtype == np.float32
    assert np.abs(kernel).max() <= limit
    assert np.abs(kernel).max() > 0.95 * limit
    assert abs(float(kernel.mean())) < 0.01


def test_head_initial_biases_zero():
    head = ConcatHead({"image": 10, "text": 4})
    head.initialize(np.random.default_rng(0))
    assert head.params["output/kernel"].shape == (256, 1)
    assert head.params["image/kernel"].shape == (10, 128)
    for key in ("image/bias", "text/bias", "output/bias"):
        assert not head.params[key].any(), key


def test_head_fit_is_deterministic_per_seed():
    rng = np.random.default_rng(4)
    x = {"image": rng.standard_normal((100, 6)).astype(np.float32)}
    y = (x["image"][:, 0] > 0).astype(np.float32)
    first = ConcatHead({"image": 6}, epochs=2).fit(x, y, np.random.default_rng(9)).predict_proba(x)
    second = ConcatHead({"image": 6}, epochs=2).fit(x, y, np.random.default_rng(9)).predict_proba(x)
    third = ConcatHead({"image": 6}, epochs=2).fit(x, y, np.random.default_rng(10)).predict_proba(x)
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, third)


def reference_fit(head: ConcatHead, x: dict, y: np.ndarray, rng: np.random.Generator) -> None:
    """Train ``head`` the plain way: gather each batch, call loss_and_gradients, then adam_step."""
    head.initialize(rng)
    m = np.zeros_like(head._flat)
    v = np.zeros_like(head._flat)
    step = 0
    for order in head.epoch_orders(len(y), rng):
        for start in range(0, len(y), head.batch_size):
            index = order[start : start + head.batch_size]
            _, grads = head.loss_and_gradients({name: x[name][index] for name in head.widths}, y[index])
            step += 1
            adam_step(head._flat, grads, m, v, step, head.learning_rate)


@pytest.mark.parametrize("widths", [{"image": 40}, {"image": 40, "text": 24}])
def test_fit_matches_plain_training_loop_bit_for_bit(widths):
    # 203 rows: the last batch of each epoch is a partial one (11 rows).
    rng = np.random.default_rng(5)
    x = {name: rng.standard_normal((203, width)).astype(np.float32) for name, width in widths.items()}
    y = (x["image"][:, 0] + rng.normal(0, 0.5, 203) > 0).astype(np.float32)
    fast = ConcatHead(widths, epochs=3, hidden_units=16).fit(x, y, np.random.default_rng([0, 1]))
    plain = ConcatHead(widths, epochs=3, hidden_units=16)
    reference_fit(plain, x, y, np.random.default_rng([0, 1]))
    for key, value in plain.params.items():
        np.testing.assert_array_equal(fast.params[key], value, err_msg=key)
    np.testing.assert_array_equal(fast.predict_proba(x), plain.predict_proba(x))


def test_head_learns_separable_data():
    rng = np.random.default_rng(5)
    x = {"image": rng.standard_normal((400, 10)).astype(np.float32)}
    y = (x["image"][:, 0] + x["image"][:, 1] > 0).astype(np.float32)
    head = ConcatHead({"image": 10}, epochs=20).fit(x, y, np.random.default_rng(0))
    probability = head.predict_proba(x)
    assert probability.dtype == np.float32
    assert probability.shape == (400,)
    assert np.mean((probability >= 0.5) == y) > 0.95


def test_head_rejects_wrong_width():
    head = ConcatHead({"image": 10})
    with pytest.raises(ValueError, match=r"shape \(n, 10\)"):
        head.predict_proba({"image": np.zeros((3, 9), np.float32)})


def test_standardized_uses_training_statistics_only():
    seen = {}

    class Recorder:
        def fit(self, x, y, rng):
            seen["fit"] = x["image"]
            return self

        def predict_proba(self, x):
            seen["predict"] = x["image"]
            return np.zeros(len(x["image"]), np.float32)

    train = np.asarray([[1.0, 5.0], [3.0, 5.0]], np.float32)
    test = np.asarray([[100.0, 7.0]], np.float32)
    head = Standardized(Recorder()).fit({"image": train}, np.asarray([0, 1]), np.random.default_rng(0))
    head.predict_proba({"image": test})
    np.testing.assert_allclose(seen["fit"], [[-1.0, 0.0], [1.0, 0.0]])
    np.testing.assert_allclose(seen["predict"], [[98.0, 2.0]])
