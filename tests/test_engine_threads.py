"""Batches in parallel threads: results in batch order, bounded work in flight, errors raised, torch threads restored."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from mmdx.embed import engines
from mmdx.errors import InputError


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_map_in_threads_keeps_order(workers):
    def slow_square(value):
        time.sleep(0.002 * (7 - value % 7))  # later batches often finish first
        return value * value

    assert list(engines.map_in_threads(slow_square, range(30), workers=workers)) == [v * v for v in range(30)]


def test_map_in_threads_bounds_batches_in_flight():
    started = []
    lock = threading.Lock()
    max_ahead = 0

    def record(value):
        with lock:
            started.append(value)
        return value

    consumed = 0
    for value in engines.map_in_threads(record, range(40), workers=2):
        consumed += 1
        with lock:
            max_ahead = max(max_ahead, len(started) - consumed)
        assert value == consumed - 1
    assert max_ahead <= 2


def test_map_in_threads_raises_batch_error():
    def fail_on_three(value):
        if value == 3:
            raise ValueError("batch 3 is broken")
        return value

    results = []
    with pytest.raises(ValueError, match="batch 3 is broken"):
        for value in engines.map_in_threads(fail_on_three, range(10), workers=2):
            results.append(value)
    assert results == [0, 1, 2]


def test_map_in_threads_rejects_zero_workers():
    with pytest.raises(InputError, match="workers must be at least 1, got 0"):
        list(engines.map_in_threads(str, range(3), workers=0))


def test_torch_threads_restores_count():
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    with engines.torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


@pytest.mark.slow
def test_threaded_bert_matches_sequential():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(1, 50, (3, 5 + i), generator=generator) for i in range(8)]

    def forward(ids):
        with torch.inference_mode():
            return model(input_ids=ids).last_hidden_state.mean(dim=1).numpy()

    sequential = [forward(ids) for ids in batches]
    with engines.torch_threads(1):
        threaded = list(engines.map_in_threads(forward, batches, workers=2))
    assert len(threaded) == len(sequential)
    for got, expected in zip(threaded, sequential):
        np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
