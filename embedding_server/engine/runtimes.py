"""The runtimes: each turns token ids into sentence embeddings, nothing more.

A runtime knows nothing of requests or queues. It offers two small steps: ``tokenize`` (texts -> token ids, cut at
the model's limit) and ``embed`` (a batch of token ids -> unit-norm float32 embeddings, pooled as the model's own
config says). ``torch`` runs sentence-transformers itself (the reference); ``onnx`` (ONNX Runtime) and ``openvino``
run the graph of the export cache.
"""
from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from embedding_server.engine.cpu import usable_cpus
from embedding_server.engine.export_cache import open_cached
from embedding_server.engine.tokens import EXACT, OPENVINO_GRID, HFTokenizer, Tokenized, pad
from embedding_server.operations.settings import PRECISIONS

# OpenVINO prepares kernels for every input shape it meets (~3.6 ms a new shape here, as much as 50 tokens of work)
# and keeps them, with some memory, in a cache of this many shapes (its default, 5000, let memory grow with every
# new shape): room for every shape of OPENVINO_GRID at the default batch budget (113 for 256 tokens and 2048).
OPENVINO_SHAPE_CACHE = 128


def check_precision(precision: str) -> None:
    """Fail early, naming the precisions offered."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")


class TorchBackend:
    """sentence-transformers on torch: the reference. Runs every module the model lists (pooling, Normalize).

    bf16 runs under CPU autocast: matrix products in bf16, softmax, layer norm and pooling kept in fp32,
    which stays closer to fp32 than casting the whole model.
    """

    shapes = EXACT
    streams = 1  # one batch at a time

    def __init__(self, model_path: str, precision: str = "fp32", threads: int | None = None,
                 trust_remote_code: bool = False):
        import torch
        from sentence_transformers import SentenceTransformer

        check_precision(precision)
        torch.set_num_threads(threads or usable_cpus())
        self._torch = torch
        self._model = SentenceTransformer(model_path, device="cpu", trust_remote_code=trust_remote_code)
        self._model.eval()
        self._bf16 = precision == "bf16"
        self.name = f"torch-{precision}"
        self.dimension = int(self._model.get_embedding_dimension())
        self.max_seq_length = int(self._model.max_seq_length)
        self._tokenizer = HFTokenizer.from_transformers(self._model.tokenizer, self.max_seq_length)
        self._wants_token_types = "token_type_ids" in self._model.tokenizer.model_input_names

    def tokenize(self, texts: list[str]) -> list[Tokenized]:
        return self._tokenizer(texts)

    def embed(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        torch = self._torch
        input_ids, mask = pad(batch, self._tokenizer.pad_id)
        features = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)}
        if self._wants_token_types:
            features["token_type_ids"] = torch.zeros_like(features["input_ids"])
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self._bf16):
            out = self._model(features)["sentence_embedding"]
        return out.float().numpy()


class _ExportedBackend:
    """Shared part of the backends that run the exported graph: tokenizer and metadata from the cache folder."""

    shapes = EXACT
    streams = 1  # one batch at a time

    def __init__(self, folder: Path, name: str):
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        self.name = name
        self.dimension = int(meta["dimension"])
        self.max_seq_length = int(meta["max_seq_length"])
        self._pad_id = int(meta["pad_id"])
        self._tokenizer = HFTokenizer(
            (folder / "tokenizer.json").read_text(encoding="utf-8"), self._pad_id, self.max_seq_length
        )

    def tokenize(self, texts: list[str]) -> list[Tokenized]:
        return self._tokenizer(texts)


class OnnxBackend(_ExportedBackend):
    """ONNX Runtime, fp32 only: its CPU provider has no fast bf16 kernels for this graph."""

    def __init__(self, model_path: str, precision: str = "fp32", cache_dir: str | os.PathLike[str] | None = None,
                 threads: int | None = None):
        if precision != "fp32":
            raise ValueError("the onnx backend offers fp32 only")
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or usable_cpus()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL

        def load(folder: Path) -> None:
            super(OnnxBackend, self).__init__(folder, "onnx-fp32")
            self._session = ort.InferenceSession(str(folder / "model.onnx"), options,
                                                 providers=["CPUExecutionProvider"])

        open_cached(model_path, cache_dir, "onnx", load)

    def embed(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        input_ids, mask = pad(batch, self._pad_id)
        out = self._session.run(["sentence_embedding"], {"input_ids": input_ids, "attention_mask": mask})[0]
        return np.ascontiguousarray(out, dtype=np.float32)


class OpenVINOBackend(_ExportedBackend):
    """OpenVINO's CPU plugin; bf16 through its INFERENCE_PRECISION_HINT (it keeps sensitive ops in fp32).

    Two compiled forms of one model: one stream with every thread (a batch alone, at the lowest latency), and,
    when ``streams`` is not 1, several streams that split the threads between them, so that that many batches
    run at once (``embed(..., parallel=True)``, from as many threads). ``streams`` 0 lets OpenVINO's THROUGHPUT
    hint choose for this CPU; ``self.streams`` is what was compiled (1: no parallel form).
    """

    shapes = OPENVINO_GRID

    def __init__(self, model_path: str, precision: str = "fp32", cache_dir: str | os.PathLike[str] | None = None,
                 threads: int | None = None, streams: int = 1):
        check_precision(precision)
        import openvino as ov

        core = ov.Core()
        config = {
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
            "INFERENCE_NUM_THREADS": threads or usable_cpus(),
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
            "CPU_RUNTIME_CACHE_CAPACITY": OPENVINO_SHAPE_CACHE,
        }
        parallel = {**config, "PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": streams or "AUTO"}

        def load(folder: Path) -> None:
            super(OpenVINOBackend, self).__init__(folder, f"openvino-{precision}")
            model = core.read_model(str(folder / "model.xml"))
            self._compiled = core.compile_model(model, "CPU", config)
            self._parallel = core.compile_model(model, "CPU", parallel) if streams != 1 else None

        open_cached(model_path, cache_dir, "openvino", load)
        self.streams = int(self._parallel.get_property("NUM_STREAMS")) if self._parallel else 1
        if self.streams == 1:
            self._parallel = None  # one stream after all: no second copy of the kernels
        self._local = threading.local()

    def embed(self, batch: Sequence[np.ndarray], parallel: bool = False) -> np.ndarray:
        """One batch; ``parallel`` runs it on one of the parallel streams (one call per thread at a time)."""
        requests = getattr(self._local, "requests", None)
        if requests is None:
            requests = self._local.requests = {}
        request = requests.get(parallel)
        if request is None:
            compiled = self._parallel if parallel and self._parallel else self._compiled
            request = requests[parallel] = compiled.create_infer_request()
        input_ids, mask = pad(batch, self._pad_id, self.shapes)
        request.infer({"input_ids": input_ids, "attention_mask": mask})
        return np.array(request.get_output_tensor(0).data[: len(batch)], dtype=np.float32, copy=True)
