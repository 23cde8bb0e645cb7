"""Read scanner formats (DICOM and NIfTI) as 8-bit slices for the image encoder.

Each DICOM frame and each selected NIfTI slice becomes one item of its
patient. Items are listed by :func:`expand_scanner_file` without decoding
pixels, and :func:`load_scanner_pixels` turns one item into an ``HxW``
``uint8`` array (``HxWx3`` for colour DICOM), which the image loader then
treats like any 8-bit image.

DICOM grey levels
    stored value -> Modality LUT (Rescale Slope/Intercept, or the Modality
    LUT Sequence) -> window -> 0..255, inverted for MONOCHROME1. The window
    is the file's own Window Center/Width (the first pair when several are
    stored), a ``CENTER,WIDTH`` given by the user, or the image's own
    min/max (also the fallback of ``stored`` for a file without a window). With a centre ``c`` and width ``w >= 1``, a value ``x`` maps by
    the LINEAR function of DICOM PS3.3 C.11.2.1.2.1 with output range 0..255::

        x <= c - 0.5 - (w - 1) / 2  ->  0
        x >  c - 0.5 + (w - 1) / 2  ->  255
        otherwise                   ->  ((x - (c - 0.5)) / (w - 1) + 0.5) * 255

    rounded to the nearest integer (``w == 1`` is a threshold at ``c - 0.5``).
    The min/max window maps ``min -> 0`` and ``max -> 255`` linearly.

NIfTI grey levels
    The volume is reoriented to the closest RAS orientation
    (``nibabel.as_closest_canonical``), then scaled per volume: the
    ``low``/``high`` percentiles map to 0/255 and values outside are clipped.
    A slice is shown with the superior (axial: anterior) side at the top.

Patient IDs come from the DICOM PatientID tag, or the NIfTI file name
without ``.nii``/``.nii.gz``, unless the caller gives one (manifest or
``--id-pattern``). Only the tags needed for pixels and ordering are parsed,
except in a deflated file, which is read whole. Logs and messages show no tag
values besides the patient ID, series UID, transfer syntax, SOP class and
window, so names, birth dates and other identifying tags stay out of them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmdx.embed.runner import Item
from mmdx.errors import InputError

__all__ = [
    "DICOM_SUFFIXES",
    "NIFTI_SUFFIXES",
    "DicomRef",
    "NiftiRef",
    "ScannerOptions",
    "arrange_dicom_items",
    "expand_scanner_file",
    "is_dicom",
    "is_nifti",
    "load_scanner_pixels",
    "parse_percentiles",
    "parse_slices",
    "parse_window",
    "register_scanner_formats",
    "scale_percentiles",
    "scanner_config",
    "window_linear",
    "window_min_max",
]

logger = logging.getLogger(__name__)

DICOM_SUFFIXES = (".dcm", ".dicom")
DEFLATED_EXPLICIT_VR = "1.2.840.10008.1.2.1.99"
NIFTI_SUFFIXES = (".nii", ".nii.gz")
SLICE_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}

# Patient ID of an item whose file header cannot be read. Such an item is
# never stored: loading it fails and the failure follows --on-error.
UNREADABLE_PATIENT_ID = "(unreadable file)"

# Tags parsed when listing a DICOM file. Parsing nothing else keeps names,
# birth dates and other identifying values out of memory and messages.
_LISTING_TAGS = [
    "SOPClassUID",
    "PatientID",
    "SeriesInstanceUID",
    "InstanceNumber",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "NumberOfFrames",
    "Rows",
    "Columns",
]

# Tags read with the pixels, besides the group 0028 image pixel elements that
# pydicom always returns: the per-frame and shared functional groups of
# enhanced multi-frame files, where rescale and window may live.
_FUNCTIONAL_GROUP_TAGS = [0x52009229, 0x52009230]

# Transfer syntaxes whose decoders are optional packages, and what to install.
_DECODER_HINTS = {
    "1.2.840.10008.1.2.4.50": "pillow, pylibjpeg + pylibjpeg-libjpeg, or gdcm",
    "1.2.840.10008.1.2.4.51": "pylibjpeg + pylibjpeg-libjpeg, or gdcm",
    "1.2.840.10008.1.2.4.57": "pylibjpeg + pylibjpeg-libjpeg, or gdcm",
    "1.2.840.10008.1.2.4.70": "pylibjpeg + pylibjpeg-libjpeg, or gdcm",
    "1.2.840.10008.1.2.4.80": "pylibjpeg + pylibjpeg-libjpeg, pyjpegls, or gdcm",
    "1.2.840.10008.1.2.4.81": "pylibjpeg + pylibjpeg-libjpeg, pyjpegls, or gdcm",
    "1.2.840.10008.1.2.4.90": "pylibjpeg + pylibjpeg-openjpeg, gdcm, or pillow built with OpenJPEG",
    "1.2.840.10008.1.2.4.91": "pylibjpeg + pylibjpeg-openjpeg, gdcm, or pillow built with OpenJPEG",
    "1.2.840.10008.1.2.4.201": "pylibjpeg + pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.202": "pylibjpeg + pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "pylibjpeg + pylibjpeg-openjpeg",
}


# Options ------------------------------------------------------------------


@dataclass(frozen=True)
class ScannerOptions:
    """Options that turn scanner files into 8-bit slices; every field changes the vectors.

    Parameters
    ----------
    window
        ``"stored"`` (the file's Window Center/Width, or the image's min/max
        where the file stores none), ``"minmax"``, or a ``(center, width)``
        pair in modality units (for CT, Hounsfield units).
    slices
        NIfTI slices to embed: ``"middle"``, ``"all"`` or ``"every:N"``.
    slice_axis
        ``"axial"``, ``"coronal"`` or ``"sagittal"``, in RAS orientation.
    percentiles
        Low and high percentile of each NIfTI volume mapped to 0 and 255.
    """

    window: str | tuple[float, float] = "stored"
    slices: str = "middle"
    slice_axis: str = "axial"
    percentiles: tuple[float, float] = (0.5, 99.5)

    def __post_init__(self) -> None:
        # Accept the command-line spellings too, so Python callers may write window="40,400".
        window = self.window
        if isinstance(window, str):
            window = parse_window(window)
        else:
            window = parse_window(",".join(str(float(v)) for v in window))
        object.__setattr__(self, "window", window)
        object.__setattr__(self, "slices", parse_slices(self.slices))
        if self.slice_axis not in SLICE_AXES:
            raise InputError(f"--slice-axis {self.slice_axis!r} is invalid; give one of {', '.join(SLICE_AXES)}")
        percentiles = self.percentiles
        if not isinstance(percentiles, str):
            percentiles = ",".join(str(float(v)) for v in percentiles)
        object.__setattr__(self, "percentiles", parse_percentiles(percentiles))

    def window_label(self) -> str:
        """Return the window as the user writes it: ``stored``, ``minmax`` or ``CENTER,WIDTH``."""
        if isinstance(self.window, tuple):
            return f"{self.window[0]:g},{self.window[1]:g}"
        return self.window

    def dicom_key(self) -> dict:
        """Return the options that change DICOM pixels, for hashes and the feature set config."""
        return {"window": self.window_label()}

    def nifti_key(self) -> dict:
        """Return the options that change NIfTI pixels, for hashes and the feature set config."""
        return {"slices": self.slices, "slice_axis": self.slice_axis, "percentiles": list(self.percentiles)}


def parse_window(text: str) -> str | tuple[float, float]:
    """Parse ``--window``: ``stored``, ``minmax`` or ``CENTER,WIDTH`` with a width of at least 1."""
    value = text.strip().lower()
    if value in ("stored", "minmax"):
        return value
    parts = value.split(",")
    try:
        center, width = (float(part) for part in parts)
    except ValueError:
        raise InputError(
            f"--window {text!r} is invalid; give stored, minmax or CENTER,WIDTH (for example 40,400)"
        ) from None
    if not (math.isfinite(center) and math.isfinite(width)) or width < 1:
        raise InputError(f"--window {text!r}: the width must be a finite number of at least 1 (DICOM linear window)")
    return (center, width)


def parse_slices(text: str) -> str:
    """Parse ``--slices``: ``middle``, ``all`` or ``every:N`` with N >= 1; return the canonical spelling."""
    value = text.strip().lower()
    if value in ("middle", "all"):
        return value
    match = re.fullmatch(r"every:(\d+)", value)
    if match is None or int(match.group(1)) < 1:
        raise InputError(f"--slices {text!r} is invalid; give middle, all or every:N with N >= 1 (for example every:4)")
    return f"every:{int(match.group(1))}"


def parse_percentiles(text: str) -> tuple[float, float]:
    """Parse ``--percentiles LOW,HIGH`` with 0 <= LOW < HIGH <= 100."""
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise InputError(f"--percentiles {text!r} is invalid; give LOW,HIGH (for example 0.5,99.5)") from None
    if not 0 <= low < high <= 100:
        raise InputError(f"--percentiles {text!r}: need 0 <= LOW < HIGH <= 100")
    return (low, high)


def scanner_config(options: ScannerOptions, items: list[Item]) -> dict:
    """Return the feature set config entries for the scanner formats present in ``items``.

    Only the options of formats that occur are recorded, so a DICOM-only run
    does not change feature set when ``--slices`` changes.
    """
    formats = sorted({_format_of(item.payload) for item in items} - {None})
    config: dict = {}
    if "dicom" in formats:
        import pydicom

        config["dicom"] = {**options.dicom_key(), "pydicom": pydicom.__version__}
    if "nifti" in formats:
        import nibabel

        config["nifti"] = {**options.nifti_key(), "nibabel": nibabel.__version__}
    return config


def _format_of(payload) -> str | None:
    if isinstance(payload, DicomRef):
        return "dicom"
    if isinstance(payload, NiftiRef):
        return "nifti"
    return None


# Detection and listing ----------------------------------------------------


# The two payload types have the ``path`` and ``index`` fields of
# mmdx.embed.image_sources.ImageRef, which the image loader reads. They do not
# subclass it, because image_sources imports this module.


@dataclass(frozen=True)
class DicomRef:
    """One DICOM frame (``index`` is the frame, None for a single-frame file) and its place in the series."""

    path: Path
    index: int | None = None
    series_uid: str = ""
    instance_number: int | None = None
    position: float | None = None  # along the slice normal, in mm


@dataclass(frozen=True)
class NiftiRef:
    """One NIfTI slice (``index``) along ``axis`` of the RAS-reoriented volume."""

    path: Path
    index: int | None = None
    axis: int = 2


def is_dicom(path: str | Path) -> bool:
    """Tell whether ``path`` is a DICOM file: ``DICM`` after the 128-byte preamble, or a .dcm/.dicom name.

    Many DICOM files have no extension, so the content counts. A .dcm file
    without the marker counts too, so that a damaged file gets a DICOM error
    message rather than an image-reader one.
    """
    path = Path(path)
    return path.name.lower().endswith(DICOM_SUFFIXES) or _has_dicom_marker(path)


def _has_dicom_marker(path: Path) -> bool:
    # NOTE: DICOM files without the Part 10 header (no preamble, no DICM)
    # are neither detected nor read.
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def is_nifti(path: str | Path) -> bool:
    """Tell whether ``path`` is a NIfTI file by its name (``.nii`` or ``.nii.gz``)."""
    return Path(path).name.lower().endswith(NIFTI_SUFFIXES)


def expand_scanner_file(
    path: str | Path,
    options: ScannerOptions,
    name: str | None = None,
    patient_id: str | None = None,
    content_hash: str | None = None,
) -> list[Item]:
    """List the items of one DICOM or NIfTI file without decoding pixels.

    Parameters
    ----------
    path
        The file.
    options
        Window and slice choices; they are part of each item's content hash.
    name
        The file as the source names it (default: ``path``); item names add
        ``#series=UID``, ``#frame=N`` or ``#slice=K``.
    patient_id
        The caller's patient ID (from a manifest or ``--id-pattern``). When
        None, DICOM items take the PatientID tag and NIfTI items the file
        name without ``.nii``/``.nii.gz``.
    content_hash
        SHA-256 of the file bytes, when the caller has it already.

    Returns
    -------
    list of Item
        One per DICOM frame or selected NIfTI slice, each with a
        :class:`DicomRef` or :class:`NiftiRef` payload. A DICOM file whose
        header cannot be read gives one item whose loading fails with the
        reason, so that it follows ``--on-error``.

    Raises
    ------
    InputError
        When ``patient_id`` is None and the DICOM file has no PatientID, or
        when the NIfTI volume is empty.
    """
    path = Path(path)
    name = str(path) if name is None else name
    if content_hash is None:
        content_hash = hashlib.sha256(path.read_bytes()).hexdigest()
    if is_nifti(path):
        return _expand_nifti(path, name, patient_id, content_hash, options)
    return _expand_dicom(path, name, patient_id, content_hash, options)


def _item_hash(file_hash: str, index: int | None, options_key: dict) -> str:
    """Hash of the file bytes, the frame or slice index and the pixel options."""
    text = json.dumps({"file": file_hash, "index": index, "options": options_key}, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _expand_dicom(path: Path, name: str, patient_id: str | None, file_hash: str, options: ScannerOptions) -> list[Item]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    options_key = options.dicom_key()
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_LISTING_TAGS, force=True)
        # force=True also "reads" files that are not DICOM; a real image header has Rows.
        rows = ds.get("Rows")
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError) as exc:
        logger.debug("%s: DICOM header not readable (%s)", name, type(exc).__name__)
        rows = None
        ds = None
    if ds is not None and rows is None:
        sop_class = _sop_class_name(ds)
        if sop_class and "Image" not in sop_class:
            # DICOMDIR, structured reports, RT plans, waveforms: valid DICOM without pixels.
            logger.info("%s: skipped a DICOM %s object, which has no image", name, sop_class)
            return []
    if ds is None or rows is None:
        fallback = patient_id or UNREADABLE_PATIENT_ID
        return [Item(fallback, name, _item_hash(file_hash, None, options_key), 0, DicomRef(path))]

    if patient_id is None:
        patient_id = str(ds.get("PatientID") or "").strip()
        if not patient_id:
            raise InputError(
                f"{name}: DICOM PatientID (0010,0020) is missing or empty; "
                "give patient IDs with --id-pattern (a regular expression on the file name) or a CSV manifest"
            )
    series_uid = str(ds.get("SeriesInstanceUID") or "")
    instance = _int_or_none(ds.get("InstanceNumber"))
    position = _slice_position(ds)
    n_frames = _int_or_none(ds.get("NumberOfFrames")) or 1

    base = f"{name}#series={series_uid}" if series_uid else name
    if n_frames == 1:
        ref = DicomRef(path, None, series_uid, instance, position)
        return [Item(patient_id, base, _item_hash(file_hash, None, options_key), 0, ref)]
    return [
        Item(
            patient_id,
            f"{base}#frame={frame}",
            _item_hash(file_hash, frame, options_key),
            0,
            DicomRef(path, frame, series_uid, instance, position),
        )
        for frame in range(n_frames)
    ]


def _sop_class_name(ds) -> str:
    """Return the name of the SOP class (from the dataset or the file meta), or "" when unknown."""
    from pydicom.uid import UID

    uid = ds.get("SOPClassUID")
    meta = getattr(ds, "file_meta", None)
    if not uid and meta is not None:
        uid = meta.get("MediaStorageSOPClassUID")
    if not uid:
        return ""
    name = UID(str(uid)).name
    # pydicom returns the UID itself for a UID it does not know.
    return "" if name == str(uid) else name


def _int_or_none(value) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _slice_position(ds) -> float | None:
    """Project ImagePositionPatient on the slice normal, which orders slices of one series."""
    try:
        position = np.asarray([float(v) for v in ds.ImagePositionPatient])
        orientation = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    except (AttributeError, TypeError, ValueError):
        return None
    if position.shape != (3,) or orientation.shape != (6,):
        return None
    return float(np.dot(np.cross(orientation[:3], orientation[3:]), position))


def arrange_dicom_items(items: list[Item]) -> list[Item]:
    """Order the DICOM items of a source by patient, series, InstanceNumber and slice position.

    The slots that DICOM items occupy in ``items`` are refilled in that order;
    other items keep their places.
    """
    slots = [i for i, item in enumerate(items) if isinstance(item.payload, DicomRef)]

    def sort_key(item: Item):
        ref: DicomRef = item.payload
        return (
            item.patient_id,
            ref.series_uid,
            ref.instance_number is None,
            ref.instance_number or 0,
            ref.position is None,
            ref.position or 0.0,
            item.name.split("#", 1)[0],
            -1 if ref.index is None else ref.index,
        )

    ordered = sorted((items[i] for i in slots), key=sort_key)
    arranged = list(items)
    for slot, item in zip(slots, ordered):
        arranged[slot] = item
    return arranged


def _nifti_stem(path: Path) -> str:
    lower = path.name.lower()
    for suffix in (".nii.gz", ".nii"):
        if lower.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def _expand_nifti(path: Path, name: str, patient_id: str | None, file_hash: str, options: ScannerOptions) -> list[Item]:
    import nibabel as nib

    try:
        image = nib.load(path)
        shape = image.shape
        orientation = nib.orientations.io_orientation(image.affine)
    except Exception as exc:  # nibabel raises many types for damaged headers
        logger.debug("%s: NIfTI header not readable (%s)", name, type(exc).__name__)
        fallback = patient_id or _nifti_stem(path)
        return [Item(fallback, name, _item_hash(file_hash, None, options.nifti_key()), 0, NiftiRef(path))]

    if patient_id is None:
        patient_id = _nifti_stem(path)
    axis = SLICE_AXES[options.slice_axis]
    canonical_shape = _canonical_shape(shape, orientation)
    n_slices = canonical_shape[axis]
    if n_slices == 0 or 0 in canonical_shape:
        raise InputError(f"{name}: the NIfTI volume is empty (shape {tuple(shape)}); remove the file")
    options_key = options.nifti_key()
    return [
        Item(patient_id, f"{name}#slice={k}", _item_hash(file_hash, k, options_key), 0, NiftiRef(path, k, axis))
        for k in _select_slices(n_slices, options.slices)
    ]


def _canonical_shape(shape: tuple[int, ...], orientation: np.ndarray) -> tuple[int, int, int]:
    """Shape of the first three axes after reorientation to RAS (2-D volumes get a third axis of 1)."""
    spatial = list(shape[:3]) + [1] * (3 - len(shape[:3]))
    canonical = [1, 1, 1]
    for source_axis, (target_axis, _flip) in enumerate(orientation[:3]):
        if not np.isnan(target_axis):
            canonical[int(target_axis)] = spatial[source_axis]
    return tuple(canonical)


def _select_slices(n_slices: int, choice: str) -> list[int]:
    if choice == "middle":
        return [n_slices // 2]
    if choice == "all":
        return list(range(n_slices))
    step = int(choice.split(":")[1])
    return list(range(0, n_slices, step))


# Pixels -------------------------------------------------------------------


def load_scanner_pixels(payload: DicomRef | NiftiRef, options: ScannerOptions) -> np.ndarray:
    """Load one scanner item as ``uint8``: ``HxW`` grey, or ``HxWx3`` for colour DICOM.

    Raises
    ------
    ValueError
        With a message naming what is wrong (not DICOM, truncated, no pixel
        data, a transfer syntax without a decoder, an invalid window), for
        the caller to report as a failure of this item.
    """
    if isinstance(payload, NiftiRef) or is_nifti(payload.path):
        return _load_nifti_slice(payload, options)
    return _load_dicom_frame(payload, options)


def _load_dicom_frame(ref: DicomRef, options: ScannerOptions) -> np.ndarray:
    header, pixels = _read_dicom_pixels(ref)
    frame = ref.index
    photometric = str(header.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        return _scale_colour(apply_color_lut(pixels, header), 16)
    if pixels.ndim == 3:
        # pydicom has already converted YBR colour spaces to RGB.
        return _scale_colour(pixels, int(header.get("BitsStored", 8)))

    values = _apply_modality_lut(pixels, header, frame)
    center_width = _window_for(header, frame, options)
    grey = window_linear(values, *center_width) if center_width else window_min_max(values)
    if photometric == "MONOCHROME1":
        grey = 255 - grey
    return grey


_NOT_DICOM = (
    "not a DICOM file: no 'DICM' marker after the 128-byte preamble "
    "(files without the DICOM Part 10 header are not read)"
)


def _read_dicom_pixels(ref: DicomRef):
    """Decode one frame of a DICOM file; return the image pixel header and the frame."""
    from pydicom import Dataset
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import pixel_array

    if not _has_dicom_marker(ref.path):
        raise ValueError(_NOT_DICOM)
    header = Dataset()
    try:
        pixels = pixel_array(str(ref.path), ds_out=header, specific_tags=_FUNCTIONAL_GROUP_TAGS, index=ref.index)
    except InvalidDicomError:
        raise ValueError(_NOT_DICOM) from None
    except (EOFError, OSError) as exc:
        raise ValueError(f"truncated or unreadable DICOM file ({type(exc).__name__}: {_first_line(exc)})") from None
    except AttributeError as exc:
        if "pixel data" not in str(exc).lower():
            raise ValueError(f"invalid DICOM image header ({_first_line(exc)})") from None
        if _transfer_syntax(ref.path) != DEFLATED_EXPLICIT_VR:
            raise ValueError("the DICOM file has no pixel data (Pixel Data (7FE0,0010) missing)") from None
        # pixel_array() reading from a path does not inflate a deflated
        # dataset (pydicom 3.0), but dcmread() does.
        return _read_deflated_pixels(ref)
    except (NotImplementedError, RuntimeError) as exc:
        syntax = header.get((0x0002, 0x0010))
        raise ValueError(_decoder_message(str(syntax.value) if syntax else _transfer_syntax(ref.path), exc)) from None
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        message = _first_line(exc)
        if "pixel data" in message.lower() and ("no " in message.lower() or "missing" in message.lower()):
            raise ValueError("the DICOM file has no pixel data (Pixel Data (7FE0,0010) missing)") from None
        raise ValueError(f"truncated or invalid DICOM pixel data ({type(exc).__name__}: {message})") from None
    return header, pixels


def _read_deflated_pixels(ref: DicomRef):
    import pydicom
    from pydicom.pixels import pixel_array

    try:
        dataset = pydicom.dcmread(ref.path)
        return dataset, pixel_array(dataset, index=ref.index)
    except (EOFError, OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise ValueError(f"truncated or invalid deflated DICOM file ({type(exc).__name__}: {_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _transfer_syntax(path: Path) -> str:
    import pydicom

    try:
        return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"]).file_meta.TransferSyntaxUID)
    except Exception:  # only for an error message; the decode error is what matters
        return "unknown"


def _decoder_message(syntax_uid: str, exc: BaseException) -> str:
    from pydicom.uid import UID

    syntax_name = UID(syntax_uid).name if syntax_uid != "unknown" else "unknown transfer syntax"
    hint = _DECODER_HINTS.get(syntax_uid)
    if hint is None:
        return f"cannot decode pixel data in transfer syntax {syntax_name} ({syntax_uid}): {_first_line(exc)}"
    return (
        f"cannot decode pixel data in transfer syntax {syntax_name} ({syntax_uid}); "
        f"install a decoder for it: {hint} (pip install into this environment)"
    )


def _frame_value(header, frame: int | None, sequence: str, keyword: str):
    """Find ``keyword`` for one frame: per-frame functional group, shared group, then top level."""
    groups = []
    per_frame = header.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and frame is not None and frame < len(per_frame):
        groups.append(per_frame[frame])
    shared = header.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    for group in groups:
        items = group.get(sequence)
        if items and keyword in items[0]:
            return items[0].get(keyword)
    return header.get(keyword)


def _apply_modality_lut(pixels: np.ndarray, header, frame: int | None) -> np.ndarray:
    """Convert stored values to modality units (for CT, Hounsfield units)."""
    if "ModalityLUTSequence" in header:
        from pydicom.pixels import apply_modality_lut

        return np.asarray(apply_modality_lut(pixels, header), dtype=np.float64)
    slope = _frame_value(header, frame, "PixelValueTransformationSequence", "RescaleSlope")
    intercept = _frame_value(header, frame, "PixelValueTransformationSequence", "RescaleIntercept")
    values = pixels.astype(np.float64)
    if slope is not None:
        values *= float(slope)
    if intercept is not None:
        values += float(intercept)
    return values


def _window_for(header, frame: int | None, options: ScannerOptions) -> tuple[float, float] | None:
    """Return (center, width) to apply, or None for the image's own min/max."""
    if isinstance(options.window, tuple):
        return options.window
    if options.window == "minmax":
        return None
    center = _frame_value(header, frame, "FrameVOILUTSequence", "WindowCenter")
    width = _frame_value(header, frame, "FrameVOILUTSequence", "WindowWidth")
    if center is None or width is None:
        return None
    center, width = _first_value(center), _first_value(width)
    if width < 1:
        raise ValueError(
            f"stored Window Width {width:g} is invalid (must be at least 1); "
            "pass --window CENTER,WIDTH or --window minmax"
        )
    # NOTE: VOI LUT Function (SIGMOID, LINEAR_EXACT) and the VOI LUT Sequence
    # are not applied; the stored centre and width always go through LINEAR.
    return (center, width)


