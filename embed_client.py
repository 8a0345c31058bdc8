"""Client for the embedding server: a Python API and a command line that embeds a whole file.

    python embed_client.py texts.txt vectors.jsonl --url http://127.0.0.1:8080 --route v1

The file is sent in batches, one request each. 429, 502, 503, 504 and connection errors are retried
with exponential backoff that honours Retry-After; other 4xx fail at once with the server's message.
Progress is saved after every batch, so running the same command again after an interruption sends
only the batches that are not done yet. The key comes from --api-key or $EMBEDDING_API_KEY and only
ever travels in a header: X-Api-Key (legacy and V1 routes) or Authorization: Bearer (OpenAI route).

Needs only requests, numpy and tqdm (orjson is used when present, for speed and shorter output).
"""
from __future__ import annotations

import argparse
import csv
import email.utils
import hashlib
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import Any

import numpy as np
import requests

try:
    import orjson
except ImportError:
    orjson = None

logger = logging.getLogger(__name__)

ROUTES = ("v1", "legacy", "openai")
DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_MODEL = "all-MiniLM-L6-v2"
KEY_ENV = "EMBEDDING_API_KEY"
URL_ENV = "EMBEDDING_URL"
RETRY_STATUSES = frozenset({429, 502, 503, 504})
INPUT_FORMATS = ("txt", "jsonl", "csv")
EMPTY_POLICIES = ("skip", "keep", "error")
STATE_VERSION = 1


class EmbeddingError(RuntimeError):
    """The server refused a request, answered nonsense, or kept failing after every retry."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class InputError(ValueError):
    """The input file cannot be read as asked (bad format, missing field or column)."""


class ResumeError(RuntimeError):
    """Saved progress or an existing output does not belong to this job."""


def _loads(data: bytes | str) -> Any:
    return orjson.loads(data) if orjson is not None else json.loads(data)


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP-date (RFC 9110). None if absent or unreadable."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass(frozen=True)
class RetryPolicy:
    """At most ``max_attempts`` requests per batch. Waits double from ``base_delay`` (with jitter) up to
    ``max_delay``; a Retry-After from the server replaces the doubling, also capped at ``max_delay``."""

    max_attempts: int = 6
    base_delay: float = 0.5
    max_delay: float = 60.0

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        if retry_after is not None:
            # never earlier than asked; a little spread so that many clients do not return in step
            return min(self.max_delay, retry_after * (1 + 0.1 * rng.random()))
        step = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        return step * (0.5 + 0.5 * rng.random())


def _server_message(response: requests.Response) -> str:
    try:
        body = _loads(response.content)
    except ValueError:
        return response.text[:500].strip() or response.reason
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):  # OpenAI style {"error": {"message": ...}}
            error = error.get("message")
        parts = [str(p) for p in (error, body.get("message"), body.get("detail")) if p]
        if parts:
            return ": ".join(dict.fromkeys(parts))
    return str(body)[:500]


class EmbeddingClient:
    """Embed texts through one of the server's routes.

    ``route``: "v1" (POST /v1/models/{model}:predict), "legacy" (POST /embedding with an ID map) or
    "openai" (POST /openai/v1/embeddings). ``embed`` splits into requests of ``batch_size`` texts.
    """

    def __init__(self, url: str = DEFAULT_URL, api_key: str | None = None, route: str = "v1",
                 model: str = DEFAULT_MODEL, batch_size: int = 64, timeout: float = 120.0,
                 retry: RetryPolicy | None = None, session: requests.Session | None = None):
        if route not in ROUTES:
            raise ValueError(f"route must be one of {', '.join(ROUTES)}, not {route!r}")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.url = url.rstrip("/")
        self.route = route
        self.model = model
        self.batch_size = batch_size
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.session = session or requests.Session()
        self._headers = {"Content-Type": "application/json", "User-Agent": "embed-client/1"}
        if api_key:
            if route == "openai":
                self._headers["Authorization"] = f"Bearer {api_key}"
            else:
                self._headers["X-Api-Key"] = api_key
        self._rng = random.Random()
        self.requests_sent = 0

    def __repr__(self) -> str:
        return f"EmbeddingClient(url={self.url!r}, route={self.route!r}, model={self.model!r})"

    def __enter__(self) -> EmbeddingClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self.session.close()

    @property
    def path(self) -> str:
        if self.route == "v1":
            return f"/v1/models/{self.model}:predict"
        if self.route == "legacy":
            return "/embedding"
        return "/openai/v1/embeddings"

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """float32 [len(texts), dim], rows in the order of ``texts``; [0, 0] for no texts."""
        if isinstance(texts, str):
            raise TypeError("embed takes a sequence of texts; wrap a single text in a list")
        parts = [self.embed_batch(texts[i:i + self.batch_size]) for i in range(0, len(texts), self.batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)

    def embed_batch(self, texts: Sequence[str]) -> np.ndarray:
        """One request (retried as the policy says). float32 [len(texts), dim]."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        response = self._post(self._body(texts))
        try:
            rows = self._rows(_loads(response.content), len(texts))
            vectors = np.asarray(rows, dtype=np.float32)
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise EmbeddingError(f"unexpected answer from {self.path}: {exc}") from None
        if vectors.ndim != 2 or vectors.shape[0] != len(texts) or vectors.shape[1] == 0:
            raise EmbeddingError(f"{self.path} answered shape {vectors.shape} for {len(texts)} texts")
        return vectors

    def _body(self, texts: list[str]) -> dict[str, Any]:
        if self.route == "v1":
            return {"instances": texts}
        if self.route == "legacy":
            # positional keys: the caller's own ids may repeat or not be strings
            return {str(i): text for i, text in enumerate(texts)}
        return {"input": texts, "model": self.model, "encoding_format": "float"}

    def _rows(self, body: Any, count: int) -> list[Any]:
        if self.route == "v1":
            return body["predictions"]
        if self.route == "legacy":
            return [_loads(body[str(i)]) for i in range(count)]
        items = sorted(body["data"], key=lambda item: item["index"])
        if [item["index"] for item in items] != list(range(count)):
            raise ValueError(f"indices in 'data' are not 0..{count - 1}")
        return [item["embedding"] for item in items]

    def _post(self, body: dict[str, Any]) -> requests.Response:
        url = self.url + self.path
        data = orjson.dumps(body) if orjson is not None else json.dumps(body).encode()
        attempts = max(1, self.retry.max_attempts)
        for attempt in range(1, attempts + 1):
            retry_after, status = None, None
            try:
                self.requests_sent += 1
                response = self.session.post(url, data=data, headers=self._headers, timeout=self.timeout)
            except (requests.ConnectionError, requests.Timeout) as exc:
                problem = f"{type(exc).__name__} ({exc})"
            else:
                if response.status_code < 400:
                    return response
                if response.status_code not in RETRY_STATUSES:
                    hint = " (check the API key)" if response.status_code in (401, 403) else ""
                    raise EmbeddingError(f"{self.path} answered {response.status_code}: "
                                         f"{_server_message(response)}{hint}", response.status_code)
                status = response.status_code
                problem = f"HTTP {status}: {_server_message(response)}"
                retry_after = retry_after_seconds(response.headers.get("Retry-After"))
            if attempt == attempts:
                raise EmbeddingError(f"{self.path}: gave up after {attempts} attempts; last: {problem}", status)
            wait = self.retry.delay(attempt, retry_after, self._rng)
            logger.warning("%s from %s; retry %d of %d in %.2fs", problem, self.path, attempt, attempts - 1, wait)
            time.sleep(wait)
        raise AssertionError("unreachable")


