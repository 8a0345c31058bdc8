"""embed_client: retries and request shapes against a scripted loopback HTTP server, and whole files through
the real server on every route, each vector held to sentence-transformers' own output, including resume."""
from __future__ import annotations

import csv
import email.utils
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

import embed_client as ec
from conftest import MODEL_NAME, ROOT, TEST_KEY, cosines, free_port, hash_vectors

EXACT = 0.99999
CLIENT = [sys.executable, str(ROOT / "embed_client.py")]
N_LINES = int(os.environ.get("EMBED_CLIENT_TEST_LINES", "2000"))
# Lines sent through the real model (the fp32 server) and sentence-transformers: four batches of 40 with
# every edge text (the file-format and resume tests send all N_LINES to the hash-backend server).
REAL_MODEL_LINES = 160
LONG_TEXT = " ".join(["Batches of texts travel to the server and come back as vectors."] * 50)  # > 256 tokens
EDGE_TEXTS = ["  leading and trailing spaces  ", "Ünïcödé, emoji 🚀 and 右から左 עברית text.", LONG_TEXT,
              'a "quoted", comma, separated; text', "x"]
STUB_KEY = "stub-secret-5b1e0d"


# ---------------------------------------------------------------- a scripted loopback server

def fake_vector(text: str, dim: int = 8) -> list[float]:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    row = np.random.default_rng(seed).normal(size=dim)
    return (row / np.linalg.norm(row)).astype(np.float32).tolist()


def good_answer(path: str, body: dict) -> dict:
    """A correct answer for the route, with items in reverse order where the format allows it."""
    if path.startswith("/v1/models/"):
        return {"predictions": [fake_vector(t) for t in body["instances"]]}
    if path == "/embedding":
        return {key: str(fake_vector(body[key])) for key in reversed(list(body))}
    items = [{"object": "embedding", "index": i, "embedding": fake_vector(t)} for i, t in enumerate(body["input"])]
    return {"object": "list", "data": items[::-1], "model": body["model"]}


