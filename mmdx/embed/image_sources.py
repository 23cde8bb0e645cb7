"""Find the images of a source (folder or CSV manifest) and load their pixels.

A source becomes a list of :class:`~mmdx.embed.runner.Item` objects, one per
image, keyed by patient ID and the image path relative to the source. Two
functions form the extension point for other file formats (DICOM, NIfTI):

- an *expander* turns one file into one or more items (a volume file may
  yield one item per slice), see :func:`expand_image_file`;
- a *loader* returns one item's pixels as an ``HxW`` or ``HxWxC`` array,
  see :func:`load_pixels`.

Both are chosen by file suffix, or by a content check for files without a
known suffix, through :func:`register_image_format`; other files go through
Pillow. Colour conversion to 3-channel ``uint8`` RGB happens afterwards in
:func:`to_rgb_uint8`, whatever the format. DICOM and NIfTI
(:mod:`mmdx.embed.scanners`) are registered with default options when this
module is imported. A caller that needs other scanner options passes them to
:func:`collect_image_items`, which binds them to that one source and leaves
the registry unchanged.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from mmdx.embed.runner import Item, ItemFailure, sha256_bytes
from mmdx.errors import InputError

__all__ = [
    "COLOUR_RULE",
    "ImageRef",
    "ImageSource",
    "collect_image_items",
    "compile_id_pattern",
    "expand_image_file",
    "load_pixels",
    "register_image_format",
    "to_rgb_uint8",
]

logger = logging.getLogger(__name__)

# Written into the feature set config: a change to these rules changes the vectors.
COLOUR_RULE = (
    "EXIF orientation applied; RGB kept; L, 1 and 3-channel modes converted by Pillow; "
    "alpha (RGBA, LA, P with transparency) composited on black; CMYK converted by Pillow; "
    "16-bit, 32-bit and float images scaled by their own min/max to 0-255"
)

# Suffixes a folder scan treats as images when no other format is registered
# for them (the formats Keras flow_from_directory reads, plus .gif and .webp).
PILLOW_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".pbm", ".tif", ".tiff", ".gif", ".webp")


@dataclass(frozen=True, slots=True)
class ImageRef:
    """Location of an item's pixels: a file and, for multi-image files, the index in it."""

    path: Path
    index: int | None = None


ExpandFn = Callable[[Path, str, "str | None", str], list[Item]]
LoadFn = Callable[[Item], np.ndarray]


@dataclass(frozen=True)
class _ImageFormat:
    suffixes: tuple[str, ...]
    expand: ExpandFn
    load: LoadFn
    sniff: Callable[[Path], bool] | None = None
    patient_id_from_file: bool = False
    arrange: Callable[[list[Item]], list[Item]] | None = None
    config: Callable[[list[Item]], dict] | None = None


_FORMATS: list[_ImageFormat] = []


def register_image_format(
    suffixes: tuple[str, ...] | list[str],
    expand: ExpandFn,
    load: LoadFn,
    *,
    sniff: Callable[[Path], bool] | None = None,
    patient_id_from_file: bool = False,
    arrange: Callable[[list[Item]], list[Item]] | None = None,
    config: Callable[[list[Item]], dict] | None = None,
) -> None:
    """Route files whose name ends with one of ``suffixes`` to ``expand`` and ``load``.

    Parameters
    ----------
    suffixes
        Lower-case name endings with the dot, for example ``(".nii", ".nii.gz")``.
        Matching is case-insensitive; the last registration wins.
    expand
        ``expand(path, name, patient_id, content_hash) -> list[Item]``: the
        items of one file. ``path`` is absolute, ``name`` is the path as the
        source gives it, ``content_hash`` is the SHA-256 of the file bytes.
        Each item needs a distinct ``name`` (``"scan.nii.gz#slice 12"``) and an
        :class:`ImageRef` payload.
    load
        ``load(item) -> np.ndarray``: the pixels of one item as ``HxW`` or
        ``HxWxC`` (C = 1, 3 or 4), any numeric dtype; raise ``ValueError`` or
        ``OSError`` with a readable message for a file that cannot be read.
    sniff
        ``sniff(path) -> bool``: claims a file whose name matches no
        registered or Pillow suffix (DICOM files often have none).
    patient_id_from_file
        When true, a folder scan without ``--id-pattern`` passes
        ``patient_id=None`` to ``expand``, which reads the ID from the file.
    arrange
        ``arrange(items) -> items``: reorders all items of this format in a
        source (for example DICOM slices by series and position). They take
        the places the format's items had in the scan order.
    config
        ``config(items) -> dict``: entries for the feature set config that
        describe how this format's ``items`` were turned into pixels.
    """
    _FORMATS.insert(0, _make_format(suffixes, expand, load, sniff, patient_id_from_file, arrange, config))


