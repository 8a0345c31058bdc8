"""The OpenAPI document of the server and the Swagger UI page at /docs.

The handlers of routes.py read a raw Request, so FastAPI cannot see their bodies; the generated document
is completed here with request and response schemas, examples, error answers and the API-key schemes.
The docs are public: they describe the API and hold no data. Swagger UI's script, style and icon come from
the swagger-ui-bundle-v2 package and are served here too, so the page works where no CDN is reachable.
"""
from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, HTMLResponse
from kserve.errors import ModelNotFound, ModelNotReady
from swagger_ui_bundle import swagger_ui_path

from auth_middleware import DOCS_ASSETS, is_public
from embedding_server.operations.errors import (
    OPENAI,
    RETRY_AFTER_SECONDS,
    KeyRejected,
    Overloaded,
    dialect,
    error_response,
)
from embedding_server.operations.observability import COST_HEADERS
from embedding_server.operations.settings import Limits
from embedding_server.protocols.adapters import (
    BINARY,
    ENCODING_FORMATS,
    check_limits,
    parse_json,
    parse_openai_embedding,
    texts_from_instances,
)
from embedding_server.protocols.routes import V1_PREDICT_PATH

logger = logging.getLogger(__name__)

DOCS_PATH = "/docs"
OAUTH2_REDIRECT_PATH = "/docs/oauth2-redirect"
OPENAPI_PATH = "/openapi.json"
SWAGGER_JS, SWAGGER_CSS, SWAGGER_FAVICON = DOCS_ASSETS
# Swagger UI checks the document with swagger.io's online validator by default (a badge, in some layouts): off.
SWAGGER_UI_PARAMETERS = {"validatorUrl": None}
SECURITY = [{"ApiKeyAuth": []}, {"BearerAuth": []}]  # either one
_PATH_PARAM = re.compile(r"\{[^}]+\}")
# KServe routes for features this server does not serve (model versions, explainers): left out of the document.
UNSERVED = re.compile(r"/versions/|:explain$")
OVERLOADED_DESCRIPTION = ("The work already admitted would not be done within MAX_QUEUE_SECONDS (or more than "
                          "MAX_QUEUED_TEXTS texts are queued or running); retry after Retry-After seconds")
OVERLOADED_EXAMPLE = "the server would take about 14s to answer (MAX_QUEUE_SECONDS is 10); try again shortly"
EXAMPLE_VECTOR = [0.0123, -0.0456, 0.0789]  # the real ones have `dimension` numbers


def _ref(kind: str, name: str) -> dict[str, str]:
    return {"$ref": f"#/components/{kind}/{name}"}


def _json(schema: dict, examples: dict[str, tuple[str, Any]]) -> dict:
    return {"application/json": {
        "schema": schema,
        "examples": {key: {"summary": summary, "value": value} for key, (summary, value) in examples.items()},
    }}


def _schemas(model_name: str, dimension: int) -> dict[str, dict]:
    vector = {"type": "array", "items": {"type": "number"},
              "description": f"One embedding: {dimension} numbers of unit length"}
    return {
        "Error": {"type": "object", "required": ["error"], "properties": {
            "error": {"type": "string"}, "message": {"type": "string"}}},
        "OpenAIError": {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["message", "type"], "properties": {
                "message": {"type": "string"}, "type": {"type": "string"},
                "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}},
        "Health": {"type": "object", "required": ["status", "model"], "properties": {
            "status": {"type": "string", "enum": ["healthy", "unavailable"]}, "model": {"type": "string"}}},
        "ApiKeyInfo": {"type": "object", "required": ["message", "usage"], "properties": {
            "message": {"type": "string"},
            "usage": {"type": "object", "additionalProperties": {"type": "string"}},
            "api_key": {"type": "string", "description": "Only when the server runs with SHOW_API_KEY_INFO=true"}}},
        "LegacyIdMap": {"type": "object", "minProperties": 1, "additionalProperties": {"type": "string"},
                        "description": "Your IDs mapped to the texts to embed"},
        "Instances": {"type": "object", "required": ["instances"], "properties": {
            "instances": {"type": "array", "items": {"type": "string"}, "description": "The texts to embed"}}},
        "LegacyIdMapResponse": {"type": "object", "additionalProperties": {"type": "string"},
                                "description": f"Each ID mapped to its embedding written as a string: "
                                               f"str() of a list of {dimension} floats, as the original service did"},
        "Predictions": {"type": "object", "required": ["predictions"], "properties": {
            "predictions": {"type": "array", "items": vector, "description": "One embedding per text, in order"}}},
        "OpenAIEmbeddingRequest": {"type": "object", "required": ["input"], "properties": {
            "input": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}],
                      "description": "A text or a list of texts (token ids are not accepted)"},
            "model": {"type": "string", "default": model_name},
            "encoding_format": {"type": "string", "enum": list(ENCODING_FORMATS), "default": ENCODING_FORMATS[0]},
            "dimensions": {"type": "integer", "enum": [dimension]},
            "user": {"type": "string"}}},
        "OpenAIEmbeddingResponse": {"type": "object", "required": ["object", "data", "model", "usage"], "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": {"type": "object", "required": ["object", "index", "embedding"],
                                                "properties": {
                "object": {"const": "embedding"}, "index": {"type": "integer"},
                "embedding": {"oneOf": [vector, {"type": "string", "description": "base64 of little-endian float32"}]},
            }}},
            "model": {"type": "string"},
            "usage": {"type": "object", "properties": {
                "prompt_tokens": {"type": "integer"}, "total_tokens": {"type": "integer"}}}}},
        "OpenAIModelList": {"type": "object", "required": ["object", "data"], "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": {"type": "object", "properties": {
                "id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
                "owned_by": {"type": "string"}}}}}},
    }


