"""Image inference engines: ONNX Runtime must give the Keras vectors, cache its conversion and fall back cleanly."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from mmdx.embed import engines
from mmdx.errors import InputError

pytestmark = pytest.mark.slow

IMAGE_SIZE = 32


def _tiny_encoder(image_size: int = IMAGE_SIZE, seed: int = 0):
    """A narrow MobileNetV2 whose random weights give vectors spread over [0, 6], not all near zero."""
    keras = pytest.importorskip("keras")
    model = keras.applications.MobileNetV2(
        input_shape=(image_size, image_size, 3), alpha=0.35, include_top=False, pooling="avg", weights=None
    )
    rng = np.random.default_rng(seed)
    weights = []
    for weight in model.weights:
        if "moving_variance" in weight.path:
            weights.append(rng.uniform(0.5, 2.0, weight.shape).astype(np.float32))
        else:
            weights.append(rng.normal(0.0, 0.3, weight.shape).astype(np.float32))
    model.set_weights(weights)
    return model


@pytest.fixture(scope="module")
def encoder():
    return _tiny_encoder()


@pytest.fixture
def batch():
    return np.random.default_rng(1).uniform(-1.0, 1.0, (5, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def needs_onnx():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("tf2onnx")


@pytest.fixture(scope="module")
def converted(encoder, needs_onnx, tmp_path_factory):
    """One conversion shared by the tests: (cache folder, engine name, batch function)."""
    cache_dir = tmp_path_factory.mktemp("onnx-cache")
    name, run = engines.select_image_engine(encoder, "onnx", cache_dir)
    return cache_dir, name, run


@pytest.fixture(scope="module")
def keras_run(encoder):
    return engines.select_image_engine(encoder, "keras")[1]


def test_keras_engine_matches_predict(encoder, batch):
    name, run = engines.select_image_engine(encoder, "keras")
    vectors = run(batch)
    assert name == "keras"
    assert vectors.dtype == np.float32
    assert vectors.shape == (5, 1280)
    np.testing.assert_allclose(vectors, encoder.predict_on_batch(batch), atol=1e-5, rtol=0)


def test_onnx_engine_matches_keras(converted, keras_run, batch):
    _, name, onnx_run = converted
    expected = keras_run(batch)
    got = onnx_run(batch)
    assert name == "onnx"
    assert got.dtype == np.float32
    assert got.shape == expected.shape
    assert expected.std() > 0.1, "random weights gave near-constant vectors; the comparison would prove nothing"
    assert np.max(np.abs(got - expected)) < 1e-4


def test_onnx_engine_handles_any_batch_size(converted, keras_run, batch):
    _, _, run = converted
    single = run(batch[:1])
    assert single.shape == (1, 1280)
    assert np.max(np.abs(single - keras_run(batch[:1]))) < 1e-4


def test_onnx_conversion_cached(encoder, converted, batch, monkeypatch):
    cache_dir = converted[0]
    cached = engines.onnx_model_path(encoder, cache_dir)
    assert cached.is_file()
    assert [path.name for path in cached.parent.iterdir()] == [cached.name], "temporary files left behind"

    def fail_convert(model):
        raise AssertionError("converted again although the cache holds the model")

    monkeypatch.setattr(engines, "_convert", fail_convert)
    name, run = engines.select_image_engine(encoder, "onnx", cache_dir)
    assert name == "onnx"
    assert run(batch).shape == (5, 1280)


def test_cache_folder_from_env_variable(encoder, tmp_path, needs_onnx, monkeypatch):
    monkeypatch.setenv("MMDX_CACHE", str(tmp_path / "env-cache"))
    assert engines.default_cache_dir() == tmp_path / "env-cache"
    assert engines.onnx_model_path(encoder).parent == tmp_path / "env-cache" / "onnx"
    monkeypatch.delenv("MMDX_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert engines.default_cache_dir() == tmp_path / "home" / ".cache" / "mmdx"


def test_cache_key_follows_weights_and_size(encoder, tmp_path, needs_onnx):
    same = _tiny_encoder(seed=0)
    other_weights = _tiny_encoder(seed=1)
    other_size = _tiny_encoder(image_size=48, seed=0)
    path = engines.onnx_model_path(encoder, tmp_path)
    assert engines.onnx_model_path(same, tmp_path) == path
    assert engines.onnx_model_path(other_weights, tmp_path) != path
    assert engines.onnx_model_path(other_size, tmp_path) != path


def test_auto_falls_back_when_onnx_missing(encoder, batch, tmp_path, monkeypatch, caplog):
    def unavailable(model, cache_dir):
        raise engines.EngineUnavailable("package onnxruntime is not installed")

    monkeypatch.setattr(engines, "_load_or_convert", unavailable)
    with caplog.at_level(logging.INFO, logger="mmdx.embed.engines"):
        name, run = engines.select_image_engine(encoder, "auto", tmp_path)
    assert name == "keras"
    assert run(batch).shape == (5, 1280)
    assert "onnxruntime is not installed" in caplog.text


def test_onnx_requested_but_missing_raises(encoder, tmp_path, monkeypatch):
    def unavailable(model, cache_dir):
        raise engines.EngineUnavailable("package onnxruntime is not installed")

    monkeypatch.setattr(engines, "_load_or_convert", unavailable)
    with pytest.raises(InputError, match="--engine onnx cannot be used: package onnxruntime is not installed"):
        engines.select_image_engine(encoder, "onnx", tmp_path)


def test_auto_rejects_mismatching_conversion(encoder, converted, tmp_path, monkeypatch, caplog):
    model_bytes = engines.onnx_model_path(encoder, converted[0]).read_bytes()
    monkeypatch.setattr(engines, "_convert", lambda model: model_bytes)
    monkeypatch.setattr(engines, "_max_difference", lambda model, model_bytes: 0.5)
    with caplog.at_level(logging.INFO, logger="mmdx.embed.engines"):
        name, _ = engines.select_image_engine(encoder, "auto", tmp_path)
    assert name == "keras"
    assert "differs from Keras by 5.00e-01" in caplog.text
    assert not engines.onnx_model_path(encoder, tmp_path).exists()


def test_unknown_engine_raises(encoder):
    with pytest.raises(InputError, match="--engine must be one of auto, keras, onnx, got 'tensorrt'"):
        engines.select_image_engine(encoder, "tensorrt")


def test_onnx_split_matches_single_thread(converted, batch):
    cache_dir = converted[0]
    model_bytes = next((cache_dir / "onnx").iterdir()).read_bytes()
    single = engines.onnx_runner(model_bytes, threads=1)(batch)
    split = engines.onnx_runner(model_bytes, threads=3)(batch)
    assert split.shape == (5, 1280)
    np.testing.assert_array_equal(split, single)


def test_onnx_runner_rejects_zero_threads(converted):
    model_bytes = next((converted[0] / "onnx").iterdir()).read_bytes()
    with pytest.raises(InputError, match="threads must be at least 1, got 0"):
        engines.onnx_runner(model_bytes, threads=0)


def test_onnx_large_batch_split_in_parts(converted, keras_run):
    model_bytes = next((converted[0] / "onnx").iterdir()).read_bytes()
    large = np.random.default_rng(2).uniform(-1.0, 1.0, (engines.MAX_PART_SIZE * 2 + 3, IMAGE_SIZE, IMAGE_SIZE, 3))
    large = large.astype(np.float32)
    for threads in (1, 2):
        got = engines.onnx_runner(model_bytes, threads=threads)(large)
        assert got.shape == (len(large), 1280)
        assert np.max(np.abs(got - keras_run(large))) < 1e-4
