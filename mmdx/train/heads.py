"""Classification heads in NumPy (float32), so that train-head never imports TensorFlow or torch.

The default head is the recipe's network, written out by hand:

* unimodal: ``Dense(128, relu) -> Dense(1, sigmoid)``;
* hybrid: one ``Dense(128, relu)`` per modality, concatenated, then
  ``Dense(1, sigmoid)``.

It trains like ``keras.Model.fit`` with the Keras 3 defaults. Kernels start
Glorot-uniform and biases at zero. The optimiser is Adam with learning rate
1e-3, beta_1 0.9, beta_2 0.999 and epsilon 1e-7, with the bias correction
folded into the step size as Keras 3 does. The loss is binary cross-entropy
averaged over the batch, and mini-batches are reshuffled every epoch. ``tests/test_train_keras.py`` trains the same network
in Keras from the same weights on the same batches and compares predictions.

Every head follows one interface, :class:`Head`: ``fit(x_by_modality, y, rng)``
and ``predict_proba(x_by_modality)``, where ``x_by_modality`` maps a modality
name (``"image"``, ``"text"``) to a float32 matrix with one row per sample.
:func:`cross_validate` in :mod:`mmdx.train.cv` takes a factory that builds a
fresh head per fold.
"""

from __future__ import annotations

from typing import Callable, Mapping, Protocol

import numpy as np
from threadpoolctl import threadpool_limits

__all__ = [
    "ConcatHead",
    "Head",
    "HeadFactory",
    "Standardized",
    "adam_step",
    "glorot_uniform",
    "make_concat_head",
]

HIDDEN_UNITS = 128
ADAM_BETA_1 = 0.9
ADAM_BETA_2 = 0.999
ADAM_EPSILON = 1e-7
# Keras clips probabilities to [epsilon, 1 - epsilon] before taking logs.
BCE_EPSILON = 1e-7


class Head(Protocol):
    """A binary classifier over one vector per modality and sample."""

    def fit(self, x_by_modality: Mapping[str, np.ndarray], y: np.ndarray, rng: np.random.Generator) -> "Head":
        """Train from scratch on rows ``x_by_modality[m][i]`` with 0/1 labels ``y[i]``."""

    def predict_proba(self, x_by_modality: Mapping[str, np.ndarray]) -> np.ndarray:
        """Return the probability of the positive class, shape ``(n,)``, float32."""


HeadFactory = Callable[[Mapping[str, int]], Head]
"""Build an untrained head from the input width of each modality, e.g. ``{"image": 1280}``."""


def glorot_uniform(rng: np.random.Generator, fan_in: int, fan_out: int) -> np.ndarray:
    """Draw a kernel like ``keras.initializers.GlorotUniform`` (limit sqrt(6 / (fan_in + fan_out)))."""
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=(fan_in, fan_out)).astype(np.float32)


def adam_step(
    params: np.ndarray, grads: np.ndarray, m: np.ndarray, v: np.ndarray, step: int, learning_rate: float
) -> None:
    """Apply one Keras-style Adam update in place (``step`` counts from 1).

    ``params``, ``grads``, ``m`` and ``v`` are flat float32 buffers of equal
    length, so one call updates every weight of a head. ``grads`` is used as
    scratch space and overwritten.

    The moments are kept without their ``(1 - beta)`` factors, ``m / (1 - beta_1)``
    and ``v / (1 - beta_2)``, which saves two passes over the buffers per step.
    The update is the same as Keras 3's ``m += (g - m) * (1 - beta_1)``,
    ``v += (g * g - v) * (1 - beta_2)``,
    ``params -= lr * sqrt(1 - beta_2**t) / (1 - beta_1**t) * m / (sqrt(v) + epsilon)``
    up to float32 rounding.
    """
    alpha = learning_rate * np.sqrt(1.0 - ADAM_BETA_2**step) / (1.0 - ADAM_BETA_1**step)
    root = np.sqrt(1.0 - ADAM_BETA_2)
    m *= np.float32(ADAM_BETA_1)
    m += grads
    np.square(grads, out=grads)
    v *= np.float32(ADAM_BETA_2)
    v += grads
    np.sqrt(v, out=grads)
    grads += np.float32(ADAM_EPSILON / root)
    np.divide(m, grads, out=grads)
    grads *= np.float32(alpha * (1.0 - ADAM_BETA_1) / root)
    params -= grads


