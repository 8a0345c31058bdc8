"""Peak resident memory of this server under the largest requests its default limits let through.

    python bench/peak_memory.py [--clients 4] [--duration 40]

Starts `python model.py` with its defaults (only the ports and a key set), then `--clients` closed-loop
clients send, in turn on /embedding (ID map, answered as strings) and on V1, requests as large as the
defaults allow: MAX_TEXTS_PER_REQUEST (2048) texts of fortunes joined to ~900 characters (past 256 tokens, so
every batch is full and truncated), just under MAX_BODY_BYTES (2 MB). More clients than MAX_QUEUED_TEXTS
(4096) admits get 429s, which is the bound at work. Every text of every request is new (a two-word prefix of its
own, the text cut back to the same length), so an embedding cache can only fill up, never spare the work: the
peak holds a full cache and full batches at once. Prints the peak RSS of the process tree and the statuses.
This is what an instance's memory must hold (the bench's 16 x 8 load peaks lower).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from run import (
    API_KEY,
    MODEL_NAME,
    _tag_words,
    exit_on_sigterm,
    load_corpus,
    ours_spec,
    start_server,
    stop_server_proc,
    unique_prefix,
)

MAX_TEXTS = 2048  # settings.Limits' default
TEXT_CHARS = 900


def long_texts(corpus: list[str], count: int) -> list[str]:
    """``count`` texts of about TEXT_CHARS characters, each made of consecutive fortunes."""
    texts, current, k = [], "", 0
    while len(texts) < count:
        current = f"{current} {corpus[k % len(corpus)]}".strip()
        k += 1
        if len(current) >= TEXT_CHARS:
            texts.append(current[:TEXT_CHARS])
            current = ""
    return texts


def unique_body(route: str, texts: list[str], words: list[str], first: int) -> bytes:
    """``texts``, each behind the prefix numbered ``first + i`` and cut back to TEXT_CHARS, as ``route``'s body."""
    fresh = [f"{unique_prefix(words, first + i)} {t}"[:TEXT_CHARS] for i, t in enumerate(texts)]
    if route == "/embedding":
        return json.dumps({str(i): t for i, t in enumerate(fresh)}).encode()
    return json.dumps({"instances": fresh}).encode()


async def drive(base: str, routes: list[str], texts: list[str], clients: int, duration: float) -> collections.Counter:
    import aiohttp

    words = _tag_words()
    statuses: collections.Counter = collections.Counter()
    headers = {"X-Api-Key": API_KEY, "Content-Type": "application/json"}
    stop = time.perf_counter() + duration
    sent = {"requests": 0}

    async def client(offset: int) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
            k = offset
            while time.perf_counter() < stop:
                route = routes[k % len(routes)]
                k += 1
                body = unique_body(route, texts, words, sent["requests"] * len(texts))
                sent["requests"] += 1
                async with session.post(base + route, data=body, headers=headers) as resp:
                    await resp.read()
                    statuses[f"{route} {resp.status}"] += 1
                    if resp.status == 429:
                        await asyncio.sleep(float(resp.headers.get("Retry-After", "1")))

    await asyncio.gather(*(client(i) for i in range(clients)))
    return statuses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--duration", type=float, default=40.0)
    args = parser.parse_args()
    exit_on_sigterm()

    corpus, source = load_corpus()
    texts = long_texts(corpus, MAX_TEXTS)
    routes = ["/embedding", f"/v1/models/{MODEL_NAME}:predict"]
    largest = max(len(unique_body(route, texts, _tag_words(), 0)) for route in routes)
    print(f"corpus: {source}; requests of {MAX_TEXTS} new texts of {TEXT_CHARS} characters "
          f"({largest / 1e6:.2f} MB bodies), {args.clients} clients, {args.duration:.0f} s")
    env = {k: v for k, v in os.environ.items() if k not in ("API_KEY", "API_KEYS", "API_KEY_FILE")}
    spec = ours_spec("ours", {**env, "API_KEY": API_KEY, "HF_HUB_OFFLINE": "1"}, {})
    with tempfile.TemporaryDirectory() as log_dir:
        server = start_server(spec, Path(log_dir))
        try:
            statuses = asyncio.run(drive(server.base, routes, texts, args.clients, args.duration))
        finally:
            server.sampler.stop()
            stop_server_proc(server.proc)
    print(f"idle RSS {server.idle_rss_kb / 1024:.0f} MB, peak RSS {server.sampler.peak_rss_kb / 1024:.0f} MB "
          f"(PSS {server.sampler.peak_pss_kb / 1024:.0f} MB)")
    for key, count in sorted(statuses.items()):
        print(f"  {key}: {count}")
    return 0 if statuses and all(key.endswith((" 200", " 429")) for key in statuses) else 1


if __name__ == "__main__":
    sys.exit(main())
