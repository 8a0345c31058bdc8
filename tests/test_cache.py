"""The embedding cache: its byte bound and order, namespaces, bit-exact hits and one computation per text in
flight, with the real backend; then the server on every protocol, its metrics and its cost headers (the production
wiring in-process over the real model, conftest.InProcessServer)."""
from __future__ import annotations

import asyncio
import base64
import json
import uuid

import numpy as np
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import MODEL_NAME, TEST_KEY, InProcessServer, RecordingBackend, cosines, grpc_infer
from embedding_server.engine.backends import create_backend
from embedding_server.engine.batcher import Batcher
from embedding_server.engine.cache import (
    ENTRY_OVERHEAD_BYTES,
    NAMESPACE_HEADER,
    Cached,
    CachingEmbedder,
    EmbeddingCache,
    model_identity,
    namespace_of,
)
from embedding_server.engine.runtimes import TorchBackend
from embedding_server.operations.errors import Overloaded
from model import cache_namespace

DIM = 384
ENTRY = DIM * 4 + ENTRY_OVERHEAD_BYTES  # bytes one cached 384-dimension vector counts for


def entry(value: float, tokens: int = 5) -> Cached:
    return Cached(np.full(DIM, value, dtype=np.float32).tobytes(), tokens, False)


# --- the LRU ------------------------------------------------------------------------------------------------------

def test_the_cache_stays_within_its_bytes_and_drops_the_oldest_first():
    cache = EmbeddingCache(3 * ENTRY, b"model")
    keys = [cache.key("ns", f"text {i}") for i in range(5)]
    for i, key in enumerate(keys):
        cache.put(key, entry(i))
        assert cache.bytes <= cache.max_bytes
    assert len(cache) == 3 and cache.bytes == 3 * ENTRY and cache.evictions == 2
    assert [cache.get(k) is None for k in keys] == [True, True, False, False, False]


def test_a_read_entry_is_kept_over_an_older_unread_one():
    cache = EmbeddingCache(2 * ENTRY, b"model")
    first, second, third = (cache.key("ns", t) for t in ("first", "second", "third"))
    cache.put(first, entry(1))
    cache.put(second, entry(2))
    assert cache.get(first) == entry(1)  # now the most recently used
    cache.put(third, entry(3))
    assert cache.get(second) is None and cache.get(first) == entry(1) and cache.get(third) == entry(3)


def test_an_entry_put_again_is_counted_once_and_one_too_big_is_not_kept():
    cache = EmbeddingCache(2 * ENTRY, b"model")
    key = cache.key("ns", "t")
    cache.put(key, entry(1))
    cache.put(key, entry(2))
    assert len(cache) == 1 and cache.bytes == ENTRY and cache.get(key) == entry(2)
    small = EmbeddingCache(ENTRY - 1, b"model")
    small.put(key, entry(1))
    assert len(small) == 0 and small.bytes == 0


def test_keys_differ_by_namespace_model_and_text():
    cache, other_model = EmbeddingCache(ENTRY, b"model-a"), EmbeddingCache(ENTRY, b"model-b")
    keys = {cache.key("ns-1", "text"), cache.key("ns-2", "text"), cache.key("ns-1", "text "),
            other_model.key("ns-1", "text")}
    assert len(keys) == 4
    assert cache.key("ns-1", "text") == cache.key("ns-1", "text")


def test_namespaces_hide_the_key_and_keep_keys_apart():
    alice, bob = namespace_of("alice-key-123"), namespace_of("bob-key-456")
    assert alice != bob and alice == namespace_of("alice-key-123") and namespace_of(None) == ""
    assert "alice-key-123" not in alice and len(alice) == 32
    assert cache_namespace({"x-api-key": "alice-key-123"}) == alice
    assert cache_namespace({"authorization": "Bearer alice-key-123"}) == alice
    # A replica, which never sees the key, takes the front end's header; with a key, a client's copy is ignored.
    assert cache_namespace({NAMESPACE_HEADER: bob}) == bob
    assert cache_namespace({"x-api-key": "alice-key-123", NAMESPACE_HEADER: bob}) == alice


