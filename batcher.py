"""Dynamic batching across concurrent requests, apart from any backend.

Requests put their tokenized texts in a queue. One worker takes everything queued at that
moment (a round), sorts it by length so that little padding is computed, cuts it into
micro-batches by a token budget, runs each off the event loop, and routes every row back
to its request in the caller's order. Texts that arrive while a round runs wait for the
next round, so a request never waits longer than one round behind the ones before it.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from backends import EXACT, Backend, ShapeGrid, Tokenized
from observability import observe_batch, observe_queue_wait
from settings import DEFAULT_MAX_BATCH_TOKENS

logger = logging.getLogger(__name__)


class Overloaded(RuntimeError):
    """The queue holds more texts than the server will take on; the caller should retry later."""


@dataclass
class Embedded:
    """The answer to one request: rows in the caller's order, and what they cost."""

    embeddings: np.ndarray
    tokens: int
    truncated: int
    queue_seconds: float = 0.0
    compute_seconds: float = 0.0


@dataclass
class _Request:
    tokenized: list[Tokenized]
    future: asyncio.Future
    out: np.ndarray
    remaining: int
    enqueued: float = field(default_factory=time.perf_counter)
    started: float | None = None
    compute_seconds: float = 0.0


INLINE_TOKENIZE_CHARS = 2048  # smaller requests are tokenized on the event loop (tens of microseconds)
INLINE_PLAN_TEXTS = 256  # larger rounds are planned off the event loop (the plan is O(texts x rows))
# A model call costs about as much as this many tokens more (OpenVINO bf16, 2 cores: 1.35 ms + 0.07 ms a token).
CALL_OVERHEAD_TOKENS = 20


def plan_batches(lengths: list[int], max_batch_tokens: int, call_overhead_tokens: int = CALL_OVERHEAD_TOKENS,
                 shapes: ShapeGrid = EXACT) -> list[list[int]]:
    """Indices sorted longest first, cut into batches that compute the fewest padded tokens.

    Every row of a batch is padded to its longest, and the batch to its shape in the backend's grid
    (``shapes``), so one long text among short ones makes them all long. Over the sorted lengths, a dynamic
    programme picks the cut points that minimise padded tokens plus a per-call overhead, with the padded
    shape within the budget (a text longer than the budget on its own gets a batch of its own).
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    n = len(order)
    best = np.full(n + 1, np.iinfo(np.int64).max // 2, dtype=np.int64)  # best[j]: cost of the first j rows
    best[0] = 0
    cut = np.zeros(n + 1, dtype=np.int64)
    for start in range(n):
        width = shapes.width(max(1, lengths[order[start]]))
        counts = np.arange(1, max(1, min(n - start, max_batch_tokens // width)) + 1)
        padded = shapes.rows(counts) * width
        fits = (padded <= max_batch_tokens) | (counts == 1)
        ends = start + counts[fits]
        costs = best[start] + padded[fits] + call_overhead_tokens
        better = costs < best[ends]
        best[ends[better]] = costs[better]
        cut[ends[better]] = start
    batches: list[list[int]] = []
    end = n
    while end > 0:
        start = int(cut[end])
        batches.append(order[start:end])
        end = start
    batches.reverse()
    return batches


class Batcher:
    def __init__(self, backend: Backend, max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS, max_queued_texts: int = 0):
        self.backend = backend
        self.max_batch_tokens = max_batch_tokens
        self.max_queued_texts = max_queued_texts
        self._pending: list[tuple[_Request, int]] = []
        self._waiting = 0  # texts accepted and not yet taken by a round, counting those being tokenized
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        # One thread runs the model (its own intra-op threads use the cores); another tokenizes,
        # so that tokenizing the next requests overlaps with the forward pass.
        self._infer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="infer")
        self._tokenize_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")

    @property
    def queued_texts(self) -> int:
        return self._waiting

    async def tokenize(self, texts: list[str]) -> list[Tokenized]:
        if sum(map(len, texts)) <= INLINE_TOKENIZE_CHARS:  # cheaper than a hop to another thread
            return self.backend.tokenize(texts)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenize_pool, self.backend.tokenize, texts)

    async def embed(self, texts: list[str]) -> Embedded:
        if not texts:
            return Embedded(np.zeros((0, self.backend.dimension), dtype=np.float32), 0, 0)
        # An empty queue takes any request (else one larger than the bound could never pass).
        if self.max_queued_texts and self._waiting and self._waiting + len(texts) > self.max_queued_texts:
            raise Overloaded(f"{self._waiting} texts are waiting; try again shortly")
        self._waiting += len(texts)
        try:
            tokenized = await self.tokenize(texts)
        except BaseException:
            self._waiting -= len(texts)
            raise
        self._ensure_worker()
        loop = asyncio.get_running_loop()
        request = _Request(
            tokenized=tokenized,
            future=loop.create_future(),
            out=np.empty((len(texts), self.backend.dimension), dtype=np.float32),
            remaining=len(texts),
        )
        self._pending.extend((request, i) for i in range(len(texts)))
        self._wakeup.set()
        await request.future
        now = time.perf_counter()
        started = request.started or now
        observe_queue_wait(started - request.enqueued)
        return Embedded(
            embeddings=request.out,
            tokens=sum(len(t.ids) for t in tokenized),
            truncated=sum(t.truncated for t in tokenized),
            queue_seconds=started - request.enqueued,
            compute_seconds=request.compute_seconds,
        )

    def _ensure_worker(self) -> None:
        if self._worker is None or self._worker.done():
            self._wakeup = asyncio.Event()
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            round_, self._pending = self._pending, []
            self._waiting -= len(round_)
            # A request whose client went away has a cancelled future: its texts are not computed.
            round_ = [(req, i) for req, i in round_ if not req.future.done()]
            if not round_:
                continue
            lengths = [len(req.tokenized[i].ids) for req, i in round_]
            plan = functools.partial(plan_batches, lengths, self.max_batch_tokens,
                                     shapes=self.backend.shapes)
            if len(lengths) <= INLINE_PLAN_TEXTS:
                batches = plan()
            else:
                batches = await loop.run_in_executor(self._tokenize_pool, plan)
            for batch in batches:
                items = [round_[k] for k in batch if not round_[k][0].future.done()]
                if items:
                    await self._run_batch(loop, items)

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, items: list[tuple[_Request, int]]) -> None:
        started = time.perf_counter()
        for req, _ in items:
            if req.started is None:
                req.started = started
        ids = [req.tokenized[i].ids for req, i in items]
        try:
            vectors = await loop.run_in_executor(self._infer_pool, self.backend.embed, ids)
        except Exception as exc:  # a backend failure fails the requests in this batch, not the worker
            logger.exception("inference failed for a batch of %d texts", len(items))
            for req, _ in items:
                if not req.future.done():
                    req.future.set_exception(exc)
            return
        elapsed = time.perf_counter() - started
        observe_batch(len(items), sum(len(row) for row in ids), elapsed)
        share = elapsed / len(items)
        for row, (req, i) in enumerate(items):
            req.out[i] = vectors[row]
            req.compute_seconds += share
            req.remaining -= 1
            if req.remaining == 0 and not req.future.done():
                req.future.set_result(None)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._infer_pool.shutdown(wait=False, cancel_futures=True)
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)
