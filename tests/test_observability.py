"""Request ids, access lines, log formats and the Prometheus series: the middleware on small apps,
then the real server's /metrics after known traffic."""
from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import sys
import uuid

import httpx
import pytest
import requests
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from auth_middleware import ApiKeyMiddleware
from conftest import start_server
from embedding_server.operations import observability
from embedding_server.operations.observability import (
    ACCESS_LOGGER_NAME,
    TEXT_FORMAT,
    JsonFormatter,
    ObservabilityMiddleware,
    configure_logging,
    observe_batch,
    observe_queue_wait,
)

KEY = "unit-key-5d1e"
SECRETS = ("secret-body-text-91", "secret-query-value-92", KEY, "wrong-key-93")
ACCESS_FIELDS = {"request_id", "method", "route", "status", "texts", "tokens", "duration_ms"}


def make_app() -> FastAPI:
    """A small app with the server's layering: the key check inside, observability outermost."""
    app = FastAPI()

    @app.post("/items/{item_id}")
    async def embed_item(item_id: str, request: Request) -> JSONResponse:
        body = await request.body()
        return JSONResponse({"item": item_id, "size": len(body)},
                            headers={"x-compute-texts": "2", "x-compute-tokens": "17", "x-truncated-texts": "1"})

    @app.get("/health")
    async def health() -> dict:
        return {"status": "healthy"}

    @app.post("/openai/v1/embeddings")
    async def openai_embeddings() -> dict:
        return {"object": "list"}

    @app.get("/boom")
    async def boom() -> dict:
        raise RuntimeError("a bug")

    app.add_middleware(ApiKeyMiddleware, keys=(KEY,))
    app.add_middleware(ObservabilityMiddleware)
    return app


def call(app, method: str, path: str, **kwargs) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
def access(caplog) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER_NAME)
    return caplog


def access_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == ACCESS_LOGGER_NAME]


def test_a_request_id_is_generated_returned_and_logged(access):
    response = call(make_app(), "GET", "/health")
    request_id = response.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    assert [r.access["request_id"] for r in access_lines(access)] == [request_id]
    assert call(make_app(), "GET", "/health").headers["x-request-id"] != request_id


def test_the_clients_request_id_is_kept(access):
    response = call(make_app(), "GET", "/health", headers={"X-Request-Id": "trace-42.abc_DEF"})
    assert response.headers.get_list("x-request-id") == ["trace-42.abc_DEF"]
    assert access_lines(access)[0].access["request_id"] == "trace-42.abc_DEF"


@pytest.mark.parametrize("bad", ["has space", "x" * 129, "caf\xe9".encode("latin-1"), "tab\there", ""])
def test_an_unsafe_request_id_is_replaced(access, bad):
    response = call(make_app(), "GET", "/health", headers={"X-Request-Id": bad})
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])
    assert access_lines(access)[0].access["request_id"] == response.headers["x-request-id"]


def test_one_access_line_per_request_with_its_fields(access):
    app = make_app()
    ok = call(app, "POST", "/items/abc", headers={"X-Api-Key": KEY}, content=b"{}")
    denied = call(app, "POST", "/items/xyz")
    health = call(app, "GET", "/health")
    lines = access_lines(access)
    assert [line.access["request_id"] for line in lines] == [r.headers["x-request-id"] for r in (ok, denied, health)]
    first, second, third = (line.access for line in lines)
    assert set(first) == ACCESS_FIELDS
    assert first | {"duration_ms": 0} == {"request_id": ok.headers["x-request-id"], "method": "POST",
                                          "route": "/items/{item_id}", "status": 200, "texts": 2, "tokens": 17,
                                          "duration_ms": 0}
    assert first["duration_ms"] > 0
    # refused before routing, yet named by its template, not its path
    assert (second["route"], second["status"], second["texts"], second["tokens"]) == ("/items/{item_id}", 401, None,
                                                                                      None)
    assert (third["route"], third["status"]) == ("/health", 200)


def test_the_count_precedes_the_last_byte_and_the_access_line_follows_it(access):
    """A scrape after the answer includes the request; the answer does not wait for its log line."""
    async def answer(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}", "more_body": False})

    def counted() -> float:
        return sample("embedding_requests_total", route="unmatched", method="PUT", status="200")

    before = counted()
    seen_at_last_byte = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        if message["type"] == "http.response.body":
            seen_at_last_byte.append((counted() - before, len(access_lines(access))))

    scope = {"type": "http", "method": "PUT", "path": "/raw", "headers": [], "query_string": b""}
    asyncio.run(observability.ObservabilityMiddleware(answer)(scope, receive, send))
    assert seen_at_last_byte == [(1.0, 0)]
    assert [line.access["route"] for line in access_lines(access)] == ["/raw"]


