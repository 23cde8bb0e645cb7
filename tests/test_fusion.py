"""Tests for the numpy fusion heads: gradients, masks, options and late-fusion stacking."""

from __future__ import annotations

import numpy as np
import pytest

from mmdx.train.fusion import (
    MASK_KEY,
    FusionHead,
    FusionOptions,
    LateFusionHead,
    make_head_factory,
)


def _batch(rng, n=7, widths=(5, 3)):
    xs = [rng.normal(size=(n, w)) for w in widths]
    mask = np.ones((n, len(widths)))
    mask[1, 0] = 0.0
    mask[2, 1] = 0.0
    xs = [x * mask[:, [i]] for i, x in enumerate(xs)]
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    weights = rng.uniform(0.5, 2.0, n)
    return xs, mask, y, weights


@pytest.mark.parametrize("fusion", ["concat", "gated", "attention"])
def test_gradients_match_finite_differences(fusion):
    rng = np.random.default_rng(0)
    head = FusionHead({"image": 5, "text": 3}, fusion=fusion, options=FusionOptions(units=4), dtype=np.float64)
    head.initialize(rng)
    # Biases start at zero; random ones make every path (gate bias, attention bias) matter.
    head._flat += rng.normal(scale=0.3, size=head._flat.size)
    xs, mask, y, weights = _batch(rng)
    drops = [(rng.random((len(y), 4)) < 0.8) / 0.8 for _ in range(2)]

    _, analytic = head.loss_and_gradients(xs, mask, y, weights, drops)

    numeric = np.zeros_like(analytic)
    step = 1e-6
    for index in range(head._flat.size):
        saved = head._flat[index]
        head._flat[index] = saved + step
        plus, _ = head.loss_and_gradients(xs, mask, y, weights, drops)
        head._flat[index] = saved - step
        minus, _ = head.loss_and_gradients(xs, mask, y, weights, drops)
        head._flat[index] = saved
        numeric[index] = (plus - minus) / (2 * step)
    assert np.max(np.abs(analytic - numeric)) < 1e-6
    assert np.abs(analytic).max() > 1e-3


def test_attention_ignores_missing_side():
    rng = np.random.default_rng(1)
    head = FusionHead({"image": 5, "text": 3}, fusion="attention", options=FusionOptions(units=4))
    head.initialize(rng)
    x = {"image": np.zeros((2, 5), np.float32), "text": rng.normal(size=(2, 3)).astype(np.float32),
         MASK_KEY: np.array([[0, 1], [0, 1]], np.float32)}

    weights = head.modality_weights(x)

    np.testing.assert_allclose(weights, [[0, 1], [0, 1]])


def test_missing_side_values_do_not_matter():
    rng = np.random.default_rng(2)
    mask = np.array([[1, 0], [0, 1]], np.float32)
    for fusion in ("concat", "gated", "attention"):
        head = FusionHead({"image": 5, "text": 3}, fusion=fusion, options=FusionOptions(units=4))
        head.initialize(rng)
        head._flat += rng.normal(scale=0.3, size=head._flat.size).astype(np.float32)
        image = rng.normal(size=(2, 5)).astype(np.float32)
        text = rng.normal(size=(2, 3)).astype(np.float32)
        other_image = image.copy()
        other_image[1] = 100.0
        other_text = text.copy()
        other_text[0] = -100.0

        first = head.predict_proba({"image": image * mask[:, [0]], "text": text * mask[:, [1]], MASK_KEY: mask})
        second = head.predict_proba({"image": other_image, "text": other_text, MASK_KEY: mask})

        np.testing.assert_allclose(first, second, rtol=1e-6, err_msg=fusion)


def _two_modalities(n, rng, image_signal, text_signal, noise_width=64):
    """Labels from the sum of two independent latent signals, one seen by each modality."""
    latent_image = rng.normal(size=n)
    latent_text = rng.normal(size=n)
    y = (image_signal * latent_image + text_signal * latent_text + 0.3 * rng.normal(size=n) > 0).astype(int)
    image = rng.normal(size=(n, noise_width))
    text = rng.normal(size=(n, 16))
    image[:, 0] += 2.0 * latent_image if image_signal else 0.0
    text[:, 0] += 2.0 * latent_text if text_signal else 0.0
    return {"image": image.astype(np.float32), "text": text.astype(np.float32)}, y


