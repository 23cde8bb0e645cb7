"""``compare``: train image, text and hybrid heads on the same folds and test the differences.

Every head is cross-validated by :func:`mmdx.train.run.train_head` with the
same labels, folds, seeds and repeats, so the out-of-fold predictions of two
heads are paired patient by patient. The table gives each metric as the mean
over folds and repeats with a Student-t 95% interval. Each hybrid head is
then compared with the best unimodal head (highest mean ROC AUC) by a paired
bootstrap over patients and by DeLong's test.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from mmdx import __version__
from mmdx.atomic import atomic_dir, check_output_dir
from mmdx.errors import InputError
from mmdx.store.api import FeatureStore
from mmdx.train.cv import METRIC_NAMES
from mmdx.train.fusion import FUSIONS
from mmdx.train.run import TrainHeadResult, _nan_to_none, train_head, write_outputs
from mmdx.train.stats import PairedResult, delong_test, paired_bootstrap, t_interval

__all__ = ["CompareResult", "compare", "format_markdown", "paired_probabilities"]

logger = logging.getLogger(__name__)

METRIC_LABELS = {
    "accuracy": "Accuracy",
    "precision": "Precision",
    "recall": "Recall",
    "f1": "F1",
    "roc_auc": "ROC AUC",
    "balanced_accuracy": "Balanced accuracy",
}
CONFIDENCE = 0.95
SETTING_KEYS = ("epochs", "dropout", "weight_decay", "early_stopping", "class_weight", "standardize",
                "modality_dropout", "keep_missing")


@dataclass
class CompareResult:
    """Heads, their metric summaries and the paired tests of :func:`compare`.

    Attributes
    ----------
    heads
        Head name to its :class:`~mmdx.train.run.TrainHeadResult`.
    summary
        Head name to metric name to ``{"mean", "ci_low", "ci_high", "n"}``.
    reference
        Name of the best unimodal head (highest mean ROC AUC), or None.
    tests
        Paired tests of each hybrid head against ``reference``.
    """

    heads: dict[str, TrainHeadResult]
    summary: dict[str, dict[str, dict[str, float]]]
    reference: str | None
    tests: list[PairedResult] = field(default_factory=list)
    test_heads: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)


def _store_modalities(store: str | Path) -> set[str]:
    return {info.modality for info in FeatureStore(store).list_sets()}


def _head_plan(modalities: set[str], fusions: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """Return ``(head name, modality, fusion)`` for every head to train."""
    plan = [(name, name, "concat") for name in ("image", "text") if name in modalities]
    if {"image", "text"} <= modalities:
        plan.append(("hybrid", "hybrid", "concat"))
        for fusion in fusions:
            if fusion != "concat":
                plan.append((f"hybrid-{fusion}", "hybrid", fusion))
    return plan


def paired_probabilities(a: TrainHeadResult, b: TrainHeadResult) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
    """Align the out-of-fold probabilities of two heads on their common patients.

    Returns the labels ``(n,)``, the probabilities of ``a`` and of ``b`` as
    ``(repeats, n)`` matrices, and the patient IDs, sorted.
    """
    tables = []
    for result in (a, b):
        predictions = result.cv.predictions
        table: dict[tuple[int, str], float] = {}
        labels: dict[str, int] = {}
        for patient_id, repeat, probability, label in zip(
            predictions["patient_id"].tolist(), predictions["repeat"].tolist(),
            predictions["probability"].tolist(), predictions["label"].tolist(),
        ):
            table[(repeat, patient_id)] = probability
            labels[patient_id] = label
        tables.append((table, labels))
    common = sorted(set(tables[0][1]) & set(tables[1][1]))
    repeats = sorted({repeat for repeat, _ in tables[0][0]} & {repeat for repeat, _ in tables[1][0]})
    y = np.asarray([tables[0][1][patient_id] for patient_id in common], dtype=int)
    matrices = [
        np.asarray([[table[(repeat, patient_id)] for patient_id in common] for repeat in repeats], dtype=float)
        for table, _ in tables
    ]
    return y, matrices[0], matrices[1], common


def _summarize(result: TrainHeadResult) -> dict[str, dict[str, float]]:
    summary = {}
    for name in METRIC_NAMES:
        values = [fold[name] for fold in result.cv.fold_metrics]
        mean, low, high = t_interval(values, CONFIDENCE)
        summary[name] = {"mean": mean, "ci_low": low, "ci_high": high,
                         "n": int(np.sum(np.isfinite(np.asarray(values, dtype=float))))}
    return summary


def compare(
    store: str | Path,
    labels: str | Path,
    label_column: str,
    id_column: str = "patient_id",
    positive: str | None = None,
    negative: tuple[str, ...] = (),
    fusions: tuple[str, ...] = (),
    folds: int = 5,
    seed: int = 0,
    repeats: int = 3,
    bootstrap: int = 2000,
    out: str | Path | None = None,
    on_fold_done=None,
    on_head_start=None,
    **head_options,
) -> CompareResult:
    """Cross-validate image, text and hybrid heads on the same folds and test the hybrids.

    Parameters
    ----------
    store, labels, label_column, id_column, positive, negative
        The feature store and the labels CSV, as in :func:`~mmdx.train.run.train_head`.
    fusions
        Fusion strategies to train besides the recipe's ``concat`` hybrid
        (names from :data:`~mmdx.train.fusion.FUSIONS`). Ignored when the
        store contains one modality only, and then the unimodal head is reported.
    folds, seed, repeats
        The folds: repeat ``r`` splits with seed ``seed + r``, for every head.
    bootstrap
        Resamples of the paired bootstrap.
    out
        Folder for ``table.md``, ``table.csv``, ``tests.csv``,
        ``compare.json``, ``roc.png`` and one sub-folder per head (the
        ``train-head`` outputs), written atomically; None writes nothing.
    on_fold_done, on_head_start
        Progress callbacks: after each fold, and with each head's name.
    **head_options
        Passed to :func:`~mmdx.train.run.train_head` for every head (epochs,
        regularisation, sets, aggregation, ``keep_missing``, ...). Options of
        fusion strategies other than ``concat`` that are None take that
        strategy's defaults.

    Returns
    -------
    CompareResult
    """
    unknown = [fusion for fusion in fusions if fusion not in FUSIONS]
    if unknown:
        raise InputError(f"--fusion must be one of {', '.join(FUSIONS)}, got {unknown[0]!r}")
    if bootstrap < 100:
        raise InputError(f"--bootstrap must be at least 100 resamples, got {bootstrap}")
    fusions = tuple(dict.fromkeys(fusions))
    if out is not None:
        check_output_dir(out, protect=[store, labels])
    modalities = _store_modalities(store)
    plan = _head_plan(modalities, fusions)
    if not plan:
        raise InputError(f"{store}: no image or text feature set; run `mmdx embed` first")

    heads: dict[str, TrainHeadResult] = {}
    for name, modality, fusion in plan:
        if on_head_start is not None:
            on_head_start(name)
        heads[name] = train_head(
            store, labels, label_column, id_column=id_column, positive=positive, negative=negative,
            modality=modality, folds=folds, seed=seed, repeats=repeats, fusion=fusion, head_name=name,
            on_fold_done=on_fold_done, **head_options,
        )
    summary = {name: _summarize(result) for name, result in heads.items()}

    unimodal = [name for name in ("image", "text") if name in heads]
    reference = max(unimodal, key=lambda name: summary[name]["roc_auc"]["mean"]) if unimodal else None
    tests, test_heads = [], []
    for name in heads:
        if name in unimodal or reference is None:
            continue
        y, hybrid, single, _ = paired_probabilities(heads[name], heads[reference])
        tests.append(paired_bootstrap(y, hybrid, single, n_resamples=bootstrap, seed=seed))
        # DeLong on each patient's probability averaged over repeats.
        tests.append(delong_test(y, hybrid.mean(axis=0), single.mean(axis=0), CONFIDENCE))
        test_heads += [name, name]

    config = {"store": str(store), "labels": str(labels), "label_column": label_column, "positive": positive,
              "fusions": list(fusions), "folds": folds, "seed": seed, "repeats": repeats, "bootstrap": bootstrap,
              "confidence": CONFIDENCE, "interval": "Student t over folds x repeats", **head_options}
    result = CompareResult(heads, summary, reference, tests, test_heads, config)
    if out is not None:
        write_compare(result, out, protect=[store, labels])
    return result


def format_markdown(result: CompareResult) -> str:
    """Return the metric table and the paired tests as Markdown."""
    lines = [
        f"Mean over {result.config['folds']} folds x {result.config['repeats']} repeats, "
        f"with Student-t {CONFIDENCE:.0%} confidence intervals over those "
        f"{result.config['folds'] * result.config['repeats']} values.",
        "",
        "| head | patients | " + " | ".join(METRIC_LABELS.values()) + " |",
        "|---|---:|" + "---|" * len(METRIC_LABELS),
    ]
    for name, result_head in result.heads.items():
        cells = [name, str(result_head.report["n_patients"])]
        for metric in METRIC_LABELS:
            value = result.summary[name][metric]
            cells.append(f"{value['mean']:.3f} [{value['ci_low']:.3f}, {value['ci_high']:.3f}]")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Settings per head:", ""]
    for name, head_result in result.heads.items():
        config = head_result.config
        settings = ", ".join(f"{key.replace('_', ' ')} {config[key]}" for key in SETTING_KEYS if key in config)
        lines.append(f"- {name}: fusion {config.get('fusion', 'concat')}, {settings}")
    if result.tests:
        lines += [
            "",
            f"Paired tests of each hybrid head against the best unimodal head ({result.reference}), ROC AUC:",
            "",
            "| head | test | AUC head | AUC " + str(result.reference) + " | difference | 95% CI | p-value | patients |",
            "|---|---|---:|---:|---:|---|---:|---:|",
        ]
        for name, test in zip(result.test_heads, result.tests):
            lines.append(
                f"| {name} | {test.method.replace('_', ' ')} | {test.value_a:.3f} | {test.value_b:.3f} | "
                f"{test.difference:+.3f} | [{test.ci_low:+.3f}, {test.ci_high:+.3f}] | {test.p_value:.3g} | "
                f"{test.n_patients} |"
            )
        lines += [
            "",
            "The table's ROC AUC is the mean of per-fold AUCs. The tests pool the out-of-fold predictions "
            "of all folds instead: the paired bootstrap resamples patients and averages the pooled AUC "
            "difference over repeats, and DeLong's test compares the pooled AUCs of each patient's "
            "probability averaged over repeats. So their AUCs differ slightly from the table's.",
        ]
    return "\n".join(lines) + "\n"


def write_compare(result: CompareResult, out: str | Path, protect: Sequence[str | Path] = ()) -> Path:
    """Write the tables, tests, per-head outputs and the ROC plot into ``out`` atomically.

    ``out`` is refused if it contains one of the input paths ``protect`` or
    files mmdx did not write (see :func:`mmdx.atomic.atomic_dir`).
    """
    with atomic_dir(out, protect=protect) as staging:
        (staging / "table.md").write_text(format_markdown(result), encoding="utf-8")
        with open(staging / "table.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["head", "patients", "metric", "mean", "ci_low", "ci_high", "n_values"])
            for name, metrics in result.summary.items():
                for metric, value in metrics.items():
                    writer.writerow([name, result.heads[name].report["n_patients"], metric,
                                     *(_number(value[key]) for key in ("mean", "ci_low", "ci_high")), value["n"]])
        with open(staging / "tests.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            columns = ["head", "reference", "method", "metric", "value_head", "value_reference", "difference",
                       "ci_low", "ci_high", "p_value", "n_patients"]
            writer.writerow(columns)
            for name, test in zip(result.test_heads, result.tests):
                row = test.to_dict()
                writer.writerow([name, result.reference, row["method"], row["metric"], _number(row["value_a"]),
                                 _number(row["value_b"]), _number(row["difference"]), _number(row["ci_low"]),
                                 _number(row["ci_high"]), _number(row["p_value"]), row["n_patients"]])
        summary = {
            "config": result.config,
            "reference": result.reference,
            "summary": result.summary,
            "tests": [{"head": name, "reference": result.reference, **test.to_dict()}
                      for name, test in zip(result.test_heads, result.tests)],
            "mmdx_version": __version__,
        }
        with open(staging / "compare.json", "w", encoding="utf-8") as handle:
            json.dump(_nan_to_none(summary), handle, indent=2, allow_nan=False)
            handle.write("\n")
        for name, head_result in result.heads.items():
            write_outputs(head_result, staging / name)
        plot_roc(result, staging / "roc.png")
    logger.info("wrote %s", out)
    return Path(out)


def plot_roc(result: CompareResult, path: Path) -> None:
    """Draw the ROC curve of every head (each patient's probability averaged over repeats)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot
    from sklearn.metrics import roc_curve

    figure, axes = pyplot.subplots(figsize=(5.5, 5.0), dpi=120)
    for name, head_result in result.heads.items():
        y, probability, _, _ = paired_probabilities(head_result, head_result)
        mean_probability = probability.mean(axis=0)
        if len(np.unique(y)) < 2:
            continue
        false_positive, true_positive, _ = roc_curve(y, mean_probability)
        auc = result.summary[name]["roc_auc"]["mean"]
        axes.plot(false_positive, true_positive, label=f"{name} (fold-mean AUC {auc:.3f})")
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axes.set_xlabel("False positive rate")
    axes.set_ylabel("True positive rate")
    axes.set_title("Out-of-fold ROC, probability averaged over repeats")
    axes.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)


def _number(value: float) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.6g}"

