"""Dynamic batching across concurrent requests, apart from any backend.

Requests put their tokenized texts in a queue, in arrival order. One worker takes the oldest
texts up to a few micro-batches' worth of tokens (a round), sorts them by length so that
little padding is computed, cuts them into micro-batches by a token budget, runs each off the
event loop, and routes every row back to its request in the caller's order. A request is
answered as soon as its own rows are done, and it waits only for the texts that arrived
before it: admission can therefore bound the wait of every request it accepts, from the
work already admitted and the throughput measured so far. A request that finds nothing queued and
nothing running is a round of its own, run by its own task: a lone text (the latency case) does not wait
for the worker to wake up and hand its answer back. When that round is short (at most INLINE_MAX_SECONDS at
the rate lone calls ran lately) and no other request came in with it, the model runs on the event loop's own
thread: no hop to the infer thread and back, no wake-up of the loop, and the loop is held for one short call
at most (bench/README.md, "Where a one-text request's time goes").
"""
from __future__ import annotations

import asyncio
import functools
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from embedding_server.engine.backends import Backend
from embedding_server.engine.tokens import EXACT, ShapeGrid, Tokenized
from embedding_server.operations.errors import Overloaded
from embedding_server.operations.observability import observe_batch, observe_queue_wait
from embedding_server.operations.settings import DEFAULT_MAX_BATCH_TOKENS, Limits, Streams

logger = logging.getLogger(__name__)


# Before anything has been measured: a slow CPU's rate (about half a core), so that a fresh server admits too
# little rather than too much. The first round's measurement replaces it.
INITIAL_TOKENS_PER_SECOND = 500.0
RATE_HORIZON_SECONDS = 5.0  # busy seconds over which the measured rate moves most of the way to a new level


class Throughput:
    """Tokens per second the model has computed lately: an exponentially weighted rate over busy time."""

    def __init__(self, initial: float = INITIAL_TOKENS_PER_SECOND, horizon: float = RATE_HORIZON_SECONDS):
        self.tokens_per_second = initial
        self.horizon = horizon
        self.measured = False

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens <= 0 or seconds <= 0:
            return
        # The first measurement replaces the guess outright; later ones move the rate by their share of the horizon.
        weight = 1.0 - math.exp(-seconds / self.horizon) if self.measured else 1.0
        self.tokens_per_second += weight * (tokens / seconds - self.tokens_per_second)
        self.measured = True

    def seconds_for(self, tokens: float) -> float:
        return tokens / self.tokens_per_second


@dataclass
class Embedded:
    """The answer to one request: rows in the caller's order, and what they cost."""

    embeddings: np.ndarray
    tokens: int
    truncated: int
    queue_seconds: float = 0.0
    compute_seconds: float = 0.0
    computed: int = 0  # texts this request had the model compute: fewer than its rows when a cache answered some
    text_tokens: tuple[int, ...] = ()  # per row, when the batcher computed them: tokens as the model saw them...
    text_truncated: tuple[bool, ...] = ()  # ... and whether the text was cut


@dataclass
class _Request:
    tokenized: list[Tokenized]
    future: asyncio.Future
    out: np.ndarray
    remaining: int
    pending_tokens: int = 0  # admitted and not yet computed; given back if the request ends early
    enqueued: float = field(default_factory=time.perf_counter)
    started: float | None = None
    compute_seconds: float = 0.0


