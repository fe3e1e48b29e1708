"""Exact token alignment on real tokenizers: soundness, optimality, identity, symmetry, anchor regression, both
whitespace modes (``exact``: identical byte spans; ``paper``: identical once leading spaces are removed)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from alignment_reference import brute_force_pairs, strip_leading_spaces

from dskd_scale.alignment import encode_with_spans, exact_token_alignment, token_bytes

pytestmark = pytest.mark.assets

CROSS_PAIRS = [pair for pair in itertools.permutations(("gpt2", "qwen1.5", "llama2", "mistral"), 2)]


@pytest.mark.parametrize("pair", CROSS_PAIRS, ids=lambda pair: f"{pair[0]}->{pair[1]}")
def test_alignment_is_sound_monotone_and_reaches_the_brute_force_optimum(pair, tokenizers, all_texts, encoded):
    name_a, name_b = pair
    bytes_a, bytes_b = token_bytes(tokenizers[name_a]), token_bytes(tokenizers[name_b])
    total_aligned = 0
    for index, text in enumerate(all_texts):
        spans_a, _, reference_a = encoded[name_a, index]
        spans_b, _, reference_b = encoded[name_b, index]
        positions_a, positions_b = exact_token_alignment(spans_a, spans_b)
        assert positions_a.dtype == np.int64 and positions_b.dtype == np.int64
        assert positions_a.shape == positions_b.shape
        assert np.all(np.diff(positions_a) > 0) and np.all(np.diff(positions_b) > 0), text
        assert set(zip(positions_a.tolist(), positions_b.tolist(), strict=True)) == brute_force_pairs(
            reference_a, reference_b
        ), f"{name_a}->{name_b} differs from the byte-span optimum on {text[:80]!r}"
        data = text.encode("utf-8")
        for i, j in zip(positions_a.tolist(), positions_b.tolist(), strict=True):
            start, end = spans_a.byte_starts[i], spans_a.byte_ends[i]
            assert (start, end) == (spans_b.byte_starts[j], spans_b.byte_ends[j])
            piece = data[start:end]
            # each token's own bytes are those bytes (a SentencePiece dummy prefix space only at the text start)
            for raw in (bytes_a[spans_a.ids[i]], bytes_b[spans_b.ids[j]]):
                assert raw == piece or (start == 0 and raw == b" " + piece), (raw, piece)
        total_aligned += positions_a.size
    assert total_aligned > 1000  # the texts really exercise the pair


@pytest.mark.parametrize("pair", CROSS_PAIRS, ids=lambda pair: f"{pair[0]}->{pair[1]}")
def test_paper_whitespace_mode_is_a_sound_superset_reaching_its_brute_force_optimum(pair, all_texts, encoded):
    """Paper mode: pairs = every (i, j) whose byte spans are equal once leading spaces are removed; it contains
    every exact pair, increases strictly on both sides, and swapping the sides swaps the pairs."""
    gained = 0
    for index, text in enumerate(all_texts):
        spans_a, _, reference_a = encoded[pair[0], index]
        spans_b, _, reference_b = encoded[pair[1], index]
        paper_a, paper_b = exact_token_alignment(spans_a, spans_b, whitespace="paper")
        paper = set(zip(paper_a.tolist(), paper_b.tolist(), strict=True))
        assert paper == brute_force_pairs(strip_leading_spaces(reference_a, text),
                                          strip_leading_spaces(reference_b, text)), text[:80]
        exact = set(zip(*(p.tolist() for p in exact_token_alignment(spans_a, spans_b)), strict=True))
        assert exact <= paper, text[:80]
        assert np.all(np.diff(paper_a) > 0) and np.all(np.diff(paper_b) > 0), text[:80]
        back_b, back_a = exact_token_alignment(spans_b, spans_a, whitespace="paper")
        np.testing.assert_array_equal(back_a, paper_a)
        np.testing.assert_array_equal(back_b, paper_b)
        gained += len(paper) - len(exact)
    if {"gpt2", "llama2"} == set(pair) or {"qwen1.5", "mistral"} == set(pair):
        assert gained > 0  # a lone-space token on one side, the word carrying its space on the other


@pytest.mark.parametrize("name", ["gpt2", "qwen1.5", "llama2", "mistral"])
def test_identical_tokenizers_give_the_identity(name, tokenizers, all_texts, encoded):
    for index, text in enumerate(all_texts):
        spans = encoded[name, index][0]
        positions_a, positions_b = exact_token_alignment(spans, spans)
        covering = np.flatnonzero(spans.ends > spans.starts)
        np.testing.assert_array_equal(positions_a, covering)
        np.testing.assert_array_equal(positions_b, covering)
        content = ~np.isin(spans.ids, tokenizers[name].all_special_ids)
        assert np.all(content[covering]) and content.sum() - covering.size <= 1, text  # at most a dummy prefix


def test_identity_holds_for_a_separately_loaded_copy(tokenizers, asset):
    from transformers import AutoTokenizer

    copy = AutoTokenizer.from_pretrained(str(asset("tokenizers/gpt2")))
    text = "emoji 🙂🙃 family 👨‍👩‍👧‍👦"  # byte pieces that never align across different tokenizers
    original, reloaded = encode_with_spans(tokenizers["gpt2"], text), encode_with_spans(copy, text)
    positions_a, positions_b = exact_token_alignment(original, reloaded)
    np.testing.assert_array_equal(positions_a, np.arange(len(original)))
    np.testing.assert_array_equal(positions_b, np.arange(len(original)))
    pieces = np.flatnonzero(np.diff(original.starts) == 0)
    assert pieces.size > 0 and np.all(original.alignable[pieces])  # the identity includes the multi-byte pieces


@pytest.mark.parametrize("pair", CROSS_PAIRS[::2], ids=lambda pair: f"{pair[0]}<->{pair[1]}")
def test_swapping_sides_swaps_the_pairs(pair, all_texts, encoded):
    for index in range(len(all_texts)):
        spans_a, spans_b = encoded[pair[0], index][0], encoded[pair[1], index][0]
        forward_a, forward_b = exact_token_alignment(spans_a, spans_b)
        backward_b, backward_a = exact_token_alignment(spans_b, spans_a)
        np.testing.assert_array_equal(forward_a, backward_a)
        np.testing.assert_array_equal(forward_b, backward_b)


@pytest.mark.parametrize("teacher,student", [("qwen1.5", "llama2"), ("llama2", "qwen1.5"), ("gpt2", "mistral")])
def test_anchor_desync_regression_words_after_newline_and_accent_align(teacher, student, tokenizers):
    """The anchor's greedy scan never re-syncs after 'Ċ' vs '<0x0A>' or 'Ã©' vs 'é'; span alignment does."""
    text = "Le café est fermé.\nThe shop is open and the menu is long, so we wait for the owner."
    spans_t = encode_with_spans(tokenizers[teacher], text)
    spans_s = encode_with_spans(tokenizers[student], text)
    positions_t, positions_s = exact_token_alignment(spans_t, spans_s)
    aligned_text = {text[spans_s.starts[j] : spans_s.ends[j]] for j in positions_s.tolist()}
    after_newline = {" shop", " is", " open", " and", " the", " menu", " long", " so", " we", " wait", " owner"}
    assert after_newline <= aligned_text, after_newline - aligned_text
    assert " est" in aligned_text  # right after the first 'é'


