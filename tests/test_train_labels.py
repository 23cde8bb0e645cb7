"""Tests of load_labels: parsing, drop reasons and the errors of bad label files."""

from __future__ import annotations

import pytest

from mmdx.errors import InputError
from mmdx.train.labels import DROP_NO_LABEL, DROP_UNRECOGNIZED, load_labels


def write_csv(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_labels_positive_value(tmp_path):
    path = write_csv(tmp_path / "labels.csv", "patient_id,dx\n007,tumour\n008,other\n009,tumour\n")
    labels = load_labels(path, "patient_id", "dx", positive="tumour")
    assert labels == {"007": 1, "008": 0, "009": 1}
    assert labels.values_seen == {"other": 1, "tumour": 2}


def test_labels_ids_stay_strings(tmp_path):
    path = write_csv(tmp_path / "labels.csv", "patient_id,label\n007,1\n7,0\n")
    labels = load_labels(path, "patient_id", "label")
    assert set(labels) == {"007", "7"}
    assert labels["007"] == 1


@pytest.mark.parametrize("zero, one", [("0", "1"), ("0.0", "1.0"), ("False", "True")])
def test_labels_zero_one_spellings(tmp_path, zero, one):
    path = write_csv(tmp_path / "labels.csv", f"patient_id,label\na,{zero}\nb,{one}\n")
    assert load_labels(path, "patient_id", "label") == {"a": 0, "b": 1}


def test_labels_missing_values_dropped(tmp_path):
    path = write_csv(tmp_path / "labels.csv", "patient_id,label\na,1\nb,\nc,NA\nd,0\n")
    labels = load_labels(path, "patient_id", "label")
    assert labels == {"a": 1, "d": 0}
    assert labels.dropped[DROP_NO_LABEL] == ["b", "c"]
    assert labels.dropped_counts() == {DROP_NO_LABEL: 2, DROP_UNRECOGNIZED: 0}


def test_labels_negative_drops_unrecognized(tmp_path):
    path = write_csv(tmp_path / "labels.csv", "patient_id,dx\na,tumour\nb,normal\nc,unsure\n")
    labels = load_labels(path, "patient_id", "dx", positive="tumour", negative=["normal"])
    assert labels == {"a": 1, "b": 0}
    assert labels.dropped[DROP_UNRECOGNIZED] == ["c"]


def test_labels_missing_file(tmp_path):
    with pytest.raises(InputError, match="labels file not found"):
        load_labels(tmp_path / "none.csv", "patient_id", "label")


def test_labels_missing_column_lists_columns(tmp_path):
    path = write_csv(tmp_path / "labels.csv", "patient_id,dx\na,1\n")
    with pytest.raises(InputError, match="no column 'label'.*columns: patient_id, dx"):
        load_labels(path, "patient_id", "label")
    with pytest.raises(InputError, match="no column 'case'.*--id-column"):
        load_labels(path, "case", "dx")


def test_labels_positive_never_seen(tmp_path):
    path = write_csv(tmp_path / "labels.csv", "patient_id,dx\na,tumour\nb,other\n")
    with pytest.raises(InputError, match="--positive 'Tumour' never occurs.*'other', 'tumour'"):
        load_labels(path, "patient_id", "dx", positive="Tumour")


def test_labels_three_values_need_positive(tmp_path):
    path = write_csv(tmp_path / "labels.csv", "patient_id,dx\na,x\nb,y\nc,z\n")
    with pytest.raises(InputError, match="3 distinct values.*--positive"):
        load_labels(path, "patient_id", "dx")
    assert load_labels(path, "patient_id", "dx", positive="y") == {"a": 0, "b": 1, "c": 0}


def test_labels_strings_need_positive(tmp_path):
    path = write_csv(tmp_path / "labels.csv", "patient_id,dx\na,yes\nb,no\n")
    with pytest.raises(InputError, match="not 0/1"):
        load_labels(path, "patient_id", "dx")


def test_labels_conflicting_duplicate_names_id(tmp_path):
    path = write_csv(tmp_path / "labels.csv", "patient_id,label\na,1\nb,0\na,0\n")
    with pytest.raises(InputError, match="patient 'a' has two different labels.*row 2.*row 4"):
        load_labels(path, "patient_id", "label")


def test_labels_agreeing_duplicate_kept_once(tmp_path):
    path = write_csv(tmp_path / "labels.csv", "patient_id,label\na,1\na,\na,1\nb,0\n")
    assert load_labels(path, "patient_id", "label") == {"a": 1, "b": 0}


def test_labels_empty_id_rejected(tmp_path):
    path = write_csv(tmp_path / "labels.csv", "patient_id,label\n,1\n")
    with pytest.raises(InputError, match="row 2 has an empty 'patient_id'"):
        load_labels(path, "patient_id", "label")