class ConcatHead:
    """The recipe's head: ``Dense(128, relu)`` per modality, concatenated, ``Dense(1, sigmoid)``.

    With one modality this is ``Dense(128, relu) -> Dense(1, sigmoid)``. All
    weights live in one flat float32 buffer (views give the kernels and
    biases), so Adam updates them in one vectorised pass.

    Parameters
    ----------
    widths
        Input width per modality, in the order the hidden layers are concatenated.
    epochs, batch_size, learning_rate
        As in ``keras.Model.fit`` and ``keras.optimizers.Adam``.
    hidden_units
        Units of each per-modality hidden layer.
    """

    def __init__(
        self,
        widths: Mapping[str, int],
        epochs: int = 10,
        batch_size: int = 32,
        learning_rate: float = 1e-3,
        hidden_units: int = HIDDEN_UNITS,
    ):
        if not widths:
            raise ValueError("a head needs at least one modality")
        self.widths = {name: int(width) for name, width in widths.items()}
        self.epochs = int(epochs)
        self.batch_size = int(batch_size)
        self.learning_rate = float(learning_rate)
        self.hidden_units = int(hidden_units)
        self._allocate()

    # Parameters ----------------------------------------------------------

    def _allocate(self) -> None:
        h = self.hidden_units
        shapes = []
        for name, width in self.widths.items():
            shapes.append((f"{name}/kernel", (width, h)))
            shapes.append((f"{name}/bias", (h,)))
        shapes.append(("output/kernel", (h * len(self.widths), 1)))
        shapes.append(("output/bias", (1,)))
        self._layout: dict[str, tuple[int, tuple[int, ...]]] = {}
        offset = 0
        for key, shape in shapes:
            self._layout[key] = (offset, shape)
            offset += int(np.prod(shape))
        self._flat = np.zeros(offset, dtype=np.float32)
        self.params: dict[str, np.ndarray] = self._views(self._flat)

    def initialize(self, rng: np.random.Generator) -> None:
        """Draw Glorot-uniform kernels and zero biases, as Keras ``Dense`` does."""
        h = self.hidden_units
        self._flat[:] = 0.0
        for name, width in self.widths.items():
            self.params[f"{name}/kernel"][:] = glorot_uniform(rng, width, h)
        self.params["output/kernel"][:] = glorot_uniform(rng, h * len(self.widths), 1)

    def get_weights(self) -> dict[str, np.ndarray]:
        """Return copies of the kernels and biases, keyed ``"<modality>/kernel"`` etc."""
        return {key: value.copy() for key, value in self.params.items()}

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Overwrite the kernels and biases (same keys and shapes as :meth:`get_weights`)."""
        for key, value in weights.items():
            self.params[key][...] = np.asarray(value, dtype=np.float32).reshape(self.params[key].shape)

    # Forward and backward --------------------------------------------------

    def _check_inputs(self, x_by_modality: Mapping[str, np.ndarray]) -> int:
        n = None
        for name, width in self.widths.items():
            if name not in x_by_modality:
                raise ValueError(f"head expects modality {name!r}, got {sorted(x_by_modality)}")
            x = x_by_modality[name]
            if x.ndim != 2 or x.shape[1] != width:
                raise ValueError(f"{name} inputs must have shape (n, {width}), got {x.shape}")
            if n is not None and x.shape[0] != n:
                raise ValueError("every modality must have one row per sample")
            n = x.shape[0]
        return int(n)

    def _forward(self, batches: Mapping[str, np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
        hidden = []
        for name in self.widths:
            z = batches[name] @ self.params[f"{name}/kernel"]
            z += self.params[f"{name}/bias"]
            np.maximum(z, 0.0, out=z)
            hidden.append(z)
        h = hidden[0] if len(hidden) == 1 else np.concatenate(hidden, axis=1)
        logits = (h @ self.params["output/kernel"])[:, 0] + self.params["output/bias"][0]
        return hidden, logits

    def loss_and_gradients(
        self,
        batches: Mapping[str, np.ndarray],
        y: np.ndarray,
        out: np.ndarray | None = None,
        out_views: dict[str, np.ndarray] | None = None,
    ) -> tuple[float, np.ndarray]:
        """Return the mean binary cross-entropy of one batch and its gradient as a flat buffer.

        ``out``, if given, is a float32 buffer of the size of all weights that
        receives the gradient, and every entry is overwritten. ``out_views``
        are its views from :meth:`_views`, so they need not be rebuilt per batch.
        """
        hidden, logits = self._forward(batches)
        probability = _sigmoid(logits)
        y = y.astype(np.float32, copy=False)
        clipped = np.clip(probability, BCE_EPSILON, 1.0 - BCE_EPSILON)
        loss = float(-np.mean(y * np.log(clipped) + (1.0 - y) * np.log(1.0 - clipped)))

        grads = np.empty_like(self._flat) if out is None else out
        views = out_views if out_views is not None else self._views(grads)
        # d loss / d logit of the mean cross-entropy of a sigmoid output.
        d_logits = ((probability - y) / np.float32(len(y)))[:, None]
        h = hidden[0] if len(hidden) == 1 else np.concatenate(hidden, axis=1)
        np.matmul(h.T, d_logits, out=views["output/kernel"])
        views["output/bias"][0] = d_logits.sum()
        output_kernel = self.params["output/kernel"]
        units = self.hidden_units
        for position, name in enumerate(self.widths):
            d_hidden = d_logits @ output_kernel[position * units : (position + 1) * units].T
            d_hidden *= hidden[position] > 0
            np.matmul(batches[name].T, d_hidden, out=views[f"{name}/kernel"])
            np.sum(d_hidden, axis=0, out=views[f"{name}/bias"])
        return loss, grads

    def _views(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Split a flat buffer into kernel and bias views, keyed like :attr:`params`."""
        return {
            key: flat[offset : offset + int(np.prod(shape))].reshape(shape)
            for key, (offset, shape) in self._layout.items()
        }

    # Training ------------------------------------------------------------

    def fit(self, x_by_modality: Mapping[str, np.ndarray], y: np.ndarray, rng: np.random.Generator) -> "ConcatHead":
        """Initialise from ``rng`` and train for ``epochs`` epochs of shuffled mini-batches."""
        self.initialize(rng)
        return self.fit_from_current(x_by_modality, y, rng)

    def fit_from_current(
        self, x_by_modality: Mapping[str, np.ndarray], y: np.ndarray, rng: np.random.Generator
    ) -> "ConcatHead":
        """Train from the current weights (a fresh Adam state), shuffling batches with ``rng``."""
        n = self._check_inputs(x_by_modality)
        y = np.asarray(y, dtype=np.float32)
        if y.shape != (n,):
            raise ValueError(f"y must have shape ({n},), got {y.shape}")
        inputs = {name: np.asarray(x_by_modality[name], dtype=np.float32) for name in self.widths}
        m = np.zeros_like(self._flat)
        v = np.zeros_like(self._flat)
        grads = np.empty_like(self._flat)
        step_gradients = self._step_gradients(grads)
        step = 0
        # One BLAS thread: on 2 cores, 2 threads made the batch-32 matmuls 1.7x faster
        # when the other core was idle but 4-5x slower when it was busy, and folds
        # usually train in parallel workers.
        with threadpool_limits(1, user_api="blas"):
            for order in self.epoch_orders(n, rng):
                for start in range(0, n, self.batch_size):
                    step_gradients(inputs, y, order[start : start + self.batch_size])
                    step += 1
                    adam_step(self._flat, grads, m, v, step, self.learning_rate)
        return self

    def _step_gradients(self, grads: np.ndarray) -> Callable[[Mapping[str, np.ndarray], np.ndarray, np.ndarray], None]:
        """Return a function that writes the gradient of one training batch into ``grads``.

        It makes the NumPy and BLAS calls of :meth:`loss_and_gradients` in the
        same order, so the gradients are bit-identical. It skips the loss, and
        it writes every intermediate result into buffers allocated here once
        instead of new arrays per batch.
        """
        names = list(self.widths)
        units = self.hidden_units
        rows = self.batch_size
        views = self._views(grads)
        kernels = [self.params[f"{name}/kernel"] for name in names]
        biases = [self.params[f"{name}/bias"] for name in names]
        output_kernel = self.params["output/kernel"]
        output_bias = self.params["output/bias"]
        # Each modality's slice of the output kernel, transposed to a (1, units) matrix.
        output_rows = [output_kernel[p * units : (p + 1) * units].T for p in range(len(names))]
        kernel_grads = [views[f"{name}/kernel"] for name in names]
        bias_grads = [views[f"{name}/bias"] for name in names]
        output_kernel_grad = views["output/kernel"]
        output_bias_grad = views["output/bias"]
        x_rows = [np.empty((rows, width), dtype=np.float32) for width in self.widths.values()]
        hidden = [np.empty((rows, units), dtype=np.float32) for _ in names]
        joined = np.empty((rows, units * len(names)), dtype=np.float32) if len(names) > 1 else hidden[0]
        d_hidden = np.empty((rows, units), dtype=np.float32)
        active = np.empty((rows, units), dtype=bool)
        logits = np.empty((rows, 1), dtype=np.float32)
        exp_buffer = np.empty(rows, dtype=np.float32)
        y_rows = np.empty(rows, dtype=np.float32)

        def compute(inputs: Mapping[str, np.ndarray], y: np.ndarray, index: np.ndarray) -> None:
            k = len(index)
            batch = [np.take(inputs[name], index, axis=0, out=x[:k], mode="clip") for name, x in zip(names, x_rows)]

            for x, kernel, bias, z in zip(batch, kernels, biases, hidden):
                np.matmul(x, kernel, out=z[:k])
                z[:k] += bias
                np.maximum(z[:k], 0.0, out=z[:k])
            if len(names) > 1:
                np.concatenate([z[:k] for z in hidden], axis=1, out=joined[:k])
            h = joined[:k]
            np.matmul(h, output_kernel, out=logits[:k])

            # The sigmoid of _forward and _sigmoid, step by step.
            e = exp_buffer[:k]
            np.add(logits[:k, 0], output_bias[0], out=e)
            np.negative(e, out=e)
            with np.errstate(over="ignore"):
                np.exp(e, out=e)
            e += np.float32(1.0)
            np.divide(np.float32(1.0), e, out=e)

            # d loss / d logit of the mean cross-entropy of a sigmoid output.
            d_logits = logits[:k]
            np.subtract(e, np.take(y, index, out=y_rows[:k], mode="clip"), out=d_logits[:, 0])
            d_logits /= np.float32(k)
            np.matmul(h.T, d_logits, out=output_kernel_grad)
            output_bias_grad[0] = d_logits.sum()

            for x, z, row, kernel_grad, bias_grad in zip(batch, hidden, output_rows, kernel_grads, bias_grads):
                d = d_hidden[:k]
                np.matmul(d_logits, row, out=d)
                np.greater(z[:k], 0, out=active[:k])
                d *= active[:k]
                np.matmul(x.T, d, out=kernel_grad)
                np.sum(d, axis=0, out=bias_grad)

        return compute

    def epoch_orders(self, n: int, rng: np.random.Generator):
        """Yield one shuffled order of the ``n`` training rows per epoch."""
        for _ in range(self.epochs):
            yield rng.permutation(n)

    def predict_proba(self, x_by_modality: Mapping[str, np.ndarray], batch_size: int = 4096) -> np.ndarray:
        """Return the positive-class probability of every row, float32, shape ``(n,)``."""
        n = self._check_inputs(x_by_modality)
        out = np.empty(n, dtype=np.float32)
        for start in range(0, n, batch_size):
            batches = {
                name: np.asarray(x_by_modality[name][start : start + batch_size], dtype=np.float32)
                for name in self.widths
            }
            _, logits = self._forward(batches)
            out[start : start + batch_size] = _sigmoid(logits)
        return out


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    # exp of a float32 logit below about -88 underflows to 0, which is the right limit.
    with np.errstate(over="ignore"):
        return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32, copy=False)


