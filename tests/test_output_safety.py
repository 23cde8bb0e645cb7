"""Output folders of train-head, compare and finetune-text never delete what mmdx did not write."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mmdx.atomic import MARKER
from mmdx.cli import main
from mmdx.embed import finetune as finetune_module
from mmdx.errors import MmdxError
from mmdx.train.synthetic import write_synthetic_store
from test_finetune import data, run, tiny_base  # noqa: F401  (fixtures)


@pytest.fixture
def synthetic(tmp_path):
    store = tmp_path / "r2" / "m.h5"
    store.parent.mkdir()
    labels = tmp_path / "labels.csv"
    write_synthetic_store(store, labels, n_patients=60, signal={"image": 1.5, "text": 0.0})
    return store, labels


def train_head_args(store, labels, out, *extra):
    return ["train-head", "--store", str(store), "--labels", str(labels), "--label-column", "group",
            "--positive", "pos", "--folds", "2", "--epochs", "1", "--jobs", "1", "--out", str(out), "-q", *extra]


def test_train_head_refuses_out_that_holds_the_store(synthetic):
    store, labels = synthetic
    before = store.read_bytes()
    result = CliRunner().invoke(main, train_head_args(store, labels, store.parent))
    assert result.exit_code == 1, result.output
    assert "contains" in result.output
    assert "m.h5" in result.output
    assert "Traceback" not in result.output
    assert store.read_bytes() == before


def test_train_head_keeps_foreign_files_in_out(synthetic, tmp_path):
    store, labels = synthetic
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "mydata.txt").write_text("precious")
    result = CliRunner().invoke(main, train_head_args(store, labels, keep))
    assert result.exit_code == 1, result.output
    assert result.output.count("\n") == 1
    assert "mydata.txt" in result.output
    assert "choose a new folder" in result.output
    assert (keep / "mydata.txt").read_text() == "precious"
    assert not (keep / "metrics.json").exists()


def test_train_head_replaces_its_own_earlier_output(synthetic, tmp_path):
    store, labels = synthetic
    out = tmp_path / "run"
    first = CliRunner().invoke(main, train_head_args(store, labels, out))
    assert first.exit_code == 0, first.output
    marker = json.loads((out / MARKER).read_text())
    assert sorted(marker["files"]) == ["config.json", "metrics.json", "predictions.csv"]
    (out / "metrics.json").write_text("{}")
    second = CliRunner().invoke(main, train_head_args(store, labels, out, "--seed", "1"))
    assert second.exit_code == 0, second.output
    assert json.loads((out / "metrics.json").read_text())["seed"] == 1


def test_train_head_refuses_current_folder(synthetic, tmp_path, monkeypatch):
    store, labels = synthetic
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, train_head_args(store, labels, "."))
    assert result.exit_code == 1, result.output
    assert "current folder" in result.output
    assert "Traceback" not in result.output
    assert (tmp_path / "labels.csv").is_file()


def test_compare_refuses_out_that_holds_the_store(synthetic):
    store, labels = synthetic
    before = store.read_bytes()
    result = CliRunner().invoke(main, [
        "compare", "--store", str(store), "--labels", str(labels), "--label-column", "group", "--positive", "pos",
        "--folds", "2", "--repeats", "1", "--epochs", "1", "--bootstrap", "100", "--jobs", "1",
        "--out", str(store.parent), "-q",
    ])
    assert result.exit_code == 1, result.output
    assert "m.h5" in result.output
    assert store.read_bytes() == before


def test_finetune_keeps_foreign_files_in_out(tmp_path, data, tiny_base, monkeypatch):  # noqa: F811
    out = tmp_path / "ftout"
    out.mkdir()
    (out / "notes.txt").write_text("mine")

    def fail(*args, **kwargs):
        raise AssertionError("trained although the output folder is refused")

    monkeypatch.setattr(finetune_module, "_train_encoder", fail)
    with pytest.raises(MmdxError, match=r"ftout: .*notes.txt"):
        run(data, tiny_base, out)
    assert (out / "notes.txt").read_text() == "mine"


def test_finetune_per_fold_keeps_foreign_files(tmp_path, data, tiny_base):  # noqa: F811
    out = tmp_path / "ftout"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    report = run(data, tiny_base, out, per_fold=True, n_folds=2)
    assert [result.reused for result in report.folds] == [False, False]
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "fold-0" / MARKER).is_file()
    (out / "fold-1" / "extra.txt").write_text("mine too")
    with pytest.raises(MmdxError, match=r"fold-1: .*extra.txt"):
        run(data, tiny_base, out, per_fold=True, n_folds=2, epochs=1)
    assert (out / "fold-1" / "extra.txt").read_text() == "mine too"


def test_finetune_reuses_a_matching_folder_with_foreign_files(tmp_path, data, tiny_base):  # noqa: F811
    # Reuse writes nothing, so a foreign file does not stop it.
    run(data, tiny_base, tmp_path / "ft")
    (tmp_path / "ft" / "notes.txt").write_text("mine")
    report = run(data, tiny_base, tmp_path / "ft")
    assert report.folds[0].reused is True


def test_finetune_refuses_out_holding_the_store(tmp_path, data, tiny_base):  # noqa: F811
    (tmp_path / "ft").mkdir()
    with pytest.raises(MmdxError, match=r"contains .*s.h5"):
        run(data, tiny_base, tmp_path / "ft", store=tmp_path / "ft" / "s.h5")
    assert list((tmp_path / "ft").iterdir()) == []


@pytest.mark.parametrize("modality", ["image", "text"])
def test_train_head_fusion_needs_hybrid(synthetic, tmp_path, modality):
    store, labels = synthetic
    result = CliRunner().invoke(main, train_head_args(store, labels, tmp_path / "o", "--modality", modality,
                                                      "--fusion", "gated"))
    assert result.exit_code == 2, result.output
    assert "--fusion gated" in result.output
    assert f"--modality {modality}" in result.output
    assert not (tmp_path / "o").exists()


def test_train_head_library_fusion_needs_hybrid(synthetic):
    from mmdx.errors import InputError
    from mmdx.train.run import train_head

    store, labels = synthetic
    with pytest.raises(InputError, match="--fusion late .* needs --modality hybrid"):
        train_head(store, labels, "group", positive="pos", modality="text", fusion="late")


def test_train_head_without_out_says_nothing_written(synthetic, tmp_path):
    store, labels = synthetic
    args = train_head_args(store, labels, tmp_path / "o")
    args = args[: args.index("--out")] + args[args.index("--out") + 2:]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert result.stderr.strip().splitlines()[-1] == "no --out given, so nothing was written"
    assert "no --out given" not in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.csv", "r2"]


def test_out_help_says_nothing_written_without_it():
    for command in ("train-head", "compare"):
        result = CliRunner().invoke(main, [command, "--help"])
        assert "Without --out nothing is written." in " ".join(result.output.split()), command
