"""Wires the model into KServe's ModelServer: our routes, middleware and error handlers on its FastAPI app,
and its gRPC server with the API-key interceptor."""
from __future__ import annotations

import argparse
import logging
from concurrent import futures

from grpc import aio
from kserve import Model, ModelServer
from kserve.model_server import app
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor
from kserve.protocol.grpc.server import GRPCServer
from starlette.middleware.cors import CORSMiddleware

from api_docs import install_api_docs
from auth_middleware import ApiKeyMiddleware, GrpcApiKeyInterceptor
from errors import register_error_handlers
from limits import BodyGuardMiddleware
from observability import ObservabilityMiddleware
from adapters import COST_HEADERS
from grpc_v2 import EmbeddingServicer, MalformedMessageInterceptor
from routes import register_legacy_routes, register_openai_routes, register_v2_infer_routes
from settings import Settings

logger = logging.getLogger(__name__)

CORS_METHODS = ["OPTIONS", "POST", "GET"]
CORS_HEADERS = ["Content-Type", "X-Api-Key", "Authorization"]


class AuthGRPCServer(GRPCServer):
    """KServe's gRPC V2 server with the API-key interceptor in front of its own two."""

    def __init__(self, *args, keys: tuple[str, ...], **kwargs):
        super().__init__(*args, **kwargs)
        self._keys = keys

    async def start(self, max_workers: int) -> None:
        self._server = aio.server(
            futures.ThreadPoolExecutor(max_workers=max_workers),
            interceptors=(GrpcApiKeyInterceptor(self._keys), MalformedMessageInterceptor(), LoggingInterceptor(),
                          ExceptionToStatusInterceptor()),
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


def create_server(model: Model, settings: Settings, args: argparse.Namespace, dimension: int) -> ModelServer:
    server = ModelServer(
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        workers=1,
        enable_grpc=False,  # ours below, with auth
        enable_docs_url=args.enable_docs_url,
        grace_period=settings.grace_period,
    )
    # uvicorn's access log writes the query string, where a careless client may put its key.
    logging.getLogger("uvicorn.access").disabled = True
    register_legacy_routes(app, server.dataplane, model.name, settings)
    register_openai_routes(app, server.dataplane, model.name, dimension)
    register_v2_infer_routes(app, server.dataplane)
    register_error_handlers(app)
    # Added last is outermost: CORS answers preflights before the key is checked, and the body is
    # read (within its limit) only for requests that carry a valid key.
    app.add_middleware(BodyGuardMiddleware, max_body_bytes=settings.limits.max_body_bytes)
    app.add_middleware(ApiKeyMiddleware, keys=settings.api_keys)
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=CORS_METHODS, allow_headers=CORS_HEADERS,
                       expose_headers=[*COST_HEADERS, "x-request-id"])
    app.add_middleware(ObservabilityMiddleware)  # outermost of ours: it sees the 401s and preflights too
    install_api_docs(app, model.name, dimension)
    if args.enable_grpc:
        grpc_server = AuthGRPCServer(args.grpc_port, server.dataplane, server.model_repository_extension,
                                     kwargs=vars(args), grace_period=server.grace_period, keys=settings.api_keys)
        # ModelServer.start gathers everything in `servers`; `_grpc_server` is what its stop() shuts down.
        server.servers.append(grpc_server.start(args.max_threads))
        server._grpc_server = grpc_server
    return server
