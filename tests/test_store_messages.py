"""Store messages a user acts on: lock waits, missing stores, set choices, and no stray lock file."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from click.testing import CliRunner

from mmdx.cli import main
from mmdx.errors import StoreError, StoreLockedError
from mmdx.store import FeatureStore
from mmdx.store.lock import WriterLock, lock_path


def add_set(path, modality, config, patients=("p1",)):
    with FeatureStore(path, mode="a") as store:
        header = store.ensure_set(modality, "enc", config, 2)
        store.commit(header, list(patients), ["x"] * len(patients), [f"h{p}" for p in patients],
                     np.zeros((len(patients), 2), np.float32))


def test_lock_timeout_after_wait_names_the_wait(tmp_path):
    path = tmp_path / "s.h5"
    holder = WriterLock(path).acquire()
    try:
        with pytest.raises(StoreLockedError) as caught:
            WriterLock(path, wait=0.3).acquire()
    finally:
        holder.release()
    message = str(caught.value)
    assert "still locked after waiting 0.3 s by another writer (process " in message
    assert "pass --wait SECONDS" not in message


def test_lock_without_wait_suggests_wait(tmp_path):
    path = tmp_path / "s.h5"
    holder = WriterLock(path).acquire()
    try:
        with pytest.raises(StoreLockedError, match="pass --wait SECONDS"):
            WriterLock(path).acquire()
    finally:
        holder.release()


def test_store_info_missing_store_message(tmp_path):
    result = CliRunner().invoke(main, ["store", "info", str(tmp_path / "missing.h5")])
    assert result.exit_code == 1
    assert "store not found; check the store path" in result.output
    assert "--store" not in result.output


def test_choose_set_unknown_image_set_article(tmp_path):
    path = tmp_path / "s.h5"
    add_set(path, "image", {"image_size": 224})
    with pytest.raises(StoreError, match="'nope' is not an image feature set"):
        FeatureStore(path).choose_set("image", "nope", option="--image-set")


def test_several_sets_listed_with_differences(tmp_path):
    path = tmp_path / "s.h5"
    add_set(path, "image", {"image_size": 224, "pooling": "avg", "weights": {"sha256": "a" * 64}})
    add_set(path, "image", {"image_size": 160, "pooling": "avg", "weights": {"sha256": "b" * 64}})
    with pytest.raises(StoreError) as caught:
        FeatureStore(path).choose_set("image", option="--image-set")
    message = str(caught.value)
    assert "image_size=224, weights.sha256=aaaaaaaaaaaa)" in message
    assert "image_size=160, weights.sha256=bbbbbbbbbbbb)" in message
    assert "pooling" not in message
    assert message.endswith("choose one with --image-set")


def test_several_text_sets_listed_with_differences(tmp_path):
    path = tmp_path / "s.h5"
    labels = tmp_path / "labels.csv"
    labels.write_text("patient_id,label\np1,1\n")
    add_set(path, "text", {"max_length": 128, "pooling": "cls"})
    add_set(path, "text", {"max_length": 256, "pooling": "cls"})
    add_set(path, "image", {"image_size": 224})
    result = CliRunner().invoke(main, ["train-head", "--store", str(path), "--labels", str(labels),
                                       "--label-column", "label", "--modality", "text"])
    assert result.exit_code == 1
    assert "(max_length=128)" in result.output
    assert "(max_length=256)" in result.output


def test_failed_first_writer_leaves_no_lock_file(tmp_path):
    path = tmp_path / "new.h5"
    with pytest.raises(RuntimeError):
        with FeatureStore(path, mode="a"):
            raise RuntimeError("input error before any commit")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_lock_file_stays_beside_a_store(tmp_path):
    path = tmp_path / "s.h5"
    add_set(path, "image", {})
    assert lock_path(path).exists()


def test_waiting_writer_relocks_after_lock_file_deleted(tmp_path):
    path = tmp_path / "new.h5"
    first = WriterLock(path).acquire()
    second = WriterLock(path, wait=30)
    opened = threading.Event()
    open_lock_file = second._open

    def open_and_signal():
        fd = open_lock_file()
        opened.set()
        return fd

    second._open = open_and_signal
    thread = threading.Thread(target=second.acquire)
    thread.start()
    assert opened.wait(timeout=30)
    first.release()  # no store exists, so this deletes the file the second writer opened
    thread.join(timeout=30)
    try:
        assert lock_path(path).exists()
        with pytest.raises(StoreLockedError):
            WriterLock(path).acquire()
    finally:
        second.release()
