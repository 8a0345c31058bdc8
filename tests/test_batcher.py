"""Dynamic batching: budgets, order, concurrency, failures, with the real backend."""
from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from conftest import RecordingBackend, cosines
from embedding_server.engine.batcher import Batcher, Throughput, plan_batches
from embedding_server.engine.runtimes import TorchBackend
from embedding_server.engine.tokens import ShapeGrid
from embedding_server.operations.errors import Overloaded


def test_plan_batches_sorts_longest_first_within_the_budget():
    lengths = [5, 50, 10, 300, 20, 40]
    batches = plan_batches(lengths, max_batch_tokens=100)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    assert batches[0] == [3]  # longer than the budget alone: a batch of its own
    for batch in batches:
        assert len(batch) * max(lengths[i] for i in batch) <= 100 or len(batch) == 1
        assert [lengths[i] for i in batch] == sorted((lengths[i] for i in batch), reverse=True)


def test_plan_batches_gives_one_text_a_batch_whatever_its_length():
    assert plan_batches([7], max_batch_tokens=100) == [[0]]
    assert plan_batches([300], max_batch_tokens=100) == [[0]]


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


def embed_concurrently(batcher: Batcher, requests: list[list[str]]) -> list:
    """Every request sent at once to the batcher, which is closed afterwards."""
    async def run():
        try:
            return await asyncio.gather(*(batcher.embed(texts) for texts in requests))
        finally:
            batcher.close()

    return asyncio.run(run())


def test_concurrent_requests_are_batched_and_routed_back_in_order(backend, reference):
    counting = RecordingBackend(backend)
    # Five lengths shared by every request. The first request finds the batcher idle and runs alone; the other
    # eleven queue meanwhile and are one round (a queue bound this lax never shortens a round on a slow machine),
    # in which each length makes one batch that mixes them.
    requests = [[f"request {r} text {i} " + "word " * (i * 9) for i in range(5)] for r in range(12)]

    results = embed_concurrently(Batcher(counting, max_batch_tokens=4096, max_queue_seconds=3600), requests)
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
    class Failing(RecordingBackend):
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


async def wait_for(event: threading.Event) -> None:
    while not event.is_set():
        await asyncio.sleep(0.01)


def test_texts_being_computed_count_against_the_queue_bound(backend):
    """MAX_QUEUED_TEXTS counts the running round too, not only the texts no round has taken yet."""
    gated = RecordingBackend(backend, held=True)

    async def run():
        batcher = Batcher(gated, max_queued_texts=4)
        try:
            first = asyncio.ensure_future(batcher.embed(["a"] * 3))
            await wait_for(gated.entered)  # the first request's round is running
            with pytest.raises(Overloaded) as refused:
                await batcher.embed(["b"] * 3)
            gated.gate.set()
            done = await first
            after = await batcher.embed(["c"] * 3)  # its texts are done: they count no more
            return refused.value, done, after
        finally:
            gated.gate.set()
            batcher.close()

    refused, done, after = asyncio.run(run())
    assert refused.retry_after >= 1
    assert done.embeddings.shape == after.embeddings.shape == (3, 384)


def test_admission_bounds_the_estimated_wait_and_says_when_to_retry(backend):
    """At 100 tokens/s and a 1 s bound, a request that would finish after 1 s of admitted work is refused."""
    texts = ["word " * 18] * 3  # 20 tokens each with [CLS] and [SEP]: 60 tokens, 0.6 s at 100 tokens/s
    assert sum(len(t.ids) for t in backend.tokenize(texts)) == 60

    async def run():
        batcher = Batcher(backend, max_queue_seconds=1.0, throughput=Throughput(initial=100.0))
        try:
            # In one tick: the first is admitted (an idle server takes anything), the second would end at 1.2 s.
            return await asyncio.gather(batcher.embed(texts), batcher.embed(texts), return_exceptions=True)
        finally:
            batcher.close()

    first, second = asyncio.run(run())
    assert first.embeddings.shape == (3, 384)
    assert isinstance(second, Overloaded) and "MAX_QUEUE_SECONDS" in str(second)
    assert second.retry_after == 1  # ceil(1.2 s - 1 s)


