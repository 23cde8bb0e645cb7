"""Fusion heads that use a weak modality without being hurt by it.

The recipe's hybrid head concatenates a ``Dense(128, relu)`` of each side, so
a wide, weak image vector (1280-d) can drown a narrow, strong text vector
(384-d). The heads here offer other ways to combine the sides:

``concat``
    :class:`FusionHead` with ``fusion="concat"``: the recipe's layout
    (``Dense(units, relu)`` per side, concatenated, ``Dense(1, sigmoid)``)
    with the regularisation options below. The plain recipe head, without
    them, is :class:`mmdx.train.heads.ConcatHead`.
``gated``
    Each side is projected to a common width with ReLU, a sigmoid gate per
    side is computed from all projections (and the presence mask), and the
    gated projections are summed before ``Dense(1, sigmoid)``.
``attention``
    The projections are two tokens; a softmax over their scores (a shared
    score vector plus a learned bias per side) weights them per patient.
``late``
    :class:`LateFusionHead`: one unimodal head per side, combined by a
    logistic regression fitted on out-of-fold probabilities of inner folds
    of the training rows only.

All heads follow the :class:`mmdx.train.heads.Head` interface:
``fit(x_by_modality, y, rng)`` and ``predict_proba(x_by_modality)``. When
patients with only one modality are kept, ``x_by_modality[MASK_KEY]`` is an
``(n, n_modalities)`` 0/1 matrix in the order of the modalities, and the
rows of a missing side are zeros.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from mmdx.errors import InputError
from mmdx.train.heads import adam_step, glorot_uniform

__all__ = [
    "FUSIONS",
    "MASK_KEY",
    "FusionHead",
    "FusionOptions",
    "LateFusionHead",
    "STRATEGY_DEFAULTS",
    "load_patient_data_keep_missing",
    "make_head_factory",
    "modality_counts",
    "resolve_strategy_options",
]

logger = logging.getLogger(__name__)

FUSIONS = ("concat", "late", "gated", "attention")
MASK_KEY = "mask"
_NEGATIVE_LARGE = -1e9


@dataclass
class FusionOptions:
    """Training settings shared by every fusion head.

    Attributes
    ----------
    epochs
        Maximum passes over the training rows.
    batch_size, learning_rate
        Mini-batch size and Adam step size.
    units
        Width of each side's projection (``None``: 128 for ``concat``, as in
        the recipe, and 64 for ``gated`` and ``attention``).
    dropout
        Rate of inverted dropout on the projections during training.
    weight_decay
        Decoupled weight decay (AdamW) on kernels, per step, scaled by the
        learning rate.
    early_stopping
        Patience in epochs; 0 turns it off. When on, ``validation_fraction``
        of the training rows (stratified) is held out, training stops when
        the validation loss has not improved for this many epochs, and the
        best weights are kept.
    class_weight
        ``"balanced"`` weighs each class by ``n / (2 * n_class)`` in the loss;
        ``"none"`` weighs every row alike.
    standardize
        Z-score every feature with the mean and standard deviation of the
        training rows that have that modality.
    modality_dropout
        Probability, per training row and epoch, of hiding one of its
        modalities (chosen at random) when it has more than one.
    inner_folds
        Inner folds of late fusion's stacking.
    select_alpha
        Late fusion adds a modality to the stack only if it raises the
        stack's inner cross-validated AUC with one-sided DeLong p below
        this; 1 stacks every modality.
    late_bagging
        Late fusion predicts each modality with the mean probability of its
        head fitted on all training rows and its inner-fold heads (which
        lowers the variance of small heads), instead of the full head alone.
    """

    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 1e-3
    units: int | None = None
    dropout: float = 0.0
    weight_decay: float = 0.0
    early_stopping: int = 0
    validation_fraction: float = 0.2
    class_weight: str = "none"
    standardize: bool = False
    modality_dropout: float = 0.0
    inner_folds: int = 3
    select_alpha: float = 0.05
    late_bagging: bool = True

    def is_recipe(self) -> bool:
        """Return True when only the recipe's settings (epochs, batch, step size, standardising) are set."""
        return (self.units is None and self.dropout == 0 and self.weight_decay == 0 and self.early_stopping == 0
                and self.class_weight == "none" and self.modality_dropout == 0)

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.modality_dropout < 1.0:
            raise ValueError(f"modality_dropout must be in [0, 1), got {self.modality_dropout}")
        if self.class_weight not in ("balanced", "none"):
            raise ValueError(f"class_weight must be 'balanced' or 'none', got {self.class_weight!r}")
        if self.weight_decay < 0 or self.early_stopping < 0 or self.epochs < 1:
            raise ValueError("weight_decay and early_stopping must be >= 0 and epochs >= 1")


