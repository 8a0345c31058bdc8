"""The API key: the middleware alone around a trivial app, then every route of the real server."""
from __future__ import annotations

import http.client
import json
import re

import grpc
import httpx
import pytest
import requests
from starlette.responses import PlainTextResponse

from auth_middleware import (
    KEY_INVALID,
    KEY_MISSING,
    KEY_OUTCOME,
    KEY_VALID,
    ApiKeyMiddleware,
    KeyChecker,
    is_public,
    presented_keys,
)
from conftest import MODEL_NAME, TEST_KEY, grpc_infer
from embedding_server.operations.errors import INVALID_KEY_BODY, MISSING_KEY_BODY, OPENAI_PATH_PREFIXES

KEYS = ("first-key", "second-key")


async def hello(scope, receive, send):
    await PlainTextResponse("reached")(scope, receive, send)


def call(method: str, path: str, headers: dict[str, str] | list[tuple[str, str]] | None = None) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=ApiKeyMiddleware(hello, keys=KEYS))
        async with httpx.AsyncClient(transport=transport) as client:
            return await client.request(method, httpx.URL("http://test" + path), headers=headers)

    import asyncio

    return asyncio.run(go())


@pytest.mark.parametrize("headers,status", [
    ({}, 401),
    ({"X-Api-Key": ""}, 401),
    ({"Authorization": "Bearer"}, 401),
    ({"Authorization": "Bearer "}, 401),
    ({"Authorization": "Basic Zmlyc3Qta2V5"}, 401),
    ({"X-Api-Key": "wrong"}, 403),
    ({"X-Api-Key": "first-key-and-more"}, 403),
    ({"X-Api-Key": "first-ke"}, 403),
    ({"X-Api-Key": "FIRST-KEY"}, 403),
    ({"Authorization": "Bearer wrong"}, 403),
    ({"X-Api-Key": "first-key"}, 200),
    ({"X-Api-Key": "second-key"}, 200),
    ({"Authorization": "Bearer first-key"}, 200),
    ({"Authorization": "bearer second-key"}, 200),
    ({"X-Api-Key": "wrong", "Authorization": "Bearer first-key"}, 403),
])
def test_protected_route(headers, status):
    response = call("POST", "/embedding", headers)
    assert response.status_code == status
    if status == 401:
        assert response.json() == MISSING_KEY_BODY
    elif status == 403:
        assert response.json() == INVALID_KEY_BODY
    else:
        assert response.text == "reached"


@pytest.mark.parametrize("method,path,public", [
    ("GET", "/health", True),
    ("HEAD", "/health", True),
    ("GET", "/api-key-info", True),
    ("GET", "/v2/health/ready", True),
    ("GET", f"/v1/models/{MODEL_NAME}", True),
    ("GET", f"/v2/models/{MODEL_NAME}/ready", True),
    ("POST", "/health", False),
    ("GET", "/health/", False),
    ("GET", "//health", False),
    ("GET", "/HEALTH", False),
    ("GET", f"/v1/models/{MODEL_NAME}:predict", False),
    ("POST", f"/v1/models/{MODEL_NAME}:predict", False),
    ("GET", f"/v2/models/{MODEL_NAME}", False),
    ("POST", "/embedding", False),
    ("OPTIONS", "/embedding", False),
    ("GET", "/anything-new", False),
])
def test_public_list_is_exact(method, path, public):
    assert is_public(method, path) is public
    assert call(method, path).status_code == (200 if public else 401)


# Empty and repeated key headers, one rule for HTTP and gRPC: a blank value counts as absent, and
# different keys in repeated headers are refused as a wrong key. "{key}" stands for a valid key.
EMPTY_AND_REPEATED = [
    ([("x-api-key", ""), ("authorization", "Bearer {key}")], 200),
    ([("x-api-key", "   "), ("authorization", "Bearer {key}")], 200),
    ([("x-api-key", ""), ("authorization", "Bearer wrong")], 403),
    ([("x-api-key", ""), ("authorization", "")], 401),
    ([("x-api-key", ""), ("x-api-key", "{key}")], 200),
    ([("x-api-key", "{key}"), ("x-api-key", "")], 200),
    ([("x-api-key", "{key}"), ("x-api-key", "{key}")], 200),
    ([("x-api-key", "{key}"), ("x-api-key", "wrong")], 403),
    ([("x-api-key", "wrong"), ("x-api-key", "{key}")], 403),
    ([("authorization", "Bearer {key}"), ("authorization", "Bearer wrong")], 403),
    ([("authorization", "Bearer wrong"), ("authorization", "Bearer {key}")], 403),
    ([("authorization", "Basic Zm9v"), ("authorization", "Bearer {key}")], 200),  # only bearer tokens are keys
    ([("x-api-key", "{key}"), ("authorization", "Bearer wrong")], 200),  # X-Api-Key first, as before
]


