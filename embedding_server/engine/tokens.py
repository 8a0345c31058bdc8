"""Tokenizing, and the shapes a batch of token ids is padded to before a runtime computes it."""
from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tokenized:
    """Token ids of one text, cut at the model's limit; ``truncated`` says whether anything was cut.

    The ids are an int32 array: a queued text of 256 tokens holds 1 KB rather than the ~9 KB of a list of ints.
    """

    ids: np.ndarray
    truncated: bool


@dataclass(frozen=True)
class ShapeGrid:
    """The input shapes a backend runs: a batch of rows x width tokens is padded up to its shape in the grid.

    The default grid holds every shape (a batch is padded to its longest row, nothing more). A backend that
    prepares kernels per input shape uses a coarse grid, so that the shapes it meets repeat: ``widths`` (ascending;
    a longer row keeps its width) and, with ``pow2_rows``, row counts that are powers of two. Extra rows repeat
    the last one and their output is dropped.
    """

    widths: tuple[int, ...] = ()
    pow2_rows: bool = False

    def width(self, width: int) -> int:
        at = bisect.bisect_left(self.widths, width)
        return self.widths[at] if at < len(self.widths) else width

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """Padded row counts of an array of row counts (>= 1)."""
        if not self.pow2_rows:
            return rows
        return np.left_shift(1, np.ceil(np.log2(rows)).astype(np.int64))


EXACT = ShapeGrid()
# Steps of 4 tokens from 8 to 32 (half of the texts of real traffic are shorter; a batch of 17-token texts is padded
# to 20 rather than 24), then 8 up to 64, 16, 32 and 64. On run.py's texts this computes 9% padding rather than 11%
# with steps of 8 from 8 (bench/bench_padding.py), for 113 shapes rather than 91 at the default budget (OpenVINO
# keeps ~1 MB a shape it has met). Steps of 4 below 8 would add shapes and save nothing.
OPENVINO_GRID = ShapeGrid(
    widths=(*range(8, 33, 4), *range(40, 65, 8), *range(80, 129, 16), *range(160, 257, 32), *range(320, 8193, 64)),
    pow2_rows=True,
)


TOKENIZE_CHUNK = 128


class HFTokenizer:
    """The model's fast tokenizer, truncating at the model's own max_seq_length (not tokenizer.json's)."""

    def __init__(self, tokenizer_json: str, pad_id: int, max_seq_length: int):
        from tokenizers import Tokenizer

        # Padding and truncation packaged in tokenizer.json (128 for MiniLM) are replaced by the model's own limit.
        self._tokenizer = Tokenizer.from_str(tokenizer_json)
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length=max_seq_length)
        self.max_length = max_seq_length
        self.pad_id = pad_id

    @classmethod
    def from_transformers(cls, tokenizer, max_seq_length: int) -> HFTokenizer:
        return cls(tokenizer.backend_tokenizer.to_str(), tokenizer.pad_token_id or 0, max_seq_length)

    def __call__(self, texts: list[str]) -> list[Tokenized]:
        if len(texts) == 1:  # the one-text request: encode() skips encode_batch's parallel machinery
            return [self._tokenized(self._tokenizer.encode(texts[0]))]
        # The tokenizer's Encoding objects (tokens, offsets, masks) are ~35 KB each for a long text; encoding
        # a chunk at a time keeps only a chunk of them alive (2048 long texts at once held ~75 MB more).
        out = []
        for start in range(0, len(texts), TOKENIZE_CHUNK):
            out += map(self._tokenized, self._tokenizer.encode_batch(texts[start:start + TOKENIZE_CHUNK]))
        return out

    def _tokenized(self, encoding) -> Tokenized:
        ids = encoding.ids
        # Only a text that reached the limit can have been cut; reading `overflowing` builds its Encodings.
        return Tokenized(ids=np.array(ids, dtype=np.int32),
                         truncated=len(ids) >= self.max_length and bool(encoding.overflowing))


def pad(batch: Sequence[np.ndarray], pad_id: int, grid: ShapeGrid = EXACT) -> tuple[np.ndarray, np.ndarray]:
    """Token ids right-padded to the batch's shape in ``grid``: (input_ids, attention_mask).

    Rows the grid adds repeat the last row (real tokens, so no row is all padding); callers keep the first
    ``len(batch)`` outputs.
    """
    rows = int(grid.rows(np.array([len(batch)]))[0])
    width = grid.width(max(len(ids) for ids in batch))
    input_ids = np.full((rows, width), pad_id, dtype=np.int64)
    mask = np.zeros((rows, width), dtype=np.int64)
    for row, ids in enumerate(batch):
        input_ids[row, : len(ids)] = ids
        mask[row, : len(ids)] = 1
    input_ids[len(batch):], mask[len(batch):] = input_ids[len(batch) - 1], mask[len(batch) - 1]
    return input_ids, mask


