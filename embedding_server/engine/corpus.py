"""A deterministic corpus of real English texts, short and long, for fidelity tests and benchmarks.

Built only from files that a plain install has: the docstrings of Python's own standard library
and the README of the bundled model. No apt package, no network. The mix has one-line sentences,
paragraphs, and texts well past 256 tokens so that truncation is exercised too.
"""
from __future__ import annotations

import importlib
import inspect
import logging
import random
import re
from pathlib import Path

from embedding_server.operations.settings import default_model_path

logger = logging.getLogger(__name__)

STDLIB_MODULES = (
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "concurrent.futures",
    "contextlib", "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "enum",
    "fractions", "functools", "gzip", "hashlib", "heapq", "hmac", "http.client", "http.server",
    "inspect", "io", "ipaddress", "itertools", "json", "logging", "mailbox", "os", "pathlib",
    "pickle", "pprint", "queue", "random", "re", "sched", "secrets", "shlex", "shutil",
    "smtplib", "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "timeit", "tokenize", "typing", "unittest", "urllib.parse",
    "uuid", "warnings", "weakref", "xml.dom.minidom", "zipfile", "zoneinfo",
)
_WORDS = re.compile(r"[A-Za-z]{2,}")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _is_prose(text: str) -> bool:
    """Mostly words, not code samples or tables."""
    words = _WORDS.findall(text)
    return len(words) >= 4 and sum(len(w) for w in words) >= 0.6 * len(text.replace(" ", ""))


def _paragraphs(doc: str) -> list[str]:
    out = []
    for block in re.split(r"\n\s*\n", doc):
        if ">>>" in block or block.lstrip().startswith(("|", "#", "-", "*", "```")):
            continue
        text = " ".join(block.split())
        if len(text) >= 20 and _is_prose(text):
            out.append(text)
    return out


def _docstrings() -> list[str]:
    docs: list[str] = []
    for name in STDLIB_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            logger.debug("corpus: module %s not importable, skipped", name)
            continue
        if module.__doc__:
            docs.append(inspect.cleandoc(module.__doc__))
        for attr in sorted(vars(module)):
            if attr.startswith("_"):
                continue
            obj = getattr(module, attr)
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", None) == module.__name__:
                if obj.__doc__:
                    docs.append(inspect.cleandoc(obj.__doc__))
    return docs


def _model_readme() -> list[str]:
    try:
        readme = Path(default_model_path()) / "README.md"
    except ImportError:
        return []
    if not readme.is_file():
        return []
    return [readme.read_text(encoding="utf-8")]


def load_texts(count: int = 256, seed: int = 1234) -> list[str]:
    """``count`` distinct English texts: about half sentences, a third paragraphs, the rest long (> 256 tokens).

    Same ``count`` and ``seed`` give the same list on the same Python version.
    """
    paragraphs: list[str] = []
    for doc in _docstrings() + _model_readme():
        paragraphs.extend(_paragraphs(doc))
    paragraphs = list(dict.fromkeys(paragraphs))
    sentences = list(dict.fromkeys(
        s for p in paragraphs for s in _SENTENCE_END.split(p) if 25 <= len(s) <= 300 and _is_prose(s)
    ))
    rng = random.Random(seed)
    n_long = max(1, count // 6)
    n_para = max(1, count // 3)
    n_sent = count - n_long - n_para
    picked = rng.sample(sentences, min(n_sent, len(sentences)))
    medium = [p for p in paragraphs if 200 <= len(p) <= 1200]
    picked += rng.sample(medium, min(n_para, len(medium)))
    texts = list(dict.fromkeys(picked))
    for _ in range(4 * count):
        if len(texts) >= n_sent + n_para + n_long:
            break
        parts: list[str] = []
        while sum(len(p) for p in parts) < 1600:
            parts.append(rng.choice(paragraphs))
        joined = " ".join(parts)
        if joined not in texts:
            texts.append(joined)
    rng.shuffle(texts)
    if len(texts) < count:
        raise RuntimeError(f"corpus has only {len(texts)} distinct texts, {count} asked")
    return texts[:count]


if __name__ == "__main__":
    sample = load_texts()
    lengths = sorted(len(t) for t in sample)
    print(f"{len(sample)} texts; chars min {lengths[0]} median {lengths[len(lengths) // 2]} max {lengths[-1]}")
