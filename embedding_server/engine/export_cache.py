"""The export cache: the model traced into the graphs the fast runtimes load, converted once and kept on disk.

The ``onnx`` and ``openvino`` runtimes run a graph traced from the model's whole sentence-transformers module chain
(Transformer, Pooling, Normalize, whatever modules.json lists), so pooling and normalisation are the model's own,
not re-implemented. The graphs live under ``CACHE_DIR`` (default ``~/.cache/embedding-server``) in a folder named
by a hash of the model's files; ``python -m embedding_server.engine.export_cache --prebuild`` fills it ahead of
time (e.g. at Docker build time).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from embedding_server.operations.settings import default_model_path, read_cache_dir

logger = logging.getLogger(__name__)

EXPORT_FORMAT = 5  # bump when the exported graph or its metadata change shape
Loaded = TypeVar("Loaded")


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


EXPORTERS = {"onnx": (_export_onnx, "exporting %s to ONNX in %s"),
             "openvino": (_export_openvino, "converting %s to OpenVINO IR in %s")}


def _ensure(kind: str, model_path: str, model_folder: Path) -> Path:
    """``model_folder/kind`` (graph, ``tokenizer.json``, ``meta.json``), converting the model the first time.

    ``model_folder`` is the model's folder in a cache root (``<root>/<fingerprint>``), so the fingerprint, which
    reads every byte of the model, is computed by the caller once.
    """
    export, message = EXPORTERS[kind]
    final = model_folder / kind
    if not final.is_dir():
        logger.info(message + " (once; later starts reuse it)", model_path, final)
    return _build_once(final, lambda scratch: export(model_path, scratch))


def ensure(kind: str, model_path: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding the ``kind`` export of the model (``onnx`` or ``openvino``), converting it the first time."""
    return _ensure(kind, model_path, model_cache_dir(model_path, cache_dir))


def open_cached(model_path: str, cache_dir: str | os.PathLike[str] | None, kind: str,
                load: Callable[[Path], Loaded]) -> Loaded:
    """``load(folder)`` on the export cache's ``kind`` folder, building it if needed.

    A cache this user cannot read or that is corrupt (a cache built by another user, a half-copied image layer)
    is rebuilt once into ``user_cache_root()``; if that fails too this raises ExportCacheError. The model's own
    files are hashed once, before any of it: a model folder that cannot be read is the model's error, raised as it
    is, not an unusable cache.
    """
    fingerprint = model_fingerprint(model_path)
    root = Path(cache_dir) if cache_dir else default_cache_root()
    try:
        return load(_ensure(kind, model_path, root / fingerprint))
    except CACHE_ERRORS as exc:
        fallback = user_cache_root()
        logger.warning("the %s export cache under %s is unusable (%s: %s); rebuilding it in %s", kind, root,
                       type(exc).__name__, exc, fallback)
    private = fallback / fingerprint
    try:
        _own_folder(fallback)
        try:
            return load(_ensure(kind, model_path, private))
        except CACHE_ERRORS:
            if not (private / kind).is_dir():
                raise
        shutil.rmtree(private / kind)  # our own earlier rebuild, now corrupt: once more from scratch
        return load(_ensure(kind, model_path, private))
    except CACHE_ERRORS as exc:
        raise ExportCacheError(f"the {kind} export cache cannot be built in {fallback}: {exc}") from exc


def prebuild(model_path: str, cache_dir: str | os.PathLike[str] | None = None,
             kinds: Sequence[str] = EXPORTED) -> Path:
    """Convert the model for the exported backends ahead of time; returns the model's cache folder."""
    model_folder = model_cache_dir(model_path, cache_dir)
    for kind in kinds:
        try:
            _ensure(kind, model_path, model_folder)
        except ImportError as exc:
            if len(kinds) == 1:
                raise
            logger.warning("%s export skipped: %s", kind, exc)
    return model_folder


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
    print(prebuild(args.model_path or default_model_path(), args.cache_dir, args.kinds or EXPORTED))
    return 0


if __name__ == "__main__":
    sys.exit(main())
