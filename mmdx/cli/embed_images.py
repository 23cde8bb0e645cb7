"""``mmdx embed images``: parse options and call :func:`mmdx.embed.images.embed_images`."""

from __future__ import annotations

import importlib

import click

from mmdx.cli import INTERRUPTED_RESUMABLE, report_errors
from mmdx.errors import InputError


def _checked(module_name: str, function_name: str, *, keep_value: bool = False):
    """Return a click callback that checks a value with ``<module_name>.<function_name>``.

    The callback returns what the function returns, or the value as given
    with ``keep_value``. The function's ``InputError`` becomes a usage error
    (exit status 2). The module is imported only when the option is parsed,
    so ``mmdx --help`` stays fast.
    """

    def callback(ctx, param, value):
        if value is None:
            return None
        module = importlib.import_module(module_name)
        try:
            checked = getattr(module, function_name)(value)
        except InputError as exc:
            raise click.BadParameter(str(exc)) from None
        return value if keep_value else checked

    return callback


def _scanner_option(parser_name: str):
    """Return a click callback that parses a value with ``mmdx.embed.scanners.<parser_name>``."""
    return _checked("mmdx.embed.scanners", parser_name)


# The values of mmdx.embed.images.MOBILENET_ALPHAS, written out so that the
# help needs no import; a test checks that the two agree.
ALPHA_HELP = "0.35, 0.5, 0.75, 1.0, 1.3 or 1.4"