PLAIN_PATH, OPENAI_PATH = "/embedding", "/openai/v1/embeddings"  # a route of each error dialect
RETRY_AFTER_HEADER = {"Retry-After": {"description": "Seconds to wait before retrying",
                                      "schema": {"type": "integer", "example": RETRY_AFTER_SECONDS}}}


def _raised(parse: Callable[[], object]) -> Exception:
    """The error a parser raises on a bad input: the document's error examples are the server's own answers."""
    try:
        parse()
    except Exception as error:
        return error
    raise ValueError(f"{parse} accepted the bad input meant to show its error")


def _error(description: str, path: str, examples: dict[str, tuple[str, Exception]]) -> dict:
    """An error answer documented with the bodies error_response writes for `examples` on the route at `path`."""
    answers = {key: (summary, error_response(error, path)) for key, (summary, error) in examples.items()}
    schema = _ref("schemas", "OpenAIError" if dialect(path) == OPENAI else "Error")
    response = {"description": description,
                "content": _json(schema, {key: (summary, json.loads(answer.body))
                                          for key, (summary, answer) in answers.items()})}
    if any("retry-after" in answer.headers for _, answer in answers.values()):
        response["headers"] = RETRY_AFTER_HEADER
    return response


def _responses(model_name: str, dimension: int) -> dict[str, dict]:
    limits = Limits()
    too_many = _raised(lambda: check_limits([""] * (limits.max_texts + 1), limits))
    overloaded = Overloaded(OVERLOADED_EXAMPLE, RETRY_AFTER_SECONDS)
    unavailable = "The model is not loaded yet"
    limit = "The body, the number of texts or one text is above the server's limit"
    missing, wrong = KeyRejected(missing=True), KeyRejected(missing=False)
    return {
        "MissingKey": _error("No API key: send X-Api-Key or Authorization: Bearer", PLAIN_PATH,
                             {"missing": ("No key", missing)}),
        "WrongKey": _error("The API key is not valid", PLAIN_PATH, {"wrong": ("Wrong key", wrong)}),
        "OpenAIUnauthorized": _error("No API key, or a wrong one (OpenAI's shape, for its SDKs)", OPENAI_PATH,
                                     {"missing": ("No key", missing), "wrong": ("Wrong key", wrong)}),
        "BadRequest": _error("The body is not JSON, or holds no text", PLAIN_PATH,
                             {"error": ("Empty body", _raised(lambda: parse_json(b"")))}),
        "Unprocessable": _error("JSON of the wrong shape; the message names the key or index", PLAIN_PATH, {
            "error": ("Not a string", _raised(lambda: texts_from_instances({"instances": ["a", 1]})))}),
        "TooLarge": _error(limit, PLAIN_PATH, {"error": ("Too many texts", too_many)}),
        "Overloaded": _error(OVERLOADED_DESCRIPTION, PLAIN_PATH, {"error": ("Overloaded", overloaded)}),
        "Unavailable": _error(unavailable, PLAIN_PATH, {"error": ("Loading", ModelNotReady(model_name))}),
        "ModelNotFound": _error("No model of that name is served", PLAIN_PATH,
                                {"error": ("Unknown model", ModelNotFound("other"))}),
        "OpenAIBadRequest": _error("A body OpenAI's API would refuse; `param` names the field", OPENAI_PATH, {
            "input": ("No input", _raised(lambda: parse_openai_embedding({"model": model_name}, model_name,
                                                                        dimension)))}),
        "OpenAIModelNotFound": _error("Another model was asked for", OPENAI_PATH, {
            "model": ("Unknown model", _raised(lambda: parse_openai_embedding(
                {"input": "x", "model": "text-embedding-3-small"}, model_name, dimension)))}),
        "OpenAITooLarge": _error(limit, OPENAI_PATH, {"limit": ("Too many texts", too_many)}),
        "OpenAIOverloaded": _error(OVERLOADED_DESCRIPTION, OPENAI_PATH, {"busy": ("Overloaded", overloaded)}),
        "OpenAIUnavailable": _error(unavailable, OPENAI_PATH, {"loading": ("Loading", ModelNotReady(model_name))}),
    }