class Standardized:
    """Wrap a head so that each modality is standardised with the mean and std of its training rows.

    The statistics come from the rows given to :meth:`fit` only (the training
    part of a fold), never from the test rows.
    """

    def __init__(self, head: Head):
        self.head = head
        self.mean: dict[str, np.ndarray] = {}
        self.scale: dict[str, np.ndarray] = {}

    def fit(self, x_by_modality: Mapping[str, np.ndarray], y: np.ndarray, rng: np.random.Generator) -> "Standardized":
        for name, x in x_by_modality.items():
            self.mean[name] = x.mean(axis=0, dtype=np.float64).astype(np.float32)
            scale = x.std(axis=0, dtype=np.float64).astype(np.float32)
            # A constant column is centred and left unscaled.
            scale[scale == 0] = 1.0
            self.scale[name] = scale
        self.head.fit(self._transform(x_by_modality), y, rng)
        return self

    def predict_proba(self, x_by_modality: Mapping[str, np.ndarray]) -> np.ndarray:
        return self.head.predict_proba(self._transform(x_by_modality))

    def _transform(self, x_by_modality: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {name: (x - self.mean[name]) / self.scale[name] for name, x in x_by_modality.items()}


def make_concat_head(
    epochs: int = 10, batch_size: int = 32, learning_rate: float = 1e-3, standardize: bool = False
) -> HeadFactory:
    """Return a factory of :class:`ConcatHead` with these training settings."""

    def factory(widths: Mapping[str, int]) -> Head:
        head = ConcatHead(widths, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate)
        return Standardized(head) if standardize else head

    return factory