def _make_format(suffixes, expand, load, sniff=None, patient_id_from_file=False, arrange=None, config=None) -> _ImageFormat:
    return _ImageFormat(tuple(s.lower() for s in suffixes), expand, load, sniff, patient_id_from_file, arrange, config)


def formats_with_scanner_options(options) -> tuple[_ImageFormat, ...]:
    """Return the registered formats with DICOM and NIfTI bound to ``options``, without changing the registry.

    The DICOM and NIfTI entries come first, so they take precedence over any
    registered handler for the same suffixes.
    """
    from mmdx.embed import scanners

    def expand(path: Path, name: str, patient_id: str | None, content_hash: str) -> list[Item]:
        return scanners.expand_scanner_file(path, options, name, patient_id, content_hash)

    def load(item: Item) -> np.ndarray:
        return scanners.load_scanner_pixels(item.payload, options)

    def config(items: list[Item]) -> dict:
        return scanners.scanner_config(options, items)

    dicom = _make_format(
        scanners.DICOM_SUFFIXES,
        expand,
        load,
        sniff=scanners.is_dicom,
        patient_id_from_file=True,
        arrange=scanners.arrange_dicom_items,
        config=config,
    )
    nifti = _make_format(scanners.NIFTI_SUFFIXES, expand, load, config=config)
    return (nifti, dicom, *_FORMATS)


def _format_for(path: Path, sniff: bool = True, formats: Sequence[_ImageFormat] | None = None) -> _ImageFormat | None:
    """Return the format of ``path`` by suffix, else by content unless it has a Pillow suffix.

    ``formats`` defaults to the registry.
    """
    formats = _FORMATS if formats is None else formats
    lower = path.name.lower()
    for image_format in formats:
        if lower.endswith(image_format.suffixes):
            return image_format
    if not sniff or path.suffix.lower() in PILLOW_SUFFIXES:
        return None
    for image_format in formats:
        if image_format.sniff is not None and image_format.sniff(path):
            return image_format
    return None


def is_image_name(path: Path, formats: Sequence[_ImageFormat] | None = None) -> bool:
    """Tell whether a folder scan should embed ``path``, by its suffix or a format's content check."""
    if path.name.startswith("."):
        return False
    return path.suffix.lower() in PILLOW_SUFFIXES or _format_for(path, formats=formats) is not None


def expand_image_file(path: Path, name: str, patient_id: str | None, formats: Sequence[_ImageFormat] | None = None) -> list[Item]:
    """Hash one file and turn it into its items (one for a plain image file).

    ``patient_id`` may be None only for formats registered with
    ``patient_id_from_file``. ``formats`` defaults to the registry. Raises
    ``InputError`` when the file cannot be read at all. Damaged image data
    is found later, when the pixels are loaded, and is a per-item failure.
    """
    try:
        content_hash = sha256_bytes(path.read_bytes())
    except OSError as exc:
        raise InputError(f"{name}: cannot read the file ({exc.strerror or exc}); check its permissions") from exc
    image_format = _format_for(path, formats=formats)
    if image_format is not None:
        return image_format.expand(path, name, patient_id, content_hash)
    if patient_id is None:
        raise ValueError("patient_id is required for files read by Pillow")
    return [Item(patient_id, name, content_hash, 0, ImageRef(path))]


def load_pixels(item: Item, formats: Sequence[_ImageFormat] | None = None, jpeg_decoder: str = "pillow") -> np.ndarray:
    """Load one item's pixels as an ``HxW`` or ``HxWxC`` array, by its format or Pillow.

    ``formats`` defaults to the registry; pass :attr:`ImageSource.formats`
    (or call :meth:`ImageSource.load_pixels`) for items of a source
    collected with scanner options. With ``jpeg_decoder="tensorflow"``,
    greyscale and RGB JPEG files are decoded by TensorFlow as the Keras
    image pipeline does (see :mod:`mmdx.embed.pixels`) and come back as
    ``HxWx3`` uint8; Pillow still reads their header, EXIF orientation
    included, and decodes every other file.
    """
    if jpeg_decoder not in ("pillow", "tensorflow"):
        raise ValueError(f"jpeg_decoder must be pillow or tensorflow, got {jpeg_decoder!r}")
    ref: ImageRef = item.payload
    image_format = _format_for(ref.path, formats=formats)
    if image_format is not None:
        return image_format.load(item)
    return _load_with_pillow(ref.path, jpeg_decoder)