# Defaults per strategy of the options that train-head and compare leave unset.
# concat keeps the recipe (10 epochs, nothing else). The others were chosen by
# 5-fold x 3-repeat cross-validation on medpix-mr (268 patients, MobileNetV2
# and MiniLM vectors; docs/results.md): early stopping and standardising
# lowered ROC AUC there, balanced class weights raised balanced accuracy at
# equal AUC, and gated/attention gained about 0.05 AUC from dropout 0.5 with
# modality dropout 0.3 over 20 epochs. NOTE: tuned on one small data set.
_RECIPE = {"epochs": 10, "dropout": 0.0, "weight_decay": 0.0, "early_stopping": 0,
           "class_weight": "none", "standardize": False, "modality_dropout": 0.0}
_PROJECTED = {"epochs": 20, "dropout": 0.5, "weight_decay": 0.0, "early_stopping": 0,
              "class_weight": "balanced", "standardize": False, "modality_dropout": 0.3}
STRATEGY_DEFAULTS = {
    "concat": dict(_RECIPE),
    "late": {**_RECIPE, "class_weight": "balanced"},
    "gated": dict(_PROJECTED),
    "attention": dict(_PROJECTED),
}


def resolve_strategy_options(fusion: str, **values) -> dict:
    """Return ``values`` with every None replaced by the default of ``fusion``."""
    if fusion not in STRATEGY_DEFAULTS:
        raise InputError(f"--fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")
    defaults = STRATEGY_DEFAULTS[fusion]
    return {key: (defaults[key] if value is None else value) for key, value in values.items()}


def _split_inputs(
    x_by_modality: Mapping[str, np.ndarray], modalities: Sequence[str]
) -> tuple[list[np.ndarray], np.ndarray]:
    """Return the input matrices in ``modalities`` order and the presence mask."""
    xs = []
    n = None
    for name in modalities:
        if name not in x_by_modality:
            raise ValueError(f"head expects modality {name!r}, got {sorted(x_by_modality)}")
        x = np.asarray(x_by_modality[name])
        if n is not None and x.shape[0] != n:
            raise ValueError("every modality must have one row per sample")
        n = x.shape[0]
        xs.append(x)
    mask = x_by_modality.get(MASK_KEY)
    if mask is None:
        mask = np.ones((n, len(modalities)), dtype=np.float32)
    mask = np.asarray(mask, dtype=np.float32)
    if mask.shape != (n, len(modalities)):
        raise ValueError(f"{MASK_KEY} must have shape ({n}, {len(modalities)}), got {mask.shape}")
    return xs, mask


def _sigmoid(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-z))


def _class_weights(y: np.ndarray, mode: str) -> np.ndarray:
    if mode == "none":
        return np.ones(len(y), dtype=np.float64)
    counts = np.bincount(y.astype(int), minlength=2).astype(float)
    per_class = len(y) / (2.0 * np.maximum(counts, 1.0))
    return per_class[y.astype(int)]


