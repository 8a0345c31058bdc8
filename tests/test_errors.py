"""One mapping from errors to answers: every kind in both dialects, and on an app built as the server builds its
own (our routes, middleware and handlers over the serving data plane) with small scripted models."""
from __future__ import annotations

import asyncio

import grpc
import httpx
import pytest
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from kserve import Model
from kserve import errors as kserve_errors
from kserve.errors import InferenceError, InvalidInput, ModelNotFound, ModelNotReady, ServerNotLive, ServerNotReady
from kserve.model_repository import ModelRepository
from starlette.exceptions import HTTPException

from auth_middleware import ApiKeyMiddleware
from embedding_server.operations.errors import (
    INVALID_KEY_BODY,
    MISSING_KEY_BODY,
    OPENAI,
    PLAIN,
    BadRequest,
    Disabled,
    InternalError,
    KeyRejected,
    OpenAIRequestError,
    Overloaded,
    ReplicaUnavailable,
    TooLarge,
    Unprocessable,
    dialect,
    error_response,
    grpc_status,
    register_error_handlers,
)
from embedding_server.operations.limits import BodyGuardMiddleware
from embedding_server.operations.observability import ObservabilityMiddleware
from embedding_server.operations.settings import Settings
from embedding_server.protocols.routes import register_legacy_routes, register_openai_routes, register_v2_infer_routes
from embedding_server.server import ServingDataPlane

MODEL = "scripted"
KEY = "errors-key-4b1"
PATHS = {PLAIN: "/embedding", OPENAI: "/openai/v1/embeddings"}


