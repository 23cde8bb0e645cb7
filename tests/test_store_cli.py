"""``mmdx store`` commands: info, verify, rm, export, merge, as a user runs them."""

from __future__ import annotations

import csv
import json

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from mmdx.cli import main
from mmdx.store import FeatureStore
from mmdx.store import format as fmt

from store_helpers import CONFIG, WIDTH, commit_rows, fake_vector, make_store, tree_digest


def run(*args, input=None):
    return CliRunner().invoke(main, ["store", *map(str, args)], input=input)


def leave_pending_shard(path, patient_ids):
    """Commit rows and release the lock without compacting, as a killed writer leaves them."""
    store = FeatureStore(path, mode="a")
    commit_rows(store, store.ensure_set("text", "tiny-bert", CONFIG, WIDTH), patient_ids)
    store._lock.release()
    store._lock = None


# info -------------------------------------------------------------------------


def test_info_lists_sets_and_pending_shards(tmp_path):
    path = tmp_path / "s.h5"
    name = make_store(path, ["p1", "p2", "p2b"])
    leave_pending_shard(path, ["p3"])

    result = run("info", path)
    assert result.exit_code == 0, result.output
    assert "1 journal shard(s) pending" in result.output
    assert name in result.output
    assert "rows 4, patients 4, views 1" in result.output
    assert "  configuration:\n    max_length: 16\n" in result.output
    assert "  provenance:" not in result.output  # make_store records no provenance

    listing = json.loads(run("info", path, "--json").output)
    assert listing["pending_shards"] == 1
    assert listing["feature_sets"][0]["n_rows"] == 4


# verify -----------------------------------------------------------------------


def test_verify_passes_clean_store(tmp_path):
    path = tmp_path / "s.h5"
    make_store(path, ["p1", "p2"])
    leave_pending_shard(path, ["p3"])
    result = run("verify", path)
    assert result.exit_code == 0, result.output
    assert "OK, 1 feature set(s), 3 rows, 1 journal shard(s)" in result.output


def corrupt_nan(group):
    vectors = group["vectors"][()]
    vectors[1, 0] = np.nan
    group["vectors"][...] = vectors


def corrupt_repeat_key(group):
    group["patient_id"][1] = group["patient_id"][0]


def corrupt_hash(group):
    group["item_hash"][0] = "not-a-sha256"


def corrupt_width_attr(group):
    group.attrs["width"] = WIDTH + 1


def corrupt_view_dtype(group):
    views = group["view"][()]
    del group["view"]
    group.create_dataset("view", data=views.astype(np.float64))


def corrupt_row_count(group):
    group["item"].resize((1,))


def corrupt_config(group):
    config = json.loads(group.attrs["config_json"])
    config["max_length"] = 999
    group.attrs["config_json"] = fmt.canonical_json(config)


def corrupt_missing_attr(group):
    del group.attrs["encoder"]


@pytest.mark.parametrize(
    ("corrupt", "expected"),
    [
        (corrupt_nan, "NaN or inf in 1 vector(s), first at row 1 (patient 'p2')"),
        (corrupt_repeat_key, "1 repeated (patient ID, item, view) key(s)"),
        (corrupt_hash, "item hash(es) are not 64 lowercase hex digits"),
        (corrupt_width_attr, "differs from the configuration's width"),
        (corrupt_view_dtype, "dataset 'view' is float64"),
        (corrupt_row_count, "datasets have different row counts"),
        (corrupt_config, "name does not match its configuration hash"),
        (corrupt_missing_attr, "missing attribute(s) encoder"),
    ],
)
def test_verify_names_fault_and_set(tmp_path, corrupt, expected):
    path = tmp_path / "s.h5"
    name = make_store(path, ["p1", "p2", "p3"], batch=3)
    if corrupt is corrupt_repeat_key:
        with h5py.File(path, "a") as handle:
            handle[f"{fmt.ROOT_GROUP}/{name}/item"][1] = handle[f"{fmt.ROOT_GROUP}/{name}/item"][0]
    with h5py.File(path, "a") as handle:
        corrupt(handle[f"{fmt.ROOT_GROUP}/{name}"])

    result = run("verify", path)
    assert result.exit_code == 1
    assert expected in result.output
    assert f"feature set {name!r}" in result.output
    assert "fault(s) found" in result.output


def test_verify_reports_unreadable_and_missing_shards(tmp_path):
    path = tmp_path / "s.h5"
    make_store(path, ["p1"])
    leave_pending_shard(path, ["p2"])
    leave_pending_shard(path, ["p3"])
    leave_pending_shard(path, ["p4"])
    first, second, _third = fmt.list_shards(path)
    first.write_bytes(b"not hdf5")
    second.unlink()

    result = run("verify", path)
    assert result.exit_code == 1
    assert f"{first.name}: not a readable HDF5 file" in result.output
    assert "journal shard sequence(s) [3] missing" in result.output


def test_verify_reports_newer_shard_version(tmp_path):
    path = tmp_path / "s.h5"
    make_store(path, ["p1"])
    leave_pending_shard(path, ["p2"])
    with h5py.File(fmt.list_shards(path)[0], "a") as handle:
        handle.attrs["mmdx_format_version"] = fmt.FORMAT_VERSION + 1
    result = run("verify", path)
    assert result.exit_code == 1
    assert "is newer than this mmdx reads" in result.output


