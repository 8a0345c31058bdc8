"""Which backend serves: what every backend offers the batcher, and the choice of runtime and precision.

The batcher sees a backend only through ``Backend``: ``tokenize`` and ``embed`` over a shape grid. The jobs
behind it live apart: tokens.py (tokenizing and shapes), runtimes.py (torch, ONNX Runtime, OpenVINO),
export_cache.py (the converted graphs on disk) and cpu.py (cores and native bf16).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from embedding_server.engine.cpu import has_bf16, usable_cpus
from embedding_server.engine.export_cache import ExportCacheError
from embedding_server.engine.runtimes import OnnxBackend, OpenVINOBackend, TorchBackend
from embedding_server.engine.tokens import ShapeGrid, Tokenized
from embedding_server.operations.settings import BACKEND_CHOICES, BACKENDS, PRECISION_CHOICES, PRECISIONS

logger = logging.getLogger(__name__)

# Backend and precision pairs that pass the fidelity gate in tests/test_backends.py.
GATED = {("torch", "fp32"), ("torch", "bf16"), ("onnx", "fp32"), ("openvino", "fp32"), ("openvino", "bf16")}


class Backend(Protocol):
    """What the batcher uses. A backend whose ``streams`` is above 1 also takes ``embed(batch, parallel=True)``
    from up to that many threads at once, each batch on a share of the cores."""

    name: str
    dimension: int
    max_seq_length: int
    shapes: ShapeGrid  # embed pads each batch up to its shape in this grid
    streams: int

    def tokenize(self, texts: list[str]) -> list[Tokenized]: ...

    def embed(self, batch: Sequence[np.ndarray]) -> np.ndarray: ...


def resolve(backend: str = "auto", precision: str = "auto", flags: set[str] | None = None) -> tuple[str, str]:
    """The (backend, precision) pair that ``create_backend`` would build for these settings on this CPU.

    ``auto`` backend is OpenVINO: in bench/bench_backends.py (300 real texts, 2048-token batches as the batcher
    plans them, 2 cores with AVX512-BF16) OpenVINO bf16 ran 2.05x torch fp32 and OpenVINO fp32 1.23x, the fastest
    gated pair at each precision (torch bf16 1.51x, ONNX Runtime fp32 0.93x). Both pass the fidelity gate of
    tests/test_backends.py (cosine to sentence-transformers fp32 >= 0.9999 bf16, >= 0.99999 fp32).
    ``auto`` precision is bf16 where the CPU has AMX or AVX512-BF16 (native bf16 arithmetic; elsewhere bf16 is
    emulated and slower), fp32 elsewhere or when the backend offers only fp32.
    """
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend must be auto or one of {BACKENDS}, not {backend!r}")
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"precision must be auto or one of {PRECISIONS}, not {precision!r}")
    chosen = "openvino" if backend == "auto" else backend
    if precision == "auto":
        precision = "bf16" if has_bf16(flags) and (chosen, "bf16") in GATED else "fp32"
    if (chosen, precision) not in GATED:
        raise ValueError(f"backend {chosen} does not offer {precision}; offered: {sorted(GATED)}")
    return chosen, precision


def create_backend(model_path: str, backend: str = "auto", precision: str = "auto",
                   cache_dir: str | os.PathLike[str] | None = None, threads: int | None = None,
                   trust_remote_code: bool = False, streams: int = 1) -> Backend:
    """The backend a setting names; ``auto`` picks the fastest that passes the fidelity gate on this CPU.

    With ``auto``, a missing optional runtime (openvino, onnxruntime) falls back to the next one and finally
    to torch fp32; a backend named explicitly must be installed or this raises. An export cache that can be
    neither read nor rebuilt (ExportCacheError) falls back to torch fp32 whatever the setting: a server that
    starts slower beats one that does not start. A model that runs its own code (``trust_remote_code``) runs on
    torch: the exported graphs are traced from sentence-transformers' own modules. ``streams`` (OpenVINO only; 0 for
    OpenVINO's choice) is how many batches may run at once, each on a share of the cores.
    """
    if trust_remote_code:
        if backend not in ("auto", "torch"):
            raise ValueError(f"the {backend} backend converts sentence-transformers' own modules only; "
                             "run a model with its own code on BACKEND=torch")
        chosen = resolve("torch", precision)
        logger.info("backend torch: the model runs its own code")
        return TorchBackend(model_path, precision=chosen[1], threads=threads, trust_remote_code=True)
    candidates = [resolve(backend, precision)]
    if backend == "auto":
        candidates += [pair for pair in (("onnx", "fp32"), ("torch", "fp32")) if pair not in candidates]
    for name, chosen in candidates:
        try:
            if name == "torch":
                built: Backend = TorchBackend(model_path, precision=chosen, threads=threads)
            elif name == "onnx":
                built = OnnxBackend(model_path, precision=chosen, cache_dir=cache_dir, threads=threads)
            else:
                built = OpenVINOBackend(model_path, precision=chosen, cache_dir=cache_dir, threads=threads,
                                        streams=streams)
        except ImportError as exc:
            if (name, chosen) == candidates[-1]:
                raise
            logger.warning("backend %s unavailable (%s); trying the next", name, exc)
            continue
        except ExportCacheError as exc:
            if ("torch", "fp32") not in candidates:
                candidates.append(("torch", "fp32"))
            logger.warning("backend %s unavailable (%s); trying the next", name, exc)
            continue
        logger.info("backend %s, %d threads, up to %d batches at once", built.name, threads or usable_cpus(),
                    built.streams)
        return built
    raise RuntimeError("no backend could be built")