# ---------------------------------------------------------------- input

@dataclass
class Records:
    ids: list[Any]
    texts: list[str]
    skipped: list[Any] = field(default_factory=list)

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for id_, text in zip(self.ids, self.texts):
            digest.update(json.dumps([id_, text], ensure_ascii=False).encode())
            digest.update(b"\n")
        return digest.hexdigest()


def input_format(path: Path, given: str | None = None) -> str:
    if given:
        return given
    suffix = path.suffix.lower().lstrip(".")
    if suffix in ("txt", "text", ""):
        return "txt"
    if suffix in ("jsonl", "ndjson"):
        return "jsonl"
    if suffix in ("csv",):
        return "csv"
    raise InputError(f"cannot tell the format of {path.name} from its extension; pass --input-format")


def read_records(path: str | Path, fmt: str | None = None, text_field: str = "text", id_field: str | None = None,
                 column: str = "text", id_column: str | None = None, empty: str = "skip") -> Records:
    """Read (id, text) pairs. Ids: the line number (txt, jsonl) or data-row number (csv) unless a field/column names them.

    A text that is empty or only whitespace is left out and its id listed in ``skipped`` (``empty="skip"``),
    sent as it is (``"keep"``), or stops the run (``"error"``).
    """
    path = Path(path)
    fmt = input_format(path, fmt)
    if empty not in EMPTY_POLICIES:
        raise ValueError(f"empty must be one of {EMPTY_POLICIES}")
    records = Records([], [])

    def add(id_: Any, text: str, where: str) -> None:
        if not text.strip():
            if empty == "error":
                raise InputError(f"{where}: empty text (use --empty skip or --empty keep)")
            if empty == "skip":
                records.skipped.append(id_)
                return
        records.ids.append(id_)
        records.texts.append(text)

    try:
        if fmt == "txt":
            with path.open(encoding="utf-8-sig") as handle:
                for number, line in enumerate(handle, 1):
                    add(number, line.rstrip("\r\n"), f"{path.name} line {number}")
        elif fmt == "jsonl":
            with path.open(encoding="utf-8-sig") as handle:
                for number, line in enumerate(handle, 1):
                    if not line.strip():
                        continue
                    where = f"{path.name} line {number}"
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise InputError(f"{where}: not JSON ({exc})") from None
                    if not isinstance(obj, dict):
                        raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
                    if text_field not in obj:
                        raise InputError(f"{where}: no field {text_field!r} (fields: {', '.join(obj)}); "
                                         "choose one with --text-field")
                    text = obj[text_field]
                    if text is None:
                        text = ""
                    if not isinstance(text, str):
                        raise InputError(f"{where}: field {text_field!r} is {type(text).__name__}, not a string")
                    if id_field is not None and id_field not in obj:
                        raise InputError(f"{where}: no id field {id_field!r}")
                    add(obj[id_field] if id_field is not None else number, text, where)
        elif fmt == "csv":
            with path.open(encoding="utf-8-sig", newline="") as handle:
                reader = csv.DictReader(handle)
                names = reader.fieldnames or []
                for wanted, flag in ((column, "--column"), (id_column, "--id-column")):
                    if wanted is not None and wanted not in names:
                        raise InputError(f"{path.name}: no column {wanted!r} (columns: {', '.join(names)}); "
                                         f"choose one with {flag}")
                for number, row in enumerate(reader, 1):
                    add(row[id_column] if id_column is not None else number, row[column] or "",
                        f"{path.name} row {number}")
        else:
            raise InputError(f"unknown input format {fmt!r}; one of {', '.join(INPUT_FORMATS)}")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path.name} is not UTF-8 text ({exc})") from None
    return records


