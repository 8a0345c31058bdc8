"""Fixtures: the real server as a subprocess on free loopback ports, the same wiring served in-process over a
small deterministic backend (or the real one), the reference model, and one export cache for the whole run."""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL_NAME = "all-MiniLM-L6-v2"
TEST_KEY = "test-key-7f3a9c"
START_TIMEOUT = 240


# Ports for the servers tests start. Not the kernel's pick of a free ephemeral port: that port is free only until
# the server binds it seconds later, and meanwhile the kernel may hand it to any client socket or to another test
# process (tests run in parallel workers, see .ci/run). Instead each worker takes ports in turn from its own block
# below the ephemeral range (which clients never get), from a random start (so that two runs at once seldom meet),
# skipping any port something holds.
PORT_BLOCK = 1000
PORT_BASE = 12000
_next_port: list[int] = []


def worker_index() -> int:
    """0, 1, ... for parallel test workers ("gw0", "gw1", ...); 0 without them."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port no socket holds now, in this worker's own block, not handed out before by this process."""
    low = PORT_BASE + worker_index() * PORT_BLOCK
    if low + PORT_BLOCK > _ephemeral_low():
        raise RuntimeError(f"worker {worker_index()}: no port block below the ephemeral range")
    if not _next_port:
        _next_port.append(low + random.randrange(PORT_BLOCK))
    for _ in range(PORT_BLOCK):
        port = low + (_next_port[0] - low) % PORT_BLOCK
        _next_port[0] = port + 1
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in {low}-{low + PORT_BLOCK - 1}")


class LoopbackEndpoints:
    """The addresses of a server (a process or a container) listening on loopback ports http_port and grpc_port."""

    http_port: int
    grpc_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"


def read_until_closed(sock: socket.socket, seconds: float) -> bytes:
    """What the server sent before closing the connection; fails the test if it is still open after `seconds`."""
    sock.settimeout(seconds)
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except TimeoutError:
        pytest.fail(f"the connection is still open after {seconds}s")
    except ConnectionResetError:
        pass
    return received


@dataclass
class RunningServer(LoopbackEndpoints):
    process: subprocess.Popen
    http_port: int
    grpc_port: int
    key: str | None
    log_path: Path
    env: dict = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def headers(self, **extra: str) -> dict[str, str]:
        return {"X-Api-Key": self.key or "", "Content-Type": "application/json", **extra}

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_server(tmp_dir: Path, env: dict[str, str] | None = None, args: list[str] | None = None,
                 command: list[str] | None = None, key: str | None = TEST_KEY,
                 port_flag: bool = False) -> RunningServer:
    """Start `python model.py` (or `command`) and wait until /health answers 200.

    With port_flag, the port is given as KServe's --http_port flag and PORT names another one.
    """
    http_port, grpc_port = free_port(), free_port()
    args = list(args or [])
    if port_flag:
        args += ["--http_port", str(http_port)]
    full_env = {k: v for k, v in os.environ.items() if k not in ("API_KEY", "API_KEYS", "API_KEY_FILE")}
    full_env.update({"PORT": str(free_port() if port_flag else http_port), "GRPC_PORT": str(grpc_port), "HF_HUB_OFFLINE": "1",
                     "PYTHONUNBUFFERED": "1"})
    if key is not None:
        full_env["API_KEY"] = key
    full_env.update(env or {})
    log_path = tmp_dir / f"server-{http_port}.log"
    cmd = command or [sys.executable, "model.py", *args]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    server = RunningServer(process, http_port, grpc_port, key, log_path, full_env)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()[-4000:]}")
        try:
            if requests.get(f"{server.url}/health", timeout=2).status_code == 200:
                return server
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"server not healthy after {START_TIMEOUT}s:\n{server.log()[-4000:]}")


# The files that take longest (measured under two workers: minutes of image builds, then real servers, exports and
# Ray), longest first. Under parallel workers they are handed out first (.ci/run keeps the collection's order), so
# that no long file starts last while the other worker has nothing left to do. Without workers the order is as
# collected.
LONGEST_FILES = ("test_image.py", "test_backends.py", "test_embed_client.py", "test_limits.py", "test_ray_serve.py",
                 "test_model.py", "test_servingruntime.py", "test_cache.py", "test_model_dir.py")


def pytest_collection_modifyitems(config, items) -> None:
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    rank = {name: index for index, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FILES)))  # stable: in-file order kept


