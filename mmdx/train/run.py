"""``train_head``: cross-validate a classification head on stored vectors and write its results."""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from mmdx import __version__
from mmdx.atomic import atomic_dir, check_output_dir
from mmdx.embed.engines import available_cpus
from mmdx.errors import InputError
from mmdx.train.cv import METRIC_NAMES, THRESHOLD, CVResult, cross_validate, restricted_folds
from mmdx.train.data import AGGREGATES, MODALITIES, PatientData, load_patient_data, store_duplicate_groups
from mmdx.train.fusion import (
    FUSIONS,
    MASK_KEY,
    FusionOptions,
    load_patient_data_keep_missing,
    make_head_factory,
    modality_counts,
    resolve_strategy_options,
)
from mmdx.train.heads import HeadFactory
from mmdx.train.labels import load_labels
from mmdx.train.leak import check_leaks

__all__ = ["TrainHeadResult", "train_head", "write_outputs"]

logger = logging.getLogger(__name__)

DUPLICATES = ("group", "ignore")


@dataclass
class TrainHeadResult:
    """Output of :func:`train_head`: the report (``metrics.json``), the CV result and the inputs."""

    report: dict
    config: dict
    cv: CVResult
    data: PatientData

    @property
    def metrics(self) -> dict[str, dict[str, float]]:
        """Metric name to ``{"mean", "std"}`` over folds and repeats."""
        return self.report["metrics"]


# Below this many training samples seen (patients x epochs x folds x
# repeats), --jobs 0 trains in the main process. On 2 cores a hybrid head on
# medpix-mr (268 patients, 10 epochs, 5 folds: 13,400) took 0.55 s in one
# process and 0.61 to 0.71 s with 2 forked workers. The threshold is an
# estimate from that run and from 1,000 patients, where workers halve the time.
SMALL_TRAINING_WORK = 20_000


def auto_jobs(n_patients: int, epochs: int, n_tasks: int) -> int:
    """Return the number of fold workers for ``--jobs 0``: 1 for small runs, else one per CPU."""
    if n_patients * epochs * n_tasks < SMALL_TRAINING_WORK:
        return 1
    return available_cpus()


