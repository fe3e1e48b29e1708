"""Exact Token Alignment (ETA): pair the tokens of two tokenisations that cover exactly the same bytes.

Two tokens align iff both are alignable (covered by no other token of their own tokenisation) and their
alignment keys are identical:

- ``whitespace="exact"`` (default): the byte spans (``TokenSpans.byte_starts/byte_ends``) are identical;
- ``whitespace="paper"``: the byte spans are identical once each token's leading spaces (the 'Ġ'/'▁'
  word-boundary marker) are removed, as the DSKD paper's ETA matches tokens with those markers stripped. The
  text before two such tokens is the same text by construction, so a word whose space is a token of its own
  on one side pairs with the same word carrying the space on the other. A token of spaces only keeps its span.

Every exact-mode pair is a paper-mode pair. Either way the result is the optimum for its key by construction:
every student token whose key equals some teacher token's key is paired, after newlines, tabs, multi-byte
characters and emoji alike (pieces of one character pair when both sides split it at the same bytes).
"""

from __future__ import annotations

import numpy as np

from dskd_scale.alignment.spans import TokenSpans

WHITESPACE_MODES = ("exact", "paper")


def check_whitespace_mode(whitespace: str) -> str:
    if whitespace not in WHITESPACE_MODES:
        raise ValueError(f"whitespace must be one of {WHITESPACE_MODES}, got {whitespace!r}")
    return whitespace


def span_keys(byte_starts: np.ndarray, byte_ends: np.ndarray, word_starts: np.ndarray, num_bytes: int,
              whitespace: str = "exact") -> np.ndarray:
    """int64 keys packing each token's (start, end) under ``whitespace``; alignable tokens never share a key."""
    starts = word_starts if check_whitespace_mode(whitespace) == "paper" else byte_starts
    return np.asarray(starts, dtype=np.int64) * (num_bytes + 1) + np.asarray(byte_ends, dtype=np.int64)


def exact_token_alignment(a: TokenSpans, b: TokenSpans, *, whitespace: str = "exact") -> tuple[np.ndarray, np.ndarray]:
    """Positions of tokens of ``a`` and ``b`` (same text) whose byte spans are identical (see the module doc).

    Returns two equal-length, strictly increasing int64 arrays ``(positions_a, positions_b)`` [A] into
    ``a.ids`` / ``b.ids``. Swapping the arguments swaps the outputs. When both sides come from identical
    tokenizers (same byte-table fingerprint) and produced the same ids, the result is the identity over
    every token that covers text.
    """
    if a.text_length != b.text_length or a.num_bytes != b.num_bytes:
        raise ValueError(
            f"exact_token_alignment: spans describe different texts ({a.text_length} vs {b.text_length} characters)"
        )
    check_whitespace_mode(whitespace)
    if a.fingerprint == b.fingerprint and np.array_equal(a.ids, b.ids):
        covering = np.flatnonzero(a.byte_ends > a.byte_starts)
        return covering, covering.copy()
    positions_a = np.flatnonzero(a.alignable)
    positions_b = np.flatnonzero(b.alignable)
    keys = [
        span_keys(s.byte_starts[p], s.byte_ends[p], s.word_starts[p], s.num_bytes, whitespace)
        for s, p in ((a, positions_a), (b, positions_b))
    ]
    _, in_a, in_b = np.intersect1d(keys[0], keys[1], assume_unique=True, return_indices=True)
    # keys sort by start, and alignable tokens are disjoint and in text order, so both outputs increase strictly
    return positions_a[in_a].astype(np.int64), positions_b[in_b].astype(np.int64)
