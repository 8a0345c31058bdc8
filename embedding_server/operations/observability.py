"""Request ids, one access-log line per request, the Prometheus series, and the log format.

ObservabilityMiddleware goes outermost, so that it also sees the answers of the layers before the routes:
the key check's 401/403 and CORS preflights. The series live in prometheus_client's default registry,
which KServe's GET /metrics already serves.
"""
from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO

from prometheus_client import Counter, Gauge, Histogram
from starlette.datastructures import Headers
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from auth_middleware import KEY_INVALID, KEY_OUTCOME
from embedding_server.operations.errors import InternalError, error_response
from embedding_server.operations.settings import LOG_FORMATS

logger = logging.getLogger(__name__)

ACCESS_LOGGER_NAME = "embedding.access"
REQUEST_ID_HEADER = "x-request-id"
COMPUTE_TEXTS = "x-compute-texts"
COMPUTED_TEXTS = "x-computed-texts"
COMPUTE_TOKENS = "x-compute-tokens"
TRUNCATED_TEXTS = "x-truncated-texts"
COMPUTE_TIME = "x-compute-time"
QUEUE_TIME = "x-queue-time"
# What a request cost, in the headers TEI uses: name -> meaning (the API docs show it).
COST_HEADERS = {
    COMPUTE_TEXTS: "Texts embedded",
    COMPUTED_TEXTS: "Of those, texts the model computed for this request (the others came from the embedding cache)",
    COMPUTE_TOKENS: "Tokens embedded, after truncation",
    TRUNCATED_TEXTS: "Texts cut at the model's token limit",
    COMPUTE_TIME: "Model time in milliseconds",
    QUEUE_TIME: "Milliseconds waited for a batch",
}
_REQUEST_ID_RE = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII without spaces: safe in a log line
UNMATCHED_ROUTE = "unmatched"
CLIENT_CLOSED = 499  # nginx's status for "the client went away before the answer"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
MAX_LOGGED_PATH = 200

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_TEXT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
BATCH_TOKEN_BUCKETS = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)

REQUESTS = Counter("embedding_requests_total", "HTTP requests answered, by route template, method and status",
                   ["route", "method", "status"])
REQUEST_SECONDS = Histogram("embedding_request_duration_seconds",
                            "Time from a request's arrival to its last response byte handed to the server",
                            ["route"], buckets=LATENCY_BUCKETS)
QUEUE_SECONDS = Histogram("embedding_queue_wait_seconds",
                          "Time a request's texts waited in the batcher's queue before its first batch ran",
                          buckets=LATENCY_BUCKETS)
BATCH_SECONDS = Histogram("embedding_batch_duration_seconds", "Model time of one micro-batch",
                          buckets=LATENCY_BUCKETS)
BATCH_TEXTS = Histogram("embedding_batch_texts", "Texts in one micro-batch (every protocol, gRPC included)",
                        buckets=BATCH_TEXT_BUCKETS)
BATCH_TOKENS = Histogram("embedding_batch_tokens", "Tokens in one micro-batch, padding excluded (every protocol)",
                         buckets=BATCH_TOKEN_BUCKETS)
TEXTS = Counter("embedding_texts_total", "Texts embedded for HTTP answers (the x-compute-texts headers)")
TOKENS = Counter("embedding_tokens_total", "Tokens embedded for HTTP answers (the x-compute-tokens headers)")
TRUNCATED = Counter("embedding_truncated_texts_total",
                    "Texts cut at the model's token limit for HTTP answers (the x-truncated-texts headers)")
REJECTIONS = Counter("embedding_rejections_total", "HTTP requests refused, by reason", ["reason"])

CACHE_HITS = Counter("embedding_cache_hits_total", "Texts answered from the embedding cache (every protocol)")
CACHE_MISSES = Counter("embedding_cache_misses_total",
                       "Texts not in the embedding cache: computed, or joined to the same text's computation in flight")
CACHE_EVICTIONS = Counter("embedding_cache_evictions_total", "Entries dropped from the embedding cache to make room")
CACHE_BYTES = Gauge("embedding_cache_bytes", "Memory held by the embedding cache's entries (EMBEDDING_CACHE_MB bounds it)")
CACHE_ENTRIES = Gauge("embedding_cache_entries", "Texts in the embedding cache")