def test_an_unmatched_path_is_logged_by_path_and_counted_as_unmatched(access):
    before = sample("embedding_requests_total", route="unmatched", method="GET", status="401")
    call(make_app(), "GET", "/no/such/route/7")
    assert access_lines(access)[0].access["route"] == "/no/such/route/7"
    assert sample("embedding_requests_total", route="unmatched", method="GET", status="401") == before + 1


def test_the_log_holds_no_body_key_or_query(access):
    app = make_app()
    call(app, "POST", f"/items/a?api_key={SECRETS[1]}", headers={"X-Api-Key": KEY}, content=SECRETS[0].encode())
    call(app, "POST", f"/items/b?key={SECRETS[1]}", headers={"Authorization": f"Bearer {SECRETS[3]}"},
         content=SECRETS[0].encode())
    lines = access_lines(access)
    assert [line.access["status"] for line in lines] == [200, 403]
    text, as_json = logging.Formatter(TEXT_FORMAT), JsonFormatter()
    written = "\n".join(f.format(line) for line in lines for f in (text, as_json))
    assert "/items/{item_id}" in written
    for secret in SECRETS:
        assert secret not in written


def test_the_json_format_is_one_object_per_line_with_the_access_fields(access):
    call(make_app(), "POST", "/items/q", headers={"X-Api-Key": KEY}, content=b"x")
    line = JsonFormatter().format(access_lines(access)[0])
    assert "\n" not in line
    entry = json.loads(line)
    assert {"time", "level", "logger", "message"} | ACCESS_FIELDS <= set(entry)
    assert (entry["level"], entry["logger"], entry["route"], entry["tokens"]) == ("INFO", ACCESS_LOGGER_NAME,
                                                                                 "/items/{item_id}", 17)
    assert entry["time"].endswith("+00:00")
    try:
        raise ValueError("multi\nline")
    except ValueError:
        record = logging.getLogger("x").makeRecord("x", logging.ERROR, __file__, 1, "failed %s", ("here",),
                                                   exc_info=sys.exc_info())
    failed = json.loads(JsonFormatter().format(record))
    assert failed["message"] == "failed here" and "ValueError: multi\nline" in failed["exception"]


def test_an_unhandled_error_answers_500_with_the_request_id(access):
    response = call(make_app(), "GET", "/boom", headers={"X-Api-Key": KEY, "X-Request-Id": "boom-1"})
    assert response.status_code == 500
    assert response.headers["x-request-id"] == "boom-1"
    assert response.json() == {"error": "Internal server error", "request_id": "boom-1"}
    assert "a bug" not in response.text
    assert access_lines(access)[-1].access["status"] == 500


def test_rejections_are_counted_by_reason():
    app = make_app()
    reasons = ("auth_missing", "auth_invalid", "invalid_input")
    before = {reason: sample("embedding_rejections_total", reason=reason) for reason in reasons}
    call(app, "POST", "/items/a")
    call(app, "POST", "/items/a", headers={"X-Api-Key": ""})
    call(app, "POST", "/items/a", headers={"X-Api-Key": "wrong"})
    call(app, "POST", "/openai/v1/embeddings", headers={"Authorization": "Bearer wrong"})  # OpenAI's 401
    call(app, "POST", "/openai/v1/embeddings")
    call(app, "POST", "/items/a", headers={"X-Api-Key": KEY})  # accepted: no reason
    after = {reason: sample("embedding_rejections_total", reason=reason) for reason in reasons}
    assert {r: after[r] - before[r] for r in reasons} == {"auth_missing": 3, "auth_invalid": 2, "invalid_input": 0}


def test_rejection_reason_by_status():
    reason = observability.rejection_reason
    assert [reason(s, False) for s in (400, 401, 403, 404, 413, 422, 429, 500, 503)] == [
        "invalid_input", "auth_missing", "auth_invalid", None, "limits", "invalid_input", "overloaded", None,
        "unavailable"]
    assert reason(401, True) == "auth_invalid"


