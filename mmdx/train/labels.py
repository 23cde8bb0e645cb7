"""Read binary labels per patient from a CSV file.

Used by train-head, compare and text fine-tuning, so that all of them read
one labels file the same way: IDs as strings exactly as written, one label
per patient, missing values dropped and counted.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from pathlib import Path
from typing import Sequence

from mmdx.errors import InputError

__all__ = ["DROP_NO_LABEL", "DROP_UNRECOGNIZED", "LabelTable", "load_labels"]

logger = logging.getLogger(__name__)

DROP_NO_LABEL = "no label"
DROP_UNRECOGNIZED = "label value not recognized"

# Cell values read as a missing label (compared after stripping and lower-casing).
MISSING_VALUES = frozenset({"", "na", "n/a", "nan", "null", "none"})
_ZERO_ONE = {"0": 0, "1": 1, "0.0": 0, "1.0": 1, "false": 0, "true": 1}


class LabelTable(dict):
    """Patient ID to 0/1 label, with a record of the patients left out.

    A plain ``dict[str, int]`` for every use, plus attributes:

    Attributes
    ----------
    dropped : dict of str to list of str
        Reason (:data:`DROP_NO_LABEL`, :data:`DROP_UNRECOGNIZED`) to the sorted
        IDs of the patients dropped for it.
    values_seen : dict of str to int
        Every non-missing label value as written, with its number of patients.
    positive : str or None
        The value mapped to 1, or None when the file contains 0/1 labels.
    source : str
        Path of the labels file.
    """

    def __init__(self, labels, dropped, values_seen, positive, source):
        super().__init__(labels)
        self.dropped = dropped
        self.values_seen = values_seen
        self.positive = positive
        self.source = source

    def dropped_counts(self) -> dict[str, int]:
        """Return the number of dropped patients per reason."""
        return {reason: len(ids) for reason, ids in self.dropped.items()}


def load_labels(
    path: str | Path,
    id_column: str = "patient_id",
    label_column: str = "label",
    positive: str | None = None,
    negative: Sequence[str] | None = None,
) -> LabelTable:
    """Read one 0/1 label per patient from a CSV file.

    Parameters
    ----------
    path
        CSV file with a header row.
    id_column, label_column
        Column of the patient IDs (read as strings, kept as written except for
        surrounding spaces) and of the labels.
    positive
        Label value (as written) that means 1; every other value means 0,
        unless ``negative`` is given. Without it the labels must be 0/1
        already (``0``/``1``, ``0.0``/``1.0`` or ``false``/``true``).
    negative
        With ``positive``: the values that mean 0. Patients with any other
        value are dropped as :data:`DROP_UNRECOGNIZED`.

    Returns
    -------
    LabelTable
        A ``dict`` of patient ID to 0 or 1, with ``dropped`` reasons attached.
        Empty cells and ``NA``, ``N/A``, ``nan``, ``null``, ``none`` count as
        missing, and those patients are dropped as :data:`DROP_NO_LABEL`.

    Raises
    ------
    InputError
        If the file or a column is missing, or ``positive`` or a ``negative``
        value never occurs. Without ``positive``: if there are more than two
        label values or the values are not 0/1. Also if a patient ID has two
        different labels.
    """
    path = Path(path)
    rows = _read_rows(path, id_column, label_column)

    raw: dict[str, str | None] = {}
    first_row: dict[str, int] = {}
    for row_number, patient_id, value in rows:
        if not patient_id:
            raise InputError(f"{path}: row {row_number} has an empty {id_column!r}; give every row a patient ID")
        value = None if value.strip().lower() in MISSING_VALUES else value.strip()
        previous = raw.get(patient_id)
        if patient_id in raw and previous is not None and value is not None and previous != value:
            raise InputError(
                f"{path}: patient {patient_id!r} has two different labels, {previous!r} (row "
                f"{first_row[patient_id]}) and {value!r} (row {row_number}); keep one row per patient"
            )
        if previous is None:
            raw[patient_id] = value
            first_row[patient_id] = row_number

    values_seen = Counter(value for value in raw.values() if value is not None)
    mapping = _label_mapping(path, label_column, values_seen, positive, negative)

    labels: dict[str, int] = {}
    dropped: dict[str, list[str]] = {DROP_NO_LABEL: [], DROP_UNRECOGNIZED: []}
    for patient_id in sorted(raw):
        value = raw[patient_id]
        if value is None:
            dropped[DROP_NO_LABEL].append(patient_id)
        elif value not in mapping:
            dropped[DROP_UNRECOGNIZED].append(patient_id)
        else:
            labels[patient_id] = mapping[value]
    if not labels:
        raise InputError(f"{path}: no patient has a usable label in column {label_column!r}")
    for reason, ids in dropped.items():
        if ids:
            logger.info("%s: %d patient(s) dropped: %s", path, len(ids), reason)
    return LabelTable(labels, dropped, dict(sorted(values_seen.items())), positive, str(path))


def _read_rows(path: Path, id_column: str, label_column: str) -> list[tuple[int, str, str]]:
    """Return ``(row number, patient ID, label cell)`` for every data row (row 1 is the header)."""
    if not path.is_file():
        raise InputError(f"{path}: labels file not found; check the --labels path")
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            for option, column in (("--id-column", id_column), ("--label-column", label_column)):
                if column not in columns:
                    raise InputError(
                        f"{path}: no column {column!r} (given by {option}); columns: {', '.join(columns) or 'none'}"
                    )
            return [
                (number, (row[id_column] or "").strip(), row[label_column] or "")
                for number, row in enumerate(reader, start=2)
            ]
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not a UTF-8 text file ({exc.reason}); save the labels as UTF-8 CSV") from None
    except csv.Error as exc:
        raise InputError(f"{path}: not a readable CSV file ({exc})") from None


def _label_mapping(
    path: Path,
    label_column: str,
    values_seen: Counter,
    positive: str | None,
    negative: Sequence[str] | None,
) -> dict[str, int]:
    """Map each label value as written to 0 or 1; values left out are dropped as unrecognized."""
    listed = ", ".join(repr(value) for value in sorted(values_seen)) or "none"
    if positive is None:
        if negative:
            raise InputError("--negative needs --positive: name the value that means 1")
        if len(values_seen) > 2:
            raise InputError(
                f"{path}: column {label_column!r} has {len(values_seen)} distinct values ({listed}); "
                "pass --positive VALUE to train that value against the rest"
            )
        mapping = {value: _ZERO_ONE.get(value.lower()) for value in values_seen}
        if None in mapping.values():
            raise InputError(
                f"{path}: labels in column {label_column!r} are not 0/1 (values: {listed}); "
                "pass --positive VALUE to name the value that means 1"
            )
        return mapping

    if positive not in values_seen:
        raise InputError(
            f"{path}: --positive {positive!r} never occurs in column {label_column!r}; values: {listed}"
        )
    if negative:
        missing = [value for value in negative if value not in values_seen]
        if missing:
            raise InputError(
                f"{path}: --negative {missing[0]!r} never occurs in column {label_column!r}; values: {listed}"
            )
        if positive in negative:
            raise InputError(f"--positive {positive!r} is also given as --negative; a value cannot mean both 0 and 1")
        return {positive: 1, **{value: 0 for value in negative}}
    return {value: int(value == positive) for value in values_seen}