def test_the_model_identity_names_files_backend_and_truncation(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    base = model_identity(str(tmp_path), "openvino-fp32", 256)
    assert base == model_identity(str(tmp_path), "openvino-fp32", 256)
    assert base != model_identity(str(tmp_path), "openvino-bf16", 256)
    assert base != model_identity(str(tmp_path), "openvino-fp32", 128)
    (tmp_path / "config.json").write_text('{"changed": true}')
    assert base != model_identity(str(tmp_path), "openvino-fp32", 256)


# --- in front of the batcher, with the real backend ------------------------------------------------------------------

@pytest.fixture(scope="module")
def backend(model_path):
    return TorchBackend(model_path, precision="fp32")


def run_with(backend, scenario, cache_bytes: int = 10 * ENTRY, **batcher_options):
    """Runs `scenario(embedder)` on a fresh batcher and cache over `backend`."""
    async def run():
        batcher = Batcher(backend, **batcher_options)
        cache = EmbeddingCache(cache_bytes, b"model") if cache_bytes else None
        try:
            return await scenario(CachingEmbedder(batcher, cache))
        finally:
            backend.gate.set()
            batcher.close()

    return asyncio.run(run())


def test_a_hit_returns_the_bytes_its_miss_computed_and_costs_no_model_call(backend, reference):
    recording = RecordingBackend(backend)
    texts = ["The cat sat on the mat.", "Markets fell sharply today."]

    async def scenario(embedder):
        return await embedder.embed(texts, "ns"), await embedder.embed(texts[::-1], "ns")

    miss, hit = run_with(recording, scenario)
    assert miss.computed == 2 and hit.computed == 0 and len(recording.rows) == 2
    assert hit.embeddings[::-1].tobytes() == miss.embeddings.tobytes()
    assert (hit.tokens, hit.truncated) == (miss.tokens, miss.truncated)
    assert hit.queue_seconds == 0 and hit.compute_seconds == 0
    assert cosines(hit.embeddings[::-1], reference(texts)).min() >= 0.99999


def test_a_partial_hit_sends_only_the_new_texts_and_keeps_the_order(backend, reference):
    recording = RecordingBackend(backend)

    async def scenario(embedder):
        await embedder.embed(["known one", "known two"], "ns")
        recording.batches.clear()
        return await embedder.embed(["new text here", "known two", "known one"], "ns")

    mixed = run_with(recording, scenario)
    assert mixed.computed == 1 and len(recording.rows) == 1
    assert cosines(mixed.embeddings, reference(["new text here", "known two", "known one"])).min() >= 0.99999


def test_identical_texts_in_one_request_and_in_flight_are_computed_once(backend):
    recording = RecordingBackend(backend)

    async def scenario(embedder):
        # One request repeats a text; five more send it while its computation is in flight.
        return await asyncio.gather(embedder.embed(["same", "other", "same"], "ns"),
                                    *(embedder.embed(["same"], "ns") for _ in range(5)))

    first, *others = run_with(recording, scenario)
    assert len(recording.rows) == 2  # "same" and "other", once each
    assert first.computed == 2 and [o.computed for o in others] == [0] * 5
    assert first.embeddings[0].tobytes() == first.embeddings[2].tobytes()
    assert all(o.embeddings[0].tobytes() == first.embeddings[0].tobytes() for o in others)


def test_namespaces_share_neither_entries_nor_computations_in_flight(backend):
    recording = RecordingBackend(backend)

    async def scenario(embedder):
        in_flight = await asyncio.gather(embedder.embed(["shared text"], "alice"), embedder.embed(["shared text"], "bob"))
        later = await embedder.embed(["shared text"], "carol")
        return in_flight, later

    (alice, bob), carol = run_with(recording, scenario)
    assert (alice.computed, bob.computed, carol.computed) == (1, 1, 1) and len(recording.rows) == 3


def test_a_cached_request_neither_queues_nor_meets_admission(backend):
    recording = RecordingBackend(backend)

    async def scenario(embedder):
        await embedder.embed(["cached a", "cached b"], "ns")
        recording.gate.clear()
        recording.entered.clear()
        slow = asyncio.ensure_future(embedder.embed(["slow text"], "ns"))
        while not recording.entered.is_set():  # its batch is running and holds the queue's only place
            await asyncio.sleep(0.01)
        with pytest.raises(Overloaded):
            await embedder.embed(["not cached"], "ns")
        cached = await embedder.embed(["cached b", "cached a"], "ns")
        done = slow.done()
        recording.gate.set()
        await slow
        return cached, done

    # The held call must run on the infer thread: on the event loop's thread (where a lone short call runs once
    # lone calls are measured, as after the first request here) it would hold the loop this test runs on.
    cached, slow_was_done = run_with(recording, scenario, max_queued_texts=1, inline_max_seconds=0)
    assert cached.computed == 0 and not slow_was_done


def test_who_joins_an_abandoned_computation_computes_it_itself(backend):
    recording = RecordingBackend(backend)

    async def scenario(embedder):
        recording.gate.clear()
        owner = asyncio.ensure_future(embedder.embed(["left behind"], "ns"))
        await asyncio.sleep(0)
        joiner = asyncio.ensure_future(embedder.embed(["left behind"], "ns"))
        await asyncio.sleep(0.05)
        owner.cancel()
        recording.gate.set()
        return await joiner, owner

    joined, owner = run_with(recording, scenario)
    assert owner.cancelled() and joined.computed == 1 and joined.embeddings.shape == (1, DIM)


def test_a_failure_reaches_every_request_that_joined(backend):
    class Failing(RecordingBackend):
        def embed(self, batch):
            raise RuntimeError("backend broke")

    async def scenario(embedder):
        return await asyncio.gather(embedder.embed(["doomed"], "ns"), embedder.embed(["doomed"], "ns"),
                                    return_exceptions=True)

    outcomes = run_with(Failing(backend), scenario)
    assert all(isinstance(o, RuntimeError) for o in outcomes)


def test_with_no_cache_every_text_goes_to_the_model(backend):
    recording = RecordingBackend(backend)

    async def scenario(embedder):
        return await embedder.embed(["again", "again"], "ns"), await embedder.embed(["again"], "ns")

    first, second = run_with(recording, scenario, cache_bytes=0)
    assert (first.computed, second.computed) == (2, 1) and len(recording.rows) == 3


# --- the server -----------------------------------------------------------------------------------------------

KEY_A, KEY_B = "cache-key-alice", "cache-key-bob"
V1 = f"/v1/models/{MODEL_NAME}:predict"


def real_server(env: dict[str, str], key: str | None = TEST_KEY) -> InProcessServer:
    """The production wiring in-process over the real model on the exact path (torch fp32)."""
    return InProcessServer(env={"BACKEND": "torch", "PRECISION": "fp32", **env}, key=key, backend_factory=create_backend)


@pytest.fixture(scope="module")
def two_keys():
    running = real_server({"API_KEYS": f"{KEY_A},{KEY_B}", "EMBEDDING_CACHE_MB": "8"}, key=None)
    yield running
    running.stop()


def cache_counts(url: str) -> dict[str, float]:
    text = requests.get(f"{url}/metrics", timeout=10).text
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if s.name.startswith("embedding_cache_")}


