"""The one module that reaches into KServe's internals; written against kserve 0.21.0 (KSERVE_VERSION).

KServe builds its REST application in `RESTServer.create_application`, on the module-global FastAPI app that its
ModelServer serves by import string, and registers models in a private method of ModelServer. The server here
installs its own routes on any FastAPI app (server.install_app) and runs uvicorn and gRPC itself, so from KServe
it needs only the pieces below. tests/test_kserve_adapter.py fails when an upgrade renames or reshapes any of them;
check this module against the new KServe's source then, and bump KSERVE_VERSION.
"""
from __future__ import annotations

from importlib import metadata

from fastapi import FastAPI
from fastapi.responses import ORJSONResponse
from kserve import Model, ModelServer
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.model_repository_extension import ModelRepositoryExtension
from kserve.protocol.rest.server import RESTServer
from uvicorn import Config

KSERVE_VERSION = "0.21.0"

# What this module uses of KServe that KServe does not document as public, by owner: tests check each name.
PRIVATE_METHODS = {
    RESTServer: ("_add_middlewares", "_register_endpoints", "_add_exception_handlers"),
    ModelServer: ("_register_and_check_atleast_one_model_is_ready",),
}


def kserve_app() -> FastAPI:
    """KServe's module-global app: the one its --enable_docs_url flag (read from sys.argv at import) configures."""
    from kserve.model_server import app

    return app


def fresh_app() -> FastAPI:
    """A new app made as KServe makes its own (kserve/model_server.py): ORJSON answers, no ReDoc, no docs page."""
    return FastAPI(title="KServe ModelServer", version=metadata.version("kserve"), docs_url=None, redoc_url=None,
                   default_response_class=ORJSONResponse)


def _rest_server(app: FastAPI | str, data_plane: DataPlane, access_log_format: str | None = None,
                 **config: object) -> RESTServer:
    repository = ModelRepositoryExtension(model_registry=data_plane.model_registry)
    return RESTServer(app, data_plane, repository, access_log_format=access_log_format, **config)  # type: ignore[arg-type]


def install_kserve_rest(app: FastAPI, data_plane: DataPlane, access_log_format: str | None = None) -> None:
    """KServe's own V1/V2 routes, its exception handlers and its timing (and access-log) middleware, on `app`.

    What `RESTServer.create_application` does to the global app, done to the one given.
    """
    rest = _rest_server(app, data_plane, access_log_format, http_port=0)
    rest._add_middlewares(app)
    rest._register_endpoints(app)
    rest._add_exception_handlers(app)


def uvicorn_config(app: FastAPI, data_plane: DataPlane, *, port: int, grace_period: int, event_loop: str,
                   timeout_keep_alive: int) -> Config:
    """The uvicorn settings KServe runs its app with (all interfaces, KServe's logging, its keep-alive), for `app`."""
    return _rest_server(app, data_plane, http_port=port, grace_period=grace_period, event_loop=event_loop,
                        timeout_keep_alive=timeout_keep_alive).config


def register_models(server: ModelServer, models: list[Model]) -> list:
    """Register the ready models as ModelServer.start does (NoModelReady if none is); returns the coroutines of
    any model engines to run beside the servers."""
    before = len(server.servers)
    server._register_and_check_atleast_one_model_is_ready(models)
    return server.servers[before:]
