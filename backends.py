"""Inference backends: each turns token ids into sentence embeddings, nothing more.

A backend knows nothing of requests or queues. It offers two small steps:
``tokenize`` (texts -> token ids, cut at the model's limit) and ``embed`` (a batch of
token ids -> unit-norm float32 embeddings, pooled as the model's own config says).
The batcher owns ordering, batching and threads.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Protocol

import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tokenized:
    """Token ids of one text, cut at the model's limit; ``truncated`` says whether anything was cut."""

    ids: list[int]
    truncated: bool


class Backend(Protocol):
    name: str
    dimension: int
    max_seq_length: int

    def tokenize(self, texts: list[str]) -> list[Tokenized]: ...

    def embed(self, batch: list[list[int]]) -> np.ndarray: ...


def usable_cpus() -> int:
    """Cores this process may use: the cgroup CPU quota (Kubernetes, Render) or the affinity mask."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:
        count = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="ascii") as handle:
            quota, period = handle.read().split()[:2]
        if quota != "max":
            count = min(count, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count)


class HFTokenizer:
    """The model's fast tokenizer, truncating at the model's own max_seq_length (not tokenizer.json's)."""

    def __init__(self, tokenizer, max_seq_length: int):
        backend = tokenizer.backend_tokenizer
        # A copy, so that the padding/truncation packaged in tokenizer.json (128 for MiniLM) is not used.
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_str(backend.to_str())
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length=max_seq_length)
        self.pad_id = tokenizer.pad_token_id or 0

    def __call__(self, texts: list[str]) -> list[Tokenized]:
        encodings = self._tokenizer.encode_batch(texts)
        return [Tokenized(ids=enc.ids, truncated=bool(enc.overflowing)) for enc in encodings]


def pad(batch: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token ids to the longest in the batch: (input_ids, attention_mask) as int64."""
    width = max(len(ids) for ids in batch)
    input_ids = np.full((len(batch), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(batch), width), dtype=np.int64)
    for row, ids in enumerate(batch):
        input_ids[row, : len(ids)] = ids
        mask[row, : len(ids)] = 1
    return input_ids, mask


class TorchBackend:
    """sentence-transformers on torch: the reference. Runs every module the model lists (pooling, Normalize)."""

    def __init__(self, model_path: str, precision: str = "fp32", threads: int | None = None):
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(threads or usable_cpus())
        self._torch = torch
        self._model = SentenceTransformer(model_path, device="cpu")
        self._model.eval()
        self._dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        if self._dtype != torch.float32:
            self._model.to(self._dtype)
        self.name = f"torch-{precision}"
        self.dimension = int(self._model.get_embedding_dimension())
        self.max_seq_length = int(self._model.max_seq_length)
        self._tokenizer = HFTokenizer(self._model.tokenizer, self.max_seq_length)
        self._wants_token_types = "token_type_ids" in self._model.tokenizer.model_input_names

    def tokenize(self, texts: list[str]) -> list[Tokenized]:
        return self._tokenizer(texts)

    def embed(self, batch: list[list[int]]) -> np.ndarray:
        torch = self._torch
        input_ids, mask = pad(batch, self._tokenizer.pad_id)
        features = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)}
        if self._wants_token_types:
            features["token_type_ids"] = torch.zeros_like(features["input_ids"])
        with torch.inference_mode():
            out = self._model(features)["sentence_embedding"]
        return out.float().numpy()


def create_backend(model_path: str, backend: str = "auto", precision: str = "auto") -> Backend:
    """The backend a setting names; ``auto`` picks the fastest that passes the fidelity gate on this CPU."""
    if precision == "auto":
        precision = "fp32"
    if backend in ("auto", "torch"):
        return TorchBackend(model_path, precision=precision)
    raise ValueError(f"backend {backend!r} is not available; choose auto or torch")