def test_verify_notes_leftovers_without_failing(tmp_path):
    path = tmp_path / "s.h5"
    make_store(path, ["p1"])
    (tmp_path / "s.h5.tmp-123").write_bytes(b"partial")
    result = run("verify", path)
    assert result.exit_code == 0, result.output
    assert "note: 1 temporary file(s) of a killed writer" in result.output


# rm ---------------------------------------------------------------------------


def test_rm_asks_before_removing(tmp_path):
    path = tmp_path / "s.h5"
    name = make_store(path, ["p1"])
    before = tree_digest(tmp_path)

    declined = run("rm", path, name, input="n\n")
    assert declined.exit_code == 1
    assert tree_digest(tmp_path) == before

    accepted = run("rm", path, name, input="y\n")
    assert accepted.exit_code == 0, accepted.output
    assert f"removed {name} (1 rows)" in accepted.output
    assert FeatureStore(path).list_sets() == []


def test_rm_unknown_set_lists_sets(tmp_path):
    path = tmp_path / "s.h5"
    name = make_store(path, ["p1"])
    result = run("rm", path, "text-nope", "--yes")
    assert result.exit_code == 1
    assert f"no feature set named 'text-nope'; available: {name}" in result.output


# export -----------------------------------------------------------------------


def test_export_npz_round_trip(tmp_path):
    path = tmp_path / "s.h5"
    name = make_store(path, ["007", "p2"])
    out = tmp_path / "out.npz"
    result = run("export", path, name, "--out", out)
    assert result.exit_code == 0, result.output

    data = np.load(out)
    assert data["patient_ids"].tolist() == ["007", "p2"]
    assert data["items"].tolist() == ["row 007", "row p2"]
    assert data["views"].tolist() == [0, 0]
    assert data["vectors"].dtype == np.float32
    assert np.array_equal(data["vectors"][0], fake_vector("007", "row 007"))


def test_export_csv_one_row_per_vector(tmp_path):
    path = tmp_path / "s.h5"
    name = make_store(path, ["007", "p2"])
    out = tmp_path / "out.csv"
    result = run("export", path, name, "--out", out)
    assert result.exit_code == 0, result.output

    with open(out, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows[0][:4] == ["patient_id", "item", "view", "item_hash"]
    assert len(rows[0]) == 4 + WIDTH
    assert [r[0] for r in rows[1:]] == ["007", "p2"]
    vector = np.asarray(rows[1][4:], dtype=np.float32)
    assert np.array_equal(vector, fake_vector("007", "row 007"))


def test_export_rejects_unknown_suffix(tmp_path):
    path = tmp_path / "s.h5"
    name = make_store(path, ["p1"])
    result = run("export", path, name, "--out", tmp_path / "out.parquet")
    assert result.exit_code == 1
    assert "unknown export format '.parquet'; use one of .npz, .csv" in result.output
    assert not (tmp_path / "out.parquet").exists()


# merge ------------------------------------------------------------------------


def test_merge_unites_rows_later_store_wins(tmp_path):
    first, second, out = tmp_path / "a.h5", tmp_path / "b.h5", tmp_path / "out.h5"
    name = make_store(first, ["p1", "p2"])
    with FeatureStore(second, mode="a") as store:
        header = store.ensure_set("text", "tiny-bert", CONFIG, WIDTH)
        store.commit(header, ["p2", "p3"], ["row p2", "row p3"], ["e" * 64] * 2, np.full((2, WIDTH), 7.0))
    other = make_store(second, ["p9"], config={**CONFIG, "max_length": 4})

    result = run("merge", out, first, second)
    assert result.exit_code == 0, result.output

    rows = FeatureStore(out).read(name).rows
    vectors = {key[0]: rows.vectors[i] for i, key in enumerate(rows.keys())}
    assert sorted(vectors) == ["p1", "p2", "p3"]
    assert np.array_equal(vectors["p1"], fake_vector("p1", "row p1"))
    assert vectors["p2"][0] == 7.0
    hashes = dict(zip(rows.patient_ids.tolist(), rows.hashes.tolist()))
    assert hashes["p2"] == "e" * 64
    assert hashes["p1"] != "e" * 64
    assert len(FeatureStore(out).read(other).rows) == 1
    assert run("verify", out).exit_code == 0


def test_merge_rejects_config_conflict(tmp_path):
    first, second, out = tmp_path / "a.h5", tmp_path / "b.h5", tmp_path / "out.h5"
    name = make_store(first, ["p1"])
    make_store(second, ["p2"])
    with h5py.File(second, "a") as handle:
        group = handle[f"{fmt.ROOT_GROUP}/{name}"]
        config = json.loads(group.attrs["config_json"])
        config["weights"] = "different"
        group.attrs["config_json"] = fmt.canonical_json(config)
    make_store(out, ["p0"])
    before = tree_digest(tmp_path)

    result = run("merge", out, first, second)
    assert result.exit_code == 1
    assert f"feature set {name!r} has a different configuration than in" in result.output
    assert "differs in: weights" in result.output
    assert tree_digest(tmp_path) == before


def test_merge_missing_source_leaves_out(tmp_path):
    out = tmp_path / "out.h5"
    make_store(out, ["p0"])
    before = tree_digest(tmp_path)
    result = run("merge", out, tmp_path / "missing.h5")
    assert result.exit_code == 1
    assert "missing.h5: store not found" in result.output
    assert tree_digest(tmp_path) == before


def test_store_commands_have_help():
    for command in ("info", "verify", "rm", "export", "merge"):
        result = run(command, "--help")
        assert result.exit_code == 0
        assert "STORE" in result.output
