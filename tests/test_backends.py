"""Fidelity gate for every backend and precision offered: each must agree with sentence-transformers' own
fp32 output on a few hundred real English texts (short, paragraph-long and truncated), text by text, in order.
A second model, a small random BERT with CLS pooling and no Normalize (conftest's "tiny" variant), proves that
pooling and normalisation follow the model's config rather than being fixed for MiniLM; the tests of the export
cache itself export it, in a fraction of MiniLM's time."""
from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from conftest import NO_FILE_OVERRIDES
from embedding_server.engine import backends, corpus, cpu, export_cache, tokens

ROOT = Path(__file__).resolve().parent.parent

TEXT_COUNT = 200
TOKEN_BUDGET = 8192
PAIRS = sorted(backends.GATED)
EXPORTED = [pair for pair in PAIRS if pair[0] != "torch"]  # torch runs sentence-transformers' own modules
MIN_COSINE = {"fp32": 0.99999, "bf16": 0.9999}


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _embed_all(backend: backends.Backend, texts: list[str]) -> np.ndarray:
    """Embed as the server does: sorted by length, batches cut by a padded-token budget, results put back in order."""
    ids = [t.ids for t in backend.tokenize(texts)]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = np.zeros((len(ids), backend.dimension), dtype=np.float32)
    group: list[int] = []
    for index in order + [-1]:
        if group and (index < 0 or (len(group) + 1) * len(ids[index]) > TOKEN_BUDGET):
            result = backend.embed([ids[i] for i in group])
            assert result.dtype == np.float32 and result.shape == (len(group), backend.dimension)
            out[group] = result
            group = []
        if index >= 0:
            group.append(index)
    return out


@pytest.fixture(scope="session")
def texts() -> list[str]:
    return corpus.load_texts(TEXT_COUNT)


@pytest.fixture(scope="session")
def reference(model_path: str, texts: list[str]) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(model_path, device="cpu").encode(texts, convert_to_numpy=True)


@pytest.fixture(scope="session")
def built(model_path: str, cache_dir: Path):
    made: dict[tuple[str, str], backends.Backend] = {}

    def get(name: str, precision: str) -> backends.Backend:
        if (name, precision) not in made:
            made[(name, precision)] = backends.create_backend(model_path, name, precision, cache_dir=cache_dir)
        return made[(name, precision)]

    return get


def test_corpus_is_deterministic_mixed_and_exercises_truncation(texts: list[str], built) -> None:
    assert texts == corpus.load_texts(TEXT_COUNT)
    assert len(set(texts)) == TEXT_COUNT
    tokenized = built("torch", "fp32").tokenize(texts)
    lengths = [len(t.ids) for t in tokenized]
    assert min(lengths) < 16 and max(lengths) == 256
    assert 10 <= sum(t.truncated for t in tokenized) < TEXT_COUNT // 2
    assert all(t.truncated == (len(t.ids) == 256) for t in tokenized if len(t.ids) != 256)


@pytest.mark.parametrize(("name", "precision"), PAIRS, ids=[f"{n}-{p}" for n, p in PAIRS])
def test_backend_matches_sentence_transformers(name: str, precision: str, built, texts: list[str],
                                               reference: np.ndarray) -> None:
    backend = built(name, precision)
    assert backend.name == f"{name}-{precision}"
    assert backend.dimension == 384 and backend.max_seq_length == 256
    out = _embed_all(backend, texts)
    cosines = _cosines(out, reference)
    worst = int(np.argmin(cosines))
    assert cosines[worst] >= MIN_COSINE[precision], f"text {worst} {texts[worst][:80]!r}: cosine {cosines[worst]}"
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-3 if precision == "bf16" else 1e-5)
    # Same order: each output is nearest to its own text's reference, not a neighbour's.
    assert np.array_equal(np.argmax(out @ reference.T, axis=1), np.arange(len(texts)))


@pytest.mark.parametrize(("name", "precision"), PAIRS, ids=[f"{n}-{p}" for n, p in PAIRS])
def test_result_does_not_depend_on_batch_company(name: str, precision: str, built, texts: list[str]) -> None:
    """Dynamic shapes: one short text alone, and the same text padded beside a 256-token one, agree."""
    backend = built(name, precision)
    ids = [t.ids for t in backend.tokenize(["Hi.", texts[0], "A dog. " * 200])]
    assert len(ids[0]) <= 4 and len(ids[2]) == 256
    alone = backend.embed([ids[0]])
    in_batch = backend.embed(ids)
    assert alone.shape == (1, 384) and in_batch.shape == (3, 384)
    assert _cosines(alone, in_batch[:1])[0] >= MIN_COSINE[precision]