def with_key(headers: list[tuple[str, str]], key: str) -> list[tuple[str, str]]:
    return [(name, value.format(key=key)) for name, value in headers]


@pytest.mark.parametrize("headers,status", EMPTY_AND_REPEATED + [
    ([("x-api-key", "first-key"), ("x-api-key", "second-key")], 403),  # two valid keys: which one is meant?
    ([("x-api-key", "first-key, second-key")], 403),  # what a proxy that joins repeated headers sends
    ([("x-api-key", "first-key"), ("X-API-KEY", "wrong")], 403),
])
def test_empty_and_repeated_key_headers(headers, status):
    response = call("POST", "/embedding", with_key(headers, "first-key"))
    assert response.status_code == status
    expected = {200: None, 401: MISSING_KEY_BODY, 403: INVALID_KEY_BODY}[status]
    assert response.text == "reached" if expected is None else response.json() == expected
    openai = call("POST", "/v1/embeddings", with_key(headers, "second-key"))  # OpenAI's contract: 401 for both
    assert openai.status_code == min(status, 401)
    if status == 403:
        assert openai.json()["error"]["code"] == "invalid_api_key"


def test_presented_keys():
    assert presented_keys([" k "], []) == {"k"}
    assert presented_keys([], ["Bearer  k "]) == {"k"}
    assert presented_keys([""], ["Bearer k"]) == {"k"}
    assert presented_keys(["a", "b", "a"], []) == {"a", "b"}
    assert presented_keys([], ["Token k"]) == set()
    assert presented_keys([], []) == set()


def test_key_checker_needs_a_key():
    with pytest.raises(ValueError):
        KeyChecker(["", ""])
    assert KeyChecker(["a"]).check({"a"}) == KEY_VALID
    assert KeyChecker(["a", "b"]).check({"a", "b"}) == KEY_INVALID
    assert KeyChecker(["a"]).check(set()) == KEY_MISSING


@pytest.mark.parametrize("headers,outcome", [
    ({}, KEY_MISSING),
    ({"X-Api-Key": " "}, KEY_MISSING),
    ({"X-Api-Key": "wrong"}, KEY_INVALID),
    ({"Authorization": "Bearer wrong"}, KEY_INVALID),
    ({"X-Api-Key": "first-key"}, KEY_VALID),
])
def test_the_outcome_is_recorded_in_the_scope_once(headers, outcome):
    """The key check decides once; the access log reads its outcome from scope["state"]."""
    seen = {}

    async def app(scope, receive, send):
        seen.update(scope["state"])
        await PlainTextResponse("reached")(scope, receive, send)

    async def outermost(scope, receive, send):  # what the access log does: read the state after the answer
        await ApiKeyMiddleware(app, keys=KEYS)(scope, receive, send)
        seen["after"] = scope["state"][KEY_OUTCOME]

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=outermost)) as client:
            return await client.post("http://test/embedding", headers=headers)

    import asyncio

    response = asyncio.run(go())
    assert seen["after"] == outcome
    assert (response.status_code == 200) == (outcome == KEY_VALID)
    assert seen.get(KEY_OUTCOME) == (KEY_VALID if outcome == KEY_VALID else None)  # the route sees it when it runs


# --- The server's wiring (in-process, over the hash backend: what is tested is the key, not the model) -------------------------------------------------------------------------------------------

PROTECTED = [
    ("POST", "/embedding", {"id1": "Hello world"}),
    ("POST", f"/v1/models/{MODEL_NAME}:predict", {"instances": ["Hello world"]}),
    ("POST", f"/v2/models/{MODEL_NAME}/infer",
     {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["Hello world"]}]}),
    ("POST", "/openai/v1/embeddings", {"input": ["Hello world"], "model": MODEL_NAME}),
    ("POST", "/v1/embeddings", {"input": ["Hello world"], "model": MODEL_NAME}),
]


@pytest.mark.parametrize("method,path,body", PROTECTED)
@pytest.mark.parametrize("auth,status", [
    ({}, 401),
    ({"X-Api-Key": "wrong-key"}, 403),
    ({"X-Api-Key": TEST_KEY}, 200),
    ({"Authorization": f"Bearer {TEST_KEY}"}, 200),
])
def test_route_key_matrix(app_server, method, path, body, auth, status):
    response = requests.request(method, app_server.url + path, json=body, headers=auth, timeout=60)
    if path.startswith(OPENAI_PATH_PREFIXES):  # OpenAI's contract: 401 for a wrong key too, in its shape
        assert response.status_code == min(status, 401), response.text
        if status != 200:
            assert response.json()["error"]["code"] == ("missing_api_key" if status == 401 else "invalid_api_key")
    else:
        assert response.status_code == status, response.text
        if status == 401:
            assert response.json() == MISSING_KEY_BODY
        elif status == 403:
            assert response.json() == INVALID_KEY_BODY
    assert TEST_KEY not in response.text


