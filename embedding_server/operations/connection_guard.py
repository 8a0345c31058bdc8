"""Slow and idle HTTP connections: read deadlines and a cap, in uvicorn's HTTP protocol.

uvicorn 0.54 closes a connection only after a response, when it has been idle for `timeout_keep_alive`; a
client that connects and sends nothing, or half its headers, or half its body, holds its connection (and a file
descriptor) for ever, and nothing caps how many connections are open (`limit_concurrency` answers 503 only once
a request's headers are in). This subclass of uvicorn's httptools protocol (what uvicorn picks when httptools is
installed, as it is with KServe) adds: a deadline for the headers, from the connection or the first byte of the
next request; a deadline for the body, from the last header; and a cap on open connections, above which a new
connection is answered 503 and closed at once.
"""
from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus

from starlette.exceptions import HTTPException
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from embedding_server.operations.errors import error_response
from embedding_server.operations.settings import Connections

logger = logging.getLogger(__name__)


def _raw_response(status: HTTPStatus, message: str) -> bytes:
    """The answer as bytes on the wire, written before any request line is known: in the plain dialect."""
    response = error_response(HTTPException(status, message), path="")
    head = [f"HTTP/1.1 {status.value} {status.phrase}".encode("ascii"),
            *(name + b": " + value for name, value in response.raw_headers), b"connection: close"]
    return b"\r\n".join(head) + b"\r\n\r\n" + response.body


def guarded_http_protocol(connections: Connections) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class with `connections`' deadlines and cap (give it as uvicorn's `http`)."""
    header_timeout, body_timeout = connections.header_timeout, connections.body_timeout
    too_slow = _raw_response(HTTPStatus.REQUEST_TIMEOUT,
                             f"The request headers took longer than {header_timeout:g}s (HEADER_TIMEOUT)")
    too_many = _raw_response(HTTPStatus.SERVICE_UNAVAILABLE,
                             f"Too many open connections (MAX_CONNECTIONS is {connections.max_connections})")

    class GuardedHttpProtocol(HttpToolsProtocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > connections.max_connections:
                logger.warning("Refusing a connection: %d open (MAX_CONNECTIONS)", len(self.connections) - 1)
                transport.write(too_many)
                transport.close()
                return
            self._arm(header_timeout, self._headers_expired)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._deadline is None:  # the next request on a kept-alive connection
                self._arm(header_timeout, self._headers_expired)

        def on_headers_complete(self) -> None:
            self._arm(body_timeout, self._body_expired)
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._disarm()
            super().on_message_complete()

        def _arm(self, seconds: float, callback) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(seconds, callback)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _headers_expired(self) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            logger.info("Closing a connection whose request headers took over %gs (HEADER_TIMEOUT)", header_timeout)
            if self.cycle is None or self.cycle.response_complete:  # no answer of an earlier request under way
                self.transport.write(too_slow)
            self.transport.close()

        def _body_expired(self) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            # The application sees the client leave (http.disconnect) and drops the request.
            logger.info("Closing a connection whose request body took over %gs (BODY_TIMEOUT)", body_timeout)
            self.transport.close()

    return GuardedHttpProtocol