@pytest.fixture(scope="session")
def tiny(variant_model) -> str:
    """A small random BERT with CLS pooling and no Normalize (conftest.make_variant_model)."""
    return str(variant_model("tiny"))


@pytest.fixture(scope="session")
def tiny_reference(tiny: str, texts: list[str]) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(tiny, device="cpu").encode(texts[:24], convert_to_numpy=True)


@pytest.mark.parametrize(("name", "precision"), EXPORTED, ids=[f"{n}-{p}" for n, p in EXPORTED])
def test_pooling_and_normalisation_follow_the_model_config(name: str, precision: str, tiny: str, cache_dir: Path,
                                                           texts: list[str], tiny_reference: np.ndarray) -> None:
    from sentence_transformers import SentenceTransformer

    sample, expected = texts[:24], tiny_reference
    backend = backends.create_backend(tiny, name, precision, cache_dir=cache_dir)
    assert backend.dimension == 32
    out = _embed_all(backend, sample)
    assert np.min(_cosines(out, expected)) >= MIN_COSINE[precision]
    norms, expected_norms = np.linalg.norm(out, axis=1), np.linalg.norm(expected, axis=1)
    # OpenVINO stores weights as fp16 (export_cache._export_openvino): lengths agree to ~2e-4 in fp32, not 1e-5.
    rtol = 1e-2 if precision == "bf16" else 1e-3 if name == "openvino" else 1e-4
    np.testing.assert_allclose(norms, expected_norms, rtol=rtol)
    assert np.all(np.abs(norms - 1.0) > 0.05), "no Normalize module, so the output must not be unit length"
    tokens_out = SentenceTransformer(tiny, device="cpu").encode(sample, output_value="token_embeddings")
    mean_pooled = np.stack([t.numpy().mean(axis=0) for t in tokens_out])
    assert np.max(_cosines(out, mean_pooled)) < 0.99, "CLS pooling must differ from mean pooling of the same model"


def test_each_model_gets_its_own_cache_folder_and_exports_once(model_path: str, tiny: str, cache_dir: Path) -> None:
    first = export_cache.model_cache_dir(model_path, cache_dir)
    assert first != export_cache.model_cache_dir(tiny, cache_dir)
    for part in ("onnx/model.onnx", "onnx/tokenizer.json", "onnx/meta.json", "openvino/model.xml", "openvino/model.bin"):
        assert (first / part).is_file(), part
    stamp = (first / "onnx" / "model.onnx").stat().st_mtime_ns
    assert export_cache.ensure("onnx", model_path, cache_dir) == first / "onnx"
    assert export_cache.ensure("openvino", model_path, cache_dir) == first / "openvino"
    assert (first / "onnx" / "model.onnx").stat().st_mtime_ns == stamp
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")], "no half-built folders left behind"


def test_auto_picks_a_gated_pair_and_bf16_only_on_native_bf16_cpus() -> None:
    assert backends.resolve("auto", "auto", flags={"avx512f", "avx512_bf16"}) == ("openvino", "bf16")
    assert backends.resolve("auto", "auto", flags={"amx_bf16"}) == ("openvino", "bf16")
    assert backends.resolve("auto", "auto", flags={"avx2", "avx512f"}) == ("openvino", "fp32")
    assert backends.resolve("onnx", "auto", flags={"avx512_bf16"}) == ("onnx", "fp32")
    assert backends.resolve("torch", "fp32", flags={"avx512_bf16"}) == ("torch", "fp32")
    assert backends.resolve("auto", "auto") in backends.GATED
    with pytest.raises(ValueError, match="fp32"):
        backends.resolve("onnx", "bf16")
    with pytest.raises(ValueError, match="backend"):
        backends.resolve("tensorflow", "auto")
    with pytest.raises(ValueError, match="precision"):
        backends.resolve("auto", "fp16")


def test_every_backend_uses_the_usable_cpus_as_threads(built) -> None:
    import openvino as ov
    import torch

    cpus = cpu.usable_cpus()
    built("torch", "fp32")
    assert torch.get_num_threads() == cpus
    assert built("onnx", "fp32")._session.get_session_options().intra_op_num_threads == cpus
    for precision in ("fp32", "bf16"):
        compiled = built("openvino", precision)._compiled
        assert compiled.get_property("INFERENCE_NUM_THREADS") == cpus
        # Asked for bf16, OpenVINO computes bf16 only where the CPU has it natively, and reports f32 elsewhere.
        native = precision == "bf16" and cpu.has_bf16()
        assert compiled.get_property("INFERENCE_PRECISION_HINT") == (ov.Type.bf16 if native else ov.Type.f32)


