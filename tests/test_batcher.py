"""Dynamic batching: budgets, order, concurrency, failures, with the real backend."""
from __future__ import annotations

import asyncio

import pytest

from backends import ShapeGrid, TorchBackend
from batcher import Batcher, Overloaded, plan_batches
from conftest import cosines


def test_plan_batches_sorts_longest_first_within_the_budget():
    lengths = [5, 50, 10, 300, 20, 40]
    batches = plan_batches(lengths, max_batch_tokens=100)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    assert batches[0] == [3]  # longer than the budget alone: a batch of its own
    for batch in batches:
        assert len(batch) * max(lengths[i] for i in batch) <= 100 or len(batch) == 1
        assert [lengths[i] for i in batch] == sorted((lengths[i] for i in batch), reverse=True)


def test_plan_batches_splits_a_large_client_batch():
    batches = plan_batches([10] * 1000, max_batch_tokens=640)
    assert len(batches) == 16 and max(len(b) for b in batches) <= 64
    assert sorted(i for b in batches for i in b) == list(range(1000))


def test_plan_batches_counts_the_shape_the_backend_pads_to():
    grid = ShapeGrid(widths=(16, 32))
    # Padded to 16, nine tokens cost sixteen: four rows fill a 64-token budget.
    assert all(len(batch) <= 4 for batch in plan_batches([9] * 12, max_batch_tokens=64, shapes=grid))
    # 17 tokens pad to 32: kept apart from the three 16s, which pad to 16 on their own.
    assert plan_batches([16, 17, 16, 16], max_batch_tokens=1024, call_overhead_tokens=20, shapes=grid) == [[1], [0, 2, 3]]
    # With rows padded to a power of two, twelve equal texts are cut 8 + 4 rather than padded to 16.
    pow2 = ShapeGrid(widths=(16,), pow2_rows=True)
    assert sorted(len(b) for b in plan_batches([10] * 12, max_batch_tokens=1024, call_overhead_tokens=20, shapes=pow2)) == [4, 8]


def test_plan_batches_keeps_short_texts_away_from_long_ones():
    lengths = [256] * 4 + [12] * 60
    batches = plan_batches(lengths, max_batch_tokens=8192)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert padded <= sum(lengths) * 1.05  # longest-first filling would pad 36 short rows to 256
    assert {len(b) for b in batches} == {4, 60}


@pytest.fixture(scope="module")
def backend(model_path):
    return TorchBackend(model_path, precision="fp32")


class CountingBackend:
    """The real backend, recording the batches it is given."""

    def __init__(self, backend):
        self.inner, self.batches = backend, []
        self.name, self.dimension, self.max_seq_length = backend.name, backend.dimension, backend.max_seq_length
        self.shapes = backend.shapes

    def tokenize(self, texts):
        return self.inner.tokenize(texts)

    def embed(self, batch):
        self.batches.append([len(ids) for ids in batch])
        return self.inner.embed(batch)


def test_concurrent_requests_are_batched_and_routed_back_in_order(backend, reference):
    counting = CountingBackend(backend)
    # Five lengths shared by every request: each length makes one batch that mixes all twelve requests.
    requests = [[f"request {r} text {i} " + "word " * (i * 9) for i in range(5)] for r in range(12)]

    async def run():
        batcher = Batcher(counting, max_batch_tokens=4096)
        try:
            return await asyncio.gather(*(batcher.embed(texts) for texts in requests))
        finally:
            batcher.close()

    results = asyncio.run(run())
    for texts, result in zip(requests, results):
        assert result.embeddings.shape == (5, 384)
        assert cosines(result.embeddings, reference(texts)).min() >= 0.99999
        assert result.tokens == sum(len(t.ids) for t in backend.tokenize(texts))
    assert len(counting.batches) < len(requests), "texts of several requests share a batch"
    for lengths in counting.batches:
        assert len(lengths) * max(lengths) <= 4096 or len(lengths) == 1


def test_truncation_is_counted(backend):
    async def run():
        batcher = Batcher(backend)
        try:
            return await batcher.embed(["short", "long " * 600])
        finally:
            batcher.close()

    result = asyncio.run(run())
    assert result.truncated == 1 and result.tokens == 3 + 256


def test_a_failing_batch_fails_its_requests_and_the_batcher_goes_on(backend):
    class Failing(CountingBackend):
        def embed(self, batch):
            if any(len(ids) > 100 for ids in batch):
                raise RuntimeError("backend broke")
            return super().embed(batch)

    async def run():
        batcher = Batcher(Failing(backend), max_batch_tokens=256)
        try:
            bad = batcher.embed(["word " * 200])
            good = batcher.embed(["fine"])
            outcomes = await asyncio.gather(bad, good, return_exceptions=True)
            later = await batcher.embed(["still fine"])
            return outcomes, later
        finally:
            batcher.close()

    (bad, good), later = asyncio.run(run())
    assert isinstance(bad, RuntimeError)
    assert good.embeddings.shape == (1, 384) and later.embeddings.shape == (1, 384)


def test_queue_bound_rejects_at_once_but_an_empty_queue_takes_anything(backend):
    async def run():
        batcher = Batcher(backend, max_queued_texts=4)
        try:
            # Both start in the same tick: the first is counted as waiting before the second is checked.
            return await asyncio.gather(batcher.embed(["a"] * 3), batcher.embed(["b"] * 2),
                                        batcher.embed(["c"] * 9), return_exceptions=True)
        finally:
            batcher.close()

    first, second, big = asyncio.run(run())
    assert first.embeddings.shape == (3, 384)
    assert isinstance(second, Overloaded) and isinstance(big, Overloaded)

    async def alone():
        batcher = Batcher(backend, max_queued_texts=4)
        try:
            return await batcher.embed(["d"] * 9)
        finally:
            batcher.close()

    assert asyncio.run(alone()).embeddings.shape == (9, 384)


def test_empty_request_needs_no_model(backend):
    async def run():
        batcher = Batcher(backend)
        try:
            return await batcher.embed([])
        finally:
            batcher.close()

    assert asyncio.run(run()).embeddings.shape == (0, 384)