def _stratified_holdout(y: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split row indices into (train, validation), keeping the class ratio."""
    train, validation = [], []
    for label in (0, 1):
        rows = rng.permutation(np.flatnonzero(y == label))
        n_validation = int(round(fraction * len(rows)))
        if len(rows) >= 2:
            n_validation = min(max(n_validation, 1), len(rows) - 1)
        else:
            n_validation = 0
        validation.append(rows[:n_validation])
        train.append(rows[n_validation:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(validation))


class FusionHead:
    """A numpy head with per-side ReLU projections fused by concatenation, gates or attention.

    Parameters
    ----------
    widths
        Input width per modality (``MASK_KEY`` is ignored if present).
    fusion
        ``"concat"``, ``"gated"`` or ``"attention"``. With one modality all
        three are ``Dense(units, relu) -> Dense(1, sigmoid)``.
    options
        Training and regularisation settings.
    dtype
        Floating type of weights and arithmetic (float64 for gradient checks).
    """

    def __init__(self, widths: Mapping[str, int], fusion: str = "gated",
                 options: FusionOptions | None = None, dtype=np.float32):
        if fusion not in ("concat", "gated", "attention"):
            raise ValueError(f"fusion must be concat, gated or attention, got {fusion!r}")
        self.modalities = [name for name in widths if name != MASK_KEY]
        if not self.modalities:
            raise ValueError("a head needs at least one modality")
        self.widths = {name: int(widths[name]) for name in self.modalities}
        self.fusion = fusion
        self.options = options or FusionOptions()
        self.units = int(self.options.units or (128 if fusion == "concat" else 64))
        self.dtype = np.dtype(dtype)
        self.mean: list[np.ndarray] | None = None
        self.scale: list[np.ndarray] | None = None
        self.epochs_trained = 0
        self._allocate()

    # Parameters ----------------------------------------------------------

    def _shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        d, k = self.units, len(self.modalities)
        shapes = []
        for name in self.modalities:
            shapes += [(f"{name}/kernel", (self.widths[name], d)), (f"{name}/bias", (d,))]
        if self.fusion == "gated":
            shapes += [("gate/kernel", (k * d + k, k)), ("gate/bias", (k,))]
        elif self.fusion == "attention":
            shapes += [("attention/kernel", (d, 1)), ("attention/bias", (k,))]
        fused_width = k * d + k if self.fusion == "concat" else d
        shapes += [("output/kernel", (fused_width, 1)), ("output/bias", (1,))]
        return shapes

    def _allocate(self) -> None:
        self._layout = {}
        offset = 0
        for key, shape in self._shapes():
            self._layout[key] = (offset, shape)
            offset += int(np.prod(shape))
        self._flat = np.zeros(offset, dtype=self.dtype)
        self.params = self._views(self._flat)
        self._kernel_mask = np.zeros(offset, dtype=bool)
        for key, (start, shape) in self._layout.items():
            if key.endswith("/kernel"):
                self._kernel_mask[start:start + int(np.prod(shape))] = True

    def _views(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        return {key: flat[start:start + int(np.prod(shape))].reshape(shape)
                for key, (start, shape) in self._layout.items()}

    def initialize(self, rng: np.random.Generator) -> None:
        """Draw Glorot-uniform kernels and zero biases."""
        self._flat[:] = 0
        for key, (_, shape) in self._layout.items():
            if key.endswith("/kernel"):
                self.params[key][:] = glorot_uniform(rng, shape[0], shape[1])

    # Forward and backward --------------------------------------------------

    def _forward(self, xs: list[np.ndarray], mask: np.ndarray, dropout_masks: list[np.ndarray] | None):
        p = self.params
        cache = {"xs": xs, "mask": mask, "pre": [], "hidden": [], "keep": []}
        for position, name in enumerate(self.modalities):
            pre = xs[position] @ p[f"{name}/kernel"] + p[f"{name}/bias"]
            # A missing side's projection is zero, whatever its input rows hold.
            keep = mask[:, [position]]
            if dropout_masks is not None:
                keep = keep * dropout_masks[position]
            cache["pre"].append(pre)
            cache["keep"].append(keep)
            cache["hidden"].append(np.maximum(pre, 0) * keep)
        hidden = cache["hidden"]

        if self.fusion == "concat":
            fused = np.concatenate(hidden + [mask], axis=1)
        elif self.fusion == "gated":
            gate_input = np.concatenate(hidden + [mask], axis=1)
            gates = _sigmoid(gate_input @ p["gate/kernel"] + p["gate/bias"])
            weights = gates * mask
            fused = sum(weights[:, [i]] * h for i, h in enumerate(hidden))
            cache.update(gate_input=gate_input, gates=gates, weights=weights)
        else:
            scores = np.stack([h @ p["attention/kernel"][:, 0] for h in hidden], axis=1) + p["attention/bias"]
            scores = np.where(mask > 0, scores, _NEGATIVE_LARGE)
            scores = scores - scores.max(axis=1, keepdims=True)
            weights = np.exp(scores) * (mask > 0)
            weights = weights / weights.sum(axis=1, keepdims=True)
            fused = sum(weights[:, [i]] * h for i, h in enumerate(hidden))
            cache.update(weights=weights)
        cache["fused"] = fused
        logits = (fused @ p["output/kernel"])[:, 0] + p["output/bias"][0]
        return logits, cache

    def loss_and_gradients(self, xs, mask, y, sample_weight, dropout_masks=None) -> tuple[float, np.ndarray]:
        """Return the weighted mean cross-entropy of a batch and its gradient as a flat buffer."""
        p = self.params
        logits, cache = self._forward(xs, mask, dropout_masks)
        y = y.astype(self.dtype)
        total = sample_weight.sum()
        # log(1 + exp(-|z|)) form of the cross-entropy, stable for any logit.
        per_row = np.maximum(logits, 0) - logits * y + np.log1p(np.exp(-np.abs(logits)))
        loss = float(np.sum(sample_weight * per_row) / total)

        grads = np.zeros_like(self._flat)
        g = self._views(grads)
        d_logits = (sample_weight * (_sigmoid(logits) - y) / total).astype(self.dtype)[:, None]
        fused = cache["fused"]
        g["output/kernel"][:] = fused.T @ d_logits
        g["output/bias"][0] = d_logits.sum()
        d_fused = d_logits @ p["output/kernel"].T
        hidden, d = cache["hidden"], self.units
        k = len(self.modalities)

        if self.fusion == "concat":
            d_hidden = [d_fused[:, i * d:(i + 1) * d] for i in range(k)]
        else:
            weights = cache["weights"]
            d_hidden = [weights[:, [i]] * d_fused for i in range(k)]
            d_weights = np.stack([np.sum(d_fused * h, axis=1) for h in hidden], axis=1)
            if self.fusion == "gated":
                gates = cache["gates"]
                d_pre_gate = d_weights * mask * gates * (1 - gates)
                g["gate/kernel"][:] = cache["gate_input"].T @ d_pre_gate
                g["gate/bias"][:] = d_pre_gate.sum(axis=0)
                d_gate_input = d_pre_gate @ p["gate/kernel"].T
                for i in range(k):
                    d_hidden[i] = d_hidden[i] + d_gate_input[:, i * d:(i + 1) * d]
            else:
                # Softmax backward: dz_i = a_i (da_i - sum_j a_j da_j).
                d_scores = weights * (d_weights - np.sum(weights * d_weights, axis=1, keepdims=True))
                query = p["attention/kernel"][:, 0]
                g["attention/kernel"][:, 0] = sum(h.T @ d_scores[:, i] for i, h in enumerate(hidden))
                g["attention/bias"][:] = d_scores.sum(axis=0)
                for i in range(k):
                    d_hidden[i] = d_hidden[i] + d_scores[:, [i]] * query[None, :]

        for i, name in enumerate(self.modalities):
            d_pre = d_hidden[i] * cache["keep"][i] * (cache["pre"][i] > 0)
            g[f"{name}/kernel"][:] = cache["xs"][i].T @ d_pre
            g[f"{name}/bias"][:] = d_pre.sum(axis=0)
        return loss, grads

    # Training ------------------------------------------------------------

    def _prepare(self, x_by_modality: Mapping[str, np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
        xs, mask = _split_inputs(x_by_modality, self.modalities)
        for name, x in zip(self.modalities, xs):
            if x.ndim != 2 or x.shape[1] != self.widths[name]:
                raise ValueError(f"{name} inputs must have shape (n, {self.widths[name]}), got {x.shape}")
        xs = [np.asarray(x, dtype=self.dtype) for x in xs]
        if self.mean is not None:
            xs = [(x - mean) / scale * mask[:, [i]] for i, (x, mean, scale) in
                  enumerate(zip(xs, self.mean, self.scale))]
        return xs, mask.astype(self.dtype)

    def _fit_standardizer(self, x_by_modality: Mapping[str, np.ndarray]) -> None:
        xs, mask = _split_inputs(x_by_modality, self.modalities)
        self.mean, self.scale = [], []
        for i, x in enumerate(xs):
            present = np.asarray(x, dtype=np.float64)[mask[:, i] > 0]
            mean = present.mean(axis=0) if len(present) else np.zeros(x.shape[1])
            scale = present.std(axis=0) if len(present) else np.ones(x.shape[1])
            scale[scale == 0] = 1.0
            self.mean.append(mean.astype(self.dtype))
            self.scale.append(scale.astype(self.dtype))

    def _drop_modalities(self, xs, mask, rng):
        """Hide one present modality of some rows (modality dropout), never the last one."""
        rate = self.options.modality_dropout
        if rate <= 0 or len(self.modalities) < 2:
            return xs, mask
        candidates = (mask.sum(axis=1) >= 2) & (rng.random(len(mask)) < rate)
        if not candidates.any():
            return xs, mask
        mask = mask.copy()
        for row in np.flatnonzero(candidates):
            present = np.flatnonzero(mask[row] > 0)
            mask[row, rng.choice(present)] = 0
        xs = [x * mask[:, [i]] for i, x in enumerate(xs)]
        return xs, mask

    def fit(self, x_by_modality: Mapping[str, np.ndarray], y: np.ndarray, rng: np.random.Generator) -> "FusionHead":
        """Initialise from ``rng`` and train with the head's options."""
        options = self.options
        y = np.asarray(y).astype(int)
        if options.standardize:
            self._fit_standardizer(x_by_modality)
        else:
            self.mean = self.scale = None
        xs, mask = self._prepare(x_by_modality)
        if y.shape != (len(mask),):
            raise ValueError(f"y must have shape ({len(mask)},), got {y.shape}")
        self.initialize(rng)

        train_rows = np.arange(len(y))
        validation_rows = np.empty(0, dtype=int)
        if options.early_stopping:
            train_rows, validation_rows = _stratified_holdout(y, options.validation_fraction, rng)
        weights = _class_weights(y[train_rows], options.class_weight).astype(self.dtype)
        validation_weights = _class_weights(y[validation_rows], options.class_weight).astype(self.dtype)

        from threadpoolctl import threadpool_limits

        # Multi-threaded BLAS only adds synchronisation cost at these batch sizes.
        with threadpool_limits(1, user_api="blas"):
            self._train(xs, mask, y, train_rows, validation_rows, weights, validation_weights, rng)
        return self

    def _train(self, xs, mask, y, train_rows, validation_rows, weights, validation_weights, rng) -> None:
        """Run Adam over shuffled mini-batches, with early stopping when validation rows are given."""
        options = self.options
        m = np.zeros_like(self._flat)
        v = np.zeros_like(self._flat)
        step, best_loss, best_flat, since_best = 0, np.inf, None, 0
        for epoch in range(options.epochs):
            order = rng.permutation(train_rows.size)
            for start in range(0, order.size, options.batch_size):
                rows = train_rows[order[start:start + options.batch_size]]
                batch_xs, batch_mask = self._drop_modalities([x[rows] for x in xs], mask[rows], rng)
                drops = self._dropout_masks(len(rows), rng)
                _, grads = self.loss_and_gradients(batch_xs, batch_mask, y[rows],
                                                   weights[order[start:start + options.batch_size]], drops)
                step += 1
                if options.weight_decay:
                    self._flat[self._kernel_mask] *= 1 - options.learning_rate * options.weight_decay
                adam_step(self._flat, grads.astype(self._flat.dtype), m, v, step, options.learning_rate)
            self.epochs_trained = epoch + 1
            if validation_rows.size:
                loss, _ = self.loss_and_gradients([x[validation_rows] for x in xs], mask[validation_rows],
                                                  y[validation_rows], validation_weights)
                if loss < best_loss - 1e-6:
                    best_loss, best_flat, since_best = loss, self._flat.copy(), 0
                else:
                    since_best += 1
                    if since_best >= options.early_stopping:
                        break
        if best_flat is not None:
            self._flat[:] = best_flat

    def _dropout_masks(self, n: int, rng: np.random.Generator) -> list[np.ndarray] | None:
        rate = self.options.dropout
        if rate <= 0:
            return None
        keep = 1.0 - rate
        return [((rng.random((n, self.units)) < keep) / keep).astype(self.dtype) for _ in self.modalities]

    def predict_proba(self, x_by_modality: Mapping[str, np.ndarray]) -> np.ndarray:
        """Return the positive-class probability of every row, shape ``(n,)``."""
        xs, mask = self._prepare(x_by_modality)
        logits, _ = self._forward(xs, mask, None)
        return _sigmoid(logits).astype(np.float32)

    def modality_weights(self, x_by_modality: Mapping[str, np.ndarray]) -> np.ndarray | None:
        """Return the per-row gate or attention weight of each modality, or None for ``concat``."""
        if self.fusion == "concat":
            return None
        xs, mask = self._prepare(x_by_modality)
        _, cache = self._forward(xs, mask, None)
        return cache["weights"]


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


class LateFusionHead:
    """Unimodal heads combined by a logistic-regression stacker (late fusion).

    ``fit`` splits the rows it is given (the training part of an outer fold)
    into ``options.inner_folds`` stratified inner folds, trains one unimodal
    head per modality on each inner training part and predicts the inner
    test part. The stacker is fitted on those out-of-fold probabilities, so
    its training rows are all among ``fit``'s input rows. Then one unimodal head per
    modality is refitted on all rows. A row without a modality contributes
    logit 0 for it, and the stacker also gets the presence mask when some
    row lacks a modality.

    Attributes
    ----------
    stacker_training_inputs_
        The input rows the stacker was fitted on, per modality, kept so that
        a caller can check that no test row was among them.
    stacker_
        The fitted ``sklearn.linear_model.LogisticRegression``.
    selected_
        Positions of the modalities in the stack (see ``options.select_alpha``).
    inner_aucs_
        Inner out-of-fold ROC AUC per modality.
    """

    def __init__(self, widths: Mapping[str, int], options: FusionOptions | None = None, unimodal_factory=None):
        self.modalities = [name for name in widths if name != MASK_KEY]
        if len(self.modalities) < 2:
            raise ValueError("late fusion needs at least two modalities")
        self.widths = {name: int(widths[name]) for name in self.modalities}
        self.options = options or FusionOptions()
        self.unimodal_factory = unimodal_factory or (
            lambda name: FusionHead({name: self.widths[name]}, fusion="concat", options=self.options)
        )
        self.heads: dict[str, object] = {}
        self.stacker_ = None
        self.stacker_training_inputs_: dict[str, np.ndarray] = {}
        self.selected_: list[int] = list(range(len(self.modalities)))
        self.inner_aucs_: dict[str, float] = {}
        self._use_mask = False

    def _stack_features(self, probabilities: np.ndarray, mask: np.ndarray) -> np.ndarray:
        features = _logit(probabilities) * mask
        return np.concatenate([features, mask], axis=1) if self._use_mask else features

    def _fit_unimodal(self, position: int, xs, mask, y, rows, rng):
        name = self.modalities[position]
        rows = rows[mask[rows, position] > 0]
        head = self.unimodal_factory(name)
        head.fit({name: xs[position][rows]}, y[rows], rng)
        return head

    def fit(self, x_by_modality: Mapping[str, np.ndarray], y: np.ndarray, rng: np.random.Generator) -> "LateFusionHead":
        """Fit the inner-fold unimodal heads, the stacker, then the final unimodal heads."""
        from sklearn.model_selection import StratifiedKFold

        xs, mask = _split_inputs(x_by_modality, self.modalities)
        y = np.asarray(y).astype(int)
        self._use_mask = bool((mask < 1).any())
        n_splits = max(2, min(self.options.inner_folds, int(np.bincount(y, minlength=2).min())))
        splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=int(rng.integers(2**31 - 1)))

        out_of_fold = np.full((len(y), len(self.modalities)), 0.5)
        inner_heads: dict[str, list] = {name: [] for name in self.modalities}
        for inner_train, inner_test in splitter.split(np.zeros(len(y)), y):
            for position, name in enumerate(self.modalities):
                head = self._fit_unimodal(position, xs, mask, y, inner_train, rng)
                inner_heads[name].append(head)
                present = inner_test[mask[inner_test, position] > 0]
                if present.size:
                    out_of_fold[present, position] = head.predict_proba({name: xs[position][present]})

        self.selected_ = self._select_modalities(out_of_fold, mask, y)
        keep = np.isin(np.arange(len(self.modalities)), self.selected_)
        self.stacker_ = self._new_stacker()
        self.stacker_.fit(self._stack_features(out_of_fold, mask * keep), y)
        self.stacker_training_inputs_ = {name: np.asarray(x) for name, x in zip(self.modalities, xs)}
        logger.debug("late fusion stacker coefficients %s", self.stacker_.coef_.tolist())

        all_rows = np.arange(len(y))
        self.heads = {}
        for position in self.selected_:
            name = self.modalities[position]
            full = self._fit_unimodal(position, xs, mask, y, all_rows, rng)
            self.heads[name] = [full, *inner_heads[name]] if self.options.late_bagging else [full]
        return self

    def _select_modalities(self, out_of_fold: np.ndarray, mask: np.ndarray, y: np.ndarray) -> list[int]:
        """Return the positions of the modalities that enter the stack, by forward selection.

        The modality with the highest inner out-of-fold AUC enters first. Each
        other modality, in order of AUC, enters only if it makes the stack
        better: the stack's cross-validated predictions on the inner
        out-of-fold probabilities, with and without it, are compared by
        DeLong's paired test, and it enters when the one-sided p-value is
        below ``options.select_alpha``. So a modality that adds no measurable
        signal adds no noise either.
        """
        from sklearn.model_selection import cross_val_predict

        from mmdx.train.stats import delong_test, roc_auc

        aucs = []
        for position in range(len(self.modalities)):
            present = mask[:, position] > 0
            auc = roc_auc(y[present], out_of_fold[present, position]) if present.any() else np.nan
            aucs.append(0.5 if np.isnan(auc) else float(auc))
        self.inner_aucs_ = dict(zip(self.modalities, aucs))
        order = [int(position) for position in np.argsort(aucs)[::-1]]
        if self.options.select_alpha >= 1:
            return sorted(order)

        def stacked(positions: list[int]) -> np.ndarray:
            keep = np.isin(np.arange(len(self.modalities)), positions)
            features = self._stack_features(out_of_fold, mask * keep)
            return cross_val_predict(self._new_stacker(), features, y, cv=3, method="predict_proba")[:, 1]

        selected = [order[0]]
        current = stacked(selected)
        for position in order[1:]:
            candidate = stacked(selected + [position])
            test = delong_test(y, candidate, current)
            p_value = test.p_value / 2 if test.difference > 0 else 1 - test.p_value / 2
            logger.debug("late fusion: adding %s changes the stacked AUC by %+.3f (one-sided p %.3g)",
                         self.modalities[position], test.difference, p_value)
            if p_value < self.options.select_alpha:
                selected.append(position)
                current = candidate
        return sorted(selected)

    def _new_stacker(self):
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(C=1.0, class_weight="balanced" if self.options.class_weight == "balanced" else None)

    def predict_proba(self, x_by_modality: Mapping[str, np.ndarray]) -> np.ndarray:
        """Return the stacked positive-class probability of every row, shape ``(n,)``."""
        xs, mask = _split_inputs(x_by_modality, self.modalities)
        probabilities = np.full((len(mask), len(self.modalities)), 0.5)
        keep = np.isin(np.arange(len(self.modalities)), self.selected_)
        mask = mask * keep
        for position, name in enumerate(self.modalities):
            present = np.flatnonzero(mask[:, position] > 0)
            if present.size:
                inputs = {name: xs[position][present]}
                probabilities[present, position] = np.mean([head.predict_proba(inputs) for head in self.heads[name]], axis=0)
        return self.stacker_.predict_proba(self._stack_features(probabilities, mask))[:, 1].astype(np.float32)