def test_cache_dir_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, model_path: str) -> None:
    monkeypatch.setenv("CACHE_DIR", str(tmp_path))
    assert export_cache.model_cache_dir(model_path).parent == tmp_path
    monkeypatch.delenv("CACHE_DIR")
    assert export_cache.model_cache_dir(model_path).parent == Path.home() / ".cache" / "embedding-server"


def test_openvino_streams_run_batches_side_by_side_with_the_same_results(model_path: str, cache_dir: Path,
                                                                          texts: list[str],
                                                                          reference: np.ndarray) -> None:
    """STREAMS: a second compiled form whose streams each take a share of the cores, run from several threads."""
    from concurrent.futures import ThreadPoolExecutor

    backend = backends.create_backend(model_path, "openvino", "fp32", cache_dir=cache_dir, streams=2)
    assert backend.streams == 2 and backend._parallel.get_property("NUM_STREAMS") == 2
    assert backend._compiled.get_property("NUM_STREAMS") == 1
    ids = [t.ids for t in backend.tokenize(texts[:16])]
    with ThreadPoolExecutor(2) as pool:
        halves = list(pool.map(lambda half: backend.embed(half, parallel=True), [ids[:8], ids[8:]]))
    assert np.min(_cosines(np.concatenate(halves), reference[:16])) >= MIN_COSINE["fp32"]
    assert backends.create_backend(model_path, "openvino", "fp32", cache_dir=cache_dir, streams=1)._parallel is None


def test_padding_follows_the_shape_grid_so_openvino_sees_few_shapes() -> None:
    """OpenVINO prepares kernels per input shape; a grid of widths and power-of-two rows makes shapes repeat."""
    grid = tokens.ShapeGrid(widths=(8, 16, 32), pow2_rows=True)
    input_ids, mask = tokens.pad([[101, 7, 102], [101, 102], [101, 5, 6, 7, 8, 9, 102, 4, 102]], pad_id=0, grid=grid)
    assert input_ids.shape == mask.shape == (4, 16)
    assert input_ids[0, :3].tolist() == [101, 7, 102] and not input_ids[0, 3:].any()
    assert mask.sum(axis=1).tolist() == [3, 2, 9, 9]  # the added row repeats the last: no row is all padding
    assert tokens.pad([[1] * 33], pad_id=0, grid=grid)[0].shape == (1, 33)  # past the grid: as long as it is
    assert tokens.pad([[1] * 5, [1] * 3, [1]], pad_id=0)[0].shape == (3, 5)  # the exact grid adds nothing
    assert tokens.OPENVINO_GRID.width(26) == 28 and tokens.OPENVINO_GRID.width(33) == 40 and tokens.OPENVINO_GRID.width(257) == 320
    assert tokens.OPENVINO_GRID.rows(np.array([1, 3, 8, 9])).tolist() == [1, 4, 8, 16]


# --- the export cache across users and when broken -----------------------------------------------------------

