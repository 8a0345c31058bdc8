"""API-key enforcement for every protocol: a pure ASGI middleware for HTTP and an interceptor for gRPC.

Default deny: a request passes without a key only if its method and exact path are on the public
list (health, probes, key info, docs). Anything else, including paths added later, needs a key.
"""
from __future__ import annotations

import hmac
import logging
import re
from collections.abc import Collection, Iterable

import grpc
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from embedding_server.operations.errors import KeyRejected, error_response, grpc_status

logger = logging.getLogger(__name__)

KEY_HEADER = "x-api-key"
AUTHORIZATION_HEADER = "authorization"
# Where ApiKeyMiddleware records its decision in the request's scope["state"], for the access log: one of
# KEY_VALID, KEY_MISSING, KEY_INVALID; absent on public routes.
KEY_OUTCOME = "api_key"
KEY_VALID, KEY_MISSING, KEY_INVALID = "valid", "missing", "invalid"

# Swagger UI's own files, served at /docs/<name> from an installed package so that the docs page needs no CDN.
DOCS_ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png")
# Routes that compute nothing from a client's text and that load balancers, Kubernetes probes,
# Prometheus and people reading the docs call without a key.
PUBLIC_PATHS = frozenset(
    {
        "/",
        "/health",
        "/api-key-info",
        "/v2/health/live",
        "/v2/health/ready",
        "/metrics",
        "/docs",
        "/docs/oauth2-redirect",
        "/openapi.json",
        *(f"/docs/{name}" for name in DOCS_ASSETS),
    }
)
PUBLIC_PATTERNS = (
    re.compile(r"/v1/models/[^/:]+"),  # KServe V1 model readiness
    re.compile(r"/v2/models/[^/]+/ready"),  # Open Inference Protocol model readiness
)
PUBLIC_METHODS = frozenset({"GET", "HEAD"})
PUBLIC_GRPC_METHODS = frozenset(
    {
        "/inference.GRPCInferenceService/ServerLive",
        "/inference.GRPCInferenceService/ServerReady",
        "/inference.GRPCInferenceService/ModelReady",
    }
)


def is_public(method: str, path: str) -> bool:
    if method not in PUBLIC_METHODS:
        return False
    return path in PUBLIC_PATHS or any(p.fullmatch(path) for p in PUBLIC_PATTERNS)


def presented_keys(x_api_keys: Iterable[str], authorizations: Iterable[str]) -> set[str]:
    """The distinct keys a client sent: its X-Api-Key values, else the tokens of 'Authorization: Bearer <key>'.

    An empty or blank value counts as absent, so an empty X-Api-Key does not hide a bearer token.
    """
    keys = {value.strip() for value in x_api_keys} - {""}
    if keys:
        return keys
    tokens = set()
    for value in authorizations:
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == "bearer":
            tokens.add(token.strip())
    return tokens - {""}


def http_presented_keys(headers: Headers) -> set[str]:
    return presented_keys(headers.getlist(KEY_HEADER), headers.getlist(AUTHORIZATION_HEADER))


def grpc_presented_keys(metadata: Iterable[tuple[str, str]]) -> set[str]:
    """The same from gRPC metadata, every repeated entry included."""
    metadata = tuple(metadata or ())
    return presented_keys([value for key, value in metadata if key == KEY_HEADER],
                          [value for key, value in metadata if key == AUTHORIZATION_HEADER])


class KeyChecker:
    """Compares a presented key with every valid key in constant time."""

    def __init__(self, keys: Iterable[str]):
        self._keys = tuple(key.encode() for key in keys if key)
        if not self._keys:
            raise ValueError("at least one API key is required")

    def is_valid(self, key: str) -> bool:
        candidate = key.encode("utf-8", "surrogatepass")
        matches = [hmac.compare_digest(candidate, valid) for valid in self._keys]
        return any(matches)

    def check(self, keys: Collection[str]) -> str:
        """KEY_VALID when one valid key was sent, KEY_MISSING when none, KEY_INVALID when it is wrong.

        Different keys in repeated headers are refused as wrong: which copy a proxy or a framework keeps
        differs (first, last, or both joined), so no copy is trusted.
        """
        if not keys:
            return KEY_MISSING
        if len(keys) > 1:
            return KEY_INVALID
        return KEY_VALID if self.is_valid(next(iter(keys))) else KEY_INVALID

    async def guard(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass an HTTP request with a valid key on to `app`; answer any other with its 401/403 in the route's
        dialect. The outcome is recorded in the scope for the access log."""
        outcome = self.check(http_presented_keys(Headers(scope=scope)))
        scope.setdefault("state", {})[KEY_OUTCOME] = outcome
        if outcome == KEY_VALID:
            await app(scope, receive, send)
            return
        await error_response(KeyRejected(missing=outcome == KEY_MISSING), scope["path"])(scope, receive, send)

    def grpc_handler(self, metadata: Iterable[tuple[str, str]] | None) -> grpc.RpcMethodHandler | None:
        """None when the call carries a valid key; else a handler that refuses it."""
        outcome = self.check(grpc_presented_keys(metadata))
        if outcome == KEY_VALID:
            return None
        return denied(KeyRejected(missing=outcome == KEY_MISSING))


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, keys: Iterable[str]):
        self.app = app
        self.checker = KeyChecker(keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_public(scope["method"], scope["path"]):
            await self.app(scope, receive, send)
            return
        await self.checker.guard(self.app, scope, receive, send)


def denied(error: Exception) -> grpc.RpcMethodHandler:
    """A gRPC handler that answers every call with the status of `error`, for interceptors that refuse a call."""
    code, message, metadata = grpc_status(error)

    async def abort(request, context: grpc.aio.ServicerContext):
        await context.abort(code, message, trailing_metadata=metadata)

    return grpc.unary_unary_rpc_method_handler(abort)


class GrpcApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """The same rule for gRPC: metadata `x-api-key` or `authorization: Bearer <key>`, repeated ones included."""

    def __init__(self, keys: Iterable[str]):
        self.checker = KeyChecker(keys)

    async def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        if handler_call_details.method in PUBLIC_GRPC_METHODS:
            return await continuation(handler_call_details)
        refusal = self.checker.grpc_handler(handler_call_details.invocation_metadata)
        return refusal or await continuation(handler_call_details)
