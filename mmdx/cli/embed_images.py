"""``mmdx embed images``: parse options and call :func:`mmdx.embed.images.embed_images`."""

from __future__ import annotations

import click

from mmdx.cli import report_errors


@click.command()
@click.argument("source", type=click.Path(exists=True, path_type=str))
@click.option("--store", required=True, type=click.Path(dir_okay=False), help="Feature store file (.h5); created if absent.")
@click.option(
    "--weights",
    default="imagenet",
    show_default=True,
    help="imagenet (Keras download), random, or PATH to a MobileNetV2 no-top Keras weights file.",
)
@click.option("--image-size", default=128, show_default=True, type=click.IntRange(min=32), help="Height and width in pixels the images are resized to (bilinear).")
@click.option("--alpha", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True), help="MobileNetV2 width multiplier.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1), help="Images per network call and per store commit.")
@click.option("--random-seed", default=0, show_default=True, type=int, help="Seed of the initial weights with --weights random.")
@click.option("--id-pattern", default=None, help="Regular expression whose first group, searched in the file name, is the patient ID (default: the file stem, or --id-column for a manifest).")
@click.option("--id-column", default="patient_id", show_default=True, help="Manifest column with the patient ID.")
@click.option("--path-column", default="image", show_default=True, help="Manifest column with the image path, relative to the manifest's folder.")
@click.option("--on-error", type=click.Choice(["fail", "skip"]), default="fail", show_default=True, help="On an unreadable image: stop, or leave it out and list it in --rejects.")
@click.option("--rejects", type=click.Path(dir_okay=False), default=None, help="CSV of skipped images [default: <store>.rejects-images.csv].")
@click.option("--wait", type=click.FloatRange(min=0), default=0, show_default=True, help="Seconds to wait for another writer's lock on the store.")
@click.option("--quiet", is_flag=True, help="Hide the progress bar.")
@report_errors
def images(source, store, weights, image_size, alpha, batch_size, random_seed, id_pattern, id_column, path_column, on_error, rejects, wait, quiet) -> None:
    """Embed the images of SOURCE (a folder or a CSV manifest) with MobileNetV2 into --store.

    One 1280-d vector per image, keyed by patient ID and image path; images
    already stored with the same content are skipped.
    """
    from mmdx.embed.images import embed_images

    report = embed_images(
        source,
        store,
        weights=weights,
        image_size=image_size,
        alpha=alpha,
        batch_size=batch_size,
        random_seed=random_seed,
        id_pattern=id_pattern,
        id_column=id_column,
        path_column=path_column,
        on_error=on_error,
        rejects=rejects,
        wait=wait,
        quiet=quiet,
    )
    click.echo(report.summary())
