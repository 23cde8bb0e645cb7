"""Reading text sources: formats, the join rule, IDs, encodings and duplicates."""

from __future__ import annotations

import json

import pytest

from mmdx.embed.text_sources import join_parts, read_text_source
from mmdx.errors import InputError
from test_embed_texts import write_reports

ROWS = [
    {"patient_id": "007", "history": "Headache.", "findings": "Mass in the left lobe."},
    {"patient_id": "a/b", "history": "N/A", "findings": "Normal study."},
    {"patient_id": "Zoë", "history": "  Seizure  ", "findings": ""},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def texts_by_patient(source):
    return {entry.patient_id: entry.text for entry in source.texts}


def test_join_parts_drops_missing_markers():
    assert join_parts(["A.", " N/A ", "na", "None", "", "  ", None, "nan", "NULL", "B."]) == "A.\n\nB."


def test_join_parts_keeps_order():
    assert join_parts(["second", "first"]) == "second\n\nfirst"


@pytest.mark.parametrize("suffix,writer", [(".csv", "csv"), (".tsv", "tsv"), (".jsonl", "jsonl"), (".ndjson", "jsonl")])
def test_formats_read_same_texts(tmp_path, suffix, writer):
    path = tmp_path / f"reports{suffix}"
    if writer == "jsonl":
        write_jsonl(path, ROWS)
    else:
        write_reports(path, ROWS, "\t" if writer == "tsv" else ",")
    source = read_text_source(path, "patient_id", ["history", "findings"])
    assert texts_by_patient(source) == {
        "007": "Headache.\n\nMass in the left lobe.",
        "a/b": "Normal study.",
        "Zoë": "Seizure",
    }


def test_format_option_overrides_extension(tmp_path):
    path = write_reports(tmp_path / "reports.txt", ROWS, "\t")
    with pytest.raises(InputError, match="--format"):
        read_text_source(path, "patient_id", ["history"])
    source = read_text_source(path, "patient_id", ["history"], source_format="tsv")
    assert len(source.texts) == 3


def test_ids_stay_strings(tmp_path):
    path = write_reports(tmp_path / "r.csv", ROWS)
    source = read_text_source(path, "patient_id", ["findings"])
    assert [entry.patient_id for entry in source.texts] == ["007", "a/b", "Zoë"]


def test_jsonl_integer_id_becomes_string(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"id": 12, "text": "x"}])
    assert read_text_source(path, "id", ["text"]).texts[0].patient_id == "12"


def test_jsonl_float_id_rejected(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"id": 1.5, "text": "x"}])
    with pytest.raises(InputError, match="not a string or integer"):
        read_text_source(path, "id", ["text"])


def test_missing_column_lists_available(tmp_path):
    path = write_reports(tmp_path / "r.csv", ROWS)
    with pytest.raises(InputError, match=r"--text-column 'impression' not found; available columns: patient_id, history, findings"):
        read_text_source(path, "patient_id", ["history", "impression"])


def test_missing_id_column_named(tmp_path):
    path = write_reports(tmp_path / "r.csv", ROWS)
    with pytest.raises(InputError, match="--id-column 'uid' not found"):
        read_text_source(path, "uid", ["history"])


def test_no_text_column_rejected(tmp_path):
    path = write_reports(tmp_path / "r.csv", ROWS)
    with pytest.raises(InputError, match="no --text-column"):
        read_text_source(path, "patient_id", [])


def test_non_utf8_names_line_and_offset(tmp_path):
    path = tmp_path / "r.csv"
    data = "patient_id,text\np1,fine\np2,caf".encode() + b"\xe9\n"
    path.write_bytes(data)
    with pytest.raises(InputError, match=r"r\.csv: line 3, byte offset 30: byte 0xe9") as error:
        read_text_source(path, "patient_id", ["text"])
    assert "--encoding latin-1" in str(error.value)
    assert "probably not UTF-8" in str(error.value)


def test_stray_byte_in_utf8_file_advises_fixing_it(tmp_path):
    # Reading this file as latin-1 would turn the valid quotes and bullet
    # into mojibake, so the message must not suggest another encoding.
    path = tmp_path / "r.csv"
    good = "patient_id,text\np1,\u201cmass\u201d \u2022 \u00bb left\np2,caf".encode()
    path.write_bytes(good + b"\xe9\np3,na\xefve\n")
    with pytest.raises(InputError) as error:
        read_text_source(path, "patient_id", ["text"])
    message = str(error.value)
    assert f"line 3, byte offset {len(good)}: byte 0xe9" in message
    assert "the rest of the file is UTF-8" in message
    assert "2 invalid byte(s)" in message
    assert "fix those bytes" in message
    assert "--encoding latin-1" not in message