def _cost_headers() -> dict[str, dict]:
    return {name: {"description": text, "schema": {"type": "string"}} for name, text in COST_HEADERS.items()}


def _embedding_errors(openai: bool) -> dict[str, dict]:
    if openai:  # the OpenAI routes answer every error in OpenAI's shape
        return {"400": _ref("responses", "OpenAIBadRequest"), "404": _ref("responses", "OpenAIModelNotFound"),
                "413": _ref("responses", "OpenAITooLarge"), "429": _ref("responses", "OpenAIOverloaded"),
                "503": _ref("responses", "OpenAIUnavailable")}
    return {"400": _ref("responses", "BadRequest"), "422": _ref("responses", "Unprocessable"),
            "413": _ref("responses", "TooLarge"), "429": _ref("responses", "Overloaded"),
            "503": _ref("responses", "Unavailable")}


def _operations(model_name: str, dimension: int) -> dict[tuple[str, str], dict]:
    """What FastAPI cannot infer, per (path, method): merged into the generated operations."""
    texts = ["The cat sits on the mat.", "A dog plays in the garden."]
    predictions = {"predictions": [EXAMPLE_VECTOR, EXAMPLE_VECTOR]}
    legacy_body = {
        "required": True,
        "content": _json({"oneOf": [_ref("schemas", "LegacyIdMap"), _ref("schemas", "Instances")]}, {
            "ids": ("IDs mapped to texts", {"doc1": texts[0], "doc2": texts[1]}),
            "instances": ("A list of texts", {"instances": texts}),
        }),
    }
    legacy_answer = {"description": "The embeddings, in the form the request used", "headers": _cost_headers(),
                     "content": _json({"oneOf": [_ref("schemas", "LegacyIdMapResponse"),
                                                 _ref("schemas", "Predictions")]}, {
                         "ids": ("For the ID form", {"doc1": str(EXAMPLE_VECTOR), "doc2": str(EXAMPLE_VECTOR)}),
                         "instances": ("For the instances form", predictions),
                     })}
    openai_embeddings = {
        "summary": "Create embeddings (OpenAI-compatible)",
        "description": "OpenAI's embeddings API: point an OpenAI SDK's base_url at /openai/v1 (or /v1).",
        "requestBody": {"required": True, "content": _json(_ref("schemas", "OpenAIEmbeddingRequest"), {
            "one": ("One text", {"input": texts[0], "model": model_name}),
            "many": ("Several texts", {"input": texts, "model": model_name}),
            "base64": ("Base64 answer", {"input": texts[0], "model": model_name, "encoding_format": "base64"}),
        })},
        "responses": {
            "200": {"description": "One embedding per input, in order", "headers": _cost_headers(),
                    "content": _json(_ref("schemas", "OpenAIEmbeddingResponse"), {"float": ("Floats", {
                        "object": "list",
                        "data": [{"object": "embedding", "index": 0, "embedding": EXAMPLE_VECTOR}],
                        "model": model_name, "usage": {"prompt_tokens": 9, "total_tokens": 9}})})},
            **_embedding_errors(openai=True),
        },
    }
    infer_example = {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": texts}]}
    infer_answer = {"model_name": model_name, "id": "", "outputs": [
        {"name": "embedding", "shape": [2, dimension], "datatype": "FP32", "data": EXAMPLE_VECTOR + EXAMPLE_VECTOR}]}
    return {
        ("/health", "get"): {
            "summary": "Is the model loaded?",
            "responses": {
                "200": {"description": "Ready", "content": _json(_ref("schemas", "Health"), {
                    "healthy": ("Ready", {"status": "healthy", "model": model_name})})},
                "503": {"description": "Still loading", "content": _json(_ref("schemas", "Health"), {
                    "loading": ("Loading", {"status": "unavailable", "model": model_name})})},
            },
        },
        ("/api-key-info", "get"): {
            "summary": "How to send the API key",
            "responses": {"200": {"description": "Where the key goes", "content": _json(_ref("schemas", "ApiKeyInfo"), {
                "info": ("Key hidden", {"message": "API key authentication is enabled", "usage": {
                    "header_name": "X-Api-Key", "alternative": "Authorization: Bearer <key>"}})})}},
        },
        ("/embedding", "post"): {
            "summary": "Embed texts (the original service's API)",
            "description": "Send `{\"id\": \"text\", ...}` to get `{\"id\": \"[floats]\"}` (embeddings as strings), "
                           "or `{\"instances\": [...]}` to get `{\"predictions\": [[floats], ...]}`.",
            "requestBody": legacy_body,
            "responses": {"200": legacy_answer, **_embedding_errors(openai=False)},
        },
        ("/openai/v1/embeddings", "post"): openai_embeddings,
        ("/v1/embeddings", "post"): openai_embeddings,
        ("/openai/v1/models", "get"): {
            "summary": "List models (OpenAI-compatible)",
            "responses": {"200": {"description": "The served model",
                                  "content": _json(_ref("schemas", "OpenAIModelList"), {
                "list": ("One model", {"object": "list", "data": [
                    {"id": model_name, "object": "model", "created": 0, "owned_by": "kserve"}]})})}},
        },
        (V1_PREDICT_PATH, "post"): {
            "summary": "Embed texts (KServe V1)",
            "requestBody": {"required": True, "content": _json(_ref("schemas", "Instances"), {
                "instances": ("A list of texts", {"instances": texts})})},
            "responses": {"200": {"description": "One embedding per text, in order", "headers": _cost_headers(),
                                  "content": _json(_ref("schemas", "Predictions"), {
                                      "predictions": ("Embeddings", predictions)})},
                          **_embedding_errors(openai=False)},
        },
        ("/v2/models/{model_name}/infer", "post"): {
            "summary": "Embed texts (Open Inference Protocol V2)",
            "description": "JSON (with or without a Content-Type), or the binary tensor extension: the first "
                           "`Inference-Header-Content-Length` bytes are the JSON header, each input with "
                           "`parameters.binary_data_size` takes its bytes from what follows (BYTES: each element a "
                           "4-byte little-endian length, then the UTF-8 text). Ask for a binary answer with "
                           "`parameters.binary_data_output` or an output's `parameters.binary_data`.",
            "requestBody": {"content": {"application/json": {"examples": {
                "texts": {"summary": "A BYTES tensor of texts", "value": infer_example}}},
                BINARY: {"schema": {"type": "string", "format": "binary"}}}},
            "responses": {"200": {"description": f"An FP32 tensor [n, {dimension}], row-major",
                                  "headers": _cost_headers(),
                                  "content": {"application/json": {"examples": {
                                      "embeddings": {"summary": "Embeddings", "value": infer_answer}}},
                                      BINARY: {"schema": {"type": "string", "format": "binary"}}}},
                          **_embedding_errors(openai=False)},
        },
    }


def _merge(target: dict, patch: dict) -> None:
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict) and "$ref" not in value:
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