class Stub:
    """HTTP on 127.0.0.1 that answers POSTs from a script of (status, headers, body), then correctly."""

    def __init__(self, script: list[tuple[int, dict[str, str], Any]]):
        self.script = list(script)
        self.seen: list[dict[str, Any]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = json.loads(raw)
                stub.seen.append({"t": time.monotonic(), "path": self.path, "headers": dict(self.headers),
                                  "body": body})
                status, headers, answer = stub.script.pop(0) if stub.script else (200, {}, good_answer(self.path, body))
                data = json.dumps(answer).encode()
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def gaps(self) -> list[float]:
        return [b["t"] - a["t"] for a, b in zip(self.seen, self.seen[1:])]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def stub_factory() -> Iterator:
    stubs: list[Stub] = []

    def make(script: list[tuple[int, dict[str, str], Any]] | None = None) -> Stub:
        stubs.append(Stub(script or []))
        return stubs[-1]

    yield make
    for stub in stubs:
        stub.close()


def quick(url: str, route: str = "v1", attempts: int = 5, base: float = 0.01, **kw: Any) -> ec.EmbeddingClient:
    return ec.EmbeddingClient(url, STUB_KEY, route=route, model=MODEL_NAME,
                              retry=ec.RetryPolicy(max_attempts=attempts, base_delay=base, max_delay=5), **kw)


BUSY = {"error": "Server busy: too many texts waiting"}


def test_retry_after_reads_seconds_and_http_dates() -> None:
    now = 1_800_000_000.0
    assert ec.retry_after_seconds("3") == 3.0
    assert ec.retry_after_seconds(" 0 ") == 0.0
    assert ec.retry_after_seconds(email.utils.formatdate(now + 7, usegmt=True), now=now) == pytest.approx(7.0)
    assert ec.retry_after_seconds(email.utils.formatdate(now - 60, usegmt=True), now=now) == 0.0
    for bad in (None, "", "soon", "-1", "nan", "Mon, 99 Foo 2026"):
        assert ec.retry_after_seconds(bad) is None, bad


def test_429_with_retry_after_is_waited_out_then_the_batch_succeeds(stub_factory) -> None:
    stub = stub_factory([(429, {"Retry-After": "1"}, BUSY)] * 2)
    texts = ["one", "two", "three"]
    vectors = quick(stub.url).embed(texts)
    assert len(stub.seen) == 3
    # the client's own backoff would be ~0.01 s: only Retry-After explains a full second
    assert all(1.0 <= gap < 3.0 for gap in stub.gaps()), stub.gaps()
    np.testing.assert_allclose(vectors, [fake_vector(t) for t in texts])
    assert all(r["body"] == {"instances": texts} for r in stub.seen)


def test_503_with_an_http_date_retry_after_is_honoured(stub_factory) -> None:
    when = email.utils.formatdate(time.time() + 2, usegmt=True)  # whole seconds: at least 1 s ahead
    stub = stub_factory([(503, {"Retry-After": when}, {"error": "Model is loading"})])
    quick(stub.url).embed(["hello"])
    assert len(stub.seen) == 2
    assert 1.0 <= stub.gaps()[0] < 3.5


def test_without_retry_after_the_waits_double(stub_factory) -> None:
    stub = stub_factory([(503, {}, {"error": "unavailable"})] * 3)
    quick(stub.url, base=0.2).embed(["hello"])
    gaps = stub.gaps()
    assert len(gaps) == 3
    # equal jitter: wait n is in [0.5, 1] x 0.2 x 2^(n-1)
    for n, gap in enumerate(gaps):
        assert 0.1 * 2 ** n <= gap < 0.2 * 2 ** n + 0.5, gaps


def test_gives_up_after_max_attempts_with_the_last_status(stub_factory) -> None:
    stub = stub_factory([(429, {"Retry-After": "0"}, BUSY)] * 10)
    with pytest.raises(ec.EmbeddingError, match="3 attempts.*429.*Server busy") as info:
        quick(stub.url, attempts=3).embed(["hello"])
    assert info.value.status == 429
    assert len(stub.seen) == 3


@pytest.mark.parametrize("status", [400, 401, 413, 422])
def test_other_client_errors_fail_at_once_with_the_servers_message(stub_factory, status) -> None:
    stub = stub_factory([(status, {"Retry-After": "0"}, {"error": f"the reason for {status}"})])
    with pytest.raises(ec.EmbeddingError, match=f"{status}: the reason for {status}") as info:
        quick(stub.url).embed(["hello"])
    assert info.value.status == status
    assert len(stub.seen) == 1


def test_connection_errors_are_retried_then_reported() -> None:
    client = quick(f"http://127.0.0.1:{free_port()}", attempts=3, base=0.05)
    start = time.monotonic()
    with pytest.raises(ec.EmbeddingError, match="3 attempts.*ConnectionError"):
        client.embed(["hello"])
    assert client.requests_sent == 3
    assert time.monotonic() - start >= 0.075  # two waits of at least 0.025 and 0.05 s


@pytest.mark.parametrize("route, path, header, value", [
    ("v1", f"/v1/models/{MODEL_NAME}:predict", "X-Api-Key", STUB_KEY),
    ("legacy", "/embedding", "X-Api-Key", STUB_KEY),
    ("openai", "/openai/v1/embeddings", "Authorization", f"Bearer {STUB_KEY}"),
])
def test_each_route_gets_its_own_body_and_key_header_and_order_is_restored(stub_factory, route, path, header,
                                                                           value) -> None:
    stub = stub_factory()
    texts = [f"text number {i}" for i in range(7)] + ["text number 0"]  # a repeat, too
    vectors = quick(stub.url, route=route, batch_size=3).embed(texts)
    np.testing.assert_allclose(vectors, [fake_vector(t) for t in texts])
    assert vectors.dtype == np.float32
    assert len(stub.seen) == 3
    for request in stub.seen:
        assert request["path"] == path and STUB_KEY not in request["path"]
        assert request["headers"][header] == value
        other = "Authorization" if header == "X-Api-Key" else "X-Api-Key"
        assert other not in request["headers"]
    first = stub.seen[0]["body"]
    expected = {"v1": {"instances": texts[:3]}, "legacy": {"0": texts[0], "1": texts[1], "2": texts[2]},
                "openai": {"input": texts[:3], "model": MODEL_NAME, "encoding_format": "float"}}[route]
    assert first == expected


def test_a_short_answer_is_an_error_not_a_silent_misalignment(stub_factory) -> None:
    stub = stub_factory([(200, {}, {"predictions": [fake_vector("a")]})])
    with pytest.raises(ec.EmbeddingError, match="shape"):
        quick(stub.url).embed(["a", "b"])


def test_the_cli_never_prints_the_key(stub_factory, tmp_path) -> None:
    stub = stub_factory([(403, {}, {"error": "Invalid API key", "message": "The provided API key is invalid"})])
    source = tmp_path / "in.txt"
    source.write_text("alpha\nbeta\n")
    env = {**os.environ, ec.KEY_ENV: STUB_KEY}
    failed = subprocess.run([*CLIENT, str(source), str(tmp_path / "out.jsonl"), "--url", stub.url,
                             "--log-level", "DEBUG"], env=env, capture_output=True, text=True, timeout=60)
    assert failed.returncode == 1
    assert "403: Invalid API key" in failed.stderr
    done = subprocess.run([*CLIENT, str(source), str(tmp_path / "out.jsonl"), "--url", stub.url,
                           "--log-level", "DEBUG"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert len(stub.seen) == 2 and stub.seen[1]["headers"]["X-Api-Key"] == STUB_KEY
    for run in (failed, done):
        assert STUB_KEY not in run.stdout + run.stderr


# ---------------------------------------------------------------- reading input files

def test_txt_ids_are_line_numbers_and_blank_lines_are_left_out(tmp_path) -> None:
    path = tmp_path / "in.txt"
    path.write_bytes("\ufefffirst\r\n\r\n  \nsecond line \nthird".encode())
    records = ec.read_records(path)
    assert (records.ids, records.texts, records.skipped) == ([1, 4, 5], ["first", "second line ", "third"], [2, 3])
    kept = ec.read_records(path, empty="keep")
    assert kept.ids == [1, 2, 3, 4, 5] and kept.texts[1:3] == ["", "  "]
    with pytest.raises(ec.InputError, match="line 2: empty text"):
        ec.read_records(path, empty="error")


def test_jsonl_fields_are_chosen_and_errors_name_the_line(tmp_path) -> None:
    path = tmp_path / "in.jsonl"
    rows = [{"uid": "a", "body": "alpha"}, {"uid": 7, "body": ""}, {"uid": "c", "body": "gamma"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    records = ec.read_records(path, text_field="body", id_field="uid")
    assert (records.ids, records.texts, records.skipped) == (["a", "c"], ["alpha", "gamma"], [7])
    assert ec.read_records(path, text_field="body").ids == [1, 3]
    with pytest.raises(ec.InputError, match="line 1: no field 'text' \\(fields: uid, body\\)"):
        ec.read_records(path)
    path.write_text('{"text": "ok"}\n{"text": 5}\n')
    with pytest.raises(ec.InputError, match="line 2: field 'text' is int"):
        ec.read_records(path)


def test_csv_columns_are_chosen_and_quoting_survives(tmp_path) -> None:
    path = tmp_path / "in.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["doc", "title", "body"])
        writer.writerow(["d1", "T1", 'has "quotes", commas\nand a newline'])
        writer.writerow(["d2", "T2", ""])
        writer.writerow(["d3", "T3", "plain"])
    records = ec.read_records(path, column="body", id_column="doc")
    assert records.ids == ["d1", "d3"] and records.texts[0] == 'has "quotes", commas\nand a newline'
    assert records.skipped == ["d2"]
    assert ec.read_records(path, column="title").ids == [1, 2, 3]
    with pytest.raises(ec.InputError, match="no column 'text' \\(columns: doc, title, body\\)"):
        ec.read_records(path)


# ---------------------------------------------------------------- the real server

class CountingProxy:
    """Loopback HTTP that forwards POSTs to the real server and counts them: what a rerun really sent."""

    def __init__(self, upstream: str):
        self.posts = 0
        self.texts = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = json.loads(raw)
                proxy.posts += 1
                proxy.texts += len(body.get("instances", body.get("input", body)))
                forwarded = {k: v for k, v in self.headers.items() if k.lower() in
                             ("content-type", "x-api-key", "authorization")}
                answer = requests.post(upstream + self.path, data=raw, headers=forwarded, timeout=600)
                self.send_response(answer.status_code)
                self.send_header("Content-Type", answer.headers.get("Content-Type", "application/json"))
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            def log_message(self, *_: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def reset(self) -> None:
        self.posts = self.texts = 0

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def proxy(app_server) -> Iterator[CountingProxy]:
    """In front of the in-process server over the hash backend: the resume and kill tests are about the client, and
    hash vectors show exactly which text each row came from. The real model's answers to the whole corpus through
    the client: test_openai_jsonl_to_jsonl_matches_sentence_transformers."""
    counting = CountingProxy(app_server.url)
    yield counting
    counting.close()


@pytest.fixture(scope="module")
def corpus_lines() -> list[str]:
    """A few thousand distinct one-line English texts (stdlib docstrings, the model's README), plus edge cases."""
    from embedding_server.engine.corpus import load_texts

    lines = [t for t in load_texts(4000) if len(t) <= 400][:N_LINES - len(EDGE_TEXTS)]
    for i, edge in enumerate(EDGE_TEXTS):
        lines.insert(i * 29 + 13, edge)  # all among the first REAL_MODEL_LINES
    assert len(set(lines)) == len(lines) == N_LINES
    return lines


@pytest.fixture(scope="module")
def expected(corpus_lines, reference) -> dict[str, np.ndarray]:
    real = corpus_lines[:REAL_MODEL_LINES]
    assert set(EDGE_TEXTS) <= set(real)
    return dict(zip(real, reference(real)))


def assert_exact(vectors: np.ndarray, texts: list[str], expected: dict[str, np.ndarray]) -> None:
    vectors = np.asarray(vectors)
    assert vectors.dtype == np.float32 and vectors.shape == (len(texts), 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    worst = cosines(vectors, np.stack([expected[t] for t in texts])).min()
    assert worst >= EXACT, worst


def run_client(*args: str, key: str = TEST_KEY, timeout: float = 1800) -> subprocess.CompletedProcess:
    env = {**os.environ, ec.KEY_ENV: key}
    return subprocess.run([*CLIENT, *args, "--quiet"], env=env, capture_output=True, text=True, timeout=timeout)


def assert_hash_exact(vectors: np.ndarray, texts: list[str]) -> None:
    """Every row is its own text's vector from the hash backend, bit for bit, in order."""
    vectors = np.asarray(vectors)
    assert vectors.dtype == np.float32 and vectors.shape == (len(texts), 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert np.array_equal(vectors, hash_vectors(texts))


def read_jsonl(path: Path) -> tuple[list[Any], np.ndarray]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r["id"] for r in rows], np.asarray([r["embedding"] for r in rows], dtype=np.float32)


def test_v1_txt_to_jsonl_stops_resumes_and_keeps_every_line(proxy, corpus_lines, tmp_path) -> None:
    source, out = tmp_path / "lines.txt", tmp_path / "vectors.jsonl"
    with_blanks = []
    for i, line in enumerate(corpus_lines):
        with_blanks.append(line)
        if i % 400 == 5:
            with_blanks.append("   " if i % 800 == 5 else "")
    source.write_text("\n".join(with_blanks) + "\n", encoding="utf-8")
    batches = -(-len(corpus_lines) // 64)

    first = run_client(str(source), str(out), "--url", proxy.url, "--route", "v1", "--max-batches", "5")
    assert first.returncode == 0, first.stderr
    assert "stopped after 5 of" in first.stderr and "left out" in first.stderr
    assert proxy.posts == 5 and proxy.texts == 5 * 64
    # what a kill in the middle of writing a batch would leave behind: it must not survive the resume
    with out.open("ab") as handle:
        handle.write(b'{"id": 99999, "embedding": [0.1, 0.2')
    proxy.reset()

    second = run_client(str(source), str(out), "--url", proxy.url, "--route", "v1")
    assert second.returncode == 0, second.stderr
    assert proxy.posts == batches - 5 and proxy.texts == len(corpus_lines) - 5 * 64
    ids, vectors = read_jsonl(out)
    line_numbers = [n for n, line in enumerate(with_blanks, 1) if line.strip()]
    assert ids == line_numbers
    assert_hash_exact(vectors, corpus_lines)
    assert not (tmp_path / "vectors.jsonl.state.json").exists()

    proxy.reset()
    again = run_client(str(source), str(out), "--url", proxy.url)
    assert again.returncode == 1 and "--overwrite" in again.stderr and proxy.posts == 0


def test_legacy_csv_to_npy_resumes_after_a_kill(proxy, corpus_lines, tmp_path) -> None:
    source, out = tmp_path / "docs.csv", tmp_path / "vectors.npy"
    ids = [f"doc-{i:05d}" for i in range(len(corpus_lines))]
    with source.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["doc_id", "lang", "body"])
        writer.writerows([doc, "en", text] for doc, text in zip(ids, corpus_lines))
    args = [str(source), str(out), "--url", proxy.url, "--route", "legacy", "--column", "body",
            "--id-column", "doc_id", "--batch-size", "50", "--quiet"]
    batches = -(-len(corpus_lines) // 50)
    parts = tmp_path / "vectors.npy.parts"

    process = subprocess.Popen([*CLIENT, *args], env={**os.environ, ec.KEY_ENV: TEST_KEY},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and process.poll() is None and len(list(parts.glob("*.npy"))) < 3:
        time.sleep(0.02)
    assert process.poll() is None, process.stderr.read().decode()
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    process.stderr.close()
    done = len(list(parts.glob("batch-*.npy")))
    assert 3 <= done < batches and not out.exists()
    proxy.reset()

    resumed = run_client(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert proxy.posts == batches - done
    vectors = np.load(out)
    assert_hash_exact(vectors, corpus_lines)
    assert [json.loads(line) for line in (tmp_path / "vectors.ids.jsonl").read_text().splitlines()] == ids
    assert not parts.exists() and not (tmp_path / "vectors.npy.state.json").exists()


def test_openai_jsonl_to_jsonl_matches_sentence_transformers(server, corpus_lines, expected, tmp_path) -> None:
    corpus_lines = corpus_lines[:REAL_MODEL_LINES]
    source, out = tmp_path / "docs.jsonl", tmp_path / "vectors.jsonl"
    uids = [f"u{i}" for i in range(len(corpus_lines))]
    source.write_text("".join(json.dumps({"uid": u, "body": t, "n": i}) + "\n"
                              for i, (u, t) in enumerate(zip(uids, corpus_lines))), encoding="utf-8")
    done = run_client(str(source), str(out), "--url", server.url, "--route", "openai", "--text-field", "body",
                      "--id-field", "uid", "--batch-size", "40")
    assert done.returncode == 0, done.stderr
    ids, vectors = read_jsonl(out)
    assert ids == uids
    assert_exact(vectors, corpus_lines, expected)


@pytest.mark.parametrize("route", ["v1", "legacy"])
def test_python_api_embeds_in_order(server, corpus_lines, expected, route) -> None:
    texts = corpus_lines[:150] + [corpus_lines[0]]
    with ec.EmbeddingClient(server.url, TEST_KEY, route=route, model=MODEL_NAME, batch_size=32) as client:
        vectors = client.embed(texts)
        assert client.requests_sent == 5
    assert_exact(vectors, texts, expected)
    np.testing.assert_array_equal(vectors[0], vectors[-1])


def test_a_wrong_key_fails_at_once_with_the_servers_message(proxy, tmp_path) -> None:
    source = tmp_path / "in.txt"
    source.write_text("alpha\nbeta\n")
    failed = run_client(str(source), str(tmp_path / "out.jsonl"), "--url", proxy.url, key="not-the-key")
    assert failed.returncode == 1
    assert "403" in failed.stderr and "invalid" in failed.stderr.lower()
    assert proxy.posts == 1 and "not-the-key" not in failed.stderr