def _load_with_pillow(path: Path, jpeg_decoder: str = "pillow") -> np.ndarray:
    from PIL import Image, ImageOps

    if path.stat().st_size == 0:
        raise ValueError("empty file (0 bytes)")
    try:
        with Image.open(path) as image:
            if jpeg_decoder == "tensorflow" and image.format == "JPEG" and image.mode in ("L", "RGB"):
                from mmdx.embed.pixels import apply_exif_orientation, decode_jpeg_like_keras

                orientation = image.getexif().get(0x0112)
                return apply_exif_orientation(decode_jpeg_like_keras(path.read_bytes()), orientation)
            image.load()
            image = ImageOps.exif_transpose(image)
            return _pillow_to_array(image)
    except Image.UnidentifiedImageError:
        raise ValueError("not an image file Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ValueError(
            f"rejected as a possible decompression bomb ({exc}); "
            "raise PIL.Image.MAX_IMAGE_PIXELS if the image is genuine"
        ) from None
    except (OSError, SyntaxError) as exc:
        # Pillow reports truncated and corrupt data as OSError, and some
        # plugins as SyntaxError.
        raise ValueError(f"truncated or corrupt image data ({exc})") from None


def _pillow_to_array(image) -> np.ndarray:
    """Convert a decoded Pillow image to an array that :func:`to_rgb_uint8` understands."""
    mode = image.mode
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("PA", "La", "RGBa"):
        image = image.convert("RGBA" if mode != "La" else "LA")
    elif mode in ("1", "CMYK", "YCbCr", "LAB", "HSV"):
        image = image.convert("L" if mode == "1" else "RGB")
    # Modes I;16*, I and F come out as uint16, int32 or float32 arrays, which
    # to_rgb_uint8 scales by min/max.
    return np.asarray(image)


def to_rgb_uint8(pixels: np.ndarray) -> np.ndarray:
    """Convert ``HxW`` or ``HxWxC`` pixels of any dtype to ``HxWx3`` uint8 RGB.

    ``uint8`` values are kept; any other dtype is scaled by the image's own
    minimum and maximum to 0-255 (a constant image becomes black). One
    channel is repeated three times, and an alpha channel (C = 2 or 4) is
    composited on black.
    """
    pixels = np.asarray(pixels)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.ndim != 3 or pixels.shape[2] not in (1, 2, 3, 4) or 0 in pixels.shape[:2]:
        raise ValueError(f"unsupported pixel array shape {pixels.shape}; expected HxW or HxWxC with C in 1-4")

    if pixels.dtype == np.uint8 and pixels.shape[2] in (1, 3):
        # Nothing to scale or composite (the common case, and 0.14 ms of a
        # 224 px slice's preparation when done the general way).
        return np.ascontiguousarray(np.repeat(pixels, 3, axis=2) if pixels.shape[2] == 1 else pixels)
    has_alpha = pixels.shape[2] in (2, 4)
    colour = pixels[:, :, :-1] if has_alpha else pixels
    if pixels.dtype == np.uint8:
        values = colour.astype(np.float32)
        alpha = pixels[:, :, -1:].astype(np.float32) / 255.0 if has_alpha else None
    else:
        values = _scale_min_max(colour.astype(np.float64))
        alpha = _scale_min_max(pixels[:, :, -1:].astype(np.float64)) / 255.0 if has_alpha else None
    if alpha is not None:
        values = values * alpha
    if values.shape[2] == 1:
        values = np.repeat(values, 3, axis=2)
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _scale_min_max(values: np.ndarray) -> np.ndarray:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros_like(values)
    low, high = float(finite.min()), float(finite.max())
    if high <= low:
        return np.zeros_like(values)
    scaled = (np.nan_to_num(values, nan=low, posinf=high, neginf=low) - low) * (255.0 / (high - low))
    return scaled


@dataclass
class ImageSource:
    """The items found in a source, what the scan left out, and the formats that read them."""

    items: list[Item]
    kind: str  # "folder" or "manifest"
    n_skipped_files: int = 0
    config: dict = field(default_factory=dict)  # feature set config entries of the registered formats used
    formats: tuple | None = None  # the formats the items were listed with (None: the registry)
    missing: list[ItemFailure] = field(default_factory=list)  # manifest rows whose file is missing (on_missing="skip")

    def load_pixels(self, item: Item, jpeg_decoder: str = "pillow") -> np.ndarray:
        """Load one item's pixels with the formats this source was collected with; see :func:`load_pixels`."""
        return load_pixels(item, self.formats, jpeg_decoder)


