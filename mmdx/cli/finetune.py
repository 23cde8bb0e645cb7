"""``mmdx finetune-text``: fine-tune a BERT-family encoder on a label, once or per fold."""

from __future__ import annotations

import click

from mmdx.cli import INTERRUPTED_RESUMABLE, report_errors
from mmdx.cli.options import label_options
from mmdx.cli.embed_texts import DEFAULT_TEXT_MODEL, text_source_options


def parse_trainable_layers(value: str) -> int | None:
    """Read --trainable-layers: a positive integer, or 'all' (returned as None)."""
    if value.strip().lower() == "all":
        return None
    if not value.strip().isdigit() or int(value) < 1:
        raise click.BadParameter(f"expected a positive integer or 'all', got {value!r}", param_hint="--trainable-layers")
    return int(value)


@click.command("finetune-text")
@click.argument("source", type=click.Path(dir_okay=False))
@label_options
@click.option(
    "--labels-id-column", default=None, help="Column of the labels CSV with patient IDs. [default: the --id-column value]"
)
@text_source_options
@click.option("--model", default=DEFAULT_TEXT_MODEL, show_default=True, help="Base encoder: local Hugging Face folder or hub name.")
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Output model folder; with --per-fold, the parent of fold-<k>/ folders.",
)
@click.option("--epochs", type=click.IntRange(min=1), default=3, show_default=True, help="Passes over the training texts.")
@click.option(
    "--learning-rate", type=click.FloatRange(min=0, min_open=True), default=2e-5, show_default=True, help="AdamW step size."
)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Texts per training step.")
@click.option(
    "--max-length",
    type=click.IntRange(min=2),
    default=256,
    show_default=True,
    help="Tokens per text for training and for embedding; longer texts are truncated.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the folds, the classifier and the batch order.")
@click.option("--pooling", type=click.Choice(["cls", "mean"]), default="cls", show_default=True, help="[CLS] token, or mean over real tokens.")
@click.option(
    "--trainable-layers",
    default="2",
    show_default=True,
    callback=lambda ctx, param, value: parse_trainable_layers(value),
    help="Train the top N encoder layers (and the classifier) and keep the embeddings and lower layers frozen; "
    "'all' trains every layer at about twice the cost per step.",
)
@click.option("--per-fold", is_flag=True, help="Fine-tune one encoder per fold on that fold's training patients only.")
@click.option("--folds", "n_folds", type=click.IntRange(min=2), default=5, show_default=True, help="Number of folds with --per-fold.")
@click.option(
    "--store",
    type=click.Path(),
    default=None,
    help="Feature store to embed every patient into with each fine-tuned encoder.",
)
@click.option("--embed-batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Texts per forward pass when embedding.")
@click.option("--wait", type=click.FloatRange(min=0), default=0.0, show_default=True, help="Seconds to wait for another writer of the store.")
@click.option("-q", "--quiet", is_flag=True, help="Hide the progress bars, transformers' own included.")
@report_errors(interrupted=INTERRUPTED_RESUMABLE)
def finetune_text(source, labels_path, label_column, positive, negative, labels_id_column, id_column, text_columns,
                  source_format, encoding, duplicates, model, out, epochs, learning_rate, batch_size, max_length, seed,
                  pooling, trainable_layers, per_fold, n_folds, store, embed_batch_size, wait, quiet) -> None:
    """Fine-tune a text encoder on SOURCE for a binary label and save it as a model folder.

    With --per-fold, each fold's encoder sees only that fold's training
    patients (the folds train-head uses for the same labels, --folds and
    --seed), so its vectors can be evaluated on the fold's test patients
    without leaking their labels. A saved folder whose training record
    matches is reused instead of trained again.
    """
    from mmdx.embed.finetune import finetune_text as run

    report = run(
        source,
        labels=labels_path,
        label_column=label_column,
        positive=positive,
        negative=list(negative) or None,
        labels_id_column=labels_id_column,
        id_column=id_column,
        text_columns=list(text_columns),
        source_format=source_format,
        encoding=encoding,
        duplicates=duplicates,
        model=model,
        out=out,
        epochs=epochs,
        learning_rate=learning_rate,
        batch_size=batch_size,
        max_length=max_length,
        seed=seed,
        pooling=pooling,
        trainable_layers=trainable_layers,
        per_fold=per_fold,
        n_folds=n_folds,
        store=store,
        embed_batch_size=embed_batch_size,
        wait=wait,
        quiet=quiet,
    )
    click.echo(report.summary())
