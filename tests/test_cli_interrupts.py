"""Ctrl-C: exit status 130 and a message that says what the interrupted command left behind."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

import mmdx.embed.finetune
import mmdx.embed.texts
import mmdx.train.compare
import mmdx.train.run
from mmdx.cli import main, report_errors
from mmdx.train.synthetic import write_synthetic_store


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.fixture
def inputs(tmp_path):
    store = tmp_path / "s.h5"
    labels = tmp_path / "labels.csv"
    write_synthetic_store(store, labels, n_patients=20, signal={"image": 1.0, "text": 0.0})
    reports = tmp_path / "reports.csv"
    reports.write_text("patient_id,findings\np1,mass\np2,normal\n")
    return store, labels, reports


def command_lines(store, labels, reports, tmp_path):
    label = ["--labels", str(labels), "--label-column", "group", "--positive", "pos"]
    return {
        "train-head": (["train-head", "--store", str(store), *label, "--out", str(tmp_path / "o")],
                       mmdx.train.run, "train_head"),
        "compare": (["compare", "--store", str(store), *label, "--out", str(tmp_path / "c")],
                    mmdx.train.compare, "compare"),
        "embed texts": (["embed", "texts", str(reports), "--store", str(store), "--text-column", "findings"],
                        mmdx.embed.texts, "embed_texts"),
        "finetune-text": (["finetune-text", str(reports), *label, "--text-column", "findings",
                           "--out", str(tmp_path / "ft")], mmdx.embed.finetune, "finetune_text"),
    }


@pytest.mark.parametrize("command, expected", [
    ("train-head", "Error: interrupted; nothing was written to --out"),
    ("compare", "Error: interrupted; nothing was written to --out"),
    ("embed texts", "re-run the same command to resume"),
    ("finetune-text", "re-run the same command to resume"),
])
def test_interrupt_exit_130_with_command_message(inputs, tmp_path, monkeypatch, command, expected):
    args, module, name = command_lines(*inputs, tmp_path)[command]
    monkeypatch.setattr(module, name, interrupt)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 130, result.output
    assert expected in result.output
    assert "Traceback" not in result.output


def test_interrupt_generic_message():
    @click.command()
    @report_errors
    def stop():
        raise KeyboardInterrupt

    result = CliRunner().invoke(stop, [])
    assert result.exit_code == 130
    assert result.output.strip() == "Error: interrupted"
