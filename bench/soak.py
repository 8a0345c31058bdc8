"""Soak test: the real server under a fixed-length mixed load, on loopback only.

    /work/venv/bin/python bench/soak.py                       # 120 s, 24 clients
    /work/venv/bin/python bench/soak.py --duration 60 --clients 12

Starts `python model.py` with a key and small limits, then runs concurrent clients that mix valid requests
(legacy, V1, V2, OpenAI), invalid ones (bad JSON, wrong shapes, missing or wrong key), oversized ones (body over
MAX_BODY_BYTES, too many texts, a text too long) and clients that give up mid-request (a short timeout on a big
request). Criteria, each failing the exit code: no 5xx; no request lost (sent, and neither answered nor
deliberately abandoned); every answer's status is one its kind allows; every embedding answer has one
384-number vector per text; the server's resident memory at the end within 10% of what it was after warm-up.
Prints a table and writes JSON to bench/results/soak-<time>.json. See bench/SOAK.md.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

logger = logging.getLogger("soak")

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
MODEL_NAME = "all-MiniLM-L6-v2"
DIMENSION = 384
API_KEY = "soak-key-2b9e"
READY_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 40.0
# Small limits, so that oversized requests are cheap to build and a valid request is a few texts.
LIMITS = {"MAX_BODY_BYTES": "65536", "MAX_TEXTS_PER_REQUEST": "32", "MAX_CHARS_PER_TEXT": "2000",
          "MAX_QUEUED_TEXTS": "4096"}
MAX_BODY = int(LIMITS["MAX_BODY_BYTES"])
MAX_TEXTS = int(LIMITS["MAX_TEXTS_PER_REQUEST"])
MAX_CHARS = int(LIMITS["MAX_CHARS_PER_TEXT"])
WORDS = ("the cat sits on a mat while dogs play in gardens under bright summer skies and rivers run "
         "through quiet valleys where old stone bridges carry trains of tired travellers home at night "
         "servers answer requests embeddings measure meaning numbers vectors tokens models batches").split()
OK_OR_BUSY = {200, 429}  # a valid request may meet a full queue


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_bytes(pid: int) -> int:
    """Resident memory of a process and its children, from /proc."""
    total = 0
    pids = [pid]
    while pids:
        current = pids.pop()
        try:
            with open(f"/proc/{current}/status") as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    pids.extend(int(child) for child in handle.read().split())
        except FileNotFoundError:
            continue
    return total


# --------------------------------------------------------------------------- request kinds

@dataclass(frozen=True)
class Planned:
    method: str
    path: str
    headers: dict[str, str]
    content: bytes | None
    expected: frozenset[int]
    texts: int = 0  # embeddings the answer must carry when it is a 200
    answer_shape: str = ""  # legacy_ids | predictions | v2 | openai
    timeout: float = REQUEST_TIMEOUT_S
    abandon: bool = False  # a timeout is the client leaving on purpose


def _texts(rng: random.Random, count: int, words: tuple[int, int] = (3, 40)) -> list[str]:
    return [" ".join(rng.choices(WORDS, k=rng.randint(*words))) for _ in range(count)]


def _json(value: object) -> bytes:
    return json.dumps(value).encode()


def _key() -> dict[str, str]:
    return {"X-Api-Key": API_KEY, "Content-Type": "application/json"}


def legacy_ids(rng: random.Random, texts: list[str] | None = None) -> Planned:
    texts = texts or _texts(rng, rng.randint(1, 8))
    return Planned("POST", "/embedding", _key(), _json({f"id{i}": t for i, t in enumerate(texts)}),
                   frozenset(OK_OR_BUSY), len(texts), "legacy_ids")


def legacy_instances(rng: random.Random, texts: list[str] | None = None) -> Planned:
    texts = texts or _texts(rng, rng.randint(1, 8))
    return Planned("POST", "/embedding", _key(), _json({"instances": texts}), frozenset(OK_OR_BUSY), len(texts),
                   "predictions")


def v1_predict(rng: random.Random, texts: list[str] | None = None) -> Planned:
    texts = texts or _texts(rng, rng.randint(1, 8))
    return Planned("POST", f"/v1/models/{MODEL_NAME}:predict", _key(), _json({"instances": texts}),
                   frozenset(OK_OR_BUSY), len(texts), "predictions")


def v2_infer(rng: random.Random, texts: list[str] | None = None) -> Planned:
    texts = texts or _texts(rng, rng.randint(1, 8))
    body = {"inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}]}
    return Planned("POST", f"/v2/models/{MODEL_NAME}/infer", _key(), _json(body), frozenset(OK_OR_BUSY),
                   len(texts), "v2")


def openai(rng: random.Random, texts: list[str] | None = None) -> Planned:
    texts = texts or _texts(rng, rng.randint(1, 8))
    body = {"input": texts if len(texts) > 1 else texts[0], "model": MODEL_NAME,
            "encoding_format": rng.choice(["float", "base64"])}
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    return Planned("POST", rng.choice(["/openai/v1/embeddings", "/v1/embeddings"]), headers, _json(body),
                   frozenset(OK_OR_BUSY), len(texts), "openai")


def bad_json(rng: random.Random) -> Planned:
    path, expected = rng.choice([("/embedding", {400}), (f"/v1/models/{MODEL_NAME}:predict", {400}),
                                 ("/openai/v1/embeddings", {400}), (f"/v2/models/{MODEL_NAME}/infer", {400, 422})])
    body = rng.choice([b"{", b"not json", b"\xff\xfe\x00", b'{"instances": ["a",]}', b""])
    return Planned("POST", path, _key(), body, frozenset(expected))


def wrong_shape(rng: random.Random) -> Planned:
    path, body, expected = rng.choice([
        ("/embedding", {"instances": "not a list"}, {400, 422}),
        ("/embedding", {"id1": 42}, {400, 422}),
        ("/embedding", [], {400, 422}),
        (f"/v1/models/{MODEL_NAME}:predict", {"instances": [1, 2]}, {400, 422}),
        (f"/v1/models/{MODEL_NAME}:predict", {"inputs": ["a"]}, {400, 422}),
        (f"/v2/models/{MODEL_NAME}/infer", {"inputs": [{"name": "t", "shape": [2], "datatype": "FP32",
                                                        "data": [1.0, 2.0]}]}, {400, 422}),
        (f"/v2/models/{MODEL_NAME}/infer", {"inputs": [{"name": "t", "shape": [3], "datatype": "BYTES",
                                                        "data": ["a"]}]}, {400, 422}),
        ("/openai/v1/embeddings", {"input": [[1, 2, 3]]}, {400}),
        ("/openai/v1/embeddings", {"input": "a", "model": "text-embedding-3-small"}, {404}),
        ("/v1/embeddings", {"input": []}, {400}),
        ("/v1/models/no-such-model:predict", {"instances": ["a"]}, {404}),
    ])
    return Planned("POST", path, _key(), _json(body), frozenset(expected))


def bad_key(rng: random.Random) -> Planned:
    headers, legacy_status = rng.choice([({}, 401), ({"X-Api-Key": "wrong-key"}, 403),
                                         ({"Authorization": f"Bearer {API_KEY}x"}, 403)])
    headers = {**headers, "Content-Type": "application/json"}
    path = rng.choice(["/embedding", f"/v1/models/{MODEL_NAME}:predict", f"/v2/models/{MODEL_NAME}/infer",
                       "/openai/v1/embeddings", f"/v2/repository/models/{MODEL_NAME}/unload"])
    status = 401 if path.startswith("/openai/") else legacy_status
    return Planned("POST", path, headers, _json({"instances": ["a"], "input": "a"}), frozenset({status}))


def oversized(rng: random.Random) -> Planned:
    choice = rng.randrange(3)
    if choice == 0:  # body over MAX_BODY_BYTES
        body = _json({"instances": [" ".join(["word"] * (MAX_BODY // 5 // 4))] * 5})
        return Planned("POST", f"/v1/models/{MODEL_NAME}:predict", _key(), body, frozenset({413}))
    if choice == 1:  # too many texts
        texts = ["short text"] * (MAX_TEXTS + rng.randint(1, 20))
        path = rng.choice(["/embedding", "/openai/v1/embeddings"])
        return Planned("POST", path, _key(), _json({"instances": texts, "input": texts}), frozenset({413}))
    text = "x" * (MAX_CHARS + 1)  # one text too long
    return Planned("POST", "/embedding", _key(), _json({"id1": text}), frozenset({413}))


def disconnect(rng: random.Random) -> Planned:
    """A big valid request the client gives up on after a few tens of milliseconds."""
    texts = _texts(rng, MAX_TEXTS, words=(150, 250))
    return Planned("POST", f"/v1/models/{MODEL_NAME}:predict", _key(), _json({"instances": texts}),
                   frozenset(OK_OR_BUSY), len(texts), "predictions", timeout=rng.uniform(0.02, 0.3), abandon=True)


def public(rng: random.Random) -> Planned:
    path = rng.choice(["/health", "/v2/health/ready", f"/v2/models/{MODEL_NAME}/ready", "/metrics",
                       "/api-key-info"])
    return Planned("GET", path, {}, None, frozenset({200}))


KINDS: dict[str, tuple[float, Callable[[random.Random], Planned]]] = {
    "legacy_ids": (8, legacy_ids), "legacy_instances": (6, legacy_instances), "v1": (8, v1_predict),
    "v2": (8, v2_infer), "openai": (8, openai), "bad_json": (5, bad_json), "wrong_shape": (5, wrong_shape),
    "bad_key": (5, bad_key), "oversized": (5, oversized), "disconnect": (4, disconnect), "public": (3, public),
}


def answer_ok(plan: Planned, body: bytes) -> bool:
    """A 200 carries one 384-number embedding per text."""
    data = json.loads(body)
    if plan.answer_shape == "legacy_ids":
        vectors = [json.loads(value) for value in data.values()]
    elif plan.answer_shape == "predictions":
        vectors = data["predictions"]
    elif plan.answer_shape == "v2":
        output = data["outputs"][0]
        return output["shape"] == [plan.texts, DIMENSION] and len(output["data"]) == plan.texts * DIMENSION
    elif plan.answer_shape == "openai":
        return len(data["data"]) == plan.texts and [item["index"] for item in data["data"]] == list(range(plan.texts))
    else:
        return True
    return len(vectors) == plan.texts and all(len(vector) == DIMENSION for vector in vectors)


# --------------------------------------------------------------------------- load

@dataclass
class Tally:
    sent: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)  # (kind, status)
    abandoned: Counter = field(default_factory=Counter)
    lost: Counter = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    wrong_answers: list[str] = field(default_factory=list)
    lost_examples: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)


async def client(number: int, base_url: str, stop_at: float, tally: Tally, weights: list[float],
                 kinds: list[str], seed: int) -> None:
    rng = random.Random(seed * 1000 + number)
    async with httpx.AsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT_S) as http:
        while time.monotonic() < stop_at:
            kind = rng.choices(kinds, weights)[0]
            plan = KINDS[kind][1](rng)
            tally.sent[kind] += 1
            started = time.monotonic()
            try:
                response = await http.request(plan.method, plan.path, headers=plan.headers, content=plan.content,
                                              timeout=plan.timeout)
            except httpx.TimeoutException as exc:
                if plan.abandon:
                    tally.abandoned[kind] += 1
                else:
                    tally.lost[kind] += 1
                    tally.lost_examples.append(f"{kind} {plan.method} {plan.path}: {type(exc).__name__}")
                continue
            except httpx.HTTPError as exc:
                tally.lost[kind] += 1
                tally.lost_examples.append(f"{kind} {plan.method} {plan.path}: {type(exc).__name__} {exc}")
                continue
            tally.latencies.append(time.monotonic() - started)
            tally.statuses[(kind, response.status_code)] += 1
            if response.status_code not in plan.expected:
                tally.unexpected.append(f"{kind} {plan.method} {plan.path} -> {response.status_code} "
                                        f"{response.text[:200]}")
            elif response.status_code == 200 and plan.texts:
                try:
                    ok = answer_ok(plan, response.content)
                except (ValueError, KeyError, TypeError, IndexError) as exc:
                    ok = False
                    logger.warning("Unreadable %s answer: %s", kind, exc)
                if not ok:
                    tally.wrong_answers.append(f"{kind} {plan.path} -> {response.text[:200]}")


async def sample_rss(pid: int, until: float, samples: list[tuple[float, int]], start: float) -> None:
    while time.monotonic() < until:
        samples.append((round(time.monotonic() - start, 1), rss_bytes(pid)))
        await asyncio.sleep(1.0)


async def sweep(base_url: str, seed: int, tally: Tally) -> None:
    """Every valid route at the largest request the limits allow, a few at a time: the server meets its
    biggest batches during warm-up, not for the first time while memory is being measured."""
    rng = random.Random(seed)
    plans = [(name, build(rng, _texts(rng, MAX_TEXTS, words=(150, 250))))
             for name, build in [("legacy_ids", legacy_ids), ("legacy_instances", legacy_instances),
                                 ("v1", v1_predict), ("v2", v2_infer), ("openai", openai)] for _ in range(2)]
    async with httpx.AsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT_S) as http:
        async def one(kind: str, plan: Planned) -> None:
            tally.sent[kind] += 1
            try:
                response = await http.request(plan.method, plan.path, headers=plan.headers, content=plan.content)
            except httpx.HTTPError as exc:
                tally.lost[kind] += 1
                tally.lost_examples.append(f"sweep {kind} {plan.path}: {type(exc).__name__}")
                return
            tally.statuses[(kind, response.status_code)] += 1

        await asyncio.gather(*(one(kind, plan) for kind, plan in plans))


async def load(base_url: str, pid: int, clients: int, seconds: float, seed: int, tally: Tally,
               samples: list[tuple[float, int]]) -> None:
    kinds = list(KINDS)
    weights = [KINDS[kind][0] for kind in kinds]
    start = time.monotonic()
    stop_at = start + seconds
    sampler = asyncio.create_task(sample_rss(pid, stop_at, samples, start))
    await asyncio.gather(*(client(n, base_url, stop_at, tally, weights, kinds, seed) for n in range(clients)))
    await sampler


# --------------------------------------------------------------------------- server

def start_server(log_path: Path, extra_env: dict[str, str]) -> tuple[subprocess.Popen, str, float]:
    port, grpc_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("API_KEY", "API_KEYS", "API_KEY_FILE")}
    env.update({"API_KEY": API_KEY, "PORT": str(port), "GRPC_PORT": str(grpc_port), "HF_HUB_OFFLINE": "1",
                "PYTHONUNBUFFERED": "1", "LOG_LEVEL": "INFO", **LIMITS, **extra_env})
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "model.py"], cwd=REPO_DIR, env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
    deadline = started + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}; see {log_path}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url, time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(process)
    raise RuntimeError(f"server not healthy after {READY_TIMEOUT_S:.0f}s; see {log_path}")


def stop_server(process: subprocess.Popen) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


# --------------------------------------------------------------------------- report

def status_class(status: int) -> str:
    return f"{status // 100}xx"


def summarise(tally: Tally, warm: Tally, rss_start: int, rss_end: int, rss_peak: int, max_growth: float,
              cancelled_by_server: int, healthy_after: bool) -> dict:
    by_class = Counter()
    for (_, status), count in tally.statuses.items():
        by_class[status_class(status)] += count
    answered = sum(tally.statuses.values())
    sent = sum(tally.sent.values())
    abandoned = sum(tally.abandoned.values())
    lost = sum(tally.lost.values())
    growth = (rss_end - rss_start) / rss_start if rss_start else float("inf")
    latencies = sorted(tally.latencies)
    warm_5xx = sum(count for (_, status), count in warm.statuses.items() if status >= 500)
    criteria = {  # warm-up included: its answers are not measured for memory, but they count
        "no_5xx": by_class["5xx"] == 0 and warm_5xx == 0,
        "none_lost": lost == 0 and sent == answered + abandoned and not warm.lost,
        "statuses_as_expected": not tally.unexpected and not warm.unexpected,
        "answers_complete": not tally.wrong_answers and not warm.wrong_answers,
        "rss_growth_within_limit": growth <= max_growth,
        "healthy_after": healthy_after,
    }
    kinds = {}
    for kind in KINDS:
        kinds[kind] = {"sent": tally.sent[kind], "abandoned": tally.abandoned[kind], "lost": tally.lost[kind],
                       "statuses": {str(s): c for (k, s), c in sorted(tally.statuses.items()) if k == kind}}
    return {
        "measured": {
            "sent": sent, "answered": answered, "answered_by_class": dict(sorted(by_class.items())),
            "abandoned": abandoned, "lost": lost, "unexpected_statuses": len(tally.unexpected),
            "wrong_answers": len(tally.wrong_answers), "cancelled_by_server": cancelled_by_server,
            "warmup_sent": sum(warm.sent.values()), "warmup_5xx": warm_5xx, "warmup_lost": sum(warm.lost.values()),
            "rss_after_warmup_mb": round(rss_start / 2**20, 1), "rss_end_mb": round(rss_end / 2**20, 1),
            "rss_peak_mb": round(rss_peak / 2**20, 1), "rss_growth": round(growth, 4),
            "latency_p50_s": round(latencies[len(latencies) // 2], 4) if latencies else None,
            "latency_p99_s": round(latencies[int(len(latencies) * 0.99)], 4) if latencies else None,
        },
        "kinds": kinds,
        "criteria": criteria,
        "examples": {"unexpected": (warm.unexpected + tally.unexpected)[:10],
                     "wrong_answers": (warm.wrong_answers + tally.wrong_answers)[:10],
                     "lost": (warm.lost_examples + tally.lost_examples)[:10]},
    }


def print_table(result: dict) -> None:
    m = result["measured"]
    print(f"\n{'kind':<18}{'sent':>8}{'2xx':>8}{'4xx':>8}{'5xx':>6}{'abandoned':>11}{'lost':>6}")
    for kind, row in result["kinds"].items():
        classes = Counter()
        for status, count in row["statuses"].items():
            classes[status_class(int(status))] += count
        print(f"{kind:<18}{row['sent']:>8}{classes['2xx']:>8}{classes['4xx']:>8}{classes['5xx']:>6}"
              f"{row['abandoned']:>11}{row['lost']:>6}")
    c = m["answered_by_class"]
    print(f"{'total':<18}{m['sent']:>8}{c.get('2xx', 0):>8}{c.get('4xx', 0):>8}{c.get('5xx', 0):>6}"
          f"{m['abandoned']:>11}{m['lost']:>6}")
    print(f"\nanswered {m['answered']}, cancelled by the server after a client left {m['cancelled_by_server']}, "
          f"unexpected statuses {m['unexpected_statuses']}, incomplete answers {m['wrong_answers']}")
    print(f"latency p50 {m['latency_p50_s']} s, p99 {m['latency_p99_s']} s")
    print(f"RSS after warm-up {m['rss_after_warmup_mb']} MB, at end {m['rss_end_mb']} MB "
          f"(growth {m['rss_growth']:+.1%}), peak {m['rss_peak_mb']} MB")
    for name, ok in result["criteria"].items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    for label, lines in result["examples"].items():
        for line in lines:
            print(f"  {label}: {line}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of measured load (max 600)")
    parser.add_argument("--warmup", type=float, default=20.0, help="seconds of the same load before measuring")
    parser.add_argument("--clients", type=int, default=24)
    parser.add_argument("--seed", type=int, default=20261127)
    parser.add_argument("--max-rss-growth", type=float, default=0.10)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/soak-<time>.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the table
    if not 0 < args.duration <= 600 or not 0 <= args.warmup <= 120 or not 1 <= args.clients <= 256:
        parser.error("--duration must be in (0, 600], --warmup in [0, 120], --clients in [1, 256]")

    stamp = time.strftime("%Y%m%d-%H%M%S")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = args.out or RESULTS_DIR / f"soak-{stamp}.json"
    log_path = RESULTS_DIR / f"soak-{stamp}-server.log"
    process, url, start_seconds = start_server(log_path, {})
    logger.info("Server ready at %s in %.1f s (pid %d); warm-up %.0f s, then %.0f s with %d clients",
                url, start_seconds, process.pid, args.warmup, args.duration, args.clients)
    try:
        warm, warm_samples = Tally(), []
        if args.warmup:
            asyncio.run(sweep(url, args.seed + 2, warm))
            asyncio.run(load(url, process.pid, args.clients, args.warmup, args.seed + 1, warm, warm_samples))
        time.sleep(2.0)  # let the last abandoned requests' work end before measuring
        rss_start = rss_bytes(process.pid)
        tally, samples = Tally(), []
        asyncio.run(load(url, process.pid, args.clients, args.duration, args.seed, tally, samples))
        time.sleep(2.0)
        rss_end = rss_bytes(process.pid)
        try:
            healthy_after = httpx.get(f"{url}/health", timeout=10).status_code == 200
        except httpx.HTTPError:
            healthy_after = False
    finally:
        returncode = stop_server(process)
    server_log = log_path.read_text(errors="replace")
    cancelled = server_log.count("Client left before its answer")
    rss_peak = max([rss for _, rss in samples] + [rss_end, rss_start])
    result = summarise(tally, warm, rss_start, rss_end, rss_peak, args.max_rss_growth, cancelled, healthy_after)
    result["command"] = " ".join([os.path.basename(sys.executable), "bench/soak.py", *(argv or sys.argv[1:])])
    result["config"] = {"duration_s": args.duration, "warmup_s": args.warmup, "clients": args.clients,
                        "seed": args.seed, "max_rss_growth": args.max_rss_growth, "limits": LIMITS,
                        "backend": os.environ.get("BACKEND", "auto"), "server_start_s": round(start_seconds, 1),
                        "server_exit_code": returncode, "cpus": os.cpu_count()}
    result["rss_samples_mb"] = [(t, round(rss / 2**20, 1)) for t, rss in samples]
    result["passed"] = all(result["criteria"].values())
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"\n{'PASSED' if result['passed'] else 'FAILED'}; JSON in {out}; server log in {log_path}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