@pytest.mark.parametrize("headers,status", EMPTY_AND_REPEATED)
def test_empty_and_repeated_key_headers_over_http(app_server, headers, status):
    connection = http.client.HTTPConnection("127.0.0.1", app_server.http_port, timeout=60)  # sends headers as given
    body = json.dumps({"instances": ["Hello world"]}).encode()
    connection.putrequest("POST", f"/v1/models/{MODEL_NAME}:predict")
    for name, value in [("content-type", "application/json"), *with_key(headers, TEST_KEY)]:
        connection.putheader(name, value)
    connection.putheader("content-length", str(len(body)))
    connection.endheaders(body)
    response = connection.getresponse()
    text = response.read().decode()
    connection.close()
    assert response.status == status, text
    if status == 200:
        assert len(json.loads(text)["predictions"][0]) == 384
    assert TEST_KEY not in text


GRPC_CODES = {200: grpc.StatusCode.OK, 401: grpc.StatusCode.UNAUTHENTICATED, 403: grpc.StatusCode.PERMISSION_DENIED}


@pytest.mark.parametrize("headers,status", EMPTY_AND_REPEATED)
def test_empty_and_repeated_key_metadata_over_grpc(app_server, headers, status):
    try:
        answer = grpc_infer(app_server, ["Hello world"], tuple(with_key(headers, TEST_KEY)))
        code, details = grpc.StatusCode.OK, ""
    except grpc.RpcError as error:
        answer, code, details = None, error.code(), error.details() or ""
    assert code == GRPC_CODES[status], details
    if answer is not None:
        assert answer.outputs[0].shape == [1, 384]
    assert TEST_KEY not in details


def application_routes(app) -> list[tuple[str, str]]:
    """Every (method, path template) the server's app holds (server.install_app's, KServe's included)."""
    def walk(routes, prefix=""):
        for route in routes:
            if hasattr(route, "original_router"):  # FastAPI's record of an included router
                yield from walk(route.original_router.routes, prefix + route.include_context.prefix)
            else:
                yield prefix + route.path, sorted(getattr(route, "methods", None) or ["GET"])

    return [(method, path) for path, methods in walk(app.routes) for method in methods]


def concrete(path: str) -> str:
    path = path.replace("{model_name}", MODEL_NAME).replace("{model_version}", "1")
    return re.sub(r"\{[^}]+\}", "x", path)


def test_every_route_outside_the_public_list_needs_a_key(app_server):
    routes = application_routes(app_server.app)
    paths = {path for _, path in routes}
    for expected in ("/embedding", "/v1/models/{model_name}:predict", "/v2/models/{model_name}/infer",
                     "/openai/v1/embeddings", "/v1/embeddings"):
        assert expected in paths
    checked = 0
    for method, template in routes:
        path = concrete(template)
        url = app_server.url + path
        anonymous = requests.request(method, url, timeout=60)
        if is_public(method, path):
            assert anonymous.status_code not in (401, 403), (method, template)
            continue
        wrong = requests.request(method, url, headers={"X-Api-Key": "wrong"}, timeout=60)
        wrong_status = 401 if path.startswith(OPENAI_PATH_PREFIXES) else 403  # OpenAI's contract
        assert (anonymous.status_code, wrong.status_code) == (401, wrong_status), (method, template)
        checked += 1
    assert checked >= 10
    assert requests.get(f"{app_server.url}/v1/models/{MODEL_NAME}", timeout=10).status_code == 200  # nothing unloaded


# --- CORS --------------------------------------------------------------------------------------------------------

def test_browser_preflight_succeeds_without_a_key(app_server):
    response = requests.options(f"{app_server.url}/embedding", timeout=10, headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, x-api-key"})
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "*"
    methods = {m.strip() for m in response.headers["access-control-allow-methods"].split(",")}
    assert {"OPTIONS", "POST", "GET"} <= methods
    allowed = {h.strip().lower() for h in response.headers["access-control-allow-headers"].split(",")}
    assert {"content-type", "x-api-key", "authorization"} <= allowed


def test_cors_headers_on_answers_and_on_auth_errors(app_server):
    origin = {"Origin": "https://app.example"}
    ok = requests.post(f"{app_server.url}/embedding", json={"a": "b"}, headers={**origin, "X-Api-Key": TEST_KEY},
                       timeout=30)
    denied = requests.post(f"{app_server.url}/embedding", json={"a": "b"}, headers=origin, timeout=30)
    assert (ok.status_code, denied.status_code) == (200, 401)
    assert ok.headers["access-control-allow-origin"] == "*"
    assert denied.headers["access-control-allow-origin"] == "*"


def test_options_without_preflight_headers_needs_a_key(app_server):
    assert requests.options(f"{app_server.url}/embedding", timeout=10).status_code == 401
