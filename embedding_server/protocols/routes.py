"""Our HTTP routes (the legacy service's, OpenAI's embeddings, V2 inference), as thin adapters over KServe's
data plane.

The routes a client calls for every embedding (and the readiness probe) are served by plain Starlette routes at
the head of the router, with FastAPI routes of the same handlers kept for the API document only: FastAPI's own
dispatch (its nested router matching, an exit stack and dependency solving for handlers that read the raw request
anyway) cost 100-130 us of a one-text request's ~450 us of event-loop time (bench/README.md, "Where a one-text
request's time goes"). KServe's V1 predict is served so too, by KServe's own handler.
"""
from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus

from fastapi import FastAPI, Request, Response
from fastapi.responses import ORJSONResponse
from kserve.constants.constants import INFERENCE_CONTENT_LENGTH_HEADER
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.rest.v1_endpoints import V1Endpoints
from kserve.protocol.rest.v2_datamodels import InferenceResponse
from kserve.protocol.rest.v2_endpoints import V2Endpoints
from starlette.routing import Route

from embedding_server.operations.settings import Settings
from embedding_server.protocols.adapters import (
    BINARY,
    COMPUTE_TOKENS,
    legacy_response,
    openai_embedding_response,
    parse_json,
    parse_legacy,
    parse_openai_embedding,
    parse_v2_rest,
)

logger = logging.getLogger(__name__)

API_KEY_INFO_BODY = {
    "message": "API key authentication is enabled",
    "usage": {
        "header_name": "X-Api-Key",
        "alternative": "Authorization: Bearer <key>",
        "note": "Set SHOW_API_KEY_INFO=true environment variable to display the actual key",
    },
}


def api_key_info(settings: Settings) -> dict:
    if not settings.show_api_key_info:
        return API_KEY_INFO_BODY
    return {**API_KEY_INFO_BODY, "api_key": settings.api_keys[0]}


def add_direct_route(app: FastAPI, path: str, endpoint: Callable[[Request], Awaitable[Response]], method: str,
                     tags: list[str] | None = None) -> None:
    """``endpoint(request)`` answers ``method`` on ``path`` ahead of every other route; with ``tags``, a FastAPI
    route of the same handler puts it in the API document (it is never matched: the direct route comes first)."""
    app.router.routes.insert(0, Route(path, endpoint, methods=[method]))
    if tags is not None:
        app.add_api_route(path, endpoint, methods=[method], tags=tags)


def register_legacy_routes(app: FastAPI, dataplane: DataPlane, model_name: str, settings: Settings) -> None:
    async def health(request: Request) -> ORJSONResponse:  # the request: a direct route passes it
        ready = await dataplane.model_ready(model_name)
        if ready:
            return ORJSONResponse({"status": "healthy", "model": model_name})
        return ORJSONResponse({"status": "unavailable", "model": model_name},
                              status_code=HTTPStatus.SERVICE_UNAVAILABLE)

    async def key_info() -> ORJSONResponse:
        return ORJSONResponse(api_key_info(settings))

    async def embedding(request: Request) -> ORJSONResponse:
        """Legacy: {"id": "text", ...} -> {"id": "[floats]"}, or {"instances": [...]} -> {"predictions": [...]}."""
        ids, texts = parse_legacy(parse_json(await request.body()))
        headers = dict(request.headers.items())
        result, cost = await dataplane.infer(model_name, {"instances": texts}, headers)
        return ORJSONResponse(legacy_response(ids, result["predictions"]), headers=cost)

    add_direct_route(app, "/health", health, "GET", tags=["Legacy"])
    app.add_api_route("/api-key-info", key_info, methods=["GET"], tags=["Legacy"])
    add_direct_route(app, "/embedding", embedding, "POST", tags=["Legacy"])


V1_PREDICT_PATH = "/v1/models/{model_name}:predict"


def register_v1_predict_route(app: FastAPI, dataplane: DataPlane) -> None:
    """KServe's own V1 predict handler, served directly; KServe's route of it stays in the API document."""
    endpoints = V1Endpoints(dataplane)

    async def predict(request: Request) -> Response:
        return await endpoints.predict(request.path_params["model_name"], request)

    add_direct_route(app, V1_PREDICT_PATH, predict, "POST")


V2_INFER_PATHS = ("/v2/models/{model_name}/infer", "/v2/models/{model_name}/versions/{model_version}/infer")


def register_v2_infer_routes(app: FastAPI, dataplane: DataPlane) -> None:
    """V2 inference with the body parsed by adapters.parse_v2_rest, then KServe's own handler.

    KServe 0.21.0 lets FastAPI parse the body: a body without Content-Type (tritonclient's JSON mode) is bytes it
    refuses for a missing binary header, and NaN, a lone surrogate or a bad binary part end in a 500. Registered
    before KServe adds its routes at start, these answer the same paths; KServe's stay in the API document.
    """
    endpoints = V2Endpoints(dataplane)

    async def infer(request: Request, response: Response, model_name: str,
                    model_version: str | None = None) -> InferenceResponse | Response:
        infer_request = parse_v2_rest(await request.body(), request.headers.get(INFERENCE_CONTENT_LENGTH_HEADER),
                                      model_name)
        answer = await endpoints.infer(request, response, model_name, infer_request, model_version)
        if isinstance(answer, Response):  # KServe answers a binary output with no media type
            answer.headers["content-type"] = BINARY
        return answer

    for path in V2_INFER_PATHS:
        app.add_api_route(path, infer, methods=["POST"], response_model=None, include_in_schema=False, tags=["V2"])


OPENAI_PREFIX = "/openai/v1"  # KServe's prefix for OpenAI routes


def register_openai_routes(app: FastAPI, dataplane: DataPlane, model_name: str, dimension: int) -> None:
    """OpenAI's embeddings API over the same data plane: what the openai SDKs, LangChain and LlamaIndex call."""

    async def create_embedding(request: Request) -> ORJSONResponse:
        """Errors are raised: the error handlers answer them in OpenAI's shape on these paths."""
        parsed = parse_openai_embedding(parse_json(await request.body()), model_name, dimension)
        result, cost = await dataplane.infer(model_name, {"instances": parsed.texts}, dict(request.headers.items()))
        answer = openai_embedding_response(parsed, result["predictions"], int(cost[COMPUTE_TOKENS]))
        return ORJSONResponse(answer, headers=cost)

    async def list_models() -> ORJSONResponse:
        return ORJSONResponse({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": 0, "owned_by": "kserve"}]})

    add_direct_route(app, f"{OPENAI_PREFIX}/embeddings", create_embedding, "POST", tags=["OpenAI"])
    app.add_api_route(f"{OPENAI_PREFIX}/models", list_models, methods=["GET"], tags=["OpenAI"])
    # For clients whose base URL ends in /v1. GET /v1/models stays KServe V1's model list.
    add_direct_route(app, "/v1/embeddings", create_embedding, "POST", tags=["OpenAI"])
