"""A pure ASGI guard around every request body: a size limit, and no work for clients that left.

It reads the body itself, counting, so that a client cannot stream past the limit with or without
Content-Length (413 before anything is parsed). Once the body is in, it listens for the client's
disconnect; if the client goes away before the answer is sent, the request's work is cancelled, and
the batcher drops its texts that have not run yet.
"""
from __future__ import annotations

import asyncio
import logging

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from embedding_server.operations.errors import TooLarge, error_response

logger = logging.getLogger(__name__)


class BodyGuardMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.message = f"The request body is larger than {max_body_bytes} bytes (MAX_BODY_BYTES)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._reject(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._reject(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self._run_until_disconnect(scope, b"".join(chunks), receive, send)

    async def _run_until_disconnect(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
        """Runs the app in this task (a task of its own would cost the event loop a turn a request) while a watcher
        reads the connection: a disconnect before the answer's last byte cancels this task's work."""
        delivered = False
        disconnected = asyncio.Event()
        answered = finished = cancelled = False
        task = asyncio.current_task()

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        async def tracking_send(message: Message) -> None:
            nonlocal answered
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                answered = True
            await send(message)

        async def watch() -> None:
            nonlocal cancelled
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    disconnected.set()
                    if not answered and not finished:
                        logger.info("Client left before its answer: cancelling %s %s", scope["method"], scope["path"])
                        cancelled = True
                        task.cancel()
                    return

        watcher = asyncio.ensure_future(watch())
        try:
            await self.app(scope, replay, tracking_send)
        except asyncio.CancelledError:
            if not cancelled:
                raise  # the server is cancelling us, not the client
        finally:
            finished = True
            watcher.cancel()
            if cancelled:
                task.uncancel()  # the client's cancel ends here; the server's own (if any) stays counted

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(TooLarge(self.message), scope["path"])
        response.headers["Connection"] = "close"  # the rest of the body is not read
        await response(scope, receive, send)
