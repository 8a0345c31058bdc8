"""Wires the model into a server: install_app puts our routes, middleware, error handlers and docs on any FastAPI
app (KServe's in production, fresh ones in tests), build_grpc_server makes the gRPC server with the API-key
interceptor, ServingDataPlane makes health follow the model, and EmbeddingModelServer drains HTTP and gRPC together
before the model is unloaded."""
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
from kserve.errors import ModelNotReady, ServerNotLive
from kserve.model_repository import ModelRepository
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from kserve.protocol.grpc.interceptors import LoggingInterceptor
from kserve.protocol.model_repository_extension import ModelRepositoryExtension
from starlette.middleware.cors import CORSMiddleware
from timing_asgi import TimingMiddleware

from auth_middleware import ApiKeyMiddleware, GrpcApiKeyInterceptor
from embedding_server.kserve_adapter import install_kserve_rest, kserve_app, register_models, uvicorn_config
from embedding_server.operations.admin import GrpcRepositoryInterceptor, RepositoryGuardMiddleware
from embedding_server.operations.connection_guard import guarded_http_protocol
from embedding_server.operations.errors import GrpcErrorInterceptor, register_error_handlers
from embedding_server.operations.limits import BodyGuardMiddleware
from embedding_server.operations.observability import COST_HEADERS, REQUEST_ID_HEADER, ObservabilityMiddleware
from embedding_server.operations.settings import Settings
from embedding_server.protocols.api_docs import install_api_docs
from embedding_server.protocols.grpc_v2 import EmbeddingServicer, MalformedMessageInterceptor
from embedding_server.protocols.routes import (
    register_legacy_routes,
    register_openai_routes,
    register_v1_predict_route,
    register_v2_infer_routes,
)

logger = logging.getLogger(__name__)

CORS_METHODS = ["OPTIONS", "POST", "GET"]
CORS_HEADERS = ["Content-Type", "X-Api-Key", "Authorization"]


def build_grpc_server(data_plane: DataPlane, settings: Settings, max_workers: int,
                      max_send_bytes: int | None = None, max_receive_bytes: int | None = None) -> aio.Server:
    """The gRPC V2 server, bound to no port yet: the API-key, malformed-message and repository interceptors in
    front of KServe's logging one and our error mapping, and the servicer that decodes what stock clients send."""
    options = [("grpc.max_send_message_length", max_send_bytes), ("grpc.max_receive_message_length", max_receive_bytes)]
    server = aio.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        interceptors=(GrpcApiKeyInterceptor(settings.api_keys + settings.admin_api_keys), MalformedMessageInterceptor(),
                      GrpcRepositoryInterceptor(settings.admin_api_keys), LoggingInterceptor(), GrpcErrorInterceptor()),
        options=[(name, value) for name, value in options if value is not None],
    )
    servicer = EmbeddingServicer(data_plane, ModelRepositoryExtension(model_registry=data_plane.model_registry))
    grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    return server


