"""``mmdx embed texts``: embed clinical texts with a BERT-family encoder."""

from __future__ import annotations

import click

from mmdx.cli import INTERRUPTED_RESUMABLE, report_errors

DEFAULT_TEXT_MODEL = "dmis-lab/biobert-base-cased-v1.1"


def text_source_options(function):
    """Add the options that set how a text source is read (shared with finetune-text)."""
    options = [
        click.option("--id-column", default="patient_id", show_default=True, help="Column of patient IDs (read as strings)."),
        click.option(
            "--text-column",
            "text_columns",
            multiple=True,
            required=True,
            help="Column of report text; repeat to join several columns, in order, with a blank line between.",
        ),
        click.option(
            "--format",
            "source_format",
            type=click.Choice(["csv", "tsv", "jsonl"]),
            default=None,
            help="Source format; by default taken from the extension (.csv, .tsv, .jsonl, .ndjson).",
        ),
        click.option("--encoding", default="utf-8", show_default=True, help="Text encoding of the source file."),
        click.option(
            "--duplicates",
            type=click.Choice(["error", "keep-all"]),
            default="error",
            show_default=True,
            help="A patient ID with different texts: stop with an error, or keep each text as its own item.",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


@click.command()
@click.argument("source", type=click.Path(dir_okay=False))
@click.option("--store", required=True, type=click.Path(), help="Feature store (HDF5); created when missing.")
@text_source_options
@click.option(
    "--model",
    default=DEFAULT_TEXT_MODEL,
    show_default=True,
    help="Local Hugging Face model folder or hub name of a BERT-family encoder.",
)
@click.option(
    "--max-length",
    type=click.IntRange(min=2),
    default=None,
    help="Tokens per text, special tokens included; longer texts are truncated and counted. [default: the model's maximum, 512 for BERT]",
)
@click.option("--pooling", type=click.Choice(["cls", "mean"]), default="cls", show_default=True, help="[CLS] token, or mean over real tokens.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Texts per forward pass.")
@click.option(
    "--on-error",
    type=click.Choice(["fail", "skip"]),
    default="skip",
    show_default=True,
    help="A row whose text is empty (every text column empty or N/A): stop, or skip it with a warning, "
    "count it as skipped and list it in --rejects.",
)
@click.option(
    "--rejects",
    type=click.Path(dir_okay=False),
    default=None,
    help="CSV listing skipped texts and why, written only when a text is skipped; one left by an earlier run is removed when none is. [default: <store>.rejects-texts.csv]",
)
@click.option("--wait", type=click.FloatRange(min=0), default=0.0, show_default=True, help="Seconds to wait for another writer of the store.")
@click.option("-q", "--quiet", is_flag=True, help="Hide the progress bars, transformers' own included.")
@report_errors(interrupted=INTERRUPTED_RESUMABLE)
def texts(source, store, id_column, text_columns, source_format, encoding, duplicates, model, max_length, pooling,
          batch_size, on_error, rejects, wait, quiet) -> None:
    """Embed the texts of SOURCE (CSV, TSV or JSON lines) into the feature store.

    Re-running embeds only texts that are new or changed. A text is keyed
    by patient ID and its order within the patient, not by row number.
    """
    from mmdx.embed.texts import embed_texts

    report = embed_texts(
        source,
        store,
        text_columns=list(text_columns),
        id_column=id_column,
        model=model,
        max_length=max_length,
        pooling=pooling,
        batch_size=batch_size,
        source_format=source_format,
        encoding=encoding,
        duplicates=duplicates,
        on_error=on_error,
        rejects=rejects,
        wait=wait,
        quiet=quiet,
    )
    click.echo(report.summary())
