"""One writer per store: a second writer gets a clear error or waits, and a dead holder frees the lock."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys

import pytest
from click.testing import CliRunner

from mmdx.cli import main
from mmdx.errors import StoreLockedError
from mmdx.store import FeatureStore
from mmdx.store.lock import lock_path

from store_helpers import make_store, tree_digest

HOLDER = """
import sys, time
from mmdx.store import FeatureStore
store = FeatureStore(sys.argv[1], mode="a")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
store.close()
"""


def start_holder(path, seconds: float) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path), str(seconds), "holder-marker"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline().strip() == "locked", process.stderr.read()
    return process


@pytest.fixture
def holder(tmp_path):
    path = tmp_path / "s.h5"
    make_store(path, ["p1"])
    process = start_holder(path, 60)
    yield path, process
    process.kill()
    process.wait()


def test_second_writer_names_holder(holder):
    path, process = holder
    with pytest.raises(StoreLockedError) as caught:
        FeatureStore(path, mode="a")
    message = str(caught.value)
    assert message.startswith(f"{path}: another process is writing this store")
    assert f"process {process.pid} on {socket.gethostname()}, started 20" in message
    assert "holder-marker" in message
    assert "pass --wait SECONDS" in message


def test_second_writer_times_out(holder):
    path, _process = holder
    with pytest.raises(StoreLockedError):
        FeatureStore(path, mode="a", wait=0.5)


def test_reader_works_while_locked(holder):
    path, _process = holder
    assert FeatureStore(path).list_sets()[0].n_rows == 1


def test_cli_reports_lock_holder(holder):
    path, process = holder
    before = tree_digest(path.parent)
    result = CliRunner().invoke(main, ["store", "merge", str(path), str(path)])
    assert result.exit_code == 1
    assert f"process {process.pid}" in result.output
    assert result.output.count("\n") == 1
    assert tree_digest(path.parent) == before


def test_writer_waits_for_holder(tmp_path):
    path = tmp_path / "s.h5"
    make_store(path, ["p1"])
    process = start_holder(path, 1.0)
    try:
        with FeatureStore(path, mode="a", wait=60) as store:
            assert store.list_sets()[0].n_rows == 1
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_holder_frees_lock(tmp_path, sig):
    path = tmp_path / "s.h5"
    make_store(path, ["p1"])
    process = start_holder(path, 60)
    process.send_signal(sig)
    process.wait(timeout=30)

    record = json.loads(lock_path(path).read_text())
    assert record["pid"] == process.pid  # the dead holder's record is still there
    with FeatureStore(path, mode="a", wait=0):
        record = json.loads(lock_path(path).read_text())
        assert record["pid"] != process.pid
    assert FeatureStore(path).list_sets()[0].n_rows == 1