def test_a_request_is_answered_when_its_own_rows_are_done(backend):
    """A short request queued before a large one is answered before the large one's rows are all done."""
    gated = RecordingBackend(backend, held=True)
    small = ["short one", "short two"]
    large = [f"{i} " + "a longer text about the weather and markets " * 6 for i in range(400)]
    answered_after: dict[str, int] = {}

    async def run():
        batcher = Batcher(gated, max_batch_tokens=1024, max_queue_seconds=3600)  # no refusal here

        async def embed(name, texts):
            result = await batcher.embed(texts)
            answered_after[name] = len(gated.batches)
            return result

        try:
            blocker = asyncio.ensure_future(embed("blocker", ["the model is busy with this"]))
            await wait_for(gated.entered)
            first = asyncio.ensure_future(embed("small", small))
            await asyncio.sleep(0)
            second = asyncio.ensure_future(embed("large", large))
            while len(batcher._pending) < len(small) + len(large):  # both queued behind the blocker
                await asyncio.sleep(0.01)
            gated.gate.set()
            return await asyncio.gather(blocker, first, second)
        finally:
            gated.gate.set()
            batcher.close()

    results = asyncio.run(run())
    assert [r.embeddings.shape[0] for r in results] == [1, 2, 400]
    assert answered_after["small"] < answered_after["large"], answered_after


def test_an_abandoned_request_gives_back_its_admitted_work(backend):
    gated = RecordingBackend(backend, held=True)

    async def run():
        batcher = Batcher(gated, max_batch_tokens=256)
        try:
            first = asyncio.ensure_future(batcher.embed(["first"]))
            await wait_for(gated.entered)
            abandoned = asyncio.ensure_future(batcher.embed(["word " * 50] * 20))
            await asyncio.sleep(0)
            queued = batcher.queued_texts
            abandoned.cancel()
            gated.gate.set()
            await first
            await asyncio.sleep(0.1)
            return queued, batcher.queued_texts, batcher.backlog_seconds
        finally:
            gated.gate.set()
            batcher.close()

    queued, after, backlog = asyncio.run(run())
    assert queued == 21 and after == 0 and backlog == 0


def test_a_lone_request_that_leaves_mid_batch_holds_back_the_next_batch(backend, reference):
    """A request that finds the batcher idle runs its batch on its own task. Cancelled while the model runs, it
    gives its work back, the call runs to its end, and the next batch starts after it, not beside it (two threads
    could run both), then answers its own texts."""
    gated = RecordingBackend(backend, held=True)
    running, most = [0], [0]
    inner = gated.embed

    def embed(batch):
        running[0] += 1
        most[0] = max(most[0], running[0])
        try:
            return inner(batch)
        finally:
            running[0] -= 1

    gated.embed = embed

    async def run():
        batcher = Batcher(gated, max_batch_tokens=256, streams=2)
        try:
            lone = asyncio.ensure_future(batcher.embed(["the lone text"]))
            await wait_for(gated.entered)
            lone.cancel()
            await asyncio.sleep(0)
            next_ = asyncio.ensure_future(batcher.embed(["the next text"]))
            await asyncio.sleep(0.2)
            started_early = len(gated.batches) > 0 or running[0] > 1
            gated.gate.set()
            result = await next_
            return lone.cancelled(), started_early, result, batcher.queued_texts
        finally:
            gated.gate.set()
            batcher.close()

    cancelled, started_early, result, queued = asyncio.run(run())
    assert cancelled and not started_early and most[0] == 1
    assert cosines(result.embeddings, reference(["the next text"])).min() >= 0.99999
    assert queued == 0


class Where(RecordingBackend):
    """Records the name of the thread each batch ran on (`threads`)."""

    def __init__(self, backend):
        super().__init__(backend)
        self.threads: list[str] = []

    def embed(self, batch):
        self.threads.append(threading.current_thread().name)
        return super().embed(batch)


def run_lone_then_together(recording: Where, lone: int, together: int, inline_max_seconds: float) -> tuple[str, list]:
    """`lone` one-text requests one after the other, then `together` at once; returns the event loop's thread."""
    async def run():
        batcher = Batcher(recording, max_batch_tokens=1024, max_queue_seconds=3600,
                          inline_max_seconds=inline_max_seconds)
        try:
            results = [await batcher.embed([f"alone number {i}"]) for i in range(lone)]
            results += await asyncio.gather(*(batcher.embed([f"together number {i}"]) for i in range(together)))
            return threading.current_thread().name, results
        finally:
            batcher.close()

    return asyncio.run(run())