INLINE_TOKENIZE_CHARS = 2048  # smaller requests are tokenized on the event loop (tens of microseconds)
INLINE_PLAN_TEXTS = 256  # larger rounds are planned off the event loop (the plan is O(texts x rows))
# A model call costs about as much as this many tokens more (OpenVINO bf16, 2 cores: 1.35 ms + 0.07 ms a token).
CALL_OVERHEAD_TOKENS = 20
# A lone request runs on the event loop's thread when its call should take at most this long, at the rate lone
# requests were computed lately: the longest the loop may stop serving other connections for one (they would wait
# for the model anyway). The rate is over lone calls only, as they pay the per-call overhead that batches spread.
INLINE_MAX_SECONDS = 0.01
LONE_RATE_HORIZON_SECONDS = 0.02  # a 3 ms call moves the lone-call rate 14% of the way to its own
# A round holds at most this many micro-batches' worth of tokens: enough rows to sort by length, few enough
# that the oldest requests are answered after a few batches rather than after everything queued...
ROUND_BATCHES = 4
# ... and at most this share of MAX_QUEUE_SECONDS at the measured rate, so that a request that starts just
# before its deadline still ends well within twice the bound on a slow or busy machine.
ROUND_SHARE_OF_BOUND = 0.25


def plan_batches(lengths: list[int], max_batch_tokens: int, call_overhead_tokens: int = CALL_OVERHEAD_TOKENS,
                 shapes: ShapeGrid = EXACT) -> list[list[int]]:
    """Indices sorted longest first, cut into batches that compute the fewest padded tokens.

    Every row of a batch is padded to its longest, and the batch to its shape in the backend's grid
    (``shapes``), so one long text among short ones makes them all long. Over the sorted lengths, a dynamic
    programme picks the cut points that minimise padded tokens plus a per-call overhead, with the padded
    shape within the budget (a text longer than the budget on its own gets a batch of its own).
    """
    if len(lengths) == 1:  # one text, one batch: the programme's numpy set-up costs more than the plan
        return [[0]]
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