def test_spans_of_different_texts_are_refused(tokenizers):
    first = encode_with_spans(tokenizers["gpt2"], "one text")
    second = encode_with_spans(tokenizers["llama2"], "another text")
    with pytest.raises(ValueError, match="different texts"):
        exact_token_alignment(first, second)


def test_long_document_aligns_soundly(tokenizers, dolly_texts):
    """A ~40k-character document (quadratic reference is too slow): soundness and monotonicity only."""
    text = "\n\n".join(dolly_texts * 3)
    spans_q = encode_with_spans(tokenizers["qwen1.5"], text)
    spans_l = encode_with_spans(tokenizers["llama2"], text)
    positions_q, positions_l = exact_token_alignment(spans_q, spans_l)
    assert np.all(np.diff(positions_q) > 0) and np.all(np.diff(positions_l) > 0)
    bytes_q, bytes_l = token_bytes(tokenizers["qwen1.5"]), token_bytes(tokenizers["llama2"])
    data = text.encode("utf-8")
    for i, j in zip(positions_q.tolist(), positions_l.tolist(), strict=True):
        piece = data[spans_q.byte_starts[i] : spans_q.byte_ends[i]]
        assert bytes_q[spans_q.ids[i]] == piece == data[spans_l.byte_starts[j] : spans_l.byte_ends[j]]
        assert bytes_l[spans_l.ids[j]] in (piece, b" " + piece)
    assert positions_l.size > 0.6 * np.count_nonzero(spans_l.alignable)