def train_head(
    store: str | Path,
    labels: str | Path,
    label_column: str,
    id_column: str = "patient_id",
    positive: str | None = None,
    negative: tuple[str, ...] = (),
    modality: str = "hybrid",
    folds: int = 5,
    seed: int = 0,
    repeats: int = 1,
    epochs: int | None = 10,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    out: str | Path | None = None,
    image_set: str | None = None,
    text_set: str | None = None,
    aggregate: str = "mean",
    augmented: bool = False,
    views: int | None = None,
    duplicates: str = "group",
    standardize: bool | None = False,
    allow_leak: bool = False,
    fusion: str = "concat",
    dropout: float | None = 0.0,
    weight_decay: float | None = 0.0,
    early_stopping: int | None = 0,
    class_weight: str | None = "none",
    modality_dropout: float | None = 0.0,
    keep_missing: bool = False,
    head_factory: HeadFactory | None = None,
    head_name: str = "concat",
    jobs: int = 0,
    on_fold_done=None,
) -> TrainHeadResult:
    """Cross-validate a head on stored vectors, patient by patient, and optionally write the results.

    Parameters
    ----------
    store
        Feature store path.
    labels, id_column, label_column, positive, negative
        The labels CSV and how to read it, as in :func:`~mmdx.train.labels.load_labels`.
    modality
        ``"image"``, ``"text"`` or ``"hybrid"``.
    folds, seed, repeats
        Stratified patient-level folds; repeat ``r`` uses seed ``seed + r``.
    epochs, batch_size, learning_rate
        Training settings of the default head (Adam, binary cross-entropy).
    out
        Output folder for ``metrics.json``, ``predictions.csv`` and
        ``config.json``, written atomically; None writes nothing.
    image_set, text_set
        Feature set names where the store has several of one modality.
    aggregate
        ``"mean"`` or ``"max"`` of a patient's vectors.
    augmented
        Also train on the augmented image views of the training patients.
    views
        With ``augmented``: train on augmented views 1 to ``views`` only;
        None uses every stored view.
    duplicates
        ``"group"`` keeps patients whose images are byte-identical (same
        content hash in the store's image set) in one fold; ``"ignore"``
        splits them freely and logs a warning with the number of groups.
    standardize
        Standardise inputs with the training part's mean and std (per fold).
    allow_leak
        Run even if a text encoder was fine-tuned on evaluated patients, and
        mark the result ``"leaked": true``.
    fusion, dropout, weight_decay, early_stopping, class_weight, modality_dropout
        Head strategy and regularisation, as in
        :class:`~mmdx.train.fusion.FusionOptions`; ``concat`` without
        regularisation is the recipe head. These, ``epochs`` and
        ``standardize`` given as None take the strategy's defaults
        (:data:`~mmdx.train.fusion.STRATEGY_DEFAULTS`).
    keep_missing
        With ``hybrid``: keep patients that have only one modality (missing
        side zeroed, presence mask as input) instead of dropping them.
    jobs
        Folds trained at once in worker processes; 0 means one per available
        CPU core. The results do not depend on it.
    head_factory, head_name
        Another head to train in place of the recipe's concatenation head
        (then ``epochs``, ``batch_size``, ``learning_rate`` and
        ``standardize`` are up to the factory), and its name for the report.
    on_fold_done
        Called with each fold's metrics (for progress bars).

    Returns
    -------
    TrainHeadResult
    """
    resolved = resolve_strategy_options(
        fusion, epochs=epochs, dropout=dropout, weight_decay=weight_decay, early_stopping=early_stopping,
        class_weight=class_weight, standardize=standardize, modality_dropout=modality_dropout,
    )
    epochs, dropout, weight_decay = resolved["epochs"], resolved["dropout"], resolved["weight_decay"]
    early_stopping, class_weight = resolved["early_stopping"], resolved["class_weight"]
    standardize, modality_dropout = resolved["standardize"], resolved["modality_dropout"]
    config = {
        "store": str(store),
        "labels": str(labels),
        "id_column": id_column,
        "label_column": label_column,
        "positive": positive,
        "negative": list(negative),
        "modality": modality,
        "folds": folds,
        "seed": seed,
        "repeats": repeats,
        "epochs": epochs,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "out": None if out is None else str(out),
        "image_set": image_set,
        "text_set": text_set,
        "aggregate": aggregate,
        "augmented": augmented,
        "views": views,
        "duplicates": duplicates,
        "standardize": standardize,
        "allow_leak": allow_leak,
        "fusion": fusion,
        "dropout": dropout,
        "weight_decay": weight_decay,
        "early_stopping": early_stopping,
        "class_weight": class_weight,
        "modality_dropout": modality_dropout,
        "keep_missing": keep_missing,
        "head": head_name,
        "threshold": THRESHOLD,
        "jobs": jobs,
    }
    _check_options(config)
    fusion_options = _fusion_options(config)
    if out is not None:
        check_output_dir(out, protect=[store, labels])

    label_table = load_labels(labels, id_column, label_column, positive, negative or None)
    if keep_missing and modality == "hybrid":
        data = load_patient_data_keep_missing(store, label_table, image_set, text_set, aggregate)
    else:
        data = load_patient_data(store, label_table, modality, image_set, text_set, aggregate, augmented, views)
    # finetune-text --per-fold reads the same groups from its --store. When the
    # images were embedded after it, its folds differ and the leak check stops the run.
    groups = store_duplicate_groups(store, list(data.labels), image_set)
    if groups and duplicates == "ignore":
        logger.warning(
            "%d group(s) of patients share identical images; --duplicates ignore may split them "
            "across training and test", len(groups),
        )
    data.fold_groups = groups if duplicates == "group" else []
    for reason, count in data.dropped_counts().items():
        if count:
            logger.info("dropped %d patient(s): %s", count, reason)
    leaks = check_leaks(data, restricted_folds(data, folds, seed), folds, seed, repeats, allow_leak)

    if head_factory is None:
        head_factory = make_head_factory(fusion, fusion_options, masked=MASK_KEY in data.x)
    n_jobs = jobs if jobs > 0 else auto_jobs(len(data.patient_ids), config["epochs"], folds * repeats)
    cv = cross_validate(data, head_factory, folds, seed, repeats, on_fold_done=on_fold_done, n_jobs=n_jobs)

    report = _report(config, data, cv, leaks.leaked, leaks.findings, len(groups))
    result = TrainHeadResult(report, config, cv, data)
    if out is not None:
        write_outputs(result, out, protect=[store, labels])
    return result


