"""Tests of train-head: joining, folds, aggregation, augmented views, outputs and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from mmdx.cli import main
from mmdx.errors import InputError
from mmdx.store.api import FeatureStore
from mmdx.train.cv import METRIC_NAMES, cross_validate, restricted_folds
from mmdx.train.data import DROP_NO_IMAGE, DROP_NO_TEXT, aggregate_rows, load_patient_data
from mmdx.train.heads import make_concat_head
from mmdx.train.labels import DROP_NO_LABEL, DROP_UNRECOGNIZED, load_labels
from mmdx.train.run import train_head
from mmdx.train.synthetic import write_synthetic_store


@pytest.fixture
def synthetic(tmp_path):
    """A store whose image vectors carry the label and whose text vectors are noise."""
    store = tmp_path / "store.h5"
    labels = tmp_path / "labels.csv"
    write_synthetic_store(store, labels, n_patients=150, signal={"image": 1.5, "text": 0.0})
    return store, labels


class RecordingHead:
    """A head that records its training and test inputs and predicts the first image column."""

    calls: list[dict] = []

    def __init__(self, widths):
        self.widths = widths

    def fit(self, x, y, rng):
        RecordingHead.calls.append({"train": {name: m.copy() for name, m in x.items()}, "y": y.copy()})
        return self

    def predict_proba(self, x):
        RecordingHead.calls[-1]["test"] = {name: m.copy() for name, m in x.items()}
        first = x[sorted(x)[0]][:, 0]
        return (1 / (1 + np.exp(-first))).astype(np.float32)


def write_coded_store(path, patient_ids, n_images=2, n_views=3, text=True):
    """Write image vectors [patient number, view, image, ...] and text vectors [patient number, ...]."""
    with FeatureStore(path, mode="a") as store:
        header = store.ensure_set("image", "coded", {}, 4)
        rows = [(p, f"{p}_{i}.png", v) for p in patient_ids for i in range(n_images) for v in range(n_views)]
        vectors = np.asarray([[int(p[1:]), v, i, 0] for p, (_, _, v), i in _with_image_index(rows)], np.float32)
        store.commit(header, [r[0] for r in rows], [r[1] for r in rows], [f"h{r}" for r in rows], vectors, [r[2] for r in rows])
        if text:
            header = store.ensure_set("text", "coded", {}, 3)
            vectors = np.asarray([[int(p[1:]), 0, 0] for p in patient_ids], np.float32)
            store.commit(header, list(patient_ids), ["report"] * len(patient_ids), [f"t{p}" for p in patient_ids], vectors)


def _with_image_index(rows):
    for patient_id, item, view in rows:
        image = int(item.split("_")[1].split(".")[0])
        yield patient_id, (patient_id, item, view), image


def write_labels(path, labels):
    path.write_text("patient_id,label\n" + "".join(f"{p},{y}\n" for p, y in labels.items()))
    return path


# Metrics and outputs ---------------------------------------------------------


def test_train_head_metric_keys(synthetic, tmp_path):
    store, labels = synthetic
    result = train_head(store, labels, "label", modality="hybrid", folds=3, epochs=2, out=tmp_path / "out")
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert report["modality"] == "hybrid"
    assert report["n_patients"] == 150
    assert set(report["metrics"]) == set(METRIC_NAMES)
    for name in METRIC_NAMES:
        assert isinstance(report["metrics"][name]["mean"], float), name
        assert isinstance(report["metrics"][name]["std"], float), name
        assert len(report["metrics"][name]["per_fold"]) == 3, name
    for key in ("dropped", "sets", "aggregate", "seed", "n_folds", "repeats", "leaked", "mmdx_version"):
        assert key in report, key
    assert report["leaked"] is False
    assert report["sets"]["image"]["names"][0].startswith("image-")
    assert result.metrics == report["metrics"]


def test_train_head_predictions_csv(synthetic, tmp_path):
    store, labels = synthetic
    train_head(store, labels, "label", modality="image", folds=3, repeats=2, epochs=1, out=tmp_path / "out")
    lines = (tmp_path / "out" / "predictions.csv").read_text().splitlines()
    assert lines[0] == "patient_id,label,probability,prediction,fold,repeat"
    rows = [line.split(",") for line in lines[1:]]
    assert len(rows) == 300
    for repeat in ("0", "1"):
        ids = [row[0] for row in rows if row[5] == repeat]
        assert sorted(ids) == sorted(set(ids))
        assert len(ids) == 150
    for row in rows:
        assert row[3] == str(int(float(row[2]) >= 0.5))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["repeats"] == 2
    assert config["modality"] == "image"
    assert config["label_column"] == "label"


def test_train_head_output_atomic_on_failure(synthetic, tmp_path, monkeypatch):
    store, labels = synthetic
    out = tmp_path / "out"
    train_head(store, labels, "label", modality="image", folds=3, epochs=1, out=out)
    before = (out / "metrics.json").read_text()

    import mmdx.train.run as run

    calls = []
    real_write_json = run._write_json

    def write_then_fail(path, value):
        calls.append(path.name)
        real_write_json(path, value)
        if path.name == "config.json":
            raise OSError("disk full")

    monkeypatch.setattr(run, "_write_json", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        train_head(store, labels, "label", modality="image", folds=3, epochs=1, seed=1, out=out)
    assert calls == ["metrics.json", "config.json"]
    assert (out / "metrics.json").read_text() == before
    assert sorted(path.name for path in out.iterdir()) == [
        ".mmdx-output.json", "config.json", "metrics.json", "predictions.csv"]
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith(".out")]


def test_train_head_learns_signal_not_noise(synthetic):
    store, labels = synthetic
    image = train_head(store, labels, "label", modality="image", folds=5, epochs=10)
    text = train_head(store, labels, "label", modality="text", folds=5, epochs=10, repeats=3)
    assert image.metrics["roc_auc"]["mean"] > 0.9
    assert 0.35 < text.metrics["roc_auc"]["mean"] < 0.65


def test_train_head_std_over_folds_and_repeats(synthetic):
    store, labels = synthetic
    result = train_head(store, labels, "label", modality="image", folds=3, repeats=2, epochs=1)
    values = [fold["accuracy"] for fold in result.cv.fold_metrics]
    assert len(values) == 6
    assert result.metrics["accuracy"]["mean"] == pytest.approx(np.mean(values))
    assert result.metrics["accuracy"]["std"] == pytest.approx(np.std(values, ddof=1))


def test_cv_same_result_in_workers(synthetic):
    store, labels = synthetic
    data = load_patient_data(store, load_labels(labels, "patient_id", "label"), "hybrid")
    factory = make_concat_head(epochs=2)
    alone = cross_validate(data, factory, n_folds=3, seed=0, repeats=2, n_jobs=1)
    workers = cross_validate(data, factory, n_folds=3, seed=0, repeats=2, n_jobs=2)
    np.testing.assert_array_equal(alone.predictions["probability"], workers.predictions["probability"])
    np.testing.assert_array_equal(alone.predictions["patient_id"], workers.predictions["patient_id"])
    assert alone.fold_metrics == workers.fold_metrics


# Joining and dropping -----------------------------------------------------------


def test_patient_data_drop_reasons(tmp_path):
    store = tmp_path / "store.h5"
    write_coded_store(store, [f"P{i}" for i in range(10)], text=False)
    with FeatureStore(store, mode="a") as writer:
        header = writer.ensure_set("text", "coded", {}, 3)
        ids = [f"P{i}" for i in range(2, 12)]
        writer.commit(header, ids, ["r"] * 10, [f"t{p}" for p in ids], np.zeros((10, 3), np.float32))
    rows = {f"P{i}": "1" if i % 2 else "0" for i in range(1, 11)}
    rows["P5"] = ""
    rows["P6"] = "maybe"
    rows["P20"] = "1"
    labels_csv = tmp_path / "labels.csv"
    labels_csv.write_text("patient_id,label\n" + "".join(f"{p},{y}\n" for p, y in rows.items()))
    labels = load_labels(labels_csv, "patient_id", "label", positive="1", negative=["0"])

    data = load_patient_data(store, labels, "hybrid")
    assert data.patient_ids.tolist() == ["P2", "P3", "P4", "P7", "P8", "P9"]
    assert data.dropped[DROP_NO_LABEL] == ["P0", "P11", "P5"]
    assert data.dropped[DROP_UNRECOGNIZED] == ["P6"]
    assert data.dropped[DROP_NO_IMAGE] == ["P10", "P20"]
    assert data.dropped[DROP_NO_TEXT] == ["P1", "P20"]

    image_only = load_patient_data(store, labels, "image")
    assert image_only.patient_ids.tolist() == ["P1", "P2", "P3", "P4", "P7", "P8", "P9"]
    assert DROP_NO_TEXT not in image_only.dropped


def test_train_head_reports_drops(tmp_path):
    store = tmp_path / "store.h5"
    labels = tmp_path / "labels.csv"
    write_synthetic_store(store, labels, n_patients=60)
    with open(labels, "a") as handle:
        handle.write("Q1,1,pos\nQ2,,\n")
    result = train_head(store, labels, "label", modality="image", folds=3, epochs=1, out=tmp_path / "out")
    assert result.report["dropped"][DROP_NO_IMAGE] == 1
    assert result.report["dropped"][DROP_NO_LABEL] == 1
    assert result.report["dropped_patients"][DROP_NO_IMAGE] == ["Q1"]


def test_patient_data_no_overlap_error(tmp_path):
    store = tmp_path / "store.h5"
    write_coded_store(store, ["P1", "P2"])
    with pytest.raises(InputError, match="no labelled patient has image and text vectors"):
        load_patient_data(store, {"X1": 0, "X2": 1}, "hybrid")


# Aggregation ----------------------------------------------------------------------


def test_aggregate_rows_mean_and_max():
    keys = np.asarray(["b", "a", "b", "a", "c"], dtype=object)
    vectors = np.asarray([[1, 10], [2, 0], [3, -10], [4, 4], [5, 5]], np.float32)
    ids, mean = aggregate_rows(keys, vectors, "mean")
    assert ids.tolist() == ["a", "b", "c"]
    np.testing.assert_allclose(mean, [[3, 2], [2, 0], [5, 5]])
    _, maximum = aggregate_rows(keys, vectors, "max")
    np.testing.assert_allclose(maximum, [[4, 4], [3, 10], [5, 5]])


def test_patient_data_aggregates_images(tmp_path):
    store = tmp_path / "store.h5"
    write_coded_store(store, ["P1", "P2"], n_images=3, n_views=1)
    mean = load_patient_data(store, {"P1": 0, "P2": 1}, "image", aggregate="mean")
    maximum = load_patient_data(store, {"P1": 0, "P2": 1}, "image", aggregate="max")
    # Column 2 is the image number 0, 1, 2.
    np.testing.assert_allclose(mean.x["image"][:, 2], [1, 1])
    np.testing.assert_allclose(maximum.x["image"][:, 2], [2, 2])
    np.testing.assert_allclose(mean.x["image"][:, 0], [1, 2])


def test_train_head_records_aggregate(synthetic):
    store, labels = synthetic
    result = train_head(store, labels, "label", modality="image", folds=3, epochs=1, aggregate="max")
    assert result.report["aggregate"] == "max"


# Folds ----------------------------------------------------------------------------


def test_folds_same_across_modalities(synthetic):
    store, labels = synthetic
    table = load_labels(labels, "patient_id", "label")
    test_sets = {}
    for modality in ("image", "text", "hybrid"):
        data = load_patient_data(store, table, modality)
        test_sets[modality] = [set(data.patient_ids[test].tolist()) for _, test in restricted_folds(data, 5, 3)]
    assert test_sets["hybrid"] == test_sets["image"]
    assert test_sets["hybrid"] == test_sets["text"]


def test_train_head_same_test_folds_per_modality(synthetic):
    store, labels = synthetic
    fold_of = {}
    for modality in ("image", "text", "hybrid"):
        result = train_head(store, labels, "label", modality=modality, folds=4, seed=2, epochs=1, jobs=1)
        predictions = result.cv.predictions
        fold_of[modality] = dict(zip(predictions["patient_id"].tolist(), predictions["fold"].tolist()))
    assert len(fold_of["hybrid"]) == 150
    assert fold_of["hybrid"] == fold_of["image"]
    assert fold_of["hybrid"] == fold_of["text"]


def test_folds_restricted_to_present_patients(tmp_path):
    store = tmp_path / "store.h5"
    ids = [f"P{i}" for i in range(40)]
    write_coded_store(store, ids, n_views=1, text=False)
    labels = {**{p: i % 2 for i, p in enumerate(ids)}, **{f"X{i}": i % 2 for i in range(20)}}
    data = load_patient_data(store, labels, "image")
    from mmdx.train.folds import patient_folds

    full = patient_folds(labels, 4, 0)
    for (train, test), (_, full_test) in zip(restricted_folds(data, 4, 0), full):
        assert set(data.patient_ids[test].tolist()) == set(full_test) & set(ids)
        assert not set(train.tolist()) & set(test.tolist())


def test_cv_never_trains_on_test_patient(tmp_path):
    store = tmp_path / "store.h5"
    ids = [f"P{i}" for i in range(30)]
    write_coded_store(store, ids, n_views=1)
    data = load_patient_data(store, {p: i % 2 for i, p in enumerate(ids)}, "hybrid")
    RecordingHead.calls = []
    result = cross_validate(data, RecordingHead, n_folds=3, seed=0)
    assert len(RecordingHead.calls) == 3
    for call in RecordingHead.calls:
        trained = set(call["train"]["image"][:, 0].astype(int).tolist())
        tested = set(call["test"]["image"][:, 0].astype(int).tolist())
        assert not trained & tested
        assert len(trained | tested) == 30
    assert sorted(result.predictions["patient_id"].tolist()) == sorted(ids)


# Augmented views ---------------------------------------------------------------------


def test_augmented_views_only_from_training_patients(tmp_path):
    store = tmp_path / "store.h5"
    ids = [f"P{i}" for i in range(24)]
    write_coded_store(store, ids, n_images=2, n_views=3)
    data = load_patient_data(store, {p: i % 2 for i, p in enumerate(ids)}, "hybrid", augmented=True)
    RecordingHead.calls = []
    cross_validate(data, RecordingHead, n_folds=3, seed=0)
    for call in RecordingHead.calls:
        image, text = call["train"]["image"], call["train"]["text"]
        tested = set(call["test"]["image"][:, 0].astype(int).tolist())
        trained = set(image[:, 0].astype(int).tolist())
        assert not trained & tested
        # Every training patient appears once per view (0, 1, 2), paired with its own text vector.
        assert len(image) == 3 * len(trained)
        assert sorted(set(image[:, 1].astype(int).tolist())) == [0, 1, 2]
        np.testing.assert_array_equal(image[:, 0], text[:, 0])
        # Test rows are the plain views only.
        assert not call["test"]["image"][:, 1].any()
        assert len(call["test"]["image"]) == len(tested)


def test_augmented_needs_views(tmp_path):
    store = tmp_path / "store.h5"
    write_coded_store(store, ["P1", "P2"], n_views=1)
    with pytest.raises(InputError, match="no augmented views"):
        load_patient_data(store, {"P1": 0, "P2": 1}, "image", augmented=True)


def test_augmented_rejected_for_text(synthetic):
    store, labels = synthetic
    with pytest.raises(InputError, match="--augmented uses augmented image views"):
        train_head(store, labels, "label", modality="text", augmented=True)


def test_train_head_augmented_counts_rows(tmp_path):
    store = tmp_path / "store.h5"
    labels = tmp_path / "labels.csv"
    write_synthetic_store(store, labels, n_patients=60, augmented_views=2)
    result = train_head(store, labels, "label", modality="image", folds=3, epochs=1, augmented=True)
    for fold in result.cv.fold_metrics:
        assert fold["n_train_rows"] == 3 * fold["n_train"]
        assert fold["n_train"] + fold["n_test"] == 60


# CLI -----------------------------------------------------------------------------------


def test_cli_help_lists_every_option():
    result = CliRunner().invoke(main, ["train-head", "--help"])
    assert result.exit_code == 0
    for option in (
        "--store", "--labels", "--id-column", "--label-column", "--positive", "--negative", "--modality",
        "--folds", "--seed", "--repeats", "--epochs", "--batch-size", "--learning-rate", "--out",
        "--image-set", "--text-set", "--aggregate", "--augmented", "--standardize", "--allow-leak", "--jobs", "--quiet",
    ):
        assert option in result.output, option


def test_cli_prints_table_and_writes(synthetic, tmp_path):
    store, labels = synthetic
    out = tmp_path / "out"
    args = ["train-head", "--store", str(store), "--labels", str(labels), "--label-column", "group",
            "--positive", "pos", "--modality", "hybrid", "--folds", "3", "--epochs", "2", "--out", str(out), "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "ROC AUC" in result.output
    assert "hybrid    150" in result.output
    assert " ± " in result.output
    assert (out / "metrics.json").is_file()


def test_cli_label_error_exit_1(synthetic, tmp_path):
    store, labels = synthetic
    args = ["train-head", "--store", str(store), "--labels", str(labels), "--label-column", "group",
            "--positive", "tumour", "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert "Error:" in result.output
    assert "'neg', 'pos'" in result.output
    assert not (tmp_path / "out").exists()


def test_cli_bad_folds_exit_2(synthetic):
    store, labels = synthetic
    result = CliRunner().invoke(main, ["train-head", "--store", str(store), "--labels", str(labels),
                                       "--label-column", "label", "--folds", "1"])
    assert result.exit_code == 2


def test_cli_several_image_sets_need_choice(synthetic):
    store, labels = synthetic
    with FeatureStore(store, mode="a") as writer:
        header = writer.ensure_set("image", "other", {}, 4)
        writer.commit(header, ["P00000"], ["x"], ["h"], np.zeros((1, 4), np.float32))
    result = CliRunner().invoke(main, ["train-head", "--store", str(store), "--labels", str(labels),
                                       "--label-column", "label", "--modality", "image"])
    assert result.exit_code == 1
    assert "--image-set" in result.output


def test_no_heavy_library_imported(synthetic):
    # TensorFlow and torch fight over threads, and scikit-learn and SciPy
    # cost 0.8 s of start-up, about half of a small train-head run.
    store, labels = synthetic
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "import mmdx.cli\n"
        "CliRunner().invoke(mmdx.cli.main, ['train-head', '--help'])\n"
        f"r = CliRunner().invoke(mmdx.cli.main, ['train-head', '--store', {str(store)!r}, '--labels', {str(labels)!r},"
        " '--label-column', 'label', '--folds', '3', '--epochs', '1', '-q'])\n"
        "assert r.exit_code == 0, r.output\n"
        "print(sorted(m for m in ('tensorflow', 'torch', 'keras', 'transformers', 'sklearn', 'scipy') if m in sys.modules))\n"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "[]"


def test_auto_jobs_small_run_in_process(monkeypatch):
    from mmdx.train import run as run_module

    monkeypatch.setattr(run_module, "available_cpus", lambda: 2)

    assert run_module.auto_jobs(268, 10, 5) == 1  # medpix-mr: forking cost more than it saved
    assert run_module.auto_jobs(1000, 10, 5) == 2
    assert run_module.auto_jobs(10_000, 10, 5) == 2
