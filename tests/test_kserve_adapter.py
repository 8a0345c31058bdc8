"""What kserve_adapter relies on in KServe: a KServe upgrade that changes any of it fails here, by name."""
from __future__ import annotations

import asyncio
import inspect
from importlib import metadata

import httpx
import pytest
from fastapi import FastAPI
from kserve import ModelServer
from kserve.errors import NoModelReady
from kserve.model_repository import ModelRepository
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.rest.server import RESTServer

from embedding_server import kserve_adapter
from model import EmbeddingModel


def test_written_against_the_installed_kserve():
    assert metadata.version("kserve") == kserve_adapter.KSERVE_VERSION, (
        "KServe was upgraded: check embedding_server/kserve_adapter.py against its source, then bump KSERVE_VERSION")


@pytest.mark.parametrize(("owner", "name"), [(owner, name) for owner, names in kserve_adapter.PRIVATE_METHODS.items()
                                             for name in names])
def test_the_private_methods_used_are_there_with_their_arguments(owner, name):
    method = getattr(owner, name, None)
    assert callable(method), f"{owner.__name__}.{name} is gone"
    expected = ["self", "models"] if owner is ModelServer else ["self", "app"]
    assert list(inspect.signature(method).parameters) == expected, f"{owner.__name__}.{name} changed its arguments"


def test_rest_server_takes_what_the_adapter_passes():
    parameters = inspect.signature(RESTServer.__init__).parameters
    for name in ("app", "data_plane", "model_repository_extension", "http_port", "access_log_format",
                 "grace_period", "event_loop", "timeout_keep_alive"):
        assert name in parameters, f"RESTServer() no longer takes {name}"


def test_model_server_has_the_fields_the_server_reads():
    server = ModelServer(enable_grpc=False)
    for name in ("servers", "registered_models", "dataplane", "grace_period", "access_log_format", "event_loop",
                 "timeout_keep_alive", "max_threads", "enable_grpc", "http_port", "grpc_port", "enable_latency_logging"):
        assert hasattr(server, name), f"ModelServer has no {name} any more"
    assert callable(server.setup_event_loop)
    assert isinstance(server.servers, list)


def test_kserves_app_is_a_fastapi_app():
    assert isinstance(kserve_adapter.kserve_app(), FastAPI)


def test_install_kserve_rest_puts_kserves_routes_and_handlers_on_a_fresh_app():
    app = FastAPI()
    kserve_adapter.install_kserve_rest(app, DataPlane(model_registry=ModelRepository()))

    async def calls():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return (await client.get("/v2/health/live"), await client.get("/"),
                    await client.post("/v1/models/nothing:predict", json={"instances": ["x"]}))

    live, root, unknown = asyncio.run(calls())
    assert live.status_code == 200 and live.json() == {"live": True}
    assert root.status_code == 200
    assert unknown.status_code == 404 and "nothing" in unknown.json()["error"]  # KServe's ModelNotFound handler


def test_uvicorn_config_serves_the_app_object_on_all_interfaces():
    app = FastAPI()
    config = kserve_adapter.uvicorn_config(app, DataPlane(model_registry=ModelRepository()), port=1234, grace_period=7,
                                           event_loop="auto", timeout_keep_alive=5)
    assert config.app is app and config.port == 1234 and config.host == "0.0.0.0"
    assert config.timeout_graceful_shutdown == 7 and config.timeout_keep_alive == 5


def test_register_models_registers_ready_models_and_refuses_none_ready(model_path):
    server = ModelServer(enable_grpc=False)
    model = EmbeddingModel("m", model_path)
    with pytest.raises(NoModelReady):
        kserve_adapter.register_models(server, [model])
    model.ready = True
    assert kserve_adapter.register_models(server, [model]) == []  # no model engines
    assert server.registered_models.get_model("m") is model