def _is_public(method: str, path: str) -> bool:
    return is_public(method.upper(), _PATH_PARAM.sub("x", path))


def build_openapi(app: FastAPI, model_name: str, dimension: int) -> dict[str, Any]:
    document = get_openapi(
        title=f"{model_name} embedding server",
        version=app.version,
        openapi_version=app.openapi_version,
        summary=f"Sentence embeddings of {model_name}: {dimension} numbers per text",
        description=(
            "Embeddings through the original service's `/embedding`, KServe V1 and V2 (Open Inference Protocol), "
            "and OpenAI's embeddings API.\n\n"
            "**API key**: every route that embeds needs `X-Api-Key: <key>` or `Authorization: Bearer <key>` "
            "(use *Authorize*). Health, readiness, metrics and these docs are public.\n\n"
            "Every answer carries `X-Request-Id` (yours if you sent one, else a new one) to find it in the logs."
        ),
        routes=app.routes,
        tags=[{"name": "Legacy", "description": "The original service's routes"},
              {"name": "OpenAI", "description": "OpenAI-compatible embeddings"},
              {"name": "V1", "description": "KServe V1 protocol"},
              {"name": "V2", "description": "Open Inference Protocol (KServe V2)"}],
        servers=app.servers or None,
    )
    components = document.setdefault("components", {})
    components.setdefault("schemas", {}).update(_schemas(model_name, dimension))
    components.setdefault("responses", {}).update(_responses(model_name, dimension))
    if "HTTPValidationError" in components["schemas"]:  # FastAPI's own 422 for KServe's typed bodies
        components["responses"]["Unprocessable"]["content"]["application/json"]["schema"] = {
            "anyOf": [_ref("schemas", "Error"), _ref("schemas", "HTTPValidationError")]}
    components["securitySchemes"] = {
        "ApiKeyAuth": {"type": "apiKey", "in": "header", "name": "X-Api-Key",
                       "description": "The server's API key (env API_KEY, API_KEYS or API_KEY_FILE)"},
        "BearerAuth": {"type": "http", "scheme": "bearer", "description": "The same key as a bearer token"},
    }
    patches = _operations(model_name, dimension)
    paths = document.get("paths", {})
    for path in [p for p in paths if UNSERVED.search(p)]:
        del paths[path]
    for path, operations in paths.items():
        for method, operation in operations.items():
            _merge(operation, patches.get((path, method), {}))
            # KServe declares a model_version it does not implement (it answers 501): not offered here.
            operation["parameters"] = [p for p in operation.get("parameters", []) if p.get("name") != "model_version"]
            if not operation["parameters"]:
                del operation["parameters"]
            if "{model_name}" in path:
                operation["responses"].setdefault("404", _ref("responses", "ModelNotFound"))
            if path == "/metrics":
                operation["responses"]["200"] = {"description": "Prometheus' text exposition format",
                                                 "content": {"text/plain": {"schema": {"type": "string"}}}}
            if _is_public(method, path):
                operation["security"] = []
                continue
            operation["security"] = copy.deepcopy(SECURITY)
            if dialect(path) == OPENAI:
                operation["responses"].setdefault("401", _ref("responses", "OpenAIUnauthorized"))
            else:
                operation["responses"].setdefault("401", _ref("responses", "MissingKey"))
                operation["responses"].setdefault("403", _ref("responses", "WrongKey"))
    return document