# ---------------------------------------------------------------- output with saved progress

def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _dumps_line(obj: dict[str, Any]) -> bytes:
    if orjson is not None:
        return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE)
    obj = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in obj.items()}
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode()


class _Sink:
    """Where finished batches go, and what is already done. State lives next to the output."""

    def __init__(self, output: Path, job: dict[str, Any], overwrite: bool):
        self.output = output
        self.job = job
        self.state_path = output.with_name(output.name + ".state.json")
        if overwrite:
            self.discard()
        state = self._load_state()
        if state is None and self._has_output():
            raise ResumeError(f"{output} exists and there is no saved progress for it; "
                              "pass --overwrite to replace it")
        if state is not None and state.get("job") != job:
            raise ResumeError(f"saved progress in {self.state_path.name} is for another job (different input, "
                              "batch size or model); rerun with the same options, or pass --overwrite to start over")
        self.state = state or {"version": STATE_VERSION, "job": job}
        if state is None:
            self._start()
            self._save_state()

    def _load_state(self) -> dict[str, Any] | None:
        if not self.state_path.exists():
            return None
        try:
            return json.loads(self.state_path.read_text(encoding="utf-8"))
        except (ValueError, OSError) as exc:
            raise ResumeError(f"cannot read {self.state_path}: {exc}; pass --overwrite to start over") from None

    def _save_state(self) -> None:
        _write_atomic(self.state_path, json.dumps(self.state).encode())

    def _has_output(self) -> bool:
        return self.output.exists()

    def _start(self) -> None:
        pass

    def discard(self) -> None:
        for path in (self.output, self.state_path):
            path.unlink(missing_ok=True)

    def done(self) -> set[int]:
        raise NotImplementedError

    def write(self, index: int, ids: list[Any], vectors: np.ndarray) -> None:
        raise NotImplementedError

    def finish(self, records: Records) -> None:
        self.state_path.unlink(missing_ok=True)