def test_cost_headers_are_counted_only_for_answers_that_carry_them():
    before = [sample(n) for n in ("embedding_texts_total", "embedding_tokens_total", "embedding_truncated_texts_total")]
    app = make_app()
    call(app, "POST", "/items/a", headers={"X-Api-Key": KEY})
    call(app, "POST", "/items/b", headers={"X-Api-Key": KEY})
    call(app, "GET", "/health")
    after = [sample(n) for n in ("embedding_texts_total", "embedding_tokens_total", "embedding_truncated_texts_total")]
    assert [a - b for a, b in zip(after, before)] == [4, 34, 2]


def test_batch_and_queue_observations_land_in_their_histograms():
    before = (sample("embedding_batch_texts_sum"), sample("embedding_batch_tokens_sum"),
              sample("embedding_batch_texts_count"), sample("embedding_queue_wait_seconds_count"))
    observe_batch(texts=5, tokens=80, seconds=0.02)
    observe_batch(texts=3, tokens=30, seconds=0.01)
    observe_queue_wait(0.004)
    after = (sample("embedding_batch_texts_sum"), sample("embedding_batch_tokens_sum"),
             sample("embedding_batch_texts_count"), sample("embedding_queue_wait_seconds_count"))
    assert [a - b for a, b in zip(after, before)] == [8, 110, 2, 1]


def test_other_scopes_pass_through_untouched():
    seen = []

    async def inner(scope, receive, send):
        seen.append(scope)

    scope = {"type": "lifespan"}
    asyncio.run(ObservabilityMiddleware(inner)(scope, None, None))
    assert seen == [{"type": "lifespan"}]


@pytest.fixture
def saved_logging():
    names = ["", "kserve", "kserve.trace", "uvicorn", "uvicorn.error", "uvicorn.access"]
    state = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).propagate, logging.getLogger(n).level)
             for n in names}
    yield
    for name, (handlers, propagate, level) in state.items():
        logger = logging.getLogger(name)
        logger.handlers, logger.propagate = handlers, propagate
        logger.setLevel(level)
    logging.captureWarnings(False)


@pytest.mark.parametrize("kserve_first", [True, False])
def test_configure_logging_wins_over_kserves_whatever_the_order(saved_logging, kserve_first):
    import kserve.logging

    for name in ("kserve", "kserve.trace", "uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers = []
    stream, earlier = io.StringIO(), io.StringIO()
    logging.getLogger().addHandler(logging.StreamHandler(earlier))  # what logging.basicConfig() leaves
    if kserve_first:
        kserve.logging.configure_logging()
    configure_logging("info", "json", stream=stream)
    if not kserve_first:
        kserve.logging.configure_logging()  # what ModelServer() does; skipped since "kserve" has a handler now
    logging.getLogger("kserve").info("from kserve")
    logging.getLogger("uvicorn.error").info("from uvicorn")
    logging.getLogger("kserve.trace").info("timing line, only at DEBUG")
    logging.getLogger("some.module").debug("below the level")
    assert not logging.getLogger("uvicorn.access").hasHandlers()  # uvicorn then writes no access line
    logging.getLogger("some.module").warning("once")
    assert earlier.getvalue() == ""  # replaced, so no line is written twice
    entries = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(e["logger"], e["message"]) for e in entries] == [
        ("kserve", "from kserve"), ("uvicorn.error", "from uvicorn"), ("some.module", "once")]
    configure_logging("DEBUG", "text", stream=stream)  # a second call replaces the handler, no duplicates
    logging.getLogger("kserve.trace").debug("timing")
    assert stream.getvalue().count("timing") == 1


