"""The legacy service's routes, as thin adapters over the same KServe data plane as V1."""
from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.responses import ORJSONResponse
from kserve.protocol.dataplane import DataPlane

from adapters import (COMPUTE_TOKENS, OpenAIRequestError, legacy_response, openai_embedding_response,
                      openai_error_body, parse_json, parse_legacy, parse_openai_embedding)
from batcher import Overloaded
from errors import BadRequest, TooLarge, Unprocessable
from settings import Settings

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


def register_legacy_routes(app: FastAPI, dataplane: DataPlane, model_name: str, settings: Settings) -> None:
    async def health() -> ORJSONResponse:
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

    app.add_api_route("/health", health, methods=["GET"], tags=["Legacy"])
    app.add_api_route("/api-key-info", key_info, methods=["GET"], tags=["Legacy"])
    app.add_api_route("/embedding", embedding, methods=["POST"], tags=["Legacy"])


OPENAI_PREFIX = "/openai/v1"  # KServe's prefix for OpenAI routes


def register_openai_routes(app: FastAPI, dataplane: DataPlane, model_name: str, dimension: int) -> None:
    """OpenAI's embeddings API over the same data plane: what the openai SDKs, LangChain and LlamaIndex call."""

    async def create_embedding(request: Request) -> ORJSONResponse:
        headers: dict[str, str] = {}
        try:
            try:
                parsed = parse_openai_embedding(parse_json(await request.body()), model_name, dimension)
                result, cost = await dataplane.infer(model_name, {"instances": parsed.texts},
                                                     dict(request.headers.items()))
            except (BadRequest, Unprocessable, TooLarge) as exc:
                raise OpenAIRequestError(exc.reason, status=exc.status) from None
            except Overloaded as exc:
                headers["Retry-After"] = str(exc.retry_after)
                raise OpenAIRequestError(str(exc), status=429, type_="rate_limit_error") from None
        except OpenAIRequestError as exc:
            return ORJSONResponse(openai_error_body(exc), status_code=exc.status, headers=headers)
        answer = openai_embedding_response(parsed, result["predictions"], int(cost[COMPUTE_TOKENS]))
        return ORJSONResponse(answer, headers=cost)

    async def list_models() -> ORJSONResponse:
        return ORJSONResponse({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": 0, "owned_by": "kserve"}]})

    app.add_api_route(f"{OPENAI_PREFIX}/embeddings", create_embedding, methods=["POST"], tags=["OpenAI"])
    app.add_api_route(f"{OPENAI_PREFIX}/models", list_models, methods=["GET"], tags=["OpenAI"])
    # For clients whose base URL ends in /v1. GET /v1/models stays KServe V1's model list.
    app.add_api_route("/v1/embeddings", create_embedding, methods=["POST"], tags=["OpenAI"])