def openai_error(message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# (error, plain status and body, OpenAI status and body): the bodies the README and the seed's contract name.
KINDS = [
    (BadRequest("empty"), 400, {"error": "empty"}, 400, openai_error("empty")),
    (Unprocessable("'a' must be a string"), 422, {"error": "'a' must be a string"}, 422,
     openai_error("'a' must be a string")),
    (TooLarge("too big"), 413, {"error": "too big"}, 413, openai_error("too big")),
    (InvalidInput("kserve's own"), 400, {"error": "kserve's own"}, 400, openai_error("kserve's own")),
    (KeyRejected(missing=True), 401, MISSING_KEY_BODY, 401,
     openai_error(MISSING_KEY_BODY["message"], code="missing_api_key")),
    (KeyRejected(missing=False), 403, INVALID_KEY_BODY, 401,
     openai_error(INVALID_KEY_BODY["message"], code="invalid_api_key")),
    (OpenAIRequestError("no such model", param="model", status=404, code="model_not_found"), 404,
     {"error": "no such model"}, 404, openai_error("no such model", param="model", code="model_not_found")),
    (ModelNotFound("other"), 404, {"error": "Model with name other does not exist."}, 404,
     openai_error("Model with name other does not exist.", code="model_not_found")),
    (ModelNotReady(MODEL), 503, {"error": f"Model with name {MODEL} is not ready."}, 503,
     openai_error(f"Model with name {MODEL} is not ready.", "server_error")),
    (ServerNotReady("no replica"), 503, {"error": "Server is not ready. no replica"}, 503,
     openai_error("Server is not ready. no replica", "server_error")),
    (ServerNotLive(), 503, {"error": "Server is not live."}, 503, openai_error("Server is not live.", "server_error")),
    (NotImplementedError("versions"), 501, {"error": "versions"}, 501, openai_error("versions", "server_error")),
    (Disabled("off"), 404, {"error": "off"}, 404, openai_error("off")),
    (HTTPException(405, "Method Not Allowed"), 405, {"error": "Method Not Allowed"}, 405,
     openai_error("Method Not Allowed")),
    (InferenceError("backend failed"), 500, {"error": "backend failed"}, 500,
     openai_error("backend failed", "server_error")),
    (InternalError("req-9"), 500, {"error": "Internal server error", "request_id": "req-9"}, 500,
     openai_error("Internal server error (request id req-9)", "server_error")),
    (RuntimeError("a secret detail"), 500, {"error": "Internal server error"}, 500,
     openai_error("Internal server error", "server_error")),
]


@pytest.mark.parametrize("error,plain_status,plain_body,openai_status,openai_body", KINDS,
                         ids=[type(kind[0]).__name__ + str(i) for i, kind in enumerate(KINDS)])
def test_every_kind_in_both_dialects(error, plain_status, plain_body, openai_status, openai_body):
    plain = error_response(error, PATHS[PLAIN])
    assert (plain.status_code, plain.body) == (plain_status, error_response(error, "/v1/models/m:predict").body)
    assert httpx.Response(plain.status_code, content=plain.body).json() == plain_body
    for path in (PATHS[OPENAI], "/v1/embeddings"):
        openai = error_response(error, path)
        assert openai.status_code == openai_status
        assert httpx.Response(openai.status_code, content=openai.body).json() == openai_body


def test_overload_carries_retry_after_in_both_dialects():
    for path in PATHS.values():
        response = error_response(Overloaded("busy", retry_after=7), path)
        assert response.status_code == 429 and response.headers["retry-after"] == "7"
    assert error_response(Overloaded("busy"), PATHS[OPENAI]).body == \
        error_response(Overloaded("busy"), "/openai/v1/models").body
    assert httpx.Response(429, content=error_response(Overloaded("busy"), PATHS[OPENAI]).body).json() == \
        openai_error("busy", "rate_limit_error")


def test_fastapis_validation_error_names_where_never_the_value():
    error = RequestValidationError([{"loc": ("body", "inputs", 0), "msg": "Input should be a valid list",
                                     "input": "secret-value"}])
    response = error_response(error, "/v2/models/m/infer")
    assert response.status_code == 422
    assert httpx.Response(422, content=response.body).json() == {"error": "body.inputs.0: Input should be a valid list"}


def test_the_dialect_is_decided_by_path():
    assert [dialect(p) for p in ("/openai/v1/embeddings", "/openai/v1/models", "/v1/embeddings", "/embedding",
                                 "/v1/models/m:predict", "/v2/models/m/infer", "/", "")] == [
        OPENAI, OPENAI, OPENAI, PLAIN, PLAIN, PLAIN, PLAIN, PLAIN]


def test_grpc_statuses():
    assert grpc_status(Overloaded("busy", 4)) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", (("retry-after", "4"),))
    assert grpc_status(ModelNotReady(MODEL))[0] == grpc.StatusCode.UNAVAILABLE
    assert grpc_status(KeyRejected(missing=True))[:2] == (grpc.StatusCode.UNAUTHENTICATED,
                                                          MISSING_KEY_BODY["message"])
    assert grpc_status(KeyRejected(missing=False))[0] == grpc.StatusCode.PERMISSION_DENIED
    assert grpc_status(Disabled("off"))[0] == grpc.StatusCode.UNIMPLEMENTED
    assert grpc_status(BadRequest("x")) is None  # KServe's own mapping: INVALID_ARGUMENT


def test_replica_unavailable_is_503_in_both_dialects():
    error = ReplicaUnavailable("no replica answered within 5s")
    assert error_response(error, PATHS[PLAIN]).status_code == 503
    openai = error_response(error, PATHS[OPENAI])
    assert openai.status_code == 503
    assert httpx.Response(503, content=openai.body).json()["error"]["message"] == str(error)
    assert grpc_status(error)[0] == grpc.StatusCode.UNAVAILABLE


# --- on an app built as the server builds its own -----------------------------------------------------------------


class Scripted(Model):
    """A model that fails every request with `failure`: the errors travel the real data plane and routes."""

    def __init__(self, failure: Exception | None, ready: bool = True):
        super().__init__(MODEL)
        self.failure = failure
        self.ready = ready

    async def predict(self, payload, headers=None):
        raise self.failure


def build_app(model: Model) -> FastAPI:
    repository = ModelRepository()
    repository.update(model)
    dataplane = ServingDataPlane(repository, MODEL)
    app = FastAPI()
    settings = Settings.from_env({"API_KEY": KEY, "MODEL_PATH": "/unused", "MAX_BODY_BYTES": "2048"})
    register_legacy_routes(app, dataplane, MODEL, settings)
    register_openai_routes(app, dataplane, MODEL, 2)
    register_v2_infer_routes(app, dataplane)
    # What KServe's RESTServer.create_application registers (the plain shape only), before ours, as the server does.
    for cls, handler in ((InvalidInput, kserve_errors.invalid_input_handler),
                         (ModelNotReady, kserve_errors.model_not_ready_handler),
                         (ServerNotReady, kserve_errors.server_not_ready_handler)):
        app.add_exception_handler(cls, handler)
    register_error_handlers(app)
    app.add_middleware(BodyGuardMiddleware, max_body_bytes=settings.limits.max_body_bytes)
    app.add_middleware(ApiKeyMiddleware, keys=settings.api_keys)
    app.add_middleware(ObservabilityMiddleware)
    return app


def post(app: FastAPI, path: str, **kwargs) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.post(path, **kwargs)

    return asyncio.run(go())


BODIES = {"/embedding": {"a": "text"}, "/openai/v1/embeddings": {"input": "text", "model": MODEL},
          "/v1/embeddings": {"input": ["text"]},
          f"/v2/models/{MODEL}/infer": {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES",
                                                     "data": ["text"]}]}}