def make_head_factory(fusion: str = "concat", options: FusionOptions | None = None, masked: bool = False):
    """Return a factory that builds an untrained head from the input widths.

    Parameters
    ----------
    fusion
        One of :data:`FUSIONS`. With one modality every strategy but
        ``late`` gives a unimodal head, and ``late`` falls back to ``concat``.
    options
        Training and regularisation settings.
    masked
        The inputs carry a presence mask (patients with one modality kept).

    Notes
    -----
    ``concat`` without any of dropout, weight decay, early stopping, class
    weights, modality dropout, a projection width or a mask builds the plain
    recipe head :class:`mmdx.train.heads.ConcatHead` (optionally
    standardised), so the default of ``train-head`` stays the recipe.
    """
    from mmdx.train.heads import make_concat_head

    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")
    options = options or FusionOptions()
    if fusion == "concat" and not masked and options.is_recipe():
        return make_concat_head(options.epochs, options.batch_size, options.learning_rate, options.standardize)

    def factory(widths: Mapping[str, int]):
        modalities = [name for name in widths if name != MASK_KEY]
        if fusion == "late" and len(modalities) >= 2:
            return LateFusionHead(widths, options)
        return FusionHead(widths, fusion="concat" if fusion == "late" else fusion, options=options)

    return factory