def install_app(app: FastAPI, data_plane: DataPlane, model_name: str, settings: Settings, dimension: int,
                access_log_format: str | None = None) -> FastAPI:
    """Our routes, middleware and API docs, then KServe's V1/V2 routes, then our error handlers, on `app`.

    Used on KServe's app in production and on fresh apps in tests. Order matters: our routes are matched before
    KServe's (ours replace its V2 infer), and middleware added last is outermost.
    """
    register_legacy_routes(app, data_plane, model_name, settings)
    register_openai_routes(app, data_plane, model_name, dimension)
    register_v2_infer_routes(app, data_plane)
    register_v1_predict_route(app, data_plane)
    # CORS answers preflights before the key is checked, and the body is read (within its limit) only for
    # requests that carry a valid key.
    app.add_middleware(BodyGuardMiddleware, max_body_bytes=settings.limits.max_body_bytes)
    app.add_middleware(RepositoryGuardMiddleware, admin_keys=settings.admin_api_keys)
    app.add_middleware(ApiKeyMiddleware, keys=settings.api_keys + settings.admin_api_keys)
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=CORS_METHODS, allow_headers=CORS_HEADERS,
                       expose_headers=[*COST_HEADERS, REQUEST_ID_HEADER])
    app.add_middleware(ObservabilityMiddleware)  # outermost of ours: it sees the 401s and preflights too
    install_api_docs(app, model_name, dimension)
    install_kserve_rest(app, data_plane, access_log_format)
    drop_unlogged_timing(app)
    register_error_handlers(app)  # after KServe's: ours replace its handlers, which answer every route in the plain shape
    return app


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
    """KServe's ModelServer for its settings and model repository, with HTTP and gRPC started and stopped here.

    In KServe 0.21 uvicorn drains HTTP alone on SIGTERM; only then does ModelServer.stop unload the model (closing
    the batcher) and start the gRPC server's grace period, so gRPC calls in flight wait on a closed batcher until
    they are cancelled, and the process outlives GRACE_PERIOD. Here one signal stops HTTP and gRPC accepting
    together, the requests in flight on both finish within GRACE_PERIOD less a margin, and then the model is
    unloaded. What this needs of KServe's internals is in kserve_adapter.
    """

    def __init__(self, *, app: FastAPI, settings: Settings, **kwargs):
        super().__init__(**kwargs)
        self.app = app
        self.settings = settings
        self.drain_seconds = max(1, self.grace_period - SHUTDOWN_MARGIN_SECONDS)
        self.grpc_message_bytes: tuple[int | None, int | None] = (None, None)  # send, receive
        self._http: _HTTPServer | None = None
        self._grpc: aio.Server | None = None

    def start(self, models: list[Model]) -> None:
        engines = register_models(self, models)
        config = uvicorn_config(self.app, self.dataplane, port=self.http_port, grace_period=self.drain_seconds,
                                event_loop=self.event_loop, timeout_keep_alive=self.timeout_keep_alive)
        config.http = guarded_http_protocol(self.settings.connections)
        self._http = _HTTPServer(config)
        self.setup_event_loop()
        asyncio.run(self._serve(engines))

    async def _serve_grpc(self) -> None:
        send, receive = self.grpc_message_bytes
        self._grpc = build_grpc_server(self.dataplane, self.settings, self.max_threads, send, receive)
        self._grpc.add_insecure_port(f"[::]:{self.grpc_port}")
        logger.info("Starting gRPC server on port %d (API key required)", self.grpc_port)
        await self._grpc.start()
        await self._grpc.wait_for_termination()

    async def _serve(self, engines: list) -> None:
        loop = asyncio.get_running_loop()
        signalled = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT):
            loop.add_signal_handler(sig, signalled.set)
        http = asyncio.ensure_future(self._http.serve())
        servers = [self._serve_grpc()] if self.enable_grpc else []
        others = [asyncio.ensure_future(server) for server in (*servers, *engines)]
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
        stopping = [http, asyncio.ensure_future(self._close_late_connections(http))]
        if self._grpc is not None:
            stopping.append(asyncio.ensure_future(self._grpc.stop(grace=self.drain_seconds)))
        await asyncio.gather(*stopping, return_exceptions=True)
        for name in list(self.registered_models.get_models()):
            self.registered_models.unload(name)
        for task in others:
            task.cancel()  # the gRPC server has stopped; model engines, if any, stop here
        await asyncio.gather(*others, return_exceptions=True)
        logger.info("Drained and unloaded in %.1fs", time.monotonic() - started)


    async def _close_late_connections(self, http: asyncio.Future) -> None:
        """Asks every open HTTP connection to close after its answer in flight, until HTTP has stopped.

        uvicorn asks once, as its shutdown starts. A connection the event loop accepted just before it is only
        registered a moment later (asyncio runs `connection_made` in a later turn of the loop), so it is missed: it
        serves a request with keep-alive on, and a client that keeps it open holds the drain for the whole grace
        period (seen in about one SIGTERM of two under steady load). Asking again closes it once it is idle.
        """
        while not http.done():
            for connection in list(self._http.server_state.connections):
                connection.shutdown()  # idle: closed now; answering: closed after its answer (uvicorn's own rule)
            await asyncio.wait([http], timeout=0.1)


def create_server(model: Model, settings: Settings, args: argparse.Namespace, dimension: int) -> EmbeddingModelServer:
    """The server for `model`, with every route installed on KServe's app; `server.start([model])` runs it."""
    server = EmbeddingModelServer(
        app=kserve_app(),
        settings=settings,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        workers=1,
        max_threads=args.max_threads,
        enable_grpc=args.enable_grpc,
        enable_docs_url=args.enable_docs_url,
        grace_period=settings.grace_period,
    )
    server.grpc_message_bytes = (args.grpc_max_send_message_length, args.grpc_max_receive_message_length)
    server.dataplane = ServingDataPlane(server.registered_models, model.name)
    install_app(server.app, server.dataplane, model.name, settings, dimension, access_log_format=server.access_log_format)
    return server
