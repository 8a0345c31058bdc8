"""The embedding model server: a kserve.Model for sentence-transformers, and its entry point.

Request path: auth_middleware (API key) -> KServe V1, routes.py (legacy, OpenAI, V2 REST) or grpc_v2 (gRPC)
-> EmbeddingModel.preprocess (adapters: body -> texts) -> predict (cache -> batcher -> backend)
-> postprocess (adapters: embeddings -> body).
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is on disk; never reach for a hub

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from kserve import Model
from kserve.protocol.infer_type import InferRequest, InferResponse

from auth_middleware import AUTHORIZATION_HEADER, KEY_HEADER, presented_keys
from embedding_server.engine.backends import Backend, create_backend
from embedding_server.engine.batcher import Batcher, Embedded
from embedding_server.engine.cache import (
    NAMESPACE_HEADER,
    CachingEmbedder,
    EmbeddingCache,
    model_identity,
    namespace_of,
)
from embedding_server.engine.model_dir import ModelDir, check_model_dir
from embedding_server.operations.observability import configure_logging
from embedding_server.operations.settings import (
    BACKEND_CHOICES,
    DEFAULT_EMBEDDING_CACHE_MB,
    DEFAULT_MAX_BATCH_TOKENS,
    PRECISION_CHOICES,
    Limits,
    Settings,
    SettingsError,
    Streams,
)
from embedding_server.protocols.adapters import (
    INPUT_NAME,
    OUTPUT_NAME,
    check_limits,
    cost_headers,
    infer_response,
    texts_from_infer_request,
    texts_from_instances,
)

logger = logging.getLogger(__name__)


def cache_namespace(headers: Mapping[str, str] | None) -> str:
    """The caller's embedding-cache namespace, from its API key; in a Ray replica, which never sees the key, from
    the header the front end set in its place (a client's own copy of that header is dropped there)."""
    headers = headers or {}
    keys = presented_keys([headers.get(KEY_HEADER, "")], [headers.get(AUTHORIZATION_HEADER, "")])
    if keys:
        return namespace_of(min(keys))
    return headers.get(NAMESPACE_HEADER, "")


@dataclass
class EmbedRequest:
    """What preprocess hands to predict: the texts, and how the caller wants the answer back."""

    texts: list[str]
    v2_request: InferRequest | None = None  # None for V1 and the routes built on it


@dataclass
class EmbedResult:
    request: EmbedRequest
    embedded: Embedded


class EmbeddingModel(Model):
    def __init__(self, name: str, model_path: str, backend: str = "auto", precision: str = "auto",
                 max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS, limits: Limits | None = None, threads: int | None = None,
                 cache_dir: str | None = None, trust_remote_code: bool = False,
                 embedding_cache_mb: int = DEFAULT_EMBEDDING_CACHE_MB, streams: Streams | None = None,
                 backend_factory: Callable[..., Backend] = create_backend):
        super().__init__(name, return_response_headers=True)
        self.model_path = model_path
        self.trust_remote_code = trust_remote_code  # the model's own Python code may run (model_dir.py decides)
        self.backend_name = backend
        self.precision = precision
        self.max_batch_tokens = max_batch_tokens
        self.limits = limits or Limits()
        self.threads = threads  # None: every core this process may use
        self.cache_dir = cache_dir  # where converted models are kept; None: the backends' default
        self.streams = streams or Streams()
        self.backend_factory = backend_factory  # tests plug in a small deterministic backend here
        self.backend = None
        self.batcher: Batcher | None = None
        self.embedding_cache_mb = embedding_cache_mb  # 0: no cache
        self.embedder: CachingEmbedder | None = None

    def load(self) -> bool:
        self.backend = self.backend_factory(self.model_path, backend=self.backend_name, precision=self.precision,
                                            threads=self.threads, cache_dir=self.cache_dir,
                                            trust_remote_code=self.trust_remote_code, streams=self.streams.streams)
        self.batcher = Batcher(self.backend, max_batch_tokens=self.max_batch_tokens,
                               max_queued_texts=self.limits.max_queued_texts,
                               max_queue_seconds=self.limits.max_queue_seconds, streams=self.backend.streams,
                               streams_queue_tokens=self.streams.queue_tokens)
        cache = None
        if self.embedding_cache_mb:
            model_id = model_identity(self.model_path, self.backend.name, self.backend.max_seq_length)
            cache = EmbeddingCache(self.embedding_cache_mb * 1024 * 1024, model_id)
        self.embedder = CachingEmbedder(self.batcher, cache)
        logger.info("Loaded %s from %s with backend %s (%d dims, %d tokens max, embedding cache %d MB)", self.name,
                    self.model_path, self.backend.name, self.backend.dimension, self.backend.max_seq_length,
                    self.embedding_cache_mb)
        self.ready = True
        return self.ready

    def stop(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
        self.ready = False

    def validate(self, payload: Any) -> Any:
        return payload  # preprocess has validated it already

    async def get_input_types(self) -> list[dict]:
        return [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}]

    async def get_output_types(self) -> list[dict]:
        return [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, self.backend.dimension]}]

    async def preprocess(self, payload: dict | InferRequest, headers: dict[str, str] | None = None) -> EmbedRequest:
        if isinstance(payload, InferRequest):
            texts = check_limits(texts_from_infer_request(payload), self.limits)
            return EmbedRequest(texts, v2_request=payload)
        return EmbedRequest(check_limits(texts_from_instances(payload), self.limits))

    async def predict(self, payload: EmbedRequest, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> EmbedResult:
        namespace = cache_namespace(headers) if self.embedder.cache is not None else ""  # no cache: no key hashing
        return EmbedResult(payload, await self.embedder.embed(payload.texts, namespace))

    async def postprocess(self, result: EmbedResult, headers: dict[str, str] | None = None,
                          response_headers: dict[str, str] | None = None) -> dict | InferResponse:
        if response_headers is not None:
            response_headers.update(cost_headers(result.embedded))
        embeddings = result.embedded.embeddings
        if result.request.v2_request is not None:
            return infer_response(self.name, result.request.v2_request, embeddings)
        return {"predictions": embeddings}


def build_parser(settings: Settings) -> argparse.ArgumentParser:
    from kserve.model_server import parser as kserve_parser

    parser = argparse.ArgumentParser(parents=[kserve_parser], description=__doc__.splitlines()[0])
    # KServe passes --model_dir to a runtime; --model_path is this server's older name. Both set one value, and
    # the last one on the command line wins, over MODEL_PATH.
    parser.add_argument("--model_dir", "--model_path", dest="model_path", default=settings.model_path,
                        help="A sentence-transformers model directory (env MODEL_PATH)")
    parser.add_argument("--trust_remote_code", action="store_true", default=settings.trust_remote_code,
                        help="Let a model directory run its own Python code (env TRUST_REMOTE_CODE)")
    parser.add_argument("--backend", default=settings.backend, choices=BACKEND_CHOICES)
    parser.add_argument("--precision", default=settings.precision, choices=PRECISION_CHOICES)
    parser.set_defaults(http_port=settings.http_port, grpc_port=settings.grpc_port, model_name=settings.model_name,
                        grpc_max_receive_message_length=settings.limits.max_body_bytes)
    return parser


def print_generated_key_banner(key: str) -> None:
    """The seed's warning, printed once so that a local user can copy the key."""
    print("⚠️  WARNING: No API_KEY environment variable set!", flush=True)
    print(f"🔑 Generated API Key: {key}", flush=True)


def load_or_exit(model: EmbeddingModel) -> None:
    """Load, or exit with one line: what the loaders raise about a directory that passed check_model_dir (weights
    that do not match the config, a config value of the wrong type) is the operator's to fix, not a traceback."""
    try:
        model.load()
    except Exception as exc:  # noqa: BLE001 - any loader error ends the start with its own message
        logger.debug("loading %s failed", model.model_path, exc_info=True)
        reason = " ".join(str(exc).split())
        sys.exit(f"Configuration error: the model in {model.model_path} could not be loaded: "
                 f"{type(exc).__name__}: {reason}")


def exit_now(code: int = 0) -> NoReturn:
    """End the process once the server has drained: logs and output flushed, then out without the interpreter's
    teardown, which spends 1.5-2 s of a stop's grace period freeing torch, transformers and KServe object by object
    (measured on 2 cores). Entry points only (`__main__`): code that called main() keeps its process."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


@dataclass
class StartUp:
    settings: Settings
    args: argparse.Namespace
    model_dir: ModelDir | None  # None when the entry point serves no model directory of its own


@contextlib.contextmanager
def configuration_errors() -> Iterator[None]:
    """A setting or model directory the operator must fix ends the start with one line, not a traceback."""
    try:
        yield
    except SettingsError as exc:  # ModelDirError too
        sys.exit(f"Configuration error: {exc}")


def start_up(argv: list[str] | None, make_parser: Callable[[Settings], argparse.ArgumentParser], scale_hint: str,
             needs_model_dir: Callable[[argparse.Namespace], bool] = lambda args: True) -> StartUp:
    """What every entry point does first: settings from the environment, logging, the flags, one worker, the model
    directory checked (before anything slow starts), and the banner of a generated key."""
    with configuration_errors():
        settings = Settings.from_env()
    configure_logging(settings.log_level, settings.log_format)
    args = make_parser(settings).parse_args(argv)
    if args.workers != 1:
        sys.exit(f"--workers must be 1: {scale_hint}")
    with configuration_errors():
        model_dir = check_model_dir(args.model_path, args.trust_remote_code) if needs_model_dir(args) else None
    if settings.api_key_generated:
        print_generated_key_banner(settings.api_keys[0])
    return StartUp(settings, args, model_dir)


def main(argv: list[str] | None = None) -> None:
    started = start_up(argv, build_parser, "the batcher gathers all requests of one process; scale with replicas")
    settings, args, model_dir = started.settings, started.args, started.model_dir

    from embedding_server.server import create_server

    model = EmbeddingModel(args.model_name, model_dir.path, backend=args.backend, precision=args.precision,
                           max_batch_tokens=settings.max_batch_tokens, limits=settings.limits,
                           cache_dir=settings.cache_dir, trust_remote_code=model_dir.has_code,
                           embedding_cache_mb=settings.embedding_cache_mb, streams=settings.streams)
    load_or_exit(model)
    server = create_server(model, settings, args, dimension=model.backend.dimension)
    server.start([model])


if __name__ == "__main__":
    main()
    exit_now()