def load_patient_data_keep_missing(
    store_path,
    labels,
    image_set: str | None = None,
    text_set: str | None = None,
    aggregate: str = "mean",
):
    """Join labels with image and text vectors, keeping patients that have only one side.

    Returns a hybrid :class:`~mmdx.train.data.PatientData` over every labelled
    patient with image or text vectors. A missing side's row is zeros, and
    ``x[MASK_KEY]`` is the ``(n, 2)`` presence matrix (image, text), which the
    fusion heads read; the recipe head :class:`~mmdx.train.heads.ConcatHead`
    ignores it.
    """
    from mmdx.train.data import DROP_NO_IMAGE, DROP_NO_TEXT, PatientData, load_patient_data

    image = load_patient_data(store_path, labels, "image", image_set=image_set, aggregate=aggregate)
    text = load_patient_data(store_path, labels, "text", text_set=text_set, aggregate=aggregate)
    patient_ids = np.asarray(sorted(set(image.patient_ids.tolist()) | set(text.patient_ids.tolist())), dtype=object)

    def spread(part, matrix):
        full = np.zeros((len(patient_ids), matrix.shape[1]), dtype=np.float32)
        full[np.searchsorted(patient_ids, part.patient_ids)] = matrix
        return full

    mask = np.zeros((len(patient_ids), 2), dtype=np.float32)
    mask[np.searchsorted(patient_ids, image.patient_ids), 0] = 1
    mask[np.searchsorted(patient_ids, text.patient_ids), 1] = 1
    x = {"image": spread(image, image.x["image"]), MASK_KEY: mask}
    fold_x = {}
    # NOTE: the per-fold text branch (a text encoder fine-tuned per fold) has no test yet.
    if "text" in text.fold_x:
        fold_x["text"] = [spread(text, matrix) for matrix in text.fold_x["text"]]
    else:
        x["text"] = spread(text, text.x["text"])

    dropped = {reason: ids for reason, ids in image.dropped.items() if reason != DROP_NO_IMAGE}
    dropped[DROP_NO_IMAGE] = sorted(set(image.dropped.get(DROP_NO_IMAGE, [])) & set(text.dropped.get(DROP_NO_TEXT, [])))
    dropped[DROP_NO_TEXT] = list(dropped[DROP_NO_IMAGE])
    return PatientData(
        modality="hybrid",
        modalities=("image", "text"),
        patient_ids=patient_ids,
        y=np.asarray([labels[patient_id] for patient_id in patient_ids.tolist()], dtype=np.int64),
        x=x,
        labels=image.labels,
        sets={**image.sets, **text.sets},
        aggregate=aggregate,
        fold_x=fold_x,
        dropped=dropped,
    )


def modality_counts(data) -> dict[str, int]:
    """Count the patients of ``data`` with both modalities, image only and text only."""
    mask = data.x.get(MASK_KEY)
    if mask is None:
        both = len(data) if len(data.modalities) == 2 else 0
        only = {name: (len(data) if data.modalities == (name,) else 0) for name in ("image", "text")}
        return {"both": both, "image_only": only["image"], "text_only": only["text"], "total": len(data)}
    present = mask > 0
    return {
        "both": int(np.sum(present.all(axis=1))),
        "image_only": int(np.sum(present[:, 0] & ~present[:, 1])),
        "text_only": int(np.sum(~present[:, 0] & present[:, 1])),
        "total": len(data),
    }
