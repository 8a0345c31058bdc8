"""Fixtures that start the real server as a subprocess on free loopback ports and the reference model."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Iterator[RunningServer]:
    """The exact path: torch fp32, so that every route can be held to cosine >= 0.99999."""
    running = start_server(tmp_path_factory.mktemp("server"), env={"BACKEND": "torch", "PRECISION": "fp32"})
    yield running
    running.stop()


@pytest.fixture(scope="session")
def model_path() -> str:
    from embedding_server.operations.settings import default_model_path

    return default_model_path()


VARIANTS = ("cls", "dense128", "code")
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
