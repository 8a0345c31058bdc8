"""Hostile and careless traffic: limits, odd text, backpressure, key variants, disconnects and SIGTERM."""
from __future__ import annotations

import http.client
import json
import signal
import threading
import time

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

import numpy as np
from kserve.protocol.infer_type import InferInput, InferRequest

from adapters import (check_limits, parse_legacy, parse_openai_embedding, parse_v2_rest, split_bytes_tensor,
                      texts_from_infer_request, texts_from_instances)
from adapters import OpenAIRequestError
from errors import BadRequest, TooLarge, Unprocessable
from conftest import MODEL_NAME, TEST_KEY, cosines, start_server
from settings import Limits

V1 = f"/v1/models/{MODEL_NAME}:predict"
EMBEDDING_ROUTES = ["/embedding", V1, "/openai/v1/embeddings"]


def body_for(route: str, texts: list[str]) -> dict:
    if route == "/embedding":
        return {f"id{i}": text for i, text in enumerate(texts)}
    if route == V1:
        return {"instances": texts}
    return {"input": texts, "model": MODEL_NAME}


# --- Pure pieces ---------------------------------------------------------------------------------------------

def test_check_limits_names_the_limit():
    limits = Limits(max_texts=2, max_chars=5)
    assert check_limits(["ab", "cde"], limits) == ["ab", "cde"]
    with pytest.raises(TooLarge, match="MAX_TEXTS_PER_REQUEST"):
        check_limits(["a", "b", "c"], limits)
    with pytest.raises(TooLarge, match="Text 1 .*MAX_CHARS_PER_TEXT"):
        check_limits(["a", "abcdef"], limits)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(json_values)
def test_adapters_take_any_json_or_refuse_it_cleanly(value):
    """Any JSON value: a list of strings, or one of our typed 4xx errors; never anything else."""
    for parse in (lambda v: parse_legacy(v)[1], texts_from_instances):
        try:
            texts = parse(value)
        except (BadRequest, Unprocessable):
            continue
        assert isinstance(texts, list) and all(isinstance(t, str) for t in texts)
    try:
        request = parse_openai_embedding(value, MODEL_NAME, 384)
    except OpenAIRequestError as exc:
        assert 400 <= exc.status < 500
    else:
        assert request.texts and all(isinstance(t, str) for t in request.texts)


def texts_or_refusal(body: bytes, header_length: str | None) -> list[str] | None:
    """What the V2 REST route makes of a body: its texts, or None for one of our typed 4xx errors."""
    try:
        return texts_from_infer_request(parse_v2_rest(body, header_length, MODEL_NAME))
    except (BadRequest, Unprocessable):
        return None


tensor_documents = st.fixed_dictionaries(
    {"inputs": st.lists(st.fixed_dictionaries(
        {"name": st.just("text") | st.text(max_size=4), "datatype": st.sampled_from(["BYTES", "FP32", "bytes"]),
         "shape": st.lists(st.integers(-2, 5), max_size=3)},
        optional={"data": json_values,
                  "parameters": st.fixed_dictionaries({}, optional={"binary_data_size": st.integers(-2, 40)})}),
        max_size=2)},
    optional={"outputs": json_values, "parameters": json_values, "id": json_values},
)
header_lengths = st.none() | st.integers(-5, 200).map(str) | st.text(max_size=6)


@settings(max_examples=400, deadline=None)
@given(tensor_documents | json_values, st.binary(max_size=40), header_lengths)
def test_v2_rest_takes_any_body_or_refuses_it_cleanly(document, tail, header_length):
    """Any V2-like JSON, binary part and Inference-Header-Content-Length: texts, or a typed 4xx, never a crash."""
    head = json.dumps(document).encode()
    for body, length in ((head, None), (head + tail, str(len(head))), (head + tail, header_length)):
        texts = texts_or_refusal(body, length)
        assert texts is None or (texts and all(isinstance(t, str) for t in texts))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_any_bytes_tensor_splits_or_is_refused(raw):
    try:
        elements = split_bytes_tensor(raw, "text")
    except BadRequest:
        return
    assert sum(4 + len(e) for e in elements) == len(raw)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=30), min_size=1, max_size=6), st.booleans(), st.booleans())
