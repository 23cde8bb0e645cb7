"""``mmdx compare``: image, text and hybrid heads on the same folds, with paired tests.

:func:`head_options` also adds the fusion and regularisation options to
``mmdx train-head``.
"""

from __future__ import annotations

import click

from mmdx.cli import INTERRUPTED_NOTHING_WRITTEN, report_errors
from mmdx.cli.options import label_options

FUSION_CHOICES = ("concat", "late", "gated", "attention")


def head_options(multiple_fusions: bool):
    """Add the fusion strategy and regularisation options shared by train-head and compare.

    Options left unset are None and take the chosen strategy's defaults
    (``concat`` keeps the recipe: 10 epochs, no regularisation).
    """
    if multiple_fusions:
        fusion = click.option(
            "--fusion", "fusions", multiple=True, type=click.Choice(FUSION_CHOICES),
            help="Fusion strategy to train besides the recipe's concat hybrid; repeat for several.",
        )
    else:
        fusion = click.option(
            "--fusion", type=click.Choice(FUSION_CHOICES), default="concat", show_default=True,
            help="How a hybrid head combines image and text: the recipe's concatenation, late "
            "(stacked unimodal heads), gated or attention.",
        )
    options = [
        fusion,
        click.option("--epochs", type=click.IntRange(min=1), default=None,
                     help="Training epochs per fold (maximum with --early-stopping) [default: per strategy, 10 for concat]."),
        click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=None,
                     help="Dropout rate on each side's projection [default: per strategy, 0 for concat]."),
        click.option("--weight-decay", type=click.FloatRange(min=0), default=None,
                     help="Decoupled (AdamW) weight decay of the kernels [default: per strategy, 0 for concat]."),
        click.option("--early-stopping", type=click.IntRange(min=0), default=None,
                     help="Patience in epochs on a 20% validation split of the training part; 0 is off "
                     "[default: per strategy, 0 for concat]."),
        click.option("--class-weight", type=click.Choice(["balanced", "none"]), default=None,
                     help="Weigh classes in the loss by n / (2 n_class), or not [default: per strategy, none for concat]."),
        click.option("--standardize/--no-standardize", default=None,
                     help="Z-score each feature with the mean and std of the fold's training part "
                     "[default: per strategy, off for concat]."),
        click.option("--modality-dropout", type=click.FloatRange(0, 1, max_open=True), default=None,
                     help="Probability of hiding one modality of a training row per epoch [default: per strategy]."),
        click.option("--keep-missing", is_flag=True,
                     help="Keep patients with only one modality (missing side zeroed, mask input) instead of dropping them."),
    ]

    def decorate(function):
        for option in reversed(options):
            function = option(function)
        return function

    return decorate


@click.command("compare")
@click.option("--store", required=True, type=click.Path(), help="Feature store (HDF5) to read vectors from.")
@label_options
@click.option("--id-column", default="patient_id", show_default=True, help="Column of the labels CSV with patient IDs.")
@click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True, help="Number of patient-level folds.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the folds, weights and batch order.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True, help="Repeat the cross-validation; repeat r splits with seed + r.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Mini-batch size in rows.")
@click.option("--learning-rate", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True, help="Adam step size.")
@head_options(multiple_fusions=True)
@click.option("--image-set", default=None, help="Image feature set to use, where the store has several.")
@click.option("--text-set", default=None, help="Text feature set (or per-fold group) to use, where the store has several.")
@click.option("--aggregate", type=click.Choice(["mean", "max"]), default="mean", show_default=True,
              help="How to combine a patient's image vectors, and a patient's text vectors, into one.")
@click.option("--bootstrap", type=click.IntRange(min=100), default=2000, show_default=True, help="Resamples of the paired bootstrap.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Output folder for table.md, table.csv, tests.csv, compare.json, roc.png and one folder per head, "
              "replaced atomically; an existing folder must be empty or an earlier mmdx output. "
              "Without --out nothing is written.")
@click.option("--jobs", type=click.IntRange(min=0), default=0, show_default=True,
              help="Folds trained at once in worker processes; 0 means one per CPU core, or none for runs so small that starting workers costs more than it saves. Results do not depend on it.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@report_errors(interrupted=INTERRUPTED_NOTHING_WRITTEN)
def compare(labels_path, quiet, fusions, **options) -> None:
    """Cross-validate image, text and hybrid heads on the same folds and test the differences.

    Prints accuracy, precision, recall, F1, ROC AUC and balanced accuracy per
    head as mean and Student-t 95% interval over folds and repeats, then a
    paired bootstrap and DeLong's test of each hybrid head against the best
    unimodal head. A store with one modality gives the unimodal head only.
    """
    from tqdm import tqdm

    from mmdx.train.compare import compare as run_compare
    from mmdx.train.compare import format_markdown

    with tqdm(desc="compare", unit="fold", disable=quiet, leave=False, delay=0.5) as bar:
        result = run_compare(
            labels=labels_path, fusions=fusions, on_fold_done=lambda _: bar.update(1),
            on_head_start=lambda name: bar.set_postfix_str(name), **options,
        )
    first = next(iter(result.heads.values())).report
    click.echo(f"patients: {first['n_patients']} ({first['n_positive']} positive) in the first head")
    click.echo(format_markdown(result), nl=False)
    if options["out"]:
        click.echo(f"wrote {options['out']}")
    else:
        click.echo("no --out given, so nothing was written", err=True)
