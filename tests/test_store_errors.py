"""Bad store paths and files: one clear error line, and nothing on disk changes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from mmdx.cli import main
from mmdx.errors import StoreError
from mmdx.store import FeatureStore
from mmdx.store import format as fmt

from store_helpers import CONFIG, WIDTH, make_store, tree_digest


def open_error(path, mode) -> str:
    with pytest.raises(StoreError) as caught:
        FeatureStore(path, mode=mode).close()
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("mode", ["r", "a"])
def test_text_file_as_store(tmp_path, mode):
    path = tmp_path / "notes.h5"
    path.write_text("patient_id,text\np1,hello\n")
    before = tree_digest(tmp_path)

    message = open_error(path, mode)
    assert message.startswith(f"{path}: not a readable HDF5 file")
    assert tree_digest(tmp_path) == before


@pytest.mark.parametrize("mode", ["r", "a"])
def test_empty_file_as_store(tmp_path, mode):
    path = tmp_path / "empty.h5"
    path.touch()
    assert "not a readable HDF5 file" in open_error(path, mode)
    assert path.stat().st_size == 0


@pytest.mark.parametrize("mode", ["r", "a"])
def test_foreign_hdf5_file_as_store(tmp_path, mode):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as handle:
        handle["data"] = np.arange(3)
    before = tree_digest(tmp_path)

    message = open_error(path, mode)
    assert "without an mmdx_format_version attribute, so not an mmdx store" in message
    assert tree_digest(tmp_path) == before


@pytest.mark.parametrize("mode", ["r", "a"])
def test_newer_format_version(tmp_path, mode):
    path = tmp_path / "s.h5"
    make_store(path, ["p1"])
    with h5py.File(path, "a") as handle:
        handle.attrs["mmdx_format_version"] = fmt.FORMAT_VERSION + 1
    before = tree_digest(tmp_path)

    message = open_error(path, mode)
    assert f"store format version {fmt.FORMAT_VERSION + 1} is newer" in message
    assert "upgrade mmdx" in message
    assert tree_digest(tmp_path) == before


@pytest.mark.parametrize("mode", ["r", "a"])
def test_folder_as_store(tmp_path, mode):
    folder = tmp_path / "features"
    folder.mkdir()
    (folder / "keep.txt").write_text("x")
    before = tree_digest(tmp_path)

    message = open_error(folder, mode)
    assert message == f"{folder}: is a folder; --store takes an .h5 file path such as {folder / 'features.h5'}"
    assert tree_digest(tmp_path) == before


@pytest.mark.parametrize(
    "command",
    [
        ["train-head", "--labels", "labels.csv", "--label-column", "label"],
        ["compare", "--labels", "labels.csv", "--label-column", "label"],
        ["embed", "images", "images", "--weights", "random"],
    ],
)
def test_cli_folder_as_store_names_it(tmp_path, command, monkeypatch):
    # Every command gives the store's own message, not click's generic one.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "labels.csv").write_text("patient_id,label\np1,0\np2,1\n", encoding="utf-8")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "p1.png").write_bytes(b"not decoded: the store is checked first")
    folder = tmp_path / "features"
    folder.mkdir()

    result = CliRunner().invoke(main, [*command, "--store", str(folder)])

    assert result.exit_code == 1, result.output
    assert f"{folder}: is a folder; --store takes an .h5 file path" in result.output


def test_missing_folder_for_writer(tmp_path):
    path = tmp_path / "no-such-folder" / "s.h5"
    message = open_error(path, "a")
    assert message == f"{path}: folder {path.parent} does not exist; create it first"
    assert list(tmp_path.iterdir()) == []


def test_missing_store_for_reader(tmp_path):
    path = tmp_path / "s.h5"
    message = open_error(path, "r")
    assert message.startswith(f"{path}: store not found")
    assert list(tmp_path.iterdir()) == []


def test_width_mismatch_with_set(tmp_path):
    path = tmp_path / "s.h5"
    make_store(path, ["p1", "p2"])
    before = tree_digest(tmp_path)
    with FeatureStore(path, mode="a") as store:
        header = store.ensure_set("text", "tiny-bert", CONFIG, WIDTH)
        with pytest.raises(StoreError) as caught:
            store.commit(header, ["p3"], ["row p3"], ["a" * 64], np.zeros((1, WIDTH - 3)))
    message = str(caught.value)
    assert f"vectors of width {WIDTH - 3} do not fit feature set {header.name!r} (width {WIDTH})" in message
    assert tree_digest(tmp_path) == before


def test_width_mismatch_inside_file(tmp_path):
    path = tmp_path / "s.h5"
    name = make_store(path, ["p1"])
    with h5py.File(path, "a") as handle:
        handle[f"{fmt.ROOT_GROUP}/{name}"].attrs["width"] = WIDTH * 2
    before = tree_digest(tmp_path)
    with pytest.raises(StoreError, match=f"has vectors of shape \\(1, {WIDTH}\\) but width {WIDTH * 2}"):
        FeatureStore(path).read(name)
    assert tree_digest(tmp_path) == before


def test_cli_prints_one_error_line(tmp_path):
    path = tmp_path / "notes.h5"
    path.write_text("not a store")
    result = CliRunner().invoke(main, ["store", "info", str(path)])
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {path}: not a readable HDF5 file")
    assert result.output.count("\n") == 1
    assert "Traceback" not in result.output


WRITE_ATTEMPT = """
import sys
from mmdx.errors import StoreError
from mmdx.store import FeatureStore
try:
    FeatureStore(sys.argv[1], mode="a").close()
except StoreError as exc:
    print(exc)
    sys.exit(1)
"""


def unprivileged_python() -> list[str]:
    """Return a command that runs Python without root's power to ignore file permissions."""
    if os.geteuid() != 0:
        return [sys.executable]
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root and setpriv (util-linux) is missing, so permissions cannot be enforced")
    return [setpriv, "--bounding-set", "-dac_override,-dac_read_search", sys.executable]


@pytest.mark.parametrize("existing", [False, True])
def test_read_only_folder_for_writer(tmp_path, existing):
    folder = tmp_path / "ro"
    folder.mkdir()
    path = folder / "s.h5"
    if existing:
        make_store(path, ["p1"])
    before = tree_digest(tmp_path)
    names_before = sorted(p.name for p in folder.iterdir())
    folder.chmod(0o555)
    try:
        result = subprocess.run(
            [*unprivileged_python(), "-c", WRITE_ATTEMPT, str(path)], capture_output=True, text=True, timeout=60
        )
    finally:
        folder.chmod(0o755)

    assert result.returncode == 1, result.stderr
    assert result.stdout.strip().startswith(f"{path}: folder {folder} is not writable")
    assert result.stdout.count("\n") == 1
    assert tree_digest(tmp_path) == before
    assert sorted(p.name for p in folder.iterdir()) == names_before
