"""The NumPy head trains like the recipe's Keras head, from the same weights on the same batches."""

from __future__ import annotations

import numpy as np
import pytest

from mmdx.train.heads import ConcatHead

pytestmark = pytest.mark.slow


def build_keras_head(widths: dict[str, int]):
    import keras

    inputs = [keras.Input(shape=(width,), name=name) for name, width in widths.items()]
    hidden = [keras.layers.Dense(128, activation="relu", name=f"{name}_dense")(x) for name, x in zip(widths, inputs)]
    merged = hidden[0] if len(hidden) == 1 else keras.layers.Concatenate()(hidden)
    output = keras.layers.Dense(1, activation="sigmoid", name="output")(merged)
    model = keras.Model(inputs, output)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=1e-3, beta_1=0.9, beta_2=0.999, epsilon=1e-7),
        loss="binary_crossentropy",
    )
    return model


@pytest.mark.parametrize("widths", [{"image": 40}, {"image": 40, "text": 24}])
def test_numpy_head_matches_keras(widths):
    pytest.importorskip("keras")
    rng = np.random.default_rng(0)
    n = 200
    x = {name: rng.standard_normal((n, width)).astype(np.float32) for name, width in widths.items()}
    y = (x["image"][:, 0] - 0.5 * x["image"][:, 1] + rng.normal(0, 0.5, n) > 0).astype(np.float32)
    x_test = {name: rng.standard_normal((50, width)).astype(np.float32) for name, width in widths.items()}

    head = ConcatHead(widths, epochs=3, batch_size=32)
    head.initialize(np.random.default_rng(1))
    weights = head.get_weights()

    model = build_keras_head(widths)
    for name in widths:
        model.get_layer(f"{name}_dense").set_weights([weights[f"{name}/kernel"], weights[f"{name}/bias"]])
    model.get_layer("output").set_weights([weights["output/kernel"], weights["output/bias"]])
    before = head.predict_proba(x_test)
    np.testing.assert_allclose(model.predict([x_test[name] for name in widths], verbose=0)[:, 0], before, atol=1e-6)

    # The same per-epoch orders that fit_from_current draws from this seed.
    orders = list(head.epoch_orders(n, np.random.default_rng(7)))
    head.fit_from_current(x, y, np.random.default_rng(7))
    for order in orders:
        model.fit([x[name][order] for name in widths], y[order], batch_size=32, epochs=1, shuffle=False, verbose=0)

    keras_probability = model.predict([x_test[name] for name in widths], verbose=0)[:, 0]
    numpy_probability = head.predict_proba(x_test)
    # Training moved the predictions by far more than the tolerance below.
    assert np.abs(keras_probability - before).max() > 0.05
    np.testing.assert_allclose(numpy_probability, keras_probability, atol=2e-4)
    for name in widths:
        kernel, _ = model.get_layer(f"{name}_dense").get_weights()
        np.testing.assert_allclose(head.params[f"{name}/kernel"], kernel, atol=2e-4)
