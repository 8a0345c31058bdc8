"""Wires the model into KServe's ModelServer: our routes, middleware and error handlers on its FastAPI app,
its gRPC server with the API-key interceptor, health that follows the model, and a shutdown that drains
HTTP and gRPC together before the model is unloaded."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Iterator
from concurrent import futures

import uvicorn
from fastapi import FastAPI
from grpc import aio
from kserve import Model, ModelServer
from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
from kserve.errors import ModelNotReady, ServerNotLive
from kserve.model_repository import ModelRepository
from kserve.model_server import app
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from kserve.protocol.grpc.interceptors import LoggingInterceptor
from kserve.protocol.grpc.server import GRPCServer
from kserve.protocol.rest.server import RESTServer
from starlette.middleware.cors import CORSMiddleware
from timing_asgi import TimingMiddleware

from auth_middleware import ApiKeyMiddleware, GrpcApiKeyInterceptor
from embedding_server.operations.admin import GrpcRepositoryInterceptor, RepositoryGuardMiddleware
from embedding_server.operations.connection_guard import guarded_http_protocol
from embedding_server.operations.errors import GrpcErrorInterceptor, register_error_handlers
from embedding_server.operations.limits import BodyGuardMiddleware
from embedding_server.operations.observability import ObservabilityMiddleware
from embedding_server.operations.settings import Connections, Settings
from embedding_server.protocols.adapters import COST_HEADERS
from embedding_server.protocols.api_docs import install_api_docs
from embedding_server.protocols.grpc_v2 import EmbeddingServicer, MalformedMessageInterceptor
from embedding_server.protocols.routes import register_legacy_routes, register_openai_routes, register_v2_infer_routes

logger = logging.getLogger(__name__)

CORS_METHODS = ["OPTIONS", "POST", "GET"]
CORS_HEADERS = ["Content-Type", "X-Api-Key", "Authorization"]


class AuthGRPCServer(GRPCServer):
    """KServe's gRPC V2 server with the API-key and repository interceptors in front of its own two."""

    def __init__(self, *args, keys: tuple[str, ...], admin_keys: tuple[str, ...] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self._keys = keys
        self._admin_keys = admin_keys

    async def start(self, max_workers: int) -> None:
        self._server = aio.server(
            futures.ThreadPoolExecutor(max_workers=max_workers),
            interceptors=(GrpcApiKeyInterceptor(self._keys + self._admin_keys), MalformedMessageInterceptor(),
                          GrpcRepositoryInterceptor(self._admin_keys), LoggingInterceptor(), GrpcErrorInterceptor()),
            options=[
                ("grpc.max_send_message_length", self._kwargs.get("grpc_max_send_message_length")),
                ("grpc.max_receive_message_length", self._kwargs.get("grpc_max_receive_message_length")),
            ],
        )
        servicer = EmbeddingServicer(self._data_plane, self._model_repository_extension)
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, self._server)
        self._server.add_insecure_port(f"[::]:{self._port}")
        logger.info("Starting gRPC server on port %d (API key required)", self._port)
        await self._server.start()
        await self._server.wait_for_termination()


class ServingDataPlane(DataPlane):
    """KServe's data plane, with health that follows the one model this server exists to serve.

    KServe 0.21 answers "live" whatever happens, and 404 on the readiness routes once the model has left its
    repository. A server without its model can only be restarted: liveness fails and readiness says 503 then,
    and gRPC ModelInfer (which KServe does not check) answers UNAVAILABLE.
    """

    def __init__(self, model_registry: ModelRepository, model_name: str):
        super().__init__(model_registry=model_registry)
        self.model_name = model_name

    def serving(self) -> bool:
        model = self.model_registry.get_model(self.model_name)
        return model is not None and model.ready

    async def live(self) -> dict[str, str]:
        if not self.serving():
            raise ServerNotLive(f"the model {self.model_name} is not loaded")
        return await super().live()

    async def ready(self) -> bool:
        return self.serving() and await super().ready()

    async def model_ready(self, model_name: str, disable_predictor_health_check: bool = False) -> bool:
        if model_name == self.model_name and not self.serving():
            return False
        return await super().model_ready(model_name, disable_predictor_health_check)

    async def infer(self, model_name: str, request, headers: dict[str, str] | None = None):
        if model_name == self.model_name and not self.serving():
            raise ModelNotReady(model_name)
        return await super().infer(model_name, request, headers)


# Of GRACE_PERIOD, what is kept after the drain for unloading the model and exiting.
SHUTDOWN_MARGIN_SECONDS = 3