def test_line_numbers_count_header_blank_and_multiline_rows(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text('patient_id,text\np1,"two\nlines"\n\np2,x\n ,y\n', encoding="utf-8")
    with pytest.raises(InputError, match="line 6: empty patient_id"):
        read_text_source(path, "patient_id", ["text"])
    path.write_text('patient_id,text\np1,"two\nlines"\n\np2,x\n', encoding="utf-8")
    assert [entry.line for entry in read_text_source(path, "patient_id", ["text"]).texts] == [2, 5]


def test_json_lines_report_file_lines(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"patient_id": "p1", "text": "a"}\n\n{"patient_id": "p1", "text": "b"}\n', encoding="utf-8")
    with pytest.raises(InputError, match="different texts on lines 1 and 3"):
        read_text_source(path, "patient_id", ["text"])


def test_encoding_option_decodes(tmp_path):
    path = tmp_path / "r.csv"
    path.write_bytes("patient_id,text\np2,café\n".encode("latin-1"))
    source = read_text_source(path, "patient_id", ["text"], encoding="latin-1")
    assert source.texts[0].text == "café"


def test_utf8_bom_removed(tmp_path):
    path = tmp_path / "r.csv"
    path.write_bytes(b"\xef\xbb\xbfpatient_id,text\np1,x\n")
    assert read_text_source(path, "patient_id", ["text"]).texts[0].patient_id == "p1"


def test_empty_id_rejected(tmp_path):
    path = write_reports(tmp_path / "r.csv", [{"patient_id": " ", "text": "x"}])
    with pytest.raises(InputError, match="line 2: empty patient_id"):
        read_text_source(path, "patient_id", ["text"])


def test_identical_duplicates_kept_once(tmp_path):
    rows = [{"patient_id": "p1", "text": "same"}, {"patient_id": "p2", "text": "b"}, {"patient_id": "p1", "text": " same "}]
    source = read_text_source(write_reports(tmp_path / "r.csv", rows), "patient_id", ["text"])
    assert [entry.patient_id for entry in source.texts] == ["p1", "p2"]
    assert source.n_identical_duplicates == 1


def test_conflicting_duplicates_name_patient(tmp_path):
    rows = [{"patient_id": "p1", "text": "a"}, {"patient_id": "p1", "text": "b"}]
    with pytest.raises(InputError, match=r"patient 'p1' has different texts on lines 2 and 3.*--duplicates keep-all"):
        read_text_source(write_reports(tmp_path / "r.csv", rows), "patient_id", ["text"])


def test_keep_all_numbers_items_within_patient(tmp_path):
    rows = [{"patient_id": "p1", "text": "a"}, {"patient_id": "p2", "text": "c"}, {"patient_id": "p1", "text": "b"}]
    source = read_text_source(write_reports(tmp_path / "r.csv", rows), "patient_id", ["text"], duplicates="keep-all")
    assert [(entry.patient_id, entry.name, entry.text) for entry in source.texts] == [
        ("p1", "text 1", "a"),
        ("p2", "text 1", "c"),
        ("p1", "text 2", "b"),
    ]


def test_item_names_independent_of_row_order(tmp_path):
    forward = read_text_source(write_reports(tmp_path / "f.csv", ROWS), "patient_id", ["findings"])
    backward = read_text_source(write_reports(tmp_path / "b.csv", ROWS[::-1]), "patient_id", ["findings"])
    assert {(e.patient_id, e.name) for e in forward.texts} == {(e.patient_id, e.name) for e in backward.texts}


def test_extra_fields_rejected(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("patient_id,text\np1,a,b\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"line 2 has more fields \(3\) than the header \(2\)"):
        read_text_source(path, "patient_id", ["text"])


def test_invalid_json_line_named(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"id": "a", "text": "x"}\n{"id": \n', encoding="utf-8")
    with pytest.raises(InputError, match="line 2: invalid JSON"):
        read_text_source(path, "id", ["text"])


def test_source_not_found(tmp_path):
    with pytest.raises(InputError, match="text source not found"):
        read_text_source(tmp_path / "missing.csv", "patient_id", ["text"])