def _check_options(config: dict) -> None:
    """Reject option values that cannot work, before any data is read."""
    if config["modality"] not in MODALITIES:
        raise InputError(f"--modality must be one of {', '.join(MODALITIES)}, got {config['modality']!r}")
    if config["aggregate"] not in AGGREGATES:
        raise InputError(f"--aggregate must be one of {', '.join(AGGREGATES)}, got {config['aggregate']!r}")
    for option, minimum in (("folds", 2), ("repeats", 1), ("epochs", 1), ("batch_size", 1), ("jobs", 0)):
        if config[option] < minimum:
            raise InputError(f"--{option.replace('_', '-')} must be at least {minimum}, got {config[option]}")
    if not config["learning_rate"] > 0:
        raise InputError(f"--learning-rate must be positive, got {config['learning_rate']}")
    if config["augmented"] and config["modality"] == "text":
        raise InputError("--augmented uses augmented image views; use it with --modality image or hybrid")
    if config["fusion"] != "concat" and config["modality"] != "hybrid":
        raise InputError(
            f"--fusion {config['fusion']} combines image and text vectors, so it needs --modality hybrid, "
            f"got --modality {config['modality']}; leave --fusion out for a unimodal head"
        )
    if config["augmented"] and config["keep_missing"]:
        raise InputError("--keep-missing cannot be combined with --augmented; drop one of them")
    if config["duplicates"] not in DUPLICATES:
        raise InputError(f"--duplicates must be one of {', '.join(DUPLICATES)}, got {config['duplicates']!r}")
    if config["views"] is not None and not config["augmented"]:
        raise InputError(f"--views {config['views']} selects augmented views; add --augmented or drop --views")
    if config["views"] is not None and config["views"] < 1:
        raise InputError(f"--views must be at least 1, got {config['views']}")
    if config["fusion"] not in FUSIONS:
        raise InputError(f"--fusion must be one of {', '.join(FUSIONS)}, got {config['fusion']!r}")


def _fusion_options(config: dict) -> FusionOptions:
    """Build the head's training settings, turning a range error into an error naming the option."""
    try:
        return FusionOptions(
            epochs=config["epochs"], batch_size=config["batch_size"], learning_rate=config["learning_rate"],
            dropout=config["dropout"], weight_decay=config["weight_decay"], early_stopping=config["early_stopping"],
            class_weight=config["class_weight"], standardize=config["standardize"],
            modality_dropout=config["modality_dropout"],
        )
    except ValueError as exc:
        raise InputError(f"invalid head option: {exc}") from exc


def _report(
    config: dict, data: PatientData, cv: CVResult, leaked: bool, findings: list[str], n_duplicate_groups: int = 0
) -> dict:
    """Build the content of ``metrics.json``."""
    per_fold = {name: [fold[name] for fold in cv.fold_metrics] for name in METRIC_NAMES}
    return {
        "modality": data.modality,
        "n_patients": len(data),
        "n_positive": int(data.y.sum()),
        "n_labelled": len(data.labels),
        "metrics": {name: {**cv.metrics[name], "per_fold": per_fold[name]} for name in METRIC_NAMES},
        "std_ddof": 1,
        "folds": cv.fold_metrics,
        "dropped": data.dropped_counts(),
        "dropped_patients": data.dropped,
        "label_values": getattr(data.labels, "values_seen", {}),
        "positive": config["positive"],
        "sets": {name: choice.to_json() for name, choice in data.sets.items()},
        "aggregate": data.aggregate,
        "augmented": config["augmented"],
        "augmented_views": data.augmented_views,
        "duplicates": config["duplicates"],
        "duplicate_groups": n_duplicate_groups,
        "standardize": config["standardize"],
        "head": config["head"],
        "fusion": config["fusion"],
        "regularisation": {name: config[name] for name in (
            "dropout", "weight_decay", "early_stopping", "class_weight", "modality_dropout")},
        "keep_missing": config["keep_missing"],
        "modality_counts": modality_counts(data),
        "seed": config["seed"],
        "n_folds": config["folds"],
        "repeats": config["repeats"],
        "threshold": config["threshold"],
        "leaked": leaked,
        "leak_findings": findings,
        "mmdx_version": __version__,
    }


def write_outputs(result: TrainHeadResult, out: str | Path, protect: Sequence[str | Path] = ()) -> Path:
    """Write ``metrics.json``, ``predictions.csv`` and ``config.json`` into ``out`` atomically.

    ``out`` is refused if it contains one of the input paths ``protect`` or
    files mmdx did not write (see :func:`mmdx.atomic.atomic_dir`).
    """
    with atomic_dir(out, protect=protect) as staging:
        _write_json(staging / "metrics.json", result.report)
        _write_json(staging / "config.json", result.config)
        predictions = result.cv.predictions
        columns = ("patient_id", "label", "probability", "prediction", "fold", "repeat")
        with open(staging / "predictions.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            for row in zip(*(predictions[name].tolist() for name in columns)):
                writer.writerow([f"{value:.6f}" if isinstance(value, float) else value for value in row])
    logger.info("wrote %s", out)
    return Path(out)


def _write_json(path: Path, value: dict) -> None:
    # JSON has no NaN: an undefined metric (ROC AUC of a one-class fold) is written as null.
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(_nan_to_none(value), handle, indent=2, ensure_ascii=False, allow_nan=False)
        handle.write("\n")


def _nan_to_none(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _nan_to_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(item) for item in value]
    return value