class _JsonlSink(_Sink):
    """Append-only JSONL. The state holds how many batches and bytes are done; on resume the file is cut
    back to that size, so lines from a batch that was written but not recorded are not kept twice."""

    def _start(self) -> None:
        self.output.write_bytes(b"")
        self.state.update(done_batches=0, output_bytes=0)

    def done(self) -> set[int]:
        size = self.output.stat().st_size if self.output.exists() else -1
        if size < self.state["output_bytes"]:
            raise ResumeError(f"{self.output} is shorter than its saved progress says; pass --overwrite to start over")
        return set(range(self.state["done_batches"]))

    def write(self, index: int, ids: list[Any], vectors: np.ndarray) -> None:
        if index != self.state["done_batches"]:
            raise AssertionError(f"JSONL batches must come in order: got {index}, expected {self.state['done_batches']}")
        data = b"".join(_dumps_line({"id": id_, "embedding": row}) for id_, row in zip(ids, vectors))
        with open(self.output, "r+b") as handle:
            handle.truncate(self.state["output_bytes"])
            handle.seek(self.state["output_bytes"])
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
            size = handle.tell()
        self.state.update(done_batches=index + 1, output_bytes=size)
        self._save_state()

    def finish(self, records: Records) -> None:
        with open(self.output, "r+b") as handle:
            handle.truncate(self.state["output_bytes"])
        super().finish(records)


class _NpySink(_Sink):
    """One .npy part per batch in OUTPUT.parts/; at the end they are joined into float32 [n, dim] in input order,
    and the ids go to a sidecar OUTPUT-stem.ids.jsonl (one JSON value a line, row i = line i)."""

    @property
    def parts(self) -> Path:
        return self.output.with_name(self.output.name + ".parts")

    @property
    def ids_path(self) -> Path:
        return self.output.with_suffix(".ids.jsonl")

    def _has_output(self) -> bool:
        return self.output.exists() or self.parts.exists()

    def _start(self) -> None:
        self.parts.mkdir(parents=True, exist_ok=True)

    def discard(self) -> None:
        super().discard()
        self.ids_path.unlink(missing_ok=True)
        if self.parts.exists():
            shutil.rmtree(self.parts)

    def _part(self, index: int) -> Path:
        return self.parts / f"batch-{index:07d}.npy"

    def done(self) -> set[int]:
        batch_size, count = self.job["batch_size"], self.job["count"]
        found = set()
        for path in self.parts.glob("batch-*.npy"):
            index = int(path.stem.split("-")[1])
            expected = min(batch_size, count - index * batch_size)
            if expected > 0 and np.load(path, mmap_mode="r").shape[0] == expected:
                found.add(index)
        return found

    def write(self, index: int, ids: list[Any], vectors: np.ndarray) -> None:
        tmp = self._part(index).with_suffix(".tmp")
        with open(tmp, "wb") as handle:
            np.save(handle, vectors.astype(np.float32, copy=False))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self._part(index))

    def finish(self, records: Records) -> None:
        batch_size, count = self.job["batch_size"], self.job["count"]
        batches = math.ceil(count / batch_size)
        dim = np.load(self._part(0), mmap_mode="r").shape[1]
        tmp = self.output.with_name(self.output.name + ".tmp.npy")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(count, dim))
        for index in range(batches):
            out[index * batch_size:(index + 1) * batch_size] = np.load(self._part(index))
        out.flush()
        del out
        os.replace(tmp, self.output)
        _write_atomic(self.ids_path, b"".join(_dumps_line_value(id_) for id_ in records.ids))
        shutil.rmtree(self.parts)
        super().finish(records)


def _dumps_line_value(value: Any) -> bytes:
    return (json.dumps(value, ensure_ascii=False) + "\n").encode()


@dataclass
class FileResult:
    total_batches: int
    done_batches: int
    sent_batches: int
    count: int
    skipped: int
    complete: bool


def embed_file(client: EmbeddingClient, records: Records, output: str | Path, max_batches: int | None = None,
               overwrite: bool = False, progress: bool = True,
               on_batch: Callable[[int], None] | None = None) -> FileResult:
    """Embed ``records`` into ``output`` (.jsonl or .npy), skipping batches already done by an earlier run.

    ``max_batches`` stops after that many new batches (the rest is left for a later run).
    """
    from tqdm import tqdm

    output = Path(output)
    suffix = output.suffix.lower()
    if suffix not in (".jsonl", ".npy"):
        raise InputError(f"output must end in .jsonl or .npy, not {output.name}")
    count, batch_size = len(records.texts), client.batch_size
    if count == 0:
        raise InputError("there are no texts to embed" + (f" ({len(records.skipped)} empty skipped)"
                                                         if records.skipped else ""))
    job = {"input_sha256": records.fingerprint(), "count": count, "batch_size": batch_size, "model": client.model}
    output.parent.mkdir(parents=True, exist_ok=True)
    sink = (_JsonlSink if suffix == ".jsonl" else _NpySink)(output, job, overwrite)
    total = math.ceil(count / batch_size)
    done = sink.done()
    if done:
        logger.info("resuming: %d of %d batches already done", len(done), total)
    todo = [i for i in range(total) if i not in done]
    done_texts = sum(min(batch_size, count - i * batch_size) for i in done)
    sent = 0
    with tqdm(total=count, initial=done_texts, unit="text", file=sys.stderr, disable=not progress,
              dynamic_ncols=True, desc=output.name) as bar:
        for index in todo:
            if max_batches is not None and sent >= max_batches:
                break
            start, stop = index * batch_size, min(count, (index + 1) * batch_size)
            vectors = client.embed_batch(records.texts[start:stop])
            sink.write(index, records.ids[start:stop], vectors)
            sent += 1
            bar.update(stop - start)
            if on_batch is not None:
                on_batch(index)
    complete = len(done) + sent == total
    if complete:
        sink.finish(records)
    return FileResult(total, len(done) + sent, sent, count, len(records.skipped), complete)