class InferThreads:
    """Threads that only run the model, fed from one queue, each result handed back to the event loop in one
    call_soon_threadsafe. run_in_executor's chain of a concurrent future, its lock and condition, and a wrapping
    asyncio future cost 30-40 us more a call on these 2 cores (bench/README.md, "Where a one-text request's time
    goes"), on the path of every one-text request."""

    def __init__(self, count: int, name: str = "infer", on_idle: Callable[[], None] | None = None):
        """``on_idle``: called on the event loop when the last call in flight has ended."""
        self.running = 0  # calls handed to the threads and not yet ended, abandoned ones included
        self._on_idle = on_idle
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._serve, name=f"{name}_{i}", daemon=True) for i in range(count)]
        for thread in self._threads:
            thread.start()

    def run(self, fn, *args) -> asyncio.Future:
        """``fn(*args)`` on one of the threads; the future is the event loop's."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.running += 1
        self._jobs.put((loop, future, fn, args))
        return future

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            loop, future, fn, args = job
            result, error = None, None
            if not future.cancelled():  # one abandoned before its turn is not computed
                try:
                    result = fn(*args)
                except BaseException as exc:  # handed to the awaiting request, as run_in_executor would
                    error = exc
            try:
                loop.call_soon_threadsafe(self._settle, future, result, error)
            except RuntimeError:  # the loop has closed: nobody waits for this answer
                pass

    def _settle(self, future: asyncio.Future, result: object, error: BaseException | None) -> None:
        self.running -= 1
        if not future.cancelled():  # else its request went away while the model ran
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)
        if not self.running and self._on_idle is not None:
            self._on_idle()

    def close(self) -> None:
        """The threads end after their current call; calls not yet started are not run."""
        while True:
            try:
                loop, future, _, _ = self._jobs.get_nowait()
            except queue.Empty:
                break
            except TypeError:  # a stop marker of an earlier close
                continue
            try:
                loop.call_soon_threadsafe(future.cancel)
            except RuntimeError:
                pass
        for _ in self._threads:
            self._jobs.put(None)


class Batcher:
    def __init__(self, backend: Backend, max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS, max_queued_texts: int = 0,
                 max_queue_seconds: float = Limits.max_queue_seconds, throughput: Throughput | None = None,
                 streams: int = 1, streams_queue_tokens: int = Streams.queue_tokens,
                 inline_max_seconds: float = INLINE_MAX_SECONDS):
        """``streams``: batches the backend can run at once (its ``streams``), used from ``streams_queue_tokens``
        tokens admitted and not yet computed (0: ``streams`` full batches); below, one batch at a time on every
        core. ``inline_max_seconds``: the longest a lone call may be expected to take to run on the event loop's
        thread (0: never)."""
        self.backend = backend
        self.max_batch_tokens = max_batch_tokens
        self.max_queued_texts = max_queued_texts
        self.max_queue_seconds = max_queue_seconds
        self.throughput = throughput or Throughput()
        self.inline_max_seconds = inline_max_seconds
        self.lone_calls = Throughput(horizon=LONE_RATE_HORIZON_SECONDS)  # (tokens + call overhead) per second
        self._pending: deque[tuple[_Request, int]] = deque()  # rows in arrival order
        self._texts = 0  # texts admitted (or being tokenized) and not yet computed, the running round's included
        self._tokens = 0  # tokens admitted and not yet computed, the running round's included
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._in_round = False  # a round is being planned or run, by the worker or by a request alone
        self.streams = streams
        self.streams_queue_tokens = streams_queue_tokens or streams * max_batch_tokens
        # One thread a stream runs the model (its own intra-op threads use the cores); another tokenizes,
        # so that tokenizing the next requests overlaps with the forward pass.
        self._infer = InferThreads(streams, on_idle=self._wake_if_pending)
        self._tokenize_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")

    @property
    def queued_texts(self) -> int:
        return self._texts

    @property
    def backlog_seconds(self) -> float:
        """How long the work admitted so far should take at the measured rate."""
        return self.throughput.seconds_for(self._tokens)

    async def tokenize(self, texts: list[str]) -> list[Tokenized]:
        if sum(map(len, texts)) <= INLINE_TOKENIZE_CHARS:  # cheaper than a hop to another thread
            return self.backend.tokenize(texts)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenize_pool, self.backend.tokenize, texts)

    def _retry_after(self, seconds: float) -> int:
        return max(1, math.ceil(seconds))

    def _check_texts(self, count: int) -> None:
        """MAX_QUEUED_TEXTS, before any work is spent on the request. An idle server takes any request."""
        if self.max_queued_texts and self._texts and self._texts + count > self.max_queued_texts:
            excess = (self._texts + count - self.max_queued_texts) / self._texts
            raise Overloaded(f"{self._texts} texts are already queued or running (MAX_QUEUED_TEXTS is "
                             f"{self.max_queued_texts}); try again shortly",
                             self._retry_after(excess * self.backlog_seconds))

    def _check_time(self, tokens: int) -> None:
        """MAX_QUEUE_SECONDS: the work admitted before this request, and this request, done within the bound."""
        if not self._tokens:
            return
        finish = self.throughput.seconds_for(self._tokens + tokens)
        if finish > self.max_queue_seconds:
            raise Overloaded(f"the server would take about {finish:.0f}s to answer (MAX_QUEUE_SECONDS is "
                             f"{self.max_queue_seconds:g}); try again shortly",
                             self._retry_after(finish - self.max_queue_seconds))

    async def embed(self, texts: list[str]) -> Embedded:
        if not texts:
            return Embedded(np.zeros((0, self.backend.dimension), dtype=np.float32), 0, 0)
        self._check_texts(len(texts))
        self._texts += len(texts)
        try:
            tokenized = await self.tokenize(texts)
            tokens = sum(len(t.ids) for t in tokenized)
            self._check_time(tokens)
        except BaseException:
            self._texts -= len(texts)
            raise
        self._tokens += tokens
        self._ensure_worker()
        loop = asyncio.get_running_loop()
        request = _Request(
            tokenized=tokenized,
            future=loop.create_future(),
            out=np.empty((len(texts), self.backend.dimension), dtype=np.float32),
            remaining=len(texts),
            pending_tokens=tokens,
        )
        request.future.add_done_callback(functools.partial(self._release, request))
        try:
            if self._idle and tokens <= self.max_batch_tokens:
                # Nothing queued, nothing running: this request is the next round, run by its own task (the
                # worker's wake-up and the answer's hand-back would cost two more turns of the event loop).
                await self._run_alone(loop, request)
            else:
                self._pending.extend((request, i) for i in range(len(texts)))
                self._wakeup.set()
            await request.future
        except BaseException:
            request.future.cancel()  # a request that leaves mid-round gives its uncomputed work back (_release)
            raise
        now = time.perf_counter()
        started = request.started or now
        observe_queue_wait(started - request.enqueued)
        return Embedded(
            embeddings=request.out,
            tokens=tokens,
            truncated=sum(t.truncated for t in tokenized),
            queue_seconds=started - request.enqueued,
            compute_seconds=request.compute_seconds,
            computed=len(texts),
            text_tokens=tuple(len(t.ids) for t in tokenized),
            text_truncated=tuple(t.truncated for t in tokenized),
        )

    @property
    def _idle(self) -> bool:
        return not (self._pending or self._in_round or self._infer.running)

    def _wake_if_pending(self) -> None:
        if self._pending and self._wakeup is not None:
            self._wakeup.set()

    async def _run_alone(self, loop: asyncio.AbstractEventLoop, request: _Request) -> None:
        self._in_round = True
        cost = request.pending_tokens + CALL_OVERHEAD_TOKENS
        try:
            inline = self.lone_calls.measured and self.lone_calls.seconds_for(cost) <= self.inline_max_seconds
            if inline:
                # One turn of the event loop: requests that arrived together with this one (a burst after the
                # loop was busy) reach the queue meanwhile, and then this one runs on a thread as before, so that
                # they are batched rather than run one by one on the loop.
                await asyncio.sleep(0)
                inline = not self._pending
            seconds = await self._run_round(loop, [(request, i) for i in range(len(request.tokenized))], inline=inline)
            self.lone_calls.observe(cost, seconds)
        finally:
            self._in_round = False
            self._wake_if_pending()

    def _release(self, request: _Request, _: asyncio.Future) -> None:
        """What a finished, failed or abandoned request had not computed no longer counts as admitted work."""
        self._texts -= request.remaining
        self._tokens -= request.pending_tokens
        request.remaining = 0
        request.pending_tokens = 0

    def _ensure_worker(self) -> None:
        if self._worker is None or self._worker.done():
            self._wakeup = asyncio.Event()
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    def _take_round(self) -> list[tuple[_Request, int]]:
        """The oldest rows, up to the round's token budget (at least one row)."""
        budget = min(max(ROUND_BATCHES, self.streams) * self.max_batch_tokens,  # a batch for every stream
                     self.throughput.tokens_per_second * self.max_queue_seconds * ROUND_SHARE_OF_BOUND)
        round_: list[tuple[_Request, int]] = []
        tokens = 0
        now = time.perf_counter()
        while self._pending:
            req, i = self._pending[0]
            if req.future.done():  # its client went away: its texts are not computed
                self._pending.popleft()
                continue
            if req.started is None and now - req.enqueued > self.max_queue_seconds:
                self._refuse_late(req, now)
                continue
            length = len(req.tokenized[i].ids)
            if round_ and tokens + length > budget:
                break
            round_.append(self._pending.popleft())
            tokens += length
        return round_

    def _refuse_late(self, request: _Request, now: float) -> None:
        """The machine got slower than measured and the request's turn came after its bound: 429 now, not late."""
        waited = now - request.enqueued
        ahead = self.backlog_seconds - self.throughput.seconds_for(request.pending_tokens)
        request.future.set_exception(Overloaded(
            f"the server is slower than it estimated: the request waited {waited:.0f}s without starting "
            f"(MAX_QUEUE_SECONDS is {self.max_queue_seconds:g}); try again shortly", self._retry_after(ahead)))
        request.future.exception()  # the caller may have gone; the outcome is read here so asyncio does not warn
        logger.warning("Refused a request after %.1fs in the queue: throughput fell below the estimate", waited)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending or self._in_round or self._infer.running:  # the last two: a request runs alone
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            round_ = self._take_round()
            if round_:
                self._in_round = True
                try:
                    await self._run_round(loop, round_)
                finally:
                    self._in_round = False

    async def _run_round(self, loop: asyncio.AbstractEventLoop, round_: list[tuple[_Request, int]],
                         inline: bool = False) -> float:
        """Plans and runs the round; returns its wall time."""
        started = time.perf_counter()
        lengths = [len(req.tokenized[i].ids) for req, i in round_]
        plan = functools.partial(plan_batches, lengths, self.max_batch_tokens, shapes=self.backend.shapes)
        if len(lengths) <= INLINE_PLAN_TEXTS:
            batches = plan()
        else:
            batches = await loop.run_in_executor(self._tokenize_pool, plan)
        if not inline and self.streams > 1 and len(batches) > 1 and self._tokens >= self.streams_queue_tokens:
            # A deep queue: several batches at once, each on its stream's share of the cores.
            gate = asyncio.Semaphore(self.streams)

            async def run(batch: list[int]) -> int:
                async with gate:
                    return await self._run_planned(loop, round_, batch, parallel=True)

            computed = sum(await asyncio.gather(*(run(batch) for batch in batches)))
        else:
            computed = 0
            for batch in batches:
                computed += await self._run_planned(loop, round_, batch, inline=inline)
        # Wall time of the whole round, planning and the event loop's share of the cores included: the rate
        # that admission divides by is the rate at which admitted work really drains.
        seconds = time.perf_counter() - started
        self.throughput.observe(computed, seconds)
        return seconds

    async def _run_planned(self, loop: asyncio.AbstractEventLoop, round_: list[tuple[_Request, int]],
                           batch: list[int], parallel: bool = False, inline: bool = False) -> int:
        """The rows of ``batch`` (indices into the round) whose requests still wait, run as one micro-batch."""
        items = [round_[k] for k in batch if not round_[k][0].future.done()]
        return await self._run_batch(loop, items, parallel, inline) if items else 0

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, items: list[tuple[_Request, int]],
                         parallel: bool = False, inline: bool = False) -> int:
        """Runs one micro-batch (on an infer thread, or on this thread when ``inline``) and answers every request
        whose last row it held; returns the tokens computed."""
        started = time.perf_counter()
        for req, _ in items:
            if req.started is None:
                req.started = started
        ids = [req.tokenized[i].ids for req, i in items]
        try:
            if inline:
                vectors = self.backend.embed(ids)
            else:
                embed = functools.partial(self.backend.embed, parallel=True) if parallel else self.backend.embed
                vectors = await self._infer.run(embed, ids)
        except Exception as exc:  # a backend failure fails the requests in this batch, not the worker
            logger.exception("inference failed for a batch of %d texts", len(items))
            for req, _ in items:
                if not req.future.done():
                    req.future.set_exception(exc)
            return 0
        elapsed = time.perf_counter() - started
        tokens = sum(len(row) for row in ids)
        observe_batch(len(items), tokens, elapsed)
        share = elapsed / len(items)
        for row, (req, i) in enumerate(items):
            if req.future.done():  # abandoned while the batch ran: its count was given back already
                continue
            req.out[i] = vectors[row]
            req.compute_seconds += share
            req.remaining -= 1
            req.pending_tokens -= len(ids[row])
            self._texts -= 1
            self._tokens -= len(ids[row])
            if req.remaining == 0:
                req.future.set_result(None)
        return tokens

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._infer.close()
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)
