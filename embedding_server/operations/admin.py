"""KServe's model-repository extension (load and unload): off unless an operator sets an admin key.

A single-model embedding server has no use for it, and with the client key anyone could unload the model and
take the service down. Off, its REST routes answer 404 and its gRPC methods UNIMPLEMENTED. With
ADMIN_API_KEY set they are served, to that key only: the client keys get 403 / PERMISSION_DENIED there.
"""
from __future__ import annotations

import logging

import grpc
from starlette.types import ASGIApp, Receive, Scope, Send

from auth_middleware import KeyChecker, denied
from embedding_server.operations.errors import Disabled, error_response

logger = logging.getLogger(__name__)

REPOSITORY_PATH_PREFIX = "/v2/repository/"  # KServe 0.21 serves load and unload here (no index, on REST or gRPC)
REPOSITORY_GRPC_METHODS = frozenset(
    {
        "/inference.GRPCInferenceService/RepositoryModelLoad",
        "/inference.GRPCInferenceService/RepositoryModelUnload",
    }
)
DISABLED_MESSAGE = "The model-repository extension is not enabled on this server (ADMIN_API_KEY)"


class RepositoryGuardMiddleware:
    """Off: the repository routes answer 404 for every key. On: they take the admin key only.

    A middleware rather than removing KServe's routes: FastAPI 0.165 keeps included routers unflattened, so the
    routes are not a list to filter. Inside ApiKeyMiddleware, which takes the admin key too: a request without a
    valid key gets its 401/403 there, as on every other route.
    """

    def __init__(self, app: ASGIApp, admin_keys: tuple[str, ...]):
        self.app = app
        self.checker = KeyChecker(admin_keys) if admin_keys else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(REPOSITORY_PATH_PREFIX):
            await self.app(scope, receive, send)
            return
        if self.checker is None:
            await error_response(Disabled(DISABLED_MESSAGE), scope["path"])(scope, receive, send)
            return
        await self.checker.guard(self.app, scope, receive, send)


class GrpcRepositoryInterceptor(grpc.aio.ServerInterceptor):
    """The same rule over gRPC, after the key interceptor (which takes the admin key too), as on REST."""

    def __init__(self, admin_keys: tuple[str, ...]):
        self.checker = KeyChecker(admin_keys) if admin_keys else None
        self._disabled = denied(Disabled(DISABLED_MESSAGE))

    async def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        if handler_call_details.method not in REPOSITORY_GRPC_METHODS:
            return await continuation(handler_call_details)
        if self.checker is None:
            return self._disabled
        refusal = self.checker.grpc_handler(handler_call_details.invocation_metadata)
        return refusal or await continuation(handler_call_details)
