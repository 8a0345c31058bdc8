"""The legacy service's routes, as thin adapters over the same KServe data plane as V1."""
from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.responses import ORJSONResponse
from kserve.protocol.dataplane import DataPlane

from adapters import legacy_response, parse_json, parse_legacy
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
        result, _ = await dataplane.infer(model_name, {"instances": texts}, headers)
        return ORJSONResponse(legacy_response(ids, result["predictions"]))

    app.add_api_route("/health", health, methods=["GET"], tags=["Legacy"])
    app.add_api_route("/api-key-info", key_info, methods=["GET"], tags=["Legacy"])
    app.add_api_route("/embedding", embedding, methods=["POST"], tags=["Legacy"])
