"""One stream with every core, two streams, and the adaptive policy between them, on the same texts in one run.

In-process, no HTTP: the server's batcher over the OpenVINO backend (compiled once with both forms), driven by
closed-loop clients that each send ``texts`` texts a request and send the next when answered. Loads: one client
with one text (single-text latency), and ``--loads`` (clients x texts). Policies take turns run by run, so that a
noisy neighbour hits all alike; each cell keeps its median over ``--rounds``.

    HF_HUB_OFFLINE=1 python bench/bench_streams.py [--rounds 3] [--loads 2x8,4x8,16x8] [--queue-tokens 4096]
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import statistics
import sys
import tempfile
import time

from run import load_corpus

from embedding_server.engine import backends, cpu
from embedding_server.engine.batcher import Batcher
from embedding_server.operations.settings import Streams, default_model_path


async def closed_loop(batcher: Batcher, texts: list[str], clients: int, per_request: int,
                      requests: int) -> tuple[float, float]:
    """Texts per second and median seconds a request, over ``requests`` requests from ``clients`` clients."""
    chunks = itertools.cycle(texts[i:i + per_request] for i in range(0, len(texts) - per_request, per_request))
    latencies: list[float] = []
    left = requests

    async def client() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            start = time.perf_counter()
            await batcher.embed(next(chunks))
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return len(latencies) * per_request / (time.perf_counter() - start), statistics.median(latencies)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--loads", default="2x8,4x8,16x8", help="clients x texts a request")
    parser.add_argument("--texts-per-load", type=int, default=384, help="texts sent in one run of a load")
    parser.add_argument("--single", type=int, default=60, help="one-text requests in one latency run")
    parser.add_argument("--queue-tokens", type=int, default=Streams.queue_tokens, help="0: streams x 2048")
    parser.add_argument("--streams", type=int, default=2)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--cache-dir", default=None, help="default: a fresh temporary folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    texts, source = load_corpus()
    backend = backends.create_backend(default_model_path(), "openvino", args.precision,
                                      cache_dir=args.cache_dir or tempfile.mkdtemp(prefix="bench-cache-"),
                                      streams=args.streams)
    policies = {
        "one stream": {"streams": 1},
        f"{backend.streams} streams": {"streams": backend.streams, "streams_queue_tokens": 1},
        "adaptive": {"streams": backend.streams, "streams_queue_tokens": args.queue_tokens},
    }
    loads = [(1, 1)] + [tuple(int(x) for x in load.split("x")) for load in args.loads.split(",")]
    print(f"{source}; {cpu.usable_cpus()} threads, {backend.name}, parallel form: {backend.streams} streams")

    async def run() -> dict[tuple[str, tuple[int, int]], list[tuple[float, float]]]:
        found: dict[tuple[str, tuple[int, int]], list[tuple[float, float]]] = {}
        # No admission bound: a busy machine must slow the runs down, not refuse them.
        batchers = {name: Batcher(backend, max_queue_seconds=3600, **kwargs) for name, kwargs in policies.items()}
        for batcher in batchers.values():  # warm-up: the shapes of both forms
            await closed_loop(batcher, texts[-2000:], 16, 8, 64)
            await closed_loop(batcher, texts[-2000:], 1, 1, 10)
        offset = 0
        for _ in range(args.rounds):
            for load in loads:
                count = args.single if load == (1, 1) else max(1, args.texts_per_load // load[1])
                chunk = texts[offset:offset + count * load[1] + load[1]]
                for name, batcher in batchers.items():  # the same texts for every policy
                    found.setdefault((name, load), []).append(await closed_loop(batcher, chunk, *load, count))
                offset += len(chunk)
        for batcher in batchers.values():
            batcher.close()
        return found

    found = asyncio.run(run())
    one = [backend.tokenize([texts[0]])[0].ids]
    for parallel in (False, True, False, True):  # the model alone, one text: one stream's threads or all
        calls = []
        for _ in range(50):
            start = time.perf_counter()
            backend.embed(one, parallel=parallel)
            calls.append(time.perf_counter() - start)
        form = "a parallel stream" if parallel else "one stream, all threads"
        print(f"model alone, one {len(one[0])}-token text on {form}: {1000 * statistics.median(calls):.2f} ms median")
    first = next(iter(policies))
    print(f"{'policy':20s} {'load':>6s} {'texts/s':>8s} {'x ' + first:>14s} {'p50 ms':>8s}")
    for (name, load), runs in found.items():
        rate = statistics.median(r for r, _ in runs)
        ratio = statistics.median(r / base for (r, _), (base, _) in zip(runs, found[(first, load)]))
        p50 = 1000 * statistics.median(p for _, p in runs)
        print(f"{name:20s} {load[0]:>3d}x{load[1]:<2d} {rate:8.1f} {ratio:14.3f} {p50:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
