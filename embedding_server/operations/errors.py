"""Every error the server answers, and the one place that turns an error into an answer.

A leaf: it imports nothing from the project, so that every layer (engine, protocols, operations, the key check)
may raise these types. `error_response` writes any error in the dialect of the route it happened on: the plain
shape of the legacy and KServe routes (`{"error": "..."}`) or OpenAI's (`{"error": {"message", "type", "param",
"code"}}`), which its SDKs read. `grpc_status` is the same mapping for gRPC.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from kserve.errors import (
    InferenceError,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    ServerNotLive,
    ServerNotReady,
    UnsupportedProtocol,
)
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

logger = logging.getLogger(__name__)


class BadRequest(InvalidInput):
    """The body is not JSON, or carries nothing to embed (400)."""

    status = HTTPStatus.BAD_REQUEST


class Unprocessable(InvalidInput):
    """JSON of the wrong shape; the message names the offending key or index (422)."""

    status = HTTPStatus.UNPROCESSABLE_ENTITY


class TooLarge(InvalidInput):
    """The body, the number of texts or one text is above a configured limit (413)."""

    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


RETRY_AFTER_SECONDS = 1  # the least Retry-After the server sends (the API docs' example)
RETRY_AFTER_METADATA = "retry-after"  # gRPC trailing metadata of a RESOURCE_EXHAUSTED answer


class Overloaded(RuntimeError):
    """The work already admitted would not be done in time; the caller should retry in `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int = RETRY_AFTER_SECONDS):
        super().__init__(message)
        self.retry_after = retry_after

    def __reduce__(self):  # Ray sends it from a replica to the front end
        return type(self), (str(self), self.retry_after)


class ReplicaUnavailable(ServerNotReady):
    """No Ray Serve replica answered (all busy, dead or timed out): 503 over HTTP, UNAVAILABLE over gRPC."""

    def __init__(self, detail: str):
        super().__init__(detail)
        self.reason = self.error_msg  # KServe's gRPC interceptor reads .reason


class OpenAIRequestError(ValueError):
    """An OpenAI embeddings request this server will not take; carries OpenAI's error fields."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str | None = None, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.type = message, param, status, code, type_


MISSING_KEY_BODY = {
    "error": "API key required",
    "message": "Please provide an API key in the 'X-Api-Key' header or 'Authorization: Bearer <key>' header",
}
INVALID_KEY_BODY = {"error": "Invalid API key", "message": "The provided API key is invalid"}


class KeyRejected(Exception):
    """No valid API key: 401 when none was sent, 403 when it is wrong (UNAUTHENTICATED / PERMISSION_DENIED).

    OpenAI's routes answer 401 for both, as OpenAI does, so that its SDKs raise their AuthenticationError.
    """

    def __init__(self, missing: bool):
        self.body = MISSING_KEY_BODY if missing else INVALID_KEY_BODY
        super().__init__(self.body["message"])
        self.missing = missing


class Disabled(Exception):
    """A feature this server does not serve as configured: 404 over HTTP, UNIMPLEMENTED over gRPC."""


INTERNAL_MESSAGE = "Internal server error"


class InternalError(Exception):
    """A bug of ours, answered without its details; the request id finds them in the log."""

    def __init__(self, request_id: str | None = None):
        super().__init__(INTERNAL_MESSAGE)
        self.request_id = request_id


# --- HTTP -----------------------------------------------------------------------------------------------------------

PLAIN, OPENAI = "plain", "openai"
# OpenAI's routes: under KServe's /openai prefix, and /v1/embeddings for clients whose base URL ends in /v1.
OPENAI_PATH_PREFIXES = ("/openai/", "/v1/embeddings")


def dialect(path: str) -> str:
    """The error shape of the route at `path`: OpenAI's on its routes, the plain one everywhere else."""
    return OPENAI if path.startswith(OPENAI_PATH_PREFIXES) else PLAIN


@dataclass(frozen=True)
class _Answer:
    """What an error means on the wire, before it is written in a dialect."""

    status: int
    message: str
    plain: dict[str, Any] | None = None  # the plain body, when it is more than {"error": message}
    openai_status: int | None = None  # OpenAI's status, when it differs
    type: str | None = None  # OpenAI's error type; by status when None
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


def _validation_message(error: RequestValidationError) -> str:
    """FastAPI's 422 for a typed body (KServe's routes) names where, never echoes the value: FastAPI's own body
    would hold it, and cannot even be written when it is NaN (a 500)."""
    return "; ".join(f"{'.'.join(str(part) for part in problem.get('loc', ()))}: {problem.get('msg', 'invalid')}"
                     for problem in error.errors()[:5])


def _answer(error: BaseException) -> _Answer:
    if isinstance(error, OpenAIRequestError):
        return _Answer(error.status, error.message, type=error.type, param=error.param, code=error.code)
    if isinstance(error, KeyRejected):
        return _Answer(401 if error.missing else 403, str(error), plain=error.body, openai_status=401,
                       code="missing_api_key" if error.missing else "invalid_api_key")
    if isinstance(error, Overloaded):
        return _Answer(HTTPStatus.TOO_MANY_REQUESTS, str(error), type="rate_limit_error",
                       headers={"Retry-After": str(error.retry_after)})
    if isinstance(error, InvalidInput):  # ours carry their status; KServe's own are 400
        return _Answer(getattr(error, "status", HTTPStatus.BAD_REQUEST), error.reason)
    if isinstance(error, ModelNotFound):
        return _Answer(HTTPStatus.NOT_FOUND, str(error), code="model_not_found")
    if isinstance(error, (ModelNotReady, ServerNotReady, ServerNotLive)):
        return _Answer(HTTPStatus.SERVICE_UNAVAILABLE, str(error))
    if isinstance(error, (NotImplementedError, UnsupportedProtocol)):
        return _Answer(HTTPStatus.NOT_IMPLEMENTED, str(error))
    if isinstance(error, Disabled):
        return _Answer(HTTPStatus.NOT_FOUND, str(error))
    if isinstance(error, HTTPException):  # routing's 404/405 and FastAPI's body-parsing 400
        return _Answer(error.status_code, str(error.detail), headers=dict(error.headers or {}))
    if isinstance(error, RequestValidationError):
        return _Answer(HTTPStatus.UNPROCESSABLE_ENTITY, _validation_message(error))
    if isinstance(error, InferenceError):  # as KServe answers it
        return _Answer(HTTPStatus.INTERNAL_SERVER_ERROR, str(error))
    request_id = error.request_id if isinstance(error, InternalError) else None
    if request_id is None:
        return _Answer(HTTPStatus.INTERNAL_SERVER_ERROR, INTERNAL_MESSAGE)
    return _Answer(HTTPStatus.INTERNAL_SERVER_ERROR, f"{INTERNAL_MESSAGE} (request id {request_id})",
                   plain={"error": INTERNAL_MESSAGE, "request_id": request_id})


def _openai_type(status: int) -> str:
    return "server_error" if status >= 500 else "invalid_request_error"


def error_response(error: BaseException, path: str) -> JSONResponse:
    """Any error as the answer of the route at `path`, in that route's dialect (see `dialect`).

    An exception of a kind not listed here is a bug: 500, without its message.
    """
    answer = _answer(error)
    if dialect(path) == OPENAI:
        status = answer.openai_status or answer.status
        body: dict[str, Any] = {"error": {"message": answer.message, "type": answer.type or _openai_type(status),
                                          "param": answer.param, "code": answer.code}}
    else:
        status = answer.status
        body = answer.plain or {"error": answer.message}
    return JSONResponse(body, status_code=status, headers=answer.headers or None)


async def _handle(request: Request, error: Exception) -> JSONResponse:
    response = error_response(error, request.scope["path"])
    if response.status_code >= HTTPStatus.INTERNAL_SERVER_ERROR:  # the client's errors are its own to log
        logger.warning("Answered %d: %s: %s", response.status_code, type(error).__name__, error)
    return response


# Everything a route may raise, ours and KServe's. Registered after KServe's own handlers (which answer the same
# kinds in the plain shape only), these answer on every route in its dialect. Our InvalidInput subclasses are
# listed as well: where KServe's handlers come last after all, they still answer with their own statuses.
HANDLED = (BadRequest, Unprocessable, TooLarge, InvalidInput, Overloaded, OpenAIRequestError, KeyRejected, Disabled,
           ModelNotFound, ModelNotReady, ServerNotReady, ServerNotLive, NotImplementedError, UnsupportedProtocol,
           InferenceError, HTTPException, RequestValidationError)


def register_error_handlers(app: FastAPI) -> None:
    """Our answers for every kind in HANDLED. Call it after KServe's handlers are installed (server.install_app
    does): its own handlers for InvalidInput, ModelNotReady, ... would otherwise replace these."""
    for cls in HANDLED:
        app.add_exception_handler(cls, _handle)


# --- gRPC -----------------------------------------------------------------------------------------------------------

def grpc_status(error: BaseException) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]] | None:
    """The gRPC status, message and trailing metadata of the errors KServe's interceptor does not map (or maps to
    UNKNOWN); None for the rest, which it maps itself."""
    if isinstance(error, Overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(error), ((RETRY_AFTER_METADATA, str(error.retry_after)),)
    if isinstance(error, (ModelNotReady, ServerNotLive, ServerNotReady)):
        return grpc.StatusCode.UNAVAILABLE, str(error), ()
    if isinstance(error, KeyRejected):
        code = grpc.StatusCode.UNAUTHENTICATED if error.missing else grpc.StatusCode.PERMISSION_DENIED
        return code, str(error), ()
    if isinstance(error, Disabled):
        return grpc.StatusCode.UNIMPLEMENTED, str(error), ()
    return None


class GrpcErrorInterceptor(ExceptionToStatusInterceptor):
    """KServe's mapping of exceptions to gRPC statuses, completed by `grpc_status`: overload is RESOURCE_EXHAUSTED,
    which clients retry.

    KServe 0.21 answers INTERNAL for any exception it does not know, and UNKNOWN for ModelNotReady, ServerNotLive
    and ServerNotReady (it reads a `reason` they do not have); it answers INVALID_ARGUMENT for InvalidInput (our
    400, 413 and 422).
    """

    async def handle_exception(self, ex: Exception, request_or_iterator, context: grpc.aio.ServicerContext,
                               method_name: str):
        status = grpc_status(ex)
        if status is not None:
            code, message, metadata = status
            await context.abort(code, message, trailing_metadata=metadata)
        await super().handle_exception(ex, request_or_iterator, context, method_name)