SERVER_UID = 10001  # the image's user
BUILDER_UID = 10002  # who built the cache; the test's server is someone else
# Loads every runtime from the cache under test, as root without the capabilities that bypass file permissions
# (conftest.NO_FILE_OVERRIDES), so that it reads the cache, owned by another user, as any user would: through the
# permission bits for others. (Switching to the image's uid is not possible here: the venv may sit in root's home,
# which no other user can enter.) Anything it could not read would show as the rebuild warning.
LOAD_AS_ANOTHER_USER = """
import json, logging, sys
model_path, cache, texts = sys.argv[1:]
from embedding_server.engine import backends
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
found = {}
for name in ("openvino", "onnx"):
    backend = backends.create_backend(model_path, name, "fp32", cache_dir=cache)
    found[name] = [backend.name, backend.embed([t.ids for t in backend.tokenize(json.loads(texts))]).tolist()]
print(json.dumps(found))
"""


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def test_a_cache_prebuilt_by_root_under_a_strict_umask_serves_another_user(tiny: str, texts: list[str],
                                                                           tiny_reference: np.ndarray) -> None:
    """The image's bug: the build (root) wrote the cache 0700, the server (uid 10001) could not read it."""
    with tempfile.TemporaryDirectory() as scratch:
        top = Path(scratch)
        top.chmod(0o755)
        cache, home, tmp = top / "cache", top / "home", top / "tmp"
        result = subprocess.run([sys.executable, "-m", "embedding_server.engine.export_cache", "--prebuild", "--model-path", tiny,
                                 "--cache-dir", str(cache)], capture_output=True, text=True, timeout=900,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"}, umask=0o077)
        assert result.returncode == 0, result.stderr[-2000:]
        modes = _modes(cache)
        assert {name for name, mode in modes.items() if (cache / name).is_dir() and mode != 0o755} == set()
        assert {name for name, mode in modes.items() if (cache / name).is_file() and mode != 0o644} == set()

        subprocess.run(["chown", "-R", f"{BUILDER_UID}:{BUILDER_UID}", str(cache)], check=True)
        assert _modes(cache) == modes, "chown keeps the modes the build wrote"
        for folder in (home, tmp):
            folder.mkdir()
        result = subprocess.run([*NO_FILE_OVERRIDES, sys.executable, "-c", LOAD_AS_ANOTHER_USER,
                                 tiny, str(cache), json.dumps(texts[:4])],
                                capture_output=True, text=True, timeout=600,
                                env={"PATH": os.environ.get("PATH", ""), "HOME": str(home), "TMPDIR": str(tmp),
                                     "HF_HUB_OFFLINE": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
        found = json.loads(result.stdout.splitlines()[-1])
        assert {name: found[name][0] for name in found} == {"openvino": "openvino-fp32", "onnx": "onnx-fp32"}
        for name, (_, vectors) in found.items():
            assert np.min(_cosines(np.array(vectors), tiny_reference[:4])) >= MIN_COSINE["fp32"], name
        assert "unusable" not in result.stderr and not list(tmp.glob("embedding-server*")), "it should read the cache"


@pytest.fixture(scope="module")
def private_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the tests below let a broken cache be rebuilt (one folder, so the conversion runs once)."""
    return tmp_path_factory.mktemp("private") / "embedding-server"


def _break_meta(folder: Path) -> None:
    (folder / "meta.json").write_text("{not json", encoding="utf-8")


def _break_graph(folder: Path) -> None:
    (folder / "model.xml").write_text("<net", encoding="utf-8")


def _drop_tokenizer(folder: Path) -> None:
    (folder / "tokenizer.json").unlink()


@pytest.mark.parametrize("damage", [_break_meta, _break_graph, _drop_tokenizer],
                         ids=["bad-meta", "bad-graph", "missing-file"])
def test_a_broken_cache_is_rebuilt_privately_with_one_warning(damage, tiny: str, cache_dir: Path,
                                                              private_root: Path, texts: list[str],
                                                              tiny_reference: np.ndarray, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    export_cache.ensure("openvino", tiny, cache_dir)  # a whole export to break (already there after the tests above)
    fingerprint = export_cache.model_cache_dir(tiny, cache_dir).name
    copy = tmp_path / "cache"
    shutil.copytree(cache_dir / fingerprint / "openvino", copy / fingerprint / "openvino")
    damage(copy / fingerprint / "openvino")
    monkeypatch.setattr(export_cache, "user_cache_root", lambda: private_root)
    with caplog.at_level(logging.WARNING, logger=export_cache.logger.name):
        backend = backends.create_backend(tiny, "openvino", "fp32", cache_dir=copy)
    assert backend.name == "openvino-fp32"
    assert np.min(_cosines(_embed_all(backend, texts[:8]), tiny_reference[:8])) >= MIN_COSINE["fp32"]
    warnings = [r.getMessage() for r in caplog.records if r.name == export_cache.logger.name and r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "unusable" in warnings[0] and str(private_root) in warnings[0], warnings
    assert (private_root / fingerprint / "openvino" / "model.xml").is_file()


def test_a_cache_that_cannot_be_rebuilt_either_falls_back_to_torch(model_path: str, tmp_path: Path,
                                                                   texts: list[str], reference: np.ndarray,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    # Neither the cache nor the private rebuild can be written (a file where a folder should be: root ignores modes).
    monkeypatch.setattr(export_cache, "user_cache_root", lambda: blocker / "embedding-server")
    with caplog.at_level(logging.WARNING, logger=export_cache.logger.name):
        backend = backends.create_backend(model_path, "auto", "auto", cache_dir=blocker / "cache")
    assert backend.name == "torch-fp32"
    assert np.min(_cosines(_embed_all(backend, texts[:8]), reference[:8])) >= MIN_COSINE["fp32"]
    assert any("torch" in r.getMessage() or "unavailable" in r.getMessage() for r in caplog.records)


def test_the_private_rebuild_refuses_a_folder_it_does_not_own(tmp_path: Path) -> None:
    planted = tmp_path / "planted"
    planted.mkdir()
    os.chown(planted, SERVER_UID, SERVER_UID)
    with pytest.raises(PermissionError):
        export_cache._own_folder(planted)
    (tmp_path / "link").symlink_to(tmp_path)
    with pytest.raises(PermissionError):
        export_cache._own_folder(tmp_path / "link")
    assert export_cache._own_folder(tmp_path / "mine") == tmp_path / "mine"
    assert stat.S_IMODE((tmp_path / "mine").stat().st_mode) == 0o700
