"""Embeddings of texts the server has seen: an LRU bounded in bytes, and one computation per text in flight.

Real traffic repeats itself (popular queries, re-indexing jobs that resend unchanged chunks, retries). An entry is
keyed by a hash of the loaded model (its files' names, sizes and times, the backend and precision, the token
limit), of the caller's namespace (a keyed hash of its API key) and of the text, and holds the float32 bytes the
model computed, so a hit answers exactly the vector its miss answered. Namespaces keep tenants apart: a hit
cannot tell one API key what another one sent (a timing side channel), and neither can a computation in flight.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedding_server.engine.batcher import Batcher, Embedded
from embedding_server.operations.observability import observe_cache_lookups, observe_cache_size

logger = logging.getLogger(__name__)

# Memory an entry holds besides its vector: key, entry object, the LRU's node (measured with tracemalloc on
# CPython 3.11: ~213 bytes for a 384-dimension vector).
ENTRY_OVERHEAD_BYTES = 224
# What a Ray replica, which never sees the API key, gets from the front end in its place: the key's namespace.
NAMESPACE_HEADER = "x-embedding-cache-namespace"
KEY_BYTES = 16  # blake2b digest: collisions are out of reach at any cache size
# Namespaces are keyed hashes with a secret of this process: the cache holds no API key, nor a plain hash of one
# that could be checked against guesses.
_NAMESPACE_SECRET = secrets.token_bytes(32)


def namespace_of(api_key: str | None) -> str:
    """The cache namespace of an API key ("" for none)."""
    if not api_key:
        return ""
    return hashlib.blake2b(api_key.encode("utf-8", "surrogatepass"), key=_NAMESPACE_SECRET,
                           digest_size=KEY_BYTES).hexdigest()


def model_identity(model_path: str, backend_name: str, max_seq_length: int) -> bytes:
    """What makes two loaded models answer the same vectors: their files (names, sizes, modification times,
    read cheaply from the directory), the backend and precision (``backend_name``, e.g. openvino-fp32) and the
    truncation."""
    root = Path(model_path).resolve()
    digest = hashlib.blake2b(f"{root}\n{backend_name}\n{max_seq_length}\n".encode(), digest_size=KEY_BYTES)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(root).as_posix()}\n{stat.st_size}\n{stat.st_mtime_ns}\n".encode())
    return digest.digest()


@dataclass(frozen=True, slots=True)
class Cached:
    """One text's answer: the vector's float32 bytes (immutable), and what its tokenizing found."""

    vector: bytes
    tokens: int
    truncated: bool


class EmbeddingCache:
    """Least recently used entries go first once the entries' bytes would pass ``max_bytes``."""

    def __init__(self, max_bytes: int, model_id: bytes):
        if max_bytes <= 0:
            raise ValueError("an embedding cache needs a positive size")
        self.max_bytes = max_bytes
        self.model_id = model_id
        self.bytes = 0
        self.evictions = 0
        self._entries: OrderedDict[bytes, Cached] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def key(self, namespace: str, text: str) -> bytes:
        digest = hashlib.blake2b(self.model_id, digest_size=KEY_BYTES)
        digest.update(namespace.encode("ascii", "surrogateescape") + b"\0")
        digest.update(text.encode("utf-8", "surrogatepass"))
        return digest.digest()

    @staticmethod
    def entry_bytes(entry: Cached) -> int:
        return len(entry.vector) + ENTRY_OVERHEAD_BYTES

    def get(self, key: bytes) -> Cached | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: bytes, entry: Cached) -> None:
        size = self.entry_bytes(entry)
        if size > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= self.entry_bytes(old)
        evicted = 0
        while self.bytes + size > self.max_bytes:
            _, dropped = self._entries.popitem(last=False)
            self.bytes -= self.entry_bytes(dropped)
            evicted += 1
        self._entries[key] = entry
        self.bytes += size
        self.evictions += evicted
        observe_cache_size(self.bytes, len(self._entries), evicted)


