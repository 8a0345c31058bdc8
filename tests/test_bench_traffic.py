"""The benchmark's traffic is what bench/README.md says: fresh texts unique (no cache can help them), the same for
every server, two tokens dearer; repeated traffic as heavy as fresh; repeats checked bit for bit."""
from __future__ import annotations

import importlib.util
import random
import struct
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "bench" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_run", None)


CORPUS = [f"text number {i} about {'word ' * (i % 37)}".strip() for i in range(500)]


def test_fresh_texts_are_unique_across_phases_and_the_same_for_every_server(bench):
    words = bench._tag_words()
    sent = [bench.FreshTexts(CORPUS, words, phase).take(3000) for phase in bench.PHASES.values()]
    every = [text for phase in sent for text in phase]
    assert len(set(every)) == len(every)  # 3000 texts a phase from 500: the corpus wraps, the prefixes do not
    again = bench.FreshTexts(CORPUS, words, bench.PHASES["fresh-v1"]).take(3000)
    assert again == sent[list(bench.PHASES).index("fresh-v1")]
    assert all(text.endswith(CORPUS[i % len(CORPUS)]) for i, text in enumerate(again))


def test_the_prefix_costs_two_tokens_and_comes_first(bench):
    words = bench._tag_words()
    fresh = bench.FreshTexts(CORPUS, words, 0).take(200)
    assert bench.token_counts(fresh) == bench.token_counts(CORPUS[:200], prefix_tokens=2)
    assert all(text.split()[:2] == bench.unique_prefix(words, i).split() for i, text in enumerate(fresh))


def test_repeat_check_tells_a_one_bit_difference(bench):
    vector = [random.Random(1).uniform(-1, 1) for _ in range(384)]
    vector = list(struct.unpack("384f", struct.pack("384f", *vector)))  # float32 values, as a server sends
    nudged = list(vector)
    nudged[7] = struct.unpack("f", struct.pack("I", struct.unpack("I", struct.pack("f", nudged[7]))[0] + 1))[0]
    check = bench.RepeatCheck()
    check.add("a", vector)
    check.add("a", list(vector))
    check.add("a", repr(vector))  # the legacy route's text form of the same floats
    check.add("a", nudged)
    result = check.result()
    assert (result["repeats_compared"], result["repeats_identical"]) == (3, 2)
    assert 0 < result["max_abs_diff"] < 1e-6


def test_repeated_traffic_weighs_what_fresh_traffic_weighs(bench):
    rng = random.Random(3)
    pool = [f"t{i}" for i in range(2000)]
    lengths = [min(256, int(rng.lognormvariate(3.4, 0.8))) + 2 for _ in pool]
    target = sum(lengths) / len(lengths)
    ranked = bench.rank_like_fresh(pool, lengths, target)
    assert sorted(ranked) == sorted(pool)
    by_text = dict(zip(pool, lengths))
    weights = bench.ZipfTexts(ranked).weights
    weighted = sum(w * by_text[t] for w, t in zip(weights, ranked)) / sum(weights)
    assert abs(weighted - target) < 0.5
    top = sorted(by_text[t] for t in ranked[: bench.SPREAD_RANKS])
    assert top[0] < target / 2 and top[-1] > target * 1.5  # the popular texts are not all of one length


def test_zipf_draws_are_one_seeded_sequence(bench):
    pool = [f"t{i}" for i in range(2000)]
    first, second = bench.ZipfTexts(pool).take(20000), bench.ZipfTexts(pool).take(20000)
    assert first == second
    harmonic = sum(1 / k ** bench.ZIPF_S for k in range(1, 2001))
    assert first.count("t0") / len(first) == pytest.approx(1 / harmonic, rel=0.05)