def test_a_short_lone_request_runs_on_the_event_loop_and_a_burst_is_batched_on_the_thread(backend, reference):
    """Once a lone call has been measured, a lone request whose call should be short runs on the event loop's
    thread (no hop to the infer thread and back). Requests that arrive together are batched on the infer thread:
    the first, which found the batcher idle, sees the others queue during its one turn of the loop."""
    recording = Where(backend)
    # An hour's bound: "short" whatever this machine's speed.
    loop_thread, results = run_lone_then_together(recording, lone=3, together=4, inline_max_seconds=3600)
    assert recording.threads[0].startswith("infer")  # nothing measured yet
    assert recording.threads[1:3] == [loop_thread, loop_thread]
    assert all(name.startswith("infer") for name in recording.threads[3:])
    assert [len(batch) for batch in recording.batches[3:]] == [1, 3]
    texts = [f"alone number {i}" for i in range(3)] + [f"together number {i}" for i in range(4)]
    vectors = np.concatenate([result.embeddings for result in results])
    assert cosines(vectors, reference(texts)).min() >= 0.99999


def test_a_lone_request_whose_call_would_be_long_stays_on_the_infer_thread(backend):
    recording = Where(backend)
    loop_thread, _ = run_lone_then_together(recording, lone=3, together=0, inline_max_seconds=0.0)
    assert len(recording.threads) == 3 and loop_thread not in recording.threads


def test_throughput_moves_towards_what_is_measured():
    rate = Throughput(initial=500.0, horizon=5.0)
    assert rate.seconds_for(1000) == pytest.approx(2.0)
    rate.observe(tokens=0, seconds=0.0)  # nothing measured: nothing changes
    assert rate.tokens_per_second == 500.0
    rate.observe(tokens=1000, seconds=1.0)  # the first measurement replaces the guess
    assert rate.tokens_per_second == pytest.approx(1000.0)
    rate.observe(tokens=2000, seconds=1.0)  # later ones move it by their share of the horizon
    assert 1000.0 < rate.tokens_per_second < 2000.0
    for _ in range(50):
        rate.observe(tokens=2000, seconds=1.0)
    assert rate.tokens_per_second == pytest.approx(2000.0, rel=1e-3)
    assert rate.seconds_for(4000) == pytest.approx(2.0, rel=1e-3)


def test_overloaded_crosses_processes_with_its_retry_after():
    import pickle

    copy = pickle.loads(pickle.dumps(Overloaded("busy", retry_after=7)))
    assert str(copy) == "busy" and copy.retry_after == 7


def test_a_request_whose_turn_comes_after_its_bound_is_refused_then(backend):
    """If the machine slows below the estimate, a queued request is refused at its turn rather than run late."""
    gated = RecordingBackend(backend, held=True)

    async def run():
        batcher = Batcher(gated, max_queue_seconds=0.2, throughput=Throughput(initial=1e9))
        try:
            first = asyncio.ensure_future(batcher.embed(["first"]))
            await wait_for(gated.entered)
            second = asyncio.ensure_future(batcher.embed(["second"]))  # admitted: the estimate says instantly
            await asyncio.sleep(0.5)  # the first batch is stuck well past the second's bound
            gated.gate.set()
            outcomes = await asyncio.gather(first, second, return_exceptions=True)
            return outcomes, batcher.queued_texts
        finally:
            gated.gate.set()
            batcher.close()

    (first, second), queued = asyncio.run(run())
    assert first.embeddings.shape == (1, 384)
    assert isinstance(second, Overloaded) and "MAX_QUEUE_SECONDS" in str(second) and second.retry_after >= 1
    assert queued == 0


class StreamsBackend(RecordingBackend):
    """The real backend offering two streams; records how many batches ran at once and on which form."""

    streams = 2

    def __init__(self, backend):
        super().__init__(backend)
        self.lock = threading.Lock()
        self.running = self.most = 0
        self.parallel: list[bool] = []

    def embed(self, batch, parallel=False):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.parallel.append(parallel)
        try:
            threading.Event().wait(0.05)  # long enough for a second batch to start beside this one
            return super().embed(batch)
        finally:
            with self.lock:
                self.running -= 1


@pytest.mark.parametrize(("queue_tokens", "wide"), [(10**6, False), (64, True)], ids=["short-queue", "deep-queue"])
def test_several_streams_only_when_the_queue_is_deep(backend, reference, queue_tokens: int, wide: bool):
    """Below STREAMS_QUEUE_TOKENS one batch at a time on every core; from it, batches run side by side on the
    parallel streams. Either way every request gets its own texts' embeddings, in order."""
    streams = StreamsBackend(backend)
    requests = [[f"request {r} text {i} " + "word " * (i * 30) for i in range(4)] for r in range(8)]

    results = embed_concurrently(Batcher(streams, max_batch_tokens=512, streams=2, streams_queue_tokens=queue_tokens),
                                 requests)
    for texts, result in zip(requests, results):
        assert cosines(result.embeddings, reference(texts)).min() >= 0.99999
    assert len(streams.batches) > 2
    assert streams.most == (2 if wide else 1)
    assert set(streams.parallel) == {wide}
