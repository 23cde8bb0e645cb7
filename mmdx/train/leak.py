"""Leak guard: reject a run that tests a head on patients its text encoder was fine-tuned on.

Text fine-tuning records ``config["encoder_training"] = {"group", "fold",
"n_folds", "seed", "patients"}`` in the feature sets it writes, where
``patients`` are the sorted IDs the encoder was trained on. An encoder
trained once (``fold`` null) must not see any evaluated patient. A per-fold
group has one set per fold, trained on that fold's training patients, and
fold k of train-head must use fold k's set with the same folds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from mmdx.errors import InputError
from mmdx.train.data import PatientData, SetChoice

__all__ = ["LeakCheck", "check_leaks"]

logger = logging.getLogger(__name__)


@dataclass
class LeakCheck:
    """Outcome of :func:`check_leaks`: ``leaked`` is True when ``--allow-leak`` let a leak through."""

    leaked: bool = False
    findings: list[str] = field(default_factory=list)


def check_leaks(
    data: PatientData,
    folds: list[tuple[np.ndarray, np.ndarray]] | None,
    n_folds: int,
    seed: int,
    repeats: int,
    allow_leak: bool = False,
) -> LeakCheck:
    """Check every feature set in use against the patients it will be tested on.

    Parameters
    ----------
    data
        The joined inputs; ``data.sets`` names the feature sets in use.
    folds
        ``(train_index, test_index)`` per fold for seed ``seed`` (repeat 0),
        as from :func:`~mmdx.train.cv.restricted_folds`; needed for a per-fold group.
    n_folds, seed, repeats
        The cross-validation settings of the run.
    allow_leak
        Report leaks instead of raising.

    Raises
    ------
    InputError
        On a leak without ``allow_leak``, and always when a per-fold group's
        ``n_folds`` or ``seed`` differ from the run's, or ``repeats`` > 1
        with a per-fold group (repeat r splits with seed + r).
    """
    result = LeakCheck()
    evaluated = set(data.patient_ids.tolist())
    for choice in data.sets.values():
        if choice.per_fold:
            _check_group(data, choice, folds, n_folds, seed, repeats, result)
            continue
        training = choice.encoder_training()[0]
        if not training:
            continue
        overlap = evaluated & set(training.get("patients") or [])
        if overlap:
            result.findings.append(
                f"{choice.modality} set {choice.names[0]}: its encoder was trained on {len(overlap)} of the "
                f"{len(evaluated)} evaluated patients"
            )
    if result.findings:
        if not allow_leak:
            raise InputError(
                f"{result.findings[0]}; evaluate on patients the encoder never saw, use a per-fold "
                "fine-tuned group, or pass --allow-leak to run anyway (marked leaked in metrics.json)"
            )
        result.leaked = True
        for finding in result.findings:
            logger.warning("leak allowed by --allow-leak: %s", finding)
    return result


def _check_group(
    data: PatientData,
    choice: SetChoice,
    folds: list[tuple[np.ndarray, np.ndarray]] | None,
    n_folds: int,
    seed: int,
    repeats: int,
    result: LeakCheck,
) -> None:
    trainings = choice.encoder_training()
    group_folds = trainings[0].get("n_folds")
    group_seed = trainings[0].get("seed")
    if group_folds != n_folds or group_seed != seed:
        raise InputError(
            f"{choice.modality} sets of per-fold group {choice.group!r} were fine-tuned with "
            f"--folds {group_folds} --seed {group_seed}, but this run uses --folds {n_folds} --seed {seed}; "
            "use the group's values so that each fold is tested with the encoder that never saw it"
        )
    if repeats != 1:
        raise InputError(
            f"--repeats {repeats} splits repeat r with seed {seed} + r, but per-fold group {choice.group!r} "
            f"matches the folds of seed {seed} only; use --repeats 1"
        )
    if folds is None:
        raise ValueError("folds are needed to check a per-fold group")
    for k, (_, test) in enumerate(folds):
        overlap = set(data.patient_ids[test].tolist()) & set(trainings[k].get("patients") or [])
        if overlap:
            result.findings.append(
                f"{choice.modality} set {choice.names[k]} (fold {k} of group {choice.group!r}): its encoder "
                f"was trained on {len(overlap)} of fold {k}'s {len(test)} test patients"
            )
