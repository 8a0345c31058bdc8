"""Hostile and careless traffic: limits, odd text, backpressure, key variants, disconnects and SIGTERM."""
from __future__ import annotations

import http.client
import json
import logging
import signal
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st
from kserve.protocol.infer_type import InferInput, InferRequest

from conftest import (
    MODEL_NAME,
    TEST_KEY,
    InProcessServer,
    cosines,
    hash_vectors,
    read_until_closed,
    slow_hash_backend,
    start_server,
)
from embedding_server.operations.errors import BadRequest, TooLarge, Unprocessable
from embedding_server.operations.settings import Limits
from embedding_server.protocols.adapters import (
    OpenAIRequestError,
    check_limits,
    parse_legacy,
    parse_openai_embedding,
    parse_v2_rest,
    split_bytes_tensor,
    texts_from_infer_request,
    texts_from_instances,
)

SLACK_SECONDS = 15.0  # the machine is shared and noisy: bounds the issue sets are checked with this much slack

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

SLOW_TIMEOUT = 2.0  # HEADER_TIMEOUT and BODY_TIMEOUT of the hardened server
# The in-process servers below embed with HashBackend, slowed so that queues fill as the real model's do.
SECONDS_PER_TOKEN = 1e-4


@pytest.fixture(scope="module")
def hardened(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hardened")
    key_file = tmp / "keys"
    key_file.write_text("file-key\n")
    running = InProcessServer(backend_factory=slow_hash_backend(SECONDS_PER_TOKEN), env={
        "API_KEYS": "rotated-key,next-key", "API_KEY_FILE": str(key_file),
        "MAX_BODY_BYTES": "20000", "MAX_TEXTS_PER_REQUEST": "64", "MAX_CHARS_PER_TEXT": "5000",
        "MAX_QUEUED_TEXTS": "48", "HEADER_TIMEOUT": str(SLOW_TIMEOUT), "BODY_TIMEOUT": str(SLOW_TIMEOUT),
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


LARGE_BATCH = [f"sentence number {i} about {'cats' if i % 2 else 'markets'}" for i in range(64)]


def test_large_client_batches_are_split_not_rejected(hardened):
    """Under small limits (the real model's answer to this batch: the next test)."""
    response = requests.post(hardened.url + V1, json={"instances": LARGE_BATCH}, headers=hardened.headers(),
                             timeout=60)
    assert response.status_code == 200
    assert np.array_equal(np.asarray(response.json()["predictions"], dtype=np.float32), hash_vectors(LARGE_BATCH))


def test_a_large_client_batch_matches_sentence_transformers(server, reference):
    response = requests.post(server.url + V1, json={"instances": LARGE_BATCH}, headers=server.headers(), timeout=60)
    assert response.status_code == 200
    assert cosines(response.json()["predictions"], reference(LARGE_BATCH)).min() >= 0.99999


@pytest.mark.parametrize("route", [V1, "/openai/v1/embeddings"])
def test_overload_answers_429_with_retry_after_at_once(hardened, route):
    statuses: list[int] = []
    retry_after: list[str] = []
    bodies: list[dict] = []

    def client(n: int):
        texts = [f"{route} client {n} text {i} " + "word " * 80 for i in range(40)]  # none answered from the cache
        response = requests.post(hardened.url + route, json=body_for(route, texts), headers=hardened.headers(),
                                 timeout=120)
        statuses.append(response.status_code)
        if response.status_code == 429:
            retry_after.append(response.headers.get("Retry-After", ""))
            bodies.append(response.json())

    threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(set(statuses)) == [200, 429], statuses
    assert all(value.isdigit() and int(value) >= 1 for value in retry_after)
    for body in bodies:  # in the route's dialect: OpenAI's SDKs read a RateLimitError from theirs
        if route == V1:
            assert set(body) == {"error"} and "MAX_QUEUE" in body["error"]
        else:
            assert body["error"]["type"] == "rate_limit_error" and "MAX_QUEUE" in body["error"]["message"]
    assert requests.get(hardened.url + "/health", timeout=10).status_code == 200


def test_a_slow_header_client_is_closed_within_the_header_timeout(hardened):
    with socket.create_connection(("127.0.0.1", hardened.http_port)) as sock:
        sock.sendall(b"POST /embedding HTTP/1.1\r\nHost: x\r\nX-Api-Key: ")
        received = read_until_closed(sock, SLOW_TIMEOUT + SLACK_SECONDS)
    assert received.startswith(b"HTTP/1.1 408 "), received


def test_a_half_sent_body_is_dropped_within_the_body_timeout(hardened):
    with socket.create_connection(("127.0.0.1", hardened.http_port)) as sock:
        sock.sendall(f"POST /embedding HTTP/1.1\r\nHost: x\r\nX-Api-Key: {TEST_KEY}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"a\": ".encode())
        assert read_until_closed(sock, SLOW_TIMEOUT + SLACK_SECONDS) == b""
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
def test_broken_unicode_is_a_4xx_never_a_500(app_server, route, raw):
    if route == "/openai/v1/embeddings":
        raw = raw.replace(b'{"a": ', b'{"input": ').replace(b'{"instances": ', b'{"input": ')
    response = requests.post(app_server.url + route, data=raw, headers=app_server.headers(), timeout=30)
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
def test_no_bypass(app_server, method, path, headers):
    response = requests.request(method, app_server.url + path, data=json.dumps({"a": "text"}),
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
def test_keys_with_whitespace(app_server, value, status):
    assert raw_post(app_server, "/embedding", {"X-Api-Key": value}) == status
    assert raw_post(app_server, "/embedding", {"Authorization": f"Bearer {value}"}) == status


def test_keys_are_never_logged_or_echoed(server):
    for headers in ({"X-Api-Key": TEST_KEY}, {"X-Api-Key": TEST_KEY + "-wrong"}, {"Authorization": f"Bearer {TEST_KEY}"}):
        response = requests.post(f"{server.url}/embedding?api_key={TEST_KEY}", json={"a": 1}, headers=headers,
                                 timeout=30)
        assert TEST_KEY not in response.text
    assert TEST_KEY not in server.log()


# --- Overload is bounded in time, on every protocol ----------------------------------------------------------

QUEUE_BOUND = 5.0  # MAX_QUEUE_SECONDS of the bounded server
OVERLOAD_CLIENTS = 64
OVERLOAD_TEXTS = 64
SENTENCE = "the committee met on tuesday to discuss the budget for the coming year"


def overload_texts(client: int) -> list[str]:
    return [f"client {client} text {i}: {SENTENCE}" for i in range(OVERLOAD_TEXTS)]


def grpc_request(texts: list[str]):
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

    return pb.ModelInferRequest(model_name=MODEL_NAME, inputs=[pb.ModelInferRequest.InferInputTensor(
        name="text", datatype="BYTES", shape=[len(texts)],
        contents=pb.InferTensorContents(bytes_contents=[t.encode() for t in texts]))])


@pytest.fixture(scope="module")
def bounded():
    running = InProcessServer(backend_factory=slow_hash_backend(SECONDS_PER_TOKEN),
                              env={"MAX_QUEUE_SECONDS": str(QUEUE_BOUND)})
    for client in range(3):  # a measured rate, as a server that has served anything has
        response = requests.post(running.url + V1, json={"instances": overload_texts(client)},
                                 headers=running.headers(), timeout=120)
        assert response.status_code == 200
    yield running
    running.stop()


def report(protocol: str, outcomes: list[tuple[str, float]]) -> str:
    lines = [f"{protocol}: {len(outcomes)} requests of {OVERLOAD_TEXTS} texts, bound {QUEUE_BOUND:g}s"]
    for status in sorted({status for status, _ in outcomes}):
        waits = sorted(seconds for s, seconds in outcomes if s == status)
        lines.append(f"  {status}: {len(waits)}, wait min {waits[0]:.2f}s median {statistics.median(waits):.2f}s "
                     f"max {waits[-1]:.2f}s")
    return "\n".join(lines)


def test_http_overload_is_answered_or_refused_within_the_bound(bounded):
    """64 clients x 64 texts at once, each waiting twice the bound: a 200 or an immediate 429, never a timeout."""
    def client(n: int) -> tuple[str, float, requests.Response | None]:
        started = time.monotonic()
        try:
            response = requests.post(bounded.url + V1, json={"instances": overload_texts(n)},
                                     headers=bounded.headers(), timeout=2 * QUEUE_BOUND)
        except requests.Timeout:
            return "timeout", time.monotonic() - started, None
        return str(response.status_code), time.monotonic() - started, response

    with ThreadPoolExecutor(OVERLOAD_CLIENTS) as pool:
        results = list(pool.map(client, range(OVERLOAD_CLIENTS)))
    print("\n" + report("HTTP V1", [(status, seconds) for status, seconds, _ in results]))
    statuses = {status for status, _, _ in results}
    assert statuses <= {"200", "429"}, statuses
    assert statuses == {"200", "429"}, "so much work is more than the bound: some is refused, some served"
    for status, _, response in results:
        if status == "429":
            assert response.headers["Retry-After"].isdigit() and int(response.headers["Retry-After"]) >= 1
            assert "MAX_QUEUE_SECONDS" in response.json()["error"]
    # Each served answer is its own texts' (the real model's answers under concurrent load: test_batcher.py's
    # test_concurrent_requests_are_batched_and_routed_back_in_order).
    for n, (status, _, response) in enumerate(results):
        if status == "200":
            served = np.asarray(response.json()["predictions"], dtype=np.float32)
            assert np.array_equal(served, hash_vectors(overload_texts(n))), n


def test_grpc_overload_is_resource_exhausted_within_the_bound(bounded):
    import grpc
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

    def client(n: int) -> tuple[str, float, str | None]:
        started = time.monotonic()
        with grpc.insecure_channel(bounded.grpc_target) as channel:
            try:
                pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                    grpc_request(overload_texts(n)), metadata=(("x-api-key", TEST_KEY),), timeout=2 * QUEUE_BOUND)
            except grpc.RpcError as exc:
                retry = dict(exc.trailing_metadata() or ()).get("retry-after")
                return exc.code().name, time.monotonic() - started, retry
        return "OK", time.monotonic() - started, None

    with ThreadPoolExecutor(OVERLOAD_CLIENTS) as pool:
        results = list(pool.map(client, range(OVERLOAD_CLIENTS)))
    print("\n" + report("gRPC", [(status, seconds) for status, seconds, _ in results]))
    codes = {code for code, _, _ in results}
    assert codes == {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert all(retry.isdigit() and int(retry) >= 1 for code, _, retry in results if code == "RESOURCE_EXHAUSTED")


# --- Lifecycle: disconnects and SIGTERM -------------------------------------------------------------------------

def test_a_client_that_leaves_does_not_leave_its_work_behind(caplog):
    caplog.set_level(logging.INFO, logger="embedding_server.operations.limits")
    # The same texts are sent twice: with the embedding cache on, the second request would be answered from it.
    running = InProcessServer(backend_factory=slow_hash_backend(SECONDS_PER_TOKEN),
                              env={"MAX_BATCH_TOKENS": "2048", "EMBEDDING_CACHE_MB": "0"})
    try:
        big = {"instances": [f"{i} " + "lorem ipsum dolor sit amet " * 40 for i in range(160)]}  # ~3 s of batches
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
        assert "Client left before its answer" in caplog.text
    finally:
        running.stop()


SHUTDOWN_GRACE = 25  # GRACE_PERIOD of the server under SIGTERM (the default)
SHUTDOWN_QUEUE_BOUND = 5  # MAX_QUEUE_SECONDS there: the work in flight at SIGTERM fits in the drain, however slow


def test_sigterm_drains_http_and_grpc_then_exits_0_within_the_grace_period(tmp_path, openvino_fp32):
    import grpc
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

    # Any backend does for draining; OpenVINO starts fastest (from the run's export cache).
    running = start_server(tmp_path, env={**openvino_fp32, "GRACE_PERIOD": str(SHUTDOWN_GRACE),
                                          "MAX_QUEUE_SECONDS": str(SHUTDOWN_QUEUE_BOUND)})
    for _ in range(3):  # a measured rate, so that this load is admitted
        requests.post(running.url + V1, json={"instances": overload_texts(0)[:16]}, headers=running.headers(),
                      timeout=60)
    calls: list[tuple[str, float, float, str]] = []  # protocol, started, ended, outcome
    stop_at: list[float] = []

    def texts(n: int, i: int) -> list[str]:  # new texts in every call, so that none is answered from the cache
        return [f"client {n} call {i} text {j}: {SENTENCE} " * 3 for j in range(16)]

    def http_client(n: int) -> None:
        while not stop_at or time.monotonic() < stop_at[0] + 3:
            started = time.monotonic()
            try:
                response = requests.post(running.url + V1, json={"instances": texts(n, len(calls))},
                                         headers=running.headers(), timeout=60)
                outcome = str(response.status_code)
            except requests.ConnectionError:
                outcome = "refused"  # after SIGTERM the socket is closed: never accepted
                time.sleep(0.05)
            calls.append(("http", started, time.monotonic(), outcome))

    def grpc_client(n: int) -> None:
        with grpc.insecure_channel(running.grpc_target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while not stop_at or time.monotonic() < stop_at[0] + 3:
                started = time.monotonic()
                try:
                    stub.ModelInfer(grpc_request(texts(n, len(calls))), metadata=(("x-api-key", TEST_KEY),),
                                    timeout=60)
                    outcome = "OK"
                except grpc.RpcError as exc:
                    outcome = f"{exc.code().name} {exc.details()}"
                    time.sleep(0.05)
                calls.append(("grpc", started, time.monotonic(), outcome))

    threads = [threading.Thread(target=http_client, args=(n,)) for n in range(4)]
    threads += [threading.Thread(target=grpc_client, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(2)
    stop_at.append(time.monotonic())
    running.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    if running.process.poll() is None:  # still draining: new connections are no longer accepted
        with pytest.raises(requests.ConnectionError):
            requests.post(running.url + "/embedding", json={"late": "text"}, headers=running.headers(), timeout=30)
    returncode = running.process.wait(timeout=SHUTDOWN_GRACE + 60)
    exit_seconds = time.monotonic() - stop_at[0]
    for thread in threads:
        thread.join(timeout=90)
    in_flight = [c for c in calls if c[1] < stop_at[0] < c[2]]
    print(f"\nexit {exit_seconds:.1f}s after SIGTERM (GRACE_PERIOD {SHUTDOWN_GRACE}); in flight at SIGTERM: "
          + ", ".join(f"{p} {outcome.split()[0]} sent {started - stop_at[0]:.1f}s, answered {ended - stop_at[0]:.1f}s"
                     for p, started, ended, outcome in in_flight))
    assert returncode == 0
    assert exit_seconds <= SHUTDOWN_GRACE + 5, "the whole shutdown fits in GRACE_PERIOD (and a little slack)"
    # Every request is answered within a second of SIGTERM, so the drain ends then, not at its deadline: no
    # connection is left open (a client's kept-alive one, accepted as the shutdown began) until uvicorn gives up.
    assert "timeout graceful shutdown exceeded" not in running.log()
    assert "Drained and unloaded" in running.log(), "the last log line is written before the process ends"
    served = {"http": {"200", "429"}, "grpc": {"OK", "RESOURCE_EXHAUSTED"}}
    for protocol, started, _ended, outcome in calls:
        if started < stop_at[0] - 1:  # sent well before SIGTERM: accepted, so it is answered
            assert outcome.split()[0] in served[protocol], (protocol, outcome, started - stop_at[0])
        else:  # sent around or after SIGTERM: answered, or refused before it was accepted (gRPC cancels a call
            # that reached the server as it stopped but had not started)
            assert outcome.split()[0] in served[protocol] | {"refused", "UNAVAILABLE", "CANCELLED"}, (protocol, outcome)
            assert "Cancelling" not in outcome, (protocol, outcome)
    for protocol in ("http", "grpc"):
        assert any(p == protocol and outcome.split()[0] in served[protocol] for p, *_, outcome in in_flight), \
            f"{protocol} requests in flight at SIGTERM were answered"
