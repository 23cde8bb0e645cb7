"""train-head: the cap on augmented views and folds that keep duplicate images together."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from mmdx.cli import main
from mmdx.errors import InputError
from mmdx.store.api import FeatureStore
from mmdx.train.cv import cross_validate, restricted_folds
from mmdx.train.data import load_patient_data, store_duplicate_groups
from mmdx.train.folds import duplicate_groups, patient_folds
from mmdx.train.run import train_head


class RecordingHead:
    """Record the training and test inputs of every fold; predict the first column."""

    calls: list[dict] = []

    def __init__(self, widths):
        self.widths = widths

    def fit(self, x, y, rng):
        RecordingHead.calls.append({"train": {name: m.copy() for name, m in x.items()}})
        return self

    def predict_proba(self, x):
        RecordingHead.calls[-1]["test"] = {name: m.copy() for name, m in x.items()}
        return np.full(len(x[sorted(x)[0]]), 0.5, dtype=np.float32)


def write_store(path, patient_ids, n_views=1, shared=(), text=True):
    """Image vectors [patient number, view, 0, 0], one image per patient, views 0..n_views-1.

    ``shared`` lists pairs of patients whose image has the same content hash.
    """
    digest = {p: f"h{p}" for p in patient_ids}
    for a, b in shared:
        digest[b] = digest[a]
    with FeatureStore(path, mode="a") as store:
        header = store.ensure_set("image", "coded", {}, 4)
        rows = [(p, v) for p in patient_ids for v in range(n_views)]
        vectors = np.asarray([[int(p[1:]), v, 0, 0] for p, v in rows], np.float32)
        store.commit(
            header, [p for p, _ in rows], [f"{p}.png" for p, _ in rows], [digest[p] for p, _ in rows], vectors,
            [v for _, v in rows],
        )
        if text:
            header = store.ensure_set("text", "coded", {}, 3)
            vectors = np.asarray([[int(p[1:]), 0, 0] for p in patient_ids], np.float32)
            hashes = [f"t{p}" for p in patient_ids]
            store.commit(header, list(patient_ids), ["report"] * len(patient_ids), hashes, vectors)


def write_labels(path, labels):
    path.write_text("patient_id,label\n" + "".join(f"{p},{y}\n" for p, y in labels.items()))
    return path


# Views cap ----------------------------------------------------------------------------


def test_views_cap_trains_on_views_up_to_k(tmp_path):
    store = tmp_path / "store.h5"
    ids = [f"P{i}" for i in range(24)]
    write_store(store, ids, n_views=9)
    data = load_patient_data(store, {p: i % 2 for i, p in enumerate(ids)}, "hybrid", augmented=True, views=4)
    assert data.augmented_views == 4
    RecordingHead.calls = []
    cross_validate(data, RecordingHead, n_folds=3, seed=0)
    for call in RecordingHead.calls:
        image = call["train"]["image"]
        trained = set(image[:, 0].astype(int).tolist())
        assert sorted(set(image[:, 1].astype(int).tolist())) == [0, 1, 2, 3, 4]
        assert len(image) == 5 * len(trained)
        assert not call["test"]["image"][:, 1].any()
        assert not trained & set(call["test"]["image"][:, 0].astype(int).tolist())


def test_views_default_uses_every_stored_view(tmp_path):
    store = tmp_path / "store.h5"
    ids = [f"P{i}" for i in range(12)]
    write_store(store, ids, n_views=9)
    data = load_patient_data(store, {p: i % 2 for i, p in enumerate(ids)}, "image", augmented=True)
    assert data.augmented_views == 8
    assert len(data.augmented_index) == 8 * len(ids)


def test_views_above_stored_rejected(tmp_path):
    store = tmp_path / "store.h5"
    write_store(store, ["P1", "P2"], n_views=3)
    with pytest.raises(InputError, match="--views 4 .*contains \\(2\\)"):
        load_patient_data(store, {"P1": 0, "P2": 1}, "image", augmented=True, views=4)


def test_views_needs_augmented(tmp_path):
    store = tmp_path / "store.h5"
    labels = write_labels(tmp_path / "labels.csv", {"P1": 0, "P2": 1})
    write_store(store, ["P1", "P2"], n_views=3)
    with pytest.raises(InputError, match="--views 2 selects augmented views"):
        train_head(store, labels, "label", modality="image", views=2)


def test_views_recorded_in_outputs(tmp_path):
    store = tmp_path / "store.h5"
    ids = [f"P{i}" for i in range(20)]
    labels = write_labels(tmp_path / "labels.csv", {p: i % 2 for i, p in enumerate(ids)})
    write_store(store, ids, n_views=5)
    out = tmp_path / "out"
    result = train_head(store, labels, "label", modality="image", folds=2, epochs=1, augmented=True, views=2, out=out)
    for fold in result.cv.fold_metrics:
        assert fold["n_train_rows"] == 3 * fold["n_train"]
    assert json.loads((out / "metrics.json").read_text())["augmented_views"] == 2
    assert json.loads((out / "config.json").read_text())["views"] == 2


# Duplicate groups ---------------------------------------------------------------------


def test_duplicate_groups_follow_chains():
    ids = ["A", "B", "B", "C", "D", "E"]
    hashes = ["x", "x", "y", "y", "z", "w"]
    assert duplicate_groups(ids, hashes) == [["A", "B", "C"]]
    # B is unlabelled: A and C stay linked through it.
    assert duplicate_groups(ids, hashes, keep=["A", "C", "D"]) == [["A", "C"]]
    assert duplicate_groups(["A", "B"], ["x", "y"]) == []


def test_no_duplicates_gives_plain_folds(tmp_path):
    store = tmp_path / "store.h5"
    ids = [f"P{i}" for i in range(30)]
    labels = {p: int(i % 3 == 0) for i, p in enumerate(ids)}
    write_store(store, ids)
    data = load_patient_data(store, labels, "image")
    data.fold_groups = store_duplicate_groups(store, list(labels))
    assert data.fold_groups == []
    for seed in range(3):
        expected = patient_folds(labels, 5, seed)
        assert patient_folds(labels, 5, seed, groups=[]) == expected
        for (train, test), (train_ids, test_ids) in zip(restricted_folds(data, 5, seed), expected):
            assert data.patient_ids[train].tolist() == train_ids
            assert data.patient_ids[test].tolist() == test_ids


def _sides(result):
    """Patient ID to its test fold, per repeat."""
    predictions = result.cv.predictions
    return {
        (patient_id, repeat): fold
        for patient_id, fold, repeat in zip(
            predictions["patient_id"].tolist(), predictions["fold"].tolist(), predictions["repeat"].tolist()
        )
    }


@pytest.mark.parametrize("modality", ["image", "text", "hybrid"])
def test_identical_images_never_split(tmp_path, modality):
    store = tmp_path / "store.h5"
    ids = [f"P{i}" for i in range(40)]
    pairs = [(f"P{i}", f"P{i + 1}") for i in range(0, 24, 2)]
    labels = write_labels(tmp_path / "labels.csv", {p: int(i % 4 < 2) for i, p in enumerate(ids)})
    write_store(store, ids, shared=pairs)
    grouped = train_head(store, labels, "label", modality=modality, folds=5, repeats=2, epochs=1)
    assert grouped.report["duplicate_groups"] == len(pairs)
    sides = _sides(grouped)
    for a, b in pairs:
        for repeat in range(2):
            assert sides[(a, repeat)] == sides[(b, repeat)], (a, b, repeat)
    ignored = train_head(store, labels, "label", modality=modality, folds=5, repeats=2, epochs=1, duplicates="ignore")
    assert ignored.report["duplicate_groups"] == len(pairs)
    sides = _sides(ignored)
    assert any(sides[(a, r)] != sides[(b, r)] for a, b in pairs for r in range(2))


def test_duplicate_groups_same_for_every_modality(tmp_path):
    store = tmp_path / "store.h5"
    ids = [f"P{i}" for i in range(30)]
    labels = write_labels(tmp_path / "labels.csv", {p: i % 2 for i, p in enumerate(ids)})
    write_store(store, ids, shared=[("P0", "P3"), ("P4", "P9"), ("P10", "P11")])
    runs = [train_head(store, labels, "label", modality=m, folds=3, epochs=1) for m in ("image", "text", "hybrid")]
    sides = [_sides(run) for run in runs]
    assert sides[0] == sides[1] == sides[2]


def test_cli_reports_duplicates(tmp_path):
    store = tmp_path / "store.h5"
    ids = [f"P{i}" for i in range(20)]
    labels = write_labels(tmp_path / "labels.csv", {p: i % 2 for i, p in enumerate(ids)})
    write_store(store, ids, shared=[("P0", "P1")])
    args = ["train-head", "--store", str(store), "--labels", str(labels), "--label-column", "label",
            "--modality", "image", "--folds", "2", "--epochs", "1", "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "duplicate images: 1 patient group(s), kept in one fold each" in result.output
    result = CliRunner().invoke(main, [*args, "--duplicates", "ignore"])
    assert "NOT grouped" in result.output
    result = CliRunner().invoke(main, [*args, "--views", "0"])
    assert result.exit_code == 2