def install_api_docs(app: FastAPI, model_name: str, dimension: int) -> None:
    """Serve the completed OpenAPI document at /openapi.json and Swagger UI at /docs.

    The document is built on its first request, after KServe has added its V1/V2 routes at start.
    """

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app, model_name, dimension)
        return app.openapi_schema

    app.openapi = openapi
    if app.openapi_url is None:
        app.openapi_url = OPENAPI_PATH

        async def openapi_json() -> dict[str, Any]:
            return app.openapi()

        app.add_api_route(OPENAPI_PATH, openapi_json, methods=["GET"], include_in_schema=False)
    # KServe's --enable_docs_url adds FastAPI's own page, which loads Swagger UI from a CDN: ours replaces it.
    app.router.routes[:] = [route for route in app.router.routes
                            if getattr(route, "path", None) not in (DOCS_PATH, OAUTH2_REDIRECT_PATH)]

    async def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(openapi_url=root + app.openapi_url, title=f"{model_name} embedding server",
                                   oauth2_redirect_url=root + OAUTH2_REDIRECT_PATH,
                                   swagger_js_url=f"{root}{DOCS_PATH}/{SWAGGER_JS}",
                                   swagger_css_url=f"{root}{DOCS_PATH}/{SWAGGER_CSS}",
                                   swagger_favicon_url=f"{root}{DOCS_PATH}/{SWAGGER_FAVICON}",
                                   swagger_ui_parameters=SWAGGER_UI_PARAMETERS)

    async def oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    app.add_api_route(DOCS_PATH, docs, methods=["GET"], include_in_schema=False)
    app.add_api_route(OAUTH2_REDIRECT_PATH, oauth2_redirect, methods=["GET"], include_in_schema=False)
    for name in DOCS_ASSETS:
        app.add_api_route(f"{DOCS_PATH}/{name}", _asset(name), methods=["GET"], include_in_schema=False)


def _asset(name: str) -> Callable[[], Awaitable[FileResponse]]:
    """A handler that serves one of Swagger UI's files from the installed package."""
    path = swagger_ui_path / name
    if not path.is_file():
        raise FileNotFoundError(f"Swagger UI's {name} is missing from the swagger-ui-bundle-v2 package at {path}")

    async def asset() -> FileResponse:
        return FileResponse(str(path))

    return asset
