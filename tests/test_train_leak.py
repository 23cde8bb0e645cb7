"""Tests of the leak guard for fine-tuned text encoders, single and per fold."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmdx.errors import InputError, StoreError
from mmdx.store.api import FeatureStore
from mmdx.train.folds import patient_folds
from mmdx.train.labels import load_labels
from mmdx.train.run import train_head
from mmdx.train.synthetic import write_synthetic_store


@pytest.fixture
def image_store(tmp_path):
    """A store with image vectors only, for 60 patients, and its labels."""
    store = tmp_path / "store.h5"
    labels = tmp_path / "labels.csv"
    write_synthetic_store(store, labels, n_patients=60, widths={"image": 8})
    return store, labels, load_labels(labels, "patient_id", "label")


def add_text_set(store, labels, training, encoder="tuned"):
    """Add a text set whose config carries ``encoder_training``; returns its name."""
    ids = sorted(labels)
    rng = np.random.default_rng([len(training["patients"]), training["fold"] or 0])
    vectors = rng.standard_normal((len(ids), 4)).astype(np.float32)
    with FeatureStore(store, mode="a") as writer:
        header = writer.ensure_set("text", encoder, {"encoder_training": training}, 4)
        writer.commit(header, ids, ["report"] * len(ids), [f"h{p}" for p in ids], vectors)
    return header.name


def add_per_fold_group(store, labels, n_folds=3, seed=0, group="ft-1", leak_fold=None):
    """Add one text set per fold, fine-tuned on that fold's training patients."""
    names = []
    for k, (train_ids, test_ids) in enumerate(patient_folds(labels, n_folds, seed)):
        patients = sorted(train_ids + (test_ids[:2] if k == leak_fold else []))
        training = {"group": group, "fold": k, "n_folds": n_folds, "seed": seed, "patients": patients}
        names.append(add_text_set(store, labels, training))
    return names


def test_single_encoder_without_overlap_runs(image_store):
    store, labels_path, labels = image_store
    add_text_set(store, labels, {"group": "g", "fold": None, "n_folds": None, "seed": 0, "patients": ["other1"]})
    result = train_head(store, labels_path, "label", modality="text", folds=3, epochs=1)
    assert result.report["leaked"] is False


def test_single_encoder_overlap_rejected(image_store):
    store, labels_path, labels = image_store
    name = add_text_set(
        store, labels, {"group": "g", "fold": None, "n_folds": None, "seed": 0, "patients": sorted(labels)[:7]}
    )
    with pytest.raises(InputError, match=f"text set {name}: its encoder was trained on 7 of the 60 evaluated"):
        train_head(store, labels_path, "label", modality="hybrid", folds=3, epochs=1)


def test_single_encoder_allow_leak_marks(image_store, tmp_path):
    store, labels_path, labels = image_store
    add_text_set(store, labels, {"group": "g", "fold": None, "n_folds": None, "seed": 0, "patients": sorted(labels)})
    train_head(store, labels_path, "label", modality="text", folds=3, epochs=1, allow_leak=True, out=tmp_path / "o")
    report = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert report["leaked"] is True
    assert "60 of the 60" in report["leak_findings"][0]


def test_image_run_ignores_text_encoder(image_store):
    store, labels_path, labels = image_store
    add_text_set(store, labels, {"group": "g", "fold": None, "n_folds": None, "seed": 0, "patients": sorted(labels)})
    result = train_head(store, labels_path, "label", modality="image", folds=3, epochs=1)
    assert result.report["leaked"] is False


def test_per_fold_group_uses_fold_sets(image_store):
    store, labels_path, labels = image_store
    names = add_per_fold_group(store, labels, n_folds=3, seed=0)
    result = train_head(store, labels_path, "label", modality="hybrid", folds=3, seed=0, epochs=1)
    assert result.report["leaked"] is False
    assert result.report["sets"]["text"]["names"] == names
    assert result.report["sets"]["text"]["group"] == "ft-1"
    # Each fold's text inputs come from that fold's set.
    data = result.data
    assert not np.array_equal(data.inputs(0)["text"], data.inputs(1)["text"])


def test_per_fold_group_selected_by_member_name(image_store):
    store, labels_path, labels = image_store
    names = add_per_fold_group(store, labels, n_folds=3, seed=0)
    add_text_set(store, labels, {"group": "base", "fold": None, "n_folds": None, "seed": 0, "patients": []}, "plain")
    result = train_head(store, labels_path, "label", modality="text", folds=3, epochs=1, text_set=names[1])
    assert result.report["sets"]["text"]["names"] == names
    with pytest.raises(StoreError, match="several text feature sets"):
        train_head(store, labels_path, "label", modality="text", folds=3, epochs=1)


def test_per_fold_group_needs_matching_folds_and_seed(image_store):
    store, labels_path, labels = image_store
    add_per_fold_group(store, labels, n_folds=3, seed=0)
    with pytest.raises(InputError, match="--folds 3 --seed 0, but this run uses --folds 4 --seed 0"):
        train_head(store, labels_path, "label", modality="text", folds=4, seed=0, epochs=1)
    with pytest.raises(InputError, match="--folds 3 --seed 0, but this run uses --folds 3 --seed 1"):
        train_head(store, labels_path, "label", modality="text", folds=3, seed=1, epochs=1)
    with pytest.raises(InputError, match="use --repeats 1"):
        train_head(store, labels_path, "label", modality="text", folds=3, seed=0, repeats=2, epochs=1)


def test_per_fold_group_test_patient_in_training(image_store):
    store, labels_path, labels = image_store
    add_per_fold_group(store, labels, n_folds=3, seed=0, leak_fold=1)
    with pytest.raises(InputError, match=r"fold 1 of group 'ft-1'\): its encoder was trained on 2 of fold 1's"):
        train_head(store, labels_path, "label", modality="text", folds=3, seed=0, epochs=1)
    result = train_head(store, labels_path, "label", modality="text", folds=3, seed=0, epochs=1, allow_leak=True)
    assert result.report["leaked"] is True


def test_per_fold_group_incomplete_rejected(image_store):
    store, labels_path, labels = image_store
    train_ids = patient_folds(labels, 3, 0)[0][0]
    add_text_set(store, labels, {"group": "g", "fold": 0, "n_folds": 3, "seed": 0, "patients": sorted(train_ids)})
    with pytest.raises(StoreError, match=r"group 'g' has sets for folds \[0\] but needs one set for each of folds 0..2"):
        train_head(store, labels_path, "label", modality="text", folds=3, epochs=1)
