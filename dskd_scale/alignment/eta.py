"""Exact Token Alignment (ETA): pair the tokens of two tokenisations that cover exactly the same characters.

Two tokens align iff their normalised character spans (``TokenSpans``) are identical and both are
alignable (whole characters, covered by no other token of their own tokenisation). This is the exact-span
optimum by construction: every student token whose span equals some teacher token's span is paired, after
newlines, tabs, multi-byte characters and emoji alike, where the anchor's greedy string scan loses sync.
"""

from __future__ import annotations

import numpy as np

from dskd_scale.alignment.spans import TokenSpans


def _span_keys(spans: TokenSpans, positions: np.ndarray) -> np.ndarray:
    """Pack (start, end) into one int64 key; spans of alignable tokens never overlap, so keys are unique."""
    return spans.starts[positions] * (spans.text_length + 1) + spans.ends[positions]


def exact_token_alignment(a: TokenSpans, b: TokenSpans) -> tuple[np.ndarray, np.ndarray]:
    """Positions of tokens of ``a`` and ``b`` (same text) that cover identical character spans.

    Returns two equal-length, strictly increasing int64 arrays ``(positions_a, positions_b)`` [A] into
    ``a.ids`` / ``b.ids``. Swapping the arguments swaps the outputs. When both sides come from identical
    tokenizers (same byte-table fingerprint) and produced the same ids, the result is the identity over
    every token that covers text, pieces of multi-byte characters included.
    """
    if a.text_length != b.text_length:
        raise ValueError(
            f"exact_token_alignment: spans describe different texts ({a.text_length} vs {b.text_length} characters)"
        )
    if a.fingerprint == b.fingerprint and np.array_equal(a.ids, b.ids):
        covering = np.flatnonzero(a.ends > a.starts)
        return covering, covering.copy()
    positions_a = np.flatnonzero(a.alignable)
    positions_b = np.flatnonzero(b.alignable)
    _, in_a, in_b = np.intersect1d(
        _span_keys(a, positions_a), _span_keys(b, positions_b), assume_unique=True, return_indices=True
    )
    # keys sort by start, and alignable tokens are in text order, so both outputs increase strictly
    return positions_a[in_a].astype(np.int64), positions_b[in_b].astype(np.int64)