REJECTION_REASONS = ("auth_missing", "auth_invalid", "limits", "invalid_input", "overloaded", "unavailable")
for _reason in REJECTION_REASONS:
    REJECTIONS.labels(_reason)  # every reason is scraped from the start, at 0

_COST_FIELDS = {COMPUTE_TEXTS.encode(): "texts", COMPUTE_TOKENS.encode(): "tokens", TRUNCATED_TEXTS.encode(): "truncated"}


def observe_batch(texts: int, tokens: int, seconds: float) -> None:
    """One micro-batch the batcher ran: its size and its model time."""
    BATCH_TEXTS.observe(texts)
    BATCH_TOKENS.observe(tokens)
    BATCH_SECONDS.observe(seconds)


def observe_queue_wait(seconds: float) -> None:
    """How long one request waited before its first batch ran (the x-queue-time header)."""
    QUEUE_SECONDS.observe(seconds)


def observe_cache_lookups(hits: int, misses: int) -> None:
    """One request's texts looked up in the embedding cache."""
    CACHE_HITS.inc(hits)
    CACHE_MISSES.inc(misses)


def observe_cache_size(size_bytes: int, entries: int, evicted: int) -> None:
    """The embedding cache after an entry was added (and ``evicted`` older ones dropped)."""
    CACHE_BYTES.set(size_bytes)
    CACHE_ENTRIES.set(entries)
    CACHE_EVICTIONS.inc(evicted)


def accepted_request_id(value: str | None) -> str:
    """The client's X-Request-Id if it is safe to echo and log, else a new one."""
    if value is not None and _REQUEST_ID_RE.fullmatch(value):
        return value
    return uuid.uuid4().hex


def rejection_reason(status: int, key_invalid: bool) -> str | None:
    """Why a request was refused, from its status and the key check's outcome: OpenAI routes answer 401 for a
    wrong key too."""
    if status == 401:
        return "auth_invalid" if key_invalid else "auth_missing"
    if status == 403:
        return "auth_invalid"
    if status == 413:
        return "limits"
    if status in (400, 422):
        return "invalid_input"
    if status == 429:
        return "overloaded"
    if status == 503:
        return "unavailable"
    return None


def route_template(scope: Scope) -> str | None:
    """The template of the route that answers this scope (e.g. /v1/models/{model_name}:predict), or None.

    The router records it in scope["route"]; a request refused before routing (401, preflight) is
    matched here against the app's routes so that it still gets its template, not its raw path.
    """
    path = getattr(scope.get("route"), "path", None)
    if path:
        return path
    for route in getattr(scope.get("app"), "routes", ()):
        match, _ = route.matches(scope)
        if match != Match.NONE:
            return getattr(route, "path", None) or None
    return None


def _loggable(text: str) -> str:
    text = text[:MAX_LOGGED_PATH]
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


@dataclass
class _Answer:
    status: int | None = None
    texts: int | None = None
    tokens: int | None = None
    truncated: int | None = None
    finished: bool = False


