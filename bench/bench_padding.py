"""Padded tokens and model-alone texts/s of shape grids on the same texts, in one run.

The texts are run.py's (Debian's fortunes, shuffled with its seed; corpus.py when fortunes are missing), planned as
the server plans them (batcher.plan_batches, the grid, the token budget): all at once, and 128 at a time (what 16
clients x 8 texts keep in flight). Each grid gets its own OpenVINO model, so that no grid evicts another's kernels;
the grids take turns pass by pass, so that a noisy neighbour hits all alike, and each keeps its best pass.

    HF_HUB_OFFLINE=1 python bench/bench_padding.py [--texts 1000] [--rounds 5] [--precision fp32]
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time

import numpy as np
from run import load_corpus

from embedding_server.engine import backends, cpu, tokens
from embedding_server.engine.batcher import plan_batches
from embedding_server.operations.settings import DEFAULT_MAX_BATCH_TOKENS, default_model_path

# The grid the server used until widths from 8 to 32 tokens came in steps of 4 (kept here to measure against).
STEPS_OF_8 = tokens.ShapeGrid(
    widths=(*range(8, 65, 8), *range(80, 129, 16), *range(160, 257, 32), *range(320, 8193, 64)), pow2_rows=True
)
GRIDS = {"steps of 8": STEPS_OF_8, "OPENVINO_GRID": tokens.OPENVINO_GRID}
WINDOW = 128


def plans(lengths: list[int], grid: tokens.ShapeGrid, budget: int, window: int) -> list[list[int]]:
    """Batches (indices into ``lengths``) as the batcher would cut them, ``window`` texts at a time."""
    out = []
    for start in range(0, len(lengths), window):
        chunk = lengths[start:start + window]
        out += [[start + i for i in batch] for batch in plan_batches(chunk, budget, shapes=grid)]
    return out


def padded_share(lengths: list[int], batches: list[list[int]], grid: tokens.ShapeGrid) -> float:
    """Share of the computed tokens that are padding (width and added rows)."""
    real = sum(lengths)
    computed = sum(int(grid.rows(np.array([len(b)]))[0]) * grid.width(max(lengths[i] for i in b)) for b in batches)
    return 1 - real / computed


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--texts", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budget", type=int, default=DEFAULT_MAX_BATCH_TOKENS)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--cache-dir", default=None, help="default: a fresh temporary folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    texts, source = load_corpus()
    texts = texts[: args.texts]
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="bench-cache-")
    built = {name: backends.create_backend(default_model_path(), "openvino", args.precision, cache_dir=cache_dir)
             for name in GRIDS}
    for name, grid in GRIDS.items():
        built[name].shapes = grid
    ids = [t.ids for t in next(iter(built.values())).tokenize(texts)]
    lengths = [len(row) for row in ids]
    modes = {"all at once": len(ids), f"{WINDOW} at a time": WINDOW}
    cut = {(name, mode): plans(lengths, grid, args.budget, window)
           for name, grid in GRIDS.items() for mode, window in modes.items()}
    print(f"{source}: first {len(texts)} texts, {sum(lengths)} tokens, budget {args.budget}, "
          f"{cpu.usable_cpus()} threads, openvino {args.precision}")

    def run(key: tuple[str, str]) -> float:
        start = time.perf_counter()
        for batch in cut[key]:
            built[key[0]].embed([ids[i] for i in batch])
        return time.perf_counter() - start

    for key in cut:  # warm-up: every shape compiled once
        run(key)
    seconds: dict[tuple[str, str], list[float]] = {key: [] for key in cut}
    for _ in range(args.rounds):
        for key in cut:
            seconds[key].append(run(key))
    first = next(iter(GRIDS))
    print(f"{'grid':14s} {'mode':16s} {'padded':>7s} {'calls':>6s} {'shapes':>6s} {'best t/s':>9s} "
          f"{'median t/s':>10s} {'x ' + first:>14s}")
    for (name, mode), passes in seconds.items():
        batches, grid = cut[(name, mode)], GRIDS[name]
        shapes = {(int(grid.rows(np.array([len(b)]))[0]), grid.width(max(lengths[i] for i in b))) for b in batches}
        best, median = len(ids) / min(passes), len(ids) / float(np.median(passes))
        ratio = min(seconds[(first, mode)]) / min(passes)
        print(f"{name:14s} {mode:16s} {padded_share(lengths, batches, grid):7.1%} {len(batches):6d} {len(shapes):6d} "
              f"{best:9.1f} {median:10.1f} {ratio:14.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