KEYED = {"X-Api-Key": KEY}


def assert_shape(response: httpx.Response, path: str, status: int, message: str) -> None:
    assert response.status_code == status, (path, response.text)
    if dialect(path) == OPENAI:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}, path
        assert response.json()["error"]["message"] == message
    else:
        assert response.json() == {"error": message}, path


@pytest.mark.parametrize("path", BODIES)
def test_a_model_that_is_not_ready_is_503_in_the_routes_dialect(path):
    app = build_app(Scripted(None, ready=False))
    assert_shape(post(app, path, json=BODIES[path], headers=KEYED), path, 503, f"Model with name {MODEL} is not ready.")
    if dialect(path) == OPENAI:
        assert post(app, path, json=BODIES[path], headers=KEYED).json()["error"]["type"] == "server_error"


@pytest.mark.parametrize("path", BODIES)
def test_overload_is_429_with_retry_after_in_the_routes_dialect(path):
    response = post(build_app(Scripted(Overloaded("queue full", retry_after=3))), path, json=BODIES[path],
                    headers=KEYED)
    assert_shape(response, path, 429, "queue full")
    assert response.headers["retry-after"] == "3"
    if dialect(path) == OPENAI:
        assert response.json()["error"]["type"] == "rate_limit_error"


@pytest.mark.parametrize("path", BODIES)
def test_a_replica_that_is_unavailable_is_503_in_the_routes_dialect(path):
    failure = ReplicaUnavailable("no replica answered within 5s")
    response = post(build_app(Scripted(failure)), path, json=BODIES[path], headers=KEYED)
    assert_shape(response, path, 503, str(failure))


@pytest.mark.parametrize("path", BODIES)
def test_a_bug_is_500_with_the_request_id_in_the_routes_dialect(path):
    response = post(build_app(Scripted(KeyError("secret-detail"))), path, json=BODIES[path],
                    headers={**KEYED, "X-Request-Id": "bug-1"})
    assert response.status_code == 500 and "secret-detail" not in response.text
    assert response.headers["x-request-id"] == "bug-1"
    if dialect(path) == OPENAI:
        assert response.json()["error"]["message"] == "Internal server error (request id bug-1)"
    else:
        assert response.json() == {"error": "Internal server error", "request_id": "bug-1"}


@pytest.mark.parametrize("path", BODIES)
def test_the_middlewares_answer_in_the_routes_dialect(path):
    app = build_app(Scripted(None))
    missing, wrong = post(app, path, json=BODIES[path]), post(app, path, json=BODIES[path], headers={"X-Api-Key": "x"})
    large = post(app, path, content=b"x" * 4096, headers=KEYED)
    assert large.status_code == 413 and large.headers["connection"] == "close"
    if dialect(path) == OPENAI:
        assert (missing.status_code, wrong.status_code) == (401, 401)
        assert [r.json()["error"]["code"] for r in (missing, wrong)] == ["missing_api_key", "invalid_api_key"]
        assert large.json()["error"]["message"].endswith("(MAX_BODY_BYTES)")
    else:
        assert (missing.status_code, missing.json()) == (401, MISSING_KEY_BODY)
        assert (wrong.status_code, wrong.json()) == (403, INVALID_KEY_BODY)
        assert large.json()["error"].endswith("(MAX_BODY_BYTES)")


def test_bad_bodies_and_unknown_paths_on_openai_routes_answer_in_openais_shape():
    app = build_app(Scripted(None))
    empty = post(app, "/openai/v1/embeddings", content=b"", headers=KEYED)
    assert empty.status_code == 400 and empty.json()["error"]["message"] == "The request body is empty; send a JSON object"
    unknown = post(app, "/openai/v1/nothing-here", json={}, headers=KEYED)
    assert unknown.status_code == 404 and unknown.json()["error"]["message"] == "Not Found"
    assert post(app, "/nothing-here", json={}, headers=KEYED).json() == {"error": "Not Found"}

