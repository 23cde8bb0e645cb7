"""Read clinical text sources (CSV, TSV, JSON lines) into one text per patient.

A source has one row per report. The text of a row is the chosen text
columns, in the order given, each stripped of surrounding whitespace, with
empty and missing-value parts (``N/A``, ``NA``, ``None``, ``null``, ``nan``,
any case) dropped, joined with a blank line. Patient IDs are read as strings
exactly as written: ``007`` stays ``007``.

Rows with the same patient ID and the same joined text are counted and kept
once. Rows with the same patient ID and different texts are an error, unless
``duplicates="keep-all"``, which keeps each distinct text as its own item.

Item names are ``text 1``, ``text 2``, ... numbered by the order of a
patient's distinct texts in the source, so a patient with one text always
has the item ``text 1``. Reordering the rows of a source therefore changes
no item key, and a re-run skips every unchanged text.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from mmdx.errors import InputError

__all__ = ["JOIN_RULE", "MISSING_MARKERS", "SOURCE_FORMATS", "SourceText", "TextSource", "join_parts", "read_text_source"]

logger = logging.getLogger(__name__)

SOURCE_FORMATS = ("csv", "tsv", "jsonl")
DUPLICATE_CHOICES = ("error", "keep-all")
MISSING_MARKERS = frozenset({"n/a", "na", "none", "null", "nan"})
JOIN_SEPARATOR = "\n\n"
JOIN_RULE = (
    "columns in the order given; each part stripped; empty, N/A, NA, None, null and nan parts dropped; "
    "parts joined with a blank line"
)
_EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


@dataclass
class SourceText:
    """One distinct text of one patient."""

    patient_id: str
    name: str  # "text 1", "text 2", ... in source order within the patient
    text: str  # the joined text; empty when every part was missing
    line: int  # file line (1-based, header included) where the row with the text first starts


@dataclass
class TextSource:
    """The texts of a source, with counts for the run summary."""

    path: Path
    texts: list[SourceText]
    n_rows: int
    n_identical_duplicates: int


def join_parts(parts: list[object]) -> str:
    """Join text parts by the rule in :data:`JOIN_RULE`."""
    kept = []
    for part in parts:
        if part is None:
            continue
        text = str(part).strip()
        if not text or text.lower() in MISSING_MARKERS:
            continue
        kept.append(text)
    return JOIN_SEPARATOR.join(kept)


def detect_format(path: Path, source_format: str | None) -> str:
    """Return the format given, or the one the file extension names."""
    if source_format is not None:
        if source_format not in SOURCE_FORMATS:
            raise InputError(f"--format must be one of {', '.join(SOURCE_FORMATS)}, got {source_format!r}")
        return source_format
    suffix = path.suffix.lower()
    if suffix not in _EXTENSIONS:
        raise InputError(
            f"{path}: cannot tell the format from the extension {suffix or '(none)'!r}; "
            f"use .csv, .tsv, .jsonl or .ndjson, or pass --format {'|'.join(SOURCE_FORMATS)}"
        )
    return _EXTENSIONS[suffix]


def decode_text(path: Path, data: bytes, encoding: str) -> str:
    """Decode a source file; an undecodable byte is an ``InputError`` that says how to repair the file."""
    try:
        is_utf8 = codecs.lookup(encoding).name in ("utf-8", "utf-8-sig")
    except LookupError:
        raise InputError(f"--encoding {encoding!r} is not a known text encoding; try utf-8 or latin-1") from None
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        where = f"{path}: line {line}, byte offset {exc.start}: byte {data[exc.start]:#04x} is not valid {encoding}"
        if is_utf8:
            raise InputError(_utf8_advice(where, data)) from None
        raise InputError(f"{where}; save the file as UTF-8 or pass the file's --encoding") from None
    return text.removeprefix("\ufeff")


def _utf8_advice(where: str, data: bytes) -> str:
    """Say how to repair a file that is not valid UTF-8, telling a few stray bytes from another encoding.

    A file whose non-ASCII text is mostly valid UTF-8 is UTF-8 with some
    damaged bytes. Reading it with another encoding (latin-1 accepts any
    byte) would turn its valid characters, such as curly quotes or bullets,
    into mojibake and change the stored texts, so the advice is to fix the
    bytes. Only a file without more valid UTF-8 characters than bad bytes is
    probably in another encoding.
    """
    decoded = data.decode("utf-8", errors="surrogateescape")
    n_bad = sum(1 for char in decoded if "\udc80" <= char <= "\udcff")
    n_valid = sum(1 for char in decoded if char >= "\x80" and not "\udc80" <= char <= "\udcff")
    if n_valid > n_bad:
        return (
            f"{where}; the rest of the file is UTF-8 ({n_valid} valid non-ASCII characters, {n_bad} invalid byte(s) "
            "in all), so fix those bytes in an editor and keep the file UTF-8. Another --encoding would misread "
            "its valid characters and change the stored texts"
        )
    return (
        f"{where} ({n_bad} invalid byte(s), {n_valid} valid non-ASCII characters, so the file is probably not UTF-8); "
        "save the file as UTF-8 or pass its encoding, for example --encoding latin-1 or --encoding cp1252"
    )


def read_table(path: Path, text: str, delimiter: str = ",") -> tuple[list[str], list[tuple[int, dict]]]:
    """Return the columns and ``(line, row)`` pairs, ``line`` being the file line where the row starts.

    Blank lines are skipped. A row longer than the header is an error; a
    shorter one leaves its last columns missing (``None``).
    """
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    kind = "TSV" if delimiter == "\t" else "CSV"
    columns: list[str] | None = None
    rows = []
    end = 0  # last line of the previous row; a quoted field may span lines
    try:
        for fields in reader:
            start, end = end + 1, reader.line_num
            if not fields:
                continue
            if columns is None:
                columns = fields
                continue
            if len(fields) > len(columns):
                raise InputError(
                    f"{path}: line {start} has more fields ({len(fields)}) than the header ({len(columns)}); "
                    "quote fields that contain the delimiter"
                )
            rows.append((start, dict(zip(columns, fields + [None] * (len(columns) - len(fields))))))
    except csv.Error as exc:
        raise InputError(f"{path}: line {reader.line_num}: invalid {kind} ({exc})") from None
    return columns or [], rows


def _read_json_lines(path: Path, text: str) -> tuple[list[str], list[tuple[int, dict]]]:
    columns: dict[str, None] = {}
    rows = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: line {line_number}: invalid JSON ({exc.msg}, column {exc.colno})") from None
        if not isinstance(record, dict):
            raise InputError(f"{path}: line {line_number}: expected a JSON object per line, got {type(record).__name__}")
        columns.update(dict.fromkeys(record))
        rows.append((line_number, record))
    return list(columns), rows


def _check_columns(path: Path, columns: list[str], id_column: str, text_columns: list[str]) -> None:
    for option, column in [("--id-column", id_column)] + [("--text-column", c) for c in text_columns]:
        if column not in columns:
            available = ", ".join(columns) or "none"
            raise InputError(f"{path}: {option} {column!r} not found; available columns: {available}")


def _patient_id(path: Path, line: int, value: object, id_column: str) -> str:
    if isinstance(value, (dict, list, float)) or isinstance(value, bool):
        raise InputError(
            f"{path}: line {line}: {id_column} {value!r} is not a string or integer; write patient IDs as strings"
        )
    patient_id = "" if value is None else str(value).strip()
    if not patient_id:
        raise InputError(f"{path}: line {line}: empty {id_column}; every row needs a patient ID")
    return patient_id


def read_text_source(
    path: str | Path,
    id_column: str = "patient_id",
    text_columns: list[str] | tuple[str, ...] = (),
    *,
    source_format: str | None = None,
    encoding: str = "utf-8",
    duplicates: str = "error",
) -> TextSource:
    """Read a text source into one entry per distinct (patient, text).

    Parameters
    ----------
    path
        CSV, TSV or JSON-lines file with one report per row.
    id_column
        Column of patient IDs, read as strings.
    text_columns
        Columns joined, in this order, into the text of a row.
    source_format
        ``"csv"``, ``"tsv"`` or ``"jsonl"``; ``None`` to use the extension.
    encoding
        Text encoding of the file.
    duplicates
        ``"error"`` rejects a patient ID with two different texts;
        ``"keep-all"`` keeps each distinct text as its own item.

    Raises
    ------
    InputError
        For a missing file or column, undecodable bytes, a row without a
        patient ID, or (with ``duplicates="error"``) conflicting texts.
    """
    path = Path(path)
    text_columns = list(text_columns)
    if not text_columns:
        raise InputError("no --text-column given; name at least one column that holds report text")
    if duplicates not in DUPLICATE_CHOICES:
        raise InputError(f"--duplicates must be one of {', '.join(DUPLICATE_CHOICES)}, got {duplicates!r}")
    if not path.is_file():
        raise InputError(f"{path}: text source not found; check the path")
    kind = detect_format(path, source_format)
    text = decode_text(path, path.read_bytes(), encoding)

    if kind == "jsonl":
        columns, rows = _read_json_lines(path, text)
    else:
        columns, rows = read_table(path, text, "\t" if kind == "tsv" else ",")
    _check_columns(path, columns, id_column, text_columns)

    texts: list[SourceText] = []
    by_patient: dict[str, list[SourceText]] = {}
    n_identical = 0
    for line, row in rows:
        patient_id = _patient_id(path, line, row.get(id_column), id_column)
        joined = join_parts([row.get(column) for column in text_columns])
        known = by_patient.setdefault(patient_id, [])
        if any(entry.text == joined for entry in known):
            n_identical += 1
            continue
        if known and duplicates == "error":
            raise InputError(
                f"{path}: patient {patient_id!r} has different texts on lines {known[0].line} and {line}; "
                "merge or remove one, or pass --duplicates keep-all to store each text as its own item"
            )
        entry = SourceText(patient_id, f"text {len(known) + 1}", joined, line)
        known.append(entry)
        texts.append(entry)
    if n_identical:
        logger.info("%s: %d duplicate rows with identical text kept once", path, n_identical)
    return TextSource(path, texts, len(rows), n_identical)