def _first_value(value) -> float:
    """Return the first of a multi-valued DICOM number, or the number itself."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def window_linear(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """Map values to 0..255 ``uint8`` by the DICOM LINEAR window (PS3.3 C.11.2.1.2.1).

    ``x <= c - 0.5 - (w-1)/2`` gives 0, ``x > c - 0.5 + (w-1)/2`` gives 255,
    and values between map to ``((x - (c - 0.5)) / (w - 1) + 0.5) * 255``,
    rounded to the nearest integer. A width of 1 is a threshold.
    """
    values = np.asarray(values, dtype=np.float64)
    low = center - 0.5 - (width - 1) / 2
    high = center - 0.5 + (width - 1) / 2
    if width <= 1:
        return np.where(values > high, 255, 0).astype(np.uint8)
    scaled = ((values - (center - 0.5)) / (width - 1) + 0.5) * 255.0
    scaled = np.where(values <= low, 0.0, np.where(values > high, 255.0, scaled))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def window_min_max(values: np.ndarray) -> np.ndarray:
    """Map the image's minimum to 0 and maximum to 255 (a constant image becomes 0)."""
    values = np.asarray(values, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.clip(np.rint((values - low) * 255.0 / (high - low)), 0, 255).astype(np.uint8)


def _scale_colour(pixels: np.ndarray, bits: int) -> np.ndarray:
    """Scale colour samples of ``bits`` bits to 8 bits."""
    if pixels.dtype == np.uint8 or bits <= 8:
        return np.asarray(pixels, dtype=np.uint8)
    scaled = pixels.astype(np.float64) * (255.0 / (2**bits - 1))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


# Decoding threads load slices of one volume at the same time. The lock lets
# the first thread read the volume while the others wait for the cache.
_VOLUME_LOCK = threading.Lock()


def _load_nifti_slice(ref: NiftiRef, options: ScannerOptions) -> np.ndarray:
    with _VOLUME_LOCK:
        volume = _load_scaled_volume(str(ref.path), _stat_key(ref.path), tuple(options.percentiles))
    if ref.index is None:
        raise ValueError("the NIfTI header could not be read when the file was listed")
    axis = ref.axis if isinstance(ref, NiftiRef) else SLICE_AXES[options.slice_axis]
    if ref.index >= volume.shape[axis]:
        raise ValueError(f"slice {ref.index} is out of range (the volume has {volume.shape[axis]} along axis {axis})")
    # Basic indexing, not np.take, which copies slowly from Fortran-ordered volumes.
    selector = [slice(None)] * 3
    selector[axis] = ref.index
    plane = volume[tuple(selector)]
    # plane is indexed (first remaining RAS axis, second remaining RAS axis);
    # transpose and flip so the second axis (anterior or superior) is at the top.
    return np.ascontiguousarray(np.flipud(plane.T))


def _stat_key(path: Path) -> tuple[int, int]:
    stat = Path(path).stat()
    return (stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _load_scaled_volume(path: str, stat_key: tuple[int, int], percentiles: tuple[float, float]) -> np.ndarray:
    """Read a NIfTI volume, reorient it to RAS and scale it to ``uint8`` by percentiles.

    Cached for the last two files (``stat_key`` invalidates a changed file),
    since the slices of a volume are loaded one after another.
    """
    import nibabel as nib

    try:
        image = nib.as_closest_canonical(nib.load(path))
        data = np.asarray(image.dataobj, dtype=np.float64)
    except Exception as exc:  # nibabel raises many types for damaged files
        raise ValueError(f"not a readable NIfTI file ({type(exc).__name__}: {_first_line(exc)})") from None
    if data.ndim > 3:
        # NOTE: only the first volume of a 4-D (or higher) file is embedded.
        logger.info("%s: %d-D image, embedding the first volume only", path, data.ndim)
        data = data.reshape(data.shape[:3] + (-1,))[..., 0]
    while data.ndim < 3:
        data = data[..., None]
    return scale_percentiles(data, *percentiles)


def scale_percentiles(volume: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map the ``low`` and ``high`` percentiles of the finite values to 0 and 255, clipping outside."""
    volume = np.asarray(volume, dtype=np.float64)
    finite = volume[np.isfinite(volume)]
    if finite.size == 0:
        return np.zeros(volume.shape, dtype=np.uint8)
    low_value, high_value = np.percentile(finite, [low, high])
    if high_value <= low_value:
        return np.zeros(volume.shape, dtype=np.uint8)
    scaled = (np.nan_to_num(volume, nan=low_value, posinf=high_value, neginf=low_value) - low_value) * (
        255.0 / (high_value - low_value)
    )
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


# Registration -------------------------------------------------------------


def register_scanner_formats(options: ScannerOptions | None = None) -> None:
    """Route DICOM and NIfTI files of image sources to this module, with ``options``.

    :mod:`mmdx.embed.image_sources` registers them with default options when
    it is imported. Call this again with other options before collecting a
    source; the last registration wins.
    """
    from mmdx.embed.image_sources import register_image_format

    options = options or ScannerOptions()

    def expand(path: Path, name: str, patient_id: str | None, content_hash: str) -> list[Item]:
        return expand_scanner_file(path, options, name, patient_id, content_hash)

    def load(item: Item) -> np.ndarray:
        return load_scanner_pixels(item.payload, options)

    def config(items: list[Item]) -> dict:
        return scanner_config(options, items)

    register_image_format(
        DICOM_SUFFIXES,
        expand,
        load,
        sniff=is_dicom,
        patient_id_from_file=True,
        arrange=arrange_dicom_items,
        config=config,
    )
    register_image_format(NIFTI_SUFFIXES, expand, load, config=config)
