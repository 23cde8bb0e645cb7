"""``mmdx train-head``: cross-validate a classification head on stored vectors."""

from __future__ import annotations

import click

from mmdx.cli import INTERRUPTED_NOTHING_WRITTEN, report_errors
from mmdx.cli.options import label_options
from mmdx.cli.compare import head_options

METRIC_LABELS = {
    "accuracy": "accuracy",
    "precision": "precision",
    "recall": "recall",
    "f1": "F1",
    "roc_auc": "ROC AUC",
    "balanced_accuracy": "balanced acc.",
}


@click.command("train-head")
@click.option("--store", required=True, type=click.Path(), help="Feature store (HDF5) to read vectors from.")
@label_options
@click.option("--id-column", default="patient_id", show_default=True, help="Column of the labels CSV with patient IDs.")
@click.option(
    "--modality",
    type=click.Choice(["image", "text", "hybrid"]),
    default="hybrid",
    show_default=True,
    help="Inputs of the head: image vectors, text vectors, or both.",
)
@click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True, help="Number of patient-level folds.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the folds, weights and batch order.")
@click.option(
    "--repeats",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Repeat the cross-validation; repeat r splits with seed + r.",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Mini-batch size in rows.")
@click.option(
    "--learning-rate", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True, help="Adam step size."
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Output folder for metrics.json, predictions.csv and config.json, replaced atomically; an existing "
    "folder must be empty or an earlier mmdx output. Without --out nothing is written.",
)
@click.option("--image-set", default=None, help="Image feature set to use, where the store has several.")
@click.option(
    "--text-set", default=None, help="Text feature set (or per-fold group) to use, where the store has several."
)
@click.option(
    "--aggregate",
    type=click.Choice(["mean", "max"]),
    default="mean",
    show_default=True,
    help="How to combine a patient's image vectors, and a patient's text vectors, into one.",
)
@click.option(
    "--augmented",
    is_flag=True,
    help="Also train on augmented image views of the training patients; test on plain views only.",
)
@click.option(
    "--views",
    type=click.IntRange(min=1),
    default=None,
    help="With --augmented: train on augmented views 1..VIEWS only  [default: every stored view].",
)
@click.option(
    "--duplicates",
    type=click.Choice(["group", "ignore"]),
    default="group",
    show_default=True,
    help="group: patients with byte-identical images share a fold; ignore: split them freely (warns).",
)
@head_options(multiple_fusions=False)
@click.option(
    "--allow-leak",
    is_flag=True,
    help="Run even if a text encoder was fine-tuned on test patients; metrics.json then says leaked: true.",
)
@click.option(
    "--jobs",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Folds trained at once in worker processes; 0 means one per CPU core, or none for runs so small that starting workers costs more than it saves. Results do not depend on it.",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@report_errors(interrupted=INTERRUPTED_NOTHING_WRITTEN)
def train_head(labels_path, quiet, **options) -> None:
    """Cross-validate a classification head on stored vectors, with patient-level folds.

    Prints accuracy, precision, recall, F1, ROC AUC and balanced accuracy as
    mean ± std over folds and repeats, and writes metrics.json,
    predictions.csv (out-of-fold) and config.json into --out.
    """
    if options["fusion"] != "concat" and options["modality"] != "hybrid":
        raise click.UsageError(
            f"--fusion {options['fusion']} combines image and text vectors, so it needs --modality hybrid, "
            f"got --modality {options['modality']}; leave --fusion out for a unimodal head"
        )
    from tqdm import tqdm

    from mmdx.train.run import train_head as run_train_head

    total = options["folds"] * options["repeats"]
    with tqdm(total=total, desc="train-head", unit="fold", disable=quiet, leave=False, delay=0.5) as bar:
        result = run_train_head(labels=labels_path, **options, on_fold_done=lambda _: bar.update(1))

    report = result.report
    dropped = {reason: count for reason, count in report["dropped"].items() if count}
    click.echo(f"patients: {report['n_patients']} ({report['n_positive']} positive)")
    if dropped:
        click.echo("dropped: " + ", ".join(f"{count} {reason}" for reason, count in dropped.items()))
    if report["duplicate_groups"]:
        how = "kept in one fold each" if report["duplicates"] == "group" else "NOT grouped (--duplicates ignore)"
        click.echo(f"duplicate images: {report['duplicate_groups']} patient group(s), {how}")
    if report["leaked"]:
        click.echo("WARNING: leaked (--allow-leak): " + "; ".join(report["leak_findings"]))
    click.echo(format_table([report]))
    if options["out"]:
        click.echo(f"wrote {options['out']}")
    else:
        click.echo("no --out given, so nothing was written", err=True)


def format_table(reports: list[dict]) -> str:
    """Format one row per report: modality, patients and each metric as mean ± std."""
    header = ["modality", "patients", *METRIC_LABELS.values()]
    rows = []
    for report in reports:
        cells = [report["modality"], str(report["n_patients"])]
        for name in METRIC_LABELS:
            value = report["metrics"][name]
            cells.append(f"{value['mean']:.3f} ± {value['std']:.3f}")
        rows.append(cells)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