@pytest.fixture(scope="session", autouse=True)
def shared_cache_dir(tmp_path_factory) -> Iterator[Path]:
    """One CACHE_DIR for the run, inherited by every server subprocess and read by the backend tests: the model is
    exported to ONNX and OpenVINO once per run, not once per server (tests of the export itself use their own).

    With parallel workers it is one folder for all of them, beside their own temporary folders. The export cache
    builds each export in a scratch folder and renames it into place, so workers that export at once each get a
    whole export (and the first rename wins)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        folder = tmp_path_factory.mktemp("export-cache")
    else:
        folder = tmp_path_factory.getbasetemp().parent / "export-cache"
        folder.mkdir(exist_ok=True)
    saved = os.environ.get("CACHE_DIR")
    os.environ["CACHE_DIR"] = str(folder)
    yield folder
    if saved is None:
        os.environ.pop("CACHE_DIR", None)
    else:
        os.environ["CACHE_DIR"] = saved


@pytest.fixture(scope="session")
def cache_dir(shared_cache_dir: Path, model_path: str) -> Path:
    """The run's one export cache, filled with the bundled model's ONNX and OpenVINO exports by the same command a
    Docker build runs, so that the tests prove the prebuilt cache is what loads. Parallel workers take turns (a
    lock file beside the cache folder): the first exports, the others find the export there."""
    import fcntl

    with open(shared_cache_dir.with_name(shared_cache_dir.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = subprocess.run(
            [sys.executable, "-m", "embedding_server.engine.export_cache", "--prebuild", "--model-path", model_path,
             "--cache-dir", str(shared_cache_dir)],
            capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
    assert result.returncode == 0, result.stderr[-2000:]
    return shared_cache_dir


@pytest.fixture(scope="session")
def openvino_fp32(cache_dir: Path) -> dict[str, str]:
    """Server settings for OpenVINO fp32 from the run's export cache, once it is there: as exact as torch fp32 (the
    same 0.99999 gate in test_backends), and loaded without importing torch, in a tenth of torch's time."""
    return {"BACKEND": "openvino", "PRECISION": "fp32", "CACHE_DIR": str(cache_dir)}


@pytest.fixture(scope="session")
def server(tmp_path_factory, openvino_fp32) -> Iterator[RunningServer]:
    """The real server on fp32 (OpenVINO, the default runtime), so that every route can be held to cosine >= 0.99999
    with sentence-transformers."""
    running = start_server(tmp_path_factory.mktemp("server"), env=openvino_fp32)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def model_path() -> str:
    from embedding_server.operations.settings import default_model_path

    return default_model_path()


VARIANTS = ("cls", "dense128", "code", "tiny")
# Prefix of a command that runs as root without the capabilities that let root ignore file permissions: the
# process meets a read-only directory as any other user would (root's Python lives under /root, which uid 10001
# cannot read).
NO_FILE_OVERRIDES = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner",
                     "--inh-caps=-dac_override,-dac_read_search,-fowner"]
# The custom module of the "code" variant: a file in the model directory that modules.json names, so loading the
# model imports and runs it (what trust_remote_code guards). It flips the sign of every embedding.
CODE_MODULE = """
from sentence_transformers.base.modules.normalize import Normalize


class Flip(Normalize):
    def forward(self, features):
        features[self.module_output_name] = -features[self.module_input_name]
        return features
"""


def make_variant_model(folder: Path, kind: str) -> Path:
    """A sentence-transformers model directory built from the bundled one with sentence-transformers' own modules
    and saved with .save(): fresh files, none linked to the installed package (so tests may chmod them).

    cls: CLS pooling and no Normalize (vectors not of unit length).
    dense128: mean pooling, a Dense layer to 128 dimensions (fixed seed), Normalize, and a 128-token limit.
    code: the bundled model followed by a module of its own Python code (CODE_MODULE).
    tiny: a randomly initialised BERT of two layers 32 wide (fixed seed) with the bundled tokenizer, CLS pooling and
      no Normalize: a sentence-transformers model that is not MiniLM, exported in a fraction of MiniLM's time (for
      the tests of the export cache itself).
    """
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer

    from embedding_server.operations.settings import default_model_path

    if kind not in VARIANTS:
        raise ValueError(f"kind must be one of {VARIANTS}, not {kind!r}")
    target = folder / f"{kind}-model"
    if kind == "code":
        SentenceTransformer(default_model_path(), device="cpu").save(str(target))
        (target / "flip.py").write_text(CODE_MODULE)
        modules = json.loads((target / "modules.json").read_text())
        folder = f"{len(modules)}_Flip"
        (target / folder).mkdir()
        (target / folder / "config.json").write_text("{}")
        modules.append({"idx": len(modules), "name": str(len(modules)), "path": folder, "type": "flip.Flip"})
        (target / "modules.json").write_text(json.dumps(modules, indent=2))
        return target
    if kind == "tiny":
        from transformers import AutoTokenizer, BertConfig, BertModel

        tokenizer = AutoTokenizer.from_pretrained(default_model_path())
        torch.manual_seed(15)
        config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=512)
        weights = folder / "tiny-weights"
        BertModel(config).save_pretrained(weights)
        tokenizer.save_pretrained(weights)
        transformer = Transformer(str(weights), max_seq_length=256)
        SentenceTransformer(modules=[transformer, Pooling(32, pooling_mode="cls")], device="cpu").save(str(target))
        return target
    max_seq_length = 128 if kind == "dense128" else 256
    transformer = Transformer(default_model_path(), max_seq_length=max_seq_length)
    width = transformer.get_embedding_dimension()
    if kind == "cls":
        modules = [transformer, Pooling(width, pooling_mode="cls")]
    else:
        torch.manual_seed(15)
        modules = [transformer, Pooling(width, pooling_mode="mean"), Dense(width, 128), Normalize()]
    SentenceTransformer(modules=modules, device="cpu").save(str(target))
    return target


