"""Feature store API: round trips, journal and compaction, and the cases a kill or a race leaves."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest

from mmdx.errors import StoreError
from mmdx.store import FeatureSet, FeatureStore, Rows
from mmdx.store import format as fmt
from mmdx.store.maintenance import verify_store

from store_helpers import CONFIG, WIDTH, commit_rows, fake_vector, item_hash, make_store


def stored_vectors(path, name) -> dict:
    rows = FeatureStore(path).read(name).rows
    return {key: rows.vectors[i] for i, key in enumerate(rows.keys())}


def test_store_round_trip_keeps_patient_ids(tmp_path):
    path = tmp_path / "s.h5"
    ids = ["007", "7", "p-ü", "a b"]
    name = make_store(path, ids)

    rows = FeatureStore(path).read(name).rows
    assert rows.patient_ids.tolist() == ids
    assert rows.vectors.dtype == np.float32
    for i, patient_id in enumerate(ids):
        assert np.array_equal(rows.vectors[i], fake_vector(patient_id, f"row {patient_id}"))
        assert rows.hashes[i] == item_hash(f"row {patient_id}")


def test_commits_visible_before_close(tmp_path):
    path = tmp_path / "s.h5"
    with FeatureStore(path, mode="a") as store:
        header = store.ensure_set("text", "tiny-bert", CONFIG, WIDTH)
        commit_rows(store, header, ["p1", "p2"])
        assert not path.exists()
        assert len(FeatureStore(path).read(header.name).rows) == 2
        commit_rows(store, header, ["p3"])
        assert len(FeatureStore(path).read(header.name).rows) == 3


def test_compaction_folds_journal_and_records_sequence(tmp_path):
    path = tmp_path / "s.h5"
    name = make_store(path, ["p1", "p2", "p3", "p4", "p5"], batch=2)

    assert fmt.list_shards(path) == []
    with h5py.File(path, "r") as handle:
        assert int(handle.attrs[fmt.APPLIED_ATTR]) == 3
    assert len(FeatureStore(path).read(name).rows) == 5


def test_sequence_continues_after_compaction(tmp_path):
    path = tmp_path / "s.h5"
    make_store(path, ["p1", "p2", "p3"], batch=1)
    with FeatureStore(path, mode="a") as store:
        header = store.ensure_set("text", "tiny-bert", CONFIG, WIDTH)
        commit_rows(store, header, ["p4"])
        assert [fmt.shard_sequence(p) for p in fmt.list_shards(path)] == [4]


def test_later_commit_replaces_row(tmp_path):
    path = tmp_path / "s.h5"
    name = make_store(path, ["p1", "p2"])
    with FeatureStore(path, mode="a") as store:
        header = store.ensure_set("text", "tiny-bert", CONFIG, WIDTH)
        store.commit(header, ["p1"], ["row p1"], ["f" * 64], np.full((1, WIDTH), 3.0))
        assert stored_vectors(path, name)[("p1", "row p1", 0)][0] == 3.0
    rows = FeatureStore(path).read(name).rows
    assert len(rows) == 2
    assert rows.hashes.tolist()[0] == "f" * 64


def test_compaction_replaces_rows_of_earlier_shards(tmp_path):
    # One compaction folds all three shards: the second replaces a row the
    # first added, and the third replaces a row the second added.
    path = tmp_path / "s.h5"
    with FeatureStore(path, mode="a") as store:
        header = store.ensure_set("text", "tiny-bert", CONFIG, WIDTH)
        store.commit(header, ["a", "b"], ["row a", "row b"], ["1" * 64, "1" * 64], np.full((2, WIDTH), 1.0))
        store.commit(header, ["b", "c"], ["row b", "row c"], ["2" * 64, "2" * 64], np.full((2, WIDTH), 2.0))
        store.commit(header, ["c", "d"], ["row c", "row d"], ["3" * 64, "3" * 64], np.full((2, WIDTH), 3.0))

    rows = FeatureStore(path).read(header.name).rows
    by_key = {key: (rows.hashes[i], rows.vectors[i][0]) for i, key in enumerate(rows.keys())}

    assert len(rows) == 4
    assert by_key[("a", "row a", 0)] == ("1" * 64, 1.0)
    assert by_key[("b", "row b", 0)] == ("2" * 64, 2.0)
    assert by_key[("c", "row c", 0)] == ("3" * 64, 3.0)
    assert by_key[("d", "row d", 0)] == ("3" * 64, 3.0)
    assert fmt.list_shards(path) == []
    with h5py.File(path, "r") as handle:  # no duplicate rows left behind for readers to resolve
        assert handle[fmt.ROOT_GROUP][header.name]["patient_id"].shape == (4,)


def test_commit_rejects_repeated_key(tmp_path):
    path = tmp_path / "s.h5"
    with FeatureStore(path, mode="a") as store:
        header = store.ensure_set("text", "tiny-bert", CONFIG, WIDTH)
        with pytest.raises(ValueError, match="p1"):
            store.commit(header, ["p1", "p1"], ["r", "r"], ["a" * 64] * 2, np.zeros((2, WIDTH)))
        assert fmt.list_shards(path) == []


def test_commit_rejects_nan(tmp_path):
    path = tmp_path / "s.h5"
    with FeatureStore(path, mode="a") as store:
        header = store.ensure_set("text", "tiny-bert", CONFIG, WIDTH)
        vectors = np.zeros((2, WIDTH))
        vectors[1, 3] = np.nan
        with pytest.raises(StoreError, match="'p2'"):
            store.commit(header, ["p1", "p2"], ["a", "b"], ["a" * 64] * 2, vectors)
        assert fmt.list_shards(path) == []


def test_repeated_keys_from_merge_resolve_last(tmp_path):
    # Rows with a repeated key must collapse to the last one, and later
    # journal rows must still land on the right positions.
    path = tmp_path / "s.h5"
    name = make_store(path, ["p0"])
    header = FeatureStore(path).read(name).header
    rows = Rows(
        np.array(["a", "b", "a"], dtype=object),
        np.array(["r", "r", "r"], dtype=object),
        np.array(["1" * 64, "2" * 64, "3" * 64], dtype=object),
        np.zeros(3, dtype=np.int32),
        np.stack([np.full(WIDTH, v, dtype=np.float32) for v in (1, 2, 3)]),
    )
    with FeatureStore(path, mode="a") as store:
        store.add_sets([FeatureSet(header, rows)])
    with FeatureStore(path, mode="a") as store:
        header = store.ensure_set("text", "tiny-bert", CONFIG, WIDTH)
        store.commit(header, ["c"], ["r"], ["4" * 64], np.full((1, WIDTH), 4.0))
        store.commit(header, ["c"], ["r"], ["5" * 64], np.full((1, WIDTH), 5.0))
        vectors = stored_vectors(path, name)
        assert vectors[("a", "r", 0)][0] == 3.0
        assert vectors[("b", "r", 0)][0] == 2.0
        assert vectors[("c", "r", 0)][0] == 5.0
    vectors = stored_vectors(path, name)
    assert len(vectors) == 4
    assert vectors[("a", "r", 0)][0] == 3.0
    assert vectors[("c", "r", 0)][0] == 5.0
    assert verify_store(path).ok


def test_stale_shards_after_killed_removal_stay_out(tmp_path):
    # A kill between swapping in the new main file and deleting the shards
    # leaves shards that the new main file already covers. A removed set
    # must not come back from them.
    path = tmp_path / "s.h5"
    with FeatureStore(path, mode="a") as store:
        keep = store.ensure_set("text", "tiny-bert", CONFIG, WIDTH)
        drop = store.ensure_set("text", "other-bert", CONFIG, WIDTH)
        commit_rows(store, keep, ["p1"])
        commit_rows(store, drop, ["p2"])
        saved = tmp_path / "saved"
        shutil.copytree(fmt.journal_dir(path), saved)
        store.remove_set(drop.name)
        shutil.rmtree(fmt.journal_dir(path))
        shutil.copytree(saved, fmt.journal_dir(path))
        store._lock.release()  # simulate the kill: no closing compaction
        store._lock = None

    assert [s.name for s in FeatureStore(path).list_sets()] == [keep.name]
    assert verify_store(path).ok
    with FeatureStore(path, mode="a"):
        assert fmt.list_shards(path) == []
    assert [s.name for s in FeatureStore(path).list_sets()] == [keep.name]


def test_interrupted_compaction_leaves_store_unchanged(tmp_path, monkeypatch):
    path = tmp_path / "s.h5"
    name = make_store(path, ["p1", "p2"])
    before = stored_vectors(path, name)
    store = FeatureStore(path, mode="a")
    header = store.ensure_set("text", "tiny-bert", CONFIG, WIDTH)
    commit_rows(store, header, ["p3"])

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fmt, "_merge_group", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.close()
    monkeypatch.undo()

    assert list(tmp_path.glob("s.h5.tmp-*")) == []
    assert len(fmt.list_shards(path)) == 1
    after = stored_vectors(path, name)
    assert set(after) == set(before) | {("p3", "row p3", 0)}
    with FeatureStore(path, mode="a", wait=0):  # the lock was released
        pass


def test_stale_temporaries_removed_by_next_writer(tmp_path):
    path = tmp_path / "s.h5"
    make_store(path, ["p1"])
    (tmp_path / "s.h5.tmp-999").write_bytes(b"half a main file")
    fmt.journal_dir(path).mkdir(exist_ok=True)
    (fmt.journal_dir(path) / "000000000009-deadbeef.shard.h5.tmp").write_bytes(b"half a shard")

    FeatureStore(path).list_sets()  # readers ignore them
    with FeatureStore(path, mode="a"):
        pass
    assert list(tmp_path.glob("s.h5.tmp-*")) == []
    assert list(fmt.journal_dir(path).iterdir()) == []


def test_read_retries_when_compaction_deletes_shard(tmp_path, monkeypatch):
    path = tmp_path / "s.h5"
    writer = FeatureStore(path, mode="a")
    header = writer.ensure_set("text", "tiny-bert", CONFIG, WIDTH)
    commit_rows(writer, header, ["p1", "p2"])
    commit_rows(writer, header, ["p3"])
    original = fmt._open_h5
    compacted = []

    def open_after_compaction(file_path, mode="r"):
        # The first shard open comes too late: a compaction has run since the listing.
        if file_path.name.endswith(fmt.SHARD_SUFFIX) and not compacted:
            compacted.append(file_path)
            monkeypatch.setattr(fmt, "_open_h5", original)
            writer.compact()
            monkeypatch.setattr(fmt, "_open_h5", open_after_compaction)
        return original(file_path, mode)

    monkeypatch.setattr(fmt, "_open_h5", open_after_compaction)
    rows = FeatureStore(path).read(header.name).rows
    monkeypatch.undo()
    writer.close()

    assert compacted
    assert sorted(rows.patient_ids.tolist()) == ["p1", "p2", "p3"]


def test_read_retries_when_listing_skips_shard(tmp_path, monkeypatch):
    path = tmp_path / "s.h5"
    with FeatureStore(path, mode="a") as writer:
        header = writer.ensure_set("text", "tiny-bert", CONFIG, WIDTH)
        for patient_id in ("p1", "p2", "p3"):
            commit_rows(writer, header, [patient_id])
        original = fmt.list_shards
        calls = []

        def listing_missing_second(store_path, after=0):
            shards = original(store_path, after)
            calls.append(len(shards))
            return [s for s in shards if fmt.shard_sequence(s) != 2] if len(calls) == 1 else shards

        monkeypatch.setattr(fmt, "list_shards", listing_missing_second)
        rows = FeatureStore(path).read(header.name).rows
        monkeypatch.undo()

    assert len(calls) >= 2
    assert sorted(rows.patient_ids.tolist()) == ["p1", "p2", "p3"]


def test_remove_set_keeps_others(tmp_path):
    path = tmp_path / "s.h5"
    name = make_store(path, ["p1", "p2"])
    other = make_store(path, ["p3"], config={**CONFIG, "max_length": 8})
    with FeatureStore(path, mode="a") as store:
        store.remove_set(name)
    assert [s.name for s in FeatureStore(path).list_sets()] == [other]
    with FeatureStore(path, mode="a") as store, pytest.raises(StoreError, match="no feature set named"):
        store.remove_set(name)


def test_config_change_makes_new_set(tmp_path):
    path = tmp_path / "s.h5"
    first = make_store(path, ["p1"])
    second = make_store(path, ["p1"], config={**CONFIG, "weights": "other"})
    assert first != second
    assert len(FeatureStore(path).list_sets()) == 2
    with pytest.raises(StoreError, match="several text feature sets"):
        FeatureStore(path).choose_set("text")


def test_store_readable_in_read_only_folder(tmp_path):
    # Runs as root too: the reader must not try to create anything.
    folder = tmp_path / "ro"
    folder.mkdir()
    path = folder / "s.h5"
    name = make_store(path, ["p1", "p2"])
    with FeatureStore(path, mode="a") as store:
        commit_rows(store, store.ensure_set("text", "tiny-bert", CONFIG, WIDTH), ["p3"])
        store._lock.release()  # leave the shard pending, as a killed writer does
        store._lock = None
    folder.chmod(0o555)
    before = sorted(p.name for p in folder.rglob("*"))
    try:
        assert len(FeatureStore(path).read(name).rows) == 3
        assert verify_store(path).ok
    finally:
        folder.chmod(0o755)
    assert sorted(p.name for p in folder.rglob("*")) == before


def test_main_file_without_applied_attribute(tmp_path):
    # Version 1 files written before journal_applied_through existed lack it;
    # their pending shards must all apply, and new shards must follow them.
    path = tmp_path / "s.h5"
    name = make_store(path, ["p1", "p2"])
    with h5py.File(path, "a") as handle:
        del handle.attrs[fmt.APPLIED_ATTR]
    with FeatureStore(path, mode="a") as store:
        header = store.ensure_set("text", "tiny-bert", CONFIG, WIDTH)
        commit_rows(store, header, ["p3"])
        assert [fmt.shard_sequence(p) for p in fmt.list_shards(path)] == [1]
        assert len(FeatureStore(path).read(name).rows) == 3
    assert len(FeatureStore(path).read(name).rows) == 3
    assert verify_store(path).ok