@click.command()
@click.argument("source", type=click.Path(exists=True, path_type=str))
@click.option("--store", required=True, type=click.Path(), help="Feature store file (.h5); created if absent.")
@click.option(
    "--weights",
    default="imagenet",
    show_default=True,
    metavar="imagenet|random|PATH",
    callback=_checked("mmdx.embed.images", "resolve_weights"),
    help="imagenet (Keras download), random (seeded by --random-seed), or PATH to a MobileNetV2 no-top Keras weights file (.weights.h5).",
)
@click.option("--image-size", default=128, show_default=True, type=click.IntRange(min=32), help="Height and width in pixels the images are resized to (bilinear, see --preprocessing).")
@click.option("--alpha", default=1.0, show_default=True, type=float, callback=_checked("mmdx.embed.images", "check_alpha"), help=f"MobileNetV2 width multiplier (filters per layer relative to the standard network): {ALPHA_HELP}.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1), help="Images per network call and per store commit.")
@click.option("--random-seed", default=0, show_default=True, type=int, help="Seed of the initial weights with --weights random; ignored otherwise.")
@click.option("--engine", type=click.Choice(["auto", "keras", "onnx"]), default="auto", show_default=True, help="Inference engine: auto uses ONNX Runtime when installed and it matches Keras, else Keras.")
@click.option("--preprocessing", type=click.Choice(["keras", "pillow"]), default="keras", show_default=True, help="How images are decoded and resized: keras gives the pixels of keras.utils.image_dataset_from_directory (TensorFlow JPEG decoding, tf.image.resize bilinear without antialiasing); pillow decodes and resizes with Pillow (antialiased), the only mode before 2026-12-05. Part of the feature set's identity.")
@click.option("--augment-views", default=0, show_default=True, type=click.IntRange(min=0), help="Number of randomly augmented views stored per image besides the plain one; views above it stored by an earlier run stay. The augmentation settings below are part of the feature set's identity even with 0, so a later run with more views adds them to the same set.")
@click.option("--rotation", default=40.0, show_default=True, type=click.FloatRange(0, 180), help="Augmentation: maximum rotation in degrees.")
@click.option("--shift", default=0.2, show_default=True, type=click.FloatRange(0, 1, max_open=True), help="Augmentation: maximum shift as a fraction of height and width.")
@click.option("--shear", default=0.2, show_default=True, type=click.FloatRange(0, 90), help="Augmentation: maximum shear angle in degrees (as Keras ImageDataGenerator).")
@click.option("--zoom", default=0.2, show_default=True, type=click.FloatRange(0, 1, max_open=True), help="Augmentation: zoom factors drawn from [1 - ZOOM, 1 + ZOOM].")
@click.option("--flip/--no-flip", default=True, show_default=True, help="Augmentation: flip horizontally with probability 0.5.")
@click.option("--fill", type=click.Choice(["nearest", "constant", "reflect", "wrap"]), default="nearest", show_default=True, help="Augmentation: how points outside the image are filled.")
@click.option("--augment-seed", default=0, show_default=True, type=int, help="Seed of the augmentation; the same seed reproduces the same views.")
@click.option("--window", default="stored", show_default=True, metavar="stored|minmax|CENTER,WIDTH", callback=_scanner_option("parse_window"), help="DICOM grey-level window: stored (the file's own), minmax, or CENTER,WIDTH in modality units.")
@click.option("--slices", default="middle", show_default=True, metavar="middle|all|every:N", callback=_scanner_option("parse_slices"), help="NIfTI slices to embed: middle, all or every:N.")
@click.option("--slice-axis", type=click.Choice(["axial", "coronal", "sagittal"]), default="axial", show_default=True, help="NIfTI slice axis, in RAS orientation.")
@click.option("--percentiles", default="0.5,99.5", show_default=True, metavar="LOW,HIGH", callback=_scanner_option("parse_percentiles"), help="NIfTI: percentiles (0-100) of each volume mapped to 0 and 255.")
@click.option("--id-pattern", default=None, metavar="REGEX", callback=_checked("mmdx.embed.image_sources", "compile_id_pattern", keep_value=True), help="Regular expression whose first group, searched in the file name, is the patient ID  [default: the file stem, or --id-column for a manifest].")
@click.option("--id-column", default="patient_id", show_default=True, help="Manifest column with the patient ID.")
@click.option("--path-column", default="image", show_default=True, help="Manifest column with the image path, relative to the manifest's folder.")
@click.option("--on-error", type=click.Choice(["fail", "skip"]), default="fail", show_default=True, help="On an unreadable or missing image: stop, or leave it out and list it in --rejects.")
@click.option("--rejects", type=click.Path(dir_okay=False), default=None, help="CSV of skipped images, written only when an image is skipped; one left by an earlier run is removed when none is. [default: <store>.rejects-images.csv]")
@click.option("--wait", type=click.FloatRange(min=0), default=0, show_default=True, help="Seconds to wait for another writer's lock on the store.")
@click.option("-q", "--quiet", is_flag=True, help="Hide the progress bar (shown by default).")
@report_errors(interrupted=INTERRUPTED_RESUMABLE)
def images(
    source, store, weights, image_size, alpha, batch_size, random_seed, engine, preprocessing, augment_views, rotation, shift,
    shear, zoom, flip, fill, augment_seed, window, slices, slice_axis, percentiles, id_pattern, id_column, path_column, on_error, rejects, wait, quiet,
) -> None:
    """Embed the images of SOURCE (a folder or a CSV manifest) with MobileNetV2 into --store.

    One 1280-d vector per image, keyed by patient ID and image path, plus
    --augment-views augmented views of each. Images already stored with the
    same content are skipped.
    """
    from mmdx.embed.augment import AugmentSettings
    from mmdx.embed.images import embed_images
    from mmdx.embed.scanners import ScannerOptions

    report = embed_images(
        source,
        store,
        weights=weights,
        image_size=image_size,
        alpha=alpha,
        batch_size=batch_size,
        random_seed=random_seed,
        augment_views=augment_views,
        augment=AugmentSettings(rotation=rotation, shift=shift, shear=shear, zoom=zoom, flip=flip, fill=fill),
        augment_seed=augment_seed,
        engine=engine,
        preprocessing=preprocessing,
        scanner_options=ScannerOptions(window=window, slices=slices, slice_axis=slice_axis, percentiles=percentiles),
        id_pattern=id_pattern,
        id_column=id_column,
        path_column=path_column,
        on_error=on_error,
        rejects=rejects,
        wait=wait,
        quiet=quiet,
    )
    click.echo(report.summary())