def embed(url: str, route: str, text: str, key: str) -> tuple[np.ndarray, requests.Response]:
    """One text through `route`; the vector as the float32 bytes the server computed."""
    if route == "openai":
        response = requests.post(f"{url}/v1/embeddings", headers={"X-Api-Key": key}, timeout=60,
                                 json={"input": [text], "model": MODEL_NAME, "encoding_format": "base64"})
        vector = np.frombuffer(base64.b64decode(response.json()["data"][0]["embedding"]), dtype="<f4")
    elif route == "legacy":
        response = requests.post(f"{url}/embedding", json={"t": text}, headers={"X-Api-Key": key}, timeout=60)
        vector = np.asarray(json.loads(response.json()["t"]), dtype=np.float32)  # str() of a list
    elif route == "v2":
        body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [text]}]}
        response = requests.post(f"{url}/v2/models/{MODEL_NAME}/infer", json=body, headers={"X-Api-Key": key},
                                 timeout=60)
        vector = np.asarray(response.json()["outputs"][0]["data"], dtype=np.float32)
    else:
        response = requests.post(f"{url}{V1}", json={"instances": [text]}, headers={"X-Api-Key": key}, timeout=60)
        vector = np.asarray(response.json()["predictions"][0], dtype=np.float32)
    assert response.status_code == 200, response.text
    return vector, response


