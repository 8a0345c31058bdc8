"""Slow and idle connections: uvicorn with the guarded protocol, in-process over a trivial app, loopback only."""
from __future__ import annotations

import contextlib
import json
import select
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import requests
import uvicorn

from conftest import free_port, read_until_closed
from embedding_server.operations.connection_guard import guarded_http_protocol
from embedding_server.operations.settings import Connections

HEADER_TIMEOUT = 1.5
BODY_TIMEOUT = 1.5
SLACK = 10.0  # the machine is shared: a close is expected within the timeout plus this


async def echo_app(scope, receive, send) -> None:
    """Reads the whole body, then answers its length."""
    if scope["type"] != "http":
        return
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        size += len(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = json.dumps({"received": size}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


@contextlib.contextmanager
def running(connections: Connections) -> Iterator[int]:
    port = free_port()
    config = uvicorn.Config(echo_app, host="127.0.0.1", port=port, http=guarded_http_protocol(connections),
                            lifespan="off", log_config=None)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def guarded() -> Iterator[int]:
    with running(Connections(header_timeout=HEADER_TIMEOUT, body_timeout=BODY_TIMEOUT, max_connections=400)) as port:
        yield port


def seconds_until_closed(sock: socket.socket) -> tuple[float, bytes]:
    """Reads until the server closes the connection; returns how long that took and what it sent."""
    started = time.monotonic()
    received = read_until_closed(sock, HEADER_TIMEOUT + BODY_TIMEOUT + SLACK)
    return time.monotonic() - started, received


def test_a_client_that_sends_half_its_headers_is_answered_408_and_closed(guarded):
    with socket.create_connection(("127.0.0.1", guarded)) as sock:
        sock.sendall(b"POST /embedding HTTP/1.1\r\nHost: x\r\nContent-Type: app")
        seconds, received = seconds_until_closed(sock)
    assert received.startswith(b"HTTP/1.1 408 ")
    assert "HEADER_TIMEOUT" in json.loads(received.split(b"\r\n\r\n", 1)[1])["error"]
    assert seconds <= HEADER_TIMEOUT + SLACK


def test_a_client_that_sends_nothing_is_closed(guarded):
    with socket.create_connection(("127.0.0.1", guarded)) as sock:
        seconds, _ = seconds_until_closed(sock)
    assert seconds <= HEADER_TIMEOUT + SLACK


def test_a_client_that_sends_half_its_body_is_closed(guarded):
    with socket.create_connection(("127.0.0.1", guarded)) as sock:
        sock.sendall(b"POST /embedding HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        seconds, received = seconds_until_closed(sock)
    assert received == b""  # no answer: the request never arrived whole
    assert seconds <= BODY_TIMEOUT + SLACK


def test_a_trickling_client_is_closed_although_bytes_keep_coming(guarded):
    """The deadline runs from the start of the headers: a byte now and then does not reset it."""
    closed = False
    with socket.create_connection(("127.0.0.1", guarded)) as sock:
        for byte in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 300:  # 30 s at 0.1 s a byte
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            if select.select([sock], [], [], 0.1)[0]:  # the server answered (408) or closed
                closed = True
                break
    assert closed, "the server kept a trickling connection open"


def test_normal_clients_are_served_while_200_idle_connections_are_open(guarded):
    idle = [socket.create_connection(("127.0.0.1", guarded)) for _ in range(200)]
    try:
        with requests.Session() as session:
            for i in range(20):
                response = session.post(f"http://127.0.0.1:{guarded}/", data=b"y" * i, timeout=30)
                assert response.status_code == 200 and response.json() == {"received": i}
        # And the idle ones do not stay: each is closed by the header deadline.
        for sock in idle:
            seconds, _ = seconds_until_closed(sock)
            assert seconds <= HEADER_TIMEOUT + SLACK
    finally:
        for sock in idle:
            sock.close()


def test_keep_alive_requests_are_not_cut_by_the_deadlines(guarded):
    """A connection that keeps sending whole requests lives longer than both deadlines."""
    with requests.Session() as session:
        started = time.monotonic()
        while time.monotonic() - started < HEADER_TIMEOUT + BODY_TIMEOUT + 0.5:
            assert session.post(f"http://127.0.0.1:{guarded}/", data=b"z" * 10, timeout=30).json() == {"received": 10}
            time.sleep(0.2)


def test_connections_above_the_cap_get_503_and_are_closed():
    with running(Connections(header_timeout=60, body_timeout=60, max_connections=20)) as port:
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
        try:
            time.sleep(0.5)  # let the server register them
            with socket.create_connection(("127.0.0.1", port)) as extra:
                _, received = seconds_until_closed(extra)
            assert received.startswith(b"HTTP/1.1 503 ")
            assert "MAX_CONNECTIONS" in json.loads(received.split(b"\r\n\r\n", 1)[1])["error"]
        finally:
            for sock in idle:
                sock.close()
        deadline = time.monotonic() + 30
        while True:  # once they are gone, new clients are served again
            try:
                response = requests.post(f"http://127.0.0.1:{port}/", data=b"ok", timeout=30)
            except requests.ConnectionError:
                response = None
            if response is not None and response.status_code == 200:
                break
            assert time.monotonic() < deadline, "the cap did not free up"
            time.sleep(0.2)
