"""The legacy routes on their own: health must not say healthy before the model is ready."""
from __future__ import annotations

import asyncio

import httpx
from fastapi import FastAPI
from kserve.model_repository import ModelRepository
from kserve.protocol.dataplane import DataPlane

from embedding_server.operations.settings import Settings
from embedding_server.protocols.routes import API_KEY_INFO_BODY, register_legacy_routes
from model import EmbeddingModel


def get(app: FastAPI, path: str) -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.get(path)

    return asyncio.run(go())


def make_app(model: EmbeddingModel, **env: str) -> FastAPI:
    repository = ModelRepository()
    repository.update(model)
    app = FastAPI()
    register_legacy_routes(app, DataPlane(model_registry=repository), model.name,
                           Settings.from_env({"API_KEY": "the-key", **env}))
    return app


def test_health_is_503_until_the_model_is_ready(model_path):
    model = EmbeddingModel("all-MiniLM-L6-v2", model_path)
    app = make_app(model)
    loading = get(app, "/health")
    assert loading.status_code == 503 and loading.json()["status"] != "healthy"
    model.ready = True  # what load() sets last
    assert get(app, "/health").json() == {"status": "healthy", "model": "all-MiniLM-L6-v2"}


def test_key_info_shows_the_key_only_when_asked(model_path):
    model = EmbeddingModel("m", model_path)
    assert get(make_app(model), "/api-key-info").json() == API_KEY_INFO_BODY
    shown = get(make_app(model, SHOW_API_KEY_INFO="true"), "/api-key-info").json()
    assert shown == {**API_KEY_INFO_BODY, "api_key": "the-key"}