@pytest.fixture(scope="session")
def variant_model(tmp_path_factory) -> Callable[[str], Path]:
    """variant_model(kind): the make_variant_model directory of that kind, built once a session."""
    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in built:
            built[kind] = make_variant_model(tmp_path_factory.mktemp(f"variant-{kind}"), kind)
        return built[kind]

    return get


@pytest.fixture(scope="session")
def reference(model_path):
    """sentence-transformers' own encode, fp32: the output every route must match."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_path, device="cpu")
    return lambda texts: model.encode(list(texts), convert_to_numpy=True)


def grpc_infer(server, texts: list[str], metadata=(), model_name: str = MODEL_NAME):
    """One gRPC V2 ModelInfer call with a BYTES input of shape [n]."""
    import grpc
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

    request = pb.ModelInferRequest(model_name=model_name, inputs=[pb.ModelInferRequest.InferInputTensor(
        name="text", datatype="BYTES", shape=[len(texts)],
        contents=pb.InferTensorContents(bytes_contents=[t.encode() for t in texts]))])
    with grpc.insecure_channel(server.grpc_target) as channel:
        return pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, metadata=metadata, timeout=60)


def cosines(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# --- The same wiring in-process -------------------------------------------------------------------------------

class RecordingBackend:
    """A real backend, recording the token counts of each batch it computes (`batches`). With `held`, every batch
    waits on the model thread until the test sets `gate` (`entered` says one has arrived): work stays in progress
    on demand, for tests of queues, admission and abandoned requests."""

    def __init__(self, backend, held: bool = False):
        self.inner, self.batches = backend, []
        self.name, self.dimension, self.max_seq_length = backend.name, backend.dimension, backend.max_seq_length
        self.shapes = backend.shapes
        self.gate, self.entered = threading.Event(), threading.Event()
        if not held:
            self.gate.set()

    @property
    def rows(self) -> list[int]:
        """Token counts of every text computed, batch after batch."""
        return [length for batch in self.batches for length in batch]

    def tokenize(self, texts):
        return self.inner.tokenize(texts)

    def embed(self, batch):
        self.entered.set()
        self.gate.wait(timeout=60)
        self.batches.append([len(ids) for ids in batch])
        return self.inner.embed(batch)


class HashBackend:
    """A small deterministic backend for protocol, error, auth and fuzz tests: one token per word (a hash) between
    [CLS] and [SEP], cut at max_seq_length, and per text a unit vector drawn from a hash of its token ids. The same
    text always gets the same vector; different texts get unrelated ones. Nothing here means anything.

    `seconds_per_token` makes embed take time in proportion to its work (sleeping, so the GIL is free), for tests
    of queues, overload and disconnects."""

    name = "hash"
    streams = 1  # one batch at a time

    def __init__(self, dimension: int = 384, max_seq_length: int = 256, seconds_per_token: float = 0.0):
        from embedding_server.engine.tokens import EXACT

        self.dimension = dimension
        self.max_seq_length = max_seq_length
        self.seconds_per_token = seconds_per_token
        self.shapes = EXACT

    def tokenize(self, texts: list[str]) -> list:
        from embedding_server.engine.tokens import Tokenized

        tokenized = []
        for text in texts:
            words = [hashlib.blake2b(word.encode("utf-8", "surrogatepass"), digest_size=4).digest()
                     for word in text.split()]
            ids = [101, *(1000 + int.from_bytes(word, "little") % 29000 for word in words), 102]
            truncated = len(ids) > self.max_seq_length
            if truncated:
                ids = [*ids[:self.max_seq_length - 1], 102]
            tokenized.append(Tokenized(np.asarray(ids, dtype=np.int32), truncated))
        return tokenized

    def embed(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        if self.seconds_per_token:
            time.sleep(self.seconds_per_token * max(len(ids) for ids in batch) * len(batch))
        rows = []
        for ids in batch:
            seed = int.from_bytes(hashlib.blake2b(np.asarray(ids, dtype=np.int32).tobytes(), digest_size=8).digest(),
                                  "little")
            vector = np.random.default_rng(seed).standard_normal(self.dimension).astype(np.float32)
            rows.append(vector / np.linalg.norm(vector))
        return np.stack(rows)


def hash_vectors(texts: list[str]) -> np.ndarray:
    """What HashBackend answers for `texts`: an in-process server's vectors must be these, bit for bit."""
    backend = HashBackend()
    return backend.embed([tokenized.ids for tokenized in backend.tokenize(texts)])