def test_options_validate_ranges():
    with pytest.raises(ValueError, match="dropout"):
        FusionOptions(dropout=1.0)
    with pytest.raises(ValueError, match="class_weight"):
        FusionOptions(class_weight="auto")


def test_early_stopping_stops_before_max_epochs():
    rng = np.random.default_rng(3)
    x, y = _two_modalities(200, rng, 0.0, 1.0)
    head = FusionHead({"image": 64, "text": 16}, "gated",
                      FusionOptions(epochs=500, early_stopping=5, standardize=True))

    head.fit(x, y, np.random.default_rng(0))

    assert 5 <= head.epochs_trained < 500


def test_standardize_uses_training_rows_only():
    rng = np.random.default_rng(4)
    x, y = _two_modalities(60, rng, 1.0, 1.0)
    x["text"] = x["text"] + 10.0
    head = FusionHead({"image": 64, "text": 16}, "gated", FusionOptions(epochs=1, standardize=True))

    head.fit({k: v[:40] for k, v in x.items()}, y[:40], np.random.default_rng(0))

    np.testing.assert_allclose(head.mean[1], x["text"][:40].mean(axis=0), rtol=1e-5)


def test_modality_dropout_keeps_one_side():
    rng = np.random.default_rng(5)
    head = FusionHead({"image": 2, "text": 2}, "gated", FusionOptions(modality_dropout=0.9))
    xs = [np.ones((500, 2)), np.ones((500, 2))]

    dropped_xs, mask = head._drop_modalities(xs, np.ones((500, 2)), rng)

    assert mask.sum(axis=1).min() == 1
    assert 0.8 < np.mean(mask.sum(axis=1) == 1) < 1.0
    np.testing.assert_array_equal(dropped_xs[0][:, 0], mask[:, 0])


def test_late_stacker_never_sees_test_patients():
    from mmdx.train.folds import patient_folds

    rng = np.random.default_rng(6)
    x, y = _two_modalities(90, rng, 1.0, 1.0, noise_width=8)
    # Column 0 of the image side carries the patient number, so the stacker's
    # training rows can be traced back to patient IDs.
    ids = [f"p{i:03d}" for i in range(90)]
    x["image"][:, 0] = np.arange(90)
    labels = dict(zip(ids, y.tolist()))
    for train_ids, test_ids in patient_folds(labels, 3, seed=0):
        train = [ids.index(i) for i in train_ids]
        head = LateFusionHead({"image": 8, "text": 16}, FusionOptions(epochs=3, inner_folds=3))
        head.fit({k: v[train] for k, v in x.items()}, y[train], np.random.default_rng(0))

        seen = {f"p{int(i):03d}" for i in head.stacker_training_inputs_["image"][:, 0]}

        assert seen == set(train_ids)
        assert seen.isdisjoint(test_ids)


def test_late_fusion_predicts_with_missing_side():
    rng = np.random.default_rng(7)
    x, y = _two_modalities(120, rng, 1.0, 1.0, noise_width=8)
    mask = np.ones((120, 2), np.float32)
    mask[::5, 0] = 0
    mask[1::7, 1] = 0
    x = {"image": x["image"] * mask[:, [0]], "text": x["text"] * mask[:, [1]], MASK_KEY: mask}
    head = LateFusionHead({"image": 8, "text": 16, MASK_KEY: 2}, FusionOptions(epochs=20, standardize=True))

    head.fit(x, y, np.random.default_rng(0))
    probability = head.predict_proba(x)

    assert probability.shape == (120,)
    assert np.isfinite(probability).all()
    assert head.stacker_.coef_.shape == (1, 4)


def test_factory_falls_back_to_unimodal_head():
    head = make_head_factory("late", FusionOptions())({"text": 16})

    assert isinstance(head, FusionHead)
    assert head.modalities == ["text"]


def test_factory_concat_defaults_to_recipe_head():
    from mmdx.train.heads import ConcatHead

    recipe = make_head_factory("concat", FusionOptions())({"image": 8, "text": 4})
    regularised = make_head_factory("concat", FusionOptions(dropout=0.2))({"image": 8, "text": 4})
    masked = make_head_factory("concat", FusionOptions(), masked=True)({"image": 8, "text": 4})

    assert isinstance(recipe, ConcatHead)
    assert isinstance(regularised, FusionHead)
    assert isinstance(masked, FusionHead)