def collect_image_items(
    source: str | Path,
    *,
    id_pattern: str | None = None,
    id_column: str = "patient_id",
    path_column: str = "image",
    scanner_options=None,
    on_missing: str = "fail",
) -> ImageSource:
    """List the images of a folder or CSV manifest as items, without decoding them.

    Parameters
    ----------
    source
        A folder, scanned recursively (class subfolders as Keras
        ``flow_from_directory`` reads them, or flat), or a ``.csv`` manifest
        with one row per image.
    id_pattern
        A regular expression searched in each file name; its first group is
        the patient ID. Without it, a folder uses the file stem and a
        manifest uses ``id_column``.
    id_column, path_column
        Manifest columns with the patient ID and the image path. Paths are
        relative to the manifest's folder and must stay inside it.
    scanner_options : mmdx.embed.scanners.ScannerOptions, optional
        DICOM and NIfTI options for this source only; the registered
        handlers (default options unless changed) when None.
    on_missing
        A manifest row whose image file does not exist: ``"fail"`` raises
        ``InputError``; ``"skip"`` lists it in :attr:`ImageSource.missing`
        and goes on. A path outside the manifest's folder is an error
        either way, since it is a mistake in the manifest, not a lost file.

    Raises
    ------
    InputError
        For a missing source, a missing column, an empty ID, a path that
        leaves the manifest's folder (or, with ``on_missing="fail"``, does not
        exist), a file name that does not match ``id_pattern``, or an image
        listed twice for one patient.
    """
    if on_missing not in ("fail", "skip"):
        raise InputError(f"--on-error must be one of fail, skip, got {on_missing!r}")
    path = Path(source)
    pattern = compile_id_pattern(id_pattern)
    formats = tuple(_FORMATS) if scanner_options is None else formats_with_scanner_options(scanner_options)
    if path.is_dir():
        return _collect_folder(path, pattern, formats)
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise InputError(f"{path}: source must be a folder of images or a .csv manifest, got a {path.suffix or 'suffix-less'} file")
        return _collect_manifest(path, pattern, id_column, path_column, formats, on_missing)
    raise InputError(f"{path}: source not found; give a folder of images or a CSV manifest")


def compile_id_pattern(id_pattern: str | None) -> re.Pattern | None:
    """Compile ``--id-pattern``; raise ``InputError`` when it is invalid or has no group."""
    if id_pattern is None:
        return None
    try:
        pattern = re.compile(id_pattern)
    except re.error as exc:
        raise InputError(f"--id-pattern {id_pattern!r} is not a valid regular expression ({exc})") from exc
    if pattern.groups < 1:
        raise InputError(f"--id-pattern {id_pattern!r} has no group; put the patient ID part in parentheses, e.g. '^(\\w+?)_'")
    return pattern


def _patient_id_from_name(pattern: re.Pattern | None, file_name: str, where: str) -> str:
    if pattern is None:
        return Path(file_name).name.split(".")[0] if file_name.lower().endswith(".nii.gz") else Path(file_name).stem
    match = pattern.search(file_name)
    if match is None or not match.group(1):
        raise InputError(
            f"{where}: file name {file_name!r} does not match --id-pattern {pattern.pattern!r} "
            "(or its first group is empty); fix the pattern or rename the file"
        )
    return match.group(1)


def _collect_folder(folder: Path, pattern: re.Pattern | None, formats: tuple) -> ImageSource:
    expanded: list[tuple[_ImageFormat | None, list[Item]]] = []
    n_skipped = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder)
        name = relative.as_posix()
        # Hidden files and folders (.ipynb_checkpoints, .git, ...) hold copies and tool state, not data.
        if any(part.startswith(".") for part in relative.parts) or not is_image_name(path, formats):
            n_skipped += 1
            logger.debug("skipped non-image file %s", name)
            continue
        image_format = _format_for(path, formats=formats)
        if image_format is not None and image_format.patient_id_from_file:
            # The file stores its patient ID; a matching --id-pattern overrides it.
            match = pattern.search(path.name) if pattern is not None else None
            patient_id = match.group(1) if match is not None and match.group(1) else None
        else:
            patient_id = _patient_id_from_name(pattern, path.name, name)
        expanded.append((image_format, expand_image_file(path, name, patient_id, formats)))
    if n_skipped:
        logger.info("%s: skipped %d file(s) that are not images", folder, n_skipped)
    source = _finish_source(expanded, "folder", n_skipped, formats)
    if not source.items:
        raise InputError(f"{folder}: no image files found (looked for {', '.join(PILLOW_SUFFIXES)}); check the folder")
    return source