def hash_backend(model_path: str, **_: object) -> HashBackend:
    """A backend_factory for EmbeddingModel: HashBackend, whatever the model directory."""
    return HashBackend()


def slow_hash_backend(seconds_per_token: float) -> Callable[..., HashBackend]:
    return lambda model_path, **_: HashBackend(seconds_per_token=seconds_per_token)


class InProcessServer(LoopbackEndpoints):
    """server.install_app on a fresh FastAPI app and server.build_grpc_server, over one model and data plane, served
    by uvicorn (with the connection guard) and grpc.aio on an event loop in a thread of the test process: the
    production wiring without a subprocess. `backend_factory` is hash_backend, or create_backend for the real model.
    """

    def __init__(self, env: dict[str, str] | None = None, key: str | None = TEST_KEY,
                 backend_factory: Callable = hash_backend):
        import uvicorn
        from kserve.model_repository import ModelRepository

        from embedding_server.kserve_adapter import fresh_app, uvicorn_config
        from embedding_server.operations.connection_guard import guarded_http_protocol
        from embedding_server.operations.settings import Settings
        from embedding_server.server import ServingDataPlane, install_app
        from model import EmbeddingModel

        values = {k: v for k, v in os.environ.items() if k not in ("API_KEY", "API_KEYS", "API_KEY_FILE")}
        values.update({"API_KEY": key} if key is not None else {})
        # Without the embedding cache unless a test asks for it: tests here count computations and queue work with
        # repeated texts; tests/test_cache.py holds the cache on every protocol.
        values["EMBEDDING_CACHE_MB"] = "0"
        values.update(env or {})
        self.settings = settings = Settings.from_env(values)
        self.key = key
        self.model = EmbeddingModel(settings.model_name, settings.model_path, backend=settings.backend,
                                    precision=settings.precision, max_batch_tokens=settings.max_batch_tokens,
                                    limits=settings.limits, cache_dir=settings.cache_dir,
                                    embedding_cache_mb=settings.embedding_cache_mb, streams=settings.streams,
                                    backend_factory=backend_factory)
        self.model.load()
        repository = ModelRepository()
        repository.update(self.model)
        self.data_plane = ServingDataPlane(repository, self.model.name)
        self.app = install_app(fresh_app(), self.data_plane, self.model.name, settings, self.model.backend.dimension)
        self.http_port = free_port()
        config = uvicorn_config(self.app, self.data_plane, port=self.http_port, grace_period=5, event_loop="asyncio",
                                timeout_keep_alive=5)
        config.host = "127.0.0.1"
        config.http = guarded_http_protocol(settings.connections)
        self.http = uvicorn.Server(config)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="in-process-server", daemon=True)
        self.thread.start()
        self._call(self._start())

    def _call(self, coroutine, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    async def _start(self) -> None:
        from embedding_server.server import build_grpc_server

        self.grpc = build_grpc_server(self.data_plane, self.settings, 8,
                                      max_receive_bytes=self.settings.limits.max_body_bytes)
        self.grpc_port = self.grpc.add_insecure_port("127.0.0.1:0")
        await self.grpc.start()
        self.serving = asyncio.ensure_future(self.http.serve())
        while not self.http.started:
            if self.serving.done():
                self.serving.result()
            await asyncio.sleep(0.02)

    def headers(self, **extra: str) -> dict[str, str]:
        return {"X-Api-Key": self.key or "", "Content-Type": "application/json", **extra}

    async def _stop(self) -> None:
        self.http.should_exit = True
        await self.serving
        await self.grpc.stop(1)
        self.model.stop()

    def stop(self) -> None:
        self._call(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="session")
def app_server() -> Iterator[InProcessServer]:
    """The in-process server over HashBackend with default settings: protocol, error and auth tests."""
    running = InProcessServer()
    yield running
    running.stop()