class CachingEmbedder:
    """Sends the batcher only the texts that no entry and no computation in flight answers.

    A request whose texts are all cached never reaches the batcher, so it neither waits in the queue nor meets
    its admission. Identical texts, in one request or in requests in flight, are computed once: the first asks
    the batcher and the others await its future (keyed like the cache, so per namespace). With no cache
    (``cache=None``) every text goes to the batcher, as if this class were not there.
    """

    def __init__(self, batcher: Batcher, cache: EmbeddingCache | None):
        self.batcher = batcher
        self.cache = cache
        self._in_flight: dict[bytes, asyncio.Future[Cached]] = {}

    async def embed(self, texts: list[str], namespace: str = "") -> Embedded:
        if self.cache is None or not texts:
            return await self.batcher.embed(texts)
        keys = [self.cache.key(namespace, text) for text in texts]
        wanted = dict(zip(keys, texts))  # one lookup per distinct text, in the caller's order
        answers: dict[bytes, Cached] = {}
        computed, queue_seconds, compute_seconds = 0, 0.0, 0.0
        first = True
        while wanted:
            mine: dict[bytes, str] = {}
            joined: dict[bytes, asyncio.Future[Cached]] = {}
            for key, text in wanted.items():
                entry = self.cache.get(key)
                if entry is not None:
                    answers[key] = entry
                elif key in self._in_flight:
                    joined[key] = self._in_flight[key]
                else:
                    mine[key] = text
            if first:  # a later pass only takes over work that another request abandoned
                hits = sum(key in answers for key in keys)
                observe_cache_lookups(hits, len(keys) - hits)
                first = False
            if mine:
                embedded = await self._compute(mine, answers)
                computed += embedded.computed
                queue_seconds += embedded.queue_seconds
                compute_seconds += embedded.compute_seconds
            wanted = {key: wanted[key] for key in await self._join(joined, answers)}
        vectors = np.empty((len(texts), self.batcher.backend.dimension), dtype=np.float32)
        for row, key in enumerate(keys):
            vectors[row] = np.frombuffer(answers[key].vector, dtype=np.float32)
        return Embedded(embeddings=vectors, tokens=sum(answers[key].tokens for key in keys),
                        truncated=sum(answers[key].truncated for key in keys), queue_seconds=queue_seconds,
                        compute_seconds=compute_seconds, computed=computed)

    async def _compute(self, mine: dict[bytes, str], answers: dict[bytes, Cached]) -> Embedded:
        """Computes these texts once for every request that asks for them meanwhile, and keeps their answers."""
        loop = asyncio.get_running_loop()
        futures = {key: loop.create_future() for key in mine}
        self._in_flight.update(futures)
        try:
            embedded = await self.batcher.embed(list(mine.values()))
        except BaseException as exc:
            for key, future in futures.items():
                del self._in_flight[key]
                if isinstance(exc, asyncio.CancelledError):
                    future.cancel()  # this client went away; those who joined compute it themselves
                else:
                    future.set_exception(exc)
                    future.exception()  # read here, so asyncio does not warn when no one joined
            raise
        for row, key in enumerate(mine):
            entry = Cached(embedded.embeddings[row].tobytes(), embedded.text_tokens[row],
                           embedded.text_truncated[row])
            self.cache.put(key, entry)
            answers[key] = entry
            del self._in_flight[key]
            futures[key].set_result(entry)
        return embedded

    @staticmethod
    async def _join(joined: dict[bytes, asyncio.Future[Cached]], answers: dict[bytes, Cached]) -> list[bytes]:
        """Awaits other requests' computations; returns the keys whose computation was abandoned."""
        abandoned = []
        for key, future in joined.items():
            try:
                answers[key] = await asyncio.shield(future)  # this request's cancellation leaves theirs alone
            except asyncio.CancelledError:
                if not future.cancelled() or asyncio.current_task().cancelling():
                    raise
                abandoned.append(key)
        return abandoned