class _HTTPServer(uvicorn.Server):
    """uvicorn's server without its own signal handlers: EmbeddingModelServer decides when it stops."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # uvicorn 0.54 installs them here and re-raises them on exit
        yield


def drop_unlogged_timing(app: FastAPI) -> None:
    """Removes KServe's TimingMiddleware unless its kserve.trace lines are logged (at DEBUG: configure_logging).

    Whether or not the lines are written, it matches the request against every route a second time, reads the
    process's CPU clock twice and formats two lines: 0.06 ms of the event loop's CPU a one-text request on a quiet
    machine (of ~1.1 ms), 0.12 ms on a busy one (bench/README.md, "Where a one-text request's time goes").
    """
    if not logging.getLogger("kserve.trace").isEnabledFor(logging.INFO):
        app.user_middleware[:] = [m for m in app.user_middleware if m.cls is not TimingMiddleware]


class EmbeddingModelServer(ModelServer):
    """KServe 0.21.0's ModelServer, started and stopped here instead of by its start() and stop().

    In KServe 0.21 uvicorn drains HTTP alone on SIGTERM; only then does ModelServer.stop unload the model (closing
    the batcher) and start the gRPC server's grace period, so gRPC calls in flight wait on a closed batcher until
    they are cancelled, and the process outlives GRACE_PERIOD. Here one signal stops HTTP and gRPC accepting
    together, the requests in flight on both finish within GRACE_PERIOD less a margin, and then the model is
    unloaded. This class is the one place that uses KServe's internals: RESTServer,
    _register_and_check_atleast_one_model_is_ready, `servers` and `_grpc_server`.
    """

    def __init__(self, *, connections: Connections, **kwargs):
        super().__init__(**kwargs)
        self.connections = connections
        self.drain_seconds = max(1, self.grace_period - SHUTDOWN_MARGIN_SECONDS)
        self._http: _HTTPServer | None = None

    def start(self, models: list[Model]) -> None:
        self._register_and_check_atleast_one_model_is_ready(models)
        rest = RESTServer(FASTAPI_APP_IMPORT_STRING, self.dataplane, self.model_repository_extension, self.http_port,
                          access_log_format=self.access_log_format, grace_period=self.drain_seconds,
                          event_loop=self.event_loop, timeout_keep_alive=self.timeout_keep_alive)
        rest.create_application()  # KServe's own routes, middleware and error handlers on the shared app
        drop_unlogged_timing(app)
        register_error_handlers(app)  # ours replace KServe's handlers, which answer every route in the plain shape
        rest.config.http = guarded_http_protocol(self.connections)
        self._http = _HTTPServer(rest.config)
        self.setup_event_loop()
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        signalled = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT):
            loop.add_signal_handler(sig, signalled.set)
        http = asyncio.ensure_future(self._http.serve())
        others = [asyncio.ensure_future(server) for server in self.servers]
        waiter = asyncio.ensure_future(signalled.wait())
        await asyncio.wait([waiter, http, *others], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if not signalled.is_set():
            logger.error("A server stopped on its own: shutting down the others")
        await self._drain(http, others)
        for task in (http, *others):
            if not task.cancelled():
                task.result()  # a server that failed makes the process fail

    async def _drain(self, http: asyncio.Future, others: list[asyncio.Future]) -> None:
        started = time.monotonic()
        logger.info("Shutting down: HTTP and gRPC accept nothing new; requests in flight have %ds to finish",
                    self.drain_seconds)
        self._http.should_exit = True
        stopping = [http]
        if self._grpc_server is not None:
            stopping.append(asyncio.ensure_future(self._grpc_server.stop()))
        await asyncio.gather(*stopping, return_exceptions=True)
        for name in list(self.registered_models.get_models()):
            self.registered_models.unload(name)
        for task in others:
            task.cancel()  # the gRPC server's start() has returned; model engines, if any, stop here
        await asyncio.gather(*others, return_exceptions=True)
        logger.info("Drained and unloaded in %.1fs", time.monotonic() - started)


def create_server(model: Model, settings: Settings, args: argparse.Namespace, dimension: int) -> ModelServer:
    server = EmbeddingModelServer(
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        workers=1,
        enable_grpc=False,  # ours below, with auth
        enable_docs_url=args.enable_docs_url,
        grace_period=settings.grace_period,
        connections=settings.connections,
    )
    server.dataplane = ServingDataPlane(server.registered_models, model.name)
    # uvicorn's access log writes the query string, where a careless client may put its key.
    logging.getLogger("uvicorn.access").disabled = True
    register_legacy_routes(app, server.dataplane, model.name, settings)
    register_openai_routes(app, server.dataplane, model.name, dimension)
    register_v2_infer_routes(app, server.dataplane)
    # Added last is outermost: CORS answers preflights before the key is checked, and the body is
    # read (within its limit) only for requests that carry a valid key.
    app.add_middleware(BodyGuardMiddleware, max_body_bytes=settings.limits.max_body_bytes)
    app.add_middleware(RepositoryGuardMiddleware, admin_keys=settings.admin_api_keys)
    app.add_middleware(ApiKeyMiddleware, keys=settings.api_keys + settings.admin_api_keys)
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=CORS_METHODS, allow_headers=CORS_HEADERS,
                       expose_headers=[*COST_HEADERS, "x-request-id"])
    app.add_middleware(ObservabilityMiddleware)  # outermost of ours: it sees the 401s and preflights too
    install_api_docs(app, model.name, dimension)
    if args.enable_grpc:
        grpc_server = AuthGRPCServer(args.grpc_port, server.dataplane, server.model_repository_extension,
                                     kwargs=vars(args), grace_period=server.drain_seconds, keys=settings.api_keys,
                                     admin_keys=settings.admin_api_keys)
        # EmbeddingModelServer runs everything in `servers` and drains `_grpc_server` on shutdown.
        server.servers.append(grpc_server.start(args.max_threads))
        server._grpc_server = grpc_server
    return server