def test_v2_rest_reads_what_kserve_clients_write(texts, binary, column):
    """JSON or the binary extension, [n] or [n, 1], as KServe's InferRequest.to_rest writes it: the same texts."""
    shape = [len(texts), 1] if column else [len(texts)]
    tensor = InferInput("text", shape, "BYTES")
    tensor.set_data_from_numpy(np.array(texts, dtype=object).reshape(shape), binary_data=binary)
    body, json_length = InferRequest(model_name=MODEL_NAME, infer_inputs=[tensor]).to_rest()
    if json_length is None:
        body = json.dumps(body).encode()
    assert texts_or_refusal(body, None if json_length is None else str(json_length)) == texts


# --- A server with small limits and several keys ------------------------------------------------------------

@pytest.fixture(scope="module")
def hardened(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hardened")
    key_file = tmp / "keys"
    key_file.write_text("file-key\n")
    running = start_server(tmp, env={
        "BACKEND": "torch", "PRECISION": "fp32",
        "API_KEYS": "rotated-key,next-key", "API_KEY_FILE": str(key_file),
        "MAX_BODY_BYTES": "20000", "MAX_TEXTS_PER_REQUEST": "64", "MAX_CHARS_PER_TEXT": "5000",
        "MAX_QUEUED_TEXTS": "48",
    })
    yield running
    running.stop()


@pytest.mark.parametrize("key", [TEST_KEY, "rotated-key", "next-key", "file-key"])
def test_every_configured_key_works(hardened, key):
    response = requests.post(hardened.url + "/embedding", json={"a": "hi"}, headers={"X-Api-Key": key}, timeout=30)
    assert response.status_code == 200


@pytest.mark.parametrize("route", EMBEDDING_ROUTES)
def test_body_over_the_limit_is_413(hardened, route):
    response = requests.post(hardened.url + route, json=body_for(route, ["x" * 4000] * 6),
                             headers=hardened.headers(), timeout=30)
    assert response.status_code == 413
    assert "MAX_BODY_BYTES" in json.dumps(response.json())


def test_body_over_the_limit_without_content_length_is_413(hardened):
    def chunks():
        for _ in range(30):
            yield b" " * 1000
        yield b'{"a": "b"}'

    response = requests.post(hardened.url + "/embedding", data=chunks(), headers=hardened.headers(), timeout=30)
    assert response.status_code == 413


@pytest.mark.parametrize("route", EMBEDDING_ROUTES)
def test_too_many_texts_is_413(hardened, route):
    response = requests.post(hardened.url + route, json=body_for(route, ["a"] * 65), headers=hardened.headers(),
                             timeout=30)
    assert response.status_code == 413
    assert "MAX_TEXTS_PER_REQUEST" in json.dumps(response.json())


def test_too_long_a_text_is_413(hardened):
    response = requests.post(hardened.url + V1, json={"instances": ["ok", "y" * 5001]}, headers=hardened.headers(),
                             timeout=30)
    assert response.status_code == 413
    assert "Text 1" in response.json()["error"]


def test_large_client_batches_are_split_not_rejected(hardened, reference):
    texts = [f"sentence number {i} about {'cats' if i % 2 else 'markets'}" for i in range(64)]
    response = requests.post(hardened.url + V1, json={"instances": texts}, headers=hardened.headers(), timeout=60)
    assert response.status_code == 200
    assert cosines(response.json()["predictions"], reference(texts)).min() >= 0.99999


def test_overload_answers_429_with_retry_after_at_once(hardened):
    statuses: list[int] = []
    retry_after: list[str] = []

    def client():
        response = requests.post(hardened.url + V1, json={"instances": ["word " * 80] * 40},
                                 headers=hardened.headers(), timeout=120)
        statuses.append(response.status_code)
        if response.status_code == 429:
            retry_after.append(response.headers.get("Retry-After", ""))
            assert "error" in response.json()

    threads = [threading.Thread(target=client) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(set(statuses)) == [200, 429], statuses
    assert all(value.isdigit() and int(value) >= 1 for value in retry_after)
    assert requests.get(hardened.url + "/health", timeout=10).status_code == 200


UNICODE_TEXTS = [
    "emoji 🚀🔥👩‍👩‍👧‍👦 and flags 🇫🇷",
    "right to left: مرحبا بالعالم and שלום עולם",
    "zero\u200bwidth\u200djoiner\ufeff",
    "NUL \u0000 inside",
    "combining e\u0301 and \U0001d11e",
    "\u202eoverride\u202c",
]


@pytest.mark.parametrize("route", EMBEDDING_ROUTES)
def test_unicode_of_every_kind_is_embedded(server, route, reference):
    response = requests.post(server.url + route, data=json.dumps(body_for(route, UNICODE_TEXTS)),
                             headers=server.headers(), timeout=60)
    assert response.status_code == 200, response.text
    answer = response.json()
    if route == "/embedding":
        vectors = [json.loads(answer[f"id{i}"]) for i in range(len(UNICODE_TEXTS))]
    elif route == V1:
        vectors = answer["predictions"]
    else:
        vectors = [item["embedding"] for item in answer["data"]]
    assert cosines(vectors, reference(UNICODE_TEXTS)).min() >= 0.99999


@pytest.mark.parametrize("route", EMBEDDING_ROUTES)
@pytest.mark.parametrize("raw", [
    b'{"a": "\\ud800 lone high surrogate"}',
    b'{"a": "\\udfff lone low surrogate"}',
    b'{"a": "bad \xff\xfe utf-8"}',
    b'{"instances": ["\\ud83d"]}',
])
def test_broken_unicode_is_a_4xx_never_a_500(server, route, raw):
    if route == "/openai/v1/embeddings":
        raw = raw.replace(b'{"a": ', b'{"input": ').replace(b'{"instances": ', b'{"input": ')
    response = requests.post(server.url + route, data=raw, headers=server.headers(), timeout=30)
    assert response.status_code < 500, response.text
    if response.status_code != 200:
        assert response.json()


# --- Keys: no bypass by path, method or header variants -----------------------------------------------------

BYPASSES = [
    ("POST", "/embedding/", {}),
    ("POST", "//embedding", {}),
    ("POST", "/EMBEDDING", {}),
    ("POST", "/%65mbedding", {}),
    ("POST", f"/v1/models/{MODEL_NAME}%3Apredict", {}),
    ("POST", f"/v1/models/{MODEL_NAME}:predict/", {}),
    ("HEAD", "/embedding", {}),
    ("OPTIONS", "/embedding", {}),
    ("GET", "/embedding", {"X-HTTP-Method-Override": "POST"}),
    ("POST", "/embedding", {"X-HTTP-Method-Override": "GET"}),
    ("POST", "/health", {}),
    ("POST", "/embedding", {"Authorization": "Bearer "}),
    ("POST", "/embedding", {"Authorization": "Bearer"}),
    ("POST", f"/embedding?api_key={TEST_KEY}", {}),
    ("POST", f"/embedding?x-api-key={TEST_KEY}", {}),
]


@pytest.mark.parametrize("method,path,headers", BYPASSES)
def test_no_bypass(server, method, path, headers):
    response = requests.request(method, server.url + path, data=json.dumps({"a": "text"}),
                                headers={"Content-Type": "application/json", **headers}, timeout=30)
    assert response.status_code == 401, (response.status_code, response.text)
    if method != "HEAD":
        assert response.json()["error"] == "API key required"


def raw_post(server, path: str, headers: dict[str, str]) -> int:
    """http.client sends header values as given, whitespace included (requests refuses to)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    try:
        connection.request("POST", path, body=b'{"a": "x"}', headers={"Content-Type": "application/json", **headers})
        return connection.getresponse().status
    finally:
        connection.close()


@pytest.mark.parametrize("value,status", [
    (" ", 401),
    ("\t", 401),
    (f"  {TEST_KEY}\t", 200),  # HTTP strips whitespace around a header value: this is the valid key
    (f" {TEST_KEY}x ", 403),
    (f"{TEST_KEY[:-1]} {TEST_KEY[-1]}", 403),
])
def test_keys_with_whitespace(server, value, status):
    assert raw_post(server, "/embedding", {"X-Api-Key": value}) == status
    assert raw_post(server, "/embedding", {"Authorization": f"Bearer {value}"}) == status


def test_keys_are_never_logged_or_echoed(server):
    for headers in ({"X-Api-Key": TEST_KEY}, {"X-Api-Key": TEST_KEY + "-wrong"}, {"Authorization": f"Bearer {TEST_KEY}"}):
        response = requests.post(f"{server.url}/embedding?api_key={TEST_KEY}", json={"a": 1}, headers=headers,
                                 timeout=30)
        assert TEST_KEY not in response.text
    assert TEST_KEY not in server.log()


# --- Lifecycle: disconnects and SIGTERM -------------------------------------------------------------------------

def test_a_client_that_leaves_does_not_leave_its_work_behind(tmp_path):
    running = start_server(tmp_path, env={"BACKEND": "torch", "PRECISION": "fp32", "MAX_BATCH_TOKENS": "2048"})
    try:
        big = {"instances": [f"{i} " + "lorem ipsum dolor sit amet " * 40 for i in range(400)]}
        started = time.monotonic()
        full = requests.post(running.url + V1, json=big, headers=running.headers(), timeout=300)
        full_seconds = time.monotonic() - started
        assert full.status_code == 200
        with pytest.raises(requests.exceptions.ReadTimeout):
            requests.post(running.url + V1, json=big, headers=running.headers(), timeout=full_seconds / 10)
        started = time.monotonic()
        small = requests.post(running.url + V1, json={"instances": ["after"]}, headers=running.headers(), timeout=300)
        assert small.status_code == 200
        assert time.monotonic() - started < full_seconds / 2, "the abandoned request's texts were still computed"
        assert "Client left before its answer" in running.log()
    finally:
        running.stop()


def test_sigterm_finishes_accepted_requests_and_exits_0(tmp_path):
    running = start_server(tmp_path, env={"BACKEND": "torch", "PRECISION": "fp32", "GRACE_PERIOD": "25"})
    outcomes: list[object] = []
    stop_at: list[float] = []

    def client(n: int):
        while not stop_at or time.monotonic() < stop_at[0] + 5:
            try:
                response = requests.post(running.url + "/embedding",
                                         json={f"k{i}": f"client {n} text {i} " * 10 for i in range(16)},
                                         headers=running.headers(), timeout=60)
            except requests.ConnectionError:
                outcomes.append("refused")  # after SIGTERM the socket is closed: never accepted
                time.sleep(0.05)
                continue
            outcomes.append((response.status_code, time.monotonic()))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(3)
    stop_at.append(time.monotonic())
    running.process.send_signal(signal.SIGTERM)
    time.sleep(1)
    if running.process.poll() is None:  # still draining: new connections are no longer accepted
        with pytest.raises(requests.ConnectionError):
            requests.post(running.url + "/embedding", json={"late": "text"}, headers=running.headers(), timeout=30)
    returncode = running.process.wait(timeout=60)
    for thread in threads:
        thread.join(timeout=70)
    answered = [o for o in outcomes if o != "refused"]
    assert returncode == 0
    assert answered and all(status == 200 for status, _ in answered), answered
    assert any(at > stop_at[0] for _, at in answered), "requests in flight at SIGTERM were answered"
