"""`mmdx finetune-text` with a tiny BERT: saved folders, training records, per-fold leak safety, cache."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner

from mmdx.cli import main
from mmdx.embed import finetune as finetune_module
from mmdx.embed.finetune import bucketed_batches, finetune_text
from mmdx.embed.texts import embed_texts
from mmdx.errors import InputError
from mmdx.store import FeatureStore
from mmdx.train.folds import patient_folds
from test_embed_texts import build_tiny_bert, write_reports

PATIENTS = {
    "007": ("Mass in the left lobe.", "neoplasm"),
    "a/b": ("Normal study.", "other"),
    "Zoë": ("mass in the right lobe of the MRI", "neoplasm"),
    "p04": ("normal scan", "other"),
    "p05": ("Mass mass lobe", "neoplasm"),
    "p06": ("headache, normal MRI", "other"),
    "p07": ("seizure; mass in the lobe", "neoplasm"),
    "p08": ("Normal Scan of the left lobe", "other"),
    "p09": ("normal", "other"),
}


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return build_tiny_bert(tmp_path_factory.mktemp("base") / "tiny-base", seed=1)


@pytest.fixture
def data(tmp_path):
    """Reports (one without text) and labels (one patient without a report)."""
    reports = [{"patient_id": p, "findings": text} for p, (text, _) in PATIENTS.items()]
    reports.append({"patient_id": "empty", "findings": "N/A"})
    source = write_reports(tmp_path / "reports.csv", reports)
    labels = [{"patient_id": p, "diagnosis_group": group} for p, (_, group) in PATIENTS.items()]
    labels.append({"patient_id": "no-report", "diagnosis_group": "neoplasm"})
    return source, write_reports(tmp_path / "labels.csv", labels)


def run(data, base, out, **options):
    source, labels = data
    options.setdefault("epochs", 2)
    options.setdefault("batch_size", 4)
    options.setdefault("max_length", 32)
    options.setdefault("quiet", True)
    return finetune_text(
        source,
        labels=labels,
        label_column="diagnosis_group",
        positive="neoplasm",
        text_columns=["findings"],
        model=str(base),
        out=out,
        **options,
    )


def read_record(folder):
    return json.loads((folder / "mmdx_training.json").read_text(encoding="utf-8"))


def labels_dict():
    labels = {p: int(group == "neoplasm") for p, (_, group) in PATIENTS.items()}
    labels["no-report"] = 1
    return labels


def text_sets(store_path):
    with FeatureStore(store_path) as store:
        return [info for info in store.list_sets() if info.modality == "text"]


def test_single_run_saves_loadable_folder(tmp_path, data, tiny_base):
    report = run(data, tiny_base, tmp_path / "ft")
    folder = tmp_path / "ft"
    assert report.folds[0].folder == folder
    assert report.folds[0].reused is False
    embedded = embed_texts(data[0], tmp_path / "s.h5", text_columns=["findings"], model=str(folder), quiet=True)
    assert embedded.n_embedded == len(PATIENTS)
    (info,) = text_sets(tmp_path / "s.h5")
    record = read_record(folder)
    assert info.config["encoder_training"] == record
    assert record["fold"] is None
    assert record["group"] is None


def test_record_lists_training_patients(tmp_path, data, tiny_base):
    run(data, tiny_base, tmp_path / "ft", seed=3)
    record = read_record(tmp_path / "ft")
    assert record["patients"] == sorted(PATIENTS)
    assert record["seed"] == 3
    assert record["n_positive"] == 4
    assert record["hyperparameters"]["epochs"] == 2
    assert record["hyperparameters"]["max_length"] == 32
    assert set(record["base_model"]["identity"]["weights_sha256"]) == {"model.safetensors"}


def test_fine_tuning_changes_weights(tmp_path, data, tiny_base):
    run(data, tiny_base, tmp_path / "ft")
    base_hash = read_record(tmp_path / "ft")["base_model"]["identity"]["weights_sha256"]["model.safetensors"]
    from mmdx.embed.texts import _local_identity

    tuned_hash = _local_identity(tmp_path / "ft")["weights_sha256"]["model.safetensors"]
    assert tuned_hash != base_hash


def test_same_seed_same_weights(tmp_path, data, tiny_base):
    from safetensors.numpy import load_file

    run(data, tiny_base, tmp_path / "one")
    run(data, tiny_base, tmp_path / "two")
    first = load_file(str(tmp_path / "one" / "model.safetensors"))
    second = load_file(str(tmp_path / "two" / "model.safetensors"))
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])


def test_per_fold_never_sees_test_patients(tmp_path, data, tiny_base):
    report = run(data, tiny_base, tmp_path / "ft", per_fold=True, n_folds=2, seed=0, store=tmp_path / "s.h5")
    folds = patient_folds(labels_dict(), 2, 0)
    assert [result.fold for result in report.folds] == [0, 1]
    for k, (train_ids, test_ids) in enumerate(folds):
        record = read_record(tmp_path / "ft" / f"fold-{k}")
        assert record["patients"] == sorted(set(train_ids) & set(PATIENTS))
        assert not set(record["patients"]) & set(test_ids)
        assert (record["fold"], record["n_folds"], record["seed"]) == (k, 2, 0)
        assert record["group"] == report.group


def test_per_fold_store_has_one_set_per_fold(tmp_path, data, tiny_base):
    report = run(data, tiny_base, tmp_path / "ft", per_fold=True, n_folds=2, store=tmp_path / "s.h5")
    sets = text_sets(tmp_path / "s.h5")
    trainings = sorted((info.config["encoder_training"] for info in sets), key=lambda t: t["fold"])
    assert [t["fold"] for t in trainings] == [0, 1]
    assert {t["group"] for t in trainings} == {report.group}
    for info in sets:
        assert info.n_patients == len(PATIENTS)
        assert info.config["max_length"] == 32


def test_per_fold_group_accepted_by_train_side(tmp_path, data, tiny_base):
    from mmdx.train.data import choose_sets

    report = run(data, tiny_base, tmp_path / "ft", per_fold=True, n_folds=2, store=tmp_path / "s.h5")
    with FeatureStore(tmp_path / "s.h5") as store:
        choice = choose_sets(store, "text")["text"]
    assert choice.group == report.group
    assert [t["fold"] for t in choice.encoder_training()] == [0, 1]


def test_cache_skips_second_fine_tune(tmp_path, data, tiny_base, monkeypatch):
    run(data, tiny_base, tmp_path / "ft", per_fold=True, n_folds=2, store=tmp_path / "s.h5")

    def fail(*args, **kwargs):
        raise AssertionError("fine-tuned again although the saved record matches")

    monkeypatch.setattr(finetune_module, "_train_encoder", fail)
    report = run(data, tiny_base, tmp_path / "ft", per_fold=True, n_folds=2, store=tmp_path / "s.h5")
    assert [result.reused for result in report.folds] == [True, True]
    assert [result.embed.n_embedded for result in report.folds] == [0, 0]
    assert len(text_sets(tmp_path / "s.h5")) == 2


def test_changed_settings_fine_tune_again(tmp_path, data, tiny_base):
    run(data, tiny_base, tmp_path / "ft")
    report = run(data, tiny_base, tmp_path / "ft", epochs=1)
    assert report.folds[0].reused is False
    assert read_record(tmp_path / "ft")["hyperparameters"]["epochs"] == 1


def test_changed_label_fine_tunes_again(tmp_path, data, tiny_base):
    run(data, tiny_base, tmp_path / "ft")
    source, labels = data
    with open(labels, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    rows[3]["diagnosis_group"] = "neoplasm"
    report = run((source, write_reports(labels, rows)), tiny_base, tmp_path / "ft")
    assert report.folds[0].reused is False


def test_single_class_rejected_before_loading(tmp_path, data):
    source, _ = data
    rows = [{"patient_id": p, "diagnosis_group": "other"} for p in PATIENTS]
    rows.append({"patient_id": "no-report", "diagnosis_group": "neoplasm"})
    labels = write_reports(tmp_path / "one-class.csv", rows)
    with pytest.raises(InputError, match="the 9 training patients all have label 0"):
        run((source, labels), tmp_path / "no-model", tmp_path / "ft")


def test_keep_all_duplicates_rejected(tmp_path, data, tiny_base):
    with pytest.raises(InputError, match="keep-all is not supported"):
        run(data, tiny_base, tmp_path / "ft", duplicates="keep-all")


def test_unmatched_ids_rejected(tmp_path, data, tiny_base):
    source, _ = data
    labels = write_reports(tmp_path / "other-ids.csv", [{"patient_id": "x1", "diagnosis_group": "neoplasm"}])
    with pytest.raises(InputError, match="no labelled patient has a text"):
        run((source, labels), tiny_base, tmp_path / "ft")


def test_cli_per_fold_reports_group(tmp_path, data, tiny_base):
    source, labels = data
    args = ["finetune-text", str(source), "--labels", str(labels), "--label-column", "diagnosis_group",
            "--positive", "neoplasm", "--text-column", "findings", "--model", str(tiny_base), "--out",
            str(tmp_path / "ft"), "--per-fold", "--folds", "2", "--epochs", "1", "--max-length", "32",
            "--store", str(tmp_path / "s.h5"), "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "fold 0:" in result.output
    assert "per-fold group finetune-tiny-base-" in result.output


def test_cli_max_length_above_model_exits_1(tmp_path, data, tiny_base):
    source, labels = data
    args = ["finetune-text", str(source), "--labels", str(labels), "--label-column", "diagnosis_group",
            "--positive", "neoplasm", "--text-column", "findings", "--model", str(tiny_base), "--out",
            str(tmp_path / "ft"), "--max-length", "256"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert "--max-length 256 exceeds the maximum" in result.output


def test_bucketed_batches_cover_each_text_once():
    lengths = [5, 40, 7, 33, 12, 90, 3, 64, 18, 25, 50, 8]
    first = bucketed_batches(lengths, 3, np.random.default_rng(0))
    second = bucketed_batches(lengths, 3, np.random.default_rng(0))
    assert sorted(np.concatenate(first).tolist()) == list(range(len(lengths)))
    assert [b.tolist() for b in first] == [b.tolist() for b in second]
    assert all(len(batch) == 3 for batch in first)


def test_bucketed_batches_group_similar_lengths():
    lengths = list(range(64))
    batches = bucketed_batches(lengths, 8, np.random.default_rng(1))
    spreads = [max(lengths[i] for i in batch) - min(lengths[i] for i in batch) for batch in batches]
    assert max(spreads) < 16


def test_trainable_layers_freeze_lower_layers(tmp_path, data, tiny_base):
    from safetensors.numpy import load_file

    run(data, tiny_base, tmp_path / "ft", trainable_layers=1)
    base = load_file(str(tiny_base / "model.safetensors"))
    tuned = load_file(str(tmp_path / "ft" / "model.safetensors"))
    frozen = [name for name in base if name.startswith(("embeddings.", "encoder.layer.0."))]
    trained = [name for name in base if name.startswith("encoder.layer.1.")]
    assert frozen and trained
    for name in frozen:
        np.testing.assert_array_equal(base[name], tuned[name])
    assert any(not np.array_equal(base[name], tuned[name]) for name in trained)
    assert read_record(tmp_path / "ft")["hyperparameters"]["trainable_layers"] == 1


def test_trainable_layers_above_model_rejected(tmp_path, data, tiny_base):
    with pytest.raises(InputError, match="--trainable-layers 3 exceeds the model's 2 layers"):
        run(data, tiny_base, tmp_path / "ft", trainable_layers=3)


def test_cli_trainable_layers_all(tmp_path, data, tiny_base):
    source, labels = data
    args = ["finetune-text", str(source), "--labels", str(labels), "--label-column", "diagnosis_group",
            "--positive", "neoplasm", "--text-column", "findings", "--model", str(tiny_base), "--out",
            str(tmp_path / "ft"), "--epochs", "1", "--max-length", "32", "--trainable-layers", "all", "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert read_record(tmp_path / "ft")["hyperparameters"]["trainable_layers"] is None


def test_cli_trainable_layers_invalid_exits_2(tmp_path, data, tiny_base):
    source, labels = data
    args = ["finetune-text", str(source), "--labels", str(labels), "--label-column", "diagnosis_group",
            "--text-column", "findings", "--out", str(tmp_path / "ft"), "--trainable-layers", "some"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert "expected a positive integer or 'all', got 'some'" in result.output


def test_per_fold_keeps_duplicate_images_together(tmp_path, data, tiny_base):
    # Patients 007 and p04 have byte-identical images in the store, so
    # train-head --duplicates group puts them in one fold. The per-fold
    # encoders must be trained on those same folds.
    store = tmp_path / "s.h5"
    with FeatureStore(store, mode="a") as writer:
        header = writer.ensure_set("image", "test-images", {"size": 4}, 4)
        ids = sorted(PATIENTS)
        hashes = ["d" * 64 if patient_id in ("007", "p04") else f"{index:064x}" for index, patient_id in enumerate(ids)]
        writer.commit(header, ids, [f"{patient_id}.png" for patient_id in ids], hashes, np.ones((len(ids), 4)))
    groups = [["007", "p04"]]

    run(data, tiny_base, tmp_path / "ft", per_fold=True, n_folds=2, seed=3, store=store)

    for k, (train_ids, _) in enumerate(patient_folds(labels_dict(), 2, 3, groups)):
        record = read_record(tmp_path / "ft" / f"fold-{k}")
        assert record["patients"] == sorted(set(train_ids) & set(PATIENTS))
        assert ("007" in record["patients"]) == ("p04" in record["patients"])
    source, labels = data
    result = CliRunner().invoke(
        main,
        ["train-head", "--store", str(store), "--labels", str(labels), "--label-column", "diagnosis_group",
         "--positive", "neoplasm", "--modality", "text", "--folds", "2", "--seed", "3", "--epochs", "1", "-q"],
    )
    assert result.exit_code == 0, result.output
