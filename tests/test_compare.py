"""Tests for ``mmdx compare`` and ``train-head --fusion`` on synthetic feature stores."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner

from mmdx.cli import main
from mmdx.store import FeatureStore
from mmdx.train.compare import compare

N_PATIENTS = 240


def _write_store(tmp_path, image_signal: float, text_signal: float, modalities=("image", "text"),
                 missing_text: int = 0, seed: int = 0):
    """Write a store and labels where the label is the sign of two independent latent signals.

    The image side carries latent a (scaled by ``image_signal``) in its first
    dimension, the text side latent b; the label is 1 when
    ``image_signal * a + text_signal * b + noise > 0``. So each side alone
    carries part of the signal and both together carry more.
    """
    rng = np.random.default_rng(seed)
    ids = [f"S{i:04d}" for i in range(N_PATIENTS)]
    latent_image = rng.normal(size=N_PATIENTS)
    latent_text = rng.normal(size=N_PATIENTS)
    score = image_signal * latent_image + text_signal * latent_text + 0.3 * rng.normal(size=N_PATIENTS)
    labels = (score > np.quantile(score, 0.6)).astype(int)

    image = rng.normal(size=(N_PATIENTS * 2, 48)).astype(np.float32)
    image[:, 0] += np.repeat(2.5 * latent_image, 2) if image_signal else 0.0
    text = rng.normal(size=(N_PATIENTS, 12)).astype(np.float32)
    text[:, 0] += 2.5 * latent_text if text_signal else 0.0

    store_path = tmp_path / "synthetic.h5"
    with FeatureStore(store_path, mode="a") as store:
        if "image" in modalities:
            header = store.ensure_set("image", "test-image", {"seed": seed}, 48)
            image_ids = [patient_id for patient_id in ids for _ in range(2)]
            items = [f"{patient_id}_{k}.png" for patient_id in ids for k in range(2)]
            store.commit(header, image_ids, items, [f"h-{item}" for item in items], image)
        if "text" in modalities:
            header = store.ensure_set("text", "test-text", {"seed": seed}, 12)
            kept = slice(missing_text, None)
            store.commit(header, ids[kept], ["report"] * len(ids[kept]),
                         [f"t-{patient_id}" for patient_id in ids[kept]], text[kept])
    labels_path = tmp_path / "labels.csv"
    with open(labels_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patient_id", "group"])
        writer.writerows([patient_id, "pos" if label else "neg"] for patient_id, label in zip(ids, labels))
    return store_path, labels_path


def _compare(store_path, labels_path, **options):
    settings = dict(label_column="group", positive="pos", folds=3, repeats=1, bootstrap=200, jobs=1)
    settings.update(options)
    return compare(store_path, labels_path, **settings)


def _auc(result, head):
    return result.summary[head]["roc_auc"]["mean"]


def test_compare_noise_modality_does_not_sink_late_fusion(tmp_path):
    store_path, labels_path = _write_store(tmp_path, image_signal=0.0, text_signal=1.0)

    result = _compare(store_path, labels_path, fusions=("late",))

    assert result.reference == "text"
    assert _auc(result, "text") > 0.8
    assert _auc(result, "hybrid-late") > _auc(result, "text") - 0.03
    assert _auc(result, "hybrid-late") > _auc(result, "hybrid")


def test_compare_complementary_signals_hybrid_beats_both(tmp_path):
    store_path, labels_path = _write_store(tmp_path, image_signal=1.0, text_signal=1.0)

    result = _compare(store_path, labels_path, fusions=("late", "gated"))

    best_single = max(_auc(result, "image"), _auc(result, "text"))
    assert _auc(result, "hybrid-late") > best_single + 0.05
    assert _auc(result, "hybrid-gated") > best_single + 0.05
    bootstrap = next(test for name, test in zip(result.test_heads, result.tests)
                     if name == "hybrid-late" and test.method == "paired_bootstrap")
    assert bootstrap.difference > 0
    assert bootstrap.p_value < 0.05


def test_compare_uses_same_folds_for_every_head(tmp_path):
    store_path, labels_path = _write_store(tmp_path, image_signal=1.0, text_signal=1.0)

    result = _compare(store_path, labels_path, fusions=("attention",))

    folds = {}
    for name, head in result.heads.items():
        predictions = head.cv.predictions
        folds[name] = dict(zip(predictions["patient_id"].tolist(), predictions["fold"].tolist()))
    assert folds["image"] == folds["text"] == folds["hybrid"] == folds["hybrid-attention"]


def test_compare_cli_writes_outputs(tmp_path):
    store_path, labels_path = _write_store(tmp_path, image_signal=0.5, text_signal=1.0)
    out = tmp_path / "cmp"

    run = CliRunner().invoke(main, [
        "compare", "--store", str(store_path), "--labels", str(labels_path), "--label-column", "group",
        "--positive", "pos", "--folds", "3", "--repeats", "2", "--fusion", "late", "--fusion", "gated",
        "--bootstrap", "200", "--jobs", "1", "--out", str(out), "-q",
    ])

    assert run.exit_code == 0, run.output
    assert "| hybrid-late |" in run.output
    assert "paired bootstrap" in run.output
    for name in ("table.md", "table.csv", "tests.csv", "compare.json", "roc.png"):
        assert (out / name).is_file(), name
    assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for head in ("image", "text", "hybrid", "hybrid-late", "hybrid-gated"):
        assert (out / head / "metrics.json").is_file(), head
    summary = json.loads((out / "compare.json").read_text())
    assert summary["reference"] == "text"
    assert {test["head"] for test in summary["tests"]} == {"hybrid", "hybrid-late", "hybrid-gated"}
    with open(out / "table.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 5 * 6
    assert all(float(row["ci_low"]) <= float(row["mean"]) <= float(row["ci_high"]) for row in rows)


def test_compare_one_modality_reports_unimodal_head(tmp_path):
    store_path, labels_path = _write_store(tmp_path, image_signal=1.0, text_signal=0.0, modalities=("image",))

    result = _compare(store_path, labels_path, fusions=("late",))

    assert list(result.heads) == ["image"]
    assert result.tests == []


def test_compare_rejects_unknown_fusion(tmp_path):
    store_path, labels_path = _write_store(tmp_path, image_signal=1.0, text_signal=1.0)

    run = CliRunner().invoke(main, [
        "compare", "--store", str(store_path), "--labels", str(labels_path), "--label-column", "group",
        "--positive", "pos", "--fusion", "sum",
    ])

    assert run.exit_code == 2
    assert "--fusion" in run.output


def test_compare_missing_store_is_an_error(tmp_path):
    run = CliRunner().invoke(main, [
        "compare", "--store", str(tmp_path / "absent.h5"), "--labels", str(tmp_path / "labels.csv"),
        "--label-column", "group",
    ])

    assert run.exit_code == 1
    assert run.output.startswith("Error: ")
    assert "absent.h5" in run.output


@pytest.mark.parametrize("fusion", ["late", "gated", "attention"])
def test_train_head_keep_missing_counts_modalities(tmp_path, fusion):
    store_path, labels_path = _write_store(tmp_path, image_signal=1.0, text_signal=1.0, missing_text=30)
    out = tmp_path / "run"

    run = CliRunner().invoke(main, [
        "train-head", "--store", str(store_path), "--labels", str(labels_path), "--label-column", "group",
        "--positive", "pos", "--folds", "3", "--fusion", fusion, "--keep-missing", "--modality-dropout", "0.2",
        "--epochs", "40",
        "--jobs", "1", "--out", str(out), "-q",
    ])

    assert run.exit_code == 0, run.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_patients"] == N_PATIENTS
    assert metrics["modality_counts"] == {"both": N_PATIENTS - 30, "image_only": 30, "text_only": 0,
                                          "total": N_PATIENTS}
    assert metrics["fusion"] == fusion
    assert metrics["metrics"]["roc_auc"]["mean"] > 0.7


def test_train_head_drops_patients_without_keep_missing(tmp_path):
    store_path, labels_path = _write_store(tmp_path, image_signal=1.0, text_signal=1.0, missing_text=30)
    out = tmp_path / "run"

    run = CliRunner().invoke(main, [
        "train-head", "--store", str(store_path), "--labels", str(labels_path), "--label-column", "group",
        "--positive", "pos", "--folds", "3", "--fusion", "gated", "--jobs", "1", "--out", str(out), "-q",
    ])

    assert run.exit_code == 0, run.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["modality_counts"]["both"] == N_PATIENTS - 30
    assert metrics["n_patients"] == N_PATIENTS - 30


def test_train_head_rejects_bad_dropout(tmp_path):
    store_path, labels_path = _write_store(tmp_path, image_signal=1.0, text_signal=1.0)

    run = CliRunner().invoke(main, [
        "train-head", "--store", str(store_path), "--labels", str(labels_path), "--label-column", "group",
        "--positive", "pos", "--fusion", "gated", "--dropout", "1.0",
    ])

    assert run.exit_code == 2
    assert "--dropout" in run.output


def test_train_head_keep_missing_with_augmented_is_an_error(tmp_path):
    store_path, labels_path = _write_store(tmp_path, image_signal=1.0, text_signal=1.0)

    run = CliRunner().invoke(main, [
        "train-head", "--store", str(store_path), "--labels", str(labels_path), "--label-column", "group",
        "--positive", "pos", "--keep-missing", "--augmented",
    ])

    assert run.exit_code == 1
    assert run.output.startswith("Error: --keep-missing")


def test_train_head_default_stays_recipe(tmp_path):
    store_path, labels_path = _write_store(tmp_path, image_signal=1.0, text_signal=1.0)
    out = tmp_path / "run"

    run = CliRunner().invoke(main, [
        "train-head", "--store", str(store_path), "--labels", str(labels_path), "--label-column", "group",
        "--positive", "pos", "--folds", "3", "--jobs", "1", "--out", str(out), "-q",
    ])

    assert run.exit_code == 0, run.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["fusion"] == "concat"
    assert metrics["standardize"] is False
    assert metrics["regularisation"] == {"dropout": 0.0, "weight_decay": 0.0, "early_stopping": 0,
                                         "class_weight": "none", "modality_dropout": 0.0}
