"""Typed request errors and the one place that turns them into statuses and JSON bodies."""
from __future__ import annotations

import logging
from http import HTTPStatus

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kserve.errors import InvalidInput, ModelNotReady, ServerNotLive, ServerNotReady
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor
from starlette.exceptions import HTTPException

from embedding_server.engine.batcher import Overloaded

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


def error_body(message: str) -> dict[str, str]:
    return {"error": message}


async def _request_error(_: Request, exc: BadRequest | Unprocessable | TooLarge) -> JSONResponse:
    return JSONResponse(status_code=exc.status, content=error_body(exc.reason))


async def _overloaded(_: Request, exc: Overloaded) -> JSONResponse:
    return JSONResponse(
        status_code=HTTPStatus.TOO_MANY_REQUESTS,
        content=error_body(str(exc)),
        headers={"Retry-After": str(exc.retry_after)},
    )


async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
    """Routing's 404/405 and FastAPI's body-parsing 400 in our shape, not FastAPI's {"detail": ...}."""
    return JSONResponse(status_code=exc.status_code, content=error_body(str(exc.detail)), headers=exc.headers)


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 for a typed body (KServe's routes) in our shape. It names where, never echoes the value:
    FastAPI's own body would hold it, and cannot even be written when it is NaN (a 500)."""
    problems = [f"{'.'.join(str(part) for part in error.get('loc', ()))}: {error.get('msg', 'invalid')}"
                for error in exc.errors()[:5]]
    return JSONResponse(status_code=HTTPStatus.UNPROCESSABLE_ENTITY, content=error_body("; ".join(problems)))


def register_error_handlers(app: FastAPI) -> None:
    """Our statuses; KServe's own handlers (InvalidInput 400, ModelNotFound 404, ...) stay for the rest."""
    for cls in (BadRequest, Unprocessable, TooLarge):
        app.add_exception_handler(cls, _request_error)
    app.add_exception_handler(Overloaded, _overloaded)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)


class GrpcErrorInterceptor(ExceptionToStatusInterceptor):
    """KServe's mapping of exceptions to gRPC statuses, with overload as RESOURCE_EXHAUSTED, which clients retry.

    KServe 0.21 answers INTERNAL for any exception it does not know, and UNKNOWN for ModelNotReady, ServerNotLive
    and ServerNotReady (it reads a `reason` they do not have); it answers INVALID_ARGUMENT for InvalidInput (our
    400, 413 and 422).
    """

    async def handle_exception(self, ex: Exception, request_or_iterator, context: grpc.aio.ServicerContext,
                               method_name: str):
        if isinstance(ex, Overloaded):
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(ex),
                                trailing_metadata=((RETRY_AFTER_METADATA, str(ex.retry_after)),))
        if isinstance(ex, (ModelNotReady, ServerNotLive, ServerNotReady)):
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(ex))
        await super().handle_exception(ex, request_or_iterator, context, method_name)