@pytest.mark.parametrize("route", ["v1", "v2", "legacy", "openai"])
def test_a_repeated_text_is_a_hit_with_the_same_bytes(two_keys, route, reference):
    text = f"a text seen twice over {route} {uuid.uuid4().hex}"
    before = cache_counts(two_keys.url)
    first, miss = embed(two_keys.url, route, text, KEY_A)
    second, hit = embed(two_keys.url, route, text, KEY_A)
    after = cache_counts(two_keys.url)
    assert second.tobytes() == first.tobytes()
    assert cosines([second], reference([text]))[0] >= 0.99999
    assert (miss.headers["x-computed-texts"], hit.headers["x-computed-texts"]) == ("1", "0")
    assert hit.headers["x-compute-texts"] == "1" and hit.headers["x-compute-tokens"] == miss.headers["x-compute-tokens"]
    assert after["embedding_cache_hits_total"] - before["embedding_cache_hits_total"] == 1
    assert after["embedding_cache_misses_total"] - before["embedding_cache_misses_total"] == 1
    assert after["embedding_cache_bytes"] >= ENTRY and after["embedding_cache_entries"] >= 1


def test_openai_usage_counts_a_hit_as_the_model_saw_it(two_keys):
    text = f"usage stays true {uuid.uuid4().hex}"
    _, miss = embed(two_keys.url, "openai", text, KEY_A)
    _, hit = embed(two_keys.url, "openai", text, KEY_A)
    assert hit.json()["usage"] == miss.json()["usage"] and miss.json()["usage"]["prompt_tokens"] > 0


def test_grpc_shares_the_cache(two_keys):
    text = f"over grpc {uuid.uuid4().hex}"
    before = cache_counts(two_keys.url)
    first = grpc_infer(two_keys, [text], metadata=(("x-api-key", KEY_A),))
    second = grpc_infer(two_keys, [text], metadata=(("x-api-key", KEY_A),))
    after = cache_counts(two_keys.url)
    assert first.outputs[0].contents.fp32_contents == second.outputs[0].contents.fp32_contents
    assert after["embedding_cache_hits_total"] - before["embedding_cache_hits_total"] == 1
    # The same text over HTTP is the same entry: one cache for every protocol.
    _, http = embed(two_keys.url, "v1", text, KEY_A)
    assert http.headers["x-computed-texts"] == "0"


def test_another_key_does_not_hit(two_keys):
    text = f"alice's private query {uuid.uuid4().hex}"
    embed(two_keys.url, "v1", text, KEY_A)
    before = cache_counts(two_keys.url)
    _, other = embed(two_keys.url, "v1", text, KEY_B)
    after = cache_counts(two_keys.url)
    assert other.headers["x-computed-texts"] == "1"
    assert after["embedding_cache_misses_total"] - before["embedding_cache_misses_total"] == 1
    assert after["embedding_cache_hits_total"] == before["embedding_cache_hits_total"]
    _, again = embed(two_keys.url, "v1", text, KEY_B)  # now bob's own entry
    assert again.headers["x-computed-texts"] == "0"


def test_a_request_with_some_cached_texts_computes_only_the_others(two_keys, reference):
    known = [f"known {i} {uuid.uuid4().hex}" for i in range(3)]
    requests.post(f"{two_keys.url}{V1}", json={"instances": known}, headers={"X-Api-Key": KEY_A}, timeout=60)
    texts = [known[2], f"fresh {uuid.uuid4().hex}", known[0], known[2]]
    response = requests.post(f"{two_keys.url}{V1}", json={"instances": texts}, headers={"X-Api-Key": KEY_A},
                             timeout=60)
    assert response.headers["x-computed-texts"] == "1" and response.headers["x-compute-texts"] == "4"
    assert cosines(response.json()["predictions"], reference(texts)).min() >= 0.99999


def test_cache_off_computes_every_text(reference):
    running = real_server({"EMBEDDING_CACHE_MB": "0"})
    try:
        text = "the same text, twice"
        before = cache_counts(running.url)
        answers = [embed(running.url, "v1", text, TEST_KEY) for _ in range(2)]
        after = cache_counts(running.url)
    finally:
        running.stop()
    assert [r.headers["x-computed-texts"] for _, r in answers] == ["1", "1"]
    # The series are the process's (in-process, the module's other server has filled them): nothing moved.
    for name in ("embedding_cache_hits_total", "embedding_cache_misses_total", "embedding_cache_bytes"):
        assert after.get(name, 0) == before.get(name, 0), name
    assert cosines([answers[1][0]], reference([text]))[0] >= 0.99999