# --- the real server ----------------------------------------------------------------------------------------------


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = requests.get(f"{url}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def delta(before: dict, after: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_metrics_add_up_after_known_traffic(server):
    url, key = server.url, server.key
    embed, openai = f"{url}/embedding", f"{url}/openai/v1/embeddings"
    predict = f"{url}/v1/models/all-MiniLM-L6-v2:predict"
    request_id = f"itest-{uuid.uuid4().hex}"
    fresh = request_id[-8:]  # texts the session's server has not seen: none is answered from its embedding cache
    long_text = f"{fresh} " + "many words " * 300  # over the model's 256 tokens: truncated
    before = scrape(url)
    ok = [
        requests.post(embed, json={"a": f"The cat sits. {fresh}", "b": long_text}, timeout=60,
                      headers={"X-Api-Key": key, "X-Request-Id": request_id}),
        requests.post(f"{embed}?api_key=query-secret-44", json={"instances": [f"one {fresh}", f"two {fresh}",
                                                                              f"three {fresh}"]},
                      headers={"X-Api-Key": key}, timeout=60),
        requests.post(predict, json={"instances": [f"a dog {fresh}"]}, headers={"X-Api-Key": key}, timeout=60),
        requests.post(openai, json={"input": [f"x {fresh}", f"y {fresh}"], "model": "all-MiniLM-L6-v2"},
                      headers={"Authorization": f"Bearer {key}"}, timeout=60),
    ]
    refused = [
        requests.post(embed, json={"a": "secret body 55"}, timeout=10),
        requests.post(embed, json={"a": "x"}, headers={"X-Api-Key": ""}, timeout=10),
        requests.post(embed, json={"a": "x"}, headers={"X-Api-Key": "wrong-66"}, timeout=10),
        requests.post(openai, json={"input": "x"}, headers={"Authorization": "Bearer wrong-77"}, timeout=10),
        requests.post(embed, data=b"{not json", headers={"X-Api-Key": key}, timeout=10),
        requests.post(embed, json={"a": 5}, headers={"X-Api-Key": key}, timeout=10),
    ]
    after = scrape(url)
    assert [r.status_code for r in ok] == [200] * 4
    assert [r.status_code for r in refused] == [401, 401, 403, 401, 400, 422]
    assert ok[0].headers["x-request-id"] == request_id
    assert all(re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"]) for r in ok[1:] + refused)

    counts = {("/embedding", "200"): 2, ("/embedding", "401"): 2, ("/embedding", "403"): 1,
              ("/embedding", "400"): 1, ("/embedding", "422"): 1, ("/v1/models/{model_name}:predict", "200"): 1,
              ("/openai/v1/embeddings", "200"): 1, ("/openai/v1/embeddings", "401"): 1}
    for (route, status), expected in counts.items():
        assert delta(before, after, "embedding_requests_total", route=route, method="POST", status=status) == expected
    assert delta(before, after, "embedding_request_duration_seconds_count", route="/embedding") == 7

    texts = sum(int(r.headers["x-compute-texts"]) for r in ok)
    tokens = sum(int(r.headers["x-compute-tokens"]) for r in ok)
    truncated = sum(int(r.headers["x-truncated-texts"]) for r in ok)
    assert (texts, truncated) == (8, 1)
    assert sum(int(r.headers["x-computed-texts"]) for r in ok) == texts
    assert delta(before, after, "embedding_texts_total") == texts
    assert delta(before, after, "embedding_tokens_total") == tokens
    assert delta(before, after, "embedding_truncated_texts_total") == truncated
    # the batcher's own view: every text and token of those answers went through a batch
    assert delta(before, after, "embedding_batch_texts_sum") == texts
    assert delta(before, after, "embedding_batch_tokens_sum") == tokens
    assert delta(before, after, "embedding_queue_wait_seconds_count") == len(ok)

    reasons = {"auth_missing": 2, "auth_invalid": 2, "invalid_input": 2, "limits": 0, "overloaded": 0}
    for reason, expected in reasons.items():
        assert delta(before, after, "embedding_rejections_total", reason=reason) == expected

    log = server.log()
    line = next(line for line in log.splitlines() if f"request_id={request_id}" in line)
    assert "route=/embedding status=200 texts=2 tokens=" in line
    for secret in ("query-secret-44", "secret body 55", "wrong-66", "wrong-77", key, "The cat sits."):
        assert secret not in log
    assert '"POST /embedding' not in log  # uvicorn's own access line is off


def test_json_logs_from_the_real_server(tmp_path, openvino_fp32):
    running = start_server(tmp_path, env={**openvino_fp32, "LOG_FORMAT": "json", "LOG_LEVEL": "INFO"})
    try:
        response = requests.post(f"{running.url}/embedding", json={"a": "hello"}, timeout=60,
                                 headers={"X-Api-Key": running.key, "X-Request-Id": "json-line-1"})
        assert response.status_code == 200
    finally:
        running.stop()
    entries = []
    for line in running.log().splitlines():
        if line.startswith("{"):
            entries.append(json.loads(line))
    access = [e for e in entries if e["logger"] == ACCESS_LOGGER_NAME and e["request_id"] == "json-line-1"]
    assert len(access) == 1
    assert (access[0]["route"], access[0]["status"], access[0]["texts"]) == ("/embedding", 200, 1)
    loggers = {e["logger"] for e in entries}
    assert {"kserve", "uvicorn.error", "__main__"} <= loggers  # KServe's, uvicorn's and ours: one format
    assert not re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} ", running.log(), re.MULTILINE)