def _finish_source(
    expanded: list[tuple[_ImageFormat | None, list[Item]]], kind: str, n_skipped: int, formats: tuple
) -> ImageSource:
    """Apply each format's ``arrange`` within its own places and collect the formats' config entries."""
    slots = [(image_format, item) for image_format, items in expanded for item in items]
    config: dict = {}
    for image_format in {id(f): f for f, _ in slots if f is not None}.values():
        positions = [i for i, (f, _) in enumerate(slots) if f is image_format]
        own_items = [slots[i][1] for i in positions]
        if image_format.arrange is not None:
            own_items = image_format.arrange(own_items)
            for position, item in zip(positions, own_items):
                slots[position] = (image_format, item)
        if image_format.config is not None:
            config.update(image_format.config(own_items))
    return ImageSource([item for _, item in slots], kind, n_skipped, config, formats)


def _collect_manifest(
    manifest: Path, pattern: re.Pattern | None, id_column: str, path_column: str, formats: tuple, on_missing: str
) -> ImageSource:
    from mmdx.embed.text_sources import decode_text, read_table

    base = Path(os.path.abspath(manifest)).parent
    columns, rows = read_table(manifest, decode_text(manifest, manifest.read_bytes(), "utf-8"))
    needed = [path_column] if pattern is not None else [id_column, path_column]
    missing_columns = [column for column in needed if column not in columns]
    if missing_columns:
        option = {id_column: "--id-column", path_column: "--path-column"}
        hints = ", ".join(f"{column!r} (set {option[column]})" for column in missing_columns)
        raise InputError(f"{manifest}: missing column(s) {hints}; columns found: {', '.join(columns) or 'none'}")
    if not rows:
        raise InputError(f"{manifest}: the manifest has no rows")

    expanded: list[tuple[_ImageFormat | None, list[Item]]] = []
    missing_files: list[ItemFailure] = []
    seen: dict[tuple[str, str], int] = {}
    # Line numbers are the file's, header included, as an editor shows them.
    for line, row in rows:
        where = f"{manifest}, line {line}"
        given = (row.get(path_column) or "").strip()
        if not given:
            raise InputError(f"{where}: empty {path_column!r}; give the image path relative to {base}")
        file_path = _resolve_inside(base, given, where)
        if pattern is not None:
            patient_id = _patient_id_from_name(pattern, file_path.name, where)
        else:
            patient_id = (row.get(id_column) or "").strip()
            if not patient_id:
                raise InputError(f"{where}: empty {id_column!r} for image {given!r}; every row needs a patient ID")
        key = (patient_id, given)
        if key in seen:
            raise InputError(
                f"{where}: image {given!r} of patient {patient_id!r} is already listed on line {seen[key]}; "
                "remove the duplicate row"
            )
        seen[key] = line
        if not file_path.is_file():
            if on_missing == "fail":
                raise InputError(
                    f"{where}: image {given!r} not found (looked for {file_path}); fix the path or remove the row, "
                    "or pass --on-error skip to list missing images in the rejects CSV"
                )
            reason = f"image not found (manifest line {line}, looked for {file_path})"
            missing_files.append(ItemFailure(Item(patient_id, given, "", 0, ImageRef(file_path)), reason))
            continue
        expanded.append((_format_for(file_path, formats=formats), expand_image_file(file_path, given, patient_id, formats)))
    source = _finish_source(expanded, "manifest", 0, formats)
    source.missing = missing_files
    return source


def _resolve_inside(base: Path, given: str, where: str) -> Path:
    """Return the absolute path of ``given``, which must lie under ``base``; it need not exist.

    The containment check is lexical (``..`` is resolved, symbolic links are
    not), so a manifest may sit beside a symbolic link to its image folder.
    """
    candidate = Path(given)
    if candidate.is_absolute():
        raise InputError(f"{where}: image path {given!r} is absolute; write it relative to the manifest's folder {base}")
    joined = Path(os.path.normpath(base / candidate))
    if not joined.is_relative_to(base):
        raise InputError(
            f"{where}: image path {given!r} resolves to {joined}, outside the manifest's folder {base}; "
            "move the image under that folder or the manifest above it"
        )
    return joined


def _register_scanner_formats() -> None:
    # scanners imports pydicom and nibabel only when it reads a file, so
    # registering costs nothing where they are not installed.
    from mmdx.embed.scanners import register_scanner_formats

    register_scanner_formats()


_register_scanner_formats()