# ---------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Embed every text of a file through the embedding server, in batches, resumably.",
        epilog=f"The key is read from ${KEY_ENV} unless --api-key is given (prefer the variable: "
               "command lines are visible to other users). Run the same command again to resume.")
    parser.add_argument("input", type=Path, help="texts: .txt (one a line), .jsonl or .csv")
    parser.add_argument("output", type=Path, help=".jsonl ({id, embedding} a line) or .npy (float32 [n, dim]; "
                                                  "ids in OUTPUT-stem.ids.jsonl)")
    parser.add_argument("--url", default=os.environ.get(URL_ENV, DEFAULT_URL),
                        help=f"server base URL (default ${URL_ENV} or {DEFAULT_URL})")
    parser.add_argument("--api-key", default=None, help=f"API key (default ${KEY_ENV})")
    parser.add_argument("--route", choices=ROUTES, default="v1", help="which API to call (default v1)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model name (default {DEFAULT_MODEL})")
    parser.add_argument("--batch-size", type=int, default=64, help="texts per request (default 64)")
    parser.add_argument("--input-format", choices=INPUT_FORMATS, help="default: from the input's extension")
    parser.add_argument("--text-field", default="text", help="JSONL: field holding the text (default text)")
    parser.add_argument("--id-field", help="JSONL: field holding the id (default: line number)")
    parser.add_argument("--column", default="text", help="CSV: column holding the text (default text)")
    parser.add_argument("--id-column", help="CSV: column holding the id (default: data row number, from 1)")
    parser.add_argument("--empty", choices=EMPTY_POLICIES, default="skip",
                        help="texts that are empty or only whitespace: leave out (default), send as they are, "
                             "or stop with an error")
    parser.add_argument("--max-batches", type=int, help="stop after this many new batches; rerun to go on")
    parser.add_argument("--overwrite", action="store_true", help="discard an existing output and saved progress")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
    parser.add_argument("--max-attempts", type=int, default=6, help="requests per batch before giving up (default 6)")
    parser.add_argument("--max-wait", type=float, default=60.0, help="longest wait between attempts, s (default 60)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(message)s", stream=sys.stderr)
    if args.batch_size < 1 or (args.max_batches is not None and args.max_batches < 0):
        logger.error("--batch-size must be >= 1 and --max-batches >= 0")
        return 2
    api_key = args.api_key or os.environ.get(KEY_ENV) or None
    if api_key is None:
        logger.warning("no API key (set $%s or pass --api-key); requests go without one", KEY_ENV)
    try:
        records = read_records(args.input, args.input_format, args.text_field, args.id_field,
                               args.column, args.id_column, args.empty)
        if records.skipped:
            shown = ", ".join(str(i) for i in records.skipped[:10])
            logger.info("left out %d empty texts (ids %s%s)", len(records.skipped), shown,
                        ", ..." if len(records.skipped) > 10 else "")
        retry = RetryPolicy(max_attempts=args.max_attempts, max_delay=args.max_wait)
        with EmbeddingClient(args.url, api_key, args.route, args.model, args.batch_size, args.timeout, retry) as client:
            result = embed_file(client, records, args.output, args.max_batches, args.overwrite, not args.quiet)
    except (InputError, ResumeError, EmbeddingError, OSError) as exc:
        logger.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        logger.error("interrupted; progress is saved, run the same command again to resume")
        return 130
    if result.complete:
        logger.info("wrote %d embeddings to %s (%d batches sent in this run, %d done before)", result.count,
                    args.output, result.sent_batches, result.done_batches - result.sent_batches)
    else:
        logger.info("stopped after %d of %d batches; run the same command again to resume",
                    result.done_batches, result.total_batches)
    return 0


if __name__ == "__main__":
    sys.exit(main())