class ObservabilityMiddleware:
    """Pure ASGI: gives every HTTP answer an X-Request-Id, logs it once and counts it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.access = logging.getLogger(ACCESS_LOGGER_NAME)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = accepted_request_id(Headers(scope=scope).get(REQUEST_ID_HEADER))
        scope.setdefault("state", {})["request_id"] = request_id
        id_header = (REQUEST_ID_HEADER.encode(), request_id.encode("ascii"))
        answer = _Answer()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                answer.status = message["status"]
                raw = [(k, v) for k, v in message.get("headers", ()) if k.lower() != id_header[0]]
                raw.append(id_header)
                message = {**message, "headers": raw}
                self._read_costs(raw, answer)
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                # Counted before the last byte leaves, so a scrape after the answer always includes it; logged
                # after, so that the answer does not wait for the access line to be formatted and written.
                fields = self._finish(scope, request_id, answer, started)
                try:
                    await send(message)
                finally:
                    self._log(fields)
                return
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            if answer.status is not None:
                raise  # the answer has begun: too late for a 500; counted and logged once, below
            logger.exception("Unhandled error answering request %s", request_id)
            await error_response(InternalError(request_id), scope["path"])(scope, receive, send_with_id)
        finally:
            if not answer.finished:
                self._log(self._finish(scope, request_id, answer, started))

    @staticmethod
    def _read_costs(raw: list[tuple[bytes, bytes]], answer: _Answer) -> None:
        for key, value in raw:
            field = _COST_FIELDS.get(key.lower())
            if field is not None and value.isdigit():
                setattr(answer, field, int(value))

    def _finish(self, scope: Scope, request_id: str, answer: _Answer, started: float) -> dict:
        """Counts the answer in the Prometheus series; returns its access-line fields."""
        answer.finished = True
        seconds = time.perf_counter() - started
        status = answer.status or CLIENT_CLOSED
        method = scope["method"] if scope["method"] in METHODS else "other"
        template = route_template(scope)
        route = template or UNMATCHED_ROUTE
        REQUESTS.labels(route, method, str(status)).inc()
        REQUEST_SECONDS.labels(route).observe(seconds)
        if 200 <= status < 300:
            for count, counter in ((answer.texts, TEXTS), (answer.tokens, TOKENS), (answer.truncated, TRUNCATED)):
                if count:
                    counter.inc(count)
        reason = rejection_reason(status, scope["state"].get(KEY_OUTCOME) == KEY_INVALID)
        if reason is not None:
            REJECTIONS.labels(reason).inc()
        fields = {
            "request_id": request_id,
            "method": method,
            "route": template or _loggable(scope["path"]),
            "status": status,
            "texts": answer.texts,
            "tokens": answer.tokens,
            "duration_ms": round(seconds * 1000, 3),
        }
        return fields

    def _log(self, fields: dict) -> None:
        self.access.info("request_id=%s method=%s route=%s status=%d texts=%s tokens=%s duration_ms=%.3f",
                         fields["request_id"], fields["method"], fields["route"], fields["status"],
                         "-" if fields["texts"] is None else fields["texts"],
                         "-" if fields["tokens"] is None else fields["tokens"], fields["duration_ms"],
                         extra={"access": fields})


# --- log format ---------------------------------------------------------------------------------------------------

TEXT_FORMAT = "%(asctime)s.%(msecs)03d %(levelname)s %(name)s %(message)s"
TEXT_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
# KServe gives these their own handlers (and propagate=False); ours replace them so that every line has one format.
OWN_HANDLER_LOGGERS = ("kserve", "kserve.trace", "uvicorn", "uvicorn.error")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the access fields as keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "access", None) or {})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(level: str = "INFO", fmt: str = "text", stream: IO[str] | None = None) -> logging.Handler:
    """Every logger of the process to one handler in one format, whether or not KServe configured logging first.

    KServe configures logging only when its "kserve" logger has no handler, so calling this before or
    after ModelServer() gives the same result. uvicorn's access log is silenced and KServe's timing lines
    are kept for DEBUG: the access lines of ObservabilityMiddleware replace both (uvicorn's would log the
    query string).
    """
    level = level.upper()
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {fmt!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT, TEXT_DATE_FORMAT))
    root = logging.getLogger()
    for old in root.handlers[:]:  # basicConfig's or our previous one: each line is written once
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in OWN_HANDLER_LOGGERS:
        named = logging.getLogger(name)
        named.handlers = [handler]
        named.propagate = False
        named.setLevel(level)
    # KServe's per-request timing lines repeat the access line (and name raw paths): only at DEBUG.
    logging.getLogger("kserve.trace").setLevel(level if logging.getLevelName(level) == logging.DEBUG else "WARNING")
    logging.captureWarnings(True)  # Python warnings in the same format, not raw on stderr
    # uvicorn logs access lines only while this logger has a handler somewhere up its chain.
    uvicorn_access = logging.getLogger("uvicorn.access")
    uvicorn_access.handlers = []
    uvicorn_access.propagate = False
    uvicorn_access.disabled = True  # and its lines would hold the query string, where a careless client puts a key
    return handler
